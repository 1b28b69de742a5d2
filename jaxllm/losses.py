"""Pure loss functions. No jaxllm imports; every function documents its shapes.

Conventions: B batch, T sequence, V vocabulary. Token arrays are aligned so that position t holds
token t, and `token_logprobs[:, t]` = log p(token t | tokens < t) (position 0 has no prediction: 0).
Losses return `(loss_sum, denominator, metrics)` so gradient accumulation, packing and
multi-device reduction stay exact: the mean is sum / denominator over the *whole* batch, and an
all-masked batch gives 0 / max(0, 1) instead of NaN.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
LossOutput = tuple[jax.Array, jax.Array, Metrics]


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    return total / jnp.maximum(count, 1e-9)


def target_weights(loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B,T] float weights of each target token: the loss mask, restricted to tokens whose
    predecessor is in the same (non-padding) segment, so no document predicts across a boundary."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    weights = loss_mask[:, 1:].astype(jnp.float32) * same.astype(jnp.float32)
    return jnp.pad(weights, ((0, 0), (1, 0)))


def next_tokens(x: jax.Array) -> jax.Array:
    """[B,T] -> [B,T]: the value at position t + 1 for every t (what position t predicts); 0 at the last."""
    return jnp.pad(x[:, 1:], ((0, 0), (0, 1)))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [B,T,V] (position t predicts token t+1), tokens [B,T] -> [B,T] log-probs aligned with tokens."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logprobs, next_tokens(tokens)[..., None], axis=-1)[..., 0]
    return jnp.pad(picked[:, :-1], ((0, 0), (1, 0)))


def is_top_prediction(target_logit: jax.Array, max_logit: jax.Array) -> jax.Array:
    """1.0 where the target's logit is the largest (a tie counts as correct), else 0.0; float32, shape of
    the inputs. Accuracy from the max the log-partition needs anyway: an argmax is a second, slower
    (value, index) reduction over the vocabulary."""
    return (target_logit >= max_logit).astype(jnp.float32)


def cross_entropy(logits: jax.Array, tokens: jax.Array, weights: jax.Array, z_loss: float = 0.0) -> LossOutput:
    """Next-token cross-entropy. logits [B,T,V], tokens [B,T], weights [B,T] (see target_weights).

    Returns (sum of weighted token losses incl. z-loss, sum of weights, metrics with sums)."""
    # Every position's logits, the last one weighted 0: slicing [B,T,V] logits to T-1 positions costs a copy of
    # them forward and a padded copy of their gradient backward.
    logits32 = logits.astype(jnp.float32)
    targets = next_tokens(tokens)
    w = next_tokens(weights.astype(jnp.float32))
    log_z = jax.nn.logsumexp(logits32, axis=-1)
    target_logit = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    correct = is_top_prediction(target_logit, jnp.max(logits32, axis=-1))
    total = jnp.sum(nll * w)
    z_term = jnp.sum(jnp.square(log_z) * w)
    count = jnp.sum(w)
    metrics = {"nll_sum": total, "correct_sum": jnp.sum(correct * w), "z_loss_sum": z_term, "tokens": count}
    return total + z_loss * z_term, count, metrics


def chunked_cross_entropy(hidden: jax.Array, unembedding: jax.Array, tokens: jax.Array, weights: jax.Array,
                          z_loss: float = 0.0, chunk_size: int = 128) -> LossOutput:
    """`cross_entropy(hidden @ unembedding, tokens, weights, z_loss)` without the [B,T,V] logits.

    hidden [B,T,D] final normed states, unembedding [D,V] (already in the compute dtype), tokens and
    weights [B,T]. Positions go through the lm head `chunk_size` at a time, so only [B,C,V] float32
    logits exist at once. Under differentiation the gradient is computed chunk by chunk in the same
    pass (Liger-style): the backward pass only scales the stored d/dhidden [B,T,D] and d/dunembedding
    [D,V] by the incoming cotangent, so the head costs three matmuls, as unfused, and no recompute.
    Only the loss sum is differentiable; the metric sums carry no gradient."""
    batch, length, _ = hidden.shape
    targets = next_tokens(tokens)  # position t predicts token t+1; the last predicts nothing
    target_weights_ = next_tokens(weights.astype(jnp.float32))
    chunk = max(1, min(chunk_size, length))
    padded = -length % chunk
    if padded:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded)))
        target_weights_ = jnp.pad(target_weights_, ((0, 0), (0, padded)))
    loss_sum, nll_sum, correct_sum, z_sum = _fused_head_loss(float(z_loss), chunk, hidden, unembedding, targets,
                                                             target_weights_)
    metrics = {"nll_sum": jax.lax.stop_gradient(nll_sum), "correct_sum": jax.lax.stop_gradient(correct_sum),
               "z_loss_sum": jax.lax.stop_gradient(z_sum), "tokens": jnp.sum(target_weights_)}
    return loss_sum, jnp.sum(target_weights_), metrics


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, n*C, ...] -> [n, B, C, ...] (the scan axis first)."""
    return jnp.swapaxes(x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]), 0, 1)


def _from_chunks(x: jax.Array) -> jax.Array:
    """[n, B, C, ...] -> [B, n*C, ...]."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _chunk_statistics(h, unembedding, targets, weights, z_loss):
    """One chunk: h [B,C,D], targets/weights [B,C] -> (logits [B,C,V] f32, log Z [B,C], per-token loss, sums)."""
    logits = jnp.einsum("bcd,dv->bcv", h, unembedding, preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1)
    log_z = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    z_term = jnp.square(log_z)
    per_token = nll + z_loss * z_term  # d loss / d weight
    correct = is_top_prediction(target_logit, top)
    sums = jnp.stack([jnp.sum(per_token * weights), jnp.sum(nll * weights), jnp.sum(correct * weights),
                      jnp.sum(z_term * weights)])
    return logits, log_z, per_token, sums


def _fused_primal(z_loss, chunk, hidden, unembedding, targets, weights):
    def body(totals, xs):
        _, _, _, sums = _chunk_statistics(*xs[:1], unembedding, *xs[1:], z_loss)
        return totals + sums, None

    xs = (_to_chunks(hidden, chunk), _to_chunks(targets, chunk), _to_chunks(weights, chunk))
    totals, _ = jax.lax.scan(body, jnp.zeros(4, jnp.float32), xs)
    return tuple(totals)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_head_loss(z_loss, chunk, hidden, unembedding, targets, weights):
    return _fused_primal(z_loss, chunk, hidden, unembedding, targets, weights)


def _fused_forward(z_loss, chunk, hidden, unembedding, targets, weights):
    vocab = unembedding.shape[-1]

    def body(carry, xs):
        totals, d_unembedding = carry
        h, t, w = xs
        logits, log_z, per_token, sums = _chunk_statistics(h, unembedding, t, w, z_loss)
        # d(sum_t w_t (log Z_t - logit_t[y_t] + z log Z_t^2)) / d logits = w (1 + 2 z log Z) softmax - w onehot(y).
        probs = jnp.exp(logits - log_z[..., None])
        scale = w * (1.0 + 2.0 * z_loss * log_z)
        onehot = jnp.arange(vocab, dtype=t.dtype) == t[..., None]
        d_logits = (probs * scale[..., None] - jnp.where(onehot, w[..., None], 0.0)).astype(h.dtype)
        d_h = jnp.einsum("bcv,dv->bcd", d_logits, unembedding, preferred_element_type=jnp.float32)
        d_unembedding = d_unembedding + jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32)
        return (totals + sums, d_unembedding), (d_h.astype(h.dtype), per_token)

    xs = (_to_chunks(hidden, chunk), _to_chunks(targets, chunk), _to_chunks(weights, chunk))
    init = (jnp.zeros(4, jnp.float32), jnp.zeros(unembedding.shape, jnp.float32))
    (totals, d_unembedding), (d_hidden, per_token) = jax.lax.scan(body, init, xs)
    residuals = (_from_chunks(d_hidden), d_unembedding.astype(unembedding.dtype), _from_chunks(per_token))
    return tuple(totals), residuals


def _fused_backward(z_loss, chunk, residuals, cotangents):
    del z_loss, chunk
    d_hidden, d_unembedding, per_token = residuals
    g = cotangents[0]  # only the loss sum is differentiable
    return ((g * d_hidden).astype(d_hidden.dtype), (g * d_unembedding).astype(d_unembedding.dtype), None,
            g * per_token)


_fused_head_loss.defvjp(_fused_forward, _fused_backward)


def sequence_logprobs(token_lp: jax.Array, weights: jax.Array) -> jax.Array:
    """[B,T] token log-probs and weights -> [B] summed log-prob of each sequence's weighted tokens."""
    return jnp.sum(token_lp * weights, axis=-1)


# ----------------------------------------------------------------------------------------------
# Preference losses (DPO family) and reward models.


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, pair_weights: jax.Array | None = None, rpo_alpha: float = 0.0,
             chosen_token_counts: jax.Array | None = None) -> LossOutput:
    """DPO (Rafailov et al. 2023) and variants from per-sequence log-probs [B].

    sigmoid: -(1-ε) log σ(β h) - ε log σ(-β h), h = (π_c - ref_c) - (π_r - ref_r)  (ε: label smoothing)
    ipo:     (h - 1/(2β))²                                        (Azar et al. 2023)
    hinge:   max(0, 1 - β h)                                       (SLiC)
    The log-probs are *summed* over each answer's tokens (`sequence_logprobs`), for IPO too: h is the
    summed log-ratio, not the per-token average some IPO implementations use, so the IPO target 1/(2β)
    applies to whole sequences. rpo_alpha > 0 adds α · (-π_c / n_c) per pair: the negative log-likelihood of
    the chosen answer per token (n_c = chosen_token_counts [B], its number of answer tokens), as in RPO (Pang
    et al. 2024), TRL's `rpo_alpha` and Llama 3's DPO recipe; it keeps DPO from lowering the chosen answers'
    likelihood. pair_weights [B]: 1 for a pair, 0 for a padding row (absent from every sum and count; default
    all 1). Returns (sum over pairs, number of pairs, metrics as sums over pairs)."""
    present = _presence(pair_weights, policy_chosen)
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss type '{loss_type}'; use sigmoid, ipo or hinge")
    if chosen_token_counts is None:
        chosen_token_counts = jnp.ones_like(policy_chosen)
    chosen_nll = -policy_chosen / jnp.maximum(chosen_token_counts, 1.0)  # [B] nats per answer token
    if rpo_alpha:
        losses = losses + rpo_alpha * chosen_nll
    chosen_reward = beta * chosen_ratio
    rejected_reward = beta * rejected_ratio
    count = jnp.sum(present)
    metrics = {
        "pairs": count,
        "reward_chosen_sum": jnp.sum(chosen_reward * present),
        "reward_rejected_sum": jnp.sum(rejected_reward * present),
        "reward_margin_sum": jnp.sum((chosen_reward - rejected_reward) * present),
        "preference_correct_sum": jnp.sum((chosen_reward > rejected_reward).astype(jnp.float32) * present),
        "chosen_nll_sum": jnp.sum(chosen_nll * present),
    }
    return jnp.sum(losses * present), count, metrics


def _presence(weights: jax.Array | None, like: jax.Array) -> jax.Array:
    """[B] float32 1/0 row presence (all ones when None)."""
    if weights is None:
        return jnp.ones(like.shape, jnp.float32)
    return (weights > 0).astype(jnp.float32)


def kto_loss(policy_logprobs: jax.Array, reference_logprobs: jax.Array, labels: jax.Array, kl_reference: jax.Array,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al. 2024) on unpaired feedback. Log-probs [B], labels [B] (+1 good / -1 bad),
    kl_reference: scalar reference point z0 (clamped at 0, no gradient).

    desirable:   w_d (1 - σ(β (r - z0)));  undesirable: w_u (1 - σ(β (z0 - r))),  r = π - ref."""
    z0 = jax.lax.stop_gradient(jnp.maximum(kl_reference, 0.0))
    ratio = policy_logprobs - reference_logprobs
    desirable = (labels > 0).astype(jnp.float32)
    undesirable = (labels < 0).astype(jnp.float32)
    losses = (desirable * desirable_weight * (1 - jax.nn.sigmoid(beta * (ratio - z0)))
              + undesirable * undesirable_weight * (1 - jax.nn.sigmoid(beta * (z0 - ratio))))
    count = jnp.sum(desirable + undesirable)
    metrics = {
        "examples": count,
        "reward_desirable_sum": jnp.sum(beta * ratio * desirable),
        "reward_undesirable_sum": jnp.sum(beta * ratio * undesirable),
        "desirable": jnp.sum(desirable),
        "undesirable": jnp.sum(undesirable),
        "kl_reference": z0,
    }
    return jnp.sum(losses), count, metrics


def bradley_terry_loss(reward_chosen: jax.Array, reward_rejected: jax.Array,
                       pair_weights: jax.Array | None = None) -> LossOutput:
    """Reward-model loss -log σ(r_c - r_r) on scalar rewards [B]; pair_weights [B] as in dpo_loss."""
    present = _presence(pair_weights, reward_chosen)
    losses = -jax.nn.log_sigmoid(reward_chosen - reward_rejected)
    count = jnp.sum(present)
    metrics = {
        "pairs": count,
        "preference_correct_sum": jnp.sum((reward_chosen > reward_rejected).astype(jnp.float32) * present),
        "reward_margin_sum": jnp.sum((reward_chosen - reward_rejected) * present),
    }
    return jnp.sum(losses * present), count, metrics


# ----------------------------------------------------------------------------------------------
# Policy gradient: advantage estimators and the clipped policy loss, registered by name.

AdvantageFn = Callable[[jax.Array, int], jax.Array]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def register(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return register


def centered(values: jax.Array, axis: int = -1) -> jax.Array:
    """values minus their mean along `axis`, computed so that identical values give exactly 0.

    A float32 mean of n identical values can be 1 ulp off (the running sum rounds), so `x - mean(x)`
    would be ~1e-7 instead of 0. Subtracting the first element before averaging makes every term of an
    all-equal slice exactly 0 (x - x == 0 in IEEE arithmetic); the mean is shift-invariant, so the
    result is otherwise the same. values [..., n] -> [..., n] (same shape and dtype)."""
    shifted = values - jax.lax.slice_in_dim(values, 0, 1, axis=axis)
    return shifted - jnp.mean(shifted, axis=axis, keepdims=True)


def standardized(values: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """(x - mean) / (population std + eps) along `axis`; exactly 0 for a slice of identical values
    (see `centered`), never x / eps. values [..., n] -> [..., n]."""
    deviation = centered(values, axis)
    std = jnp.sqrt(jnp.mean(jnp.square(deviation), axis=axis, keepdims=True))  # population std (ddof=0)
    return jnp.where(std > 0, deviation / (std + eps), 0.0)


def whitened(values: jax.Array, weights: jax.Array, eps: float = 1e-6) -> jax.Array:
    """PPO advantage whitening over the weighted entries: (x - mean) / (population std + eps), means
    taken over entries with weight > 0 (answer tokens), 0 elsewhere. values, weights [B,T] -> [B,T].
    Exactly 0 when every weighted value is equal (shifted by the first weighted value, see `centered`)."""
    mask = (weights > 0).astype(values.dtype)
    reference = values.reshape(-1)[jnp.argmax(mask.reshape(-1))]
    shifted = (values - reference) * mask
    count = jnp.maximum(jnp.sum(mask), 1.0)
    deviation = (shifted - jnp.sum(shifted) / count) * mask
    std = jnp.sqrt(jnp.sum(jnp.square(deviation)) / count)
    return jnp.where(std > 0, deviation / (std + eps), 0.0)


@register_advantage("reinforce")
def reinforce_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE with a baseline: reward minus the batch-mean reward (exactly 0 when all rewards are
    equal, see `centered`). rewards [B] -> [B]."""
    return centered(rewards)


@register_advantage("rloo")
def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out: each sample's baseline is the mean of the other samples of its prompt.
    rewards [P*G] grouped contiguously -> [P*G]."""
    if group_size < 2:
        return reinforce_advantages(rewards, group_size)
    grouped = rewards.reshape(-1, group_size)
    grouped = grouped - grouped[:, :1]  # shift-invariant; makes an all-equal group exactly 0 (see `centered`)
    others = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


@register_advantage("grpo")
def grpo_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """GRPO (Shao et al. 2024): (r - mean of its group) / (population std of its group + eps), the std
    with ddof=0 as in the paper's reference code. rewards [P*G] grouped contiguously -> [P*G].
    A group whose rewards are all equal gets exactly zero advantage, hence no gradient, whatever its
    size and value (see `standardized`: a naive float32 mean is 1 ulp off, and dividing that by
    std + eps ~ 1e-6 gave every member of such a group an advantage of ~0.1 with one sign)."""
    return standardized(rewards.reshape(-1, group_size), axis=1, eps=eps).reshape(-1)


def equal_reward_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """Fraction of groups whose rewards are all equal (they contribute no gradient)."""
    grouped = rewards.reshape(-1, group_size)
    return jnp.mean((jnp.max(grouped, axis=1) == jnp.min(grouped, axis=1)).astype(jnp.float32))


def gae_advantages(rewards: jax.Array, values: jax.Array, weights: jax.Array, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over answer tokens. rewards [B,T] (per token; usually the
    sequence reward on the last answer token), values [B,T], weights [B,T] answer-token mask.
    Returns (advantages [B,T], returns [B,T]); zero outside the mask."""
    values = values * weights

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, weight = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        advantage = advantage * weight
        # Outside the answer (weight 0) carry the future through unchanged.
        new_next_value = jnp.where(weight > 0, value, next_value)
        new_next_advantage = jnp.where(weight > 0, advantage, next_advantage)
        return (new_next_value, new_next_advantage), advantage

    init = (jnp.zeros(rewards.shape[0]), jnp.zeros(rewards.shape[0]))
    _, advantages = jax.lax.scan(step, init, (rewards.T, values.T, weights.T), reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * weights


def kl_penalty(logprobs: jax.Array, reference_logprobs: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(π || ref): exp(ref - π) - (ref - π) - 1 ≥ 0. [B,T] -> [B,T]."""
    diff = reference_logprobs - logprobs
    return jnp.exp(diff) - diff - 1.0


PolicyLossFn = Callable[..., LossOutput]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    def register(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn
    return register


@register_policy_loss("clipped")
def clipped_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, reference_logprobs: jax.Array,
                        advantages: jax.Array, weights: jax.Array, clip_epsilon: float = 0.2,
                        kl_coef: float = 0.0) -> LossOutput:
    """PPO/GRPO clipped surrogate with an optional KL penalty to the reference, token level.

    logprobs/old_logprobs/reference_logprobs [B,T]; advantages [B] (per sequence) or [B,T] (per token);
    weights [B,T] answer tokens. Loss per token: -(min(ρA, clip(ρ, 1±ε)A) - β KL), summed; the
    denominator is the number of answer tokens in the whole batch: a token-level mean over the batch
    (every answer token weighs the same, as in DAPO/Dr. GRPO), not the GRPO paper's mean over each
    sequence's tokens followed by a mean over sequences."""
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon) * advantages
    objective = jnp.minimum(unclipped, clipped)
    kl = kl_penalty(logprobs, reference_logprobs)
    per_token = -(objective - kl_coef * kl)
    count = jnp.sum(weights)
    metrics = {
        "tokens": count,
        "kl_sum": jnp.sum(kl * weights),
        "clipped_fraction_sum": jnp.sum((jnp.abs(ratio - 1) > clip_epsilon).astype(jnp.float32) * weights),
    }
    return jnp.sum(per_token * weights), count, metrics


@register_policy_loss("reinforce")
def reinforce_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, reference_logprobs: jax.Array,
                          advantages: jax.Array, weights: jax.Array, clip_epsilon: float = 0.2,
                          kl_coef: float = 0.0) -> LossOutput:
    """Plain policy gradient -A log π (one update per batch, so no ratio), plus the KL penalty.
    For a +1 answer this is SFT on it; for a -1 answer the same loss with a minus sign."""
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    kl = kl_penalty(logprobs, reference_logprobs)
    per_token = -(advantages * logprobs - kl_coef * kl)
    count = jnp.sum(weights)
    metrics = {"tokens": count, "kl_sum": jnp.sum(kl * weights),
               "clipped_fraction_sum": jnp.zeros((), jnp.float32)}
    return jnp.sum(per_token * weights), count, metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, weights: jax.Array,
               clip_epsilon: float = 0.2) -> LossOutput:
    """PPO clipped value loss ½ max((V - R)², (clip(V, V_old ± ε) - R)²) over answer tokens [B,T]."""
    clipped = old_values + jnp.clip(values - old_values, -clip_epsilon, clip_epsilon)
    losses = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))
    count = jnp.sum(weights)
    return jnp.sum(losses * weights), count, {"value_tokens": count}
