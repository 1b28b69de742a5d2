"""The one place the compiled train and eval steps are built, for `jaxllm train`, `--dry-run` and `bench`.

    built = step_builder.build(config, mesh)
    train_step = built.jit_train_step()            # (state, batch, reference_params, loss_limit) -> (state, metrics)
    compiled = built.lower().compile()             # ahead of time, on abstract inputs (the dry run)

It resolves, once: the stage (jaxllm/stages/), the trained params' layout (the model's, or with LoRA
only the adapters) plus the stage's scalar heads, the optimizer, the state and its shardings, the
layout of the frozen reference the step takes (the LoRA base, or for DPO/KTO/RL the model without heads),
and the step's row groups: on one CPU device the batch's rows split into one group per core, whose
gradients run side by side on host threads before one update program sums them (`RowGroupedStep`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import lora as lora_lib
from jaxllm import model as model_lib
from jaxllm import row_groups as row_groups_lib
from jaxllm import sharding as sharding_lib
from jaxllm import state as state_lib
from jaxllm import stages as stages_lib
from jaxllm import steps as steps_lib
from jaxllm.config import Config
from jaxllm.errors import ConfigError


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def without_heads(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != model_lib.HEADS_KEY}


@dataclasses.dataclass
class StepBuild:
    """Everything about a configured stage's step that does not depend on the values of the params."""

    config: Config
    mesh: jax.sharding.Mesh
    stage: stages_lib.Stage
    graphdef: Any
    optimizer: Any
    heads: tuple[str, ...]
    abstract_params: dict  # the trained params: model (or LoRA adapters) + heads
    base_abstract: dict | None  # LoRA: the frozen base model
    abstract_state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    reference_abstract: Any  # ShapeDtypeStructs with shardings of the step's reference_params, or None
    train_step: Any  # unjitted (state, batch, reference_params, loss_limit) -> (state, metrics)
    eval_step: Any  # unjitted (params, batch, reference_params) -> metric sums
    forward_graphdef: Any  # the graphdef of forward-only programs (`model.forward_config`: scanned layers)
    loss_fn: Any = None  # the train step's loss (params, batch, reference_params) -> (loss sum, denominator, sums)
    row_groups: int = 1  # > 1: the train step runs as a RowGroupedStep (`train_row_groups`)

    @property
    def reference_shardings(self) -> Any:
        return None if self.reference_abstract is None else jax.tree.map(lambda a: a.sharding,
                                                                          self.reference_abstract)

    def jit_train_step(self, donate: bool = True):
        """The jitted step with the state donated (its buffers are reused for the new state); with row
        groups, a `RowGroupedStep` called (and lowered) the same way."""
        replicated = sharding_lib.replicated(self.mesh)
        if self.row_groups > 1:
            gradients = jax.jit(functools.partial(steps_lib.accumulate_gradients, self.loss_fn,
                                                  micro_batches=self.config.train.grad_accum_steps))
            # The state is not donated: where the update is skipped the step returns it (`RowGroupedStep`); the
            # groups' gradients are, and their buffers take the new state.
            update = jax.jit(functools.partial(_update_with_values, self.config.optimizer, self.config.train.steps),
                             out_shardings=(self.state_shardings, replicated, replicated),
                             donate_argnums=(1,) if donate else ())
            values = jax.device_put({k: np.float32(v) for k, v in state_lib.optimizer_values(
                self.config.optimizer, self.config.train.steps).items()}, replicated)
            return RowGroupedStep(gradients, update, jax.jit(_summarize_parts), self.row_groups, values, self.mesh)
        return jax.jit(self.train_step,
                       in_shardings=(self.state_shardings, sharding_lib.batch_sharding(self.mesh),
                                     self.reference_shardings, replicated),
                       out_shardings=(self.state_shardings, replicated), donate_argnums=(0,) if donate else ())

    def jit_eval_step(self):
        return jax.jit(self.eval_step)

    def lower(self, batch_size: int | None = None):
        """The train step lowered on abstract inputs (no arrays are allocated): `.compile()` it to check
        that the config compiles and fits, and read its memory and cost analyses."""
        batch = self.stage.update_batch_spec(self.config, batch_size)
        with jax.set_mesh(self.mesh):
            return self.jit_train_step().lower(_with_shardings(self.abstract_state, self.state_shardings), batch,
                                               self.reference_abstract, jax.ShapeDtypeStruct((), jnp.float32))


def _leading_rows(batch: dict) -> int:
    return next(value.shape[0] for value in batch.values() if np.ndim(value))


def _update_with_values(optimizer_config, total_steps: int, state, grads: list, losses: list, loss_limit,
                        optimizer_values: dict):
    """`steps.propose_update` on row groups' parts with the optimizer's numbers as inputs: the program is the
    same for every stage with the same params, optimizer kind, betas and epsilon (pretraining, SFT and DPO
    of the default pipeline compile it once; the persistent cache serves the rest)."""
    optimizer = state_lib.make_optimizer(optimizer_config, total_steps, values=optimizer_values)
    return steps_lib.propose_update(state, grads, [loss for loss, _ in losses], [den for _, den in losses],
                                    loss_limit, optimizer=optimizer)


def _summarize_parts(parts: list) -> dict:
    """Row groups' (loss sum, denominator, metric sums) -> the step's loss metrics (`steps.summarize`)."""
    return steps_lib.summarize(*steps_lib.sum_parts(parts))


@dataclasses.dataclass
class RowGroupedStep:
    """The train step `(state, batch, reference_params, loss_limit) -> (state, metrics)` as one gradient
    program per group of the batch's rows, run side by side on host threads (`jaxllm.row_groups`), then one
    update program that sums their gradients in group order (`steps.propose_update`, the optimizer's numbers
    as inputs: `state.optimizer_values`) and a small program that sums their loss metrics (`steps.summarize`).
    The skip is decided here, on the host: the step returns the update program's state where it is ok, else
    the state it was given (one step further), instead of a select over the whole state inside the program
    (a second pass over params and optimizer state: 15.3 -> 7.9 ms at d256 x 4 layers). The same update
    as the one-program step up to the order of the float sums; `lower(...).compile()` compiles all three
    programs."""

    gradients: Any  # jitted or compiled (params, a group's batch, reference_params) -> accumulate_gradients' sums
    update: Any  # jitted or compiled (state, [grads], [(loss sum, denominator)], loss_limit, values)
    #              -> (updated state, ok, metrics)
    metrics: Any  # jitted or compiled [(loss sum, denominator, metric sums)] -> metrics
    groups: int
    optimizer_values: dict  # [] float32 arrays: `state.optimizer_values`
    mesh: jax.sharding.Mesh | None = None

    def __call__(self, state, batch, reference_params, loss_limit):
        rows = _leading_rows(batch) // self.groups

        def part(group: int):  # the group's rows sliced out here: slicing inside the program was 10% slower
            rows_of_group = {k: v[group * rows:(group + 1) * rows] if np.ndim(v) else v for k, v in batch.items()}
            return jax.block_until_ready(self.gradients(state.params, rows_of_group, reference_params))

        parts = row_groups_lib.map_row_groups(part, self.groups, self.mesh)
        loss_metrics = self.metrics([part[:3] for part in parts])
        candidate, ok, update_metrics = self.update(state, [part[3] for part in parts], [part[:2] for part in parts],
                                                    loss_limit, self.optimizer_values)
        new_state = candidate if bool(ok) else state.replace(step=candidate.step)
        return new_state, {**loss_metrics, **update_metrics}

    def memory_analysis(self):
        """After compile(): the update program's arguments, outputs and aliases (the state and every group's
        part) plus the temporaries of the gradient programs running at once and of the update."""
        gradients, update = self.gradients.memory_analysis(), self.update.memory_analysis()
        if gradients is None or update is None:
            return None
        return types.SimpleNamespace(
            argument_size_in_bytes=update.argument_size_in_bytes, output_size_in_bytes=update.output_size_in_bytes,
            alias_size_in_bytes=update.alias_size_in_bytes,
            temp_size_in_bytes=self.groups * gradients.temp_size_in_bytes + update.temp_size_in_bytes)

    def cost_analysis(self) -> dict:
        """After compile(): XLA's flops of every gradient program and the update."""
        def flops(compiled) -> float:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return float((cost or {}).get("flops", 0.0))
        return {"flops": self.groups * flops(self.gradients) + flops(self.update)}

    def lower(self, state, batch, reference_params, loss_limit) -> "_LoweredRowGroupedStep":
        rows = _leading_rows(batch) // self.groups
        group_batch = {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype) if np.ndim(v) else v
                       for k, v in batch.items()}
        part = jax.eval_shape(self.gradients, state.params, group_batch, reference_params)
        return _LoweredRowGroupedStep(
            self, self.gradients.lower(state.params, group_batch, reference_params),
            self.update.lower(state, [part[3]] * self.groups, [part[:2]] * self.groups, loss_limit,
                              self.optimizer_values),
            self.metrics.lower([part[:3]] * self.groups))


@dataclasses.dataclass
class _LoweredRowGroupedStep:
    step: RowGroupedStep
    gradients: Any
    update: Any
    metrics: Any

    def compile(self) -> RowGroupedStep:
        return dataclasses.replace(self.step, gradients=self.gradients.compile(), update=self.update.compile(),
                                   metrics=self.metrics.compile())


# The default's limits: measured on 2 cores only (+3 to +19% at d256 x 4 layers); every group holds a gradient
# of all trained params until the update sums them.
MAX_AUTO_ROW_GROUPS = 8
MAX_AUTO_GRADIENT_BYTES = 4 << 30


def train_row_groups(config: Config, mesh: jax.sharding.Mesh, stage: stages_lib.Stage,
                     gradient_bytes: int = 0) -> int:
    """The train step's row groups: `train.row_groups`, where 0 (the default) is one group per CPU core on a
    model held by one CPU device, for stages whose loss is a sum over rows (at most MAX_AUTO_ROW_GROUPS, and
    as many as keep the groups' gradients, `gradient_bytes` each, within MAX_AUTO_GRADIENT_BYTES); 1
    elsewhere."""
    asked, rows, micro = config.train.row_groups, config.train.batch_size, config.train.grad_accum_steps
    if asked == 0:
        if not stage.rows_independent:
            return 1
        most = min(MAX_AUTO_ROW_GROUPS, MAX_AUTO_GRADIENT_BYTES // max(gradient_bytes, 1))
        return row_groups_lib.cpu_row_groups(rows, mesh, multiple=micro, most=max(most, 1))
    if asked > 1:
        if not stage.rows_independent:
            raise ConfigError(f"train.row_groups={asked}: the {stage.name} loss is not a sum over rows (it uses "
                              "statistics of the whole batch); set train.row_groups to 0 or 1")
        if not row_groups_lib.on_one_cpu_device(mesh):
            raise ConfigError(f"train.row_groups={asked} splits the batch over host threads on one CPU device; "
                              "this run's mesh spreads it over devices already: set train.row_groups to 0 or 1")
        if rows % (asked * micro):
            raise ConfigError(f"train.row_groups={asked} x train.grad_accum_steps={micro} must divide "
                              f"train.batch_size={rows}")
    return asked


def build(config: Config, mesh: jax.sharding.Mesh, loss_fn: stages_lib.LossFn | None = None) -> StepBuild:
    """The step plan of `config.train.stage` on `mesh` (`loss_fn` replaces the stage's loss, e.g. in tests).
    The stage's own config checks are the caller's (`jaxllm.stages.of(config)`: train and the dry run)."""
    stage = stages_lib.get(config.train.stage)
    graphdef, abstract_params = model_lib.abstract_model(config.model)
    base_abstract = None
    if config.model.lora_rank:  # LoRA: the state trains only the adapters; the frozen base is the reference
        base_abstract, abstract_params = lora_lib.split(abstract_params)
    heads = stage.heads(config)
    if heads:
        abstract_params[model_lib.HEADS_KEY] = jax.eval_shape(lambda: state_lib.init_heads(config.model, heads, 0))
    optimizer = state_lib.make_optimizer(config.optimizer, config.train.steps)
    abstract_state = jax.eval_shape(lambda p: state_lib.create_state(p, optimizer, config.train.seed), abstract_params)
    shardings = state_lib.state_shardings(config, abstract_state, mesh)
    if base_abstract is not None:
        base_axes = lora_lib.split(model_lib.logical_axes(config.model))[0]
        reference = _with_shardings(base_abstract, sharding_lib.tree_shardings(base_abstract, base_axes, mesh))
    elif stage.needs_reference:
        reference = _with_shardings(without_heads(abstract_params), without_heads(shardings.params))
    else:
        reference = None
    forward_graphdef = model_lib.abstract_model(model_lib.forward_config(config.model))[0]
    # The eval step runs the stage's loss without a gradient: on the forward graphdef, unless the caller
    # passed its own loss (bound to its own graphdef).
    eval_loss = loss_fn or stage.loss(config, forward_graphdef)
    loss_fn = loss_fn or stage.loss(config, graphdef)
    train_step = steps_lib.build_train_step(config, graphdef, optimizer, loss_fn)
    return StepBuild(config, mesh, stage, graphdef, optimizer, heads, abstract_params, base_abstract, abstract_state,
                     shardings, reference, train_step, steps_lib.build_eval_step(config, forward_graphdef, eval_loss),
                     forward_graphdef, steps_lib.build_train_loss(config, graphdef, loss_fn),
                     train_row_groups(config, mesh, stage, model_lib.param_bytes(abstract_params)))
