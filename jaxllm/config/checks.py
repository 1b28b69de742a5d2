"""Checks of a config: every setting's range (every int has a minimum, 0 unless listed; every float must
be finite and within its range) and the cross-field rules a dataclass type cannot express."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxllm import settings
from jaxllm.config.schema import Config
from jaxllm.errors import ConfigError

INT_MINIMUMS: dict[str, int] = {
    "model.vocab_size": 0, "model.d_model": 1,  # vocab_size 0: from the tokenizer (load_config)
    "model.num_layers": 1, "model.num_heads": 1, "model.num_kv_heads": 1,
    "model.max_seq_len": 1, "model.attention_block_size": 1, "data.seq_len": 1,
    "train.steps": 1, "train.batch_size": 1, "train.grad_accum_steps": 1, "train.row_groups": 0, "train.log_every": 1,
    "train.checkpoint_every": 1, "train.keep_checkpoints": 1,  # keep >= 1: the newest checkpoint is never deleted
    "mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1,  # mesh.data=-1: every remaining device
    "rl.group_size": 1, "rl.prompts_per_step": 1, "rl.max_new_tokens": 1, "rl.updates_per_batch": 1,
}

# (low, high, low inclusive, high inclusive); None = unbounded. Unlisted floats only need to be finite.
FLOAT_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "optimizer.learning_rate": (0.0, None, True, False), "optimizer.min_lr_ratio": (0.0, 1.0, True, True),
    "optimizer.weight_decay": (0.0, None, True, False), "optimizer.beta1": (0.0, 1.0, True, False),
    "optimizer.beta2": (0.0, 1.0, True, False), "optimizer.eps": (0.0, None, True, False),
    "optimizer.grad_clip_norm": (0.0, None, True, False),
    "model.rope_theta": (0.0, None, False, False), "model.rms_norm_eps": (0.0, None, True, False),
    "model.init_std": (0.0, None, True, False), "model.attention_scale": (0.0, None, True, False),
    "model.final_logit_softcap": (0.0, None, True, False), "model.rope_scaling_factor": (0.0, None, False, False),
    "train.z_loss": (0.0, None, True, False), "train.spike_factor": (0.0, None, True, False),
    "feedback.beta": (0.0, None, False, False), "feedback.label_smoothing": (0.0, 0.5, True, True),
    "feedback.rpo_alpha": (0.0, None, True, False), "feedback.margin": (0.0, None, True, False),
    "feedback.desirable_weight": (0.0, None, True, False), "feedback.undesirable_weight": (0.0, None, True, False),
    "rl.temperature": (0.0, None, True, False), "rl.top_p": (0.0, 1.0, False, True),
    "rl.clip_epsilon": (0.0, None, True, False), "rl.kl_coef": (0.0, None, True, False),
    "rl.gae_lambda": (0.0, 1.0, True, True), "rl.gamma": (0.0, 1.0, True, True), "rl.value_coef": (0.0, None, True, False),
}


def _describe_range(low, high, low_inclusive, high_inclusive) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    return " and ".join(parts) if parts else "finite"


def _in_range(value: float, low, high, low_inclusive, high_inclusive) -> bool:
    if low is not None and (value < low or (value == low and not low_inclusive)):
        return False
    return high is None or value < high or (value == high and high_inclusive)


def iter_settings(config: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, value, annotation) of every leaf setting, sections in declaration order."""
    out = []
    for section in dataclasses.fields(config):
        sub = getattr(config, section.name)
        for field in dataclasses.fields(sub):
            out.append((f"{section.name}.{field.name}", getattr(sub, field.name), field.type))
    return out


def check_ranges(config: Config) -> None:
    """Every int >= its minimum (INT_MINIMUMS, else 0); every float finite and in FLOAT_RANGES. The error
    names the key, the value and the allowed range."""
    for key, value, annotation in iter_settings(config):
        if annotation in ("int", int):
            minimum = INT_MINIMUMS.get(key, 0)
            if value < minimum:
                raise ConfigError(f"{key}={value} is out of range: it must be an integer >= {minimum}")
        elif annotation in ("float", float):
            low, high, low_inclusive, high_inclusive = FLOAT_RANGES.get(key, (None, None, True, True))
            allowed = _describe_range(low, high, low_inclusive, high_inclusive)
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value} is not a finite number; it must be {allowed}")
            if not _in_range(value, low, high, low_inclusive, high_inclusive):
                raise ConfigError(f"{key}={value:g} is out of range: it must be {allowed}")


def validate(config: Config) -> None:
    """Every setting's range (first: the cross-field checks divide by some), then cross-field checks that a
    dataclass type cannot express."""
    check_ranges(config)
    m = config.model
    if m.d_model % m.num_heads and not m.head_dim:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
                          "set model.head_dim or change the sizes")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")
    settings.check_choices(config)
    if m.loss_chunk_size < 0 or m.attention_block_size < 1:
        raise ConfigError(f"model.loss_chunk_size={m.loss_chunk_size} must be >= 0 (0 = unfused) and "
                          f"model.attention_block_size={m.attention_block_size} >= 1")
    if m.final_logit_softcap > 0 and m.loss_chunk_size:
        raise ConfigError(f"model.final_logit_softcap={m.final_logit_softcap} is applied by the model's logits, which "
                          "the fused loss (model.loss_chunk_size > 0) bypasses; set model.loss_chunk_size=0")
    if m.lora_rank < 0 or (m.lora_rank and m.lora_alpha <= 0):
        raise ConfigError(f"model.lora_rank={m.lora_rank} must be >= 0 (0 = no LoRA) and model.lora_alpha="
                          f"{m.lora_alpha} > 0")
    if m.lora_rank:
        targets = [t.strip() for t in m.lora_targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in ("q", "k", "v", "o", "gate", "up", "down")]
        if unknown or not targets:
            raise ConfigError(f"model.lora_targets='{m.lora_targets}' must be a comma-separated subset of "
                              "q,k,v,o,gate,up,down" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        if not config.train.init_from:
            raise ConfigError("model.lora_rank > 0 trains adapters on a frozen base model: set train.init_from to "
                              "the base (a workdir, e.g. one written by `jaxllm convert from-hf`)")
    if config.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if config.train.batch_size % config.train.grad_accum_steps:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be divisible by "
                          f"train.grad_accum_steps={config.train.grad_accum_steps}")
