"""The token-embedding lookup on a 2x2x2 (data, fsdp, tensor) mesh: no SPMD full rematerialization,
no all-gather of the whole table, and the same numbers as the lookup on one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import state as state_lib
from jaxllm import steps as steps_lib
from jaxllm.config import MeshConfig

from helpers import SyntheticIterator, tiny_config

VOCAB = 96  # a size no other dimension of the tiny model has, so HLO shapes with it are the table's


def _sharded_step_hlo(config, mesh) -> str:
    """Compiles the train step on `mesh` (bypassing the persistent cache, so XLA's SPMD partitioner
    really runs and logs) and returns the compiled, partitioned HLO text."""
    graphdef, params = model_lib.init_model(config.model, 0)
    optimizer = state_lib.make_optimizer(config.optimizer, config.train.steps)
    abstract = jax.eval_shape(lambda: state_lib.create_state(params, optimizer, 0))
    shardings = state_lib.state_shardings(config, abstract, mesh)
    batch = SyntheticIterator("pretrain", 8, config.data.seq_len, VOCAB).batch_at(0)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
    step = jax.jit(steps_lib.build_train_step(config, graphdef, optimizer),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, sharding_lib.replicated(mesh)))
    cache_enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with jax.set_mesh(mesh):
            return step.lower(abstract, abstract_batch).compile().as_text()
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_enabled)


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Output shapes of every all-gather in compiled HLO text (async starts report a tuple: its last shape)."""
    shapes = []
    for match in re.finditer(r"= \(?([^=]*?)\)? all-gather(?:-start)?\(", hlo):
        dims = re.findall(r"\[([\d,]*)\]", match.group(1))
        if dims:
            shapes.append(tuple(int(d) for d in dims[-1].split(",") if d))
    return shapes


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_lookup_on_a_2x2x2_mesh_has_no_full_rematerialization_or_table_all_gather(tied, capfd):
    assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
    config = tiny_config("train.batch_size=8", "train.steps=3", f"model.vocab_size={VOCAB}",
                         f"model.tie_embeddings={str(tied).lower()}")
    mesh = sharding_lib.make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    capfd.readouterr()
    hlo = _sharded_step_hlo(config, mesh)
    log = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in log, log
    gathered = _all_gather_shapes(hlo)
    assert gathered, "the FSDP step all-gathers its weights; finding none means the HLO parse is broken"
    # The table is [vocab/tensor, d_model/fsdp] per device; FSDP may gather d_model ([48, 32] per
    # device), but nothing may rebuild the full vocabulary axis.
    assert not [shape for shape in gathered if VOCAB in shape], gathered


def test_embedding_lookup_on_a_mesh_is_bitwise_the_one_device_lookup():
    """The vocab-sharded lookup is a masked local gather plus a sum with zeros: exact, not just close."""
    table = jax.random.normal(jax.random.key(0), (VOCAB, 32), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (8, 32)), jnp.int32)
    expected = np.asarray(jnp.take(table, tokens, axis=0))
    mesh = sharding_lib.make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    with jax.set_mesh(mesh):
        table_sharding = jax.sharding.NamedSharding(mesh, sharding_lib.logical_to_spec(
            ("vocab", "embed"), table.shape, dict(zip(mesh.axis_names, mesh.axis_sizes))))
        got = jax.jit(model_lib.embedding_lookup)(jax.device_put(table, table_sharding),
                                                  jax.device_put(tokens, sharding_lib.batch_sharding(mesh)))
    assert got.sharding.spec[0] == ("data", "fsdp"), got.sharding  # the output stays split over the batch
    np.testing.assert_array_equal(np.asarray(got), expected)
