"""Reward model: a scalar head on the last answer token, trained with the Bradley-Terry loss on
preference pairs (used by the rl stage's `rl.reward: reward_model` and `jaxllm score`)."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxllm import losses, steps
from jaxllm.config import Config
from jaxllm.stages.base import LossFn, Stage, register

HEAD = "reward"


def reward_loss(graphdef, params, batch: dict, reference_params=None):
    """Bradley-Terry on preference pairs, scores [B] from the 'reward' head."""
    fields = ("tokens", "positions", "segment_ids", "loss_mask")
    joined = [jnp.concatenate([batch[f"chosen_{f}"], batch[f"rejected_{f}"]], axis=0) for f in fields]
    scores = steps.sequence_scores(graphdef, params, *joined, head=HEAD)
    half = batch["chosen_tokens"].shape[0]
    return losses.bradley_terry_loss(scores[:half], scores[half:], pair_weights=steps.pair_presence(batch))


def _loss(config: Config, graphdef) -> LossFn:
    return functools.partial(reward_loss, graphdef)


STAGE = register(Stage(name="reward", summary="a Bradley-Terry reward model (scalar head) on preference pairs",
                       data_format="pairs", loss=_loss, heads=lambda config: (HEAD,)))
