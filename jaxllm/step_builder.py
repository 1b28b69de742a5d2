"""The one place the compiled train and eval steps are built, for `jaxllm train`, `--dry-run` and `bench`.

    built = step_builder.build(config, mesh)
    train_step = built.jit_train_step()            # (state, batch, reference_params, loss_limit) -> (state, metrics)
    compiled = built.lower().compile()             # ahead of time, on abstract inputs (the dry run)

It resolves, once: the stage (jaxllm/stages/), the trained params' layout (the model's, or with LoRA
only the adapters) plus the stage's scalar heads, the optimizer, the state and its shardings, and the
layout of the frozen reference the step takes (the LoRA base, or for DPO/KTO/RL the model without heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import lora as lora_lib
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import state as state_lib
from jaxllm import stages as stages_lib
from jaxllm import steps as steps_lib
from jaxllm.config import Config


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

    @property
    def reference_shardings(self) -> Any:
        return None if self.reference_abstract is None else jax.tree.map(lambda a: a.sharding,
                                                                          self.reference_abstract)

    def jit_train_step(self, donate: bool = True):
        """The jitted step with the state donated (its buffers are reused for the new state)."""
        replicated = sharding_lib.replicated(self.mesh)
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
    return StepBuild(config, mesh, stage, graphdef, optimizer, heads, abstract_params, base_abstract, abstract_state,
                     shardings, reference, steps_lib.build_train_step(config, graphdef, optimizer, loss_fn),
                     steps_lib.build_eval_step(config, forward_graphdef, eval_loss), forward_graphdef)
