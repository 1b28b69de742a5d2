"""A Llama-style decoder Transformer in Flax NNX, used functionally.

Build once with `init_model(config, seed)` -> (graphdef, params); every later call is the pure
function `apply(graphdef, params, tokens, positions, segment_ids)` under `jax.jit`.

Shapes: B batch, T query length, S key length (T for training, the cache size when decoding),
D d_model, N query heads, K key/value heads, H head dim, F MLP hidden, V vocabulary, L layers.
Every parameter carries `logical_axes` metadata; `jaxllm.sharding` maps those names onto a mesh.

Packed rows: `segment_ids` [B, T] number the documents of a row 1, 2, ...; 0 is padding. A token
attends only to earlier tokens of its own segment, in every attention implementation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.sharding import constrain

Params = dict[str, Any]
KVCache = dict[str, jax.Array]  # {"k": [L,B,S,K,H], "v": [L,B,S,K,H], "segment_ids": [B,S], "index": []}

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float, dtype: str) -> nnx.Param:
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(_dtype(dtype)), logical_axes=axes)


def _ones(shape: tuple[int, ...], axes: tuple[str, ...], dtype: str) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, _dtype(dtype)), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: str):
        self.scale = _ones((dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (first half, second half) of the head dim. x [B,T,N,H], positions [B,T]."""
    head_dim = x.shape[-1]
    fraction = jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim
    inv_freq = 1.0 / (theta**fraction)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention implementations. All take q [B,T,N,H], k/v [B,S,K,H] and the mask inputs
# q_index [B,T], kv_index [B,S] (order within the row: causality), q_segment [B,T], kv_segment [B,S].


def attention_mask(q_index, kv_index, q_segment, kv_segment) -> jax.Array:
    """[B,T,S] bool: key is not after the query, in the same segment, and not padding."""
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    same_segment = q_segment[:, :, None] == kv_segment[:, None, :]
    return causal & same_segment & (kv_segment[:, None, :] != 0)


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
    batch, length, heads, head_dim = q.shape
    return q.reshape(batch, length, num_kv_heads, heads // num_kv_heads, head_dim)


def reference_attention(q, k, v, q_index, kv_index, q_segment, kv_segment) -> jax.Array:
    """Plain einsum attention with float32 softmax; the definition the others are tested against."""
    num_kv = k.shape[2]
    scale = q.shape[-1] ** -0.5
    qg = _grouped(q, num_kv)  # [B,T,K,G,H]
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_index, kv_index, q_segment, kv_segment)[:, None, None]
    scores = jnp.where(mask, scores, _MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v)
    return out.reshape(q.shape)


def xla_attention(q, k, v, q_index, kv_index, q_segment, kv_segment, implementation: str = "xla") -> jax.Array:
    mask = attention_mask(q_index, kv_index, q_segment, kv_segment)[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def cudnn_attention(q, k, v, q_index, kv_index, q_segment, kv_segment) -> jax.Array:
    """cuDNN flash attention (GPU, 16-bit compute) for training (T == S, rows in order): the kernel's
    own causal mask, so it skips the upper triangle of tiles, plus the segment mask as a bias."""
    del q_index, kv_index  # causality by row order, which the kernel's causal mask uses
    same_segment = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
    return jax.nn.dot_product_attention(q, k, v, mask=same_segment[:, None], is_causal=True,
                                        implementation="cudnn")


def blockwise_attention(q, k, v, q_index, kv_index, q_segment, kv_segment, block_size: int) -> jax.Array:
    """Block-causal attention for training (T == S, rows in order): query block i only scores key
    blocks 0..i, so the upper triangle of the T x T scores is never built. Exact."""
    length = q.shape[1]
    if length % block_size or length <= block_size:
        return reference_attention(q, k, v, q_index, kv_index, q_segment, kv_segment)
    outputs = []
    for start in range(0, length, block_size):
        stop = start + block_size
        outputs.append(reference_attention(
            q[:, start:stop], k[:, :stop], v[:, :stop], q_index[:, start:stop], kv_index[:, :stop],
            q_segment[:, start:stop], kv_segment[:, :stop]))
    return jnp.concatenate(outputs, axis=1)


def resolve_attention(config: ModelConfig, decoding: bool) -> str:
    """'auto' picks cuDNN flash on GPU with 16-bit compute, block-causal on CPU, else XLA."""
    name = config.attention
    if decoding:
        return "reference"
    if name != "auto":
        return name
    platform = jax.devices()[0].platform
    if platform == "gpu" and config.dtype in ("bfloat16", "float16"):
        return "cudnn"
    if platform == "cpu":
        return "blockwise"
    return "xla"


def attend(impl: str, block_size: int, q, k, v, q_index, kv_index, q_segment, kv_segment) -> jax.Array:
    args = (q, k, v, q_index, kv_index, q_segment, kv_segment)
    if impl == "reference":
        return reference_attention(*args)
    if impl == "blockwise":
        return blockwise_attention(*args, block_size=block_size)
    if impl == "cudnn":
        return cudnn_attention(*args)
    if impl == "xla":
        return xla_attention(*args)
    raise ValueError(f"unknown attention implementation '{impl}'")


# ----------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, n, kv, h = config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim
        std, pd = config.init_std, config.param_dtype
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pd)
        self.k_proj = _param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.v_proj = _param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std, pd)
        out_std = std / (2 * config.num_layers) ** 0.5
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pd)
        self.config = config

    def __call__(self, x, positions, q_index, segment_ids, cache_kv=None, cache_index=None,
                 cache_segment=None, impl="reference"):
        """x [B,T,D] -> ([B,T,D], (k_cache, v_cache) or None)."""
        c = self.config
        dtype = _dtype(c.dtype)
        q = jnp.einsum("btd,dnh->btnh", x, self.q_proj[...].astype(dtype))
        k = jnp.einsum("btd,dkh->btkh", x, self.k_proj[...].astype(dtype))
        v = jnp.einsum("btd,dkh->btkh", x, self.v_proj[...].astype(dtype))
        q = constrain(rotary_embedding(q, positions, c.rope_theta), ("batch", "seq", "heads", "head_dim"))
        k = constrain(rotary_embedding(k, positions, c.rope_theta), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        new_cache = None
        if cache_kv is None:
            kv_index, kv_segment = q_index, segment_ids
        else:
            k_cache, v_cache = cache_kv
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
            new_cache = (k, v)
            kv_index = jnp.broadcast_to(jnp.arange(k.shape[1])[None], k.shape[:2])
            kv_segment = cache_segment
        out = attend(impl, c.attention_block_size, q, k.astype(dtype), v.astype(dtype), q_index, kv_index,
                     segment_ids, kv_segment)
        out = jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(dtype))
        return out, new_cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f, std, pd = config.d_model, config.resolved_d_ff, config.init_std, config.param_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), std / (2 * config.num_layers) ** 0.5, pd)
        self.dtype = _dtype(config.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jnp.einsum("btd,df->btf", x, self.gate_proj[...].astype(self.dtype))
        up = jnp.einsum("btd,df->btf", x, self.up_proj[...].astype(self.dtype))
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return jnp.einsum("btf,fd->btd", hidden, self.down_proj[...].astype(self.dtype))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config.d_model, config.rms_norm_eps, config.param_dtype)
        self.attention = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps, config.param_dtype)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, q_index, segment_ids, cache_kv=None, cache_index=None, cache_segment=None,
                 impl="reference"):
        attended, new_cache = self.attention(self.attention_norm(x), positions, q_index, segment_ids, cache_kv,
                                             cache_index, cache_segment, impl)
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "seq", "embed")), new_cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Token embedding -> L blocks (stacked on a leading 'layers' axis) -> RMSNorm -> logits."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.embed = _param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), config.init_std,
                            config.param_dtype)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(layer_rngs: nnx.Rngs) -> Block:
            return Block(config, layer_rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps, config.param_dtype)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"), config.init_std,
                                  config.param_dtype)

    def hidden_states(self, tokens, positions, segment_ids, cache: KVCache | None = None):
        """tokens/positions/segment_ids [B,T] int -> (final normed hidden [B,T,D], updated cache or None)."""
        c = self.config
        dtype = _dtype(c.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        x = constrain(x, ("batch", "seq", "embed"))
        decoding = cache is not None
        impl = resolve_attention(c, decoding)
        batch, length = tokens.shape
        if decoding:
            cache_index = cache["index"]
            cache_segment = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, cache_index, 1)
            q_index = jnp.broadcast_to(cache_index + jnp.arange(length)[None], (batch, length))
        else:
            cache_index, cache_segment = None, None
            q_index = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))

        graphdef, layer_states = nnx.split(self.blocks)

        def layer(x, layer_state, cache_kv):
            block = nnx.merge(graphdef, layer_state)
            return block(x, positions, q_index, segment_ids, cache_kv, cache_index, cache_segment, impl)

        if c.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[c.remat])

        def scan_body(x, inputs):
            layer_state, cache_kv = inputs
            x, new_kv = layer(x, layer_state, cache_kv)
            return x, new_kv

        cache_xs = (cache["k"], cache["v"]) if decoding else None
        if c.scan_layers:
            x, new_kv = jax.lax.scan(scan_body, x, (layer_states, cache_xs))
        else:
            collected = []
            for i in range(c.num_layers):
                layer_i = jax.tree.map(lambda a, i=i: a[i], (layer_states, cache_xs))
                x, kv_i = scan_body(x, layer_i)
                collected.append(kv_i)
            new_kv = jax.tree.map(lambda *a: jnp.stack(a), *collected) if decoding else None
        hidden = self.final_norm(x)
        new_cache = None
        if decoding:
            new_cache = {"k": new_kv[0], "v": new_kv[1], "segment_ids": cache_segment, "index": cache_index + length}
        return hidden, new_cache

    def unembedding(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied)."""
        if self.config.tie_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B,T,D] -> float32 logits [B,T,V]."""
        unembed = self.unembedding().astype(hidden.dtype)
        return constrain(jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32),
                         ("batch", "seq", "vocab"))

    def __call__(self, tokens, positions, segment_ids, cache: KVCache | None = None):
        hidden, new_cache = self.hidden_states(tokens, positions, segment_ids, cache)
        return self.logits(hidden), new_cache


# ----------------------------------------------------------------------------------------------
# The functional interface.

HEADS_KEY = "heads"  # extra scalar heads (reward/value) live beside the Transformer's params


def init_model(config: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, Params]:
    """Builds the Transformer and splits it: (graph definition, params as a plain nested dict)."""
    model = Transformer(config, nnx.Rngs(params=seed))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, Params]:
    """Graph definition and ShapeDtypeStruct params, without allocating anything."""
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(params=0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def logical_axes(config: ModelConfig) -> Params:
    """The logical axis names of every parameter, a tree shaped like params (tuples as leaves)."""
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(params=0)))
    _, state = nnx.split(model)

    def names(variable: nnx.Variable):
        axes = tuple(variable.get_metadata().get("logical_axes", ()))
        ndim = len(variable.get_value().shape)
        if len(axes) == ndim - 1:  # stacked by nnx.vmap over layers
            axes = ("layers",) + axes
        return axes or (None,) * ndim

    return nnx.to_pure_dict(jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _transformer(graphdef: nnx.GraphDef, params: Params) -> Transformer:
    return nnx.merge(graphdef, {k: v for k, v in params.items() if k != HEADS_KEY})


def apply(graphdef, params: Params, tokens, positions, segment_ids) -> jax.Array:
    """Pure forward pass: [B,T] int arrays -> float32 logits [B,T,V]."""
    logits, _ = _transformer(graphdef, params)(tokens, positions, segment_ids)
    return logits


def apply_hidden(graphdef, params: Params, tokens, positions, segment_ids) -> jax.Array:
    """Final normed hidden states [B,T,D] (for reward/value heads and embeddings)."""
    hidden, _ = _transformer(graphdef, params).hidden_states(tokens, positions, segment_ids)
    return hidden


def unembedding(graphdef, params: Params) -> jax.Array:
    return _transformer(graphdef, params).unembedding()


def apply_with_cache(graphdef, params: Params, tokens, positions, segment_ids, cache: KVCache):
    """One prefill or decode call: writes the new keys/values at cache['index'] and attends over
    the cache. Returns (float32 logits [B,T,V], new cache)."""
    return _transformer(graphdef, params)(tokens, positions, segment_ids, cache)


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: str | None = None) -> KVCache:
    """An empty key/value cache for `max_length` slots."""
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.resolved_head_dim)
    cache_dtype = _dtype(dtype or config.dtype)
    return {
        "k": jnp.zeros(shape, cache_dtype),
        "v": jnp.zeros(shape, cache_dtype),
        "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def count_params(params: Params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def flops_per_token(config: ModelConfig, seq_len: int, num_params: int | None = None) -> float:
    """Training FLOPs per token: 6 * (non-embedding matmul params + output head) + attention
    12 * L * T * (N * H) (QK^T and AV, forward + backward, full causal T x T as XLA computes it)."""
    d, layers = config.d_model, config.num_layers
    n, kv, h, f = config.num_heads, config.num_kv_heads, config.resolved_head_dim, config.resolved_d_ff
    per_layer = d * n * h + 2 * d * kv * h + n * h * d + 3 * d * f
    matmul_params = layers * per_layer + d * config.vocab_size
    return 6.0 * matmul_params + 12.0 * layers * seq_len * n * h
