"""Evaluation in the loop: every train.eval_every steps and after the last, each logged to metrics.jsonl;
with train.best_metric, the best checkpoint by that eval metric is kept in WORKDIR/best."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import jax

from jaxllm import checkpoint as ckpt
from jaxllm import sharding as sharding_lib
from jaxllm import steps as steps_lib
from jaxllm.files import write_json_atomic
from jaxllm.loop.checkpointing import save_checkpoint
from jaxllm.loop.context import RunContext
from jaxllm.loop.hooks import Hook, LoopRun
from jaxllm.loop.metrics_log import MetricsLogging


def evaluate(context: RunContext, eval_fn, eval_batches: list) -> dict[str, float]:
    """`eval_fn` over `eval_batches` with the current params, summarised (empty without batches)."""
    if not eval_batches:
        return {}
    jitted = jax.jit(eval_fn)
    with jax.set_mesh(context.mesh):
        results = [jitted(context.state.params, sharding_lib.place_batch(b, context.mesh), context.reference_params)
                   for b in eval_batches]
    return steps_lib.summarize_eval(jax.device_get(results))


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


class Evaluation(Hook):
    """The loop's hook: `evaluate_fn(context)` every train.eval_every steps before the last and once after
    a completed run (`run.eval_metrics`), each written to the metrics log and offered to `save_if_best`."""

    def __init__(self, evaluate_fn: Callable[[RunContext], dict[str, float]], metrics: MetricsLogging):
        self.evaluate_fn = evaluate_fn
        self.metrics = metrics

    def after_step(self, run: LoopRun, values: dict[str, float]) -> None:
        every = run.context.config.train.eval_every
        if every and run.step % every == 0 and run.step < run.end:
            self._evaluate(run)

    def on_end(self, run: LoopRun) -> None:
        if run.completed:
            run.eval_metrics = self._evaluate(run)

    def _evaluate(self, run: LoopRun) -> dict[str, float]:
        results = self.evaluate_fn(run.context)
        self.metrics.write(run.step, "eval", results)
        save_if_best(run.context, run.batch_iterator, run.step, results)
        return results
