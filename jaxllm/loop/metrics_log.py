"""metrics.jsonl (every logged step, every evaluation) + TensorBoard, and summary.json at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from jaxllm.config import config_json
from jaxllm.files import write_json_atomic
from jaxllm.loop.hooks import Hook, LoopRun


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


class MetricsLogging(Hook):
    """The loop's hook: the train metrics of every logged step; `write` for other splits (eval); at the
    end of a completed run, summary.json (stage, steps, last train and final eval metrics, timing, config)."""

    def __init__(self) -> None:
        self.metrics: MetricsLog | None = None

    def on_start(self, run: LoopRun) -> None:
        context = run.context
        self.metrics = MetricsLog(context.workdir, context.config.train.stage, enabled=context.is_main_process,
                                  tensorboard=context.config.train.tensorboard)
        run.resources.callback(self.metrics.close)

    def after_step(self, run: LoopRun, values: dict[str, float]) -> None:
        if run.is_log_step:
            self.write(run.step, "train", values)

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        self.metrics.write(step, split, values)

    def on_end(self, run: LoopRun) -> None:
        context = run.context
        if run.completed and context.is_main_process:
            write_json_atomic(context.workdir / "summary.json", {
                "stage": context.config.train.stage, "steps": run.step, "train": run.last, "eval": run.eval_metrics,
                "compile_seconds": run.throughput.compile_seconds,
                "tokens_per_second": run.throughput.tokens_per_second,
                "config": json.loads(config_json(context.config)),
            })
