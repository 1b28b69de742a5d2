"""The update side of on-policy learning: rollout rows, policy/reference/value scores of them, advantages
(group estimators, PPO's GAE) and the policy loss the compiled step minimises."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import generate as generate_lib
from jaxllm import losses
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm.config import Config


# ----------------------------------------------------------------------------------------------
# Rollouts: generation output -> samples and training rows.


def build_rows(prompts: Sequence[Sequence[int]], output: generate_lib.GenerationOutput, width: int) -> dict:
    """Right-padded [prompt, answer (+stop token)] rows [B, width]: tokens, positions, segment_ids, loss_mask."""
    count = len(prompts)
    tokens = np.zeros((count, width), np.int32)
    loss_mask = np.zeros((count, width), np.float32)
    segment_ids = np.zeros((count, width), np.int32)
    for row, prompt in enumerate(prompts):
        answer = output.completion(row, keep_stop=True)
        length = len(prompt) + len(answer)
        tokens[row, :length] = list(prompt) + answer
        segment_ids[row, :length] = 1
        loss_mask[row, len(prompt):length] = 1.0
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (count, width)).copy()
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "loss_mask": loss_mask}


def forward(graphdef, params, tokens, positions, segment_ids) -> tuple[jax.Array, jax.Array]:
    """(float32 logits [B,T,V], final hidden states [B,T,D]) from one pass."""
    hidden = model_lib.apply_hidden(graphdef, params, tokens, positions, segment_ids)
    unembedding = model_lib.unembedding(graphdef, params, hidden.dtype)
    logits = jnp.einsum("btd,dv->btv", hidden, unembedding, preferred_element_type=jnp.float32)
    return sharding_lib.constrain(logits, ("batch", "seq", "vocab")), hidden


def token_values(params, hidden: jax.Array) -> jax.Array:
    """Value head: [B,T,D] -> [B,T], aligned with token_logprobs: values[:, t] = V(tokens < t), the
    value of the state in which token t is chosen."""
    head = params[model_lib.HEADS_KEY]["value"]
    values = hidden.astype(jnp.float32) @ head["kernel"] + head["bias"]
    return jnp.pad(values[:, :-1], ((0, 0), (1, 0)))


def rollout_scores(graphdef, params, reference_params, batch: dict, *, with_values: bool) -> dict[str, jax.Array]:
    """Log-probs [B,T] of the sampled rows under the policy (the 'old' policy of the ratio) and the
    reference, and (ppo) the values [B,T]."""
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    logits, hidden = forward(graphdef, params, *args)
    out = {"old_logprobs": losses.token_logprobs(logits, batch["tokens"]),
           "reference_logprobs": losses.token_logprobs(model_lib.apply(graphdef, reference_params, *args),
                                                       batch["tokens"])}
    if with_values:
        out["old_values"] = token_values(params, hidden)
    return out


_rollout_scores_jit = jax.jit(rollout_scores, static_argnums=(0,), static_argnames=("with_values",))


@functools.partial(jax.jit, static_argnames=("algorithm", "group_size"))
def group_advantages(rewards: jax.Array, *, algorithm: str, group_size: int) -> tuple[jax.Array, jax.Array]:
    """rewards [B] -> (advantages [B] from the registered estimator, fraction of all-equal groups)."""
    return (losses.ADVANTAGE_ESTIMATORS[algorithm](rewards, group_size),
            losses.equal_reward_groups(rewards, group_size))


def rl_loss(graphdef, params, batch: dict, reference_params=None, *, policy_loss: str = "clipped",
            clip_epsilon: float = 0.2, kl_coef: float = 0.0, value_coef: float = 0.5):
    """Policy loss on the answer tokens (+ value_coef x clipped value loss when the batch has returns).

    batch: tokens/positions/segment_ids/loss_mask [B,T], old_logprobs/reference_logprobs [B,T],
    advantages [B] or [B,T], and for ppo old_values/returns [B,T]. Returns (sum, answer tokens, sums)."""
    logits, hidden = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    logprobs = losses.token_logprobs(logits, batch["tokens"])
    weights = losses.target_weights(batch["loss_mask"], batch["segment_ids"])
    loss_sum, count, metrics = losses.POLICY_LOSSES[policy_loss](
        logprobs, batch["old_logprobs"], batch["reference_logprobs"], batch["advantages"], weights, clip_epsilon,
        kl_coef)
    metrics = dict(metrics)
    if "returns" in batch:
        values = token_values(params, hidden)
        value_sum, _, _ = losses.value_loss(values, batch["old_values"], batch["returns"], weights, clip_epsilon)
        metrics["policy_loss_sum"] = loss_sum
        metrics["value_loss_sum"] = value_sum
        loss_sum = loss_sum + value_coef * value_sum
    metrics["logprob_sum"] = jnp.sum(jax.lax.stop_gradient(logprobs) * weights)
    return loss_sum, count, metrics


_gae_jit = jax.jit(losses.gae_advantages, static_argnames=("gamma", "lam"))


def ppo_advantages(rewards: np.ndarray, old_logprobs: np.ndarray, reference_logprobs: np.ndarray,
                   values: np.ndarray, weights: np.ndarray, kl_coef: float, gamma: float,
                   lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-token rewards (-kl_coef x (log π_old - log π_ref) on every answer token, plus the sequence
    reward on the last one) -> GAE advantages [B,T] (whitened over answer tokens) and returns [B,T].
    weights [B,T]: 1 on answer tokens (the rows' loss mask)."""
    token_rewards = -kl_coef * (old_logprobs - reference_logprobs) * weights
    last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
    token_rewards[np.arange(len(rewards)), last] += rewards * (weights.sum(axis=1) > 0)
    advantages, returns = _gae_jit(token_rewards, values, weights, gamma=gamma, lam=lam)
    advantages, returns = np.asarray(advantages), np.asarray(returns)
    whitened = np.asarray(losses.whitened(jnp.asarray(advantages), jnp.asarray(weights)))
    return whitened.astype(np.float32), returns.astype(np.float32)


def rl_loss_fn(config: Config, graphdef):
    rl = config.rl
    return functools.partial(rl_loss, graphdef, policy_loss=rl.policy_loss, clip_epsilon=rl.clip_epsilon,
                             kl_coef=0.0 if rl.algorithm == "ppo" else rl.kl_coef, value_coef=rl.value_coef)


def update_batch_spec(config: Config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The update batch `rl_loss` takes: rollout rows [B, T] with T at most data.seq_len + rl.max_new_tokens
    (the longest prompt plus the answer), their log-probs, advantages and (ppo) values and returns."""
    shape = (batch_size, config.data.seq_len + config.rl.max_new_tokens)
    spec = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32), "positions": jax.ShapeDtypeStruct(shape, jnp.int32),
            "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
            **{k: jax.ShapeDtypeStruct(shape, jnp.float32) for k in ("loss_mask", "old_logprobs",
                                                                     "reference_logprobs")}}
    if config.rl.algorithm == "ppo":
        spec.update({k: jax.ShapeDtypeStruct(shape, jnp.float32) for k in ("advantages", "old_values", "returns")})
    else:
        spec["advantages"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return spec
