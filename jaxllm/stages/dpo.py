"""Direct preference optimisation (DPO, and its IPO / hinge variants) on (prompt, chosen, rejected)
pairs, against the frozen reference model (the stage's init_from)."""

from __future__ import annotations

import functools

import jax

from jaxllm import losses, steps
from jaxllm.config import Config
from jaxllm.stages.base import LossFn, Stage, register


def dpo_loss(graphdef, params, batch: dict, reference_params, *, beta: float, loss_type: str,
             label_smoothing: float, rpo_alpha: float = 0.0):
    """DPO/IPO/hinge against the frozen reference (or precomputed `reference_chosen_logps` /
    `reference_rejected_logps` [B] in the batch), plus rpo_alpha x the chosen answers' per-token NLL (RPO).
    Returns (loss sum, pairs, metric sums)."""
    policy_chosen, policy_rejected = steps.pair_logprobs(graphdef, params, batch)
    if "reference_chosen_logps" in batch:
        ref_chosen, ref_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    else:
        ref_chosen, ref_rejected = steps.pair_logprobs(graphdef, jax.lax.stop_gradient(reference_params), batch)
    chosen_token_counts, _ = steps.pair_token_counts(batch)
    return losses.dpo_loss(policy_chosen, policy_rejected, jax.lax.stop_gradient(ref_chosen),
                           jax.lax.stop_gradient(ref_rejected), beta, loss_type, label_smoothing,
                           pair_weights=steps.pair_presence(batch), rpo_alpha=rpo_alpha,
                           chosen_token_counts=chosen_token_counts)


def _loss(config: Config, graphdef) -> LossFn:
    fb = config.feedback
    return functools.partial(dpo_loss, graphdef, beta=fb.beta, loss_type=fb.loss, label_smoothing=fb.label_smoothing,
                             rpo_alpha=fb.rpo_alpha)


def dpo_step(state, batch, reference_params, *, graphdef, optimizer, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, micro_batches: int = 1, rpo_alpha: float = 0.0):
    """`(state, batch, reference_params) -> (state, metrics)` for the Python API."""
    loss_fn = functools.partial(dpo_loss, graphdef, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                rpo_alpha=rpo_alpha)
    return steps.train_step(state, batch, reference_params, loss_fn=loss_fn, optimizer=optimizer,
                            micro_batches=micro_batches)


STAGE = register(Stage(name="dpo", summary="DPO / IPO / hinge (+ RPO's NLL term) on preference pairs, frozen reference",
                       data_format="pairs", loss=_loss, needs_reference=True))
