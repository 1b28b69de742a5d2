"""The loss-spike / non-finite guard: the compiled step skips an update whose loss is non-finite or above
train.spike_factor x the running median; after train.max_bad_steps_in_a_row skips the run halts, or with
train.rollback_on_halt rolls back to the newest checkpoint from before them and goes on. Each skipped
batch's documents are written to WORKDIR/skipped_batches.jsonl."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from typing import Any, Callable

import jax
import numpy as np

from jaxllm import checkpoint as ckpt
from jaxllm.errors import TrainingHalted
from jaxllm.loop.checkpointing import save_checkpoint
from jaxllm.loop.context import RunContext, abstract_with_shardings
from jaxllm.loop.hooks import Hook, LoopRun


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


class SpikeGuarding(Hook):
    """The loop's hook: sets the next update's loss limit, records and logs each skipped update, rolls back
    or halts after too many in a row, keeps the guard's memory in `context.guard_state` (saved with each
    checkpoint) and holds periodic checkpoints while a rollback may still come."""

    def __init__(self) -> None:
        self.guard = SpikeGuard()

    def on_start(self, run: LoopRun) -> None:
        self.guard = SpikeGuard.from_dict(run.context.guard_state)
        run.loss_limit = self.guard.loss_limit(run.context.config.train.spike_factor)

    def after_step(self, run: LoopRun, values: dict[str, float]) -> None:
        context, tc, guard, step = run.context, run.context.config.train, self.guard, run.step
        skipped = values.get("skipped", 0.0) > 0
        guard.record(step, skipped, values.get("loss", math.nan))
        if skipped:
            log_skipped(context, step, values, run.host_batch, run.log)
        if skipped and guard.bad_in_a_row >= tc.max_bad_steps_in_a_row > 0:
            target = rollback(context, guard, step, run.batch_iterator, run.log) if tc.rollback_on_halt else None
            if target is None:
                context.guard_state = guard.to_dict()
                save_checkpoint(context, run.batch_iterator, step, force=True)
                context.manager.wait_until_finished()
                raise TrainingHalted(halt_message(guard, step, tc.rollback_on_halt, context))
        context.guard_state = guard.to_dict()
        run.loss_limit = guard.loss_limit(tc.spike_factor)
        # While updates are being skipped with rollback on, no periodic checkpoint: the params have not
        # moved, and a new save would rotate out the older checkpoints a rollback needs.
        run.hold_checkpoints = bool(tc.rollback_on_halt and guard.bad_in_a_row)


def halt_message(guard: SpikeGuard, step: int, rollback_on_halt: bool, context: RunContext) -> str:
    why = " and there is no checkpoint from before them to roll back to (or the last rollback " \
          "did not help)" if rollback_on_halt else " (train.rollback_on_halt=true would restore " \
          "the newest checkpoint from before them and go on)"
    return (f"{guard.bad_in_a_row} updates in a row were skipped (non-finite or spiking loss) up to step {step}{why}; "
            f"see {context.workdir}/skipped_batches.jsonl for the documents")


def rollback(context: RunContext, guard: SpikeGuard, step: int, batch_iterator,
             log: Callable[[str], None]) -> int | None:
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
    abstract = abstract_with_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
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


def log_skipped(context: RunContext, step: int, values: dict[str, float], host_batch: dict,
                log: Callable[[str], None]) -> None:
    """Says why the update of `step` was skipped and appends its documents to skipped_batches.jsonl."""
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
