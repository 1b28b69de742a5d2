"""Ahead-of-time compilation: check a config fits before a run (MaxText-style dry run)."""

from __future__ import annotations

from typing import Any

import jax

from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import stages
from jaxllm import step_builder
from jaxllm import train as train_lib  # the pre-flight checks the run itself makes
from jaxllm.config import Config


def batch_spec(config: Config, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global update batch of the configured stage."""
    return stages.of(config).update_batch_spec(config, batch_size)


def dry_run(config: Config, mesh=None, tokenizer=None) -> dict[str, Any]:
    """Runs the real run's pre-flight checks (the stage's config checks, the batch against the mesh, the
    tokenizer against the vocabulary; pass `tokenizer=False` to skip loading one), then lowers and
    compiles the stage's train step on abstract inputs; returns sizes, FLOPs and memory."""
    stages.of(config)
    mesh = mesh or sharding_lib.make_mesh(config.mesh)
    train_lib.check_batch_fits_mesh(config, mesh)
    if tokenizer is None:
        train_lib.load_tokenizer(config)
    built = step_builder.build(config, mesh)
    compiled = built.lower().compile()
    num_params = model_lib.count_params(built.abstract_params)
    report: dict[str, Any] = {
        "stage": built.stage.name,
        "parameters": f"{num_params:,}",
        "flops_per_token": f"{model_lib.flops_per_token(config.model, config.data.seq_len):.4g}",
        "tokens_per_step": config.train.batch_size * config.data.seq_len,
        "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)),
        "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
    }
    if built.base_abstract is not None:
        report["frozen_base_parameters"] = f"{model_lib.count_params(built.base_abstract):,}"
    memory = compiled.memory_analysis()
    if memory is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "generated_code_size_in_bytes"):
            value = getattr(memory, field, None)
            if value is not None:
                report[f"per_device_{field.replace('_in_bytes', '')}_MiB"] = round(value / 2**20, 2)
    return report
