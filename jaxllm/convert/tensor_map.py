"""The tensor map: one entry per jaxllm leaf (its Hugging Face tensor names per layer and the layout
transform), per family; and small helpers over nested param dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

from jaxllm.config import ModelConfig


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


def tree_get(tree: dict, path: tuple[str, ...]) -> Any:
    """The leaf at `path` of a nested dict."""
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Sets the leaf at `path`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def leaf_paths(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The paths of every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)
