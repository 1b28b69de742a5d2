"""The fused (chunked) lm head + cross-entropy equals the plain loss, its metrics and its gradients."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import losses
from jaxllm import model as model_lib
from jaxllm import stages
from jaxllm import steps as steps_lib

from helpers import SyntheticIterator, tiny_config


def _plain(hidden, unembedding, tokens, weights, z_loss):
    logits = jnp.einsum("btd,dv->btv", hidden, unembedding, preferred_element_type=jnp.float32)
    return losses.cross_entropy(logits, tokens, weights, z_loss)


@pytest.mark.parametrize("chunk_size,length", [(8, 32), (5, 32), (64, 32)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_cross_entropy_equals_plain_loss_metrics_and_gradients(chunk_size, length, z_loss):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, length, 16)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(16, 40)) * 0.3, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 40, (3, length)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (3, length)), jnp.float32)

    plain = _plain(hidden, unembedding, tokens, weights, z_loss)
    fused = losses.chunked_cross_entropy(hidden, unembedding, tokens, weights, z_loss, chunk_size)
    # The same float32 sums, chunk by chunk instead of at once: reordering only (a few ulps), so sums
    # at rtol 1e-5 and gradients at 1e-5 (see tests/helpers.py on cross-program comparisons).
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5)
    assert float(fused[1]) == float(plain[1])  # the denominator is exact
    for key in ("nll_sum", "correct_sum", "z_loss_sum", "tokens"):
        np.testing.assert_allclose(fused[2][key], plain[2][key], rtol=1e-5, err_msg=key)

    def grads(fn):
        return jax.grad(lambda h, u, w: fn(h, u, tokens, w, z_loss)[0], argnums=(0, 1, 2))(hidden, unembedding,
                                                                                          weights)

    fused_grads = jax.jit(lambda: grads(lambda *a: losses.chunked_cross_entropy(*a, chunk_size)))()
    chex.assert_trees_all_close(fused_grads, grads(_plain), atol=1e-5, rtol=1e-5)


def test_fused_loss_gradient_scales_with_the_cotangent():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 24, (2, 16)), jnp.int32)
    weights = jnp.ones((2, 16), jnp.float32)

    def mean_loss(fn, h):
        total, count, _ = fn(h, unembedding, tokens, weights, 0.0)
        return 3.0 * total / count

    fused = jax.grad(lambda h: mean_loss(lambda *a: losses.chunked_cross_entropy(*a, chunk_size=4), h))(hidden)
    np.testing.assert_allclose(fused, jax.grad(lambda h: mean_loss(_plain, h))(hidden), atol=1e-6)


def _loss_and_grads(config, params, batch, chunk_size):
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, loss_chunk_size=chunk_size))
    graphdef, _ = model_lib.abstract_model(config.model)
    loss_fn = stages.loss_fn(config, graphdef)
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0]))(params)


@pytest.mark.parametrize("overrides", [(), ("model.tie_embeddings=false",)])
def test_lm_loss_with_loss_chunk_size_matches_the_unfused_step(overrides):
    config = tiny_config("train.batch_size=4", *overrides)
    _, params = model_lib.init_model(config.model, 0)
    batch = SyntheticIterator("pretrain", 4, 32, 64).batch_at(0)
    plain, fused = (_loss_and_grads(config, params, batch, chunk) for chunk in (0, 8))
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5)
    chex.assert_trees_all_close(fused[1], plain[1], atol=1e-5, rtol=1e-4)


def test_fused_loss_in_bfloat16_is_as_accurate_as_the_unfused_loss():
    config = tiny_config("train.batch_size=4", "model.dtype=bfloat16")
    _, params = model_lib.init_model(config.model, 0)
    batch = SyntheticIterator("pretrain", 4, 32, 64).batch_at(0)
    exact = _loss_and_grads(tiny_config("train.batch_size=4"), params, batch, 0)  # float32 compute
    plain, fused = (_loss_and_grads(config, params, batch, chunk) for chunk in (0, 8))

    def relative_error(grads):
        return max(float(jnp.linalg.norm(g - e) / jnp.linalg.norm(e))
                   for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(exact[1])))

    assert relative_error(fused[1]) <= 1.5 * relative_error(plain[1]) + 1e-3
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-2)
