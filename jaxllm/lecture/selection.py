"""SFT data selection: which few examples to fine-tune on ("quality beats quantity").

Scores, each one number per example (higher = preferred unless `lowest`):
- length      answer tokens (all assistant messages). "Long Is More for Alignment" (Zhao et al. 2024):
              the 1,000 longest Alpaca answers beat all 52k. Needs only a tokenizer.
- loss        the model's own mean cross-entropy on the answer tokens (nats/token), given the prompt;
- perplexity  exp(loss): the same order as loss, in the unit people quote;
- ifd         Instruction-Following Difficulty (Li et al. 2024, "From Quantity to Quality"):
              loss(answer | prompt) / loss(answer alone). Near or above 1 the prompt does not help
              predict the answer; those (IFD >= max_ifd, default 1) are dropped, the rest ranked high first.
Diversity: k-center greedy (farthest-first) over the model's mean final hidden state of each
conversation, L2-normalised — each pick is the example farthest from everything picked so far, so
near-duplicates are chosen once (the diversity half of Deita, Liu et al. 2024).

Combined: rank by the score, keep the best `pool` (default 4·k), then pick k of them by k-center,
starting from the best-scored one. Without a score, k-center runs over all examples starting from
the one nearest the centroid. Records are `{"messages": [...]}` or `{"prompt", "response"}`; the
chosen ones are written verbatim, in input order.

    jaxllm data select sft.jsonl --out chosen.jsonl --k 1000 --by length
    jaxllm data select sft.jsonl --out chosen.jsonl --k 100 --by ifd --diversity --checkpoint runs/sft
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import losses, steps
from jaxllm import model as model_lib
from jaxllm.data.chat import record_to_messages, render_chats
from jaxllm.data.sources import SOURCE_KINDS, read_records
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import UsageError
from jaxllm.generate import host_rows, load_model_for_inference, mesh_of, place_rows

SCORES = ("length", "loss", "perplexity", "ifd")
MODEL_SCORES = ("loss", "perplexity", "ifd")
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


# ----------------------------------------------------------------------------------------------
# Input


def source_spec(path_or_source: str, jsonl_only: bool = False) -> str:
    """A file or directory -> a jaxllm data source: `.jsonl` -> jsonl:PATH, otherwise text:PATH
    (blank-line separated documents). A source spec (default:NAME, jsonl:..., text:..., tfds:...) is kept."""
    kind, sep, _ = path_or_source.partition(":")
    if sep and kind in SOURCE_KINDS and not Path(path_or_source).exists():
        return path_or_source
    path = Path(path_or_source)
    if not path.exists():
        raise UsageError(f"input {path} does not exist (give a .jsonl file, a text file, or a source such as "
                         "default:sft)")
    if path.is_dir():
        has_jsonl = any(path.rglob("*.jsonl"))
        return f"jsonl:{path}" if has_jsonl or jsonl_only else f"text:{path}"
    if path.suffix in (".jsonl", ".json", ".ndjson") or jsonl_only:
        return f"jsonl:{path}"
    return f"text:{path}"


@dataclasses.dataclass
class Example:
    index: int  # position in the input
    where: str  # "file.jsonl:17", for messages
    record: dict  # the record as read, written back verbatim when chosen
    messages: list  # the conversation, validated


def load_examples(path_or_source: str, limit: int | None = None) -> list[Example]:
    """SFT records -> Examples; a bad record raises DataError naming its file and line."""
    examples = []
    for record in read_records(source_spec(path_or_source, jsonl_only=True)):
        messages = record_to_messages(record.data, record.where)
        examples.append(Example(len(examples), record.where, record.data, messages))
        if limit is not None and len(examples) >= limit:
            break
    return examples


# ----------------------------------------------------------------------------------------------
# Batches of ragged token sequences


def padded_batches(sequences: Sequence[Sequence[int]], batch_size: int, max_len: int,
                   masks: Sequence[Sequence[int]] | None = None) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Right-padded batches of [batch_size, width] arrays, sequences sorted by length so that padding is
    small and widths come from a few buckets (capped at max_len; longer sequences are cut to max_len).

    Yields (indices into `sequences` [n <= batch_size], {"tokens", "positions", "segment_ids", "loss_mask"}),
    rows past n all padding (segment id 0)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        indices = np.asarray(order[start:start + batch_size])
        longest = min(max(len(sequences[i]) for i in indices), max_len)
        width = next((b for b in LENGTH_BUCKETS if b >= longest), longest)
        width = min(width, max_len)
        batch = {"tokens": np.zeros((batch_size, width), np.int32),
                 "positions": np.zeros((batch_size, width), np.int32),
                 "segment_ids": np.zeros((batch_size, width), np.int32),
                 "loss_mask": np.zeros((batch_size, width), np.float32)}
        for row, index in enumerate(indices):
            ids = list(sequences[index])[:width]
            batch["tokens"][row, :len(ids)] = ids
            batch["positions"][row, :len(ids)] = np.arange(len(ids))
            batch["segment_ids"][row, :len(ids)] = 1
            if masks is not None:
                batch["loss_mask"][row, :len(ids)] = list(masks[index])[:width]
        yield indices, batch


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _answer_logprobs(graphdef, params, tokens, positions, segment_ids, loss_mask):
    """([B] summed log-prob of the masked tokens, [B] how many were counted)."""
    logprobs = steps.sequence_logprobs(graphdef, params, tokens, positions, segment_ids, loss_mask)
    return logprobs, losses.target_weights(loss_mask, segment_ids).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _mean_hidden(graphdef, params, tokens, positions, segment_ids, loss_mask):
    """[B, D] mean of the final hidden states over each row's tokens (loss_mask unused)."""
    hidden = model_lib.apply_hidden(graphdef, params, tokens, positions, segment_ids).astype(jnp.float32)
    real = (segment_ids > 0).astype(jnp.float32)[..., None]
    return (hidden * real).sum(axis=1) / jnp.maximum(real.sum(axis=1), 1.0)


class ModelScorer:
    """Per-example numbers from a trained model: answer losses and mean hidden states.

    `model` is (config, graphdef, params, tokenizer) as `jaxllm.generate.load_model_for_inference` returns."""

    def __init__(self, model, batch_size: int = 16):
        self.config, self.graphdef, self.params, self.tokenizer = model
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.truncated = 0  # conversations longer than model.max_seq_len, cut to it

    def _run(self, function, sequences, masks=None) -> list[tuple[np.ndarray, tuple]]:
        """function(graphdef, params, tokens, positions, segment_ids, loss_mask) over padded batches ->
        [(indices, outputs cut to the real rows)]."""
        import contextlib

        max_len = self.config.model.max_seq_len
        self.truncated = sum(len(s) > max_len for s in sequences)
        mesh = mesh_of(self.params)
        outputs = []
        with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            for indices, batch in padded_batches(sequences, self.batch_size, max_len, masks):
                arrays = [place_rows(batch[k], mesh) for k in ("tokens", "positions", "segment_ids", "loss_mask")]
                result = function(self.graphdef, self.params, *arrays)
                result = result if isinstance(result, tuple) else (result,)
                outputs.append((indices, tuple(host_rows(x, mesh)[:len(indices)] for x in result)))
        return outputs

    def answer_loss(self, examples: Sequence[Example], mode: str = "normal") -> tuple[np.ndarray, np.ndarray]:
        """([N] mean negative log-likelihood per answer token, [N] answer tokens counted) in chat `mode`:
        "normal" (answers given their prompts) or "response_only" (answers alone). NaN where no answer
        token is left after cutting to max_seq_len."""
        rendered = render_chats([e.messages for e in examples], self.tokenizer, mode)
        loss = np.full(len(examples), np.nan)
        counts = np.zeros(len(examples), np.int64)
        for indices, (logprobs, count) in self._run(_answer_logprobs, [ids for ids, _ in rendered],
                                                    [mask for _, mask in rendered]):
            counts[indices] = count
            with np.errstate(invalid="ignore", divide="ignore"):
                loss[indices] = np.where(count > 0, -logprobs / np.maximum(count, 1), np.nan)
        return loss, counts

    def mean_hidden(self, examples: Sequence[Example]) -> np.ndarray:
        """[N, D] mean final hidden state of each whole conversation."""
        rendered = render_chats([e.messages for e in examples], self.tokenizer)
        out = np.zeros((len(examples), self.config.model.d_model), np.float32)
        for indices, (hidden,) in self._run(_mean_hidden, [ids for ids, _ in rendered]):
            out[indices] = hidden
        return out


# ----------------------------------------------------------------------------------------------
# Scores and selection


def response_lengths(examples: Sequence[Example], tokenizer) -> np.ndarray:
    """[N] tokens in each example's assistant messages (the answer length of "Long Is More")."""
    answers = ["".join(m["content"] for m in e.messages if m["role"] == "assistant") for e in examples]
    return np.asarray([len(ids) for ids in tokenizer.encode_batch(answers)], np.float64)


def ifd_scores(scorer: ModelScorer, examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """{"conditioned": loss(answer | prompt), "direct": loss(answer alone), "ifd": their ratio} per example."""
    conditioned, _ = scorer.answer_loss(examples, "normal")
    direct, _ = scorer.answer_loss(examples, "response_only")
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(direct > 0, conditioned / direct, np.nan)
    return {"conditioned": conditioned, "direct": direct, "ifd": ratio}


def k_center_greedy(embeddings: np.ndarray, k: int, first: int = 0) -> list[int]:
    """Farthest-first traversal: starts at `first`, then repeatedly adds the row farthest (Euclidean) from
    every row chosen so far. [N, D] -> k distinct row indices in the order picked (a 2-approximation of
    the k-center problem). Exact duplicates are only picked once every distinct row has been."""
    points = np.asarray(embeddings, np.float64)
    count = points.shape[0]
    if not 0 <= first < count:
        raise ValueError(f"first={first} must index one of the {count} rows")
    k = min(k, count)
    chosen = [first]
    nearest = np.linalg.norm(points - points[first], axis=1)
    nearest[first] = -1.0
    while len(chosen) < k:
        pick = int(np.argmax(nearest))  # the lowest index among ties: deterministic
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[pick], axis=1))
        nearest[chosen] = -1.0
    return chosen


@dataclasses.dataclass
class SelectionOptions:
    k: int
    by: str | None = None  # one of SCORES, or None (diversity only)
    lowest: bool = False  # prefer low scores (e.g. the easiest examples by loss)
    diversity: bool = False
    pool: int | None = None  # with both `by` and `diversity`: best-scored examples k-center chooses from (4·k)
    max_ifd: float = 1.0  # by=ifd: drop examples whose IFD is at least this

    def validate(self) -> None:
        if self.k < 1:
            raise UsageError(f"--k must be at least 1, got {self.k}")
        if self.by is None and not self.diversity:
            raise UsageError("choose a score with --by (length, loss, perplexity, ifd) and/or --diversity")
        if self.by is not None and self.by not in SCORES:
            raise UsageError(f"unknown score '{self.by}'; choose one of {', '.join(SCORES)}")
        if self.pool is not None and self.pool < self.k:
            raise UsageError(f"--pool {self.pool} must be at least --k {self.k}")

    @property
    def needs_model(self) -> bool:
        return self.diversity or self.by in MODEL_SCORES


def select_examples(examples: Sequence[Example], options: SelectionOptions, *, tokenizer=None,
                    scorer: ModelScorer | None = None) -> dict[str, Any]:
    """Chooses up to options.k examples. Returns {"selected": [input indices, in the order picked],
    "scores": {name: [N] array}, "funnel": [(step, examples left)], "notes": [...]}."""
    options.validate()
    if options.needs_model and scorer is None:
        raise UsageError(f"{'--diversity' if options.diversity else f'--by {options.by}'} needs a model: "
                         "pass --checkpoint WORKDIR")
    tokenizer = tokenizer if tokenizer is not None else (scorer.tokenizer if scorer is not None else None)
    if tokenizer is None:
        raise UsageError("selection needs a tokenizer or a model")
    count = len(examples)
    scores: dict[str, np.ndarray] = {"length": response_lengths(examples, tokenizer)}
    funnel: list[tuple[str, int]] = [("input", count)]
    notes: list[str] = []
    candidates = np.arange(count)
    if options.by in ("loss", "perplexity"):
        scores["loss"], _ = scorer.answer_loss(examples)
        scores["perplexity"] = np.exp(np.minimum(scores["loss"], 50.0))
    elif options.by == "ifd":
        scores.update(ifd_scores(scorer, examples))
    if scorer is not None and scorer.truncated:
        notes.append(f"{scorer.truncated} conversations are longer than model.max_seq_len and were scored on "
                     "their first max_seq_len tokens")
    if options.by is not None:
        values = scores[options.by]
        usable = np.isfinite(values)
        if (~usable).any():
            notes.append(f"{int((~usable).sum())} examples have no answer tokens within max_seq_len: left out")
        candidates = candidates[usable]
        funnel.append(("scored", len(candidates)))
        if options.by == "ifd":
            candidates = candidates[values[candidates] < options.max_ifd]
            funnel.append((f"ifd < {options.max_ifd:g}", len(candidates)))
        direction = 1.0 if options.lowest else -1.0
        candidates = candidates[np.argsort(direction * values[candidates], kind="stable")]
    if options.diversity and len(candidates):
        pool = candidates
        first = 0
        if options.by is not None:
            pool = candidates[:options.pool or 4 * options.k]
            funnel.append((f"best {len(pool)} by {options.by}", len(pool)))
        embeddings = scorer.mean_hidden([examples[i] for i in pool])
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings = embeddings / np.maximum(norms, 1e-12)
        scores["embedding_norm"] = np.full(count, np.nan)
        scores["embedding_norm"][pool] = norms[:, 0]
        if options.by is None:  # start from the most typical example: the one nearest the centroid
            first = int(np.argmin(np.linalg.norm(embeddings - embeddings.mean(axis=0), axis=1)))
        chosen = pool[k_center_greedy(embeddings, options.k, first)]
        funnel.append(("k-center", len(chosen)))
    else:
        chosen = candidates[:options.k]
        funnel.append((f"top {options.k}", len(chosen)))
    if len(chosen) < options.k:
        notes.append(f"only {len(chosen)} examples were left to choose from, fewer than k={options.k}")
    return {"selected": [int(i) for i in chosen], "scores": scores, "funnel": funnel, "notes": notes}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def write_selection(examples: Sequence[Example], result: dict[str, Any], out: str | Path,
                    scores_out: str | Path | None = None) -> Path:
    """Writes the chosen records (verbatim, input order) to `out`, and every example's scores to `scores_out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rank = {index: position for position, index in enumerate(result["selected"])}
    with out.open("w", encoding="utf-8") as handle:
        for index in sorted(rank):
            handle.write(json.dumps(examples[index].record, ensure_ascii=False) + "\n")
    if scores_out:
        scores_out = Path(scores_out)
        scores_out.parent.mkdir(parents=True, exist_ok=True)
        with scores_out.open("w", encoding="utf-8") as handle:
            for example in examples:
                row = {"index": example.index, "where": example.where, "selected": example.index in rank,
                       "pick": rank.get(example.index)}
                row.update({name: _finite(values[example.index]) for name, values in result["scores"].items()})
                handle.write(json.dumps(row) + "\n")
    return out


def run_selection(source: str, out: str | Path, options: SelectionOptions, checkpoint: str | None = None,
                  tokenizer: str = "default", batch_size: int = 16, limit: int | None = None,
                  scores_path: str | None = None) -> dict[str, Any]:
    """Reads SFT records from `source`, chooses by `options` (scoring with the `checkpoint` workdir's model
    when the options need one; else `tokenizer` counts lengths) and writes the chosen records to `out`.
    Returns `select_examples`'s result with "read" (how many examples) and "out" (the written file)."""
    options.validate()
    if options.needs_model and not checkpoint:
        raise UsageError(f"{'--diversity' if options.diversity else f'--by {options.by}'} scores examples with a "
                         "model: pass --checkpoint WORKDIR (a `jaxllm train` workdir)")
    examples = load_examples(source, limit)
    scorer = None
    if checkpoint:
        scorer = ModelScorer(load_model_for_inference(checkpoint), batch_size)
        counter = scorer.tokenizer
    else:
        counter = Tokenizer.load(tokenizer)
    result = select_examples(examples, options, tokenizer=counter, scorer=scorer)
    written = write_selection(examples, result, out, scores_path)
    return {**result, "read": len(examples), "out": written}


__all__ = ["SCORES", "Example", "source_spec", "load_examples", "padded_batches", "ModelScorer", "response_lengths",
           "ifd_scores", "k_center_greedy", "SelectionOptions", "select_examples", "write_selection",
           "run_selection"]
