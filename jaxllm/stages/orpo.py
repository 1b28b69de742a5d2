"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):
supervised fine-tuning on the chosen answer plus an odds-ratio penalty on the rejected one, in one
stage and with no reference model.

    L = NLL(y_w | x) + λ · -log σ( log odds(y_w | x) - log odds(y_l | x) ),
    odds(y | x) = P(y | x) / (1 - P(y | x)),  log P(y | x) = (1/|y|) Σ_t log p(y_t | x, y_<t)

with per-token averaged (length-normalised) log-probabilities, as in the paper. λ is `feedback.beta`
(TRL's name for it too; the paper uses 0.1 to 0.25). Each term is averaged over the pairs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm import steps
from jaxllm.config import Config, ConfigError
from jaxllm.stages.base import LossFn, Stage, register


def log1m_exp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Mächler 2012)."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss_from_logprobs(chosen_mean: jax.Array, rejected_mean: jax.Array, valid: jax.Array, lam: float):
    """Per-token mean log-probs [B] of the chosen and rejected answers and a [B] 0/1 mask of real pairs
    -> (loss sum over pairs, number of pairs, metric sums)."""
    log_odds = (chosen_mean - log1m_exp(chosen_mean)) - (rejected_mean - log1m_exp(rejected_mean))
    odds_ratio_loss = -jax.nn.log_sigmoid(log_odds)
    nll = -chosen_mean
    per_pair = (nll + lam * odds_ratio_loss) * valid
    metrics = {
        "pairs": jnp.sum(valid),
        "nll_chosen_sum": jnp.sum(nll * valid),
        "odds_ratio_loss_sum": jnp.sum(odds_ratio_loss * valid),
        "log_odds_ratio_sum": jnp.sum(log_odds * valid),
        "preference_correct_sum": jnp.sum((log_odds > 0).astype(jnp.float32) * valid),
    }
    return jnp.sum(per_pair), jnp.sum(valid), metrics


def orpo_loss(graphdef, params, batch: dict, reference_params=None, *, lam: float):
    chosen_mean, rejected_mean, valid = steps.pair_mean_logprobs(graphdef, params, batch)
    return orpo_loss_from_logprobs(chosen_mean, rejected_mean, valid, lam)


def _loss(config: Config, graphdef) -> LossFn:
    return functools.partial(orpo_loss, graphdef, lam=config.feedback.beta)


def _validate(config: Config) -> None:
    if not config.feedback.beta >= 0:
        raise ConfigError(f"feedback.beta={config.feedback.beta} is ORPO's λ (the weight of the odds-ratio term): "
                          "it must be >= 0 (the paper uses 0.1 to 0.25)")


STAGE = register(Stage(name="orpo", summary="ORPO: SFT on the chosen answer + an odds-ratio penalty, no reference",
                       data_format="pairs", loss=_loss, validate=_validate))
