"""Resuming with another config: which changes are refused, which bend the schedule, which are silent."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.config.checks import iter_settings
from jaxllm.config.schema import Config

# A change here makes the checkpoint another run: the params' shapes or meaning, the tokens, the data
# order or the stage's objective would differ. Resuming is refused.
RESUME_INCOMPATIBLE_SECTIONS = ("model", "data")
RESUME_INCOMPATIBLE_KEYS = {"train.stage", "train.seed", "train.batch_size", "train.init_from"}
# A change here only changes how the same computation is run or recorded: silent.
RESUME_FREE_KEYS = {
    "data.allow_change", "model.attention", "model.attention_block_size", "model.loss_chunk_size", "model.remat",
    "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
    "train.best_metric", "train.best_mode", "train.async_checkpointing", "train.tensorboard", "train.progress",
    "train.grad_accum_steps", "train.row_groups", "train.max_bad_steps_in_a_row", "train.rollback_on_halt",
}
RESUME_FREE_SECTIONS = ("mesh",)  # checkpoints restore onto any mesh
# The learning-rate schedule is a function of (these settings, step): a change bends it at the resume step.
SCHEDULE_KEYS = {"train.steps", "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.schedule",
                 "optimizer.min_lr_ratio"}


@dataclasses.dataclass
class ConfigChanges:
    """Differences between a checkpoint's saved config and this run's: (key, saved value, new value)."""

    incompatible: list[tuple[str, Any, Any]]
    schedule: list[tuple[str, Any, Any]]
    other: list[tuple[str, Any, Any]]


def compare_for_resume(saved: dict[str, Any], config: Config) -> ConfigChanges:
    """Classifies every setting that differs from the saved config (a `to_dict` of the checkpoint's run).
    Keys the saved config lacks (written before the key existed) are not compared."""
    changes = ConfigChanges([], [], [])
    for key, value, _ in iter_settings(config):
        section, name = key.split(".", 1)
        saved_section = saved.get(section) if isinstance(saved, dict) else None
        if not isinstance(saved_section, dict) or name not in saved_section:
            continue
        old = saved_section[name]
        if old == value or key in RESUME_FREE_KEYS or section in RESUME_FREE_SECTIONS:
            continue
        if section in RESUME_INCOMPATIBLE_SECTIONS or key in RESUME_INCOMPATIBLE_KEYS:
            changes.incompatible.append((key, old, value))
        elif key in SCHEDULE_KEYS:
            changes.schedule.append((key, old, value))
        else:
            changes.other.append((key, old, value))
    return changes
