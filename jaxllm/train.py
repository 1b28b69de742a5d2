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
from jaxllm import hardware
from jaxllm import lora as lora_lib
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import stages as stages_lib
from jaxllm import state as state_lib
from jaxllm import step_builder
from jaxllm import steps as steps_lib
from jaxllm.report import read_metrics  # noqa: F401  (re-exported: jaxllm.train.read_metrics)
from jaxllm.config import Config, ConfigError, compare_for_resume, config_json, save_config, to_dict
from jaxllm.errors import DataError, TrainingHalted
from jaxllm.files import WorkdirLock, write_json_atomic
from jaxllm.data.tokenizer import Tokenizer, check_vocab


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
    guard_state: dict = dataclasses.field(default_factory=dict)  # SpikeGuard memory, saved in each checkpoint
    built: step_builder.StepBuild | None = None  # the stage's step plan (layouts, shardings, the step itself)
    lock: WorkdirLock | None = None  # the workdir's exclusive lock (process 0), released when the loop ends

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
    try:
        tokenizer = Tokenizer.load(config.data.tokenizer)
    except RuntimeError as error:  # sentencepiece's parse failure of a damaged or foreign file
        raise DataError(f"data.tokenizer={config.data.tokenizer}: not a readable sentencepiece model "
                        f"({str(error).strip()[:200]}); point it at a directory made by `jaxllm tokenizer train` "
                        "or use data.tokenizer=default") from None
    check_vocab(tokenizer, config.model.vocab_size)
    return tokenizer


def check_init_from(config: Config, tokenizer, workdir: Path) -> None:
    """`train.init_from` must be an existing directory holding a finished checkpoint made with this run's
    tokenizer; checked before the workdir is touched. A resumed run reads it only for a frozen reference or
    LoRA base (its params come from its own checkpoint), so only then must it still exist."""
    init_from = config.train.init_from
    if not init_from:
        return
    resuming = ckpt.latest_step(workdir) is not None
    if resuming and not (config.model.lora_rank or stages_lib.get(config.train.stage).needs_reference):
        return
    if not Path(init_from).exists():
        raise ckpt.CheckpointError(f"train.init_from={init_from}: no such directory ({Path(init_from).absolute()} "
                                   "does not exist); check the path (it names the workdir of an earlier stage)")
    if not config.model.lora_rank:
        ckpt.check_tokenizer(ckpt.read_meta(init_from), tokenizer, init_from)


def lock_workdir(workdir: Path, what: str = "jaxllm train") -> WorkdirLock | None:
    """The workdir's exclusive lock, taken by process 0 only (one lock per run; see the README on shared
    multi-host workdirs). None on the other processes."""
    if jax.process_index() != 0:
        return None
    return WorkdirLock(workdir, what).acquire()


def check_resume_config(saved: dict | None, config: Config, step: int, where: str,
                        log: Callable[[str], None]) -> None:
    """Compares the checkpoint's saved config with this run's: a change of the model, tokenizer, data, stage,
    seed or batch size is a ConfigError listing every changed key; a schedule change warns once per key
    with the old and new value and the learning rate at the next step under both; other changes that
    alter training warn once per key; changes that only affect logging, checkpointing or the kernels used
    are silent."""
    if not isinstance(saved, dict):
        return
    changes = compare_for_resume(saved, config)
    if changes.incompatible:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes.incompatible)
        raise ConfigError(f"{where} was trained with another model, tokenizer, data, stage, seed or batch size "
                          f"({len(changes.incompatible)} changed: {listed}); resuming would continue a different run. "
                          "Use the checkpoint's settings (see the workdir's config.yaml) or choose a new --workdir")
    if changes.schedule:
        old_lr, new_lr = _learning_rates_at(saved, config, step)
        for key, old, new in changes.schedule:
            effect = (f"the run now ends at step {new} instead of {old}, so the decay after the resume point is "
                      f"{'compressed' if new < old else 'stretched'}" if key == "train.steps"
                      else "the schedule from the resume point on uses the new value")
            log(f"warning: {key} changed since checkpoint {step}: {old!r} -> {new!r}; steps 1-{step} followed the old "
                f"learning-rate schedule and {effect} (learning rate at step {step + 1}: {old_lr:.4g} on the old "
                f"schedule, {new_lr:.4g} on the new)")
    for key, old, new in changes.other:
        log(f"warning: {key} changed since checkpoint {step}: {old!r} -> {new!r}; steps 1-{step} were trained with "
            f"the old value, the steps from {step + 1} on use the new one")


def _learning_rates_at(saved: dict, config: Config, step: int) -> tuple[float, float]:
    """The learning rate of update `step + 1` under the saved settings and under this run's."""
    names = {f.name for f in dataclasses.fields(config.optimizer)}
    saved_optimizer = dataclasses.replace(config.optimizer, **{k: v for k, v in (saved.get("optimizer") or {}).items()
                                                               if k in names})
    saved_steps = int((saved.get("train") or {}).get("steps", config.train.steps))
    old = state_lib.learning_rate_schedule(saved_optimizer, saved_steps)(step)
    new = state_lib.learning_rate_schedule(config.optimizer, config.train.steps)(step)
    return float(old), float(new)


def setup(config: Config, workdir: str | Path, mesh: jax.sharding.Mesh | None = None, tokenizer=None,
          log: Callable[[str], None] = print) -> RunContext:
    """Checks everything, then locks the workdir and builds or restores the state. Nothing in the workdir
    is written here except its lock file (config.yaml is written by `run_loop`, once every check passed).
    On failure the lock is released and the checkpoint manager shut down."""
    sharding_lib.maybe_initialize_distributed(config.mesh)
    workdir = Path(workdir).absolute()
    mesh = mesh or sharding_lib.make_mesh(config.mesh)
    check_batch_fits_mesh(config, mesh)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
    check_init_from(config, tokenizer, workdir)
    ckpt.check_writable(workdir)
    lock = lock_workdir(workdir)
    manager = None
    try:
        built = step_builder.build(config, mesh)
        graphdef, abstract_params, optimizer = built.graphdef, built.abstract_params, built.optimizer
        abstract_state, shardings = built.abstract_state, built.state_shardings

        manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints,
                                    async_save=config.train.async_checkpointing)
        resume_step = manager.latest_step()
        data_state = None
        reference_params = None
        guard_state: dict = {}
        with jax.set_mesh(mesh):
            if resume_step is not None:
                where = f"{workdir}/checkpoints/{resume_step}"
                saved_meta = ckpt.read_meta(workdir, resume_step)
                ckpt.check_tokenizer(saved_meta, tokenizer, where)
                check_resume_config(saved_meta.get("config"), config, resume_step, where, log)
                state, data_state, meta = ckpt.restore(manager, resume_step,
                                                       _abstract_with_shardings(abstract_state, shardings))
                guard_state = meta.get("guard") or {}
                log(f"resumed {workdir} at step {resume_step}")
            else:
                params = _initial_params(config, graphdef, abstract_params, shardings.params, built.heads, log)
                state = jax.jit(lambda p: state_lib.create_state(p, optimizer, config.train.seed),
                                out_shardings=shardings)(params)
            if config.model.lora_rank:
                reference_params = lora_lib.load_base(config, built.base_abstract, mesh)
            elif built.stage.needs_reference:
                reference_params = _reference_params(config, state, abstract_params, shardings.params, resume_step,
                                                     log)
    except BaseException:
        release(manager, lock)
        raise
    return RunContext(config, workdir, mesh, graphdef, optimizer, state, shardings, reference_params, manager,
                      tokenizer, data_state, resume_step, guard_state, built, lock)


def release(manager, lock: WorkdirLock | None) -> None:
    """Shuts the checkpoint manager down (its background threads would otherwise keep a failed process
    alive for minutes) and releases the workdir lock. Safe to call twice."""
    try:
        ckpt.shut_down(manager)
    finally:
        if lock is not None:
            lock.release()


def _initial_params(config: Config, graphdef, abstract_params, param_shardings, heads: tuple[str, ...], log) -> Any:
    model_abstract = step_builder.without_heads(abstract_params)
    model_shardings = step_builder.without_heads(param_shardings)
    if config.model.lora_rank:
        params = jax.jit(lambda: lora_lib.init_adapters(config.model, config.train.seed), out_shardings=model_shardings)()
        log(f"LoRA rank {config.model.lora_rank} adapters on the frozen base {config.train.init_from}")
    elif config.train.init_from:
        params = lora_lib.load_params(config.train.init_from, _abstract_with_shardings(model_abstract, model_shardings))
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
    model_abstract = step_builder.without_heads(abstract_params)
    model_shardings = step_builder.without_heads(param_shardings)
    if config.train.init_from:
        return lora_lib.load_params(config.train.init_from, _abstract_with_shardings(model_abstract, model_shardings))
    if resume_step is not None:
        log("warning: no init_from; the reference is the resumed params, not the original initialisation")
    return jax.tree.map(jnp.copy, step_builder.without_heads(state.params))


# ----------------------------------------------------------------------------------------------
# Logging.


class MetricsLog:
    """metrics.jsonl (every logged step) + TensorBoard event files when tensorboardX is installed."""

    def __init__(self, workdir: Path, stage: str, enabled: bool = True, tensorboard: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.stage = stage
        self.enabled = enabled
        self.writer = None
        if enabled:
            _drop_partial_last_line(self.path)
        if enabled and tensorboard:
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


def _drop_partial_last_line(path: Path) -> None:
    """Truncates a JSONL file after its last newline (a record cut short is not a record)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                handle.truncate(start + newline + 1)
                return
            end = start
        handle.truncate(0)


def _to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}


_ACTIVE_STOP_FLAG: dict[str, Any] | None = None


@contextlib.contextmanager
def _stop_signals() -> Iterator[dict[str, Any]]:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and returns (a second SIGINT
    interrupts at once). Nested uses share one flag: `train` installs it before setup, so a signal during
    start-up or compilation also ends in a clean save. With several processes nothing is installed: SIGTERM
    goes to JAX's preemption notifier (see `_should_stop`) and a flag raised on one host alone would make
    it leave the others waiting in the collective save."""
    global _ACTIVE_STOP_FLAG
    if _ACTIVE_STOP_FLAG is not None:
        yield _ACTIVE_STOP_FLAG
        return
    flag: dict[str, Any] = {"signal": None}

    def handler(signum, frame):  # noqa: ARG001
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signum

    previous = {}
    if jax.process_count() == 1:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread: leave signals alone
            previous = {}
    _ACTIVE_STOP_FLAG = flag
    try:
        yield flag
    finally:
        _ACTIVE_STOP_FLAG = None
        for sig, old in previous.items():
            signal.signal(sig, old)


def _should_stop(stop: dict[str, Any], step: int) -> bool:
    """One process: a signal arrived. Several: every host has reached JAX's preemption sync point, the
    same step on all of them (JAX's notifier turns a SIGTERM on any host into that agreement)."""
    if stop["signal"] is not None:
        return True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                stop["signal"] = "preemption (all hosts)"
                return True
        except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service=False)
            return False
    return False


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
          max_steps_this_run: int | None = None, **stage_options) -> TrainResult:
    """Trains the configured stage to `train.steps`, resuming from the workdir's checkpoint if present.

    batch_iterator: default `jaxllm.stages.make_batch_iterator(config)` (prompt batches for on-policy
    stages); `max_steps_this_run` stops early (with a checkpoint), as a preemption would; stage_options
    go to an on-policy stage's rollout hooks (rl: eval_prompts, reward_functions)."""
    stage = stages_lib.of(config, **stage_options)
    sharding_lib.maybe_initialize_distributed(config.mesh)  # before anything asks JAX about processes
    with _stop_signals():
        # The mesh, tokenizer and data are checked first: bad input fails before the workdir is written.
        mesh = mesh or sharding_lib.make_mesh(config.mesh)
        check_batch_fits_mesh(config, mesh)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
        if batch_iterator is None:
            batch_iterator = stages_lib.make_batch_iterator(config, tokenizer or None, "train", jax.process_index(),
                                                            jax.process_count())
        if eval_batches is None and stage.rollouts is None:
            eval_batches = stages_lib.make_eval_batches(config, tokenizer or None, config.train.eval_batches,
                                                        jax.process_index(), jax.process_count())
        context = None
        try:
            context = setup(config, workdir, mesh=mesh, tokenizer=tokenizer, log=log)
            prepare_batch = evaluate_fn = hooks = None
            if stage.rollouts is not None:  # on-policy: each update's batch is sampled from the current params
                hooks = stage.rollouts(context, batch_iterator, log, **stage_options)
                batch_iterator, prepare_batch, evaluate_fn = hooks.batches, hooks.prepare, hooks.evaluate
            if context.data_state is not None:
                restore_data_position(context, batch_iterator, log)
            result = run_loop(context, batch_iterator, context.built.train_step, context.built.eval_step,
                              eval_batches or [], prepare_batch=prepare_batch, evaluate_fn=evaluate_fn, log=log,
                              max_steps_this_run=max_steps_this_run)
            if hooks is not None and hooks.finish is not None:
                hooks.finish(context)
            return result
        except BaseException as error:
            if context is not None:
                release(context.manager, context.lock)
            failure = ckpt.write_failure(error, workdir) if isinstance(error, Exception) else None
            if failure is not None:
                raise failure from error
            raise


def restore_data_position(context: RunContext, batch_iterator, log: Callable[[str], None] = print) -> None:
    """Puts the iterator at the checkpoint's data position. Data whose content changed since the checkpoint
    is an error unless `data.allow_change=true` (then a warning); a damaged saved position names the
    checkpoint."""
    where = f"{context.workdir}/checkpoints/{context.resumed_from}"
    saved = context.data_state
    saved_fingerprint = saved.get("data_fingerprint") if isinstance(saved, dict) else None
    current = getattr(batch_iterator, "fingerprint", None)
    if saved_fingerprint and current and saved_fingerprint != current:
        if not context.config.data.allow_change:
            raise DataError(f"the data (its content, tokenizer or settings) changed since {where} was saved "
                            f"(fingerprint {saved_fingerprint} -> {current}); resuming would continue at batch "
                            f"{saved.get('step')} of other data. Restore the data, start a new --workdir, or set "
                            "data.allow_change=true to continue on the new data")
        log(f"warning: the data changed since {where} was saved; continuing at batch {saved.get('step')} of the "
            "new data (data.allow_change=true)")
        saved = {**saved, "data_fingerprint": current}
    try:
        batch_iterator.set_state(saved)
    except DataError as error:
        raise DataError(f"{where}: its saved data position does not fit this run: {error}") from None


def jit_step(context: RunContext, step_fn):
    """`step_fn` (e.g. the stage's, or one built with another loss) jitted like the run's step."""
    return dataclasses.replace(context.built, train_step=step_fn).jit_train_step()


def evaluate(context: RunContext, eval_fn, eval_batches: list) -> dict[str, float]:
    if not eval_batches:
        return {}
    jitted = jax.jit(eval_fn)
    with jax.set_mesh(context.mesh):
        results = [jitted(context.state.params, sharding_lib.place_batch(b, context.mesh), context.reference_params)
                   for b in eval_batches]
    return steps_lib.summarize_eval(jax.device_get(results))


def save_checkpoint(context: RunContext, batch_iterator, step: int, force: bool = False) -> None:
    meta = {"step": step, "stage": context.config.train.stage, "config": to_dict(context.config),
            "guard": context.guard_state, "tokenizer_fingerprint": getattr(context.tokenizer, "fingerprint", None)}
    ckpt.save(context.manager, step, context.state, batch_iterator.get_state(), meta, force=force)


def save_if_best(context: RunContext, batch_iterator, step: int, eval_metrics: dict[str, float]) -> bool:
    """With `train.best_metric` set, keeps the checkpoint with the best eval value of that metric in
    WORKDIR/best (a checkpoint directory of its own: `init_from=WORKDIR/best` starts from it)."""
    tc = context.config.train
    value = eval_metrics.get(tc.best_metric) if tc.best_metric else None
    if value is None or not math.isfinite(value):
        return False
    record_path = context.workdir / "best" / "best.json"
    best = _read_best_value(record_path, log=print)
    if best is not None:
        if (value >= best) if tc.best_mode == "min" else (value <= best):
            return False
    manager = ckpt.make_manager(context.workdir / "best", keep=1, async_save=False)
    save_checkpoint(dataclasses.replace(context, manager=manager), batch_iterator, step, force=True)
    manager.wait_until_finished()
    if context.is_main_process:
        write_json_atomic(record_path, {"step": step, "metric": tc.best_metric, "mode": tc.best_mode, "value": value})
    return True


def _read_best_value(record_path: Path, log: Callable[[str], None]) -> float | None:
    """The recorded best value, or None when there is none or its record is damaged (then said)."""
    if not record_path.exists():
        return None
    try:
        return float(json.loads(record_path.read_text())["value"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        log(f"warning: {record_path} is damaged; the current checkpoint replaces the best one")
        return None


def run_loop(context: RunContext, batch_iterator, step_fn, eval_fn, eval_batches: list, *,
             prepare_batch: Callable[[RunContext, dict], tuple[dict, dict]] | None = None,
             evaluate_fn: Callable[[RunContext], dict[str, float]] | None = None,
             log: Callable[[str], None] = print, max_steps_this_run: int | None = None) -> TrainResult:
    """Runs `step_fn` until train.steps. `prepare_batch(context, host_batch) -> (host_batch, extra
    metrics)` lets a stage build its batch from the current params (on-policy RL); `evaluate_fn(context)`
    replaces the batch evaluation (eval_fn over eval_batches) when a stage evaluates otherwise."""
    try:
        result = _run_loop(context, batch_iterator, step_fn, eval_fn, eval_batches, prepare_batch=prepare_batch,
                           evaluate_fn=evaluate_fn, log=log, max_steps_this_run=max_steps_this_run)
    except BaseException:
        release(context.manager, context.lock)
        raise
    if context.lock is not None:
        context.lock.release()
    return result


def _run_loop(context: RunContext, batch_iterator, step_fn, eval_fn, eval_batches: list, *, prepare_batch,
              evaluate_fn, log: Callable[[str], None], max_steps_this_run: int | None) -> TrainResult:
    if context.is_main_process:  # only now, every check passed: a run that fails to start leaves it alone
        save_config(context.config, context.workdir / "config.yaml")
    if evaluate_fn is None:
        evaluate_fn = lambda ctx: evaluate(ctx, eval_fn, eval_batches)  # noqa: E731
    config = context.config
    tc = config.train
    metrics_log = MetricsLog(context.workdir, tc.stage, enabled=context.is_main_process, tensorboard=tc.tensorboard)
    jitted = jit_step(context, step_fn)
    start = int(jax.device_get(context.state.step))
    end = tc.steps if max_steps_this_run is None else min(tc.steps, start + max_steps_this_run)
    guard = SpikeGuard.from_dict(context.guard_state)
    last: dict[str, float] = {}
    tokens_done, timed_seconds, compile_seconds = 0, 0.0, 0.0
    flops_per_token = model_lib.flops_per_token(config.model, config.data.seq_len)  # training: 3x the forward
    if context.reference_params is not None:  # a frozen reference's forward pass: + a third
        flops_per_token *= 4 / 3
    device = jax.devices()[0]
    progress = _progress_bar(start, tc.steps, tc.progress and context.is_main_process, tc.stage)
    stopped_early = False
    with _stop_signals() as stop, jax.set_mesh(context.mesh):
        step = start
        while step < end:
            if _should_stop(stop, step):
                log(f"\nreceived {stop['signal']}: saving step {step} and stopping")
                stopped_early = True
                break
            host_batch = next(batch_iterator)
            extra: dict[str, float] = {}
            if prepare_batch is not None:
                host_batch, extra = prepare_batch(context, host_batch)
            batch = sharding_lib.place_batch(host_batch, context.mesh)
            limit = guard.loss_limit(tc.spike_factor)
            began = time.perf_counter()
            context.state, metrics = jitted(context.state, batch, context.reference_params, limit)
            step += 1
            log_now = step % tc.log_every == 0 or step == end or step == start + 1
            values = _to_floats(metrics)  # every step: the guard must see every skipped update
            elapsed = time.perf_counter() - began
            if step == start + 1:
                compile_seconds = elapsed
            else:
                tokens_done += count_tokens(host_batch) * jax.process_count()
                timed_seconds += elapsed
            values.update(extra)
            values["tokens_per_second"] = tokens_done / timed_seconds if timed_seconds else 0.0
            utilisation = hardware.mfu(values["tokens_per_second"], flops_per_token, device.device_kind,
                                       config.model.dtype, jax.device_count())
            if utilisation is not None:  # datasheet peak known (GPU/TPU); CPUs: `jaxllm bench` has a ceiling
                values["mfu"] = utilisation
            values["step_seconds"] = elapsed
            skipped = values.get("skipped", 0.0) > 0
            guard.record(step, skipped, values.get("loss", math.nan))
            if skipped:
                _log_skipped(context, step, values, host_batch, log)
            last = values
            if log_now:
                metrics_log.write(step, "train", values)
                progress.update(step, values)
            if skipped and guard.bad_in_a_row >= tc.max_bad_steps_in_a_row > 0:
                target = _rollback(context, guard, step, batch_iterator, log) if tc.rollback_on_halt else None
                if target is None:
                    context.guard_state = guard.to_dict()
                    save_checkpoint(context, batch_iterator, step, force=True)
                    context.manager.wait_until_finished()
                    why = " and there is no checkpoint from before them to roll back to (or the last rollback " \
                          "did not help)" if tc.rollback_on_halt else " (train.rollback_on_halt=true would restore " \
                          "the newest checkpoint from before them and go on)"
                    raise TrainingHalted(f"{guard.bad_in_a_row} updates in a row were skipped (non-finite or "
                                         f"spiking loss) up to step {step}{why}; see "
                                         f"{context.workdir}/skipped_batches.jsonl for the documents")
            context.guard_state = guard.to_dict()
            if tc.eval_every and step % tc.eval_every == 0 and step < end:
                periodic = evaluate_fn(context)
                metrics_log.write(step, "eval", periodic)
                save_if_best(context, batch_iterator, step, periodic)
            # While updates are being skipped with rollback on, no periodic checkpoint: the params have not
            # moved, and a new save would rotate out the older checkpoints a rollback needs.
            if step % tc.checkpoint_every == 0 and step < end and not (tc.rollback_on_halt and guard.bad_in_a_row):
                save_checkpoint(context, batch_iterator, step)
        if context.manager.latest_step() != step:
            save_checkpoint(context, batch_iterator, step, force=True)
        context.manager.wait_until_finished()
    progress.close()
    eval_metrics = {}
    if not stopped_early and step == tc.steps:
        eval_metrics = evaluate_fn(context)
        metrics_log.write(step, "eval", eval_metrics)
        with jax.set_mesh(context.mesh):
            save_if_best(context, batch_iterator, step, eval_metrics)
        if context.is_main_process:
            write_json_atomic(context.workdir / "summary.json", {
                "stage": tc.stage, "steps": step, "train": last, "eval": eval_metrics,
                "compile_seconds": compile_seconds,
                "tokens_per_second": tokens_done / timed_seconds if timed_seconds else 0.0,
                "config": json.loads(config_json(config)),
            })
    metrics_log.close()
    return TrainResult(context.workdir, step, stopped_early or step < tc.steps, last, eval_metrics,
                       tokens_done / timed_seconds if timed_seconds else 0.0, compile_seconds)


@dataclasses.dataclass
class SpikeGuard:
    """What the loss-spike / non-finite guard remembers between steps. It is saved in every checkpoint's
    meta, so a resumed run skips, halts and rolls back exactly where an uninterrupted run would."""

    recent_losses: list[float] = dataclasses.field(default_factory=list)  # accepted finite losses, newest last
    bad_in_a_row: int = 0
    streak_start: int = 0  # the step of the first skipped update of the current run of skips (0: none)
    rollbacks: int = 0
    good_since_rollback: int = 0

    WINDOW = 50  # the running median is over this many accepted losses
    MIN_HISTORY = 10  # no spike limit before this many

    def loss_limit(self, spike_factor: float) -> np.float32:
        if spike_factor > 0 and len(self.recent_losses) >= self.MIN_HISTORY:
            return np.float32(spike_factor * statistics.median(self.recent_losses))
        return np.float32(np.inf)

    def record(self, step: int, skipped: bool, loss: float) -> None:
        if skipped:
            if self.bad_in_a_row == 0:
                self.streak_start = step
            self.bad_in_a_row += 1
            return
        self.bad_in_a_row, self.streak_start = 0, 0
        self.good_since_rollback += 1
        if math.isfinite(loss):
            self.recent_losses = (self.recent_losses + [loss])[-self.WINDOW:]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "SpikeGuard":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


def _rollback(context: RunContext, guard: SpikeGuard, step: int, batch_iterator, log) -> int | None:
    """Restores the params and optimizer state of the newest checkpoint saved before the current run of
    skipped updates began (at least one accepted update older), keeps the step and the data position, so
    the batches in between are never trained on. Returns that checkpoint's step, or None when there is none
    or the previous rollback was followed by no accepted update at all."""
    if guard.rollbacks and not guard.good_since_rollback:
        return None
    context.manager.wait_until_finished()
    candidates = [s for s in context.manager.all_steps() if s < guard.streak_start - 1]
    if not candidates:
        return None
    target = max(candidates)
    abstract = _abstract_with_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                     context.state), context.state_shardings)
    restored, _, _ = ckpt.restore(context.manager, target, abstract)
    context.state = context.state.replace(params=restored.params, opt_state=restored.opt_state)
    undone = list(range(target + 1, guard.streak_start))
    example_ids: list[int] = []
    if hasattr(batch_iterator, "batch_at"):  # the batches whose accepted updates are undone
        for undone_step in undone:
            ids = batch_iterator.batch_at(undone_step - 1).get("example_ids")
            if ids is not None:
                example_ids.extend(int(i) for i in np.asarray(ids).ravel() if i >= 0)
    record = {"step": step, "rolled_back_to": target, "undone_steps": undone,
              "skipped_steps": list(range(guard.streak_start, step + 1)), "undone_example_ids": sorted(set(example_ids))}
    if context.is_main_process:
        with (context.workdir / "skipped_batches.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    log(f"step {step}: {guard.bad_in_a_row} updates in a row skipped; rolled the params and optimizer back to "
        f"checkpoint {target} and continue with the next batch (steps {target + 1}-{step} are not trained on)")
    guard.rollbacks += 1
    guard.good_since_rollback = 0
    guard.bad_in_a_row, guard.streak_start = 0, 0
    return target


def _log_skipped(context: RunContext, step: int, values: dict[str, float], host_batch: dict, log) -> None:
    example_ids = host_batch.get("example_ids")
    record = {"step": step, "loss": values.get("loss"), "grad_norm": values.get("grad_norm"),
              "example_ids": sorted({int(i) for i in np.asarray(example_ids).ravel() if i >= 0})
              if example_ids is not None else []}
    if values.get("nonfinite_update", 0.0) > 0 and math.isfinite(values.get("loss", math.nan)) \
            and math.isfinite(values.get("grad_norm", math.nan)):
        record["cause"] = "non-finite update"
        log(f"step {step}: skipped the update: the loss and gradient were finite but the updated params were not "
            "(an optimizer setting or the optimizer state, not the data)")
    else:
        log(f"step {step}: skipped the update (loss={values.get('loss')}, grad_norm={values.get('grad_norm')}); "
            f"documents {record['example_ids'][:16]}")
    if context.is_main_process:
        with (context.workdir / "skipped_batches.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class _progress_bar:
    """tqdm bar of the steps; its postfix is the loss of the step just shown and the measured tokens/s
    ('-' until a step after the compiling one has been timed, e.g. right after a resume)."""

    def __init__(self, start: int, total: int, enabled: bool, stage: str, file=None, mininterval: float = 1.0):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True, file=file or sys.stderr,
                            mininterval=mininterval)
        self.position = start

    def update(self, step: int, values: dict[str, float]) -> None:
        if self.bar is None:
            return
        tokens_per_second = values.get("tokens_per_second", 0.0)
        # The postfix first: update() draws the bar, and must draw it with this step's numbers.
        self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                             tok_s=f"{tokens_per_second:.0f}" if tokens_per_second > 0 else "-", refresh=False)
        self.bar.update(step - self.position)
        self.position = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
