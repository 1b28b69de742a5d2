"""Preemption and stop signals: SIGTERM/SIGINT (one process) or JAX's preemption sync point (several)
stop the loop at a step boundary; the checkpointing hook then saves that step."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

import jax

from jaxllm.loop.hooks import Hook, LoopRun

_ACTIVE_STOP_FLAG: dict[str, Any] | None = None


@contextlib.contextmanager
def stop_signals() -> Iterator[dict[str, Any]]:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and returns (a second SIGINT
    interrupts at once). Nested uses share one flag: `train` installs it before setup, so a signal during
    start-up or compilation also ends in a clean save. With several processes nothing is installed: SIGTERM
    goes to JAX's preemption notifier (see `should_stop`) and a flag raised on one host alone would make
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


def should_stop(stop: dict[str, Any], step: int) -> bool:
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


class StopOnSignal(Hook):
    """The loop's hook: installs the handlers for the loop (or shares `train`'s) and stops it before the
    next update once a signal arrived."""

    def __init__(self) -> None:
        self.flag: dict[str, Any] = {"signal": None}

    def on_start(self, run: LoopRun) -> None:
        self.flag = run.resources.enter_context(stop_signals())

    def before_step(self, run: LoopRun) -> bool:
        if not should_stop(self.flag, run.step):
            return False
        run.log(f"\nreceived {self.flag['signal']}: saving step {run.step} and stopping")
        return True
