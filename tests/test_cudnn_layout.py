"""The packed-document layout handed to cuDNN describes the segment ids exactly, or says it cannot."""

import jax.numpy as jnp
import numpy as np

from jaxllm import model as model_lib


def test_packed_segments_give_lengths_and_starts_of_contiguous_documents():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    lengths, starts, exact = model_lib.packed_segments(segments, 3)
    np.testing.assert_array_equal(lengths, [[3, 2, -1], [6, -1, -1]])
    np.testing.assert_array_equal(starts, [[0, 3, -1, -1], [0, -1, -1, -1]])
    assert bool(exact)


def test_packed_segments_flag_rows_the_layout_cannot_describe():
    too_many = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    assert not bool(model_lib.packed_segments(too_many, 3)[2])
    interleaved = jnp.asarray([[1, 2, 1, 2]], jnp.int32)
    assert not bool(model_lib.packed_segments(interleaved, 3)[2])
    padding_first = jnp.asarray([[0, 1, 1, 1]], jnp.int32)
    assert not bool(model_lib.packed_segments(padding_first, 3)[2])
    all_padding_row = jnp.asarray([[1, 1, 2, 0], [0, 0, 0, 0]], jnp.int32)
    assert not bool(model_lib.packed_segments(all_padding_row, 3)[2])
