"""The two primitives evaluation is built on: log-likelihood scoring of continuations and documents
(batched, sharded like training, the lm head over blocks of positions) and batched generation; the
model under evaluation (`EvalModel`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import losses
from jaxllm import model as model_lib
from jaxllm import row_groups
from jaxllm import sharding as sharding_lib
from jaxllm.config import Config, ModelConfig
from jaxllm.errors import UsageError
from jaxllm.generate import SamplingSettings, bucket, generate, host_rows, load_model_for_inference, mesh_of

LOGITS_BLOCK_BYTES = 256 << 20  # float32 logits per scoring block, at most


# ----------------------------------------------------------------------------------------------
# The model under evaluation


@dataclasses.dataclass
class EvalModel:
    """A model ready for evaluation: what `generate.load_model_for_inference` returns, plus its mesh."""

    config: Config
    graphdef: Any
    params: Any
    tokenizer: Any
    name: str = ""
    mesh: jax.sharding.Mesh | None = None  # default: the mesh the params live on (None: one device)

    def __post_init__(self):
        if self.mesh is None:
            self.mesh = mesh_of(self.params)

    @classmethod
    def load(cls, workdir: str | Path, mesh: jax.sharding.Mesh | None = None) -> "EvalModel":
        config, graphdef, params, tokenizer = load_model_for_inference(workdir, mesh)
        return cls(config, graphdef, params, tokenizer, str(workdir))

    @property
    def max_len(self) -> int:
        return self.config.model.max_seq_len


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool, unit: str = "ex") -> Iterator[Any]:
    """A tqdm bar on stderr while enabled, else None."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# Log-likelihood scoring


@dataclasses.dataclass
class Scores:
    """Per request: logprob [N] float64 summed log p (nats) of the continuation tokens; greedy [N] bool
    every continuation token is the model's argmax; tokens [N] int continuation tokens scored."""

    logprob: np.ndarray
    greedy: np.ndarray
    tokens: np.ndarray


def _logits_block(rows: int, positions: int, vocab: int) -> int:
    """Positions per lm-head block so that [rows, block, vocab] float32 logits stay under LOGITS_BLOCK_BYTES."""
    return max(1, min(positions, LOGITS_BLOCK_BYTES // (4 * rows * vocab)))


@functools.partial(jax.jit, static_argnames=("graphdef", "block"))
def _score_batch(graphdef, params, tokens, segment_ids, loss_mask, *, block: int):
    """tokens/segment_ids/loss_mask [B,T] (right-padded rows) -> per row: summed log p of the masked
    tokens [B] float32, all of them greedy [B] bool, their count [B] float32."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], tokens.shape)
    hidden = model_lib.apply_hidden(graphdef, params, tokens, positions, segment_ids)[:, :-1]  # t predicts t+1
    unembedding = model_lib.unembedding(graphdef, params, hidden.dtype)
    targets = tokens[:, 1:]
    weights = losses.target_weights(loss_mask, segment_ids)[:, 1:]
    count = length - 1
    padded = -count % block
    hidden = jnp.pad(hidden, ((0, 0), (0, padded), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padded)))
    blocks = (count + padded) // block

    def to_blocks(x):  # [B, n*C, ...] -> [n, B, C, ...]
        return jnp.swapaxes(x.reshape(batch, blocks, block, *x.shape[2:]), 0, 1)

    def score_block(_, inputs):
        h, target = inputs
        logits = jnp.einsum("bcd,dv->bcv", h, unembedding, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        return None, (picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == target)

    _, (logprobs, greedy) = jax.lax.scan(score_block, None, (to_blocks(hidden), to_blocks(targets)))
    logprobs = jnp.swapaxes(logprobs, 0, 1).reshape(batch, -1)[:, :count]
    greedy = jnp.swapaxes(greedy, 0, 1).reshape(batch, -1)[:, :count]
    return (jnp.sum(logprobs * weights, axis=1), jnp.all(greedy | (weights == 0), axis=1),
            jnp.sum(weights, axis=1))


def _fit_request(number: int, context: Sequence[int], continuation: Sequence[int],
                 max_len: int) -> tuple[list[int], int]:
    context, continuation = [int(t) for t in context], [int(t) for t in continuation]
    if not continuation:
        raise UsageError(f"scoring request {number} has an empty continuation: there is nothing to score")
    if not context:
        raise UsageError(f"scoring request {number} has an empty context: start it with BOS (nothing predicts "
                         "the first token)")
    if len(continuation) > max_len - 1:
        raise UsageError(f"scoring request {number}: the continuation has {len(continuation)} tokens but at most "
                         f"model.max_seq_len - 1 = {max_len - 1} fit with one token of context")
    return (context + continuation)[-max_len:], len(continuation)


def score_continuations(model_config: ModelConfig, graphdef, params,
                        requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
                        mesh: jax.sharding.Mesh | None = None, pad_id: int = 0, progress: bool = False,
                        desc: str = "scoring") -> Scores:
    """log p(continuation | context) for token-id pairs, in batches of `batch_size` rows.

    Rows are sorted by length so a batch pads little, widths are bucketed (a few compilations serve
    any request set), and the results come back in request order. `mesh`: default the params' mesh;
    the batch (rounded up to a multiple of the data-parallel size) is split over (data, fsdp)."""
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    rows = [_fit_request(n, context, continuation, model_config.max_seq_len)
            for n, (context, continuation) in enumerate(requests)]
    total = len(rows)
    logprob, greedy, tokens = np.zeros(total, np.float64), np.zeros(total, bool), np.zeros(total, np.int64)
    mesh = mesh if mesh is not None else mesh_of(params)
    multiple = sharding_lib.data_parallel_size(mesh) if mesh is not None else 1
    per_batch = -(-batch_size // multiple) * multiple
    order = sorted(range(total), key=lambda i: -len(rows[i][0]))
    starts = range(0, total, per_batch)

    def score(number: int):
        chosen = order[starts[number]:starts[number] + per_batch]
        width = min(bucket(len(rows[chosen[0]][0])), model_config.max_seq_len)
        batch = {"tokens": np.full((per_batch, width), pad_id, np.int32),
                 "segment_ids": np.zeros((per_batch, width), np.int32),
                 "loss_mask": np.zeros((per_batch, width), np.float32)}
        for slot, index in enumerate(chosen):
            ids, scored = rows[index]
            batch["tokens"][slot, :len(ids)] = ids
            batch["segment_ids"][slot, :len(ids)] = 1
            batch["loss_mask"][slot, len(ids) - scored:len(ids)] = 1.0
        placed = sharding_lib.place_batch(batch, mesh) if mesh is not None else batch
        out = _score_batch(graphdef, params, placed["tokens"], placed["segment_ids"], placed["loss_mask"],
                           block=_logits_block(per_batch, width - 1, model_config.vocab_size))
        return chosen, [host_rows(x, mesh) for x in out]

    # The batches are independent calls: side by side on the host's cores (one CPU device), results as one by one.
    workers = row_groups.host_workers(mesh)
    with progress_bar(total, desc, progress, "seq") as bar:
        for chosen, (sums, all_greedy, counts) in row_groups.map_on_threads(score, len(starts), workers, mesh):
            for slot, index in enumerate(chosen):
                logprob[index], greedy[index], tokens[index] = sums[slot], all_greedy[slot], counts[slot]
            if bar is not None:
                bar.update(len(chosen))
    return Scores(logprob, greedy, tokens)


def rolling_requests(ids: Sequence[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token of `ids` after the first exactly once,
    each window at most max_len tokens long with as much context as fits (lm-evaluation-harness's
    rolling log-likelihood)."""
    ids = [int(t) for t in ids]
    windows, start = [], 1
    while start < len(ids):
        stop = min(start + max_len - 1, len(ids))
        windows.append((ids[max(0, stop - max_len):start], ids[start:stop]))
        start = stop
    return windows


def score_documents(model_config: ModelConfig, graphdef, params, documents: Sequence[Sequence[int]],
                    **kwargs: Any) -> Scores:
    """Log-likelihood of whole token sequences (every token after the first; BOS first by convention),
    any length: windows of model.max_seq_len, summed per document. Keyword arguments as score_continuations."""
    requests, owner = [], []
    for number, ids in enumerate(documents):
        if len(ids) < 2:
            raise UsageError(f"document {number} has {len(ids)} token(s); scoring needs at least 2 (e.g. BOS + text)")
        windows = rolling_requests(ids, model_config.max_seq_len)
        requests.extend(windows)
        owner.extend([number] * len(windows))
    scores = score_continuations(model_config, graphdef, params, requests, **kwargs)
    owner = np.asarray(owner, np.int64)
    count = len(documents)
    greedy = np.ones(count, bool)
    np.logical_and.at(greedy, owner, scores.greedy)
    return Scores(np.bincount(owner, scores.logprob, count), greedy,
                  np.bincount(owner, scores.tokens, count).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Generation


def generate_completions(model: EvalModel, prompts: Sequence[Sequence[int]], settings, *, batch_size: int = 16,
                         seed: int = 0, progress: bool = False, desc: str = "generating") -> list[dict[str, Any]]:
    """Answers to token-id prompts in batches: [{"ids", "text", "finished", "tokens"}] in prompt order.
    A prompt longer than max_seq_len - max_new_tokens keeps its end."""
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    room = model.max_len - settings.max_new_tokens
    if room < 1:
        raise UsageError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in "
                         f"model.max_seq_len={model.max_len}")
    prompts = [list(p)[-room:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict[str, Any]] = [{} for _ in prompts]
    pad_id = model.tokenizer.pad_id if model.tokenizer is not None else 0
    with progress_bar(len(prompts), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            output = generate(model.config.model, model.graphdef, model.params, [prompts[i] for i in chosen],
                              settings, jax.random.fold_in(jax.random.key(seed), start), pad_id=pad_id,
                              min_rows=batch_size, mesh=model.mesh)
            for row, index in enumerate(chosen):
                ids = output.completion(row)
                text = model.tokenizer.decode(ids) if model.tokenizer is not None else ""
                results[index] = {"ids": ids, "text": text, "finished": bool(output.finished[row]),
                                  "tokens": int(output.lengths[row])}
            if bar is not None:
                bar.update(len(chosen))
    return results


def greedy_settings(tokenizer, max_new_tokens: int, chat: bool):
    """Greedy decoding that stops at EOS (and, in chat, where the model would open the next user turn)."""
    stops = (tokenizer.eos_id, tokenizer.user_id) if chat else (tokenizer.eos_id,)
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stops)
