"""Sampling with a key/value cache: batched, jitted, fixed shapes (prompt records: jaxllm.completions).

    output = generate(model_config, graphdef, params, [[2, 17, 5], [2, 9]], SamplingSettings(temperature=0))
    output.tokens      # [B, N] int32 generated ids (stop token included, pad after it)
    output.logprobs    # [B, N] float32 log p(token | prefix) under the *model* (unprocessed logits), 0 on pad
    output.lengths     # [B] generated tokens per row (stop token included)
    output.finished    # [B] True where the row ended with a stop token (else it hit max_new_tokens)

How: prompts are LEFT-padded to a bucketed width P (pad slots get segment id 0, so no token attends
to them; positions count from 0 at each row's first real token), so every row's next token is
written to the same cache slot. One prefill call fills slots [0, P); then a `lax.while_loop` samples
a token, writes it at slot P + i and runs one decode step, until every row has stopped or N tokens
are out. Shapes depend only on (batch bucket, prompt bucket, N), and the sampling settings are
traced values, not constants, so a handful of compilations serve every prompt and every setting.
Under a mesh (`jax.set_mesh`, or the mesh of sharded params) the same jitted function runs sharded
like training: batch over (data, fsdp), heads over tensor. On a CPU with the model on one device, the batch
runs as row groups side by side, one host thread (and core) each (`host_row_groups`); every row draws the
same random numbers whatever the grouping.

Each step picks its token with `jaxllm.sampling.next_token` (the settings, the logits processors, greedy
argmax or a draw by inverse transform; re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import checkpoint as ckpt
from jaxllm import lora
from jaxllm import model as model_lib
from jaxllm import row_groups as row_groups_lib
from jaxllm import sharding as sharding_lib
from jaxllm import state as state_lib
from jaxllm.config import Config, MeshConfig, ModelConfig, load_config
from jaxllm.data.tokenizer import Tokenizer, check_vocab
from jaxllm.errors import UsageError
from jaxllm.sampling import SamplingParams, SamplingSettings, next_token

# Re-exported: the sampling processors, importable as jaxllm.generate.X as before (defined in jaxllm.sampling).
from jaxllm.sampling import (  # noqa: F401
    LogitsProcessor, argmax, build_processors, categorical, compose, min_p, repetition_penalty, temperature,
    token_bias, top_k, top_p)

Params = dict[str, Any]

PAD_ID, EOS_ID = 0, 3  # jaxllm's fixed special ids (see jaxllm.data.tokenizer)

# ----------------------------------------------------------------------------------------------
# The jitted loop.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Loop carry. step: [] tokens emitted; cache: the KV cache; logits [B,V] for the next token;
    seen [B,V] bool (tokens in the prompt or output, for the repetition penalty); next_position [B];
    done [B] bool; tokens/logprobs [B,N]; lengths [B]; rng: a PRNG key."""

    step: jax.Array
    cache: dict
    logits: jax.Array
    seen: jax.Array
    next_position: jax.Array
    done: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    rng: jax.Array


def _constrain_cache(cache: dict) -> dict:
    key_axes, value_axes = ("batch", "kv_heads", "head_dim", "seq"), ("batch", "kv_heads", "seq", "head_dim")
    return {**cache, "k": tuple(sharding_lib.constrain(k, key_axes) for k in cache["k"]),
            "v": tuple(sharding_lib.constrain(v, value_axes) for v in cache["v"]),
            "segment_ids": sharding_lib.constrain(cache["segment_ids"], ("batch", "seq"))}


def prefill(graphdef, params: Params, prompt_tokens: jax.Array, prompt_segments: jax.Array, rng: jax.Array, *,
            model_config: ModelConfig, max_new_tokens: int, pad_id: int = PAD_ID) -> DecodeState:
    """Runs the left-padded prompts [B,P] (segment 1 on real tokens, 0 on pads) through the model
    into a fresh cache of P + N slots; returns the loop state before the first sampled token."""
    batch, width = prompt_tokens.shape
    cache = _constrain_cache(model_lib.init_cache(model_config, batch, width + max_new_tokens))
    positions = jnp.maximum(jnp.cumsum(prompt_segments, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = model_lib.apply_with_cache(graphdef, params, prompt_tokens, positions, prompt_segments, cache,
                                               last_only=True)
    rows = jnp.arange(batch)[:, None]
    seen = jnp.zeros((batch, model_config.vocab_size), bool).at[rows, prompt_tokens].max(prompt_segments > 0)
    return DecodeState(
        step=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, -1].astype(jnp.float32), seen=seen,
        next_position=jnp.sum(prompt_segments > 0, axis=1).astype(jnp.int32), done=jnp.zeros((batch,), bool),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32), lengths=jnp.zeros((batch,), jnp.int32), rng=rng)


def decode_step(graphdef, params: Params, sampling: SamplingParams, state: DecodeState, *,
                pad_id: int = PAD_ID, layers=None, row_offset: jax.Array | int = 0,
                total_rows: int | None = None) -> DecodeState:
    """Samples one token per row from state.logits, records it, and runs it through the model.
    `layers`: model.layer_params(params), split once outside a decode loop. `row_offset`, `total_rows`: the
    state holds rows [row_offset, row_offset + B) of a batch of total_rows (a row group): each row draws
    the random number it would draw in the whole batch."""
    rng, sample_rng = jax.random.split(state.rng)
    token = next_token(state.logits, state.seen, sample_rng, sampling, row_offset=row_offset, total_rows=total_rows)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(state.logits, axis=-1), token[:, None], axis=-1)[:, 0]
    active = ~state.done
    token = jnp.where(active, token, pad_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(state.logprobs, jnp.where(active, logprob, 0.0)[:, None],
                                                   state.step, axis=1)
    done = state.done | jnp.any(token[:, None] == sampling.stop_ids[None, :], axis=1)
    seen = state.seen.at[jnp.arange(token.shape[0]), token].set(True)
    ones = jnp.ones_like(token)[:, None]
    logits, cache = model_lib.apply_with_cache(graphdef, params, token[:, None], state.next_position[:, None], ones,
                                               state.cache, layers)
    return DecodeState(step=state.step + 1, cache=cache, logits=logits[:, -1].astype(jnp.float32), seen=seen,
                       next_position=state.next_position + 1, done=done, tokens=tokens, logprobs=logprobs,
                       lengths=state.lengths + active.astype(jnp.int32), rng=rng)


def decode_loop(graphdef, params: Params, sampling: SamplingParams, state: DecodeState, *, max_new_tokens: int,
                pad_id: int = PAD_ID, row_offset: jax.Array | int = 0, total_rows: int | None = None) -> DecodeState:
    """Decode steps in one `lax.while_loop` from a prefilled state until every row has stopped or
    max_new_tokens are out. The per-layer weights are split once, before the loop. `row_offset`,
    `total_rows`: see `decode_step`."""
    def keep_going(state):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    step = functools.partial(decode_step, graphdef, params, sampling, pad_id=pad_id,
                             layers=model_lib.layer_params(params), row_offset=row_offset, total_rows=total_rows)
    return jax.lax.while_loop(keep_going, step, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "model_config", "max_new_tokens", "pad_id", "total_rows"))
def _generate_jit(graphdef, params, prompt_tokens, prompt_segments, rng, sampling, row_offset, *, model_config,
                  max_new_tokens, pad_id, total_rows):
    state = prefill(graphdef, params, prompt_tokens, prompt_segments, rng, model_config=model_config,
                    max_new_tokens=max_new_tokens, pad_id=pad_id)
    state = decode_loop(graphdef, params, sampling, state, max_new_tokens=max_new_tokens, pad_id=pad_id,
                        row_offset=row_offset, total_rows=total_rows)
    return state.tokens, state.logprobs, state.lengths, state.done


_prefill_jit = jax.jit(prefill, static_argnames=("graphdef", "model_config", "max_new_tokens", "pad_id"))
# The state is donated: stream() never reads a state again after stepping it, and the cache is then
# updated in place instead of copied for every token.
_decode_step_jit = jax.jit(decode_step, static_argnames=("graphdef", "pad_id"), donate_argnames=("state",))


# ----------------------------------------------------------------------------------------------
# Host-side API: ragged prompts in, numpy out.


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # [B, N] int32; pad after the stop token
    logprobs: np.ndarray  # [B, N] float32 model log-probs of the generated tokens; 0 on pad
    lengths: np.ndarray  # [B] int32 tokens generated, stop token included
    finished: np.ndarray  # [B] bool: ended with a stop token

    def completion(self, row: int, keep_stop: bool = False) -> list[int]:
        """The generated ids of one row (without its stop token unless keep_stop)."""
        ids = self.tokens[row, : self.lengths[row]].tolist()
        if self.finished[row] and not keep_stop:
            ids = ids[:-1]
        return ids


PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket(length: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """The smallest bucket >= length (powers of two past the table)."""
    for size in buckets:
        if length <= size:
            return size
    return 1 << (length - 1).bit_length()


def _batch_bucket(rows: int, multiple: int) -> int:
    size = 1 << max(rows - 1, 0).bit_length()
    return -(-size // multiple) * multiple


def mesh_of(params: Params) -> jax.sharding.Mesh | None:
    """The mesh that sharded params live on (None for unsharded or single-device arrays)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.Mesh):
            return sharding.mesh
    return None


def left_pad(prompts: Sequence[Sequence[int]], width: int, rows: int,
             pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> left-padded tokens and segment ids [rows, width]; extra rows are one pad token."""
    tokens = np.full((rows, width), pad_id, np.int32)
    segments = np.zeros((rows, width), np.int32)
    for row in range(rows):
        ids = list(prompts[row]) if row < len(prompts) else [pad_id]
        if ids:
            tokens[row, width - len(ids):] = ids
            segments[row, width - len(ids):] = 1
    return tokens, segments


def _check_prompts(prompts: Sequence[Sequence[int]], model_config: ModelConfig, settings: SamplingSettings) -> None:
    if not prompts:
        raise UsageError("generate needs at least one prompt")
    for number, ids in enumerate(prompts):
        if len(ids) == 0:
            raise UsageError(f"prompt {number} is empty; give at least one token (e.g. BOS)")
        total = len(ids) + settings.max_new_tokens
        if total > model_config.max_seq_len:
            raise UsageError(f"prompt {number} has {len(ids)} tokens; with {settings.max_new_tokens} new tokens "
                             f"that is "
                             f"{total} > model.max_seq_len={model_config.max_seq_len}. Shorten the prompt or lower "
                             "max_new_tokens")
        bad = [t for t in ids if not 0 <= int(t) < model_config.vocab_size]
        if bad:
            raise UsageError(f"prompt {number} has token ids {bad[:5]} outside [0, {model_config.vocab_size})")


def place_rows(array: np.ndarray, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """Host rows -> a device array: split over (data, fsdp) when the rows divide, else replicated.
    With several processes `array` is this process's share of the global batch."""
    if mesh is None:
        return jnp.asarray(array)
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh), array)
    parallel = sharding_lib.data_parallel_size(mesh)
    sharding = sharding_lib.batch_sharding(mesh) if array.shape[0] % parallel == 0 else sharding_lib.replicated(mesh)
    return jax.device_put(array, sharding)


def host_rows(array: jax.Array, mesh: jax.sharding.Mesh | None) -> np.ndarray:
    """The inverse of place_rows: this process's rows of a batch-sharded array, as numpy."""
    if mesh is None or jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(
        array, mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))


def _as_key(rng: jax.Array | int) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


# Smaller groups lose more to a call's fixed costs than the second core wins back (tiny model, 2 cores, prompt
# bucket 64 + 16 tokens: 4 rows in two groups 0.94x, 8 rows 1.01x, 16 rows 1.13x, 64 rows 1.35x).
MIN_GROUP_ROWS = 8


def host_row_groups(rows: int, mesh: jax.sharding.Mesh | None = None) -> int:
    """How many groups of rows `generate` runs side by side, one host thread each (`jaxllm.row_groups`): on a
    CPU that holds the model on one device, one group per CPU this process may use, each of at least
    MIN_GROUP_ROWS rows; 1 on accelerators, on sharded meshes and with several processes. A decode step's
    ~130 small ops run one after another on one core; groups decode on every core."""
    return row_groups_lib.cpu_row_groups(rows, mesh, min_rows=MIN_GROUP_ROWS)


def generate(model_config: ModelConfig, graphdef, params: Params, prompts: Sequence[Sequence[int]],
             settings: SamplingSettings = SamplingSettings(), rng: jax.Array | int = 0, *, pad_id: int = PAD_ID,
             prompt_width: int | None = None, bucket_batch: bool = True, min_rows: int = 1,
             mesh: jax.sharding.Mesh | None = None, row_groups: int | None = None) -> GenerationOutput:
    """Generates continuations of token-id prompts (different lengths allowed) in one batched call.

    The batch is padded to a power of two (unless bucket_batch is False), at least `min_rows` (a caller
    generating in batches passes its batch size, so a short batch reuses the full batches' program) and a
    multiple of the data-parallel size, the prompt width to a bucket (or `prompt_width`), so repeated calls
    reuse a few compilations. `mesh`: default the params' mesh; the batch is sharded over (data, fsdp) when
    it divides. With several processes, `prompts` are this process's share and so are the outputs.
    `row_groups`: the padded batch runs as that many equal groups of rows side by side on host threads
    (default `host_row_groups`: one per CPU core on a one-device CPU, else 1); every row samples the same
    random numbers whatever the grouping."""
    _check_prompts(prompts, model_config, settings)
    mesh = mesh if mesh is not None else mesh_of(params)
    multiple = 1
    if mesh is not None:
        multiple = max(sharding_lib.data_parallel_size(mesh) // jax.process_count(), 1)
    wanted = max(len(prompts), min_rows)
    rows = _batch_bucket(wanted, multiple) if bucket_batch else -(-wanted // multiple) * multiple
    longest = max(len(p) for p in prompts)
    width = prompt_width if prompt_width is not None and prompt_width >= longest else bucket(longest)
    tokens, segments = left_pad(prompts, width, rows, pad_id)
    groups = host_row_groups(rows, mesh) if row_groups is None else row_groups
    if groups < 1 or rows % groups:
        raise UsageError(f"row_groups={groups} must divide the batch of {rows} rows (the prompts padded); pass a "
                         "divisor of it, or None for the default")
    size = rows // groups
    key, sampling = _as_key(rng), settings.arrays(model_config.vocab_size)

    def run(group: int) -> list[np.ndarray]:
        part = slice(group * size, (group + 1) * size)
        out = _generate_jit(graphdef, params, place_rows(tokens[part], mesh), place_rows(segments[part], mesh), key,
                            sampling, np.int32(group * size), model_config=model_config,
                            max_new_tokens=settings.max_new_tokens, pad_id=pad_id, total_rows=rows)
        return [host_rows(x, mesh) for x in out]

    parts = row_groups_lib.map_row_groups(run, groups, mesh)
    out_tokens, logprobs, lengths, finished = (np.concatenate(field) for field in zip(*parts))
    count = len(prompts)
    return GenerationOutput(np.asarray(out_tokens[:count]), np.asarray(logprobs[:count]),
                            np.asarray(lengths[:count]), np.asarray(finished[:count]))


def stream(model_config: ModelConfig, graphdef, params: Params, prompt: Sequence[int],
           settings: SamplingSettings = SamplingSettings(), rng: jax.Array | int = 0, *,
           pad_id: int = PAD_ID) -> Iterator[int]:
    """Yields the generated ids of one prompt as they are sampled (the stop token last, if any).
    The same prefill and decode step as `generate`, driven from Python one token at a time."""
    _check_prompts([prompt], model_config, settings)
    tokens, segments = left_pad([prompt], bucket(len(prompt)), 1, pad_id)
    mesh = mesh_of(params)
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        state = _prefill_jit(graphdef, params, place_rows(tokens, mesh), place_rows(segments, mesh), _as_key(rng),
                             model_config=model_config, max_new_tokens=settings.max_new_tokens, pad_id=pad_id)
        sampling = settings.arrays(model_config.vocab_size)
        for _ in range(settings.max_new_tokens):
            state = _decode_step_jit(graphdef, params, sampling, state, pad_id=pad_id)
            token = int(state.tokens[0, state.step - 1])
            yield token
            if token in settings.stop_ids:
                return


# ----------------------------------------------------------------------------------------------
# Loading a trained model.


def _inference_mesh(config: Config) -> jax.sharding.Mesh:
    """The run's own mesh when it fits the devices here, else all devices data-parallel (params replicated)."""
    try:
        return sharding_lib.make_mesh(config.mesh)
    except sharding_lib.MeshError:
        return sharding_lib.make_mesh(MeshConfig())


def load_model_for_inference(workdir: str | Path, mesh: jax.sharding.Mesh | None = None, *,
                             load_tokenizer: bool = True):
    """(config, graphdef, params, tokenizer) of a training workdir (its config.yaml and latest checkpoint).

    Params (including any reward/value heads the run trained) are restored onto `mesh` (default: the
    run's mesh if it fits here, else all devices data-parallel). The tokenizer is the workdir's own
    tokenizer.model if present, else `data.tokenizer` of the run; None when load_tokenizer is False."""
    workdir = Path(workdir)
    config_path = workdir / "config.yaml"
    if not config_path.is_file():
        raise UsageError(f"{workdir} is not a training workdir: it has no config.yaml (pass the --workdir of a "
                         "`jaxllm train` run)")
    config = load_config(config_path)

    config.model = lora.base_config(config.model)  # a LoRA run loads as its base with the adapters merged in
    mesh = mesh or _inference_mesh(config)
    graphdef, abstract = model_lib.abstract_model(model_lib.forward_config(config.model))  # inference only
    heads = ckpt.saved_head_names(workdir)
    if heads:
        abstract[model_lib.HEADS_KEY] = jax.eval_shape(lambda: state_lib.init_heads(config.model, heads, 0))
    axes = state_lib.param_logical_axes(config, abstract)
    shardings = sharding_lib.tree_shardings(abstract, axes, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = lora.load_params(workdir, target)
    tokenizer = None
    if load_tokenizer:
        own = workdir / "tokenizer.model"
        tokenizer = Tokenizer.load(workdir if own.is_file() else config.data.tokenizer)
        check_vocab(tokenizer, config.model.vocab_size)
    return config, graphdef, params, tokenizer


__all__ = [
    "SamplingSettings", "SamplingParams", "GenerationOutput", "DecodeState", "generate", "stream", "prefill",
    "decode_step", "decode_loop", "next_token", "argmax", "categorical", "build_processors", "compose",
    "repetition_penalty", "token_bias", "temperature", "top_k", "top_p", "min_p", "bucket", "left_pad", "mesh_of",
    "place_rows", "host_rows", "load_model_for_inference",
]
