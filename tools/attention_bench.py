"""GPU attention micro-benchmark: what the segment mask costs in cuDNN flash attention.

Times forward + backward of one attention layer of the ~1B preset's shape for
  causal        cuDNN's causal mask only (an upper bound: wrong for packed rows)
  causal+bias   the causal mask plus the segment mask as a bias (what model.attention=cudnn runs)
  packed M=k    cuDNN's packed-segment layout (per-segment lengths and offsets, k segments at most)
and checks each exact variant against causal+bias on the same packed rows.

    python tools/attention_bench.py [--batch 8] [--seq 2048] [--heads 32] [--kv-heads 8] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _segments_to_packed(segment_ids: jax.Array, max_segments: int):
    """[B,T] contiguous segment ids 1..n (0 = padding) -> seqlen [B,M], offsets [B,M+1] (-1 padded)."""
    ids = jnp.arange(1, max_segments + 1)
    lengths = jnp.sum(segment_ids[:, None, :] == ids[None, :, None], axis=-1).astype(jnp.int32)  # [B,M]
    starts = jnp.concatenate([jnp.zeros_like(lengths[:, :1]), jnp.cumsum(lengths, axis=1)], axis=1)
    present = jnp.concatenate([lengths > 0, jnp.zeros_like(lengths[:, :1], bool)], axis=1)  # starts only
    seqlen = jnp.where(lengths > 0, lengths, -1)
    offsets = jnp.where(present, starts, -1).astype(jnp.int32)
    return seqlen, offsets


def check_model_cudnn_against_reference() -> None:
    """model.attention=cudnn vs reference on the same params, bf16: packed rows, rows with more
    documents than the packed layout takes (the bias fallback), and rows with trailing padding."""
    import dataclasses

    from jaxllm import model as model_lib
    from jaxllm.config import ModelConfig

    config = ModelConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256,
                         dtype="bfloat16")
    _, params = model_lib.init_model(config, 0)
    rng = np.random.default_rng(0)
    b, t = 4, 256
    tokens = jnp.asarray(rng.integers(0, 256, (b, t)), jnp.int32)
    cases = {"2 documents": [0, 100, 256], "40 documents (bias fallback)": list(range(0, 241, 6)) + [256],
             "2 documents + padding": [0, 100, 200]}
    for name, bounds in cases.items():
        segments = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        for d in range(len(bounds) - 1):
            segments[:, bounds[d]:bounds[d + 1]] = d + 1
            positions[:, bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
        valid = segments > 0
        outputs = {}
        for impl in ("reference", "cudnn"):
            graphdef, _ = model_lib.abstract_model(dataclasses.replace(config, attention=impl))
            outputs[impl] = np.asarray(jax.jit(model_lib.apply, static_argnums=0)(
                graphdef, params, tokens, jnp.asarray(positions), jnp.asarray(segments)))
        diff = np.abs(outputs["cudnn"] - outputs["reference"])[valid]
        scale = np.abs(outputs["reference"][valid]).max()
        finite = bool(np.isfinite(outputs["cudnn"]).all())
        print(f"  model cudnn vs reference, {name:<30}: max |diff| {diff.max():.4f} "
              f"(logits up to {scale:.2f}), all finite: {finite}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    check_model_cudnn_against_reference()
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_sdpa

    b, t, n, k, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
    split = t * 3 // 5
    segment_ids = jnp.asarray(np.where(np.arange(t) < split, 1, 2)[None].repeat(b, 0), jnp.int32)
    scale = h ** -0.5

    def causal(q, kk, v):
        return jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation="cudnn")

    def causal_bias(q, kk, v):
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        return jax.nn.dot_product_attention(q, kk, v, mask=same[:, None], is_causal=True, implementation="cudnn")

    def packed(max_segments, repeat_kv=False):
        def fn(q, kk, v):
            seqlen, offsets = _segments_to_packed(segment_ids, max_segments)
            kk_, v_ = kk, v
            if repeat_kv and k != n:
                kk_, v_ = (jnp.repeat(x, n // k, axis=2) for x in (kk, v))
            return cudnn_sdpa(q, kk_, v_, None, None, seqlen, seqlen, offsets, offsets, scale=scale,
                              mask_type=MaskType.PADDING_CAUSAL)
        return fn

    variants = {"causal (no segments)": causal, "causal+bias": causal_bias}
    for m in (2, 16):
        variants[f"packed M={m}"] = packed(m)
    variants["packed M=2, kv repeated"] = packed(2, repeat_kv=True)
    cotangent = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    flops = 4 * b * n * h * t * t / 2 * 3.5  # causal half; fwd (2 matmuls) + bwd (5) = 3.5x fwd
    reference = None
    rows = []
    for name, fn in variants.items():
        def fwd_bwd(q, kk, v, fn=fn):
            out, vjp = jax.vjp(fn, q, kk, v)
            return out, vjp(cotangent)
        try:
            jitted = jax.jit(fwd_bwd)
            out = jax.block_until_ready(jitted(q, kk, v))
        except Exception as error:  # noqa: BLE001
            rows.append((name, None, None, f"failed: {str(error).splitlines()[0][:100]}"))
            continue
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            jax.block_until_ready(jitted(q, kk, v))
            times.append(time.perf_counter() - began)
        if name == "causal+bias":
            reference = out
        error = ""
        if reference is not None and name != "causal (no segments)":
            error = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))))
                        for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
            error = f"max |diff| vs causal+bias {error:.3g}"
        median = statistics.median(times)
        rows.append((name, median, flops / median / 1e12, error))
    print(f"attention fwd+bwd, B={b} T={t} N={n} K={k} H={h} bf16, two segments per row, on {jax.devices()[0].device_kind}")
    for name, median, tflops, note in rows:
        if median is None:
            print(f"  {name:<22} {note}")
        else:
            print(f"  {name:<22} {1e3 * median:8.3f} ms  {tflops:6.1f} TFLOP/s (causal FLOPs)  {note}")


if __name__ == "__main__":
    main()
