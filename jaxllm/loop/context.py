"""RunContext: everything the loop and its hooks run on, built once by `jaxllm.train.setup`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jaxllm import checkpoint as ckpt
from jaxllm import state as state_lib
from jaxllm import step_builder
from jaxllm.config import Config
from jaxllm.files import WorkdirLock


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


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract arrays (shape, dtype) placed with `shardings`: what a restore or a jitted init fills."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def release(manager, lock: WorkdirLock | None) -> None:
    """Shuts the checkpoint manager down (its background threads would otherwise keep a failed process
    alive for minutes) and releases the workdir lock. Safe to call twice."""
    try:
        ckpt.shut_down(manager)
    finally:
        if lock is not None:
            lock.release()


def jit_step(context: RunContext, step_fn):
    """`step_fn` (e.g. the stage's, or one built with another loss) jitted like the run's step. Row groups split
    the built step's own loss: another step_fn runs as one program."""
    built = context.built
    if step_fn is not built.train_step:
        built = dataclasses.replace(built, train_step=step_fn, row_groups=1)
    return built.jit_train_step()
