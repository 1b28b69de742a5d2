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

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.attention import (apply_rotary, attend, cache_mask, cached_attention, resolve_attention, rope_frequencies,
                              rotary_table)
from jaxllm.config import ModelConfig
from jaxllm.sharding import constrain

# Re-exported: the attention implementations and RoPE, importable as jaxllm.model.X as before.
from jaxllm.attention import (  # noqa: F401
    CUDNN_MAX_SEGMENTS, attention_mask, blockwise_attention, cudnn_attention, packed_segments, reference_attention,
    rotary_embedding, xla_attention)

Params = dict[str, Any]
# {"k": L x [B,K,H,S] (keys transposed), "v": L x [B,K,S,H], "segment_ids": [B,S], "index": []}: one array per
# layer, so a decode step updates each in place and attends over it without slicing a stacked cache.
KVCache = dict[str, Any]


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float, dtype: str) -> nnx.Param:
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(_dtype(dtype)), logical_axes=axes)


def _ones(shape: tuple[int, ...], axes: tuple[str, ...], dtype: str) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, _dtype(dtype)), logical_axes=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale; with `unit_offset` (Gemma) * (1 + scale), the scale starting at 0."""

    def __init__(self, dim: int, eps: float, param_dtype: str, unit_offset: bool = False):
        self.scale = nnx.Param(jnp.zeros((dim,), _dtype(param_dtype)), logical_axes=("norm",)) if unit_offset \
            else _ones((dim,), ("norm",), param_dtype)
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (normed * (1.0 + scale if self.unit_offset else scale)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_targets(config: ModelConfig) -> tuple[str, ...]:
    """The projections that carry LoRA adapters (none when config.lora_rank == 0)."""
    if not config.lora_rank:
        return ()
    return tuple(t for t in LORA_TARGETS if t in {s.strip() for s in config.lora_targets.split(",")})


def _zeros(shape: tuple[int, ...], axes: tuple[str, ...], dtype: str) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, _dtype(dtype)), logical_axes=axes)


def _add_lora(module: nnx.Module, name: str, config: ModelConfig, rngs: nnx.Rngs, in_shape: tuple[int, ...],
              in_axes: tuple[str, ...], out_shape: tuple[int, ...], out_axes: tuple[str, ...]) -> None:
    """Adapters of projection `name`: A [*in, r] (random, std 1/sqrt(fan-in)) and B [r, *out] (zeros), so a
    fresh adapter changes nothing. float32 nnx.LoRAParam variables `{name}_lora_a` / `{name}_lora_b`."""
    if name not in lora_targets(config):
        return
    rank, fan_in = config.lora_rank, math.prod(in_shape)
    a = fan_in**-0.5 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, in_shape + (rank,), jnp.float32)
    setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, logical_axes=in_axes + ("lora_rank",)))
    setattr(module, f"{name}_lora_b", nnx.LoRAParam(jnp.zeros((rank,) + out_shape, jnp.float32),
                                                    logical_axes=("lora_rank",) + out_axes))


def on_cpu() -> bool:
    """Whether this process computes on CPU (XLA CPU's matmul layouts, unrolled layers)."""
    return jax.devices()[0].platform == "cpu"


def _is_16bit(dtype) -> bool:
    """bf16/fp16: the dtypes XLA CPU upcasts around its matmul library unless the operands are laid out for it."""
    return jnp.dtype(dtype).itemsize < 4


def matmul_rows(x: jax.Array, weight: jax.Array, contract: int = 1, preferred_element_type=None) -> jax.Array:
    """tensordot(x, weight, contract): x's last `contract` dims against weight's first, as one 2-D matmul
    [rows, in] x [in, out] with every leading dim of x folded into the rows (free reshapes). On CPU its
    backward puts every matmul in the operand layout XLA CPU's fast matmul library takes (`_cpu_matmuls`)."""
    return matmul_rows_shared(x, (weight,), contract, preferred_element_type)[0]


def matmul_rows_shared(x: jax.Array, weights: tuple[jax.Array, ...], contract: int = 1,
                       preferred_element_type=None) -> tuple[jax.Array, ...]:
    """`matmul_rows(x, w)` for each of `weights` (q/k/v, gate/up): on CPU the backward transposes x once
    for all of their weight gradients."""
    lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    for weight in weights:
        if weight.shape[:contract] != inner:
            raise ValueError(f"matmul_rows: x {x.shape} and weight {weight.shape} do not match over {contract} dims")
    rows = x.reshape(math.prod(lead), math.prod(inner))
    matrices = tuple(w.reshape(math.prod(inner), math.prod(w.shape[contract:])) for w in weights)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(rows, *matrices))
    if on_cpu():
        outs = _cpu_matmuls(out_dtype, rows, matrices)
    else:
        outs = tuple(jnp.matmul(rows, m, preferred_element_type=preferred_element_type) for m in matrices)
    return tuple(out.reshape(*lead, *w.shape[contract:]) for out, w in zip(outs, weights))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cpu_matmuls(out_dtype, rows: jax.Array, matrices: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """rows [N, I] @ each matrix [I, O] -> [N, O] in out_dtype, with a backward written for XLA CPU.

    A weight gradient rows^T . d_out contracts the leading dim of both operands; XLA CPU runs that either
    as its slower generic matmul or (from [B,T,...] einsums) after copying the large [N, O] cotangent into a
    transposed layout. Here one operand is transposed explicitly and each product is a plain [I, N] x [N, O]
    (rows^T, shared by all the matrices) or, for a single matrix with O < I, [O, N] x [N, I] with the small
    result transposed (`_row_major_transpose`); optimization barriers keep XLA from folding the transposes back
    into the matmuls. The S-sized step (d256, 4 layers, 2 cores, AVX-512): 6% faster than the einsums' backward."""
    if _is_16bit(rows.dtype):  # 16-bit operands with a float32 result: the bf16 kernels (AMX)
        return tuple(jnp.matmul(rows, m, preferred_element_type=jnp.float32).astype(out_dtype) for m in matrices)
    return tuple(jnp.matmul(rows, m, preferred_element_type=out_dtype) for m in matrices)


def _row_major_transpose(a: jax.Array) -> jax.Array:
    """a [N, I] -> a^T [I, N] that XLA CPU lays out row-major, as its matmul library (YNNPACK) takes a left operand.

    A plain 2-D transpose enters XLA with a column-major layout (a free bitcast of `a`), so a bf16 matmul on it
    is refused by the library and upcast to float32 (on AMX: 3.8x slower than the bf16 kernels, the transpose
    included). Through a 3-D transpose the result is a row-major copy. float32: the same program time."""
    return jnp.transpose(a[:, :, None], (2, 1, 0)).reshape(a.shape[1], a.shape[0])


def _cpu_matmuls_forward(out_dtype, rows, matrices):
    return _cpu_matmuls(out_dtype, rows, matrices), (rows, matrices)


def _cpu_matmuls_backward(out_dtype, residuals, d_outs):
    del out_dtype
    rows, matrices = residuals
    accumulate, barrier = jnp.float32, jax.lax.optimization_barrier
    if _is_16bit(rows.dtype):  # a float32 cotangent (the logits') meets 16-bit operands in their dtype
        d_outs = tuple(d.astype(rows.dtype) for d in d_outs)
    # d . m^T as a dot contracting both operands' last dim: a `m.T` op would enter XLA column-major (see
    # `_row_major_transpose`), which its matmul library refuses for bf16
    d_rows = sum(jax.lax.dot_general(d, m, (((1,), (1,)), ((), ())), preferred_element_type=accumulate)
                 for d, m in zip(d_outs, matrices))
    if len(matrices) == 1 and matrices[0].shape[1] < matrices[0].shape[0]:  # O < I: transpose the cotangent
        d_matrices = (barrier(jnp.matmul(barrier(_row_major_transpose(d_outs[0])), rows,
                                         preferred_element_type=accumulate)).T,)
    else:
        rows_t = barrier(_row_major_transpose(rows))
        d_matrices = tuple(barrier(jnp.matmul(rows_t, d, preferred_element_type=accumulate)) for d in d_outs)
    return d_rows.astype(rows.dtype), tuple(d.astype(m.dtype) for d, m in zip(d_matrices, matrices))


_cpu_matmuls.defvjp(_cpu_matmuls_forward, _cpu_matmuls_backward)


def _project_shared(module: nnx.Module, names: tuple[str, ...], x: jax.Array, weights: tuple[jax.Array, ...],
                    contract: int, dtype) -> tuple[jax.Array, ...]:
    """x's last `contract` dims times each weight's first (`matmul_rows_shared`), plus the LoRA term
    (x . A) . B * alpha / rank of each name that has adapters."""
    outs = matmul_rows_shared(x, tuple(w.astype(dtype) for w in weights), contract)
    return tuple(_add_lora_term(module, name, x, out, dtype) for name, out in zip(names, outs))


def _project(module: nnx.Module, name: str, x: jax.Array, weight: jax.Array, contract: int, dtype) -> jax.Array:
    """`_project_shared` of one weight."""
    return _project_shared(module, (name,), x, (weight,), contract, dtype)[0]


def _add_lora_term(module: nnx.Module, name: str, x: jax.Array, out: jax.Array, dtype) -> jax.Array:
    if not hasattr(module, f"{name}_lora_a"):
        return out
    a = getattr(module, f"{name}_lora_a")[...].astype(dtype)
    b = getattr(module, f"{name}_lora_b")[...].astype(dtype)
    low = jnp.tensordot(x, a, axes=a.ndim - 1)  # [..., r]
    config = module.config
    return out + (config.lora_alpha / config.lora_rank) * jnp.tensordot(low, b, axes=1)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, n, kv, h = config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim
        std, pd = config.init_std, config.param_dtype
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pd)
        self.k_proj = _param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.v_proj = _param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std, pd)
        out_std = std / (2 * config.num_layers) ** 0.5
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pd)
        if config.attention_bias:
            self.q_bias = _zeros((n, h), ("heads", "head_dim"), pd)
            self.k_bias = _zeros((kv, h), ("kv_heads", "head_dim"), pd)
            self.v_bias = _zeros((kv, h), ("kv_heads", "head_dim"), pd)
        if config.attention_out_bias:
            self.o_bias = _zeros((d,), ("embed",), pd)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, pd, config.norm_unit_offset)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, pd, config.norm_unit_offset)
        for name, heads, axis in (("q", n, "heads"), ("k", kv, "kv_heads"), ("v", kv, "kv_heads")):
            _add_lora(self, name, config, rngs, (d,), ("embed",), (heads, h), (axis, "head_dim"))
        _add_lora(self, "o", config, rngs, (n, h), ("heads", "head_dim"), (d,), ("embed",))
        self.config = config

    def _qkv(self, x, rope):
        """x [B,T,D] -> q [B,T,N,H], k and v [B,T,K,H]; q and k rotated by `rope` (a rotary_table)."""
        c = self.config
        dtype = _dtype(c.dtype)
        q, k, v = _project_shared(self, ("q", "k", "v"), x, (self.q_proj[...], self.k_proj[...], self.v_proj[...]),
                                  1, dtype)
        if c.attention_bias:
            q, k, v = (y + bias[...].astype(dtype) for y, bias in ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.attention_scale:  # the attention functions scale by head_dim ** -0.5
            q = q * jnp.asarray(c.attention_scale * c.resolved_head_dim**0.5, dtype)
        q = constrain(apply_rotary(q, rope), ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rotary(k, rope), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        return q, k, v

    def _output(self, out):
        """[B,T,N,H] -> [B,T,D]."""
        c = self.config
        dtype = _dtype(c.dtype)
        out = _project(self, "o", out, self.o_proj[...], 2, dtype)
        if c.attention_out_bias:
            out = out + self.o_bias[...].astype(dtype)
        return out

    def __call__(self, x, positions, q_index, segment_ids, impl="reference"):
        """x [B,T,D] -> [B,T,D], attending within the rows (training, scoring)."""
        c = self.config
        dtype = _dtype(c.dtype)
        inv_freq, rope_factor = rope_frequencies(c)
        q, k, v = self._qkv(x, rotary_table(positions, c.resolved_head_dim, c.rope_theta, inv_freq, rope_factor))
        out = attend(impl, c.attention_block_size, q, k.astype(dtype), v.astype(dtype), q_index, q_index,
                     segment_ids, segment_ids)
        return self._output(out)

    def with_cache(self, x, rope, mask, cache_kv, cache_index):
        """x [B,T,D] -> ([B,T,D], (k_cache, v_cache)): writes this call's keys and values at slots
        [cache_index, cache_index + T) of the layer's cache (k [B,K,H,S], v [B,K,S,H]) and attends over it.
        `rope` and `mask` [B,T,S] are built once per call for all layers."""
        dtype = _dtype(self.config.dtype)
        q, k, v = self._qkv(x, rope)
        k_cache, v_cache = cache_kv
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype),
                                                      cache_index, axis=3)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype),
                                                      cache_index, axis=2)
        k_cache = constrain(k_cache, ("batch", "kv_heads", "head_dim", "seq"))
        v_cache = constrain(v_cache, ("batch", "kv_heads", "seq", "head_dim"))
        out = cached_attention(q, k_cache, v_cache, mask)
        return self._output(out.astype(dtype)), (k_cache, v_cache)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f, std, pd = config.d_model, config.resolved_d_ff, config.init_std, config.param_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), std / (2 * config.num_layers) ** 0.5, pd)
        for name in ("gate", "up"):
            _add_lora(self, name, config, rngs, (d,), ("embed",), (f,), ("mlp",))
        _add_lora(self, "down", config, rngs, (f,), ("mlp",), (d,), ("embed",))
        self.dtype = _dtype(config.dtype)
        self.config = config

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = _project_shared(self, ("gate", "up"), x, (self.gate_proj[...], self.up_proj[...]), 1, self.dtype)
        hidden = constrain(gated_activation(self.config.mlp_activation, gate, up), ("batch", "seq", "mlp"))
        return _project(self, "down", hidden, self.down_proj[...], 1, self.dtype)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_activation(activation: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up (SwiGLU / GeGLU), [..., F] each. The backward keeps only gate and up and
    recomputes act(gate) in one fused pass: autodiff saved act's intermediates and spent five
    elementwise passes over [tokens, F] on them (3% of the 25m CPU step)."""
    return _ACTIVATIONS[activation](gate) * up


def _gated_forward(activation, gate, up):
    return gated_activation(activation, gate, up), (gate, up)


def _gated_backward(activation, residuals, d_hidden):
    gate, up = residuals
    activated, activation_vjp = jax.vjp(_ACTIVATIONS[activation], gate)
    (d_gate,) = activation_vjp(d_hidden * up)
    return d_gate, d_hidden * activated


gated_activation.defvjp(_gated_forward, _gated_backward)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(config.d_model, config.rms_norm_eps, config.param_dtype,  # noqa: E731
                               config.norm_unit_offset)
        self.attention_norm = norm()
        self.attention = Attention(config, rngs)
        self.mlp_norm = norm()
        self.mlp = MLP(config, rngs)
        if config.post_norms:  # Gemma 2: each sub-layer's output is normed before the residual add
            self.post_attention_norm = norm()
            self.post_mlp_norm = norm()
        self.post_norms = config.post_norms

    def _residuals(self, x, attended):
        """x + attention output (post-normed on Gemma 2), then the MLP sub-layer."""
        if self.post_norms:
            attended = self.post_attention_norm(attended)
        x = x + attended
        mlp_out = self.mlp(self.mlp_norm(x))
        x = x + (self.post_mlp_norm(mlp_out) if self.post_norms else mlp_out)
        return constrain(x, ("batch", "seq", "embed"))

    def __call__(self, x, positions, q_index, segment_ids, impl="reference"):
        return self._residuals(x, self.attention(self.attention_norm(x), positions, q_index, segment_ids, impl))

    def with_cache(self, x, rope, mask, cache_kv, cache_index):
        attended, cache_kv = self.attention.with_cache(self.attention_norm(x), rope, mask, cache_kv, cache_index)
        return self._residuals(x, attended), cache_kv


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scans_layers(config: ModelConfig) -> bool:
    """Whether the training/scoring forward runs one lax.scan over the stacked layers (model.scan_layers:
    true/false, or auto: unrolled on CPU, where it measured 7-10% faster, scanned on accelerators)."""
    choice = config.scan_layers
    if choice in (True, "true"):
        return True
    if choice in (False, "false"):
        return False
    return not on_cpu()


def forward_config(config: ModelConfig) -> ModelConfig:
    """The model config of programs that run the forward pass without differentiating it (evaluation,
    scoring, rollout log-probs, a loaded model's inference): with scan_layers auto, one scan over the layers
    on CPU too. The unrolled layers pay on CPU where a step differentiates through them (the train step,
    +4-13% in `jaxllm bench --levers`); the forward alone runs as fast scanned and compiles in 30-45% less time (eval step [8, T], CLI
    environment, AVX-512: S 114 / 112 ms a batch scanned / unrolled, compile 0.64 / 0.9 s; M 1.50-1.53 /
    1.55 s, compile 0.8-1.1 / 1.6-2.0 s). The params are the same either way (stacked on a layers axis)."""
    if config.scan_layers != "auto":
        return config
    return dataclasses.replace(config, scan_layers="true")


def embedding_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows of the token-embedding table: table [V, D], tokens [B, T] int -> [B, T, D].

    On a mesh the table is gathered over the axes that split D (FSDP's usual per-step weight gather)
    but stays split over the vocabulary: each device looks up the rows of its vocabulary shard (zeros
    elsewhere) and a sum over the vocabulary shards completes the lookup. Without the constraint XLA's
    partitioner replicates the table, then re-partitions it (two "involuntary full rematerializations":
    an all-gather of the whole table every step). Exact: each output is one row plus zeros."""
    table = constrain(table, ("vocab", None))
    return constrain(jnp.take(table, tokens, axis=0), ("batch", "seq", "embed"))


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
        self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps, config.param_dtype, config.norm_unit_offset)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"), config.init_std,
                                  config.param_dtype)

    def hidden_states(self, tokens, positions, segment_ids, cache: KVCache | None = None, layers=None):
        """tokens/positions/segment_ids [B,T] int -> (final normed hidden [B,T,D], updated cache or None).
        `layers`: with a cache, the per-layer params of `layer_params` (default: sliced here)."""
        c = self.config
        dtype = _dtype(c.dtype)
        x = embedding_lookup(self.embed[...], tokens).astype(dtype)
        if c.scale_embeddings:
            x = x * jnp.asarray(c.d_model**0.5, dtype)
        x = constrain(x, ("batch", "seq", "embed"))
        if cache is not None:
            return self._hidden_states_with_cache(x, positions, segment_ids, cache, layers)
        impl = resolve_attention(c, decoding=False)
        batch, length = tokens.shape
        q_index = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
        graphdef, layer_states = nnx.split(self.blocks)

        def layer(x, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x, positions, q_index, segment_ids, impl)

        if c.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[c.remat])

        if scans_layers(c):
            x, _ = jax.lax.scan(lambda x, layer_state: (layer(x, layer_state), None), x, layer_states)
        else:
            for i in range(c.num_layers):
                x = layer(x, jax.tree.map(lambda a, i=i: a[i], layer_states))
        return self.final_norm(x), None

    def _hidden_states_with_cache(self, x, positions, segment_ids, cache: KVCache, layers=None):
        """Prefill or decode: the layers unrolled (whatever scan_layers says), each writing its own cache
        arrays in place and attending over them where they lie. Through a scan over the stacked cache,
        XLA CPU copied the whole cache several times per token (slicing each layer's cache out, writing it
        back, transposing it for the score matmul): 60% of a tiny decode step. The mask and rotary table
        are built once here for all layers."""
        c = self.config
        batch, length = segment_ids.shape
        cache_index = cache["index"]
        cache_segment = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, cache_index, 1)
        q_index = jnp.broadcast_to(cache_index + jnp.arange(length)[None], (batch, length))
        mask = cache_mask(q_index, segment_ids, cache_segment)
        inv_freq, rope_factor = rope_frequencies(c)
        rope = rotary_table(positions, c.resolved_head_dim, c.rope_theta, inv_freq, rope_factor)
        graphdef, layer_states = nnx.split(self.blocks)
        keys, values = [], []
        for i in range(c.num_layers):
            layer_state = layers[i] if layers is not None else jax.tree.map(lambda a, i=i: a[i], layer_states)
            block = nnx.merge(graphdef, layer_state)
            x, (k, v) = block.with_cache(x, rope, mask, (cache["k"][i], cache["v"][i]), cache_index)
            keys.append(k)
            values.append(v)
        new_cache = {"k": tuple(keys), "v": tuple(values), "segment_ids": cache_segment,
                     "index": cache_index + length}
        return self.final_norm(x), new_cache

    def unembedding(self, dtype=None) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied), cast to `dtype` (default: the params')."""
        if not self.config.tie_embeddings:
            head = self.lm_head[...]
            return head.astype(dtype or head.dtype)
        embed = self.embed[...]
        embed = embed.astype(dtype or embed.dtype)
        if _is_16bit(embed.dtype) and on_cpu():
            return _row_major_transpose(embed)  # as `embed.T`, XLA CPU would upcast the 16-bit matmuls
        return embed.T

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B,T,D] -> float32 logits [B,T,V]."""
        unembed = self.unembedding(hidden.dtype)
        logits = matmul_rows(hidden, unembed, 1, preferred_element_type=jnp.float32)
        if self.config.final_logit_softcap:
            cap = self.config.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return constrain(logits, ("batch", "seq", "vocab"))

    def __call__(self, tokens, positions, segment_ids, cache: KVCache | None = None, layers=None,
                 last_only: bool = False):
        hidden, new_cache = self.hidden_states(tokens, positions, segment_ids, cache, layers)
        return self.logits(hidden[:, -1:] if last_only else hidden), new_cache


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


def unembedding(graphdef, params: Params, dtype=None) -> jax.Array:
    """[D, V] output projection in `dtype` (default: the params'; `Transformer.unembedding`)."""
    return _transformer(graphdef, params).unembedding(dtype)


def apply_with_cache(graphdef, params: Params, tokens, positions, segment_ids, cache: KVCache, layers=None,
                     last_only: bool = False):
    """One prefill or decode call: writes the new keys/values at cache['index'] and attends over
    the cache. Returns (float32 logits [B,T,V], new cache); `last_only`: the last position's [B,1,V] alone
    (a prefill that samples from it skips the lm head over the prompt: XLA does not move the slice before it).
    `layers`: `layer_params(params)`, when the caller has split them once outside its decode loop."""
    return _transformer(graphdef, params)(tokens, positions, segment_ids, cache, layers, last_only)


def layer_params(params: Params) -> tuple[Params, ...]:
    """The stacked block params (leaves [L, ...]) as L per-layer trees. A decode loop takes them once,
    before the loop: XLA CPU does not hoist the per-layer weight slices out of a while loop, and
    copied every layer's weights on every token (~10% of a tiny decode step)."""
    blocks = params["blocks"]
    num_layers = jax.tree.leaves(blocks)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(num_layers))


def default_cache_dtype(config: ModelConfig) -> str:
    """The compute dtype, except float32 for a 16-bit model on CPU: XLA CPU has no bf16 kernel for the decode
    step's batched matrix-vector products over the cache, and converted the whole cache to float32 in every layer
    of every step (25m, MHA, batch 8, 1,024 slots: the key products 17.2 ms a step in bf16, 5.4 ms in float32).
    The cached keys and values are the bf16 ones, held exactly; the cache takes twice the memory."""
    if _is_16bit(_dtype(config.dtype)) and on_cpu():
        return "float32"
    return config.dtype


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: str | None = None) -> KVCache:
    """An empty key/value cache for `max_length` slots: per layer keys [B,K,H,S] and values [B,K,S,H], in
    `dtype` (default `default_cache_dtype`)."""
    kv, head_dim = config.num_kv_heads, config.resolved_head_dim
    cache_dtype = _dtype(dtype or default_cache_dtype(config))
    layers = range(config.num_layers)
    return {
        "k": tuple(jnp.zeros((batch_size, kv, head_dim, max_length), cache_dtype) for _ in layers),
        "v": tuple(jnp.zeros((batch_size, kv, max_length, head_dim), cache_dtype) for _ in layers),
        "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def count_params(params: Params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def param_bytes(params: Params) -> int:
    """Bytes of a params tree (arrays or ShapeDtypeStructs) in its own dtypes."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def flops_per_token(config: ModelConfig, seq_len: int, num_params: int | None = None) -> float:
    """Training FLOPs per token: 6 * (non-embedding matmul params + output head) + attention
    12 * L * T * (N * H) (QK^T and AV, forward + backward, full causal T x T as XLA computes it)."""
    d, layers = config.d_model, config.num_layers
    n, kv, h, f = config.num_heads, config.num_kv_heads, config.resolved_head_dim, config.resolved_d_ff
    per_layer = d * n * h + 2 * d * kv * h + n * h * d + 3 * d * f
    matmul_params = layers * per_layer + d * config.vocab_size
    return 6.0 * matmul_params + 12.0 * layers * seq_len * n * h
