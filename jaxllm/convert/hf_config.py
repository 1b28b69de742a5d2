"""Configs: a Hugging Face config.json <-> a jaxllm ModelConfig, per family (what each family sets,
what the model cannot express is a ConfigError naming the field)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from jaxllm.config import Config, ConfigError, ModelConfig, validate
from jaxllm.model import rope_frequencies

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


_HARMLESS_FIELDS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "pretraining_tp", "_name_or_path",
    "tie_word_embeddings", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "hidden_activation",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping", "partial_rotary_factor",
    "use_bidirectional_attention", "quantization_config", "num_experts", "num_local_experts", "output_attentions",
    "output_hidden_states", "return_dict", "is_decoder", "is_encoder_decoder", "tokenizer_class", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "prefix", "task_specific_params", "finetuning_task", "bad_words_ids",
    "begin_suppress_tokens", "decoder_start_token_id", "sep_token_id", "torchscript", "pruned_heads",
    "_attn_implementation_autoset", "use_return_dict", "embedding_multiplier", "rope_type", "default_theta",
}


@dataclasses.dataclass
class HFConversion:
    """What from-hf decided: the family, the model config, notes for the user, the special token ids."""

    family: str
    model: ModelConfig
    notes: list[str]
    special_ids: dict[str, Any]


def _rope_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta + rope_scaling (transformers 4) or rope_parameters (5) -> ModelConfig fields."""
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError("config.json: 'rope_parameters' differs by layer type (per-layer RoPE, e.g. Gemma 3); "
                          "jaxllm uses one RoPE for every layer, so this model is not supported")
    rope_kind = rope.get("rope_type", rope.get("type", "default"))
    merged = {**rope, **legacy} if rope_kind in (None, "default") else {**legacy, **rope}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"config.json: partial_rotary_factor={partial} (RoPE on part of each head) is not supported")
    original = merged.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 0)
    if kind == "default":
        return fields
    if kind == "linear":
        return {**fields, "rope_scaling": "linear", "rope_scaling_factor": float(merged["factor"])}
    if kind == "llama3":
        return {**fields, "rope_scaling": "llama3", "rope_scaling_factor": float(merged["factor"]),
                "rope_low_freq_factor": float(merged.get("low_freq_factor", 1.0)),
                "rope_high_freq_factor": float(merged.get("high_freq_factor", 4.0)),
                "rope_original_max_len": int(original)}
    if kind == "yarn":
        if merged.get("truncate", True) is False:
            raise ConfigError("config.json: rope_scaling.truncate=false (yarn without rounding) is not supported")
        factor = merged.get("factor") or hf["max_position_embeddings"] / original
        attention = merged.get("attention_factor")
        mscale, mscale_all = merged.get("mscale"), merged.get("mscale_all_dim")
        if attention is None:
            def get_mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            attention = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all
                         else get_mscale(factor))
        return {**fields, "rope_scaling": "yarn", "rope_scaling_factor": float(factor),
                "rope_original_max_len": int(original), "rope_attention_factor": float(attention),
                "rope_beta_fast": float(merged.get("beta_fast") or 32.0),
                "rope_beta_slow": float(merged.get("beta_slow") or 1.0)}
    raise ConfigError(f"config.json: rope_scaling type '{kind}' is not supported (jaxllm supports default, linear, "
                      "llama3 and yarn; 'dynamic' NTK scaling changes with the sequence length at run time)")


def _activation(name: str | None, family: str) -> str:
    name = name or ("gelu_pytorch_tanh" if family.startswith("gemma") else "silu")
    if family.startswith("gemma") and name == "gelu":  # the legacy Gemma value means the tanh approximation
        name = "gelu_pytorch_tanh"
    table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
             "gelu_fast": "gelu_tanh", "gelu": "gelu"}
    if name not in table:
        raise ConfigError(f"config.json: hidden_act='{name}' is not supported (silu, gelu, gelu_pytorch_tanh)")
    return table[name]


def _dtype_name(hf: dict[str, Any]) -> str:
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    return "bfloat16" if name == "bfloat16" else "float32"


def model_config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> HFConversion:
    """A Hugging Face config.json (as a dict) -> the matching ModelConfig, or a ConfigError naming the field
    that jaxllm's model cannot express."""
    family = hf.get("model_type", "")
    if family in ("gemma3", "gemma3_text"):
        raise ConfigError("config.json: model_type='gemma3' is not supported: Gemma 3 alternates sliding-window "
                          "layers with their own RoPE base (rope_local_base_freq) and global layers, which jaxllm's "
                          "stacked layers with one RoPE cannot express")
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"config.json: model_type='{family}' is not supported; jaxllm converts "
                          f"{', '.join(SUPPORTED_FAMILIES)} (Qwen2.5 checkpoints are model_type qwen2)")
    if hf.get("quantization_config"):
        raise ConfigError("config.json: quantization_config is set; quantized checkpoints are not supported "
                          "(convert the unquantized bf16/fp16/fp32 weights)")
    for field in ("num_experts", "num_local_experts"):
        if hf.get(field):
            raise ConfigError(f"config.json: {field}={hf[field]} (a mixture of experts) is not supported")
    if hf.get("mlp_bias"):
        raise ConfigError("config.json: mlp_bias=true (biases in the MLP) is not supported")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("config.json: use_bidirectional_attention=true is not supported (jaxllm is causal)")
    if hf.get("attn_logit_softcapping"):
        raise ConfigError(f"config.json: attn_logit_softcapping={hf['attn_logit_softcapping']} (Gemma 2's attention "
                          "soft-capping) is not supported by jaxllm's attention; only checkpoints with "
                          "attn_logit_softcapping=null convert exactly")
    notes: list[str] = []
    d_model, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or d_model // heads)
    max_len = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window")
    windowed = False
    if family == "mistral":
        windowed = bool(window)
    elif family in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types") or []
        windowed = bool(hf.get("use_sliding_window")) and bool(window) and (
            "sliding_attention" in layer_types or not layer_types)
    elif family == "gemma2":
        windowed = bool(window)
    if windowed and int(window) < max_len:
        notes.append(f"sliding_window={window}: attention over at most {window} positions is exact, so "
                     f"max_seq_len is capped at {window} (max_position_embeddings={max_len})")
        max_len = int(window)
    bias = bool(hf.get("attention_bias", False))
    fields: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]), d_model=d_model, num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
        d_ff=int(hf["intermediate_size"]), max_seq_len=max_len,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family.startswith("gemma"))),
        mlp_activation=_activation(hf.get("hidden_activation") or hf.get("hidden_act"), family),
        attention_bias=bias or family == "qwen2", attention_out_bias=bias,
        qk_norm=family == "qwen3",
        norm_unit_offset=family.startswith("gemma"), scale_embeddings=family.startswith("gemma"),
        post_norms=family == "gemma2",
        **_rope_settings(hf),
    )
    if family == "gemma2":
        scalar = hf.get("query_pre_attn_scalar") or head_dim
        if scalar != head_dim:
            fields["attention_scale"] = float(scalar) ** -0.5
        fields["final_logit_softcap"] = float(hf.get("final_logit_softcapping") or 0.0)
    dtype = dtype or _dtype_name(hf)
    fields.update(dtype=dtype, param_dtype=dtype)
    unknown = sorted(k for k in hf if k not in _HARMLESS_FIELDS)
    if unknown:
        notes.append(f"config.json fields not used by the conversion: {', '.join(unknown)}")
    special = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = ModelConfig(**fields)

    validate(Config(model=model, data=dataclasses.replace(Config().data, seq_len=min(128, max_len))))
    return HFConversion(family, model, notes, special)


def infer_family(model: ModelConfig) -> str:
    if model.post_norms:
        return "gemma2"
    if model.norm_unit_offset or model.scale_embeddings:
        return "gemma"
    if model.qk_norm:
        return "qwen3"
    if model.attention_bias and not model.attention_out_bias:
        return "qwen2"
    return "llama"


def _check_family(model: ModelConfig, family: str) -> None:
    """Raises ConfigError naming the first model field that `family` cannot express."""
    gemma = family.startswith("gemma")
    expected: dict[str, Any] = {
        "qk_norm": family == "qwen3", "norm_unit_offset": gemma, "scale_embeddings": gemma,
        "post_norms": family == "gemma2", "mlp_activation": "gelu_tanh" if gemma else "silu",
    }
    if family == "qwen2":
        expected.update(attention_bias=True, attention_out_bias=False)
    elif family == "mistral":
        expected.update(attention_bias=False, attention_out_bias=False)
    elif model.attention_bias != model.attention_out_bias:
        raise ConfigError(f"model.attention_bias={model.attention_bias} with model.attention_out_bias="
                          f"{model.attention_out_bias} has no {family} equivalent (qwen2 has q/k/v biases only)")
    if family != "gemma2":
        expected.update(final_logit_softcap=0.0, attention_scale=0.0)
    for field, value in expected.items():
        if getattr(model, field) != value:
            raise ConfigError(f"model.{field}={getattr(model, field)!r} cannot be written as a Hugging Face "
                              f"'{family}' model (it needs {value!r})")


def hf_config_from_model(model: ModelConfig, family: str, special_ids: dict[str, Any] | None = None,
                         dtype: str = "float32") -> dict[str, Any]:
    """The config.json of `model` as a Hugging Face `family` model."""
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"--family {family} is not one of {', '.join(SUPPORTED_FAMILIES)}")
    _check_family(model, family)
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}[family]
    config: dict[str, Any] = {
        "architectures": [architecture], "model_type": family, "vocab_size": model.vocab_size,
        "hidden_size": model.d_model, "intermediate_size": model.resolved_d_ff,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads, "head_dim": model.resolved_head_dim,
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.rms_norm_eps,
        "tie_word_embeddings": model.tie_embeddings, "rope_theta": model.rope_theta,
        "torch_dtype": dtype, "attention_dropout": 0.0, "use_cache": True,
    }
    config.update({k: v for k, v in (special_ids or {}).items() if v is not None})
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[model.mlp_activation]
    config["hidden_activation" if family == "gemma2" else "hidden_act"] = act
    if family in ("llama", "qwen3", "gemma", "gemma2"):
        config["attention_bias"] = model.attention_bias
    if family == "llama":
        config["mlp_bias"] = False
    if family in ("mistral", "qwen2", "qwen3"):
        config["sliding_window"] = None
        if family != "mistral":
            config["use_sliding_window"] = False
    if family == "gemma2":
        scalar = (model.attention_scale or model.resolved_head_dim**-0.5) ** -2
        if abs(scalar - round(scalar)) > 1e-6:
            raise ConfigError(f"model.attention_scale={model.attention_scale} is not 1/sqrt(an integer), which Gemma 2's "
                              "query_pre_attn_scalar needs")
        config.update(query_pre_attn_scalar=int(round(scalar)), attn_logit_softcapping=None,
                      final_logit_softcapping=model.final_logit_softcap or None,
                      sliding_window=model.max_seq_len,
                      layer_types=["full_attention"] * model.num_layers)
    if model.rope_scaling != "none":
        scaling: dict[str, Any] = {"rope_type": model.rope_scaling, "factor": model.rope_scaling_factor}
        if model.rope_scaling == "llama3":
            scaling.update(low_freq_factor=model.rope_low_freq_factor, high_freq_factor=model.rope_high_freq_factor,
                           original_max_position_embeddings=model.rope_original_max_len)
        elif model.rope_scaling == "yarn":
            scaling.update(original_max_position_embeddings=model.rope_original_max_len,
                           beta_fast=model.rope_beta_fast, beta_slow=model.rope_beta_slow,
                           attention_factor=rope_frequencies(model)[1])
        config["rope_scaling"] = scaling
    return config
