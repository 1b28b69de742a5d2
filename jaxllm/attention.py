"""Position encoding and attention for the model: RoPE (with Hugging Face's scalings) and the attention
implementations (reference einsum, XLA, cuDNN flash with packed documents, block-causal with a
hand-written backward), chosen by `resolve_attention` and called through `attend`.

Shapes as in model.py: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
Packed rows: a token attends only to earlier tokens of its own segment (1, 2, ...; 0 is padding), in every
implementation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # a masked score: finite, so an all-masked row is not NaN


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray | None, float]:
    """(inverse frequencies [H/2] float32, cos/sin scale) of `config.rope_scaling`, computed as Hugging
    Face does; (None, 1.0) for plain RoPE. linear: positions / factor; llama3: long wavelengths / factor,
    smoothed between low_freq_factor and high_freq_factor; yarn: NTK-by-parts blend plus attention factor."""
    kind = config.rope_scaling
    if kind == "none":
        return None, 1.0
    dim = config.resolved_head_dim
    base, factor = config.rope_theta, config.rope_scaling_factor
    inv_freq = (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    original = config.rope_original_max_len or config.max_seq_len
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    if kind == "llama3":
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) & ~(wavelen > original / low)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    attention_factor = config.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.rope_beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
    extrapolation = 1 - ramp
    interpolated = inv_freq / np.float32(factor)
    return (interpolated * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32), attention_factor


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float, inv_freq: np.ndarray | None = None,
                     attention_factor: float = 1.0) -> jax.Array:
    """Rotates pairs (first half, second half) of the head dim. x [B,T,N,H], positions [B,T].
    `inv_freq` [H/2] replaces theta's frequencies (rope scaling); `attention_factor` scales cos and sin."""
    return apply_rotary(x, rotary_table(positions, x.shape[-1], theta, inv_freq, attention_factor))


def rotary_table(positions: jax.Array, head_dim: int, theta: float, inv_freq: np.ndarray | None = None,
                 attention_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The cos and sin factors of `apply_rotary` for positions [B,T]: two float32 [B,T,1,2,H/2].
    Computed once per forward call on the cached path and shared by every layer's q and k."""
    if inv_freq is None:
        fraction = jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim
        inv_freq = 1.0 / (theta**fraction)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    if attention_factor != 1.0:
        sin, cos = sin * attention_factor, cos * attention_factor
    # x * cos + rotate_half(x) * sin with the halves on a [..., 2, H/2] pair axis: rotate_half is a flip of
    # that axis with signs folded into sin. No split/concatenate, so neither pass (nor its backward)
    # needs a per-element select between the halves (XLA CPU: ~3% of the 25m step).
    cos_pair = jnp.stack([cos, cos], axis=-2)[:, :, None]  # [B,T,1,2,H/2]
    sin_pair = jnp.stack([-sin, sin], axis=-2)[:, :, None]
    return cos_pair, sin_pair


def apply_rotary(x: jax.Array, table: tuple[jax.Array, jax.Array]) -> jax.Array:
    """x [B,T,N,H] rotated by a `rotary_table` of its positions."""
    cos_pair, sin_pair = table
    head_dim = x.shape[-1]
    halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, head_dim // 2)
    rotated = halves * cos_pair + jnp.flip(halves, axis=-2) * sin_pair
    return rotated.reshape(x.shape).astype(x.dtype)


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
    scores = jnp.where(mask, scores, MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v)
    return out.reshape(q.shape)


def xla_attention(q, k, v, q_index, kv_index, q_segment, kv_segment, implementation: str = "xla") -> jax.Array:
    mask = attention_mask(q_index, kv_index, q_segment, kv_segment)[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def cached_attention(q, k_cache, v_cache, mask) -> jax.Array:
    """Attention over a key/value cache (prefill and decode). q [B,T,N,H]; k_cache [B,K,H,S] (keys
    stored transposed); v_cache [B,K,S,H]; mask [B,T,S] bool (the caller builds it once for all layers).
    The reference's math (float32 softmax, masked scores MASK_VALUE) in the cache's layout: with keys
    [H,S] per head the decode step's score matmul needs no transpose of the cache (XLA CPU: the
    [B,S,K,H] layout copied the whole cache into [B,K,H,S] in every layer of every step)."""
    batch, length, heads, head_dim = q.shape
    num_kv = k_cache.shape[1]
    # Decode: the wider of q's and the cache's dtypes (a float32 cache of a bf16 model, on CPU, is read as it is);
    # prefill: q's (its products have many rows, and XLA CPU's bf16 kernels take them).
    compute = q.dtype if length > 1 else jnp.promote_types(q.dtype, k_cache.dtype)
    # Head-major [B,K,G,T,H] (a free reshape when T = 1): both matmuls then have batch dims (b, k) first
    # and the operand order XLA CPU hands to its fast matmul library.
    qg = _grouped(q, num_kv).transpose(0, 2, 3, 1, 4).astype(compute)
    scores = jnp.einsum("bkgth,bkhs->bkgts", qg, k_cache.astype(compute),
                        preferred_element_type=jnp.float32) * head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(compute)
    out = jnp.einsum("bkgts,bksh->bkgth", weights, v_cache.astype(compute), preferred_element_type=jnp.float32)
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def cache_mask(q_index, q_segment, kv_segment) -> jax.Array:
    """[B,T,S] bool for cached attention: query t at slot q_index [B,T] sees slot s <= q_index of its own
    segment (kv_segment [B,S], 0 = empty or padding)."""
    slots = jnp.arange(kv_segment.shape[1])[None, None, :]
    same_segment = q_segment[:, :, None] == kv_segment[:, None, :]
    return (slots <= q_index[:, :, None]) & same_segment & (kv_segment[:, None, :] != 0)


CUDNN_MAX_SEGMENTS = 16  # packed rows with more documents take cuDNN's (slower, exact) segment-bias path


def packed_segments(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cuDNN's packed layout of rows of contiguous documents. segment_ids [B,T] (1, 2, ...; 0 = padding)
    -> (lengths [B,M], starts [B,M+1], both -1 where no segment; exact: [] bool, whether the layout
    reproduces every row's ids, false when a row has more than M documents, non-contiguous ones, or none)."""
    batch, length = segment_ids.shape
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    lengths = jnp.sum(segment_ids[:, None, :] == ids[None, :, None], axis=-1, dtype=jnp.int32)  # [B,M]
    starts = jnp.cumsum(lengths, axis=1) - lengths
    t = jnp.arange(length, dtype=jnp.int32)[None, None, :]
    inside = (t >= starts[..., None]) & (t < (starts + lengths)[..., None])  # [B,M,T]
    rebuilt = jnp.sum(jnp.where(inside, ids[None, :, None], 0), axis=1)
    present = lengths > 0
    exact = jnp.all(rebuilt == segment_ids) & jnp.all(jnp.any(present, axis=1))  # and no all-padding row
    none = jnp.full((batch, 1), -1, jnp.int32)
    return (jnp.where(present, lengths, -1), jnp.concatenate([jnp.where(present, starts, -1), none], axis=1),
            exact)


def cudnn_attention(q, k, v, q_index, kv_index, q_segment, kv_segment) -> jax.Array:
    """cuDNN flash attention (GPU, 16-bit compute) for training (T == S, rows in order).

    Rows of up to CUDNN_MAX_SEGMENTS contiguous documents use cuDNN's packed layout (per-document
    lengths and offsets, causal inside each: no mask tensor, about 2x faster on an H100); any other
    batch takes the kernel's causal mask plus the segment mask as a bias. Both are exact."""
    del q_index, kv_index  # causality by row order, which the kernel's causal masks use

    def biased():
        same_segment = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
        return jax.nn.dot_product_attention(q, k, v, mask=same_segment[:, None], is_causal=True,
                                            implementation="cudnn")

    try:  # the packed layout is only in JAX's cuDNN module, not in jax.nn
        from jax._src.cudnn.fused_attention_stablehlo import MaskType
        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_sdpa
    except ImportError:
        return biased()
    lengths, starts, exact = packed_segments(q_segment, CUDNN_MAX_SEGMENTS)

    def packed():
        out = cudnn_sdpa(q, k, v, None, None, lengths, lengths, starts, starts, scale=q.shape[-1] ** -0.5,
                         mask_type=MaskType.PADDING_CAUSAL)
        return jnp.where((q_segment != 0)[:, :, None, None], out, 0).astype(q.dtype)  # padding rows: 0, never NaN

    return jax.lax.cond(exact, packed, biased)


def blockwise_attention(q, k, v, q_index, kv_index, q_segment, kv_segment, block_size: int) -> jax.Array:
    """Block-causal attention for training (T == S, rows in order): query block i only scores key
    blocks 0..i, so the upper triangle of the T x T scores is never built. Exact.

    q, k and v are put in head-major layout ([B,K,G,T,H], [B,K,S,H]) once, outside the block loop, so
    every block's matmuls read them without a transpose of their own (CPU: fewer layout copies). The
    backward is written by hand (`_block_causal`): it recomputes each block's probabilities with
    keys on rows, so that no backward matmul needs a transposed left operand (XLA CPU sends those to
    a slow fallback kernel)."""
    length = q.shape[1]
    if length % block_size or length <= block_size:
        return reference_attention(q, k, v, q_index, kv_index, q_segment, kv_segment)
    num_kv = k.shape[2]
    queries = _grouped(q, num_kv).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,H]
    out = _block_causal(queries, keys, values, q_index, kv_index, q_segment, kv_segment, block_size)
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape)


def _block_causal_forward(q, k, v, q_index, kv_index, q_segment, kv_segment, block_size):
    """q [B,K,G,T,H], k/v [B,K,S,H] -> (out [B,K,G,T,H], row max m and row sum l [B,K,G,T] of the
    unnormalised probabilities exp(score - m), float32)."""
    scale = q.shape[-1] ** -0.5
    outputs, maxima, sums = [], [], []
    for start in range(0, q.shape[3], block_size):
        stop = start + block_size
        scores = jnp.einsum("bkgth,bksh->bkgts", q[:, :, :, start:stop], k[:, :, :stop],
                            preferred_element_type=jnp.float32) * scale
        mask = attention_mask(q_index[:, start:stop], kv_index[:, :stop], q_segment[:, start:stop],
                              kv_segment[:, :stop])[:, None, None]
        scores = jnp.where(mask, scores, MASK_VALUE)
        row_max = jnp.max(scores, axis=-1)
        probs = jnp.exp(scores - row_max[..., None])
        row_sum = jnp.sum(probs, axis=-1)
        out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v[:, :, :stop],
                         preferred_element_type=jnp.float32)
        outputs.append((out / row_sum[..., None]).astype(q.dtype))
        maxima.append(row_max)
        sums.append(row_sum)
    return jnp.concatenate(outputs, axis=3), jnp.concatenate(maxima, axis=3), jnp.concatenate(sums, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _block_causal(q, k, v, q_index, kv_index, q_segment, kv_segment, block_size):
    return _block_causal_forward(q, k, v, q_index, kv_index, q_segment, kv_segment, block_size)[0]


def _block_causal_fwd(q, k, v, q_index, kv_index, q_segment, kv_segment, block_size):
    out, row_max, row_sum = _block_causal_forward(q, k, v, q_index, kv_index, q_segment, kv_segment, block_size)
    return out, (q, k, v, q_index, kv_index, q_segment, kv_segment, out, row_max, row_sum)


def _block_causal_bwd(block_size, residuals, d_out):
    """Per query block, with keys on rows ([.., S, Tb]): P^T = exp(S^T - m) / l, dV += P^T dO,
    dP^T = V dO^T, dS^T = P^T (dP^T - rowsum(dO * O)), dK += dS^T Q, dQ = dS K. Masked scores get no
    gradient (as through `where` in the reference), which matters for all-padding query rows."""
    q, k, v, q_index, kv_index, q_segment, kv_segment, out, row_max, row_sum = residuals
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,K,G,T]
    d_k = jnp.zeros(k.shape, jnp.float32)
    d_v = jnp.zeros(v.shape, jnp.float32)
    d_q_blocks = []
    for start in range(0, q.shape[3], block_size):
        stop = start + block_size
        q_block, d_out_block = q[:, :, :, start:stop], d_out[:, :, :, start:stop]
        keys, values = k[:, :, :stop], v[:, :, :stop]
        scores_t = jnp.einsum("bksh,bkgth->bkgst", keys, q_block, preferred_element_type=jnp.float32) * scale
        mask_t = attention_mask(q_index[:, start:stop], kv_index[:, :stop], q_segment[:, start:stop],
                                kv_segment[:, :stop]).transpose(0, 2, 1)[:, None, None]  # [B,1,1,S,Tb]
        block = (slice(None), slice(None), slice(None), None, slice(start, stop))
        probs_t = jnp.exp(jnp.where(mask_t, scores_t, MASK_VALUE) - row_max[block]) / row_sum[block]
        d_v = d_v.at[:, :, :stop].add(jnp.einsum("bkgst,bkgth->bksh", probs_t.astype(v.dtype), d_out_block,
                                                 preferred_element_type=jnp.float32))
        d_probs_t = jnp.einsum("bksh,bkgth->bkgst", values, d_out_block, preferred_element_type=jnp.float32)
        d_scores_t = jnp.where(mask_t, probs_t * (d_probs_t - delta[block]) * scale, 0.0).astype(q.dtype)
        d_k = d_k.at[:, :, :stop].add(jnp.einsum("bkgst,bkgth->bksh", d_scores_t, q_block,
                                                 preferred_element_type=jnp.float32))
        d_q_blocks.append(jnp.einsum("bkgst,bksh->bkgth", d_scores_t, keys, preferred_element_type=jnp.float32))
    d_q = jnp.concatenate(d_q_blocks, axis=3)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None, None, None


_block_causal.defvjp(_block_causal_fwd, _block_causal_bwd)


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
