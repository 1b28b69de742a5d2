"""Packing invariants, checked on random documents with hypothesis."""

import numpy as np
from hypothesis import given, settings, strategies as st

from jaxllm.data.packing import assign_rows, pack_examples, positions_from_segments, split_into_chunks

SEQ_LEN = 16

documents = st.lists(st.lists(st.integers(4, 99), min_size=1, max_size=40), min_size=1, max_size=25)


def _examples(docs):
    """Each document -> chunks (as the pretraining path does); masks 1 everywhere but the first token."""
    examples, owners = [], []
    for index, doc in enumerate(docs):
        for number, chunk in enumerate(split_into_chunks(doc, [0] + [1] * (len(doc) - 1), SEQ_LEN)):
            examples.append(chunk)
            owners.append(index * 1000 + number)  # document and chunk number, to restore the order
    return examples, owners


def _segments(rows, r):
    """(segment id, start, end) for each segment of row r, in order."""
    seg = rows.segment_ids[r]
    out = []
    for s in range(1, int(seg.max()) + 1):
        where = np.flatnonzero(seg == s)
        out.append((s, int(where[0]), int(where[-1]) + 1, where))
    return out


@settings(max_examples=60, deadline=None)
@given(documents, st.booleans())
def test_packing_loses_and_duplicates_no_token(docs, pack):
    examples, owners = _examples(docs)
    rows = pack_examples(examples, owners, SEQ_LEN, pack=pack, max_examples_per_row=SEQ_LEN)
    chunks = {}
    for r in range(rows.num_rows):
        for s, start, end, _ in _segments(rows, r):
            key = int(rows.example_ids[r, s - 1])
            assert key not in chunks  # each chunk placed once
            chunks[key] = rows.tokens[r, start:end].tolist()
    rebuilt = {i: [] for i in range(len(docs))}
    for key in sorted(chunks):
        rebuilt[key // 1000] += chunks[key]
    assert rebuilt == dict(enumerate(docs))
    assert int((rows.segment_ids > 0).sum()) == sum(map(len, docs))


@settings(max_examples=60, deadline=None)
@given(documents, st.booleans())
def test_segments_are_contiguous_numbered_in_order_and_padding_is_at_the_end(docs, pack):
    examples, owners = _examples(docs)
    rows = pack_examples(examples, owners, SEQ_LEN, pack=pack)
    for r in range(rows.num_rows):
        seg = rows.segment_ids[r]
        used = int((seg > 0).sum())
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all()
        assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
        assert seg[0] == 1
        assert (rows.tokens[r, used:] == 0).all()
        if not pack:
            assert seg.max() == 1


@settings(max_examples=60, deadline=None)
@given(documents)
def test_positions_restart_at_every_segment_and_masks_are_right_at_boundaries(docs):
    examples, owners = _examples(docs)
    rows = pack_examples(examples, owners, SEQ_LEN)
    positions = positions_from_segments(rows.segment_ids)
    for r in range(rows.num_rows):
        for _, start, end, where in _segments(rows, r):
            assert positions[r, start:end].tolist() == list(range(end - start))
            assert rows.loss_mask[r, start] == 0  # nothing in the row predicts a segment's first token
            assert (rows.loss_mask[r, start + 1:end] == 1).all()
        padding = rows.segment_ids[r] == 0
        assert (positions[r][padding] == 0).all() and (rows.loss_mask[r][padding] == 0).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, SEQ_LEN), min_size=1, max_size=60))
def test_best_fit_never_overfills_a_row_and_uses_each_example_once(lengths):
    rows = assign_rows(lengths, SEQ_LEN)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= SEQ_LEN for row in rows)
    # best fit is never worse than one example per row, and rows are filled in input order
    assert len(rows) <= len(lengths)
    assert all(row == sorted(row) for row in rows)


def test_example_ids_list_the_first_k_segments_of_a_row():
    examples = [([5, 6], [0, 1])] * 5
    rows = pack_examples(examples, [10, 11, 12, 13, 14], 16, max_examples_per_row=3)
    assert rows.example_ids.tolist() == [[10, 11, 12]]
    assert rows.segment_ids[0, :10].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_batch_has_the_documented_keys_dtypes_and_shapes():
    rows = pack_examples([([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])], [0, 1], 8)
    batch = rows.batch([0, 0])
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "tokens": ("int32", (2, 8)), "positions": ("int32", (2, 8)), "segment_ids": ("int32", (2, 8)),
        "loss_mask": ("float32", (2, 8)), "example_ids": ("int32", (2, 8))}
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 0, 1, 0, 0, 0]


def test_joined_documents_make_one_segment_per_row_with_positions_running_across_it():
    rows = pack_examples([([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])], [0, 1], 8)
    joined = rows.batch([0], join_documents=True)
    assert joined["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert joined["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    isolated = rows.batch([0])
    for key in ("tokens", "loss_mask", "example_ids"):  # only the attention layout changes
        np.testing.assert_array_equal(joined[key], isolated[key])
