"""The stage registry, the reference-free preference stages (ORPO, SimPO) and the dry run of every recipe."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import model as model_lib
from jaxllm import stages
from jaxllm import state as state_lib
from jaxllm import steps as steps_lib
from jaxllm.cli import main
from jaxllm.config import ConfigError
from jaxllm.data.examples import DATA_FORMATS
from jaxllm.stages.orpo import orpo_loss_from_logprobs
from jaxllm.stages.simpo import simpo_loss_from_logprobs

from helpers import SyntheticIterator, tiny_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                 if not p.name.startswith(("pipeline", "knowledge")))  # pipelines and experiments have own schemas


def test_every_builtin_stage_is_registered_with_a_data_format():
    assert set(stages.names()) >= {"pretrain", "sft", "dpo", "kto", "reward", "rl", "orpo", "simpo"}
    for name in stages.names():
        stage = stages.get(name)
        assert stage.name == name and stage.data_format in DATA_FORMATS and stage.summary
    assert stages.for_format("chat").name == "sft" and stages.for_format("pairs").name == "dpo"


def test_an_unknown_stage_is_a_config_error_naming_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'simpo'"):
        stages.get("simpoo")
    with pytest.raises(ConfigError, match="train.stage='nonsense' is not one of"):
        stages.of(tiny_config("train.stage=nonsense"))


def _sigmoid_nll(x):
    """-log sigmoid(x) in float64."""
    return np.logaddexp(0.0, -x)


def test_simpo_loss_matches_the_paper_formula():
    rng = np.random.default_rng(0)
    chosen_mean, rejected_mean = -rng.uniform(0.05, 6.0, 8), -rng.uniform(0.05, 6.0, 8)
    valid = np.array([1, 1, 1, 1, 1, 1, 0, 1], np.float32)  # one padding pair: absent
    beta, gamma = 2.0, 1.0
    total, count, metrics = simpo_loss_from_logprobs(jnp.asarray(chosen_mean, jnp.float32),
                                                     jnp.asarray(rejected_mean, jnp.float32), jnp.asarray(valid),
                                                     beta, gamma)
    # L = -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ), the means being the length-normalised log-probs.
    expected = _sigmoid_nll(beta * chosen_mean - beta * rejected_mean - gamma)
    np.testing.assert_allclose(float(total), np.sum(expected * valid), rtol=1e-5)
    assert float(count) == 7 and float(metrics["pairs"]) == 7
    assert float(metrics["preference_correct_sum"]) == np.sum((chosen_mean > rejected_mean) * valid)


def test_orpo_loss_matches_the_paper_formula_including_near_certain_answers():
    # Mean log-probs from nearly certain (-1e-4, where 1 - P underflows naively) to very unlikely (-30).
    chosen_mean = np.array([-1e-4, -0.3, -2.0, -7.5, -30.0, -0.69])
    rejected_mean = np.array([-0.5, -1e-3, -4.0, -0.2, -25.0, -0.7])
    valid = np.ones(6, np.float32)
    lam = 0.25
    total, count, metrics = orpo_loss_from_logprobs(jnp.asarray(chosen_mean, jnp.float32),
                                                    jnp.asarray(rejected_mean, jnp.float32), jnp.asarray(valid), lam)
    # L = NLL(y_w) + λ · -log σ(log(odds(y_w) / odds(y_l))), odds = P / (1 - P), P = exp(mean log-prob).
    def log_odds(mean):
        p = np.exp(mean)
        return np.log(p) - np.log1p(-p)
    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    expected = -chosen_mean + lam * _sigmoid_nll(ratio)
    np.testing.assert_allclose(float(total), np.sum(expected), rtol=2e-4)
    np.testing.assert_allclose(float(metrics["log_odds_ratio_sum"]), np.sum(ratio), rtol=2e-4)
    assert float(count) == 6 and np.isfinite(float(total))


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_reference_free_stage_losses_on_the_model_use_average_logprobs_and_skip_padding_pairs(stage):
    config = tiny_config(f"train.stage={stage}", "feedback.beta=0.5", "feedback.margin=0.3")
    graphdef, params = model_lib.init_model(config.model, 0)
    batch = SyntheticIterator("dpo", 3, 32, 64).batch_at(0)
    for key in ("chosen_loss_mask", "rejected_loss_mask"):  # row 2 becomes padding: no answer tokens
        batch[key] = batch[key].copy()
        batch[key][2] = 0.0
    total, count, _ = stages.loss_fn(config, graphdef)(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)

    def mean_logprobs(side):
        args = [jnp.asarray(batch[f"{side}_{f}"]) for f in ("tokens", "positions", "segment_ids", "loss_mask")]
        sums = np.asarray(steps_lib.sequence_logprobs(graphdef, params, *args), np.float64)
        counts = np.asarray(jnp.sum(steps_lib.losses.target_weights(args[3], args[2]), -1), np.float64)
        return (sums / np.maximum(counts, 1))[:2]

    chosen, rejected = mean_logprobs("chosen"), mean_logprobs("rejected")
    if stage == "simpo":
        expected = _sigmoid_nll(0.5 * chosen - 0.5 * rejected - 0.3)
    else:
        odds = lambda m: m - np.log1p(-np.exp(m))  # noqa: E731  log odds
        expected = -chosen + 0.5 * _sigmoid_nll(odds(chosen) - odds(rejected))
    assert float(count) == 2
    np.testing.assert_allclose(float(total), expected.sum(), rtol=1e-4)


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_reference_free_stages_learn_a_preference_without_a_reference(stage):
    config = tiny_config(f"train.stage={stage}", "train.batch_size=4", "optimizer.learning_rate=1e-2",
                         "feedback.beta=1.0")
    assert not stages.get(stage).needs_reference
    graphdef, params = model_lib.init_model(config.model, 0)
    optimizer = state_lib.make_optimizer(config.optimizer, config.train.steps)
    state = state_lib.create_state(params, optimizer, 0)
    step = jax.jit(stages.build_train_step(config, graphdef, optimizer))
    batch = SyntheticIterator("dpo", 4, 32, 64).batch_at(0)
    losses, accuracies = [], []
    for _ in range(20):
        state, metrics = step(state, batch, None, jnp.inf)
        losses.append(float(metrics["loss"]))
        accuracies.append(float(metrics["preference_accuracy"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert accuracies[-1] == 1.0


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_dry_runs(recipe, capsys):
    assert main(["train", str(ROOT / "configs" / recipe), "--workdir", "unused", "--dry-run", "model.preset=micro",
                 "mesh.num_devices=1"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "stage" in out


def test_dry_run_runs_the_runs_own_checks(tmp_path, capsys):
    # A vocabulary smaller than the tokenizer's fails the dry run as it fails the run (exit 2, one line).
    assert main(["train", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--workdir", "unused", "--dry-run",
                 "model.preset=micro", "model.vocab_size=256", "mesh.num_devices=1"]) == 2
    assert "vocab" in capsys.readouterr().err
    # The rl stage's own checks (batch = prompts x group) run too.
    assert main(["train", str(ROOT / "configs" / "rl_grpo_tiny.yaml"), "--workdir", "unused", "--dry-run",
                 "model.preset=micro", "train.batch_size=8", "mesh.num_devices=1"]) == 2
    assert "rl.prompts_per_step" in capsys.readouterr().err


def test_dry_run_of_a_lora_run_compiles_the_adapter_step(capsys):
    assert main(["train", str(ROOT / "configs" / "sft_tiny.yaml"), "--workdir", "unused", "--dry-run",
                 "model.preset=micro", "model.lora_rank=4", "train.init_from=unused_base", "mesh.num_devices=1"]) == 0
    out = capsys.readouterr().out
    assert "frozen_base_parameters" in out
