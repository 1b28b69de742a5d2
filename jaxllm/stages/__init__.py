"""The training stages, one registered `Stage` per file (see base.py for what a stage declares).

    from jaxllm import stages
    stage = stages.get("dpo")                      # or stages.of(config): looked up and checked
    loss_fn = stage.loss(config, graphdef)         # (params, batch, reference_params) -> (sum, count, sums)
    iterator = stages.make_batch_iterator(config)  # batches in the stage's data format

Built in: pretrain, sft, dpo, kto, reward, rl, orpo, simpo. A new stage is one file that calls
`register(Stage(...))`, plus its import below.
"""

from __future__ import annotations

from typing import Any

from jaxllm import steps
from jaxllm.config import Config
from jaxllm.data import pipeline as data_pipeline
from jaxllm.stages.base import LossFn, RolloutHooks, Stage, get, names, of, register

# Each import registers its stage (the order is the order `names()` lists them in).
from jaxllm.stages import pretrain, sft, dpo, kto, reward, rl, orpo, simpo  # noqa: E402,F401  isort: skip


def loss_fn(config: Config, graphdef) -> LossFn:
    """The configured stage's loss with its settings bound."""
    return of(config).loss(config, graphdef)


def head_names(config: Config) -> tuple[str, ...]:
    """The scalar heads (reward / value) the configured stage adds to the model's params."""
    return get(config.train.stage).heads(config)


def build_train_step(config: Config, graphdef, optimizer):
    """The configured stage's (unjitted) train step: (state, batch, reference_params, loss_limit)."""
    return steps.build_train_step(config, graphdef, optimizer, loss_fn(config, graphdef))


def build_eval_step(config: Config, graphdef):
    return steps.build_eval_step(config, graphdef, loss_fn(config, graphdef))


def make_batch_iterator(config: Config, tokenizer=None, split: str = "train", process_index: int = 0,
                        process_count: int = 1, prefetch: int = 2):
    """`jaxllm.data.pipeline.make_batch_iterator` in the configured stage's data format."""
    return data_pipeline.make_batch_iterator(config, tokenizer, split, process_index, process_count, prefetch,
                                             data_format=get(config.train.stage).data_format)


def make_eval_batches(config: Config, tokenizer=None, num_batches: int | None = None, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, Any]]:
    """`jaxllm.data.pipeline.make_eval_batches` in the configured stage's data format."""
    return data_pipeline.make_eval_batches(config, tokenizer, num_batches, process_index, process_count,
                                           data_format=get(config.train.stage).data_format)


def build_rows(config: Config, tokenizer, split: str = "train", **kwargs):
    return data_pipeline.build_rows(config, tokenizer, split, data_format=get(config.train.stage).data_format,
                                    **kwargs)


def data_report(config: Config, tokenizer=None, split: str = "train") -> dict[str, Any]:
    return data_pipeline.data_report(config, tokenizer, split, data_format=get(config.train.stage).data_format)


def for_format(data_format: str) -> Stage:
    """The first registered stage that trains on `data_format` (e.g. chat -> sft)."""
    return next(stage for name in names() if (stage := get(name)).data_format == data_format)


def data_stats(source: str, config: Config, tokenizer=None, stage: str = "auto") -> dict[str, Any]:
    """What the data pipeline makes of `source` for a stage ("auto": the stage of the format its first
    record has, e.g. chosen/rejected fields -> dpo); see `jaxllm.data.pipeline.data_stats`."""
    chosen = for_format(data_pipeline.infer_format(source, config.data.text_field)) if stage == "auto" else get(stage)
    return data_pipeline.data_stats(source, config, tokenizer, data_format=chosen.data_format, stage=chosen.name)


__all__ = ["LossFn", "RolloutHooks", "Stage", "build_eval_step", "build_rows", "build_train_step", "data_report",
           "data_stats", "for_format", "get", "head_names", "loss_fn", "make_batch_iterator", "make_eval_batches", "names", "of", "register"]
