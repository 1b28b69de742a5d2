"""The loop's hook protocol and the run state its hooks share.

A hook implements any of:

    on_start(run)           once, before the first step (register cleanups on `run.resources`)
    before_step(run)        -> True to stop before the next update (a signal arrived)
    after_step(run, values) after each update, with its metrics as floats
    on_end(run)             once, when the loop stopped or finished; in reverse order, like nested `with`
                            blocks (the final checkpoint is saved before the final evaluation)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import numpy as np

from jaxllm.loop.context import RunContext


@dataclasses.dataclass
class Throughput:
    """The timing of the updates: the first (which compiles) apart, tokens/s over the others."""

    compile_seconds: float = 0.0
    tokens_done: int = 0
    timed_seconds: float = 0.0

    def record(self, first: bool, seconds: float, tokens: int) -> None:
        if first:
            self.compile_seconds = seconds
        else:
            self.tokens_done += tokens
            self.timed_seconds += seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_done / self.timed_seconds if self.timed_seconds else 0.0


@dataclasses.dataclass
class LoopRun:
    """The loop's state that its hooks read and write."""

    context: RunContext
    batch_iterator: Any
    log: Callable[[str], None]
    start: int
    end: int  # this run's last step (train.steps, or fewer with max_steps_this_run)
    step: int
    resources: contextlib.ExitStack  # what hooks open is closed here, in reverse, also on failure
    host_batch: dict = dataclasses.field(default_factory=dict)  # the batch of the update just made
    last: dict[str, float] = dataclasses.field(default_factory=dict)  # the metrics of the update just made
    loss_limit: np.float32 = np.float32(np.inf)  # updates with a larger loss are skipped (the spike guard)
    hold_checkpoints: bool = False  # no periodic checkpoint (the spike guard, while a rollback may come)
    stopped_early: bool = False
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the final evaluation's
    throughput: Throughput = dataclasses.field(default_factory=Throughput)

    @property
    def is_log_step(self) -> bool:
        """Logged steps: every train.log_every-th, the first of this run and the last."""
        return self.step % self.context.config.train.log_every == 0 or self.step in (self.end, self.start + 1)

    @property
    def completed(self) -> bool:
        """The run reached train.steps (not stopped by a signal or max_steps_this_run)."""
        return not self.stopped_early and self.step == self.context.config.train.steps


class Hook:
    """A side concern of the loop; every method does nothing unless overridden."""

    def on_start(self, run: LoopRun) -> None:
        pass

    def before_step(self, run: LoopRun) -> bool:
        return False

    def after_step(self, run: LoopRun, values: dict[str, float]) -> None:
        pass

    def on_end(self, run: LoopRun) -> None:
        pass
