"""LoRA: adapters start at the base exactly, only adapters train (and sit in the optimizer state), the
frozen base is the DPO reference, and merged weights give the same logits as base + adapters."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from jaxllm import lora
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import stages
from jaxllm import train as train_lib
from jaxllm.config import ConfigError, MeshConfig
from jaxllm.convert import hf_export, hf_import

from helpers import SyntheticIterator, tiny_config

QUIET = dict(log=lambda *_: None)
LORA = ["model.lora_rank=2", "model.lora_alpha=8", "optimizer.learning_rate=1e-2", "train.batch_size=4",
        "train.checkpoint_every=100", "train.async_checkpointing=false"]


class OneBatch(SyntheticIterator):
    """The same batch at every step: a few steps must fit it."""

    def batch_at(self, k: int) -> dict:
        return super().batch_at(0)


def one_device():
    return sharding_lib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def _inputs(vocab=64, batch=2, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return tokens, positions, np.ones_like(tokens)


def _logits(model_config, params, inputs):
    graphdef, _ = model_lib.abstract_model(model_config)
    return np.asarray(jax.jit(model_lib.apply, static_argnums=0)(graphdef, params, *inputs))


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
    """A plain workdir (params only, like `convert from-hf` writes) to put adapters on."""
    config = tiny_config()
    _, params = model_lib.init_model(config.model, seed=0)
    return hf_import.write_workdir(tmp_path_factory.mktemp("base") / "base", config, params, {}), params


def test_fresh_adapters_leave_the_base_model_exactly_unchanged(base_workdir):
    _, base = base_workdir
    config = dataclasses.replace(tiny_config().model, lora_rank=4, lora_targets="q,v,o,down")
    adapters = jax.jit(lambda: lora.init_adapters(config, 3))()
    names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    assert names == {"q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b", "o_lora_a", "o_lora_b",
                     "down_lora_a", "down_lora_b"}
    assert float(np.abs(adapters["blocks"]["attention"]["q_lora_a"]).max()) > 0  # A random, B zero
    inputs = _inputs()
    # Bit-exact although the programs differ: a zero B makes every adapter term exactly 0.0, and x + 0.0 == x.
    np.testing.assert_array_equal(_logits(config, lora.combine(base, adapters), inputs),
                                  _logits(tiny_config().model, base, inputs))


def test_lora_needs_a_base_and_known_targets():
    with pytest.raises(ConfigError, match="train.init_from"):
        tiny_config("model.lora_rank=4")
    with pytest.raises(ConfigError, match="lora_targets"):
        tiny_config("model.lora_rank=4", "model.lora_targets=q,wq", "train.init_from=x")


def test_sft_with_lora_trains_only_adapters_and_merges_exactly(base_workdir, tmp_path):
    workdir, base = base_workdir
    config = tiny_config(*LORA, "train.steps=4", "train.stage=sft", f"train.init_from={workdir}")
    iterator = OneBatch("sft", 4, config.data.seq_len, config.model.vocab_size)
    result = train_lib.train(config, tmp_path / "sft", tokenizer=False, batch_iterator=iterator, eval_batches=[],
                             mesh=one_device(), **QUIET)
    assert result.final_step == 4

    context = train_lib.setup(config, tmp_path / "sft", tokenizer=False, mesh=one_device(), **QUIET)  # resumes
    trained = context.state.params
    _, trainable_paths = lora.split(trained)
    assert jax.tree.structure(trained) == jax.tree.structure(trainable_paths)  # the state holds adapters only
    adapter_count = lora.count_adapter_params(config.model)
    assert sum(x.size for x in jax.tree.leaves(trained)) == adapter_count
    moments = sum(x.size for x in jax.tree.leaves(context.state.opt_state) if x.ndim)  # Adam mu + nu
    assert moments == 2 * adapter_count and adapter_count < model_lib.count_params(base) / 4
    jax.tree.map(np.testing.assert_array_equal, context.reference_params, base)  # the frozen base, unchanged
    assert float(np.abs(trained["blocks"]["mlp"]["down_lora_b"]).max()) > 0
    from jaxllm import steps as steps_lib

    evaluate = jax.jit(stages.build_eval_step(config, context.graphdef))
    loss = lambda params: float(steps_lib.summarize_eval([evaluate(params, iterator.batch_at(0), base)])["loss"])  # noqa: E731
    assert loss(trained) < loss(jax.tree.map(np.zeros_like, trained)) - 0.02  # the adapters learned the batch

    inputs = _inputs(seed=1)
    with_adapters = _logits(config.model, lora.combine(base, trained), inputs)
    merged = lora.merge(base, trained, config.model)
    # W + A·B merged vs x·W + (x·A)·B: another float32 order; logits of order 1, 2e-5 is ~100 ulps.
    np.testing.assert_allclose(_logits(tiny_config().model, merged, inputs), with_adapters, atol=2e-5)
    assert np.abs(with_adapters - _logits(tiny_config().model, base, inputs)).max() > 1e-3

    # Loading the LoRA run anywhere (generation, merge-lora, the next stage's init_from) merges it.
    from jaxllm import generate

    _, _, loaded, _ = generate.load_model_for_inference(tmp_path / "sft", mesh=one_device(), load_tokenizer=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), loaded, merged)
    merged_dir = hf_export.merge_lora(tmp_path / "sft", tmp_path / "merged", **QUIET)
    _, reloaded = hf_export.load_workdir_params(merged_dir)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), reloaded, merged)


def test_dpo_with_lora_uses_the_frozen_base_as_reference(base_workdir, tmp_path):
    workdir, base = base_workdir
    config = tiny_config(*LORA, "train.steps=2", "train.stage=dpo", f"train.init_from={workdir}")
    context = train_lib.setup(config, tmp_path / "dpo", tokenizer=False, mesh=one_device(), **QUIET)
    assert context.reference_params is not None and lora.split(context.reference_params)[1] == {}
    from jaxllm import steps as steps_lib

    step = train_lib.jit_step(context, stages.build_train_step(config, context.graphdef, context.optimizer))
    batch = SyntheticIterator("dpo", 4, config.data.seq_len, config.model.vocab_size).batch_at(0)
    with jax.set_mesh(context.mesh):
        placed = sharding_lib.place_batch(batch, context.mesh)
        state, first = step(context.state, placed, context.reference_params, np.float32(np.inf))
        state, second = step(state, placed, context.reference_params, np.float32(np.inf))
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert float(second["loss"]) < math.log(2)  # the adapters moved away from the reference
    jax.tree.map(np.testing.assert_array_equal, context.reference_params, base)


class ToyPrompts:
    """Random token prompts (BOS first); batch k is a pure function of k."""

    def __init__(self, batch: int):
        self.batch, self.step = batch, 0

    def batch_at(self, k: int) -> dict:
        rng = np.random.default_rng(k)
        tokens = np.zeros((self.batch, 4), np.int32)
        tokens[:, 0], tokens[:, 1:] = 2, rng.integers(10, 64, (self.batch, 3))
        return {"prompt_tokens": tokens, "prompt_lengths": np.full((self.batch,), 4, np.int32)}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = state["step"]


def test_ppo_with_lora_samples_with_the_adapters_and_trains_adapters_and_value_head(base_workdir, tmp_path):
    from jaxllm import rl

    workdir, base = base_workdir
    config = tiny_config(*LORA, "train.stage=rl", "rl.algorithm=ppo", "train.steps=1", "train.batch_size=8",
                         "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=4", "rl.reward=sevens",
                         f"train.init_from={workdir}")
    train_lib.train(config, tmp_path / "ppo", mesh=one_device(), tokenizer=False, batch_iterator=ToyPrompts(2),
                    eval_prompts=[], reward_functions={"sevens": lambda s: float(s.completion_ids.count(7))}, **QUIET)
    records = train_lib.read_metrics(tmp_path / "ppo")
    assert [r["step"] for r in records] == [1] and all(np.isfinite(r["value_loss"]) for r in records)
    context = train_lib.setup(config, tmp_path / "ppo", tokenizer=False, mesh=one_device(), **QUIET)
    assert set(context.state.params) == {"blocks", model_lib.HEADS_KEY}  # adapters + the value head
    assert lora.split(context.state.params)[0] == {model_lib.HEADS_KEY: context.state.params[model_lib.HEADS_KEY]}
    jax.tree.map(np.testing.assert_array_equal, context.reference_params, base)
