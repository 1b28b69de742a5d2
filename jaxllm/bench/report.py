"""Running the cases interleaved and reporting them: the environment, per-case records (throughput,
MFU, memory), the table, a one-paragraph description and the JSONL history."""

from __future__ import annotations

import datetime
import json
import os
import platform as platform_lib
import resource
import statistics
import subprocess
from pathlib import Path
from typing import Any

import jax
import jaxlib

from jaxllm import cpu_levers
from jaxllm import model as model_lib
from jaxllm.bench.cases import FLOPS_FORMULA, MatmulProbe
from jaxllm.hardware import device_peak


def run_interleaved(cases: list, warmup: int, steps: int, probe: MatmulProbe | None,
                    log=print) -> list[float]:
    """Warm-up, then `steps` rounds of one step of every case in turn, bracketed by the probe."""
    last_warm: dict[str, float] = {}
    for case in cases:
        for _ in range(warmup):
            last_warm[case.name] = case.run_once()
    if probe is not None and last_warm:
        probe.calibrate(sum(last_warm.values()))
    ceilings: list[float] = []
    for round_index in range(steps):
        if probe is not None:
            probe.measure()
        for case in cases:
            case.times.append(case.run_once())
            case.cpu_times.append(case.last_cpu_seconds)
        ceiling = None
        if probe is not None:
            probe.measure()
            ceiling = probe.close_round()
            ceilings.append(ceiling)
        log(f"  round {round_index + 1}/{steps}: " + ", ".join(f"{c.name} {c.times[-1]:.3f}s" for c in cases)
            + (f", matmul {ceiling:.3f} TFLOP/s" if ceiling else ""))
    return ceilings


def bench_environment() -> dict[str, Any]:
    env_keys = ("XLA_FLAGS", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                "MALLOC_TOP_PAD_", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
        commit = commit + ("+dirty" if dirty and commit else "")
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "host": platform_lib.node(),
        "python": platform_lib.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "cpu_count": os.cpu_count(),
        **_cpu_isa(),
        "env": {k: os.environ[k] for k in env_keys if k in os.environ},
    }


def _cpu_isa() -> dict[str, Any]:
    """The host CPU's model and vector ISA (AVX2 / AVX-512 / AMX); `isa` is the one XLA generates code
    for (lowered by `--xla_cpu_max_isa` when it emulates a smaller CPU: `isa_emulated`)."""
    cpu = cpu_levers.cpu_info()
    isa = cpu_levers.effective_isa(cpu["isa"], os.environ.get("XLA_FLAGS", ""))
    return {"cpu_model": cpu["model"], "hardware_isa": cpu["isa"], "isa": isa, "isa_emulated": isa != cpu["isa"]}


def _peak_device_memory(mesh) -> int | None:
    peaks = []
    for device in mesh.devices.flat:
        if device.process_index != process_index():
            continue
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def process_index() -> int:
    """This process's index among the JAX processes (0 on one host)."""
    return jax.process_index()


def summarize_case(case, ceilings: list[float], peak_tflops_override: float | None, environment: dict,
                   overrides: list[str], cpu_ceilings: list[float] | None = None,
                   ceiling_dtype: str = "float32") -> dict[str, Any]:
    config, mesh = case.config, case.mesh
    device = mesh.devices.flat[0]
    m = config.model
    median = statistics.median(case.times)
    tokens_per_second = case.tokens_per_step / median
    achieved_tflops = case.flops_per_step / median / 1e12
    peak_per_chip, bandwidth = device_peak(device.device_kind, m.dtype)
    peak_source = "datasheet"
    if peak_tflops_override:
        peak_per_chip, peak_source = peak_tflops_override, "--peak-tflops"
    ceiling = statistics.median(ceilings) if ceilings else None
    if device.platform == "cpu" and not peak_tflops_override:
        peak_per_chip, peak_source = ceiling, f"{ceiling_dtype} matmul ceiling measured in this run"
    # Per-round ratio to the ceiling measured in the same round (robust to machine load drifting).
    per_round = [case.flops_per_step / t / 1e12 / c for t, c in zip(case.times, ceilings)] if ceilings else []
    # Contention-robust companion (shared CPU machines): model FLOPs per CPU-second of this process over
    # the matmul's FLOPs per CPU-second, same round. It ignores how well the step uses both cores.
    per_round_cpu = ([case.flops_per_step / max(c, 1e-9) / 1e12 / m for c, m in zip(case.cpu_times, cpu_ceilings)]
                     if cpu_ceilings and device.platform == "cpu" else [])
    cpu_share = statistics.median(c / t for c, t in zip(case.cpu_times, case.times)) if case.cpu_times else None
    num_devices = mesh.size
    # CPU "devices" (simulated or not) share the host's cores, and the probe measures the whole host.
    chips = 1 if device.platform == "cpu" else num_devices
    record: dict[str, Any] = {
        "name": case.name,
        "stage": "generate" if case.kind == "generate" else config.train.stage,
        "preset": m.preset,
        "overrides": overrides,
        "model": {"d_model": m.d_model, "num_layers": m.num_layers, "num_heads": m.num_heads,
                  "num_kv_heads": m.num_kv_heads, "head_dim": m.resolved_head_dim, "d_ff": m.resolved_d_ff,
                  "vocab_size": m.vocab_size, "dtype": m.dtype, "param_dtype": m.param_dtype,
                  "attention": model_lib.resolve_attention(m, decoding=False), "remat": m.remat,
                  "scan_layers": m.scan_layers, "loss_chunk_size": m.loss_chunk_size},
        "batch_size": config.train.batch_size,
        "seq_len": config.data.seq_len,
        "grad_accum_steps": config.train.grad_accum_steps,
        "row_groups": getattr(case, "groups", 1),  # train: the step's row groups; generate: generate's
        "donate": case.donate,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": num_devices,
        "num_processes": jax.process_count(),
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.axis_sizes))),
        "parameters": case.parameters,
        "flops_per_token": case.flops_per_token,
        "flops_formula": FLOPS_FORMULA,
        "tokens_per_step": case.tokens_per_step,
        "flops_per_step": case.flops_per_step,
        "xla_flops_per_step": case.xla_flops,
        "compile_seconds": round(case.compile_seconds, 3),
        "timed_steps": len(case.times),
        "step_seconds_median": median,
        "step_seconds": [round(t, 5) for t in case.times],
        "tokens_per_second": tokens_per_second,
        "model_tflops_per_second": achieved_tflops,
        "peak_tflops_per_device": peak_per_chip,
        "peak_source": peak_source,
        "mfu": achieved_tflops / (peak_per_chip * chips) if peak_per_chip else None,
        "matmul_ceiling_tflops": ceiling,
        "matmul_ceiling_dtype": ceiling_dtype if ceiling else None,
        "fraction_of_matmul_ceiling": (statistics.median(per_round) / chips if per_round else None),
        "fraction_of_matmul_ceiling_cpu_time": statistics.median(per_round_cpu) if per_round_cpu else None,
        "cpu_seconds_median": statistics.median(case.cpu_times) if case.cpu_times else None,
        "process_cpu_share": cpu_share,  # CPU-seconds per wall-second (2.0 = both cores of a 2-core host)
        "memory": {
            "peak_device_bytes": _peak_device_memory(mesh),
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "compiled": case.memory,
        },
        "loss_first": case.losses[0] if case.losses else None,
        "loss_last": case.losses[-1] if case.losses else None,
        **environment,
    }
    if case.kind == "generate":
        record.update(generate_fields(case, bandwidth, chips, device.platform))
    return record


def generate_fields(case, bandwidth: float | None, chips: int, platform: str) -> dict[str, Any]:
    """A generate case's record fields: prefill, the train step's forward pass at the same batch, greedy
    and sampled decode, and decode's tokens/s over prefill's and the forward pass's. Each ratio is the
    median over rounds of the ratio within a round (the cases are timed back to back in every round, so
    load drifting between rounds cancels)."""
    rounds = len(case.times)  # the other lists also hold the warm-up steps: keep the timed rounds
    prefill_times, forward_times = case.prefill_times[-rounds:], case.forward_times[-rounds:]
    sampled_times = case.sampled_times[-rounds:]
    decode, prefill = statistics.median(case.times), statistics.median(prefill_times)
    forward, sampled = statistics.median(forward_times), statistics.median(sampled_times)
    bytes_per_second = case.bytes_per_decode_step * case.new_tokens / decode

    def ratio(decode_times: list[float], other_times: list[float], other_tokens: int) -> float:
        return statistics.median((case.tokens_per_step / d) / (other_tokens / o)
                                 for d, o in zip(decode_times, other_times))

    return {
        "prompt_len": case.prompt_len, "new_tokens": case.new_tokens,
        "prefill_seconds_median": prefill,
        "prefill_tokens_per_second": case.prefill_tokens / prefill,
        "forward_seq_len": case.prompt_len + case.new_tokens,
        "forward_seconds_median": forward,
        "forward_tokens_per_second": case.forward_tokens / forward,
        "decode_seconds_median": decode,
        "decode_tokens_per_second": case.tokens_per_step / decode,
        "decode_step_seconds": decode / case.new_tokens,
        "sampled_decode_seconds_median": sampled,
        "sampled_decode_tokens_per_second": case.tokens_per_step / sampled,
        # 1.0 = a decoded token costs as much as a token of prefill / of the forward pass
        "decode_vs_prefill": ratio(case.times, prefill_times, case.prefill_tokens),
        "decode_vs_forward": ratio(case.times, forward_times, case.forward_tokens),
        "sampled_decode_vs_forward": ratio(sampled_times, forward_times, case.forward_tokens),
        "decode_bytes_per_step": case.bytes_per_decode_step,
        "decode_memory_gbps": bytes_per_second / 1e9,
        "memory_bandwidth_utilization": (bytes_per_second / (bandwidth * 1e12 * chips)
                                         if bandwidth and platform != "cpu" else None),
    }


def _fmt_bytes(value: int | None) -> str:
    if not value:
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def format_table(records: list[dict]) -> str:
    """A plain-text table, one row per variant."""
    header = ["variant", "step s", "tokens/s", "TFLOP/s", "MFU", "% ceiling", "% ceiling (CPU time)", "compile s",
              "memory"]
    rows = []
    for r in records:
        memory = r["memory"]
        used = memory["peak_device_bytes"] or (
            sum(memory["compiled"].get(k, 0) for k in ("argument_bytes", "temp_bytes", "output_bytes"))
            - memory["compiled"].get("alias_bytes", 0) if memory["compiled"] else None)
        rows.append([
            r["name"], f"{r['step_seconds_median']:.4f}", f"{r['tokens_per_second']:,.0f}",
            f"{r['model_tflops_per_second']:.3f}",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
            f"{100 * r['fraction_of_matmul_ceiling']:.1f}%" if r["fraction_of_matmul_ceiling"] else "-",
            (f"{100 * r['fraction_of_matmul_ceiling_cpu_time']:.1f}%"
             if r.get("fraction_of_matmul_ceiling_cpu_time") else "-"),
            f"{r['compile_seconds']:.1f}", _fmt_bytes(used),
        ])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def describe(records: list[dict]) -> str:
    r = records[0]
    m = r["model"]
    text = (f"{r['preset'] or 'custom'} ({r['parameters'] / 1e6:.1f}M params, d{m['d_model']} x {m['num_layers']} "
            f"layers, vocab {m['vocab_size']}), stage {r['stage']}, batch {r['batch_size']} x seq {r['seq_len']}, "
            f"{m['dtype']} on {r['num_devices']} x {r['device_kind']} ({r['platform']}), mesh {r['mesh']}\n"
            f"model FLOPs/token {r['flops_per_token'] / 1e6:.1f}M = {FLOPS_FORMULA}")
    if r["platform"] == "cpu":
        text += (f"\nCPU: {r['cpu_model'] or 'unknown model'}, {r['cpu_count']} cores, ISA {r['isa']}"
                 + (f" (emulated by --xla_cpu_max_isa; hardware {r['hardware_isa']})" if r["isa_emulated"] else ""))
        if any(record.get("row_groups", 1) > 1 for record in records):
            text += "; row groups side by side on host threads: " + ", ".join(
                f"{record['name']} {record.get('row_groups', 1)}" for record in records)
    if r["matmul_ceiling_tflops"]:
        dtype = r.get("matmul_ceiling_dtype") or "float32"
        text += (f"\nmeasured matmul ceiling ({dtype} operands, median over rounds): "
                 f"{r['matmul_ceiling_tflops']:.3f} TFLOP/s per device")
        if r["fraction_of_matmul_ceiling"]:
            text += f"; the step reaches {100 * r['fraction_of_matmul_ceiling']:.1f}% of it"
    if not r["peak_source"].endswith("matmul ceiling measured in this run") and r["peak_tflops_per_device"]:
        text += f"; MFU peak {r['peak_tflops_per_device']} TFLOP/s per device ({r['peak_source']})"
    if r["stage"] == "generate":
        text += (f"\ngenerate: prompt {r['prompt_len']}, {r['new_tokens']} new tokens, prefill "
                 f"{r['prefill_tokens_per_second']:,.0f} tokens/s, train-step forward [{r['batch_size']}, "
                 f"{r['forward_seq_len']}] {r['forward_tokens_per_second']:,.0f} tokens/s, decode "
                 f"{r['decode_tokens_per_second']:,.0f} tokens/s greedy ({1e3 * r['decode_step_seconds']:.2f} ms "
                 f"a step), {r['sampled_decode_tokens_per_second']:,.0f} sampled, "
                 f"{r['decode_memory_gbps']:.1f} GB/s of weights+cache"
                 f"\ndecode tokens/s per prefill token/s x{r['decode_vs_prefill']:.2f}, per forward token/s "
                 f"x{r['decode_vs_forward']:.2f} (sampled x{r['sampled_decode_vs_forward']:.2f}); medians of "
                 "per-round ratios, 1.00 = a decoded token costs a token of the forward pass")
    return text


def append_history(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
