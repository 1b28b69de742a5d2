"""Hugging Face checkpoints in and out: `jaxllm convert from-hf`, `to-hf` and `merge-lora`.

    jaxllm convert from-hf HF_DIR --out WORKDIR     config.json + *.safetensors (+ tokenizer) -> a jaxllm workdir
    jaxllm convert to-hf WORKDIR --out HF_DIR       a jaxllm workdir -> config.json + model.safetensors
    jaxllm convert merge-lora WORKDIR --out WORKDIR2   LoRA adapters merged into their base -> a plain workdir

Families: Llama (2, 3, 3.x: rope_scaling linear / llama3 / yarn), Mistral, Qwen2 / 2.5 (q/k/v biases),
Qwen3 (q/k norms), Gemma (GeGLU, (1 + w) RMSNorm, sqrt(d) embedding scale) and Gemma 2 (post norms,
query_pre_attn_scalar, final logit soft-capping) when its attention soft-capping is off. Anything the
model cannot express exactly (Gemma 2's attention soft-capping, Gemma 3's per-layer RoPE, dynamic NTK
rope scaling, MLP biases, quantized weights, mixtures of experts) is a ConfigError naming the field.
Sliding windows are exact up to the window, so max_seq_len is capped at the window.

A converted workdir is a normal workdir: `config.yaml` (the matching jaxllm config), `checkpoints/0`
(Orbax, params only), the tokenizer files (tokenizer.json / tokenizer.model, tokenizer_config.json with the
chat template) and `hf_source.json` (family, special token ids; used by to-hf). Any stage can
`init_from` it, `jaxllm generate` / `chat` run on it.

Layout (HF Linear weights are [out, in]; jaxllm stacks layers on a leading axis L):
    q_proj  HF [N*H, D]  -> [L, D, N, H]      k/v_proj  HF [K*H, D] -> [L, D, K, H]
    o_proj  HF [D, N*H]  -> [L, N, H, D]      gate/up   HF [F, D]   -> [L, D, F];  down HF [D, F] -> [L, F, D]
    embed   HF [V, D]    -> [V, D]            lm_head   HF [V, D]   -> [D, V]
Both sides rotate (first half, second half) of each head (HF `rotate_half`), so no permutation is needed.

Memory: safetensors are memory-mapped and read one tensor at a time; each jaxllm leaf is assembled
layer by layer and placed on the devices (sharded over `--fsdp` devices) before the next, so the host
never holds two copies of the model. to-hf writes shards of at most `--max-shard-gb` one after another.
Reading and writing safetensors uses the `safetensors` library (`pip install jaxllm[hf]`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from jaxllm import checkpoint as ckpt
from jaxllm import lora
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm.config import Config, ConfigError, MeshConfig, ModelConfig, load_config, save_config, to_dict, validate
from jaxllm.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir
from jaxllm.data.tokenizer import check_vocab
from jaxllm.lora import _resolve
from jaxllm.model import rope_frequencies

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "added_tokens.json")
SOURCE_FILE = "hf_source.json"

# ----------------------------------------------------------------------------------------------
# safetensors files, read and written with the `safetensors` library (the `hf` extra): numpy arrays,
# bfloat16 as ml_dtypes.bfloat16, one tensor at a time from a memory-mapped file.

_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
           "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


def _safetensors():
    """The `safetensors` package, imported on first use: only HF conversion needs it (`pip install jaxllm[hf]`)."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise ConfigError("reading and writing Hugging Face checkpoints needs the safetensors package: "
                          "pip install 'jaxllm[hf]'") from None
    return safetensors


class SafetensorsFile:
    """A memory-mapped .safetensors file: `names`, `metadata`, `shape(name)`, `dtype(name)`, `read(name)`."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = _safetensors().safe_open(str(path), framework="numpy")
        except Exception as error:  # noqa: BLE001 - the library's error types differ between versions
            raise ConfigError(f"{path} is not a readable safetensors file ({str(error).strip()[:200]})") from None
        self.metadata = self._file.metadata() or {}

    @property
    def names(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        code = self._file.get_slice(name).get_dtype()
        if code not in _DTYPES:
            raise ConfigError(f"{self.path}: tensor {name} has dtype {code}, which jaxllm cannot read "
                              f"(supported: {', '.join(_DTYPES)}); quantized checkpoints are not supported")
        return _DTYPES[code]

    def read(self, name: str) -> np.ndarray:
        self.dtype(name)  # an unsupported dtype is a clear error, not the library's
        return self._file.get_tensor(name)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (numpy arrays) as one .safetensors file."""
    supported = set(_DTYPES.values())
    for name, array in tensors.items():
        if array.dtype not in supported:
            raise ConfigError(f"tensor {name}: dtype {array.dtype} cannot be written to safetensors")
    _safetensors().numpy.save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, str(path),
                                   metadata=dict(metadata or {"format": "pt"}))


class HFWeights:
    """All tensors of a Hugging Face model folder (model.safetensors or the sharded index), by name."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: directory / file for name, file in weight_map.items()}
        else:
            paths = sorted(directory.glob("*.safetensors"))
            if not paths:
                others = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pth")]
                hint = (f" (found {', '.join(others[:3])}: re-save the model with "
                        "`model.save_pretrained(dir, safe_serialization=True)`)") if others else ""
                raise ConfigError(f"{directory} has no *.safetensors weights{hint}")
            files = {}
            for path in paths:
                for name in SafetensorsFile(path).names:
                    files[name] = path
        self._files = files
        self._open: dict[Path, SafetensorsFile] = {}
        names = set(files)
        # A bare `LlamaModel` save has no "model." prefix.
        self.prefix = "model." if any(n.startswith("model.") for n in names) else ""

    @property
    def names(self) -> set[str]:
        return set(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def read(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise ConfigError(f"the checkpoint has no tensor '{name}', which this model config needs")
        path = self._files[name]
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path].read(name)

    def dtype(self, name: str) -> np.dtype:
        path = self._files[name]
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path].dtype(name)


# ----------------------------------------------------------------------------------------------
# Configs: Hugging Face config.json <-> ModelConfig.

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


# ----------------------------------------------------------------------------------------------
# The tensor map: one entry per jaxllm leaf.


@dataclasses.dataclass(frozen=True)
class Tensor:
    """jaxllm leaf `path` <-> HF tensor `hf_name` (with `{i}` for the layer when `layered`)."""

    path: tuple[str, ...]
    hf_name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layered: bool = True


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def tensor_map(model: ModelConfig, family: str, prefix: str = "model.") -> list[Tensor]:
    d, n, k, h, f = (model.d_model, model.num_heads, model.num_kv_heads, model.resolved_head_dim,
                     model.resolved_d_ff)
    layer = prefix + "layers.{i}."

    def in_out(heads: int) -> tuple[Callable, Callable]:  # HF [heads*H, D] <-> [D, heads, H]
        return (lambda w: w.T.reshape(d, heads, h)), (lambda w: w.reshape(d, heads * h).T)

    q_in, q_out = in_out(n)
    kv_in, kv_out = in_out(k)
    entries = [
        Tensor(("embed",), prefix + "embed_tokens.weight", _identity, _identity, layered=False),
        Tensor(("final_norm", "scale"), prefix + "norm.weight", _identity, _identity, layered=False),
        Tensor(("blocks", "attention_norm", "scale"), layer + "input_layernorm.weight", _identity, _identity),
        Tensor(("blocks", "attention", "q_proj"), layer + "self_attn.q_proj.weight", q_in, q_out),
        Tensor(("blocks", "attention", "k_proj"), layer + "self_attn.k_proj.weight", kv_in, kv_out),
        Tensor(("blocks", "attention", "v_proj"), layer + "self_attn.v_proj.weight", kv_in, kv_out),
        Tensor(("blocks", "attention", "o_proj"), layer + "self_attn.o_proj.weight",
               lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T),
        Tensor(("blocks", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
        Tensor(("blocks", "mlp", "up_proj"), layer + "mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
        Tensor(("blocks", "mlp", "down_proj"), layer + "mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
    ]
    if family == "gemma2":
        entries += [
            Tensor(("blocks", "post_attention_norm", "scale"), layer + "post_attention_layernorm.weight",
                   _identity, _identity),
            Tensor(("blocks", "mlp_norm", "scale"), layer + "pre_feedforward_layernorm.weight", _identity, _identity),
            Tensor(("blocks", "post_mlp_norm", "scale"), layer + "post_feedforward_layernorm.weight",
                   _identity, _identity),
        ]
    else:
        entries.append(Tensor(("blocks", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight",
                              _identity, _identity))
    if model.attention_bias:
        for name, heads in (("q", n), ("k", k), ("v", k)):
            entries.append(Tensor(("blocks", "attention", f"{name}_bias"), layer + f"self_attn.{name}_proj.bias",
                                  lambda b, heads=heads: b.reshape(heads, h), lambda b: b.reshape(-1)))
    if model.attention_out_bias:
        entries.append(Tensor(("blocks", "attention", "o_bias"), layer + "self_attn.o_proj.bias", _identity, _identity))
    if model.qk_norm:
        entries += [Tensor(("blocks", "attention", "q_norm", "scale"), layer + "self_attn.q_norm.weight",
                           _identity, _identity),
                    Tensor(("blocks", "attention", "k_norm", "scale"), layer + "self_attn.k_norm.weight",
                           _identity, _identity)]
    if not model.tie_embeddings:
        entries.append(Tensor(("lm_head",), "lm_head.weight", lambda w: w.T, lambda w: w.T, layered=False))
    return entries


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _leaf_paths(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)


# ----------------------------------------------------------------------------------------------
# from-hf


def _conversion_mesh(fsdp: int) -> jax.sharding.Mesh:
    return sharding_lib.make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=1, num_devices=fsdp))


def load_hf_params(hf_dir: str | Path, model: ModelConfig, family: str, mesh: jax.sharding.Mesh | None = None,
                   log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The jaxllm params of a Hugging Face folder, leaf by leaf (each assembled on the host, placed on the
    mesh sharded by its logical axes, then freed). Raises ConfigError on missing or unexpected tensors."""
    weights = HFWeights(Path(hf_dir))
    _, abstract = model_lib.abstract_model(model)
    mesh = mesh or _conversion_mesh(1)
    shardings = sharding_lib.tree_shardings(abstract, model_lib.logical_axes(model), mesh)
    entries = tensor_map(model, family, weights.prefix)
    expected_paths = set(_leaf_paths(abstract))
    mapped = {entry.path for entry in entries}
    if expected_paths != mapped:  # the map and the model must describe the same leaves
        raise ConfigError(f"internal: tensor map and model differ: {sorted(expected_paths ^ mapped)}")
    used: set[str] = set()
    dtype = np.dtype(jax.numpy.dtype(model.param_dtype))
    params: dict[str, Any] = {}
    for entry in entries:
        target = _get(abstract, entry.path)
        if entry.layered:
            host = np.empty(target.shape, dtype)
            for i in range(model.num_layers):
                name = entry.hf_name.format(i=i)
                host[i] = entry.to_jax(weights.read(name)).astype(dtype)
                used.add(name)
        else:
            host = np.ascontiguousarray(entry.to_jax(weights.read(entry.hf_name)).astype(dtype))
            used.add(entry.hf_name)
        if host.shape != target.shape:
            raise ConfigError(f"tensor for {'/'.join(entry.path)} has shape {host.shape} after conversion, the "
                              f"model config expects {target.shape}; config.json and the weights disagree")
        _set(params, entry.path, jax.device_put(host, _get(shardings, entry.path)))
        del host
    leftover = sorted(name for name in weights.names - used
                      if not (model.tie_embeddings and name == "lm_head.weight")
                      and not name.endswith("rotary_emb.inv_freq"))
    if leftover:
        shown = ", ".join(leftover[:8]) + (f" and {len(leftover) - 8} more" if len(leftover) > 8 else "")
        raise ConfigError(f"{hf_dir}: {len(leftover)} tensors have no place in the converted model ({shown}); "
                          "the checkpoint has parts jaxllm's model does not support")
    log(f"converted {len(used)} tensors into {len(entries)} jaxllm parameters")
    return params


def _copy_tokenizer(hf_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
            copied.append(name)
    return copied


def write_workdir(out: str | Path, config: Config, params: dict[str, Any], meta: dict[str, Any]) -> Path:
    """A workdir holding `params` as step 0 (Orbax; params only) and `config.yaml`."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if ckpt.latest_step(out) is not None:
        raise ConfigError(f"{out} already holds a checkpoint; choose an empty --out directory")
    save_config(config, out / "config.yaml")
    manager = ckpt.make_manager(out, keep=1, async_save=False)
    ckpt.save(manager, 0, {"step": np.zeros((), np.int32), "params": params}, {},
              {"step": 0, "stage": "converted", "config": to_dict(config), **meta}, force=True)
    manager.wait_until_finished()
    manager.close()
    return out


def from_hf(hf_dir: str | Path, out: str | Path, *, dtype: str | None = None, fsdp: int = 1,
            log: Callable[[str], None] = print) -> Path:
    """Converts a Hugging Face model folder into a jaxllm workdir; returns the workdir."""
    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{hf_dir} has no config.json; point from-hf at a Hugging Face model folder "
                          "(config.json + *.safetensors)")
    hf = json.loads(config_file.read_text())
    conversion = model_config_from_hf(hf, dtype)
    for note in conversion.notes:
        log(f"note: {note}")

    tokenizer = HFTokenizer.load(hf_dir) if is_hf_tokenizer_dir(hf_dir) else None
    if tokenizer is not None:  # before any work: ids past the embedding table would be silently wrong
        check_vocab(tokenizer, conversion.model.vocab_size)
    params = load_hf_params(hf_dir, conversion.model, conversion.family, _conversion_mesh(fsdp), log)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    copied = _copy_tokenizer(hf_dir, out)
    config = Config(model=conversion.model)
    config.data.seq_len = min(config.data.seq_len, conversion.model.max_seq_len)
    if tokenizer is not None:
        config.data.tokenizer = str(out)
    else:
        log("note: the folder has no tokenizer.json or tokenizer.model; set data.tokenizer when training on it")
    source = {"family": conversion.family, "source": str(hf_dir.absolute()), "architectures": hf.get("architectures"),
              "special_ids": conversion.special_ids, "tokenizer_files": copied, "notes": conversion.notes}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    meta: dict[str, Any] = {"hf_source": source}
    if tokenizer is not None:
        meta["tokenizer_fingerprint"] = HFTokenizer.load(out).fingerprint
    write_workdir(out, config, params, meta)
    log(f"wrote {out}: {conversion.family} model, {sum(x.size for x in jax.tree.leaves(params)):,} parameters "
        f"({conversion.model.param_dtype}), tokenizer files: {', '.join(copied) or 'none'}")
    return out


# ----------------------------------------------------------------------------------------------
# to-hf


def load_workdir_params(workdir: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, params) of a workdir on one device; LoRA adapters are merged into their base (the
    returned config then has lora_rank=0). Reward/value heads are dropped."""
    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise ConfigError(f"{workdir} is not a jaxllm workdir (no config.yaml)")
    config = load_config(workdir / "config.yaml")
    base_model = dataclasses.replace(config.model, lora_rank=0)
    _, abstract = model_lib.abstract_model(base_model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    params = lora.load_params(workdir, target)
    config.model = base_model
    return config, params


def to_hf(workdir: str | Path, out: str | Path, *, family: str | None = None, dtype: str | None = None,
          max_shard_bytes: int = 5 * 2**30, log: Callable[[str], None] = print) -> Path:
    """Writes a workdir as a Hugging Face folder (config.json, safetensors, tokenizer files)."""
    workdir, out = Path(workdir), Path(out)
    config, params = load_workdir_params(workdir)
    chain = [workdir, *_init_chain(workdir)]
    source_dir = next((d for d in chain if (d / SOURCE_FILE).is_file()), None)
    source = json.loads((source_dir / SOURCE_FILE).read_text()) if source_dir else {}
    tokenizer_dir = next((d for d in chain if any((d / n).is_file() for n in TOKENIZER_FILES)), None)
    family = family or source.get("family") or infer_family(config.model)
    dtype = dtype or config.model.param_dtype
    np_dtype = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}.get(dtype)
    if np_dtype is None:
        raise ConfigError(f"--dtype {dtype} must be float32, bfloat16 or float16")
    hf_config = hf_config_from_model(config.model, family, source.get("special_ids"), dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    entries = tensor_map(config.model, family)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for entry in entries:
            value = np.asarray(jax.device_get(_get(params, entry.path)))
            if entry.layered:
                for i in range(config.model.num_layers):
                    yield entry.hf_name.format(i=i), np.ascontiguousarray(entry.to_hf(value[i]).astype(np_dtype))
            else:
                yield entry.hf_name, np.ascontiguousarray(entry.to_hf(value).astype(np_dtype))

    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        if not shards[-1]:
            return
        files.append(f"shard-{len(files):05d}")
        path = out / (files[-1] + ".safetensors")
        write_safetensors(path, shards[-1])
        for name in shards[-1]:
            weight_map[name] = path.name
        shards[-1] = {}
        sizes[-1] = 0

    for name, array in tensors():
        if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = array
        sizes[-1] += array.nbytes
        total += array.nbytes
    flush()
    if len(files) == 1:
        (out / (files[0] + ".safetensors")).rename(out / "model.safetensors")
    else:
        count = len(files)
        renamed = {}
        for number, stem in enumerate(files, 1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (out / (stem + ".safetensors")).rename(out / final)
            renamed[stem + ".safetensors"] = final
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: renamed[file] for name, file in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copied = _copy_tokenizer(tokenizer_dir, out) if tokenizer_dir is not None else []
    log(f"wrote {out}: {family} model ({dtype}), {len(files)} safetensors file(s), "
        f"tokenizer files: {', '.join(copied) or 'none'}")
    return out


# ----------------------------------------------------------------------------------------------
# merge-lora


def merge_lora(workdir: str | Path, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """A LoRA workdir -> a plain workdir with the adapters merged into the base weights (and the tokenizer
    files of the nearest run in its init_from chain that has them)."""
    config, params = load_workdir_params(workdir)
    config.train.init_from = ""
    out = Path(out).absolute()
    if ckpt.latest_step(out) is not None:
        raise ConfigError(f"{out} already holds a checkpoint; choose an empty --out directory")
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"merged_from": str(Path(workdir).absolute())}
    for directory in (Path(workdir), *_init_chain(Path(workdir))):
        if not _copy_tokenizer(directory, out):
            continue
        if (directory / SOURCE_FILE).is_file():
            shutil.copyfile(directory / SOURCE_FILE, out / SOURCE_FILE)
        if config.data.tokenizer == str(directory.absolute()) and is_hf_tokenizer_dir(out):
            config.data.tokenizer = str(out)
            meta["tokenizer_fingerprint"] = HFTokenizer.load(out).fingerprint
        break
    write_workdir(out, config, params, meta)
    log(f"wrote {out}: adapters of {workdir} merged into their base")
    return out


def _init_chain(workdir: Path) -> list[Path]:
    chain, current = [], workdir
    while (current / "config.yaml").is_file():
        parent = load_config(current / "config.yaml").train.init_from
        if not parent:
            break

        current = _resolve(current.absolute(), parent)
        chain.append(current)
    return chain


__all__ = ["from_hf", "to_hf", "merge_lora", "model_config_from_hf", "hf_config_from_model", "load_hf_params",
           "load_workdir_params", "tensor_map", "infer_family", "write_safetensors", "SafetensorsFile", "HFWeights",
           "write_workdir", "SUPPORTED_FAMILIES"]
