"""Typed configuration: small nested dataclasses, YAML recipes, `key.sub=value` overrides.

A recipe is a YAML file whose keys mirror `Config`. Unknown keys and wrong types are errors that
name the key (and the closest valid one). Model sizes come from presets (`model.preset: tiny`)
whose fields any explicit key overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message says which key and what to do."""


@dataclasses.dataclass(unsafe_hash=True)  # hashable: it is static inside the model's graph definition
class ModelConfig:
    preset: str = ""
    vocab_size: int = 512
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 = d_model // num_heads
    d_ff: int = 0  # 0 = SwiGLU default: 8/3 * d_model rounded up to a multiple of 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "auto"  # auto | xla | blockwise | cudnn | reference
    attention_block_size: int = 128  # query/key block for the blockwise implementation
    loss_chunk_size: int = 0  # >0: fused lm head + cross-entropy over this many positions at a time (no [B,T,V] logits)
    remat: str = "none"  # none | full | dots
    scan_layers: bool = True
    init_std: float = 0.02
    # Architecture variants of open models (jaxllm.convert); every default is the plain Llama above.
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2, Llama attention_bias)
    attention_out_bias: bool = False  # a bias on the output projection (Llama attention_bias)
    qk_norm: bool = False  # RMSNorm of every query/key head before the rotation (Qwen3)
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + scale), scales start at 0 (Gemma)
    post_norms: bool = False  # RMSNorm also on the attention and MLP outputs (Gemma 2)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    mlp_activation: str = "silu"  # silu | gelu_tanh | gelu: the gate of the gated MLP
    attention_scale: float = 0.0  # attention logit scale; 0 = head_dim ** -0.5
    final_logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2)
    rope_scaling: str = "none"  # none | linear | llama3 | yarn
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int = 0  # llama3 / yarn: the context length the model was pretrained with
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0 = 0.1 * ln(factor) + 1
    # LoRA (jaxllm.lora): rank > 0 trains low-rank adapters only, on the frozen base of train.init_from.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
    lora_targets: str = "q,k,v,o,gate,up,down"  # comma-separated projections that get adapters

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff:
            return self.d_ff
        hidden = int(8 * self.d_model / 3)
        return 32 * ((hidden + 31) // 32)


# Llama-style presets; the numbers are the user's dial (nanochat-style: width/depth derive the rest).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "micro": dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128),
    "tiny": dict(vocab_size=512, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=256),
    "small": dict(vocab_size=8192, d_model=256, num_layers=6, num_heads=8, num_kv_heads=4, max_seq_len=512),
    "25m": dict(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, max_seq_len=512),
    "125m": dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, max_seq_len=2048),
    "350m": dict(vocab_size=32000, d_model=1024, num_layers=24, num_heads=16, num_kv_heads=8, max_seq_len=2048),
    "1b": dict(vocab_size=32000, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, max_seq_len=2048,
               tie_embeddings=False),
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=11008,
               max_seq_len=4096, tie_embeddings=False),
}


@dataclasses.dataclass
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0


@dataclasses.dataclass
class DataConfig:
    # Sources: "default:<set>" (embedded data), "text:PATH", "jsonl:PATH", "tfds:NAME/CONFIG:SPLIT".
    source: str = "default:pretrain"
    eval_source: str = ""
    tokenizer: str = "default"  # "default" (embedded) or a directory holding tokenizer.model
    text_field: str = "text"
    seq_len: int = 128
    pack: bool = True
    # Pretraining: the documents packed in a row attend to each other (one BOS/EOS-separated stream, as
    # GPT-2 trains) instead of each being isolated; a document then starts in varied contexts.
    join_documents: bool = False
    sft_mode: str = "normal"  # normal | response_only | all_tokens
    truncation: str = "truncate"  # truncate | drop
    on_bad_record: str = "fail"  # fail | skip
    shuffle: bool = True


@dataclasses.dataclass
class FeedbackConfig:
    """Preference / binary-feedback losses (DPO family, KTO) and the reward model."""

    loss: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0  # DPO + rpo_alpha x NLL of the chosen answer per token (RPO; TRL, Llama 3); 0 = plain DPO
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0  # KTO


@dataclasses.dataclass
class RLConfig:
    """On-policy policy-gradient stage (REINFORCE/RLOO/PPO/GRPO)."""

    algorithm: str = "grpo"  # reinforce | rloo | grpo | ppo
    reward: str = "exact_match"  # a registered reward function, "reward_model", or "self_judge"
    reward_model: str = ""  # workdir of a trained reward model (reward: reward_model)
    group_size: int = 4
    prompts_per_step: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    clip_epsilon: float = 0.2
    kl_coef: float = 0.02
    updates_per_batch: int = 1
    gae_lambda: float = 0.95
    gamma: float = 1.0
    value_coef: float = 0.5
    policy_loss: str = "clipped"  # a registered policy loss (jaxllm.losses.POLICY_LOSSES)
    judge_template: str = ""  # self_judge prompt with {question} {answer} {reference}; "" = jaxllm.rl's default


@dataclasses.dataclass
class TrainConfig:
    stage: str = "pretrain"  # pretrain | sft | dpo | kto | reward | rl
    steps: int = 100
    batch_size: int = 16  # global, in sequences (pairs for DPO)
    grad_accum_steps: int = 1
    seed: int = 0
    init_from: str = ""  # workdir (or checkpoint dir) of an earlier stage: params only
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    best_metric: str = ""  # an eval metric (e.g. "loss"): also keep the best checkpoint in WORKDIR/best
    best_mode: str = "min"  # min | max
    async_checkpointing: bool = True
    z_loss: float = 0.0
    max_bad_steps_in_a_row: int = 5
    spike_factor: float = 0.0  # >0: skip updates whose loss exceeds factor x running median
    rollback_on_halt: bool = False  # at max_bad_steps_in_a_row: restore the newest checkpoint older than the bad run
    tensorboard: bool = True  # also write TensorBoard event files (tensorboardX; it imports torch when installed)
    progress: bool = True


@dataclasses.dataclass
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    num_devices: int = 0  # 0 = every device; N = only the first N (debugging, tests)
    distributed: bool = False  # call jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    feedback: FeedbackConfig = dataclasses.field(default_factory=FeedbackConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)


# ----------------------------------------------------------------------------------------------
# Building configs from dicts, YAML files and overrides.

_TOP_LEVEL_ALIASES = {"init_from": "train.init_from", "stage": "train.stage", "steps": "train.steps"}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
            if number.is_integer():
                return int(number)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {annotation!r}")


def _update_dataclass(obj: Any, updates: dict[str, Any], prefix: str, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        where = f"{source}: '{prefix}{key}'"
        if key not in fields:
            raise ConfigError(f"{where} is not a known key{_closest(key, list(fields))}; "
                              f"valid keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} is a section; give it a mapping, not {value!r}")
            _update_dataclass(current, value, f"{prefix}{key}.", source)
        else:
            setattr(obj, key, _coerce(value, fields[key].type, where))


def _apply_model_preset(config: Config, explicit_model_keys: set[str]) -> None:
    preset = config.model.preset
    if not preset:
        return
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset '{preset}' is unknown{_closest(preset, list(MODEL_PRESETS))}; "
                          f"choose one of {', '.join(MODEL_PRESETS)}")
    for key, value in MODEL_PRESETS[preset].items():
        if key not in explicit_model_keys:
            setattr(config.model, key, value)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    key = _TOP_LEVEL_ALIASES.get(key, key)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Builds a Config from an optional YAML recipe, a dict and `key.sub=value` overrides (in that order)."""
    config = Config()
    explicit_model: set[str] = set()
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("config dict", base))
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"recipe file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        layers.append((str(path), loaded))
    if overrides:
        layers.append(("command line", _nest(dict(parse_override(o) for o in overrides))))
    for source, layer in layers:
        for key, value in layer.items():
            key = _TOP_LEVEL_ALIASES.get(key, key)
            if "." in key:
                layer_value = _nest({key: value})
                key, value = next(iter(layer_value.items()))
            if key == "model" and isinstance(value, dict):
                explicit_model.update(k for k in value if k != "preset")
            _update_dataclass(config, {key: value}, "", source)
    _apply_model_preset(config, explicit_model)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that a dataclass type cannot express."""
    m = config.model
    if m.d_model % m.num_heads and not m.head_dim:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
                          "set model.head_dim or change the sizes")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")
    choices = {
        "model.attention": (m.attention, ("auto", "xla", "blockwise", "cudnn", "reference")),
        "model.remat": (m.remat, ("none", "full", "dots")),
        "model.dtype": (m.dtype, ("float32", "bfloat16", "float16")),
        "model.param_dtype": (m.param_dtype, ("float32", "bfloat16")),
        "optimizer.schedule": (config.optimizer.schedule, ("cosine", "linear", "constant")),
        "train.stage": (config.train.stage, ("pretrain", "sft", "dpo", "kto", "reward", "rl")),
        "data.sft_mode": (config.data.sft_mode, ("normal", "response_only", "all_tokens")),
        "data.truncation": (config.data.truncation, ("truncate", "drop")),
        "data.on_bad_record": (config.data.on_bad_record, ("fail", "skip")),
        "feedback.loss": (config.feedback.loss, ("sigmoid", "ipo", "hinge")),
        "train.best_mode": (config.train.best_mode, ("min", "max")),
        "model.mlp_activation": (m.mlp_activation, ("silu", "gelu_tanh", "gelu")),
        "model.rope_scaling": (m.rope_scaling, ("none", "linear", "llama3", "yarn")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}='{value}' is not one of {', '.join(allowed)}{_closest(value, list(allowed))}")
    if m.loss_chunk_size < 0 or m.attention_block_size < 1:
        raise ConfigError(f"model.loss_chunk_size={m.loss_chunk_size} must be >= 0 (0 = unfused) and "
                          f"model.attention_block_size={m.attention_block_size} >= 1")
    if m.final_logit_softcap > 0 and (m.loss_chunk_size or config.train.stage == "rl"):
        raise ConfigError(f"model.final_logit_softcap={m.final_logit_softcap} is applied by the model's logits, which "
                          "the fused loss (model.loss_chunk_size > 0) and the rl stage bypass; set "
                          "model.loss_chunk_size=0 and use another stage")
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
    for name in ("steps", "batch_size", "grad_accum_steps"):
        if getattr(config.train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1")
    rpo_alpha = config.feedback.rpo_alpha
    if not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
        raise ConfigError(f"feedback.rpo_alpha={rpo_alpha} must be a finite number >= 0 (0 = plain DPO; TRL and "
                          "Llama 3 use about 1)")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    config = Config()
    _update_dataclass(config, data, "", "saved config")
    validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def config_json(config: Config) -> str:
    return json.dumps(to_dict(config), sort_keys=True)


__all__ = [
    "Config", "ModelConfig", "OptimizerConfig", "DataConfig", "FeedbackConfig", "RLConfig", "TrainConfig",
    "MeshConfig", "ConfigError", "MODEL_PRESETS", "load_config", "from_dict", "to_dict", "save_config",
    "parse_override", "validate",
]
