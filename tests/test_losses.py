"""Each loss against an independent NumPy implementation of its paper's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jaxllm import losses


def np_log_sigmoid(x):
    return -np.logaddexp(0, -x)


def np_log_softmax(x):
    return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_cross_entropy_matches_numpy(rng):
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (3, 7))
    weights = rng.integers(0, 2, (3, 7)).astype(np.float32)
    total, count, metrics = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(weights))
    lp = np_log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(total, np.sum(nll * weights[:, 1:]), rtol=1e-5)
    np.testing.assert_allclose(count, weights[:, 1:].sum())
    correct = np.argmax(logits[:, :-1], -1) == tokens[:, 1:]
    np.testing.assert_allclose(metrics["correct_sum"], np.sum(correct * weights[:, 1:]))


def test_accuracy_counts_a_tied_top_logit_as_correct():
    logits = jnp.asarray([[[1.0, 3.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 2.0]]])
    tokens = jnp.asarray([[0, 2, 1]])  # position 0 predicts 2 (tied top), position 1 predicts 1 (all tied)
    _, _, metrics = losses.cross_entropy(logits, tokens, jnp.ones((1, 3)))
    np.testing.assert_allclose(metrics["correct_sum"], 2.0)


def test_token_logprobs_align_with_tokens(rng):
    logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
    tokens = rng.integers(0, 6, (2, 5))
    got = np.asarray(losses.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    assert np.all(got[:, 0] == 0)
    np.testing.assert_allclose(got[:, 3], np_log_softmax(logits[:, 2])[np.arange(2), tokens[:, 3]], rtol=1e-5)


def test_sft_loss_ignores_targets_of_masked_prompt_tokens(rng):
    logits = jnp.asarray(rng.normal(size=(2, 8, 10)).astype(np.float32))
    tokens = rng.integers(0, 10, (2, 8))
    mask = np.zeros((2, 8), np.float32)
    mask[:, 5:] = 1  # answer tokens
    segments = np.ones((2, 8), np.int32)
    weights = losses.target_weights(jnp.asarray(mask), jnp.asarray(segments))
    changed = tokens.copy()
    changed[:, :5] = (changed[:, :5] + 3) % 10  # change prompt tokens (targets that are masked)
    a = losses.cross_entropy(logits, jnp.asarray(tokens), weights)[0]
    b = losses.cross_entropy(logits, jnp.asarray(changed), weights)[0]
    np.testing.assert_allclose(a, b)


def test_target_weights_drop_first_token_of_each_document_and_padding():
    mask = jnp.ones((1, 6))
    segments = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(losses.target_weights(mask, segments), [[0, 1, 0, 1, 1, 0]])


def test_all_masked_batch_gives_zero_loss_not_nan(rng):
    logits = jnp.asarray(rng.normal(size=(2, 4, 5)).astype(np.float32))
    total, count, _ = losses.cross_entropy(logits, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4)))
    assert float(losses.safe_mean(total, count)) == 0.0


def np_dpo(pc, pr, rc, rr, beta, kind, eps):
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return np.maximum(0, 1 - beta * h)


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_family_matches_numpy(rng, kind, eps):
    pc, pr, rc, rr = (rng.normal(size=6).astype(np.float32) * 3 for _ in range(4))
    total, count, metrics = losses.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta=0.3, loss_type=kind,
                                            label_smoothing=eps)
    np.testing.assert_allclose(total, np_dpo(pc, pr, rc, rr, 0.3, kind, eps).sum(), rtol=1e-5)
    assert count == 6
    np.testing.assert_allclose(metrics["reward_chosen_sum"], (0.3 * (pc - rc)).sum(), rtol=1e-5)


def test_rpo_adds_alpha_times_the_chosen_answers_per_token_nll_to_dpo(rng):
    # RPO (Pang et al. 2024; TRL rpo_alpha; Llama 3): DPO + alpha * (-log pi(chosen) / |chosen|) per pair, from
    # token log-probs [B,T] and answer masks written out here in NumPy.
    token_lp = -rng.uniform(0.1, 3.0, size=(5, 7)).astype(np.float32)
    mask = (rng.uniform(size=(5, 7)) < 0.6).astype(np.float32)
    mask[:, 0] = 1.0  # every chosen answer has at least one token
    pc = (token_lp * mask).sum(-1)
    pr, rc, rr = (rng.normal(size=5).astype(np.float32) * 3 for _ in range(3))
    counts = mask.sum(-1)
    expected = np_dpo(pc, pr, rc, rr, 0.2, "sigmoid", 0.0) + 0.7 * (-pc / counts)
    total, count, metrics = losses.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta=0.2, rpo_alpha=0.7,
                                            chosen_token_counts=jnp.asarray(counts))
    np.testing.assert_allclose(total, expected.sum(), rtol=1e-5)  # float32 sums of 5 terms: ~1e-7 relative error
    np.testing.assert_allclose(metrics["chosen_nll_sum"], (-pc / counts).sum(), rtol=1e-5)
    plain, _, _ = losses.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta=0.2,
                                  chosen_token_counts=jnp.asarray(counts))
    np.testing.assert_allclose(plain, np_dpo(pc, pr, rc, rr, 0.2, "sigmoid", 0.0).sum(), rtol=1e-5)


def test_rpo_gradient_raises_the_chosen_log_likelihood_even_when_dpo_is_saturated():
    # With a huge margin DPO's gradient vanishes; the NLL term still pushes log pi(chosen) up at alpha / |chosen|.
    pc, pr, ref = jnp.asarray([-5.0]), jnp.asarray([-500.0]), jnp.asarray([-5.0])
    grad = jax.grad(lambda a: losses.dpo_loss(a, pr, ref, ref, beta=1.0, rpo_alpha=2.0,
                                              chosen_token_counts=jnp.asarray([4.0]))[0])(pc)
    np.testing.assert_allclose(grad, [-0.5], rtol=1e-6)


def test_dpo_with_policy_equal_reference_is_log_two_with_zero_margin(rng):
    x = jnp.asarray(rng.normal(size=5).astype(np.float32))
    y = jnp.asarray(rng.normal(size=5).astype(np.float32))
    total, count, metrics = losses.dpo_loss(x, y, x, y, beta=0.1)
    np.testing.assert_allclose(total / count, np.log(2), rtol=1e-6)
    assert float(metrics["reward_margin_sum"]) == 0.0


def test_kto_matches_numpy(rng):
    policy, reference = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    labels = np.array([1, -1] * 4, np.float32)
    z0, beta, wd, wu = 0.2, 0.5, 1.0, 1.5
    total, count, _ = losses.kto_loss(jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(labels),
                                      jnp.asarray(z0), beta, wd, wu)
    r = policy - reference
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = np.where(labels > 0, wd * (1 - sig(beta * (r - z0))), wu * (1 - sig(beta * (z0 - r))))
    np.testing.assert_allclose(total, expected.sum(), rtol=1e-5)
    assert count == 8


def test_bradley_terry_matches_numpy(rng):
    rc, rr = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    total, _, _ = losses.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr))
    np.testing.assert_allclose(total, -np_log_sigmoid(rc - rr).sum(), rtol=1e-5)


def test_grpo_clipped_objective_matches_numpy(rng):
    lp = rng.normal(size=(4, 6)).astype(np.float32) * 0.3
    old = lp + rng.normal(size=(4, 6)).astype(np.float32) * 0.3
    ref = lp + rng.normal(size=(4, 6)).astype(np.float32) * 0.3
    weights = rng.integers(0, 2, (4, 6)).astype(np.float32)
    rewards = np.array([1.0, 0.0, 0.5, 1.0], np.float32)
    adv = np.asarray(losses.grpo_advantages(jnp.asarray(rewards), 2))
    grouped = rewards.reshape(2, 2)
    expected_adv = ((grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + 1e-6)).ravel()
    np.testing.assert_allclose(adv, expected_adv, rtol=1e-5)
    total, count, _ = losses.clipped_policy_loss(*(jnp.asarray(x) for x in (lp, old, ref, adv, weights)),
                                                 clip_epsilon=0.2, kl_coef=0.05)
    ratio = np.exp(lp - old)
    objective = np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    kl = np.exp(ref - lp) - (ref - lp) - 1
    np.testing.assert_allclose(total, (-(objective - 0.05 * kl) * weights).sum(), rtol=1e-4)
    np.testing.assert_allclose(count, weights.sum())


def test_advantage_estimators_registry_and_equal_groups():
    rewards = jnp.asarray([1.0, 1.0, 0.0, 1.0])
    assert set(losses.ADVANTAGE_ESTIMATORS) >= {"reinforce", "rloo", "grpo"}
    np.testing.assert_allclose(losses.rloo_advantages(rewards, 2), [0, 0, -1, 1])
    np.testing.assert_allclose(losses.grpo_advantages(rewards, 2)[:2], [0, 0])
    assert float(losses.equal_reward_groups(rewards, 2)) == 0.5


def test_gae_with_lambda_one_and_zero_values_is_reward_to_go():
    rewards = jnp.asarray([[0.0, 0.0, 0.0, 1.0]])
    values = jnp.zeros((1, 4))
    weights = jnp.asarray([[0.0, 1.0, 1.0, 1.0]])
    advantages, returns = losses.gae_advantages(rewards, values, weights, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(advantages, [[0, 1, 1, 1]])
    np.testing.assert_allclose(returns, [[0, 1, 1, 1]])


def test_gradients_of_losses_are_finite(rng):
    x = jnp.asarray(rng.normal(size=4).astype(np.float32))
    grad = jax.grad(lambda a: losses.dpo_loss(a, x, x, x)[0])(x)
    assert np.all(np.isfinite(grad))


# An all-equal group (e.g. every answer wrong but finished: all 0.1) must give exactly zero advantage:
# a naive float32 mean of identical values is 1 ulp off, and dividing by std + eps amplified it to ~0.1.
_EQUAL_REWARDS = st.one_of(st.sampled_from([0.0, 0.1, 1.1, 1e3, -0.1, -1.1, -1e3, 0.3, 1 / 3]),
                           st.floats(-1e4, 1e4, width=32))
# Jitted (one compilation per shape instead of one per eager op): keeps each example ~0.1 s.
_ESTIMATORS = {name: jax.jit(fn, static_argnums=1) for name, fn in losses.ADVANTAGE_ESTIMATORS.items()}
_EQUAL_GROUPS = jax.jit(losses.equal_reward_groups, static_argnums=1)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(value=_EQUAL_REWARDS, group_size=st.integers(2, 64))
@example(value=1.1, group_size=16).via("issue 16: -0.1065 each")
@example(value=0.1, group_size=8).via("issue 16: -0.0074 each")
@example(value=1e3, group_size=7)
@example(value=-1.1, group_size=64)
def test_a_group_of_equal_rewards_has_exactly_zero_advantage(value, group_size):
    rewards = jnp.full((2 * group_size,), value, jnp.float32)  # two groups of `group_size` equal rewards
    for estimator in ("grpo", "rloo", "reinforce"):
        advantages = np.asarray(_ESTIMATORS[estimator](rewards, group_size))
        assert np.all(advantages == 0.0), (estimator, advantages)
    assert float(_EQUAL_GROUPS(rewards, group_size)) == 1.0


@settings(max_examples=15, deadline=None, derandomize=True)
@given(value=_EQUAL_REWARDS, group_size=st.integers(2, 64))
def test_equal_groups_stay_exactly_zero_beside_groups_that_differ(value, group_size):
    equal = np.full((group_size,), value, np.float32)
    varied = equal.copy()
    varied[-1] = np.float32(value + 1.0)
    rewards = jnp.asarray(np.concatenate([equal, varied]))
    for estimator in ("grpo", "rloo"):
        advantages = np.asarray(_ESTIMATORS[estimator](rewards, group_size))
        assert np.all(advantages[:group_size] == 0.0), (estimator, advantages)
        assert advantages[-1] > 0 and np.all(advantages[group_size:-1] < 0), (estimator, advantages)
    assert float(_EQUAL_GROUPS(rewards, group_size)) == 0.5


def test_grpo_matches_the_naive_formula_on_distinct_rewards(rng):
    rewards = rng.normal(size=(4 * 16,)).astype(np.float32)
    grouped = rewards.reshape(4, 16).astype(np.float64)
    expected = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + 1e-6)  # population std
    # float32 against a float64 reference: a few ulps of values of order 1.
    np.testing.assert_allclose(losses.grpo_advantages(jnp.asarray(rewards), 16), expected.ravel(), rtol=1e-5,
                               atol=1e-6)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(value=_EQUAL_REWARDS, answer_start=st.integers(0, 15))
def test_ppo_whitening_of_equal_advantages_is_exactly_zero(value, answer_start):
    weights = (np.arange(16)[None] >= answer_start).astype(np.float32).repeat(3, 0)  # [3, 16] answer tokens
    values = np.full((3, 16), value, np.float32)
    assert np.all(np.asarray(jax.jit(losses.whitened)(jnp.asarray(values), jnp.asarray(weights))) == 0.0)


def test_ppo_whitening_has_zero_mean_and_unit_population_std_on_the_answer_tokens(rng):
    values = rng.normal(3.0, 2.0, size=(3, 10)).astype(np.float32)
    weights = (rng.random((3, 10)) < 0.6).astype(np.float32)
    out = np.asarray(losses.whitened(jnp.asarray(values), jnp.asarray(weights)))
    answer = out[weights > 0]
    assert np.all(out[weights == 0] == 0)
    # float32 sums of ~18 values of order 1: 1e-5 is ~100 ulps; eps=1e-6 shifts the std by ~5e-7 relative.
    np.testing.assert_allclose([answer.mean(), answer.std()], [0.0, 1.0], atol=1e-5)
