"""Seconds spent compiling, measured from JAX's own monitoring events.

Every jitted program JAX builds is traced to a jaxpr, lowered to an MLIR module and compiled by the backend;
JAX records each phase's duration as a monitoring event. `CompileClock` adds them up while it is open, so a
caller can say how much of a stage's wall time went to compiling its train step, eval step, generation loop
and the small helper programs around them. A program read back from the persistent compilation cache still
traces and lowers but skips the backend compile, so a second run shows what the cache saved.
"""

from __future__ import annotations

import dataclasses

from jax import monitoring

PHASES = {  # JAX's event name -> our phase name
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


@dataclasses.dataclass
class CompileClock:
    """Use as `with CompileClock() as clock: ...`; then `clock.seconds` (all phases) and `clock.phases`
    (seconds per phase) and `clock.programs` (programs lowered, whether then compiled or read back from the
    persistent cache). Clocks may nest or overlap: each listens on its own."""

    phases: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES.values(), 0.0))
    programs: int = 0

    def _listen(self, event: str, duration: float, **_: object) -> None:
        phase = PHASES.get(event)
        if phase is not None:
            self.phases[phase] += duration
            self.programs += phase == "lower"

    def __enter__(self) -> "CompileClock":
        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc_info) -> None:
        monitoring.unregister_event_duration_listener(self._listen)

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


__all__ = ["CompileClock", "PHASES"]
