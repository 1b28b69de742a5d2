"""KTO (Kahneman-Tversky optimisation) on single answers with a thumbs up or down, against the frozen
reference model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm import losses, steps
from jaxllm.config import Config
from jaxllm.stages.base import LossFn, Stage, register


def kto_loss(graphdef, params, batch: dict, reference_params, *, beta: float, desirable_weight: float,
             undesirable_weight: float):
    """KTO on thumbs up/down (batch["label"] [B]: +1 / -1). The reference point z0 is the batch mean of
    log pi/ref over all its completions (detached, clamped at 0): a cheap stand-in for the paper's
    mismatched-pair KL. Padding rows (no answer token) are absent: label 0 and left out of z0's mean."""
    args = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["loss_mask"])
    policy = steps.sequence_logprobs(graphdef, params, *args)
    reference = jax.lax.stop_gradient(steps.sequence_logprobs(graphdef, reference_params, *args))
    present = steps.row_presence(batch["loss_mask"], batch["segment_ids"])
    kl_reference = losses.safe_mean(jnp.sum((jax.lax.stop_gradient(policy) - reference) * present),
                                    jnp.sum(present))
    return losses.kto_loss(policy, reference, batch["label"] * present, kl_reference, beta, desirable_weight,
                           undesirable_weight)


def _loss(config: Config, graphdef) -> LossFn:
    fb = config.feedback
    return functools.partial(kto_loss, graphdef, beta=fb.beta, desirable_weight=fb.desirable_weight,
                             undesirable_weight=fb.undesirable_weight)


STAGE = register(Stage(name="kto", summary="KTO on answers labelled desirable or undesirable",
                       data_format="feedback", loss=_loss, needs_reference=True,
                       rows_independent=False))  # z0 is a mean over the whole batch
