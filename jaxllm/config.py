"""Typed configuration: small nested dataclasses, YAML recipes, `key.sub=value` overrides.

A recipe is a YAML file whose keys mirror `Config`. Unknown keys and wrong types are errors that
name the key (and the closest valid one). Model sizes come from presets (`model.preset: tiny`)
whose fields any explicit key overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxllm import settings
from jaxllm.errors import ConfigError


@dataclasses.dataclass(unsafe_hash=True)  # hashable: it is static inside the model's graph definition
class ModelConfig:
    preset: str = ""
    vocab_size: int = 0  # 0 = the tokenizer's size rounded up to a multiple of VOCAB_MULTIPLE (see load_config)
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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["auto", "xla", "blockwise", "cudnn", "reference"] = "auto"
    attention_block_size: int = 128  # query/key block for the blockwise implementation
    loss_chunk_size: int = 0  # >0: fused lm head + cross-entropy over this many positions at a time (no [B,T,V] logits)
    remat: Literal["none", "full", "dots"] = "none"
    scan_layers: bool = True
    init_std: float = 0.02
    # Architecture variants of open models (jaxllm.convert); every default is the plain Llama above.
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2, Llama attention_bias)
    attention_out_bias: bool = False  # a bias on the output projection (Llama attention_bias)
    qk_norm: bool = False  # RMSNorm of every query/key head before the rotation (Qwen3)
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + scale), scales start at 0 (Gemma)
    post_norms: bool = False  # RMSNorm also on the attention and MLP outputs (Gemma 2)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    mlp_activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"  # the gate of the gated MLP
    attention_scale: float = 0.0  # attention logit scale; 0 = head_dim ** -0.5
    final_logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2)
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
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
# A preset's vocab_size is its nominal size (for `jaxllm plan` and `jaxllm bench`, which have no tokenizer);
# a recipe takes the vocabulary size from its tokenizer unless it sets model.vocab_size itself.
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
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
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
    sft_mode: Literal["normal", "response_only", "all_tokens"] = "normal"
    truncation: Literal["truncate", "drop"] = "truncate"
    on_bad_record: Literal["fail", "skip"] = "fail"
    shuffle: bool = True
    allow_change: bool = False  # resume even though the data's content changed since the checkpoint


@dataclasses.dataclass
class FeedbackConfig:
    """Preference / binary-feedback losses (DPO family, KTO) and the reward model."""

    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # sigmoid = DPO
    beta: float = 0.1  # DPO/IPO/KTO temperature; ORPO's lambda; SimPO's reward scale
    margin: float = 0.0  # SimPO's target reward margin gamma
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
    stage: str = "pretrain"  # a registered stage: pretrain | sft | dpo | kto | reward | rl | orpo | simpo
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
    best_mode: Literal["min", "max"] = "min"
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


def _apply_model_preset(config: Config, explicit_model_keys: set[str]) -> None:
    preset = config.model.preset
    if not preset:
        return
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset '{preset}' is unknown{settings.closest(preset, list(MODEL_PRESETS))}; "
                          f"choose one of {', '.join(MODEL_PRESETS)}")
    for key, value in MODEL_PRESETS[preset].items():
        if key not in explicit_model_keys and key != "vocab_size":
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


# ----------------------------------------------------------------------------------------------
# Built-in recipes: the YAML files shipped in the package (jaxllm/recipes; `configs/` in the checkout).

RECIPE_PACKAGE = "jaxllm"
RECIPE_DIRECTORY = "recipes"


def builtin_recipe_dir() -> Path:
    """The directory of the recipes shipped with the package (a real directory in a wheel or a checkout)."""
    from importlib import resources

    return Path(str(resources.files(RECIPE_PACKAGE).joinpath(RECIPE_DIRECTORY)))


def builtin_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> file, for every YAML recipe shipped with the package."""
    directory = builtin_recipe_dir()
    if not directory.is_dir():
        return {}
    return {path.stem: path for path in sorted(directory.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe's leading comment block (its one-line description), or ""."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text or text.startswith(("jaxllm ", "`jaxllm")):
            break
        words.append(text)
    summary = " ".join(words)
    end = summary.find(". ")
    return (summary[:end + 1] if end >= 0 else summary).rstrip(":")


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path as given when it exists, else the built-in recipe of that name.

    `pretrain_tiny`, `pretrain_tiny.yaml` and `configs/pretrain_tiny.yaml` all name the built-in recipe, so
    the README's commands work from any directory after `pip install`; an existing file always wins."""
    path = Path(name_or_path)
    if path.exists():
        return path
    builtin = builtin_recipes()
    stem = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if path.suffix in ("", ".yaml") and path.parent in (Path("."), Path("configs")) and stem in builtin:
        return builtin[stem]
    names = ", ".join(builtin) or "none installed"
    raise ConfigError(f"recipe file {name_or_path} does not exist and is not a built-in recipe"
                      f"{settings.closest(stem, list(builtin))}; "
                      f"built-in recipes: {names} (`jaxllm recipes` describes them)")


VOCAB_MULTIPLE = 128  # embedding rows padded to a multiple of this: MXU/tensor-core and sharding friendly


def vocab_size_for(tokenizer_ids: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The model's vocabulary size for a tokenizer of `tokenizer_ids` ids: rounded up to `multiple`."""
    return -(-tokenizer_ids // multiple) * multiple


def _resolve_vocab_size(config: Config, log) -> None:
    """model.vocab_size=0 (the recipe does not fix it) -> the configured tokenizer's size, rounded up."""
    if config.model.vocab_size:
        return
    from jaxllm.data.tokenizer import Tokenizer  # the tokenizer reads its own file; nothing is written

    ids = Tokenizer.load(config.data.tokenizer).vocab_size
    config.model.vocab_size = vocab_size_for(ids)
    if log is not None:
        log(f"model.vocab_size={config.model.vocab_size}: from the tokenizer {config.data.tokenizer} ({ids} ids, "
            f"rounded up to a multiple of {VOCAB_MULTIPLE}); set model.vocab_size to fix it")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, log=None) -> Config:
    """Builds a Config from an optional YAML recipe, a dict and `key.sub=value` overrides (in that order).

    `path` is a YAML file or the name of a built-in recipe (`pretrain_tiny`; see `builtin_recipes`). A
    model.vocab_size left at 0 is taken from data.tokenizer (rounded up to a multiple of 128); `log`, when
    given, is told so."""
    config = Config()
    explicit_model: set[str] = set()
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("config dict", base))
    if path is not None:
        path = resolve_recipe(path)
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
            settings.update(config, {key: value}, source)
    _apply_model_preset(config, explicit_model)
    check_ranges(config)  # before the tokenizer is read for a vocab_size of 0 (a negative one is an error)
    _resolve_vocab_size(config, log)
    validate(config)
    return config


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


# ----------------------------------------------------------------------------------------------
# Ranges: every int has a minimum (0 unless listed), every float must be finite and within its range.

INT_MINIMUMS: dict[str, int] = {
    "model.vocab_size": 0, "model.d_model": 1,  # vocab_size 0: from the tokenizer (load_config)
    "model.num_layers": 1, "model.num_heads": 1, "model.num_kv_heads": 1,
    "model.max_seq_len": 1, "model.attention_block_size": 1, "data.seq_len": 1,
    "train.steps": 1, "train.batch_size": 1, "train.grad_accum_steps": 1, "train.log_every": 1,
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


# ----------------------------------------------------------------------------------------------
# Resuming with another config: what may change.

# A change here makes the checkpoint another run: the params' shapes or meaning, the tokens, the data
# order or the stage's objective would differ. Resuming is refused.
RESUME_INCOMPATIBLE_SECTIONS = ("model", "data")
RESUME_INCOMPATIBLE_KEYS = {"train.stage", "train.seed", "train.batch_size", "train.init_from"}
# A change here only changes how the same computation is run or recorded: silent.
RESUME_FREE_KEYS = {
    "data.allow_change", "model.attention", "model.attention_block_size", "model.loss_chunk_size", "model.remat",
    "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
    "train.best_metric", "train.best_mode", "train.async_checkpointing", "train.tensorboard", "train.progress",
    "train.grad_accum_steps", "train.max_bad_steps_in_a_row", "train.rollback_on_halt",
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


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    config = Config()
    settings.update(config, data, "saved config")
    validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    from jaxllm.files import write_atomic

    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def config_json(config: Config) -> str:
    return json.dumps(to_dict(config), sort_keys=True)


__all__ = [
    "Config", "ModelConfig", "OptimizerConfig", "DataConfig", "FeedbackConfig", "RLConfig", "TrainConfig",
    "MeshConfig", "ConfigError", "MODEL_PRESETS", "load_config", "from_dict", "to_dict", "save_config",
    "parse_override", "validate", "resolve_recipe", "builtin_recipes", "recipe_summary", "vocab_size_for",
    "check_ranges", "compare_for_resume", "ConfigChanges",
]
