"""The one training loop every stage uses, its side concerns as hooks.

`run_loop` steps the stage's jitted update to `train.steps`, times it (tokens/s, MFU) and calls a list of
hooks around each step (their protocol: `jaxllm.loop.hooks.Hook`). The default hooks, in their order:
metrics log, progress bar, spike guard, evaluation + best checkpoint, periodic checkpoints, stop signals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxllm import hardware
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm.config import save_config
from jaxllm.loop import checkpointing, evaluation, metrics_log, progress, signals, spike_guard
from jaxllm.loop.context import RunContext, jit_step, release
from jaxllm.loop.hooks import Hook, LoopRun


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    final_step: int
    stopped_early: bool
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    tokens_per_second: float
    compile_seconds: float


def count_tokens(batch: dict[str, np.ndarray]) -> int:
    return int(sum(np.count_nonzero(v) for k, v in batch.items() if k.endswith("segment_ids")))


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}


def default_hooks(context: RunContext, evaluate_fn: Callable[[RunContext], dict[str, float]]) -> list[Hook]:
    """metrics log, progress bar, spike guard, evaluation + best checkpoint, checkpoints, stop signals."""
    metrics = metrics_log.MetricsLogging()
    return [metrics, progress.Progress(), spike_guard.SpikeGuarding(), evaluation.Evaluation(evaluate_fn, metrics),
            checkpointing.Checkpointing(), signals.StopOnSignal()]


def run_loop(context: RunContext, batch_iterator, step_fn, eval_fn, eval_batches: list, *,
             prepare_batch: Callable[[RunContext, dict], tuple[dict, dict]] | None = None,
             evaluate_fn: Callable[[RunContext], dict[str, float]] | None = None,
             log: Callable[[str], None] = print, max_steps_this_run: int | None = None,
             hooks: Sequence[Hook] | None = None) -> TrainResult:
    """Runs `step_fn` until train.steps. `prepare_batch(context, host_batch) -> (host_batch, extra
    metrics)` lets a stage build its batch from the current params (on-policy RL); `evaluate_fn(context)`
    replaces the batch evaluation (eval_fn over eval_batches) when a stage evaluates otherwise; `hooks`
    replace `default_hooks`. The workdir lock is released at the end, also on failure."""
    if evaluate_fn is None:
        evaluate_fn = lambda ctx: evaluation.evaluate(ctx, eval_fn, eval_batches)  # noqa: E731
    try:
        if context.is_main_process:  # only now, every check passed: a run that fails to start leaves it alone
            save_config(context.config, context.workdir / "config.yaml")
        hooks = default_hooks(context, evaluate_fn) if hooks is None else hooks
        result = _run_loop(context, batch_iterator, jit_step(context, step_fn), hooks, prepare_batch, log,
                           max_steps_this_run)
    except BaseException:
        release(context.manager, context.lock)
        raise
    if context.lock is not None:
        context.lock.release()
    return result


def _run_loop(context: RunContext, batch_iterator, jitted, hooks: Sequence[Hook], prepare_batch, log,
              max_steps_this_run: int | None) -> TrainResult:
    tc = context.config.train
    start = int(jax.device_get(context.state.step))
    end = tc.steps if max_steps_this_run is None else min(tc.steps, start + max_steps_this_run)
    flops_per_token = _flops_per_token(context)
    with contextlib.ExitStack() as resources:
        run = LoopRun(context, batch_iterator, log, start, end, start, resources)
        for hook in hooks:
            hook.on_start(run)
        resources.enter_context(jax.set_mesh(context.mesh))
        while run.step < end:
            if any(hook.before_step(run) for hook in hooks):
                run.stopped_early = True
                break
            values = _update(run, jitted, prepare_batch, flops_per_token)
            for hook in hooks:
                hook.after_step(run, values)
        for hook in reversed(hooks):
            hook.on_end(run)
    return TrainResult(context.workdir, run.step, run.stopped_early or run.step < tc.steps, run.last,
                       run.eval_metrics, run.throughput.tokens_per_second, run.throughput.compile_seconds)


def _update(run: LoopRun, jitted, prepare_batch, flops_per_token: float) -> dict[str, float]:
    """One update on the next batch; its metrics as floats, with tokens/s, MFU (where the device's peak
    is known) and its seconds. Advances `run.step`."""
    context = run.context
    host_batch = next(run.batch_iterator)
    extra: dict[str, float] = {}
    if prepare_batch is not None:
        host_batch, extra = prepare_batch(context, host_batch)
    batch = sharding_lib.place_batch(host_batch, context.mesh)
    began = time.perf_counter()
    context.state, metrics = jitted(context.state, batch, context.reference_params, run.loss_limit)
    run.step += 1
    values = to_floats(metrics)  # every step: the guard must see every skipped update
    elapsed = time.perf_counter() - began
    run.throughput.record(run.step == run.start + 1, elapsed, count_tokens(host_batch) * jax.process_count())
    values.update(extra)
    values["tokens_per_second"] = run.throughput.tokens_per_second
    config = context.config
    utilisation = hardware.mfu(values["tokens_per_second"], flops_per_token, jax.devices()[0].device_kind,
                               config.model.dtype, jax.device_count())
    if utilisation is not None:  # datasheet peak known (GPU/TPU); CPUs: `jaxllm bench` has a ceiling
        values["mfu"] = utilisation
    values["step_seconds"] = elapsed
    run.host_batch, run.last = host_batch, values
    return values


def _flops_per_token(context: RunContext) -> float:
    """Training FLOPs per token: 3x the forward, + a third for a frozen reference's forward pass."""
    flops = model_lib.flops_per_token(context.config.model, context.config.data.seq_len)
    if context.reference_params is not None:
        flops *= 4 / 3
    return flops
