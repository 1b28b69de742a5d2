"""`jaxllm bench --levers`: every CPU speed lever measured on *this* CPU, interleaved in one run.

The reference is the jaxllm default step in the process `jaxllm` runs on this CPU: the process levers that
`jaxllm.cpu_levers.LEVER_GAINS` applies on its ISA (the no-mmap malloc settings, YNNPACK for dots only), the
others off. Each lever is then switched alone (off where the reference has it, on where it does not):
- config levers (attention kind, fused loss, bf16 compute, unrolled layers, donation, row groups) are variants
  of the reference process, interleaved step by step with the reference;
- process levers (environment variables read at process start: malloc, XLA flags, tcmalloc) need a
  process each. Every process compiles once and then waits; the parent runs them in rounds (one step
  of each variant per process per round, bracketed by a float32 matmul ceiling measured in the same
  process), so load changes hit every lever alike; the order of processes and of variants rotates
  from round to round (the first step of a round ran systematically slower on a loaded machine).
A lever's gain is the median over rounds of (step time without the lever) / (with it) - 1, both
times from the same round; fractions of each process's own matmul ceiling are reported beside it.
The result names the CPU's ISA (hardware, and the one XLA is capped at by `--xla_cpu_max_isa` when
it emulates a smaller CPU) and prints the entry for `jaxllm.cpu_levers.LEVER_GAINS` that the
measurements support.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from jaxllm import cpu_levers
from jaxllm import sharding as sharding_lib
from jaxllm.bench.cases import BenchSettings, MatmulProbe, TrainCase, bench_config
from jaxllm.errors import UsageError


@dataclass(frozen=True)
class Lever:
    """One lever: `name` (a LEVER_GAINS key for process levers), what it is, and how to switch it.
    `on_in_reference` says whether the reference has it (then the variant turns it off)."""
    name: str
    description: str
    kind: str  # "config" (a variant of the reference process) or "process" (its own process)
    overrides: tuple[str, ...] = ()
    donate: bool = True
    env: dict[str, str | None] = field(default_factory=dict)
    on_in_reference: bool = True


CONFIG_LEVERS = (
    Lever("attention", "block-causal attention (model.attention=blockwise, what 'auto' picks on CPU) vs XLA's",
          "config", ("model.attention=xla",)),
    Lever("fused_loss", "fused chunked lm head + loss (model.loss_chunk_size=128)", "config",
          ("model.loss_chunk_size=128",), on_in_reference=False),
    Lever("bf16", "bfloat16 compute with float32 master weights (model.dtype=bfloat16; opt-in: other numerics)",
          "config", ("model.dtype=bfloat16",), on_in_reference=False),
    Lever("unrolled", "unrolled layers (model.scan_layers=auto on CPU) vs one scan over them", "config",
          ("model.scan_layers=true",)),
    Lever("donation", "donating the train state to the step", "config", (), donate=False),
    Lever("row_groups", "the batch's rows in groups side by side on host threads, one per core "
          "(train.row_groups=0 on one CPU device) vs one program", "config", ("train.row_groups=1",)),
)


def _flags_without_ynn(flags: str) -> str:
    return " ".join(f for f in flags.split() if "ynn_fusion_type" not in f)


PROCESS_LEVERS = ("malloc", "ynn_dot")


def reference_env(environ: dict[str, str], jaxlib_version: str,
                  applied: tuple[str, ...] | list[str] = PROCESS_LEVERS) -> dict[str, str | None]:
    """The reference process's environment: the process levers in `applied` on ('malloc': the no-mmap malloc
    settings; 'ynn_dot': YNN for dots only, where this jaxlib knows the flag), the others off. The study passes
    the levers the CLI applies on this CPU's ISA, so the config levers are measured in the process `jaxllm` runs."""
    flags = _flags_without_ynn(environ.get("XLA_FLAGS", ""))
    if "ynn_dot" in applied and cpu_levers.ynn_flag_known(jaxlib_version):
        flags = (flags + " " + cpu_levers.YNN_DOT_FLAG).strip()
    malloc = cpu_levers.MALLOC_ENV if "malloc" in applied else {key: None for key in cpu_levers.MALLOC_ENV}
    return {**malloc, "XLA_FLAGS": flags or None, "LD_PRELOAD": None}


HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def host_devices_flags(flags: str, count: int) -> str:
    """XLA_FLAGS with the CPU split into `count` XLA devices (any earlier count replaced)."""
    kept = [f for f in flags.split() if not f.startswith(HOST_DEVICES_FLAG)]
    return " ".join(kept + [f"{HOST_DEVICES_FLAG}={count}"])


def process_levers(reference: dict[str, str | None], tcmalloc: str | None, host_devices: int = 0,
                   ynn_known: bool = False) -> list[Lever]:
    """Each process lever as the reference's environment with that lever switched: off where the reference
    has it, on where it does not (`ynn_dot` only where this jaxlib knows the flag: `ynn_known`, or the flag is
    in the reference); 'none' turns every lever of the reference off at once (where it has two). `host_devices`
    > 1 adds the opt-in split of the CPU into that many XLA devices (the default mesh then runs data-parallel
    over them: the batch must divide). The CLI never applies it (PERFORMANCE.md, tenth session: it moves the
    numbers and costs compile time); the study measures it so a user can decide on their CPU."""
    no_malloc = {key: None for key in cpu_levers.MALLOC_ENV}
    flags = reference.get("XLA_FLAGS") or ""
    has_malloc = all(reference.get(key) for key in cpu_levers.MALLOC_ENV)
    has_ynn = cpu_levers.YNN_DOT_FLAG in flags
    without_ynn = _flags_without_ynn(flags) or None
    levers = [Lever("malloc", "glibc malloc without mmap churn (MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 ...)",
                    "process", env={**reference, **(no_malloc if has_malloc else cpu_levers.MALLOC_ENV)},
                    on_in_reference=has_malloc)]
    if has_ynn or ynn_known:
        levers.append(Lever("ynn_dot", f"XLA flag {cpu_levers.YNN_DOT_FLAG}", "process",
                            env={**reference, "XLA_FLAGS": without_ynn if has_ynn
                                 else (flags + " " + cpu_levers.YNN_DOT_FLAG).strip()},
                            on_in_reference=has_ynn))
    if has_malloc and has_ynn:
        levers.append(Lever("none", "all process levers (a plain Python process)", "process",
                            env={**reference, **no_malloc, "XLA_FLAGS": without_ynn}))
    if host_devices > 1:
        levers.append(Lever("host_devices", f"the CPU as {host_devices} XLA devices, data-parallel "
                            f"({HOST_DEVICES_FLAG}={host_devices}; opt-in, never applied by the CLI)", "process",
                            env={**reference, "XLA_FLAGS": host_devices_flags(flags, host_devices)},
                            on_in_reference=False))
    if tcmalloc:
        levers.append(Lever("tcmalloc", "tcmalloc (LD_PRELOAD) instead of the no-mmap glibc malloc", "process",
                            env={**reference, **no_malloc, "LD_PRELOAD": tcmalloc}, on_in_reference=False))
    return levers


def find_tcmalloc() -> str | None:
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so*",
                    "/usr/lib64/libtcmalloc*.so*", "/usr/lib/libtcmalloc*.so*", "/opt/homebrew/lib/libtcmalloc*"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def rotated(items, shift: int) -> list:
    """items started at position shift % len: round r runs variants (and processes) in the order
    r, r+1, ..., so the one that comes first (after the matmul probe or a wake-up) changes every round."""
    items = list(items)
    shift = shift % len(items) if items else 0
    return items[shift:] + items[:shift]


def lever_gain(seconds_with: list[float], seconds_without: list[float]) -> float:
    """Median over rounds of (step time without the lever) / (with it) - 1, the two times from the same
    round. Step times, not fractions of the ceiling: an XLA flag lever changes the matmul the ceiling is
    measured with (YNNPACK or not), so each process's ceiling is a different yardstick."""
    return statistics.median(o / w for w, o in zip(seconds_with, seconds_without)) - 1.0


# ----------------------------------------------------------------------------------------------
# The worker: one process, its variants compiled once, one interleaved round per request on stdin.


def _worker(spec: dict) -> int:
    settings = BenchSettings.from_dict(spec["settings"])
    configs = [(name, bench_config(settings, list(settings.overrides) + overrides), donate)
               for name, overrides, donate in spec["variants"]]
    mesh = sharding_lib.make_mesh(configs[0][1].mesh)
    cases = [TrainCase(name, config, mesh, donate=donate) for name, config, donate in configs]
    probe = MatmulProbe("cpu")
    warm = 0.0
    for case in cases:
        for _ in range(max(1, settings.warmup)):
            warm = case.run_once()
    probe.calibrate(warm * len(cases))
    _reply({"ready": True, "compile_seconds": [c.compile_seconds for c in cases]})
    for round_index, line in enumerate(sys.stdin):
        if line.strip() != "round":
            break
        probe.measure()
        times, cpu_times, faults = [0.0] * len(cases), [0.0] * len(cases), [0] * len(cases)
        for index in rotated(range(len(cases)), round_index):  # no variant always runs first
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[index] = cases[index].run_once()
            faults[index] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            cpu_times[index] = cases[index].last_cpu_seconds
        probe.measure()
        ceiling = probe.close_round()
        _reply({"times": times, "cpu_times": cpu_times, "minor_faults": faults, "ceiling_tflops": ceiling,
                "fractions": [c.flops_per_step / t / 1e12 / ceiling for c, t in zip(cases, times)],
                "tokens_per_step": [c.tokens_per_step for c in cases]})
    return 0


def _reply(message: dict) -> None:
    print("LEVERS " + json.dumps(message), flush=True)


class _Process:
    """A worker process of the study: started with its environment, asked for one round at a time."""

    def __init__(self, tag: str, env_changes: dict[str, str | None], settings: BenchSettings,
                 variants: list[tuple[str, list[str], bool]], command: list[str] | None = None):
        env = dict(os.environ)
        env["JAXLLM_NO_REEXEC"] = "1"
        for key, value in env_changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.tag = tag
        spec = json.dumps({"settings": dataclasses.asdict(settings), "variants": variants})
        command = command or [sys.executable, "-m", "jaxllm.bench.levers", "--worker", spec]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()
        self.rounds: list[dict] = []

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("LEVERS "):
                return json.loads(line[len("LEVERS "):])
        raise self._died()

    def _died(self) -> RuntimeError:
        code = self.process.wait()
        if code < 0:  # killed by a signal
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            cause = (" (most often the out-of-memory killer: every process of the study holds its "
                     "compiled variants at once: measure fewer levers with --lever NAME, or a smaller model)"
                     if -code == signal.SIGKILL else "")
            return RuntimeError(f"the lever process '{self.tag}' was killed by {name}{cause}")
        return RuntimeError(f"the lever process '{self.tag}' exited (code {code}) before answering; "
                            "its error is printed above")

    def round(self) -> dict:
        try:
            self.process.stdin.write("round\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None
        result = self._read()
        self.rounds.append(result)
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:  # it died meanwhile
                pass
            self.process.wait(timeout=60)


def reference_settings(settings: BenchSettings) -> BenchSettings:
    """What every process of the study compiles: the pretraining step at the asked preset, batch, context,
    mesh and overrides (the variants are the levers)."""
    return BenchSettings(preset=settings.preset, stage="pretrain", batch_size=settings.batch_size,
                         warmup=settings.warmup, seq_len=settings.seq_len, mesh=settings.mesh,
                         overrides=settings.overrides)


def _host_device_count(settings: BenchSettings) -> int:
    """XLA devices for the host-devices lever: one per core, where the batch splits over them (else 0: not
    measured)."""
    cores = cpu_levers.available_cpus()
    batch = settings.batch_size or 0
    return cores if cores > 1 and batch and batch % cores == 0 and not settings.mesh else 0


def select_levers(config_levers: tuple[Lever, ...], process_levers_: list[Lever], only: tuple[str, ...]
                  ) -> tuple[list[Lever], list[Lever]]:
    """The config and process levers named in `only` (all where it is empty); an unknown name is a usage
    error that lists the levers this run can measure."""
    known = [lever.name for lever in (*config_levers, *process_levers_)]
    unknown = [name for name in only if name not in known]
    if unknown:
        raise UsageError(f"--lever {', '.join(unknown)}: not a lever this run can measure; choose from "
                         f"{', '.join(known)}")
    keep = lambda lever: not only or lever.name in only  # noqa: E731
    return [lever for lever in config_levers if keep(lever)], [lever for lever in process_levers_ if keep(lever)]


def run_study(settings: BenchSettings, log=print, only: tuple[str, ...] = ()) -> dict:
    """Starts the processes, runs `settings.steps` rounds, and returns every measurement (JSON-ready).
    `only`: the names of the levers to measure (default: every lever; fewer levers, fewer processes and
    less memory: each process holds its compiled variants for the whole study)."""
    if settings.steps < 1:
        raise UsageError("--steps must be at least 1 (rounds of the lever study)")
    import importlib.metadata

    jaxlib_version = importlib.metadata.version("jaxlib")
    cpu = cpu_levers.cpu_info()
    isa = cpu_levers.effective_isa(cpu["isa"], os.environ.get("XLA_FLAGS", ""))
    applied = cpu_levers.levers_for(isa)  # the reference is the process the CLI runs on this ISA
    reference = reference_env(dict(os.environ), jaxlib_version, applied)
    study_settings = reference_settings(settings)
    config_levers, others = select_levers(
        CONFIG_LEVERS, process_levers(reference, find_tcmalloc(), _host_device_count(settings),
                                      ynn_known=cpu_levers.ynn_flag_known(jaxlib_version)), only)
    reference_variants = [("reference", [], True)] + [
        (lever.name, list(lever.overrides), lever.donate) for lever in config_levers]
    processes: list[_Process] = []
    try:
        log(f"compiling the reference process ({len(reference_variants)} variants) ...")
        processes.append(_Process("reference", reference, study_settings, reference_variants))
        for lever in others:
            log(f"compiling the process for lever '{lever.name}' ...")
            processes.append(_Process(lever.name, lever.env, study_settings, [("reference", [], True)]))
        for index in range(settings.steps):
            began = time.perf_counter()
            for process in rotated(processes, index):
                process.round()
            log(f"  round {index + 1}/{settings.steps} in {time.perf_counter() - began:.1f}s")
    finally:
        for process in processes:
            process.close()
    reference_process, *lever_processes = processes

    def column(process: _Process, key: str, variant: int) -> list[float]:
        return [r[key][variant] for r in process.rounds]

    def summary(process: _Process, variant: int) -> dict:
        times = column(process, "times", variant)
        tokens = process.rounds[0]["tokens_per_step"][variant]
        return {"tokens_per_second": tokens / statistics.median(times),
                "fraction_of_matmul_ceiling": statistics.median(column(process, "fractions", variant)),
                "minor_faults_per_step": statistics.median(column(process, "minor_faults", variant)),
                "cpu_share": statistics.median(c / t for c, t in zip(column(process, "cpu_times", variant), times)),
                "compile_seconds": process.ready["compile_seconds"][variant]}

    reference_times = column(reference_process, "times", 0)
    rows = []
    for index, lever in enumerate(config_levers, start=1):
        variant = column(reference_process, "times", index)
        with_, without = (reference_times, variant) if lever.on_in_reference else (variant, reference_times)
        rows.append({"lever": lever.name, "description": lever.description, "kind": lever.kind,
                     "in_reference": lever.on_in_reference, "gain": lever_gain(with_, without),
                     "variant": summary(reference_process, index)})
    for lever, process in zip(others, lever_processes):
        variant = column(process, "times", 0)
        with_, without = (reference_times, variant) if lever.on_in_reference else (variant, reference_times)
        rows.append({"lever": lever.name, "description": lever.description, "kind": lever.kind,
                     "in_reference": lever.on_in_reference, "gain": lever_gain(with_, without),
                     "variant": summary(process, 0)})
    ceilings = [r["ceiling_tflops"] for r in reference_process.rounds]
    measured = {row["lever"]: round(row["gain"], 3) for row in rows
                if row["lever"] in ("malloc", "ynn_dot")}
    return {
        "cpu_model": cpu["model"], "hardware_isa": cpu["isa"], "isa": isa, "isa_emulated": isa != cpu["isa"],
        "xla_flags": reference.get("XLA_FLAGS"), "jaxlib": jaxlib_version,
        "preset": settings.preset, "batch_size": settings.batch_size, "seq_len": settings.seq_len or None,
        "rounds": settings.steps, "load_average": list(os.getloadavg()),
        "matmul_ceiling_tflops": statistics.median(ceilings),
        "reference": summary(reference_process, 0),
        "levers": rows,
        "lever_gains_entry": {isa: measured},
        "cli_applies": applied,
    }


def format_study(study: dict) -> str:
    lines = [f"CPU: {study['cpu_model']} - ISA {study['isa']}"
             + (f" (emulated: XLA capped by --xla_cpu_max_isa; hardware {study['hardware_isa']})"
                if study["isa_emulated"] else ""),
             f"{study['preset']}, batch {study['batch_size']}, {study['rounds']} interleaved rounds; in-run f32 matmul "
             f"ceiling {study['matmul_ceiling_tflops'] * 1e3:.0f} GFLOP/s; load average "
             f"{', '.join(f'{x:.1f}' for x in study['load_average'])}",
             f"reference (the CLI's process levers on {study['isa']}: {', '.join(study['cli_applies']) or 'none'}; "
             f"default config): {study['reference']['tokens_per_second']:,.0f} "
             f"tokens/s, {100 * study['reference']['fraction_of_matmul_ceiling']:.1f}% of the ceiling", ""]
    header = ["lever", "kind", "variant", "tokens/s", "% ceiling", "faults/step", "gain of the lever"]
    body = []
    for row in study["levers"]:
        v = row["variant"]
        body.append([row["lever"], row["kind"], "lever off" if row["in_reference"] else "lever on",
                     f"{v['tokens_per_second']:,.0f}", f"{100 * v['fraction_of_matmul_ceiling']:.1f}%",
                     f"{v['minor_faults_per_step']:,.0f}", f"{100 * row['gain']:+.1f}%"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    lines += ["", f"jaxllm.cpu_levers.LEVER_GAINS entry these measurements support: {study['lever_gains_entry']}",
              f"the CLI applies on {study['isa']} today: {study['cli_applies'] or 'no process lever'}"]
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(_worker(json.loads(sys.argv[2])))
