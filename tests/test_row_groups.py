"""Row groups: a batch's rows in groups side by side on host threads (jaxllm.row_groups), for the train step."""

import jax
import numpy as np
import pytest

from jaxllm import model as model_lib
from jaxllm import row_groups
from jaxllm import sharding as sharding_lib
from jaxllm import stages
from jaxllm import state as state_lib
from jaxllm import step_builder
from jaxllm.config import MeshConfig
from jaxllm.errors import ConfigError

from helpers import SyntheticIterator, assert_adam_trained_params_close, tiny_config

STEPS = 3


def _train(config, steps: int = STEPS, compile_ahead: bool = False):
    """`steps` updates of the built step on synthetic batches; (built, metrics per step, params, initial params)."""
    mesh = sharding_lib.make_mesh(config.mesh)
    built = step_builder.build(config, mesh)
    params = model_lib.init_model(config.model, 0)[1]
    heads = stages.head_names(config)
    if heads:
        params[model_lib.HEADS_KEY] = state_lib.init_heads(config.model, heads, 0)
    initial = jax.device_get(params)
    state = state_lib.create_state(params, built.optimizer, 0)
    reference = None  # a copy: the state's buffers are donated
    if built.reference_abstract is not None:
        reference = jax.tree.map(lambda x: x.copy(), step_builder.without_heads(params))
    data = SyntheticIterator(config.train.stage, config.train.batch_size, config.data.seq_len,
                             config.model.vocab_size)
    step = built.jit_train_step()
    history = []
    with jax.set_mesh(mesh):
        if compile_ahead:
            step = step.lower(state, sharding_lib.place_batch(data.batch_at(0), mesh), reference,
                              np.float32(np.inf)).compile()
        for k in range(steps):
            state, metrics = step(state, sharding_lib.place_batch(data.batch_at(k), mesh), reference,
                                  np.float32(np.inf))
            history.append({key: float(value) for key, value in jax.device_get(metrics).items()})
    return built, history, jax.device_get(state.params), initial


@pytest.mark.parametrize("stage, extra", [("pretrain", ()), ("dpo", ()), ("sft", ("train.grad_accum_steps=2",))])
def test_the_row_grouped_step_makes_the_update_of_the_one_program_step(stage, extra):
    overrides = (f"train.stage={stage}", "train.batch_size=8", "mesh.num_devices=1", f"train.steps={STEPS}", *extra)
    grouped_config, one_config = tiny_config(*overrides, "train.row_groups=4"), tiny_config(*overrides,
                                                                                            "train.row_groups=1")
    built, grouped, grouped_params, initial = _train(grouped_config)
    assert isinstance(built.jit_train_step(), step_builder.RowGroupedStep) and built.row_groups == 4
    _, one, one_params, _ = _train(one_config)
    for got, expected in zip(grouped, one):
        assert got.keys() == expected.keys()
        for key in expected:  # sums over the same rows in another order: float32 rounding only
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert_adam_trained_params_close(grouped_params, one_params, initial, grouped_config, STEPS)


def test_the_row_grouped_step_compiles_ahead_and_runs_the_same():
    config = tiny_config("train.batch_size=4", "mesh.num_devices=1", "train.row_groups=2")
    _, jitted, jitted_params, _ = _train(config, steps=2)
    _, compiled, compiled_params, _ = _train(config, steps=2, compile_ahead=True)
    assert compiled == jitted
    for a, b in zip(jax.tree.leaves(compiled_params), jax.tree.leaves(jitted_params)):
        np.testing.assert_array_equal(a, b)


def test_train_row_groups_defaults_to_one_per_core_where_the_loss_is_a_sum_over_rows(monkeypatch):
    monkeypatch.setattr(row_groups.cpu_levers, "available_cpus", lambda: 2)
    one_device = sharding_lib.make_mesh(MeshConfig(num_devices=1))
    eight_devices = sharding_lib.make_mesh(MeshConfig(8, 1, 1), jax.devices()[:8])

    def groups(mesh, *overrides):
        config = tiny_config(*overrides)
        return step_builder.train_row_groups(config, mesh, stages.get(config.train.stage))

    assert groups(one_device, "train.batch_size=8") == 2
    assert groups(one_device, "train.batch_size=7") == 1  # the rows do not divide: one program
    assert groups(one_device, "train.batch_size=6", "train.grad_accum_steps=2") == 1  # 3 rows per group, 2 micro
    assert groups(one_device, "train.batch_size=8", "train.row_groups=1") == 1
    assert groups(eight_devices, "train.batch_size=8") == 1  # the mesh splits the batch already
    assert groups(one_device, "train.batch_size=8", "train.stage=kto") == 1  # z0: a mean over the whole batch
    assert groups(one_device, "train.batch_size=8", "train.row_groups=4") == 4
    monkeypatch.setattr(row_groups.cpu_levers, "available_cpus", lambda: 64)
    assert groups(one_device, "train.batch_size=64") == step_builder.MAX_AUTO_ROW_GROUPS
    config = tiny_config("train.batch_size=64")  # groups whose gradients would pass the memory limit: fewer
    assert step_builder.train_row_groups(config, one_device, stages.get("pretrain"),
                                         gradient_bytes=step_builder.MAX_AUTO_GRADIENT_BYTES // 3) == 2
    monkeypatch.setattr(row_groups.cpu_levers, "available_cpus", lambda: 2)
    with pytest.raises(ConfigError, match="the kto loss is not a sum over rows"):
        groups(one_device, "train.batch_size=8", "train.stage=kto", "train.row_groups=2")
    with pytest.raises(ConfigError, match="spreads it over devices already"):
        groups(eight_devices, "train.batch_size=8", "train.row_groups=2")
    with pytest.raises(ConfigError, match=r"train.row_groups=3 x train.grad_accum_steps=1 must divide "
                                          r"train.batch_size=8"):
        groups(one_device, "train.batch_size=8", "train.row_groups=3")


def test_cpu_row_groups_and_map_row_groups(monkeypatch):
    monkeypatch.setattr(row_groups.cpu_levers, "available_cpus", lambda: 4)
    assert [row_groups.cpu_row_groups(rows) for rows in (1, 2, 3, 6, 8, 9)] == [1, 2, 3, 3, 4, 3]
    assert row_groups.cpu_row_groups(8, min_rows=4) == 2 and row_groups.cpu_row_groups(8, multiple=4) == 2
    assert row_groups.cpu_row_groups(8, most=3) == 2
    mesh = sharding_lib.make_mesh(MeshConfig(num_devices=1))
    seen = row_groups.map_row_groups(lambda group: (group, jax.sharding.get_abstract_mesh().size), 3, mesh)
    assert seen == [(0, 1), (1, 1), (2, 1)]  # in group order, each thread under the mesh


def test_map_on_threads_yields_every_call_in_order_and_host_workers(monkeypatch):
    import threading
    import time

    def call(index: int):
        time.sleep(0.01 * (5 - index))  # the first calls finish last
        return index, threading.current_thread().name

    results = list(row_groups.map_on_threads(call, 5, 3))
    assert [index for index, _ in results] == [0, 1, 2, 3, 4]
    assert len({name for _, name in results}) > 1  # side by side on several threads
    assert [index for index, _ in row_groups.map_on_threads(call, 3, 1)] == [0, 1, 2]
    monkeypatch.setattr(row_groups.cpu_levers, "available_cpus", lambda: 16)
    assert row_groups.host_workers() == 4
    assert row_groups.host_workers(sharding_lib.make_mesh(MeshConfig(2, 1, 1), jax.devices()[:2])) == 1


def _update_program_text(*overrides) -> str:
    config = tiny_config("train.batch_size=8", "mesh.num_devices=1", "train.row_groups=2", *overrides)
    built = step_builder.build(config, sharding_lib.make_mesh(config.mesh))
    return built.lower().update.as_text()


def test_stages_whose_optimizers_differ_only_in_their_numbers_share_one_update_program():
    """The update takes the learning-rate schedule, weight decay and clipping norm as inputs, so pretraining,
    SFT and DPO with the default recipes' optimizers lower to the same program (one compile, then the
    persistent cache); a different kind of schedule is another program."""
    pretrain = _update_program_text("train.stage=pretrain", "train.steps=600", "optimizer.learning_rate=3e-3",
                                    "optimizer.warmup_steps=20", "optimizer.weight_decay=0.1")
    dpo = _update_program_text("train.stage=dpo", "train.steps=120", "optimizer.learning_rate=1e-4",
                               "optimizer.warmup_steps=5", "optimizer.weight_decay=0.0", "optimizer.grad_clip_norm=0.5")
    assert dpo == pretrain
    assert _update_program_text("train.stage=pretrain", "optimizer.schedule=linear") != pretrain


def test_the_row_grouped_step_keeps_the_state_where_the_update_is_skipped():
    """The skip is decided on the host: a loss over the limit returns the given params and optimizer state
    (one step further), and the next ok update goes on from them."""
    config = tiny_config("train.batch_size=4", "mesh.num_devices=1", "train.row_groups=2")
    mesh = sharding_lib.make_mesh(config.mesh)
    built = step_builder.build(config, mesh)
    state = state_lib.create_state(model_lib.init_model(config.model, 0)[1], built.optimizer, 0)
    before = jax.device_get((state.params, state.opt_state))
    data = SyntheticIterator("pretrain", 4, config.data.seq_len, config.model.vocab_size)
    step = built.jit_train_step()
    with jax.set_mesh(mesh):
        state, metrics = step(state, sharding_lib.place_batch(data.batch_at(0), mesh), None, np.float32(-np.inf))
        assert float(metrics["skipped"]) == 1.0 and int(state.step) == 1
        for a, b in zip(jax.tree.leaves(jax.device_get((state.params, state.opt_state))), jax.tree.leaves(before)):
            np.testing.assert_array_equal(a, b)
        state, metrics = step(state, sharding_lib.place_batch(data.batch_at(1), mesh), None, np.float32(np.inf))
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                        jax.tree.leaves(before[0])))
