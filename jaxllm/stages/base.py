"""What a stage is, and the registry that names them.

A stage is one `Stage` object, defined and registered in its own file under jaxllm/stages/: the data
format it trains on, its loss, whether it needs the frozen reference model, the scalar heads it adds,
its config checks and, for on-policy stages, the rollout hooks the loop calls before each update.
Everything else (data, steps, state, the dry run, the loop) looks the stage up here and never
branches on its name. Adding a stage is one new file plus one import line in `jaxllm/stages/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from jaxllm import settings
from jaxllm.config import Config, ConfigError
from jaxllm.data.examples import DATA_FORMATS, batch_spec as format_batch_spec

# (params, batch, reference_params) -> (loss_sum, denominator, metric sums); see jaxllm/steps.py
LossFn = Callable[[Any, dict, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def _no_heads(config: Config) -> tuple[str, ...]:
    return ()


def _no_checks(config: Config) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything the rest of jaxllm needs to know about one training stage.

    loss(config, graphdef) -> LossFn binds the stage's settings. batch_spec(config, batch_size), when
    given, describes the update batch for stages whose batches are not packed rows of their data format
    (on-policy RL builds them from rollouts). validate(config, **options) raises ConfigError for settings
    the stage cannot train with. rollouts(context, batch_iterator, log, **options) ->
    RolloutHooks makes the on-policy loop's hooks; None for stages that train on fixed data.
    rows_independent: the loss is a sum over the batch's rows (no statistic of the whole batch), so the
    rows may be split into groups whose gradients are summed (row groups, micro-batches)."""

    name: str
    summary: str
    data_format: str
    loss: Callable[[Config, Any], LossFn]
    needs_reference: bool = False
    heads: Callable[[Config], tuple[str, ...]] = _no_heads
    validate: Callable[..., None] = _no_checks  # (config, **rollout options) -> None; raises ConfigError
    batch_spec: Callable[[Config, int], dict[str, jax.ShapeDtypeStruct]] | None = None
    rollouts: Callable[..., "RolloutHooks"] | None = None
    rows_independent: bool = True

    def __post_init__(self):
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"stage {self.name}: data_format '{self.data_format}' is not one of "
                             f"{', '.join(DATA_FORMATS)}")

    def update_batch_spec(self, config: Config, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global update batch (what the compiled step is lowered with)."""
        batch_size = batch_size or config.train.batch_size
        if self.batch_spec is not None:
            return self.batch_spec(config, batch_size)
        return format_batch_spec(self.data_format, batch_size, config.data.seq_len)


@dataclasses.dataclass
class RolloutHooks:
    """An on-policy stage's part of the loop: `batches` yields prompt batches (resumable),
    `prepare(context, prompt_batch) -> (update batch, extra metrics)` samples and scores answers with
    the current params, `evaluate(context) -> metrics` replaces the batch evaluation, `finish(context)` runs
    after the loop."""

    batches: Any
    prepare: Callable[[Any, dict], tuple[dict, dict]]
    evaluate: Callable[[Any], dict[str, float]]
    finish: Callable[[Any], None] | None = None  # after the loop (e.g. a summary line)


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Adds a stage under its name (a second stage of the same name is an error)."""
    if stage.name in _REGISTRY and _REGISTRY[stage.name] is not stage:
        raise ValueError(f"a stage named '{stage.name}' is already registered")
    _REGISTRY[stage.name] = stage
    return stage


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Stage:
    """The registered stage `name`; an unknown name is a ConfigError naming the closest one."""
    if name not in _REGISTRY:
        raise ConfigError(f"train.stage='{name}' is not one of {', '.join(_REGISTRY)}"
                          f"{settings.closest(name, _REGISTRY)}")
    return _REGISTRY[name]


def of(config: Config, **options) -> Stage:
    """The stage `config.train.stage` names, after its own config checks (`options`: an on-policy stage's
    rollout options, which its checks may need, e.g. rl's extra reward functions)."""
    stage = get(config.train.stage)
    if options and stage.rollouts is None:
        raise TypeError(f"stage {stage.name} takes no options (got {', '.join(options)})")
    stage.validate(config, **options)
    return stage
