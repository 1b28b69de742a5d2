"""The tqdm progress bar of the steps (train.progress, process 0 only)."""

from __future__ import annotations

import sys

from jaxllm.loop.hooks import Hook, LoopRun


class ProgressBar:
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
            self.bar = None


class Progress(Hook):
    """The loop's hook: draws every logged step; the bar closes after the run's last step (or when the loop
    stops early)."""

    def __init__(self) -> None:
        self.bar: ProgressBar | None = None

    def on_start(self, run: LoopRun) -> None:
        tc = run.context.config.train
        self.bar = ProgressBar(run.start, tc.steps, tc.progress and run.context.is_main_process, tc.stage)
        run.resources.callback(self.bar.close)

    def after_step(self, run: LoopRun, values: dict[str, float]) -> None:
        if run.is_log_step:
            self.bar.update(run.step, values)
        if run.step == run.end:
            self.bar.close()
