"""Decode speed with the KV cache vs re-running the whole sequence for every new token. JSON out.

    .venv/bin/python tools/bench_generate.py                       # tiny preset, batch 1, 256 new tokens
    .venv/bin/python tools/bench_generate.py --batch-size 8 --preset small --out bench.json

Both paths are greedy, jitted once, and run the same number of tokens (no early stop). The uncached
path keeps a fixed [B, P + N] buffer and runs the full forward pass over it at every step (one
compilation; causality hides the unfilled slots), which is what generation without a cache costs.
The tokens of the two paths are compared as a check. Random-init weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxllm import generate as gen  # noqa: E402
from jaxllm import model as model_lib  # noqa: E402
from jaxllm.config import load_config  # noqa: E402


@functools.partial(jax.jit, static_argnums=(0, 4))
def greedy_without_cache(graphdef, params, tokens, segments, new_tokens: int):
    """Left-padded prompts [B,P] -> [B,N] greedy tokens, recomputing the full [B, P+N] forward per token."""
    batch, width = tokens.shape
    buffer = jnp.concatenate([tokens, jnp.zeros((batch, new_tokens), tokens.dtype)], axis=1)
    all_segments = jnp.concatenate([segments, jnp.ones((batch, new_tokens), segments.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(all_segments, axis=1) - 1, 0)

    def body(step, buffer):
        logits = model_lib.apply(graphdef, params, buffer, positions, all_segments)
        next_token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, width - 1 + step, axis=1, keepdims=False), -1)
        return jax.lax.dynamic_update_slice_in_dim(buffer, next_token[:, None].astype(buffer.dtype), width + step, 1)

    return jax.lax.fori_loop(0, new_tokens, body, buffer)[:, width:]


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call seconds incl. compilation, best of `repeats` later calls, last result)."""
    started = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - started
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - started)
    return first, best, result


def run(preset: str, batch_size: int, prompt_length: int, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    config = load_config(None, [f"model.preset={preset}", f"model.max_seq_len={prompt_length + new_tokens}"]).model
    graphdef, params = model_lib.init_model(config, seed)
    rng = np.random.default_rng(seed)
    prompts = [[2] + rng.integers(10, config.vocab_size, prompt_length - 1).tolist() for _ in range(batch_size)]
    settings = gen.SamplingSettings(max_new_tokens=new_tokens, temperature=0.0, stop_ids=())
    cached_first, cached, output = _timed(lambda: gen.generate(config, graphdef, params, prompts, settings),
                                          repeats)
    tokens, segments = gen.left_pad(prompts, gen.bucket(prompt_length), len(prompts))
    uncached_first, uncached, recomputed = _timed(
        lambda: greedy_without_cache(graphdef, params, jnp.asarray(tokens), jnp.asarray(segments), new_tokens),
        repeats)
    agree = float(np.mean(np.asarray(recomputed) == output.tokens))
    generated = batch_size * new_tokens
    return {
        "preset": preset, "parameters": model_lib.count_params(params), "batch_size": batch_size,
        "prompt_tokens": prompt_length, "new_tokens": new_tokens, "repeats": repeats,
        "cached_tokens_per_second": generated / cached, "uncached_tokens_per_second": generated / uncached,
        "speedup": uncached / cached, "cached_seconds": cached, "uncached_seconds": uncached,
        "cached_first_call_seconds": cached_first, "uncached_first_call_seconds": uncached_first,
        "greedy_tokens_agree": agree,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}", "device_count": jax.device_count(),
        "host": platform.machine(), "jax": jax.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run(args.preset, args.batch_size, args.prompt_length, args.new_tokens, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
