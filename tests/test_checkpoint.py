import json

import chex
import jax
import numpy as np
import pytest

from jaxllm import checkpoint as ckpt
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import train as train_lib
from jaxllm.config import MeshConfig

from helpers import SyntheticIterator, tiny_config

QUIET = dict(log=lambda *_: None)


def one_device():
    return sharding_lib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def _train(config, workdir, stage="pretrain", mesh=None, **kwargs):
    mesh = mesh or one_device()
    iterator = SyntheticIterator(stage, config.train.batch_size, config.data.seq_len, config.model.vocab_size)
    evals = [SyntheticIterator(stage, config.train.batch_size, config.data.seq_len, config.model.vocab_size,
                               seed=99).batch_at(0)]
    return train_lib.train(config, workdir, tokenizer=False, batch_iterator=iterator, eval_batches=evals, mesh=mesh,
                           **QUIET, **kwargs)


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in train_lib.read_metrics(workdir)]


def test_interrupted_runs_resume_to_the_same_losses_and_params(tmp_path):
    config = tiny_config("train.steps=9", "train.batch_size=4", "train.checkpoint_every=3",
                         "train.async_checkpointing=false")
    straight = _train(config, tmp_path / "straight")
    for _ in range(3):  # three "preemptions" of 3 steps each
        _train(config, tmp_path / "resumed", max_steps_this_run=3)
    assert ckpt.latest_step(tmp_path / "resumed") == 9
    # Bit-exact: the same program on the same machine, resumed from exact checkpoints.
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")
    mesh = sharding_lib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    _, abstract = model_lib.abstract_model(config.model)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_lib.replicated(mesh)),
                          abstract)
    chex.assert_trees_all_equal(ckpt.load_params(tmp_path / "straight", target),
                                ckpt.load_params(tmp_path / "resumed", target))
    assert straight.final_step == 9 and straight.eval_metrics


def test_init_from_loads_params_and_resets_the_optimizer(tmp_path):
    pretrain = tiny_config("train.steps=4", "train.batch_size=4")
    _train(pretrain, tmp_path / "pt")
    sft = tiny_config("train.stage=sft", "train.steps=1", "train.batch_size=4", f"init_from={tmp_path / 'pt'}")
    context = train_lib.setup(sft, tmp_path / "sft", tokenizer=False, mesh=one_device(), **QUIET)
    mesh = context.mesh
    _, abstract = model_lib.abstract_model(pretrain.model)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_lib.replicated(mesh)),
                          abstract)
    chex.assert_trees_all_equal(jax.device_get(context.state.params),
                                jax.device_get(ckpt.load_params(tmp_path / "pt", target)))
    assert int(context.state.step) == 0
    mu = context.state.opt_state[1][0].mu
    assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves(mu))


def test_dpo_keeps_a_frozen_reference_equal_to_the_initial_params(tmp_path):
    _train(tiny_config("train.steps=2", "train.batch_size=4"), tmp_path / "pt")
    dpo = tiny_config("train.stage=dpo", "train.steps=3", "train.batch_size=4", f"init_from={tmp_path / 'pt'}")
    result = _train(dpo, tmp_path / "dpo", stage="dpo")
    assert result.final_step == 3
    context = train_lib.setup(dpo, tmp_path / "dpo", tokenizer=False, mesh=one_device(), **QUIET)  # resumed: reference reloaded
    chex.assert_trees_all_equal(jax.device_get(context.reference_params),
                                jax.device_get(train_lib.setup(
                                    tiny_config("train.stage=sft", f"init_from={tmp_path / 'pt'}"),
                                    tmp_path / "other", tokenizer=False, mesh=one_device(), **QUIET).state.params))
    first = train_lib.read_metrics(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(np.log(2), rel=1e-5)  # policy == reference at step 0


def test_checkpoint_from_another_model_shape_lists_the_mismatched_parameters(tmp_path):
    _train(tiny_config("train.steps=1", "train.batch_size=4"), tmp_path / "pt")
    wider = tiny_config("train.stage=sft", "model.d_model=48", f"init_from={tmp_path / 'pt'}")
    with pytest.raises(ckpt.CheckpointError, match="embed.*\\(64, 32\\).*\\(64, 48\\)"):
        train_lib.setup(wider, tmp_path / "sft", tokenizer=False, mesh=one_device(), **QUIET)


def test_missing_init_from_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    config = tiny_config("train.stage=sft", f"init_from={tmp_path / 'empty'}")
    with pytest.raises(ckpt.CheckpointError, match="no finished checkpoint"):
        train_lib.setup(config, tmp_path / "sft", tokenizer=False, mesh=one_device(), **QUIET)
    assert not (tmp_path / "sft").exists()


def test_init_from_that_does_not_exist_says_so_and_leaves_the_workdir_untouched(tmp_path):
    config = tiny_config("train.stage=sft", f"init_from={tmp_path / 'ptt'}")
    with pytest.raises(ckpt.CheckpointError, match=r"train.init_from=.*ptt: no such directory"):
        train_lib.setup(config, tmp_path / "sft", tokenizer=False, mesh=one_device(), **QUIET)
    assert not (tmp_path / "sft").exists()


def test_checkpoint_written_on_one_device_restores_on_eight_and_back(tmp_path):
    config = tiny_config("train.steps=2", "train.batch_size=8", "train.async_checkpointing=false")
    one = sharding_lib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    eight = sharding_lib.make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    _train(config, tmp_path / "run", mesh=one)
    longer = tiny_config("train.steps=4", "train.batch_size=8", "train.async_checkpointing=false")
    context = train_lib.setup(longer, tmp_path / "run", mesh=eight, tokenizer=False, **QUIET)
    assert context.resumed_from == 2
    q_proj = context.state.params["blocks"]["attention"]["q_proj"]
    assert len(q_proj.sharding.device_set) == 8
    _train(longer, tmp_path / "run", mesh=eight)
    evenlonger = tiny_config("train.steps=5", "train.batch_size=8", "train.async_checkpointing=false")
    assert _train(evenlonger, tmp_path / "run", mesh=one).final_step == 5


def test_best_checkpoint_by_eval_metric_is_kept_beside_the_latest(tmp_path):
    config = tiny_config("train.steps=6", "train.batch_size=4", "train.eval_every=2", "train.best_metric=loss",
                         "optimizer.learning_rate=1e-2")
    _train(config, tmp_path / "run")
    evals = [r for r in train_lib.read_metrics(tmp_path / "run", "eval") if "loss" in r]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["value"] == pytest.approx(min(r["loss"] for r in evals))
    assert best["step"] == min(evals, key=lambda r: r["loss"])["step"]
    assert ckpt.latest_step(tmp_path / "run" / "best") == best["step"]
    mesh = one_device()
    _, abstract = model_lib.abstract_model(config.model)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_lib.replicated(mesh)),
                          abstract)
    chex.assert_tree_all_finite(ckpt.load_params(tmp_path / "run" / "best", target))
