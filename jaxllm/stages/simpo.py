"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
the average log-probability of an answer is its implicit reward, with a target margin and no
reference model.

    L = -log σ( β/|y_w| · log π(y_w | x)  -  β/|y_l| · log π(y_l | x)  -  γ )

β is `feedback.beta` and γ `feedback.margin` (the paper: β 2.0 to 2.5, γ/β about 0.5). Averaged over
the pairs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm import steps
from jaxllm.config import Config, ConfigError
from jaxllm.stages.base import LossFn, Stage, register


def simpo_loss_from_logprobs(chosen_mean: jax.Array, rejected_mean: jax.Array, valid: jax.Array, beta: float,
                             gamma: float):
    """Per-token mean log-probs [B] of the chosen and rejected answers and a [B] 0/1 mask of real pairs
    -> (loss sum over pairs, number of pairs, metric sums)."""
    chosen_reward, rejected_reward = beta * chosen_mean, beta * rejected_mean
    per_pair = -jax.nn.log_sigmoid(chosen_reward - rejected_reward - gamma) * valid
    metrics = {
        "pairs": jnp.sum(valid),
        "reward_chosen_sum": jnp.sum(chosen_reward * valid),
        "reward_rejected_sum": jnp.sum(rejected_reward * valid),
        "reward_margin_sum": jnp.sum((chosen_reward - rejected_reward) * valid),
        "preference_correct_sum": jnp.sum((chosen_reward > rejected_reward).astype(jnp.float32) * valid),
    }
    return jnp.sum(per_pair), jnp.sum(valid), metrics


def simpo_loss(graphdef, params, batch: dict, reference_params=None, *, beta: float, gamma: float):
    chosen_mean, rejected_mean, valid = steps.pair_mean_logprobs(graphdef, params, batch)
    return simpo_loss_from_logprobs(chosen_mean, rejected_mean, valid, beta, gamma)


def _loss(config: Config, graphdef) -> LossFn:
    return functools.partial(simpo_loss, graphdef, beta=config.feedback.beta, gamma=config.feedback.margin)


def _validate(config: Config) -> None:
    if not config.feedback.beta > 0:
        raise ConfigError(f"feedback.beta={config.feedback.beta} is SimPO's reward scale β: it must be > 0 "
                          "(the paper uses 2.0 to 2.5)")


STAGE = register(Stage(name="simpo", summary="SimPO: length-normalised log-prob rewards with a margin, no reference",
                       data_format="pairs", loss=_loss, validate=_validate))
