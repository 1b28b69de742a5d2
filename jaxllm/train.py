"""The one training loop every stage uses.

`train(config, workdir)` builds the mesh, the state (fresh, from `train.init_from`, or resumed from
the workdir's own checkpoint), the data iterator for the stage, and runs the stage's jitted step
with periodic logging, evaluation and async checkpoints. SIGTERM/SIGINT save and stop cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import checkpoint as ckpt
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import state as state_lib
from jaxllm import steps as steps_lib
from jaxllm.config import Config, ConfigError, config_json, save_config, to_dict


class TrainingHalted(RuntimeError):
    """Too many updates in a row were skipped (non-finite or spiking loss)."""


@dataclasses.dataclass
class RunContext:
    """Everything a stage's loop needs, built once by `setup`."""

    config: Config
    workdir: Path
    mesh: jax.sharding.Mesh
    graphdef: Any
    optimizer: Any
    state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    reference_params: Any
    manager: Any
    tokenizer: Any
    data_state: dict | None
    resumed_from: int | None

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0


def _abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def check_batch_fits_mesh(config: Config, mesh: jax.sharding.Mesh) -> None:
    parallel = sharding_lib.data_parallel_size(mesh)
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % parallel or config.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={config.train.batch_size} (micro-batches of {micro}) must be divisible "
                          f"by the data-parallel size mesh.data x mesh.fsdp = {parallel} and by the "
                          f"{jax.process_count()} processes; change the batch size or the mesh")


def load_tokenizer(config: Config):
    from jaxllm.data.tokenizer import Tokenizer, check_vocab

    tokenizer = Tokenizer.load(config.data.tokenizer)
    check_vocab(tokenizer, config.model.vocab_size)
    return tokenizer


def setup(config: Config, workdir: str | Path, mesh: jax.sharding.Mesh | None = None, tokenizer=None,
          log: Callable[[str], None] = print) -> RunContext:
    sharding_lib.maybe_initialize_distributed(config.mesh)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or sharding_lib.make_mesh(config.mesh)
    check_batch_fits_mesh(config, mesh)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
    if jax.process_index() == 0:
        save_config(config, workdir / "config.yaml")

    graphdef, abstract_params = model_lib.abstract_model(config.model)
    heads = state_lib.head_names(config)
    if heads:
        abstract_params[model_lib.HEADS_KEY] = jax.eval_shape(lambda: state_lib.init_heads(config.model, heads, 0))
    optimizer = state_lib.make_optimizer(config.optimizer, config.train.steps)
    abstract_state = jax.eval_shape(lambda p: state_lib.create_state(p, optimizer, config.train.seed), abstract_params)
    shardings = state_lib.state_shardings(config, abstract_state, mesh)

    manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints,
                                async_save=config.train.async_checkpointing)
    resume_step = manager.latest_step()
    data_state = None
    reference_params = None
    with jax.set_mesh(mesh):
        if resume_step is not None:
            state, data_state, _ = ckpt.restore(manager, resume_step,
                                                _abstract_with_shardings(abstract_state, shardings))
            log(f"resumed {workdir} at step {resume_step}")
        else:
            params = _initial_params(config, graphdef, abstract_params, shardings.params, log)
            state = jax.jit(lambda p: state_lib.create_state(p, optimizer, config.train.seed),
                            out_shardings=shardings)(params)
        if steps_lib.needs_reference(config.train.stage):
            reference_params = _reference_params(config, state, abstract_params, shardings.params, resume_step, log)
    return RunContext(config, workdir, mesh, graphdef, optimizer, state, shardings, reference_params, manager,
                      tokenizer, data_state, resume_step)


def _initial_params(config: Config, graphdef, abstract_params, param_shardings, log) -> Any:
    heads = state_lib.head_names(config)
    model_abstract = {k: v for k, v in abstract_params.items() if k != model_lib.HEADS_KEY}
    model_shardings = {k: v for k, v in param_shardings.items() if k != model_lib.HEADS_KEY}
    if config.train.init_from:
        params = ckpt.load_params(config.train.init_from, _abstract_with_shardings(model_abstract, model_shardings))
        log(f"initialised params from {config.train.init_from} (fresh optimizer)")
    else:
        params = jax.jit(lambda: model_lib.init_model(config.model, config.train.seed)[1],
                         out_shardings=model_shardings)()
    if heads:
        params[model_lib.HEADS_KEY] = jax.jit(lambda: state_lib.init_heads(config.model, heads, config.train.seed),
                                              out_shardings=param_shardings[model_lib.HEADS_KEY])()
    return params


def _reference_params(config: Config, state, abstract_params, param_shardings, resume_step, log):
    """The frozen reference: the init_from params (reloaded on resume), else the initial params."""
    model_abstract = {k: v for k, v in abstract_params.items() if k != model_lib.HEADS_KEY}
    model_shardings = {k: v for k, v in param_shardings.items() if k != model_lib.HEADS_KEY}
    if config.train.init_from:
        return ckpt.load_params(config.train.init_from, _abstract_with_shardings(model_abstract, model_shardings))
    if resume_step is not None:
        log("warning: no init_from; the reference is the resumed params, not the original initialisation")
    return jax.tree.map(jnp.copy, {k: v for k, v in state.params.items() if k != model_lib.HEADS_KEY})


# ----------------------------------------------------------------------------------------------
# Logging.


class MetricsLog:
    """metrics.jsonl (every logged step) + TensorBoard event files when tensorboardX is installed."""

    def __init__(self, workdir: Path, stage: str, enabled: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.stage = stage
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "stage": self.stage, "split": split, "time": time.time(), **metrics}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(workdir: str | Path, split: str = "train") -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r.get("split") == split]


def _to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}


@contextlib.contextmanager
def _stop_signals() -> Iterator[dict[str, Any]]:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and returns."""
    flag: dict[str, Any] = {"signal": None}

    def handler(signum, frame):  # noqa: ARG001
        flag["signal"] = signum

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: leave signals alone
        previous = {}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def count_tokens(batch: dict[str, np.ndarray]) -> int:
    return int(sum(np.count_nonzero(v) for k, v in batch.items() if k.endswith("segment_ids")))


# ----------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    final_step: int
    stopped_early: bool
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    tokens_per_second: float
    compile_seconds: float


def train(config: Config, workdir: str | Path, *, mesh=None, tokenizer=None, batch_iterator=None,
          eval_batches: list | None = None, log: Callable[[str], None] = print,
          max_steps_this_run: int | None = None) -> TrainResult:
    """Trains the configured stage to `train.steps`, resuming from the workdir's checkpoint if present.

    `max_steps_this_run` stops early (with a checkpoint), as a preemption would."""
    if config.train.stage == "rl":
        from jaxllm import rl

        return rl.train_rl(config, workdir, mesh=mesh, tokenizer=tokenizer, log=log,
                           max_steps_this_run=max_steps_this_run)
    context = setup(config, workdir, mesh=mesh, tokenizer=tokenizer, log=log)
    if batch_iterator is None:
        from jaxllm.data.pipeline import make_batch_iterator

        batch_iterator = make_batch_iterator(config, context.tokenizer, "train", jax.process_index(),
                                             jax.process_count())
    if context.data_state is not None:
        batch_iterator.set_state(context.data_state)
    if eval_batches is None:
        from jaxllm.data.pipeline import make_eval_batches

        eval_batches = make_eval_batches(config, context.tokenizer, config.train.eval_batches,
                                         jax.process_index(), jax.process_count())
    step_fn = steps_lib.build_train_step(config, context.graphdef, context.optimizer)
    eval_fn = steps_lib.build_eval_step(config, context.graphdef)
    return run_loop(context, batch_iterator, step_fn, eval_fn, eval_batches, log=log,
                    max_steps_this_run=max_steps_this_run)


def jit_step(context: RunContext, step_fn):
    shardings = context.state_shardings
    batch_sharding = sharding_lib.batch_sharding(context.mesh)
    replicated = sharding_lib.replicated(context.mesh)
    reference_shardings = None  # the reference has no heads (reward/value) even when the state does
    if context.reference_params is not None:
        reference_shardings = {k: v for k, v in shardings.params.items() if k != model_lib.HEADS_KEY}
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding, reference_shardings, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def evaluate(context: RunContext, eval_fn, eval_batches: list) -> dict[str, float]:
    if not eval_batches:
        return {}
    jitted = jax.jit(eval_fn)
    with jax.set_mesh(context.mesh):
        results = [jitted(context.state.params, sharding_lib.place_batch(b, context.mesh), context.reference_params)
                   for b in eval_batches]
    return steps_lib.summarize_eval(jax.device_get(results))


def save_checkpoint(context: RunContext, batch_iterator, step: int, force: bool = False) -> None:
    meta = {"step": step, "stage": context.config.train.stage, "config": to_dict(context.config)}
    ckpt.save(context.manager, step, context.state, batch_iterator.get_state(), meta, force=force)


def run_loop(context: RunContext, batch_iterator, step_fn, eval_fn, eval_batches: list, *,
             prepare_batch: Callable[[RunContext, dict], tuple[dict, dict]] | None = None,
             evaluate_fn: Callable[[RunContext], dict[str, float]] | None = None,
             log: Callable[[str], None] = print, max_steps_this_run: int | None = None) -> TrainResult:
    """Runs `step_fn` until train.steps. `prepare_batch(context, host_batch) -> (host_batch, extra
    metrics)` lets a stage build its batch from the current params (on-policy RL); `evaluate_fn(context)`
    replaces the batch evaluation (eval_fn over eval_batches) when a stage evaluates otherwise."""
    if evaluate_fn is None:
        evaluate_fn = lambda ctx: evaluate(ctx, eval_fn, eval_batches)  # noqa: E731
    config = context.config
    tc = config.train
    metrics_log = MetricsLog(context.workdir, tc.stage, enabled=context.is_main_process)
    jitted = jit_step(context, step_fn)
    start = int(jax.device_get(context.state.step))
    end = tc.steps if max_steps_this_run is None else min(tc.steps, start + max_steps_this_run)
    recent_losses: list[float] = []
    bad_in_a_row = 0
    last: dict[str, float] = {}
    tokens_done, timed_seconds, compile_seconds = 0, 0.0, 0.0
    progress = _progress_bar(start, tc.steps, tc.progress and context.is_main_process, tc.stage)
    stopped_early = False
    with _stop_signals() as stop, jax.set_mesh(context.mesh):
        step = start
        while step < end:
            host_batch = next(batch_iterator)
            extra: dict[str, float] = {}
            if prepare_batch is not None:
                host_batch, extra = prepare_batch(context, host_batch)
            batch = sharding_lib.place_batch(host_batch, context.mesh)
            limit = np.float32(np.inf)
            if tc.spike_factor > 0 and len(recent_losses) >= 10:
                limit = np.float32(tc.spike_factor * statistics.median(recent_losses[-50:]))
            began = time.perf_counter()
            context.state, metrics = jitted(context.state, batch, context.reference_params, limit)
            step += 1
            log_now = step % tc.log_every == 0 or step == end or step == start + 1
            if log_now or tc.max_bad_steps_in_a_row > 0:
                values = _to_floats(metrics)
                elapsed = time.perf_counter() - began
                if step == start + 1:
                    compile_seconds = elapsed
                else:
                    tokens_done += count_tokens(host_batch) * jax.process_count()
                    timed_seconds += elapsed
                values.update(extra)
                values["tokens_per_second"] = tokens_done / timed_seconds if timed_seconds else 0.0
                values["step_seconds"] = elapsed
                if values.get("skipped", 0.0) > 0:
                    bad_in_a_row += 1
                    _log_skipped(context, step, values, host_batch, log)
                    if bad_in_a_row >= tc.max_bad_steps_in_a_row > 0:
                        save_checkpoint(context, batch_iterator, step, force=True)
                        context.manager.wait_until_finished()
                        raise TrainingHalted(f"{bad_in_a_row} updates in a row were skipped (non-finite or spiking "
                                             f"loss) at step {step}; see {context.workdir}/skipped_batches.jsonl")
                else:
                    bad_in_a_row = 0
                    if math.isfinite(values["loss"]):
                        recent_losses.append(values["loss"])
                last = values
                if log_now:
                    metrics_log.write(step, "train", values)
                    progress.update(step, values)
            if tc.eval_every and step % tc.eval_every == 0 and step < end:
                metrics_log.write(step, "eval", evaluate_fn(context))
            if step % tc.checkpoint_every == 0 and step < end:
                save_checkpoint(context, batch_iterator, step)
            if stop["signal"] is not None:
                log(f"\nreceived signal {stop['signal']}: saving step {step} and stopping")
                stopped_early = True
                break
        if context.manager.latest_step() != step:
            save_checkpoint(context, batch_iterator, step, force=True)
        context.manager.wait_until_finished()
    progress.close()
    eval_metrics = {}
    if not stopped_early and step == tc.steps:
        eval_metrics = evaluate_fn(context)
        metrics_log.write(step, "eval", eval_metrics)
        if context.is_main_process:
            (context.workdir / "summary.json").write_text(json.dumps({
                "stage": tc.stage, "steps": step, "train": last, "eval": eval_metrics,
                "compile_seconds": compile_seconds,
                "tokens_per_second": tokens_done / timed_seconds if timed_seconds else 0.0,
                "config": json.loads(config_json(config)),
            }, indent=2))
    metrics_log.close()
    return TrainResult(context.workdir, step, stopped_early or step < tc.steps, last, eval_metrics,
                       tokens_done / timed_seconds if timed_seconds else 0.0, compile_seconds)


def _log_skipped(context: RunContext, step: int, values: dict[str, float], host_batch: dict, log) -> None:
    example_ids = host_batch.get("example_ids")
    record = {"step": step, "loss": values.get("loss"), "grad_norm": values.get("grad_norm"),
              "example_ids": sorted({int(i) for i in np.asarray(example_ids).ravel() if i >= 0})
              if example_ids is not None else []}
    if context.is_main_process:
        with (context.workdir / "skipped_batches.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    log(f"step {step}: skipped the update (loss={values.get('loss')}, grad_norm={values.get('grad_norm')}); "
        f"documents {record['example_ids'][:16]}")


class _progress_bar:
    def __init__(self, start: int, total: int, enabled: bool, stage: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True, file=sys.stderr,
                            mininterval=1.0)
        self.position = start

    def update(self, step: int, values: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.position)
        self.position = step
        self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                             tok_s=f"{values.get('tokens_per_second', 0):.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
