import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import state as state_lib
from jaxllm import steps as steps_lib
from jaxllm import train as train_lib
from jaxllm.config import MeshConfig

from helpers import SyntheticIterator, tiny_config


def _fresh(config):
    graphdef, params = model_lib.init_model(config.model, 0)
    heads = state_lib.head_names(config)
    if heads:
        params[model_lib.HEADS_KEY] = state_lib.init_heads(config.model, heads, 0)
    optimizer = state_lib.make_optimizer(config.optimizer, config.train.steps)
    return graphdef, optimizer, state_lib.create_state(params, optimizer, 0)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "kto", "reward"])
def test_each_stage_drives_its_loss_down_on_a_tiny_batch(stage):
    config = tiny_config(f"train.stage={stage}", "train.steps=40", "train.batch_size=4", "optimizer.learning_rate=1e-2")
    graphdef, optimizer, state = _fresh(config)
    batch = SyntheticIterator(stage, 4, 32, 64).batch_at(0)
    reference = {k: v for k, v in state.params.items() if k != model_lib.HEADS_KEY}
    step = jax.jit(steps_lib.build_train_step(config, graphdef, optimizer))
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch, reference, jnp.inf)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state.step) == 25


def test_dpo_stage_loss_adds_rpo_alpha_times_the_chosen_nll():
    plain = tiny_config("train.stage=dpo")
    rpo = tiny_config("train.stage=dpo", "feedback.rpo_alpha=0.5")
    graphdef, _, state = _fresh(plain)
    batch = SyntheticIterator("dpo", 4, 32, 64).batch_at(0)
    reference = jax.tree.map(lambda x: x * 0.9, state.params)
    total_plain, count, sums = steps_lib.stage_loss(plain, graphdef)(state.params, batch, reference)
    total_rpo, _, _ = steps_lib.stage_loss(rpo, graphdef)(state.params, batch, reference)
    assert float(sums["chosen_nll_sum"]) > 0
    # float32 sums of a few terms of order 1-10: 1e-5 relative is far above rounding, far below the term (~0.5 x NLL)
    np.testing.assert_allclose(total_rpo, total_plain + 0.5 * sums["chosen_nll_sum"], rtol=1e-5)


def test_gradient_accumulation_over_four_micro_batches_matches_one_big_batch():
    config = tiny_config("train.batch_size=8", "train.steps=2")
    graphdef, optimizer, state = _fresh(config)
    batch = SyntheticIterator("pretrain", 8, 32, 64).batch_at(3)
    batch["loss_mask"][0] = 0  # uneven token counts across micro-batches: the mean must still be exact
    loss_fn = steps_lib.stage_loss(config, graphdef)

    def mean_gradient(micro_batches):
        loss_sum, denominator, _, grads = steps_lib.accumulate_gradients(loss_fn, state.params, batch, None,
                                                                         micro_batches)
        return loss_sum / denominator, jax.tree.map(lambda g: g / denominator, grads)

    loss_one, grads_one = jax.jit(mean_gradient, static_argnums=0)(1)
    loss_accum, grads_accum = jax.jit(mean_gradient, static_argnums=0)(4)
    np.testing.assert_allclose(loss_one, loss_accum, rtol=1e-5)
    chex.assert_trees_all_close(grads_one, grads_accum, atol=1e-6, rtol=1e-4)
    # And the configured step uses it: same loss through build_train_step with grad_accum_steps=4.
    accum_config = tiny_config("train.batch_size=8", "train.grad_accum_steps=4", "train.steps=2")
    _, metrics = jax.jit(steps_lib.build_train_step(accum_config, graphdef, optimizer))(state, batch)
    np.testing.assert_allclose(metrics["loss"], loss_one, rtol=1e-5)


def test_non_finite_loss_skips_the_update_and_advances_the_step():
    config = tiny_config("train.steps=2")
    graphdef, optimizer, state = _fresh(config)
    batch = SyntheticIterator("pretrain", 4, 32, 64).batch_at(0)
    batch["loss_mask"] = batch["loss_mask"] * np.float32(np.inf)  # plants an inf loss
    new_state, metrics = jax.jit(steps_lib.build_train_step(config, graphdef, optimizer))(state, batch)
    assert float(metrics["skipped"]) == 1.0
    assert int(new_state.step) == 1
    chex.assert_trees_all_equal(new_state.params, state.params)


def test_sharded_step_on_a_2x2x2_mesh_equals_one_device():
    assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
    config = tiny_config("train.batch_size=8", "train.steps=3", "model.num_kv_heads=2")
    results = {}
    for name, mesh_config, devices in (("single", MeshConfig(1, 1, 1), jax.devices()[:1]),
                                       ("sharded", MeshConfig(2, 2, 2), jax.devices()[:8])):
        mesh = sharding_lib.make_mesh(mesh_config, devices)
        graphdef, optimizer, _ = _fresh(config)
        abstract = jax.eval_shape(lambda: _fresh(config)[2])
        shardings = state_lib.state_shardings(config, abstract, mesh)
        with jax.set_mesh(mesh):
            state = jax.jit(lambda: _fresh(config)[2], out_shardings=shardings)()
            step = jax.jit(steps_lib.build_train_step(config, graphdef, optimizer),
                           in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                           out_shardings=(shardings, sharding_lib.replicated(mesh)))
            losses = []
            iterator = SyntheticIterator("pretrain", 8, 32, 64)
            for _ in range(3):
                state, metrics = step(state, sharding_lib.place_batch(next(iterator), mesh))
                losses.append(float(metrics["loss"]))
        results[name] = (losses, jax.device_get(state.params), state)
    np.testing.assert_allclose(results["single"][0], results["sharded"][0], rtol=1e-5)
    chex.assert_trees_all_close(results["single"][1], results["sharded"][1], atol=1e-5)
    # Parameters really are sharded, and Adam moments follow their parameter's sharding.
    sharded_state = results["sharded"][2]
    q_proj = sharded_state.params["blocks"]["attention"]["q_proj"]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = sharded_state.opt_state[1][0].mu["blocks"]["attention"]["q_proj"]
    assert mu.sharding.spec == q_proj.sharding.spec


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error():
    with pytest.raises(sharding_lib.MeshError, match="devices"):
        sharding_lib.make_mesh(MeshConfig(3, 1, 1), jax.devices()[:8])
    with pytest.raises(sharding_lib.MeshError, match="divide"):
        sharding_lib.make_mesh(MeshConfig(-1, 3, 1), jax.devices()[:8])


def test_eval_summary_is_exact_over_batches_of_different_sizes():
    results = [{"loss_sum": 2.0, "denominator": 1.0, "nll_sum": 2.0, "correct_sum": 1.0, "z_loss_sum": 0.0,
                "tokens": 1.0},
               {"loss_sum": 3.0, "denominator": 3.0, "nll_sum": 3.0, "correct_sum": 0.0, "z_loss_sum": 0.0,
                "tokens": 3.0}]
    summary = steps_lib.summarize_eval(results)
    assert summary["loss"] == pytest.approx(5 / 4)
    assert summary["accuracy"] == pytest.approx(1 / 4)


_ = (functools, train_lib)
