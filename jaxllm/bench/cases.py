"""What `jaxllm bench` times: its settings, the config and synthetic batch of a case, the train step
(built by jaxllm.step_builder, as `jaxllm train` builds it), KV-cache generation, and the CPU matmul
ceiling probe."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import generate as generate_lib
from jaxllm import lora as lora_lib
from jaxllm import model as model_lib
from jaxllm import row_groups as row_groups_lib
from jaxllm import sharding as sharding_lib
from jaxllm import stages
from jaxllm import state as state_lib
from jaxllm import step_builder
from jaxllm.aot import batch_spec
from jaxllm.config import MODEL_PRESETS, load_config
from jaxllm.errors import UsageError

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

    # synthetic tokens: the preset's nominal vocabulary, not a tokenizer's
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
    overrides = _overrides_for(settings, extra)
    if not settings.seq_len:  # default: the model's context length, known once the preset has resolved
        resolved = load_config(None, overrides + ["data.seq_len=1"])
        overrides = overrides + [f"data.seq_len={resolved.model.max_seq_len}"]
    return load_config(None, overrides)


def synthetic_batch(config, batch_size: int, seed: int = 0, process_index: int = 0,
                    process_count: int = 1) -> dict:
    """A global batch of the stage's shapes (two packed documents per row), this process's rows only."""
    rng = np.random.default_rng(seed)
    spec = batch_spec(config, batch_size)
    length = config.data.seq_len
    split = max(1, length * 3 // 5)
    segment_ids = np.where(np.arange(length) < split, 1, 2)[None].repeat(batch_size, 0).astype(np.int32)
    positions = np.where(np.arange(length) < split, np.arange(length), np.arange(length) - split)
    positions = positions[None].repeat(batch_size, 0).astype(np.int32)

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
    jax.block_until_ready(tree)


class TrainCase:
    """One stage's compiled train step on a fixed batch; `run_once()` times one step."""

    def __init__(self, name: str, config, mesh, donate: bool = True, seed: int = 0):
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
        self.groups = built.row_groups  # > 1: a step_builder.RowGroupedStep (one gradient program per row group)
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
        began, cpu_began = time.perf_counter(), time.process_time()
        with jax.set_mesh(self.mesh):
            self.state, metrics = self.compiled(self.state, self.batch, self.reference, self.limit)
        _block((self.state, metrics))
        elapsed = time.perf_counter() - began
        self.last_cpu_seconds = time.process_time() - cpu_began
        self.losses.append(float(metrics["loss"]))
        return elapsed


class GenerateCase:
    """KV-cache generation as `jaxllm.generate` runs it: prefill `prompt_len` tokens, then decode
    `new_tokens` in its one compiled `while_loop` (no stop token, so every step runs), greedily and
    sampled at temperature 1 (the rl rollouts' setting), in `generate`'s row groups side by side (one host
    thread each; `generate_lib.host_row_groups`). Every round also times the forward pass of
    the train step at the same batch ([batch, prompt_len + new_tokens], the rollout rows the update
    scores; in the train step's row groups, `step_builder.train_row_groups`), so that decode is compared
    with prefill and with that forward pass within each round.
    `run_once()` returns the greedy decode time; the others are kept beside it."""

    def __init__(self, name: str, config, mesh, prompt_len: int, new_tokens: int, seed: int = 0):
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
        tokens = rng.integers(4, config.model.vocab_size, (batch, max_length)).astype(np.int32)
        self.groups = generate_lib.host_row_groups(batch, mesh)
        group_rows = batch // self.groups
        self.prompts = [jnp.asarray(tokens[g * group_rows:(g + 1) * group_rows, :prompt_len])
                        for g in range(self.groups)]
        self.row_offsets = [np.int32(g * group_rows) for g in range(self.groups)]
        segments = jnp.ones((group_rows, prompt_len), jnp.int32)
        self.forward_groups = step_builder.train_row_groups(  # as the train step splits the batch
            config, mesh, stages.get(config.train.stage), model_lib.param_bytes(abstract_params))
        forward_rows = batch // self.forward_groups
        self.forward_inputs = [jnp.asarray(tokens[g * forward_rows:(g + 1) * forward_rows])
                               for g in range(self.forward_groups)]
        positions = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (forward_rows, max_length))
        key = jax.random.key(seed)
        vocab = config.model.vocab_size
        self.greedy = generate_lib.SamplingSettings(new_tokens, temperature=0.0, stop_ids=()).arrays(vocab)
        self.sampled = generate_lib.SamplingSettings(new_tokens, temperature=1.0, stop_ids=()).arrays(vocab)

        def prefill(params, prompt):
            return generate_lib.prefill(graphdef, params, prompt, segments, key, model_config=config.model,
                                        max_new_tokens=new_tokens)

        def decode(params, sampling, state, row_offset):  # the whole state out: the donated cache updates in place
            return generate_lib.decode_loop(graphdef, params, sampling, state, max_new_tokens=new_tokens,
                                            row_offset=row_offset, total_rows=batch)

        def forward(params, rows):
            return model_lib.apply(graphdef, params, rows, positions, jnp.ones_like(rows))

        began = time.perf_counter()
        with jax.set_mesh(mesh):
            self.prefill = jax.jit(prefill).lower(self.params, self.prompts[0]).compile()
            state = self.prefill(self.params, self.prompts[0])
            self.decode = jax.jit(decode, donate_argnums=2).lower(self.params, self.greedy, state,
                                                                  self.row_offsets[0]).compile()
            self.forward = jax.jit(forward).lower(self.params, self.forward_inputs[0]).compile()
        self.compile_seconds = time.perf_counter() - began
        self.memory = _memory_analysis(self.decode)
        self.xla_flops = _xla_flops(self.decode)
        self.parameters = model_lib.count_params(abstract_params)
        self.tokens_per_step = batch * new_tokens
        mean_context = prompt_len + (new_tokens + 1) / 2
        self.flops_per_token = model_lib.flops_per_token(config.model, int(mean_context)) / 3
        self.flops_per_step = self.tokens_per_step * self.flops_per_token
        itemsize = jnp.dtype(config.model.dtype).itemsize
        param_bytes = model_lib.param_bytes(self.params)
        m = config.model
        kv_bytes = 2 * m.num_layers * batch * max_length * m.num_kv_heads * m.resolved_head_dim * itemsize
        self.bytes_per_decode_step = param_bytes + kv_bytes  # weights + the whole cache, read once per token
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.prefill_times: list[float] = []
        self.sampled_times: list[float] = []
        self.forward_times: list[float] = []
        self.losses: list[float] = []
        self.prefill_tokens = batch * prompt_len
        self.forward_tokens = batch * max_length

    def _timed(self, fn, *args) -> float:
        began = time.perf_counter()
        _block(fn(*args))
        return time.perf_counter() - began

    def _prefilled(self) -> list:
        return row_groups_lib.map_row_groups(lambda g: self.prefill(self.params, self.prompts[g]), self.groups,
                                           self.mesh)

    def _grouped(self, call, groups: int | None = None) -> float:
        """Seconds for call(group) on every row group, side by side as `generate` (or, with `groups`, the train
        step) runs them."""
        began = time.perf_counter()
        row_groups_lib.map_row_groups(lambda g: _block(call(g)), groups or self.groups, self.mesh)
        return time.perf_counter() - began

    def run_once(self) -> float:
        self.prefill_times.append(self._grouped(lambda g: self.prefill(self.params, self.prompts[g])))
        self.forward_times.append(self._grouped(lambda g: self.forward(self.params, self.forward_inputs[g]),
                                                self.forward_groups))
        states = self._prefilled()
        _block(states)
        self.sampled_times.append(self._grouped(
            lambda g: self.decode(self.params, self.sampled, states[g], self.row_offsets[g])))
        states = self._prefilled()
        _block(states)
        cpu_began = time.process_time()
        elapsed = self._grouped(lambda g: self.decode(self.params, self.greedy, states[g], self.row_offsets[g]))
        self.last_cpu_seconds = time.process_time() - cpu_began
        return elapsed


class MatmulProbe:
    """A square matmul timed around every round of steps: the ceiling the steps are compared with.
    `calibrate` sizes it to a share of the round, `measure` runs half before and half after the
    steps, and `close_round` turns the round's samples into one ceiling (median matmul time)."""

    def __init__(self, platform: str, compute_dtypes: tuple[str, ...] = ()):
        """CPU: a float32 2048^3 matmul, or bf16 operands with a float32 result (what a bf16 model's matmuls ask
        for; AMX CPUs run these several times faster) when every case computes in bf16 (`compute_dtypes`).
        Accelerators: bf16 8192^3."""
        if platform == "cpu":
            all_bf16 = bool(compute_dtypes) and set(compute_dtypes) == {"bfloat16"}
            self.n, self.dtype = 2048, "bfloat16" if all_bf16 else "float32"
        else:
            self.n, self.dtype = 8192, "bfloat16"
        self.repeats = 2 if platform == "cpu" else 5  # per half-round until calibrated
        keys = jax.random.split(jax.random.key(0), 2)
        self.a = jax.random.normal(keys[0], (self.n, self.n), self.dtype)
        self.b = jax.random.normal(keys[1], (self.n, self.n), self.dtype)
        result = jnp.float32 if platform == "cpu" else None
        self.fn = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=result))
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
