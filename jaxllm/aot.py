"""Ahead-of-time compilation: check a config fits before a run (MaxText-style dry run)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import state as state_lib
from jaxllm import steps as steps_lib
from jaxllm.config import Config

_PAIR_STAGES = ("dpo", "reward")


def batch_spec(config: Config, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch of the configured stage."""
    b = batch_size or config.train.batch_size
    t = config.data.seq_len
    row = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32, "loss_mask": jnp.float32}
    prefixes = ("chosen_", "rejected_") if config.train.stage in _PAIR_STAGES else ("",)
    spec = {p + k: jax.ShapeDtypeStruct((b, t), d) for p in prefixes for k, d in row.items()}
    if config.train.stage == "kto":
        spec["label"] = jax.ShapeDtypeStruct((b,), jnp.float32)
    return spec


def dry_run(config: Config, mesh=None) -> dict[str, Any]:
    """Lowers and compiles the stage's train step on abstract inputs; returns sizes, FLOPs and memory."""
    mesh = mesh or sharding_lib.make_mesh(config.mesh)
    graphdef, abstract_params = model_lib.abstract_model(config.model)
    heads = state_lib.head_names(config)
    if heads:
        abstract_params[model_lib.HEADS_KEY] = jax.eval_shape(lambda: state_lib.init_heads(config.model, heads, 0))
    optimizer = state_lib.make_optimizer(config.optimizer, config.train.steps)
    abstract_state = jax.eval_shape(lambda p: state_lib.create_state(p, optimizer, 0), abstract_params)
    shardings = state_lib.state_shardings(config, abstract_state, mesh)
    replicated = sharding_lib.replicated(mesh)
    needs_ref = steps_lib.needs_reference(config.train.stage)
    step_fn = steps_lib.build_train_step(config, graphdef, optimizer)
    ref = {k: v for k, v in abstract_params.items() if k != model_lib.HEADS_KEY} if needs_ref else None
    ref_shardings = ({k: v for k, v in shardings.params.items() if k != model_lib.HEADS_KEY}
                     if needs_ref else None)
    jitted = jax.jit(step_fn, in_shardings=(shardings, sharding_lib.batch_sharding(mesh), ref_shardings, replicated),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
    with jax.set_mesh(mesh):
        lowered = jitted.lower(abstract_state, batch_spec(config), ref, jax.ShapeDtypeStruct((), jnp.float32))
        compiled = lowered.compile()
    num_params = model_lib.count_params(abstract_params)
    report: dict[str, Any] = {
        "parameters": f"{num_params:,}",
        "flops_per_token": f"{model_lib.flops_per_token(config.model, config.data.seq_len):.4g}",
        "tokens_per_step": config.train.batch_size * config.data.seq_len,
        "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)),
        "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
    }
    memory = compiled.memory_analysis()
    if memory is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "generated_code_size_in_bytes"):
            value = getattr(memory, field, None)
            if value is not None:
                report[f"per_device_{field.replace('_in_bytes', '')}_MiB"] = round(value / 2**20, 2)
    return report
