"""Packing variable-length examples into fixed-length rows (pure numpy, no jaxllm imports).

An example is (token ids, loss mask), at most `seq_len` long. Rows are [rows, seq_len]:
- `segment_ids`: 1, 2, ... for the examples of a row in order, 0 for padding at the end;
- `positions`: 0, 1, ... restarting at every segment (0 on padding), computed from segment_ids;
- `loss_mask`: the example's mask, except 0 on the first token of every segment (nothing in the row
  predicts it) and on padding. mask[t] = 1 means token t is a target predicted at position t-1;
- `example_ids` [rows, K]: example_ids[r, s - 1] is the record id of segment s (-1 where none; only the
  first K segments of a row are listed).

With `pack=True` examples go to rows by best fit (the open row with the least room that still fits,
ties to the oldest), in input order: deterministic. With `pack=False` every example gets its own row.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

import numpy as np

MAX_EXAMPLES_PER_ROW = 8


@dataclasses.dataclass
class PackedRows:
    tokens: np.ndarray  # [rows, seq_len] int32
    segment_ids: np.ndarray  # [rows, seq_len] int32
    loss_mask: np.ndarray  # [rows, seq_len] uint8
    example_ids: np.ndarray  # [rows, K] int32

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def batch(self, rows: np.ndarray | Sequence[int], prefix: str = "", join_documents: bool = False
              ) -> dict[str, np.ndarray]:
        """The rows as a batch dict: tokens, positions, segment_ids, loss_mask (float32), example_ids.

        join_documents: every row is one attention segment (its documents see the ones before them and
        positions run across the row, GPT-2 style) instead of one segment per document.
        A negative row index gives a padding row: all padding (segment 0, pad token 0, loss mask 0,
        example_ids -1), so it adds nothing to any loss sum or count (fills a last, partial eval batch)."""
        rows = np.asarray(rows, dtype=np.int64)
        present = (rows >= 0)[:, None]
        rows = np.where(rows >= 0, rows, 0)
        segment_ids = np.where(present, self.segment_ids[rows], 0).astype(np.int32)
        if join_documents:
            segment_ids = (segment_ids > 0).astype(np.int32)
        return {
            f"{prefix}tokens": np.where(present, self.tokens[rows], 0).astype(np.int32),
            f"{prefix}positions": positions_from_segments(segment_ids),
            f"{prefix}segment_ids": segment_ids,
            f"{prefix}loss_mask": np.where(present, self.loss_mask[rows], 0).astype(np.float32),
            "example_ids": np.where(present, self.example_ids[rows], -1).astype(np.int32),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """[..., T] int32 positions restarting at 0 wherever the segment id changes; 0 on padding."""
    segment_ids = np.asarray(segment_ids)
    length = segment_ids.shape[-1]
    index = np.broadcast_to(np.arange(length, dtype=np.int32), segment_ids.shape)
    starts_here = np.ones(segment_ids.shape, dtype=bool)
    starts_here[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    start_index = np.maximum.accumulate(np.where(starts_here, index, 0), axis=-1)
    return np.where(segment_ids > 0, index - start_index, 0).astype(np.int32)


def split_into_chunks(ids: Sequence[int], mask: Sequence[int], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Cuts a long example into consecutive chunks of at most seq_len (each becomes its own segment)."""
    return [(list(ids[start:start + seq_len]), list(mask[start:start + seq_len]))
            for start in range(0, len(ids), seq_len)]


def assign_rows(lengths: Sequence[int], seq_len: int, pack: bool = True) -> list[list[int]]:
    """Which examples go in which row: best fit in input order (or one per row when pack=False)."""
    if any(length > seq_len or length < 1 for length in lengths):
        raise ValueError(f"every example must have 1..{seq_len} tokens to be packed")
    if not pack:
        return [[index] for index in range(len(lengths))]
    rows: list[list[int]] = []
    shortest = min(lengths, default=1)
    open_rows: list[int] = []  # sorted keys: room << 32 | row, so bisect finds the least room that fits
    for index, length in enumerate(lengths):
        position = bisect.bisect_left(open_rows, length << 32)
        if position < len(open_rows):
            key = open_rows.pop(position)
            row, room = key & 0xFFFFFFFF, key >> 32
        else:
            row, room = len(rows), seq_len
            rows.append([])
        rows[row].append(index)
        room -= length
        if room >= shortest:
            bisect.insort(open_rows, room << 32 | row)
    return rows


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], example_ids: Sequence[int],
                  seq_len: int, pack: bool = True, max_examples_per_row: int = MAX_EXAMPLES_PER_ROW,
                  pad_id: int = 0) -> PackedRows:
    """Packs (ids, mask) examples, each 1..seq_len long, into rows; see the module docstring."""
    lengths = [len(ids) for ids, _ in examples]
    assignment = assign_rows(lengths, seq_len, pack)
    num_rows = len(assignment)
    tokens = np.full((num_rows, seq_len), pad_id, dtype=np.int32)
    segment_ids = np.zeros((num_rows, seq_len), dtype=np.int32)
    loss_mask = np.zeros((num_rows, seq_len), dtype=np.uint8)
    row_example_ids = np.full((num_rows, max_examples_per_row), -1, dtype=np.int32)
    for row, members in enumerate(assignment):
        offset = 0
        for segment, index in enumerate(members, start=1):
            ids, mask = examples[index]
            end = offset + len(ids)
            tokens[row, offset:end] = ids
            segment_ids[row, offset:end] = segment
            loss_mask[row, offset:end] = mask
            loss_mask[row, offset] = 0  # the first token of a segment has no context in the row
            if segment <= max_examples_per_row:
                row_example_ids[row, segment - 1] = example_ids[index]
            offset = end
    return PackedRows(tokens, segment_ids, loss_mask, row_example_ids)
