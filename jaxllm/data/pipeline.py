"""Batches for every stage: the train loop's one entry point to data.

    iterator = make_batch_iterator(config, tokenizer)            # infinite, host-local batches
    batch = next(iterator)                                        # dict of numpy arrays
    state = iterator.get_state()                                  # JSON, goes in the checkpoint
    iterator.set_state(state)                                     # resumes with the exact next batch

How: the source is read, tokenised and packed ONCE into fixed rows (cached in memory, and on disk under
$JAXLLM_DATA_CACHE, default ~/.cache/jaxllm/data, when the build took more than a couple of seconds;
JAXLLM_DATA_CACHE=off disables it). The rows are then streamed in a fresh seeded permutation per epoch
(`train.seed`, epoch); a Grain `MapDataset` maps batch k's row indices to arrays and prefetches. So batch
k is a pure function of (seed, k): resuming needs no replay, only k. Host i of P gets slots
[k*B + i*B/P, k*B + (i+1)*B/P) of the stream (B = train.batch_size, global); the global batch does not
depend on P.

Batch keys (shapes [b, T], b = B / process_count, T = data.seq_len):
- pretrain, sft: tokens int32, positions int32 (restart at 0 in each segment), segment_ids int32
  (1, 2, ... per example in the row, 0 = padding; with data.join_documents, pretraining rows are one
  segment each: documents attend to the earlier ones in the row and positions run across it), loss_mask
  float32 (1 iff token t is a target predicted at t-1: 0 on each segment's first token, on padding and,
  in SFT, on prompt tokens);
- dpo, reward: chosen_{tokens,positions,segment_ids,loss_mask} and rejected_{...}, one pair per row;
- kto: tokens, positions, segment_ids, loss_mask, label float32 [b] (+1 desirable, -1 undesirable);
- all: example_ids int32 [b, K] (record ids of the row's segments, -1 padded; K = 8);
- rl (`make_batch_iterator` with train.stage=rl): prompt_tokens int32 [b, P] (right-padded),
  prompt_lengths int32 [b], example_ids int32 [b, 8], plus Python lists `references`, `messages`;
  b = rl.prompts_per_step / process_count.

Eval data: `data.eval_source`; else the embedded eval set paired with a `default:` source (e.g.
default:sft -> default:sft_eval); else every 20th record of the source is held out (the train split then
excludes those records; sources under 20 records are evaluated on their training records, with a note).

Limits: the whole source is tokenised up front on every host (fine up to a few hundred million tokens);
streaming larger corpora is not implemented.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np

from jaxllm.data.chat import prompt_ids
from jaxllm.data.examples import DATA_FORMATS, ROW_BUILDERS, StageRows, no_examples_error, parse_prompt_record
from jaxllm.data.packing import MAX_EXAMPLES_PER_ROW
from jaxllm.data.report import BadRecordPolicy, DataError, DataReport, format_report
from jaxllm.data.sources import default_eval_source, iter_records, source_fingerprint
from jaxllm.data.tokenizer import Tokenizer, check_vocab

FORMAT_VERSION = 1  # bump when the row layout changes: invalidates disk caches
HOLD_OUT_EVERY = 20
CACHE_ENV = "JAXLLM_DATA_CACHE"
DISK_CACHE_MIN_SECONDS = 2.0
_MEMORY_CACHE: "collections.OrderedDict[str, StageRows]" = collections.OrderedDict()
_MEMORY_CACHE_SIZE = 8


# ----------------------------------------------------------------------------------------------
# Building rows (cached)


def _resolve_source(config, split: str) -> tuple[str, str]:
    """(source spec, held-out selection: "" | "exclude" | "only") for a split."""
    data = config.data
    if split not in ("train", "eval"):
        raise DataError(f"split '{split}' must be 'train' or 'eval'")
    paired = data.eval_source or default_eval_source(data.source)
    if split == "train":
        return data.source, "" if paired else "exclude"
    return (paired, "") if paired else (data.source, "only")


def _cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("off", "0", "none", ""):
        return None
    return Path(value) if value else Path.home() / ".cache" / "jaxllm" / "data"


def _cache_key(spec: str, held_out: str, stage: str, data_format: str, data, tokenizer: Tokenizer,
               split: str) -> str:
    settings = {
        "format": FORMAT_VERSION, "source": spec, "fingerprint": source_fingerprint(spec), "held_out": held_out,
        "stage": stage, "data_format": data_format, "split": split, "tokenizer": tokenizer.fingerprint, "seq_len": data.seq_len,
        "pack": data.pack, "sft_mode": data.sft_mode, "truncation": data.truncation,
        "on_bad_record": data.on_bad_record, "text_field": data.text_field,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def _load_disk(path: Path, stage: str) -> StageRows | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        report = DataReport.from_dict(json.loads(bytes(arrays.pop("report_json")).decode()))
        return StageRows.from_arrays(stage, arrays, report)
    except Exception:  # a corrupt or stale cache file is rebuilt, never trusted
        return None


def _save_disk(path: Path, rows: StageRows) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        report = np.frombuffer(json.dumps(rows.report.to_dict()).encode(), dtype=np.uint8)
        np.savez(buffer, report_json=report, **rows.to_arrays())
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_bytes(buffer.getvalue())
        os.replace(temporary, path)
    except OSError:
        pass  # caching is an optimisation; a read-only home directory must not stop training


def _hold_out(records: list, mode: str, report: DataReport) -> list:
    if not mode:
        return records
    if len(records) < HOLD_OUT_EVERY:
        report.notes.append(f"no eval source and fewer than {HOLD_OUT_EVERY} records: eval uses the training records")
        return records
    keep_eval = mode == "only"
    selected = [r for r in records if (r.index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1) == keep_eval]
    if mode == "exclude":
        report.count_dropped("held_out_for_eval", len(records) - len(selected))
        report.notes.append(f"every {HOLD_OUT_EVERY}th record is held out for eval (set data.eval_source to avoid)")
    return selected


def _build(spec: str, held_out: str, stage: str, data_format: str, data, tokenizer: Tokenizer,
           split: str) -> StageRows:
    report = DataReport(source=spec, stage=stage, split=split, seq_len=data.seq_len)
    policy = BadRecordPolicy(data.on_bad_record, report)
    records = list(iter_records(spec, data.text_field, policy))
    report.records_read = len(records) + sum(report.bad_records.values())
    if not records:
        if report.bad_records:
            raise no_examples_error(report)
        raise DataError(f"data source '{spec}' is empty: it has no records")
    records = _hold_out(records, held_out, report)
    rows = _row_builder(data_format)(records, tokenizer, data, policy, report)
    report.rows = rows.num_rows
    report.tokens = int(sum((part.segment_ids > 0).sum() for part in rows.parts.values()))
    report.loss_tokens = int(sum(part.loss_mask.sum() for part in rows.parts.values()))
    report.sequences_per_row = len(rows.parts)  # 2 for preference pairs (chosen + rejected)
    return rows


def _row_builder(data_format: str):
    if data_format not in ROW_BUILDERS:
        raise DataError(f"data format '{data_format}' has no packed rows; one of {', '.join(ROW_BUILDERS)} "
                        "(prompts are read with load_prompts)")
    return ROW_BUILDERS[data_format]


def build_rows(config, tokenizer: Tokenizer, split: str = "train", *, data_format: str, stage: str | None = None,
               source: str | None = None) -> StageRows:
    """Tokenised, packed rows of a split in a data format (from caches when possible). `stage` labels the
    rows and their report (default config.train.stage)."""
    stage = stage or config.train.stage
    _row_builder(data_format)
    spec, held_out = (source, "") if source else _resolve_source(config, split)
    key = _cache_key(spec, held_out, stage, data_format, config.data, tokenizer, split)
    if key in _MEMORY_CACHE:
        _MEMORY_CACHE.move_to_end(key)
        return _MEMORY_CACHE[key]
    directory = _cache_dir()
    rows = _load_disk(directory / f"{key}.npz", stage) if directory and (directory / f"{key}.npz").exists() else None
    if rows is None:
        started = time.perf_counter()
        rows = _build(spec, held_out, stage, data_format, config.data, tokenizer, split)
        if directory and time.perf_counter() - started > DISK_CACHE_MIN_SECONDS:
            _save_disk(directory / f"{key}.npz", rows)
    _MEMORY_CACHE[key] = rows
    while len(_MEMORY_CACHE) > _MEMORY_CACHE_SIZE:
        _MEMORY_CACHE.popitem(last=False)
    return rows


# ----------------------------------------------------------------------------------------------
# Iterators


def _host_batch_size(global_batch_size: int, process_count: int, what: str = "train.batch_size") -> int:
    if process_count < 1 or global_batch_size % process_count:
        raise DataError(f"{what}={global_batch_size} must be divisible by the number of processes ({process_count})")
    return global_batch_size // process_count


class _SteppedIterator:
    """Shared state handling: batch k of a random-access Grain dataset; the state is just k (and checks)."""

    kind = ""

    def __init__(self, dataset: grain.MapDataset, seed: int, stage: str, fingerprint: str, global_batch_size: int,
                 prefetch: int = 2):
        self._dataset = dataset
        self.seed = seed
        self.stage = stage
        self.fingerprint = fingerprint
        self.global_batch_size = global_batch_size
        self.prefetch = prefetch
        self.step = 0
        self._iterator: Iterator | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            options = grain.ReadOptions(num_threads=1 if self.prefetch else 0, prefetch_buffer_size=self.prefetch)
            self._iterator = iter(self._dataset[self.step:].to_iter_dataset(options))
        batch = next(self._iterator)
        self.step += 1
        return batch

    def batch_at(self, step: int) -> dict[str, Any]:
        """Batch number `step` without moving the iterator (a pure function of seed and step)."""
        return self._dataset[step]

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "stage": self.stage, "data_fingerprint": self.fingerprint,
                "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues at batch state["step"]; the seed, stage and global batch size must match this iterator's."""
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
            raise DataError(f"data iterator state must be a dict with a non-negative integer 'step', got {state!r}")
        for key in ("seed", "stage", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"the saved data iterator has {key}={state[key]!r} but this run has "
                                f"{getattr(self, key)!r}; batch {state['step']} would not be the batch the saved run "
                                "was about to read. Use the same setting or start the data from step 0")
        if state.get("data_fingerprint", self.fingerprint) != self.fingerprint:
            print(f"warning: the data (source, tokenizer or settings) changed since the data iterator state was saved; "
                  f"continuing at batch {state['step']} of the new data", file=sys.stderr)
        self.step = state["step"]
        self._iterator = None


class ShuffledBatchIndices:
    """Element k: the row indices of this host's slice of global batch k (a Grain random-access source).

    The global stream is the rows in a fresh permutation per epoch, drawn by numpy's PCG64 seeded with
    (seed, epoch); shuffle=False keeps row order. Global batch k is stream[k*B : (k+1)*B] and host i of P
    reads its b = B/P consecutive slots from k*B + i*b. (Grain's own index shuffle costs ~0.3 ms per
    element here, which would make it the loader's bottleneck.)
    """

    def __init__(self, num_rows: int, global_batch_size: int, process_index: int, process_count: int, seed: int,
                 shuffle: bool):
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.host_batch_size = _host_batch_size(global_batch_size, process_count)
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} must be in [0, {process_count})")
        self.offset = process_index * self.host_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return (1 << 62) // self.global_batch_size  # infinite for all practical purposes

    def _permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:  # a small cache; safe when a prefetch thread and batch_at both use it
            permutation = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_rows)
            self._permutations[epoch] = permutation
            while len(self._permutations) > 2:
                self._permutations.pop(next(iter(self._permutations)), None)
        return permutation

    def __getitem__(self, step: int) -> np.ndarray:
        start = int(step) * self.global_batch_size + self.offset
        positions = np.arange(start, start + self.host_batch_size, dtype=np.int64)
        epochs, slots = np.divmod(positions, self.num_rows)
        if not self.shuffle:
            return slots
        rows = np.empty_like(slots)
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            rows[selected] = self._permutation(int(epoch))[slots[selected]]
        return rows


class BatchIterator(_SteppedIterator):
    """Infinite iterator of host-local batches for pretrain/sft/dpo/reward/kto."""

    def __init__(self, rows: StageRows, global_batch_size: int, seed: int, shuffle: bool, process_index: int,
                 process_count: int, fingerprint: str, prefetch: int = 2, join_documents: bool = False):
        indices = ShuffledBatchIndices(rows.num_rows, global_batch_size, process_index, process_count, seed, shuffle)
        dataset = grain.MapDataset.source(indices).map(functools.partial(rows.batch, join_documents=join_documents))
        super().__init__(dataset, seed, rows.stage, fingerprint, global_batch_size, prefetch)
        self.rows = rows
        self.host_batch_size = indices.host_batch_size

    @property
    def report(self) -> dict[str, Any]:
        return self.rows.report.to_dict()

    @property
    def packing_efficiency(self) -> float:
        return self.rows.report.packing_efficiency

    @property
    def batches_per_epoch(self) -> float:
        return self.rows.num_rows / self.global_batch_size


def _prompt_batch(prompts: list[dict], width: int, pad_id: int):
    def make(indices: np.ndarray) -> dict[str, Any]:
        chosen = [prompts[int(i)] for i in indices]
        tokens = np.full((len(chosen), width), pad_id, dtype=np.int32)
        example_ids = np.full((len(chosen), MAX_EXAMPLES_PER_ROW), -1, dtype=np.int32)
        for row, prompt in enumerate(chosen):
            tokens[row, :len(prompt["prompt_ids"])] = prompt["prompt_ids"]
            example_ids[row, 0] = prompt["id"]
        return {"prompt_tokens": tokens,
                "prompt_lengths": np.asarray([len(p["prompt_ids"]) for p in chosen], dtype=np.int32),
                "example_ids": example_ids, "references": [p["reference"] for p in chosen],
                "messages": [p["messages"] for p in chosen]}
    return make


class PromptIterator(_SteppedIterator):
    """Infinite iterator of prompt batches for on-policy RL (rl.prompts_per_step prompts, global)."""

    def __init__(self, prompts: list[dict], global_batch_size: int, seed: int, shuffle: bool, process_index: int,
                 process_count: int, fingerprint: str, pad_id: int = 0, prefetch: int = 2):
        indices = ShuffledBatchIndices(len(prompts), global_batch_size, process_index, process_count, seed, shuffle)
        dataset = grain.MapDataset.source(indices)
        width = max(len(p["prompt_ids"]) for p in prompts)
        super().__init__(dataset.map(_prompt_batch(prompts, width, pad_id)), seed, "rl", fingerprint,
                         global_batch_size, prefetch)
        self.prompts = prompts
        self.host_batch_size = indices.host_batch_size
        self.offset = indices.offset  # this host's first slot in each global batch


def load_prompts(source: str, tokenizer: Tokenizer | None = None, *, on_bad_record: str = "fail",
                 seq_len: int = 0, text_field: str = "text", report: DataReport | None = None) -> list[dict]:
    """Prompt records for on-policy RL: {"id", "messages", "reference" (str or None), "where"} and, with a
    tokenizer, "prompt_ids" (the chat template up to the assistant marker). Prompts of seq_len tokens or
    more leave no room to answer and are bad records."""
    report = report or DataReport(source=source, stage="rl", seq_len=seq_len)
    policy = BadRecordPolicy(on_bad_record, report)
    records = list(iter_records(source, text_field, policy))
    report.records_read = len(records) + sum(report.bad_records.values())
    prompts = []
    for record in records:
        try:
            prompt = parse_prompt_record(record)
        except DataError as error:
            policy.error(error)
            continue
        if tokenizer is not None:
            prompt["prompt_ids"] = prompt_ids(prompt["messages"], tokenizer)
            if seq_len and len(prompt["prompt_ids"]) >= seq_len:
                policy("prompt_too_long", f"{record.where}: the prompt is {len(prompt['prompt_ids'])} tokens, not "
                                          f"shorter than data.seq_len={seq_len}, so no answer tokens fit")
                continue
        prompts.append(prompt)
    report.examples = len(prompts)
    if not prompts:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(report.bad_records.items())) or "the source is empty"
        raise DataError(f"{source}: no usable prompts ({counts})")
    return prompts


def make_batch_iterator(config, tokenizer: Tokenizer | None = None, split: str = "train", process_index: int = 0,
                        process_count: int = 1, prefetch: int = 2, *,
                        data_format: str) -> BatchIterator | PromptIterator:
    """The infinite, resumable, host-local batch iterator of a split in `data_format` (see the module
    docstring); `jaxllm.stages.make_batch_iterator(config)` passes the configured stage's format."""
    tokenizer = tokenizer or Tokenizer.load(config.data.tokenizer)
    check_vocab(tokenizer, config.model.vocab_size)
    stage = config.train.stage
    if data_format not in DATA_FORMATS:
        raise DataError(f"data format '{data_format}' must be one of {', '.join(DATA_FORMATS)}")
    shuffle = config.data.shuffle and split == "train"
    if data_format == "prompts":
        spec, held_out = _resolve_source(config, split)
        prompts = load_prompts(spec, tokenizer, on_bad_record=config.data.on_bad_record, seq_len=config.data.seq_len,
                               text_field=config.data.text_field)
        if held_out:
            prompts = [p for p in prompts if (p["id"] % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1) == (held_out == "only")
                       ] or prompts
        fingerprint = f"{source_fingerprint(spec)}:{tokenizer.fingerprint}"
        return PromptIterator(prompts, config.rl.prompts_per_step, config.train.seed, shuffle, process_index,
                              process_count, fingerprint, tokenizer.pad_id, prefetch)
    rows = build_rows(config, tokenizer, split, data_format=data_format)
    spec, held_out = _resolve_source(config, split)
    fingerprint = _cache_key(spec, held_out, stage, data_format, config.data, tokenizer, split)
    join = _joins_documents(config, data_format)
    if join:
        fingerprint += ":joined"
    return BatchIterator(rows, config.train.batch_size, config.train.seed, shuffle, process_index, process_count,
                         fingerprint, prefetch, join)


def make_eval_batches(config, tokenizer: Tokenizer | None = None, num_batches: int | None = None,
                      process_index: int = 0, process_count: int = 1, *,
                      data_format: str) -> list[dict[str, np.ndarray]]:
    """Deterministic eval batches (rows in order, no shuffling): up to `num_batches` (default
    train.eval_batches), fewer when the eval rows run out. Every row is used at most once: the last
    batch is filled with padding rows (see PackedRows.batch), which every loss counts as absent."""
    tokenizer = tokenizer or Tokenizer.load(config.data.tokenizer)
    check_vocab(tokenizer, config.model.vocab_size)
    if data_format == "prompts":
        raise DataError(f"stage {config.train.stage} trains on prompts and has no eval batches; use "
                        "load_prompts(data.eval_source or default:qa_eval)")
    num_batches = config.train.eval_batches if num_batches is None else num_batches
    rows = build_rows(config, tokenizer, "eval", data_format=data_format)
    host_batch = _host_batch_size(config.train.batch_size, process_count)
    count = min(num_batches, -(-rows.num_rows // config.train.batch_size))
    join = _joins_documents(config, data_format)
    batches = []
    for index in range(count):
        start = index * config.train.batch_size + process_index * host_batch
        indices = start + np.arange(host_batch)
        batches.append(rows.batch(np.where(indices < rows.num_rows, indices, -1), join))
    return batches


def _joins_documents(config, data_format: str) -> bool:
    """data.join_documents applies to plain-text rows only (chat/preference rows stay isolated)."""
    return bool(config.data.join_documents) and data_format == "text"


def data_report(config, tokenizer: Tokenizer | None = None, split: str = "train", *,
                data_format: str) -> dict[str, Any]:
    """The data report of a split in a data format (counts, packing efficiency, drops and why)."""
    tokenizer = tokenizer or Tokenizer.load(config.data.tokenizer)
    return build_rows(config, tokenizer, split, data_format=data_format).report.to_dict()


# ----------------------------------------------------------------------------------------------
# `jaxllm data stats SOURCE`


def infer_format(source: str, text_field: str = "text") -> str:
    """Guesses the data format of a source from its first record's fields."""
    for record in iter_records(source, text_field, on_bad=lambda reason, message: None):
        fields = set(record.data)
        if {"chosen", "rejected"} <= fields:
            return "pairs"
        if "completion" in fields:
            return "feedback"
        if "response" in fields or ("messages" in fields and any(
                isinstance(m, dict) and m.get("role") == "assistant" for m in record.data["messages"] or [])):
            return "chat"
        if "prompt" in fields or "messages" in fields:
            return "prompts"
        return "text"
    raise DataError(f"data source '{source}' has no readable records")


def data_stats(source: str, config, tokenizer: Tokenizer | None = None, *, data_format: str,
               stage: str | None = None) -> dict[str, Any]:
    """Counts for a source read in `data_format` as the pipeline would use it: records, examples, rows,
    tokens, packing efficiency, truncated/dropped/bad records and why. `stage` labels the report."""
    tokenizer = tokenizer or Tokenizer.load(config.data.tokenizer)
    stage = stage or data_format
    if data_format == "prompts":
        report = DataReport(source=source, stage=stage, seq_len=config.data.seq_len)
        prompts = load_prompts(source, tokenizer, on_bad_record=config.data.on_bad_record,
                               seq_len=config.data.seq_len, text_field=config.data.text_field, report=report)
        lengths = np.asarray([len(p["prompt_ids"]) for p in prompts])
        report.notes.append(f"{len(prompts)} prompts, {int(lengths.sum())} prompt tokens; "
                            f"{sum(p['reference'] is not None for p in prompts)} have a reference answer")
        stats = report.to_dict()
        stats["example_lengths"] = {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
                                    "max": int(lengths.max())}
        return stats
    rows = build_rows(config, tokenizer, data_format=data_format, stage=stage, source=source)
    stats = rows.report.to_dict()
    stats["batches_per_epoch"] = round(rows.num_rows / config.train.batch_size, 2)
    return stats
