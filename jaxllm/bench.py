"""`jaxllm bench`: how fast a stage's step runs, and how close it comes to the hardware's limit.

    jaxllm bench --preset 25m --stage pretrain --json out.json
    jaxllm bench --preset 1b --stage pretrain --batch-size 8 model.dtype=bfloat16
    jaxllm bench --preset 25m --variant xla:model.attention=xla --variant fused:model.loss_chunk_size=128
    jaxllm bench --preset 25m --levers          # the CPU speed levers, A/B, as a table

What is timed: the jitted step `jaxllm train` runs (`steps.build_train_step`, the same shardings and
donation) on a fixed synthetic batch; `generate` times a KV-cache prefill and a greedy decode loop.
Compile time (lower + compile, ahead of time) is reported apart; step time is the median of
`--steps` timed steps after `--warmup` steps. Several `--variant`s run in one process, interleaved
step by step (A, B, A, B, ...), so noise from other processes hits all of them alike.

Model FLOPs per token (training) = 6 * P + 12 * L * T * N * H, where P counts the matmul parameters
(blocks + output head, not the embedding lookup) and the attention term counts the full T x T
scores (PaLM/nanoGPT convention), whatever a kernel skips. MFU = achieved model FLOP/s / peak
FLOP/s of the devices (a datasheet table, `--peak-tflops` overrides). On CPU the peak is a float32
matmul ceiling measured in the same run, interleaved with the steps: `fraction_of_matmul_ceiling`.

Every result is appended to a JSONL history (`--history`, default ./bench_history.jsonl) with the
git commit, versions and environment, so regressions show up.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform as platform_lib
import re
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from jaxllm.errors import UsageError
from jaxllm.hardware import PEAKS, device_peak  # noqa: F401  (re-exported: jaxllm.bench.device_peak)

FLOPS_FORMULA = ("training: 6*P + 12*L*T*N*H per token (P = matmul params incl. output head, attention counted "
                 "as full TxT); forward only (reference, prefill, decode): a third of that")

STAGES = ("pretrain", "sft", "dpo", "generate")


class BenchError(UsageError):
    """Bad benchmark arguments; the message says what to change (a usage error, exit code 2)."""


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to benchmark: a preset's `stage` step (or "generate") at a batch and mesh, timed over `steps`
    after `warmup`; `variants` ("NAME:key=value ...") run interleaved in one process; `overrides` apply to
    every variant. `ceiling`: interleave a float32 matmul ceiling; `profile`: a trace directory."""
    preset: str = "25m"
    stage: str = "pretrain"
    batch_size: int = 8
    seq_len: int = 0  # 0: the preset's context length
    mesh: str = ""  # data=N,fsdp=N,tensor=N (default: data over all devices)
    steps: int = 5
    warmup: int = 2
    variants: tuple[str, ...] = ()
    donate: bool = True
    prompt_len: int = 128
    new_tokens: int = 128
    peak_tflops: float | None = None
    ceiling: bool = True
    profile: str = ""
    overrides: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BenchSettings":
        """The inverse of dataclasses.asdict after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ----------------------------------------------------------------------------------------------
# Building the cases.


def _overrides_for(settings: BenchSettings, extra: list[str]) -> list[str]:
    kind = settings.stage  # a stage's train step, or "generate" (prefill + decode of a pretrained-shape model)
    stage = "pretrain" if kind == "generate" else kind
    base = [f"model.preset={settings.preset}", f"train.stage={stage}", f"train.batch_size={settings.batch_size}",
            "train.steps=1000", "train.progress=false"]
    from jaxllm.config import MODEL_PRESETS  # synthetic tokens: the preset's nominal vocabulary, not a tokenizer's

    if "vocab_size" in MODEL_PRESETS.get(settings.preset, {}):
        base += [f"model.vocab_size={MODEL_PRESETS[settings.preset]['vocab_size']}"]
    if settings.seq_len:
        base += [f"data.seq_len={settings.seq_len}"]
    mesh = parse_mesh(settings.mesh)
    base += [f"mesh.{k}={v}" for k, v in mesh.items()]
    return base + list(extra)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' or '2,4,1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (unnamed axes default to data=-1)."""
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    if not text:
        return sizes
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if all("=" not in p for p in parts):
        if len(parts) != 3:
            raise BenchError(f"--mesh '{text}': give three sizes data,fsdp,tensor (e.g. 1,8,1) or name them "
                             "(e.g. data=2,fsdp=4)")
        return dict(zip(("data", "fsdp", "tensor"), (int(p) for p in parts)))
    given = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in sizes:
            raise BenchError(f"--mesh: unknown axis '{key}'; the axes are data, fsdp and tensor")
        given[key] = int(value)
    if -1 in given.values():  # "the rest of the devices" is named: the unnamed axes are 1
        sizes["data"] = 1
    return {**sizes, **given}


def bench_config(settings: BenchSettings, extra: list[str]):
    """The resolved Config of one variant: the settings' preset, stage, batch and mesh plus `extra` overrides."""
    from jaxllm.config import load_config

    overrides = _overrides_for(settings, extra)
    if not settings.seq_len:  # default: the model's context length, known once the preset has resolved
        resolved = load_config(None, overrides + ["data.seq_len=1"])
        overrides = overrides + [f"data.seq_len={resolved.model.max_seq_len}"]
    return load_config(None, overrides)


def synthetic_batch(config, batch_size: int, seed: int = 0, process_index: int = 0,
                    process_count: int = 1) -> dict:
    """A global batch of the stage's shapes (two packed documents per row), this process's rows only."""
    import numpy as np

    from jaxllm.aot import batch_spec

    rng = np.random.default_rng(seed)
    spec = batch_spec(config, batch_size)
    length = config.data.seq_len
    split = max(1, length * 3 // 5)
    segment_ids = np.where(np.arange(length) < split, 1, 2)[None].repeat(batch_size, 0).astype(np.int32)
    positions = np.where(np.arange(length) < split, np.arange(length), np.arange(length) - split)
    positions = positions[None].repeat(batch_size, 0).astype(np.int32)
    from jaxllm import stages

    if stages.get(config.train.stage).data_format == "chat":  # the answer is the second half of each document
        doc_length = np.where(segment_ids == 1, split, length - split)
        loss_mask = (positions >= doc_length // 2).astype(np.float32)
    else:
        loss_mask = (positions > 0).astype(np.float32)
    batch = {}
    for key in spec:
        field = key.replace("chosen_", "").replace("rejected_", "")
        if field == "tokens":
            batch[key] = rng.integers(4, config.model.vocab_size, (batch_size, length)).astype(np.int32)
        elif field == "positions":
            batch[key] = positions
        elif field == "segment_ids":
            batch[key] = segment_ids
        elif field == "loss_mask":
            batch[key] = loss_mask if not key.startswith(("chosen_", "rejected_")) else \
                (positions >= split // 2).astype(np.float32)
        elif field == "label":
            batch[key] = np.where(np.arange(batch_size) % 2 == 0, 1.0, -1.0).astype(np.float32)
    rows = batch_size // process_count
    return {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}


def _block(tree) -> None:
    import jax

    jax.block_until_ready(tree)


class TrainCase:
    """One stage's compiled train step on a fixed batch; `run_once()` times one step."""

    def __init__(self, name: str, config, mesh, donate: bool = True, seed: int = 0):
        import jax
        import numpy as np

        from jaxllm import model as model_lib
        from jaxllm import sharding as sharding_lib
        from jaxllm import state as state_lib
        from jaxllm import step_builder

        self.name, self.config, self.mesh, self.donate = name, config, mesh, donate
        self.kind = "train"
        built = step_builder.build(config, mesh)  # the step `jaxllm train` compiles: same layouts, heads, LoRA
        abstract_params, optimizer, shardings = built.abstract_params, built.optimizer, built.state_shardings
        needs_reference = built.reference_abstract is not None
        with jax.set_mesh(mesh):
            def init():
                params = model_lib.init_model(config.model, seed)[1]
                reference = params
                if built.base_abstract is not None:  # LoRA: the adapters train on the initialised model as base
                    from jaxllm import lora as lora_lib

                    reference, params = lora_lib.split(params)
                if built.heads:
                    params = {**params, model_lib.HEADS_KEY: state_lib.init_heads(config.model, built.heads, seed)}
                return state_lib.create_state(params, optimizer, seed), reference if needs_reference else None

            self.state, reference = jax.jit(init, out_shardings=(shardings, built.reference_shardings
                                                                 if needs_reference else None))()
            self.reference = reference if needs_reference else None
            host = synthetic_batch(config, config.train.batch_size, seed, jax.process_index(), jax.process_count())
            self.batch = sharding_lib.place_batch(host, mesh)
        self.limit = np.float32(np.inf)
        jitted = built.jit_train_step(donate)
        began = time.perf_counter()
        with jax.set_mesh(mesh):
            lowered = jitted.lower(self.state, self.batch, self.reference, self.limit)
            self.lower_seconds = time.perf_counter() - began
            self.compiled = lowered.compile()
        self.compile_seconds = time.perf_counter() - began
        self.memory = _memory_analysis(self.compiled)
        self.xla_flops = _xla_flops(self.compiled)
        rows = config.train.batch_size * (2 if built.stage.data_format == "pairs" else 1)
        self.tokens_per_step = rows * config.data.seq_len
        train_flops = model_lib.flops_per_token(config.model, config.data.seq_len)
        self.flops_per_token = train_flops
        self.flops_per_step = self.tokens_per_step * train_flops * (4 / 3 if needs_reference else 1.0)
        self.parameters = model_lib.count_params(abstract_params)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []

    def run_once(self) -> float:
        import jax

        began, cpu_began = time.perf_counter(), time.process_time()
        with jax.set_mesh(self.mesh):
            self.state, metrics = self.compiled(self.state, self.batch, self.reference, self.limit)
        _block((self.state, metrics))
        elapsed = time.perf_counter() - began
        self.last_cpu_seconds = time.process_time() - cpu_began
        self.losses.append(float(metrics["loss"]))
        return elapsed


class GenerateCase:
    """KV-cache generation: prefill `prompt_len` tokens, then greedily decode `new_tokens` in one
    compiled loop. `run_once()` times the decode loop (the prefill is timed beside it)."""

    def __init__(self, name: str, config, mesh, prompt_len: int, new_tokens: int, seed: int = 0):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from jaxllm import model as model_lib
        from jaxllm import sharding as sharding_lib
        from jaxllm import state as state_lib

        self.name, self.config, self.mesh, self.donate = name, config, mesh, False
        self.kind = "generate"
        batch = config.train.batch_size
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        max_length = prompt_len + new_tokens
        if max_length > config.model.max_seq_len:
            raise BenchError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the model's context "
                             f"of {config.model.max_seq_len}; use shorter ones")
        graphdef, abstract_params = model_lib.abstract_model(config.model)
        axes = model_lib.logical_axes(config.model)
        param_shardings = sharding_lib.tree_shardings(abstract_params, axes, mesh)
        compute_dtype = jnp.dtype(config.model.dtype)

        def init_for_serving():  # weights cast to the compute dtype once, as a server holds them
            params = model_lib.init_model(config.model, seed)[1]
            return jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                                else x, params)

        with jax.set_mesh(mesh):
            self.params = jax.jit(init_for_serving, out_shardings=param_shardings)()
        rng = np.random.default_rng(seed)
        prompt = jnp.asarray(rng.integers(4, config.model.vocab_size, (batch, prompt_len)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
        segments = jnp.ones((batch, prompt_len), jnp.int32)

        def prefill(params):
            cache = model_lib.init_cache(config.model, batch, max_length)
            logits, cache = model_lib.apply_with_cache(graphdef, params, prompt, positions, segments, cache)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        def decode(params, token, cache):
            def body(carry, _):
                token, cache = carry
                position = jnp.broadcast_to(cache["index"], (batch, 1)).astype(jnp.int32)
                logits, cache = model_lib.apply_with_cache(graphdef, params, token[:, None], position,
                                                           jnp.ones((batch, 1), jnp.int32), cache)
                token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
                return (token, cache), token

            (_, cache), tokens = jax.lax.scan(body, (token, cache), None, length=new_tokens)
            return tokens.T

        began = time.perf_counter()
        with jax.set_mesh(mesh):
            self.prefill = jax.jit(prefill).lower(self.params).compile()
            token, cache = self.prefill(self.params)
            self.decode = jax.jit(decode).lower(self.params, token, cache).compile()
        self.compile_seconds = time.perf_counter() - began
        self.memory = _memory_analysis(self.decode)
        self.xla_flops = _xla_flops(self.decode)
        self.parameters = model_lib.count_params(abstract_params)
        self.tokens_per_step = batch * new_tokens
        mean_context = prompt_len + (new_tokens + 1) / 2
        self.flops_per_token = model_lib.flops_per_token(config.model, int(mean_context)) / 3
        self.flops_per_step = self.tokens_per_step * self.flops_per_token
        itemsize = jnp.dtype(config.model.dtype).itemsize
        param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
        m = config.model
        kv_bytes = 2 * m.num_layers * batch * max_length * m.num_kv_heads * m.resolved_head_dim * itemsize
        self.bytes_per_decode_step = param_bytes + kv_bytes  # weights + the whole cache, read once per token
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.prefill_times: list[float] = []
        self.losses: list[float] = []
        self.prefill_tokens = batch * prompt_len

    def run_once(self) -> float:
        import jax

        with jax.set_mesh(self.mesh):
            began = time.perf_counter()
            token, cache = self.prefill(self.params)
            _block((token, cache))
            middle, cpu_middle = time.perf_counter(), time.process_time()
            tokens = self.decode(self.params, token, cache)
            _block(tokens)
            ended = time.perf_counter()
        self.last_cpu_seconds = time.process_time() - cpu_middle
        self.prefill_times.append(middle - began)
        return ended - middle


class MatmulProbe:
    """A square matmul timed around every round of steps: the ceiling the steps are compared with.
    `calibrate` sizes it to a share of the round, `measure` runs half before and half after the
    steps, and `close_round` turns the round's samples into one ceiling (median matmul time)."""

    def __init__(self, platform: str):
        import jax
        import jax.numpy as jnp

        self.n, self.dtype = (2048, "float32") if platform == "cpu" else (8192, "bfloat16")
        self.repeats = 2 if platform == "cpu" else 5  # per half-round until calibrated
        keys = jax.random.split(jax.random.key(0), 2)
        self.a = jax.random.normal(keys[0], (self.n, self.n), self.dtype)
        self.b = jax.random.normal(keys[1], (self.n, self.n), self.dtype)
        self.fn = jax.jit(lambda a, b: a @ b)
        _block(self.fn(self.a, self.b))
        self.round_times: list[float] = []
        self.round_cpu_times: list[float] = []
        self.samples: list[float] = []  # TFLOP/s, one per round
        self.cpu_samples: list[float] = []  # TFLOP per CPU-second of this process, one per round

    def calibrate(self, round_seconds: float, share: float = 0.1) -> None:
        began = time.perf_counter()
        _block(self.fn(self.a, self.b))
        one = max(time.perf_counter() - began, 1e-6)
        self.repeats = int(min(100, max(self.repeats, share * round_seconds / one / 2)))

    def measure(self) -> None:
        for _ in range(self.repeats):
            began, cpu_began = time.perf_counter(), time.process_time()
            _block(self.fn(self.a, self.b))
            self.round_times.append(time.perf_counter() - began)
            self.round_cpu_times.append(time.process_time() - cpu_began)

    def close_round(self) -> float:
        flops = 2 * self.n**3
        tflops = flops / statistics.median(self.round_times) / 1e12
        self.samples.append(tflops)
        self.cpu_samples.append(flops / max(statistics.median(self.round_cpu_times), 1e-9) / 1e12)
        self.round_times, self.round_cpu_times = [], []
        return tflops


def _memory_analysis(compiled) -> dict[str, int]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if stats is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    return {f.replace("_size_in_bytes", "_bytes"): int(getattr(stats, f, 0) or 0) for f in fields}


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


# ----------------------------------------------------------------------------------------------
# Running and reporting.


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


def _environment() -> dict[str, Any]:
    import jax
    import jaxlib

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
    from jaxllm import cpu_levers

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
    import jax

    return jax.process_index()


def summarize_case(case, ceilings: list[float], peak_tflops_override: float | None, environment: dict,
                   overrides: list[str], cpu_ceilings: list[float] | None = None) -> dict[str, Any]:
    import jax

    from jaxllm import model as model_lib

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
        peak_per_chip, peak_source = ceiling, "float32 matmul ceiling measured in this run"
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
        prefill = statistics.median(case.prefill_times)
        bytes_per_second = case.bytes_per_decode_step * case.new_tokens / median
        record.update({
            "prompt_len": case.prompt_len, "new_tokens": case.new_tokens,
            "prefill_seconds_median": prefill,
            "prefill_tokens_per_second": case.prefill_tokens / prefill,
            "decode_seconds_median": median,
            "decode_tokens_per_second": tokens_per_second,
            "decode_bytes_per_step": case.bytes_per_decode_step,
            "decode_memory_gbps": bytes_per_second / 1e9,
            "memory_bandwidth_utilization": (bytes_per_second / (bandwidth * 1e12 * chips)
                                             if bandwidth and device.platform != "cpu" else None),
        })
    return record


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
    if r["matmul_ceiling_tflops"]:
        text += f"\nmeasured matmul ceiling (median over rounds): {r['matmul_ceiling_tflops']:.3f} TFLOP/s per device"
        if r["fraction_of_matmul_ceiling"]:
            text += f"; the step reaches {100 * r['fraction_of_matmul_ceiling']:.1f}% of it"
    if r["peak_source"] != "float32 matmul ceiling measured in this run" and r["peak_tflops_per_device"]:
        text += f"; MFU peak {r['peak_tflops_per_device']} TFLOP/s per device ({r['peak_source']})"
    if r["stage"] == "generate":
        text += (f"\ngenerate: prompt {r['prompt_len']}, {r['new_tokens']} new tokens, prefill "
                 f"{r['prefill_tokens_per_second']:,.0f} tokens/s, decode {r['decode_tokens_per_second']:,.0f} "
                 f"tokens/s, {r['decode_memory_gbps']:.1f} GB/s of weights+cache")
    return text


def append_history(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Profiles: a device-time breakdown of a jax.profiler trace.

_KERNEL_CLASSES = [
    ("attention", r"fmha|flash|sdpa|cudnn|attention|splash"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|sm90_|sm80_|dot|convolution|matmul|wgmma|ynn|onednn|xnn"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all_reduce|all_gather|collective"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("fusion/elementwise", r"fusion|loop_|input_|reduce|scatter|gather|select|convert|add|multiply"),
]


def summarize_trace(trace_dir: str | Path, top: int = 12) -> dict[str, Any]:
    """Device time by kernel class and the top kernels, from the perfetto trace that
    `jax.profiler.start_trace(..., create_perfetto_trace=True)` writes under `trace_dir`."""
    import gzip

    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        return {}
    with gzip.open(files[-1], "rt") as handle:
        trace = json.load(handle)
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    process_names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process_names.items() if re.search(r"/device:(GPU|TPU)", name)}
    by_class: dict[str, float] = {}
    by_kernel: dict[str, float] = {}
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        if device_pids and event.get("pid") not in device_pids:
            continue
        name = str(event.get("name", ""))
        if not device_pids and (name.startswith(("$", "Thunk", "Pjit", "while", "conditional", "call"))
                                or "::" in name):
            continue  # host trace (CPU): keep the XLA ops, not Python frames or containers of other ops
        duration = float(event["dur"]) / 1e6
        kind = next((k for k, pattern in _KERNEL_CLASSES if re.search(pattern, name, re.IGNORECASE)), "other")
        by_class[kind] = by_class.get(kind, 0.0) + duration
        by_kernel[name] = by_kernel.get(name, 0.0) + duration
    total = sum(by_class.values()) or 1.0
    return {
        "trace_file": str(files[-1]),
        "device_events_only": bool(device_pids),
        "seconds_by_class": {k: round(v, 6) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "share_by_class": {k: round(v / total, 4) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top_kernels": [(k[:120], round(v, 6)) for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]],
    }


def format_profile(summary: dict[str, Any]) -> str:
    if not summary:
        return "profile: no trace found"
    lines = [f"profile ({'device kernels' if summary['device_events_only'] else 'all events'}, "
             f"{summary['trace_file']}):"]
    for kind, seconds in summary["seconds_by_class"].items():
        lines.append(f"  {kind:<20} {seconds:9.4f}s  {100 * summary['share_by_class'][kind]:5.1f}%")
    lines.append("  top kernels:")
    lines += [f"    {seconds:9.4f}s  {name}" for name, seconds in summary["top_kernels"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command.


def parse_variant(text: str) -> tuple[str, list[str], bool]:
    """'name:key=value key=value' -> (name, overrides, donate); 'donate=false' is the bench's own switch."""
    name, _, rest = text.partition(":")
    if not name or "=" in name:
        raise BenchError(f"--variant '{text}' must look like NAME:key=value [key=value ...]")
    overrides, donate = [], True
    for item in rest.replace(",", " ").split():
        if item.split("=")[0] == "donate":
            donate = item.split("=", 1)[1].lower() in ("1", "true", "yes")
        else:
            overrides.append(item)
    return name, overrides, donate


def run_bench(settings: BenchSettings, log=print) -> list[dict]:
    """Compiles and times every variant interleaved; one record (JSON-ready) per variant."""
    import jax

    from jaxllm import sharding as sharding_lib

    kind = settings.stage  # a stage's train step, or "generate"
    if settings.steps < 1 or settings.warmup < 0 or settings.batch_size < 1:
        raise BenchError("--steps and --batch-size must be at least 1 and --warmup at least 0")
    variants = [parse_variant(v) for v in settings.variants] or [("default", [], settings.donate)]
    configs = [(name, bench_config(settings, list(settings.overrides) + extra), donate, extra) for name, extra, donate in variants]
    sharding_lib.maybe_initialize_distributed(configs[0][1].mesh)
    mesh = sharding_lib.make_mesh(configs[0][1].mesh)
    parallel = sharding_lib.data_parallel_size(mesh)
    if settings.batch_size % parallel:
        raise BenchError(f"--batch-size {settings.batch_size} must be divisible by the data-parallel size "
                         f"(mesh data x fsdp = {parallel}); change the batch or the mesh")
    cases = []
    for name, config, donate, extra in configs:
        log(f"compiling {name} ...")
        if kind == "generate":
            case = GenerateCase(name, config, mesh, settings.prompt_len, settings.new_tokens)
        else:
            case = TrainCase(name, config, mesh, donate=donate and settings.donate)
        case.overrides = list(settings.overrides) + extra
        log(f"  compiled in {case.compile_seconds:.1f}s")
        cases.append(case)
    platform = mesh.devices.flat[0].platform
    probe = MatmulProbe(platform) if settings.ceiling else None
    ceilings = run_interleaved(cases, settings.warmup, settings.steps, probe, log=log)
    environment = _environment()
    cpu_ceilings = probe.cpu_samples if probe is not None else []
    records = [summarize_case(case, ceilings, settings.peak_tflops, environment, case.overrides, cpu_ceilings)
               for case in cases]
    if settings.profile:  # a few more steps under the profiler, apart from the timed ones
        jax.profiler.start_trace(settings.profile, create_perfetto_trace=True)
        try:
            for case in cases:
                for _ in range(2):
                    case.run_once()
        finally:
            jax.profiler.stop_trace()
        records[0]["profile"] = summarize_trace(settings.profile)
    return records
