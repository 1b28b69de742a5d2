"""On-policy learning from feedback: the model answers, the answers are scored, the update pulls the
good ones closer and pushes the bad ones away. Also `jaxllm score` (a reward model over a file).

One step of `train.stage: rl` (built on the one loop, `jaxllm.train.run_loop`):

    prompt batch k  (P prompts, a pure function of (train.seed, k))
      -> rollout     G answers per prompt, sampled with the current params (jaxllm.generate, KV cache)
      -> rewards     rl.reward: registered functions ("exact_match", "contains", "finished", ...),
                     "reward_model" (a trained scalar head), "self_judge" (the policy grades its own
                     answer; the parsed grade is the reward), or a weighted sum "exact_match+0.1*finished"
      -> advantages  a registered estimator (jaxllm.losses.ADVANTAGE_ESTIMATORS: reinforce, rloo, grpo),
                     or GAE over a value head for ppo
      -> update      a registered policy loss (jaxllm.losses.POLICY_LOSSES, "clipped" by default) with a
                     KL penalty to the frozen reference (for ppo the KL is in the per-token reward,
                     InstructGPT-style, and a clipped value loss is added).

Shapes: P prompts per step, G group size, B = P * G rows (contiguous groups), W = prompt width
(fixed by the prompt iterator) + N = rl.max_new_tokens. Rows are right-padded: [prompt, answer, EOS,
pad...], segment id 1 on real tokens, loss mask 1 on the answer tokens and their EOS.

With rl.updates_per_batch = U > 1, the same rollout serves U consecutive optimizer steps (update k
uses prompt batch k // U); the importance ratio against the rollout's log-probs then matters and the
clipping bounds it. train.batch_size must equal P * G (the update batch is every sampled answer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import generate as generate_lib
from jaxllm import lora, losses
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import steps as steps_lib
from jaxllm.config import Config, ConfigError
from jaxllm.data.pipeline import make_batch_iterator
from jaxllm.data.sources import iter_records
from jaxllm.errors import UsageError

PAD_ID, EOS_ID = generate_lib.PAD_ID, generate_lib.EOS_ID


# ----------------------------------------------------------------------------------------------
# Samples and reward functions (registered by name).


@dataclasses.dataclass
class Sample:
    """One sampled answer. completion_ids exclude the stop token; completion is their text ("" without
    a tokenizer); finished: the answer ended with a stop token rather than running out of tokens."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str = ""
    finished: bool = False
    reference: str | None = None
    messages: list[dict] | None = None
    where: str = ""

    @property
    def question(self) -> str:
        users = [m["content"] for m in self.messages or [] if m.get("role") == "user"]
        return users[-1] if users else ""


RewardFn = Callable[[Sample], float]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}
NEEDS_REFERENCE: set[str] = set()


def register_reward(name: str, needs_reference: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Registers `fn(sample) -> float` as reward `name` (usable in rl.reward)."""
    def register(fn: RewardFn) -> RewardFn:
        REWARD_FUNCTIONS[name] = fn
        if needs_reference:
            NEEDS_REFERENCE.add(name)
        return fn
    return register


_PUNCTUATION = " \t\n.,;:!?\"'`()[]"


def normalize_answer(text: str) -> str:
    """Lowercase, whitespace collapsed, surrounding punctuation stripped: 'Oslo.' == ' oslo'."""
    return " ".join(text.lower().split()).strip(_PUNCTUATION)


@register_reward("exact_match", needs_reference=True)
def exact_match(sample: Sample) -> float:
    """1 if the answer equals the reference (after normalize_answer), else 0."""
    return float(normalize_answer(sample.completion) == normalize_answer(sample.reference or ""))


@register_reward("contains", needs_reference=True)
def contains(sample: Sample) -> float:
    """1 if the normalised reference occurs in the normalised answer, else 0."""
    reference = normalize_answer(sample.reference or "")
    return float(bool(reference) and reference in normalize_answer(sample.completion))


@register_reward("finished")
def finished(sample: Sample) -> float:
    """Format check: 1 if the answer ended with EOS within rl.max_new_tokens."""
    return float(sample.finished)


@register_reward("single_line")
def single_line(sample: Sample) -> float:
    """Format check: 1 if the answer is one non-empty line."""
    text = sample.completion.strip()
    return float(bool(text) and "\n" not in text)


def parse_reward_spec(spec: str) -> list[tuple[float, str]]:
    """"exact_match+0.1*finished" -> [(1.0, "exact_match"), (0.1, "finished")]."""
    terms = []
    for raw in spec.replace(" ", "").split("+"):
        weight, star, name = raw.rpartition("*")
        if not star:
            weight, name = "1", raw
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"rl.reward='{spec}': '{raw}' must be NAME or WEIGHT*NAME") from None
        known = sorted(REWARD_FUNCTIONS) + ["reward_model", "self_judge"]
        if name not in known:
            raise ConfigError(f"rl.reward='{spec}': unknown reward '{name}'; choose from {', '.join(known)} "
                              "(or register one with jaxllm.rl.register_reward)")
        terms.append((value, name))
    if not terms:
        raise ConfigError("rl.reward is empty; name a reward, e.g. exact_match")
    return terms


# ----------------------------------------------------------------------------------------------
# Reward sources: (samples, rows, params) -> (rewards [B] float32, metrics).


class FunctionReward:
    def __init__(self, name: str):
        self.name = name
        self.fn = REWARD_FUNCTIONS[name]

    def __call__(self, samples: list[Sample], rows: dict, params) -> tuple[np.ndarray, dict[str, float]]:
        if self.name in NEEDS_REFERENCE:
            missing = [s for s in samples if s.reference is None]
            if missing:
                raise UsageError(f"reward '{self.name}' compares with a reference answer, but prompt "
                                 f"{missing[0].where or '(unnamed)'} has none; use prompt records with a "
                                 "'reference' field, or another rl.reward")
        return np.asarray([self.fn(s) for s in samples], np.float32), {}


class RewardModelReward:
    """A trained reward model (`train.stage: reward` workdir) scores each prompt + answer (+EOS) row."""

    def __init__(self, workdir: str, policy_config: Config, mesh):
        if not workdir:
            raise ConfigError("rl.reward uses reward_model but rl.reward_model is empty; set it to the workdir of "
                              "a `jaxllm train configs/reward_tiny.yaml` run")
        config, graphdef, params, _ = generate_lib.load_model_for_inference(workdir, mesh, load_tokenizer=False)
        if "reward" not in params.get(model_lib.HEADS_KEY, {}):
            raise UsageError(f"rl.reward_model={workdir} has no reward head (its stage is "
                             f"'{config.train.stage}'); train one with train.stage=reward")
        if config.model.vocab_size != policy_config.model.vocab_size or \
                config.data.tokenizer != policy_config.data.tokenizer:
            raise UsageError(f"rl.reward_model={workdir} uses a different tokenizer/vocabulary "
                             f"({config.data.tokenizer}, {config.model.vocab_size} ids) than the policy "
                             f"({policy_config.data.tokenizer}, {policy_config.model.vocab_size} ids)")
        self.graphdef, self.params, self.mesh = graphdef, params, mesh

    def __call__(self, samples, rows, params):
        placed = sharding_lib.place_batch({k: rows[k] for k in ("tokens", "positions", "segment_ids", "loss_mask")},
                                          self.mesh)
        with jax.set_mesh(self.mesh):
            scores = _scores_jit(self.graphdef, self.params, placed["tokens"], placed["positions"],
                                 placed["segment_ids"], placed["loss_mask"])
        return generate_lib.host_rows(scores, self.mesh).astype(np.float32), {}


DEFAULT_JUDGE_TEMPLATE = ("Grade the answer to the question from 0 (wrong) to 5 (correct and concise). "
                          "Reply with the grade only.\nQuestion: {question}\nAnswer: {answer}")


def parse_grade(text: str, max_grade: int = 5) -> float | None:
    """The first integer in the judge's reply, as a fraction of max_grade; None if there is none in range."""
    match = re.search(r"\d+", text)
    if match is None or int(match.group()) > max_grade:
        return None
    return int(match.group()) / max_grade


class SelfJudgeReward:
    """RLAIF / self-rewarding: the current policy is prompted (chat template, greedy) to grade each of its
    answers; the parsed grade / 5 is the reward, 0 when no grade can be read (counted in
    `judge_unparsed`). The template may use {question}, {answer} and {reference}."""

    max_grade = 5

    def __init__(self, template: str, model_config, graphdef, tokenizer, mesh):
        if not tokenizer:
            raise UsageError("rl.reward=self_judge needs a tokenizer: the judge reads and writes text")
        self.template = template or DEFAULT_JUDGE_TEMPLATE
        try:
            self.template.format(question="", answer="", reference="")
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(f"rl.judge_template: {error!r}; it may only use {{question}}, {{answer}}, "
                              "{reference}") from None
        self.model_config, self.graphdef, self.tokenizer, self.mesh = model_config, graphdef, tokenizer, mesh
        self.settings = generate_lib.SamplingSettings(max_new_tokens=4, temperature=0.0,
                                                      stop_ids=(tokenizer.eos_id, tokenizer.user_id))

    def judge_prompts(self, samples: list[Sample]) -> list[list[int]]:
        from jaxllm.data.chat import prompt_ids

        limit = self.model_config.max_seq_len - self.settings.max_new_tokens
        prompts = []
        for sample in samples:
            answer = sample.completion
            while True:
                text = self.template.format(question=sample.question, answer=answer, reference=sample.reference or "")
                ids = prompt_ids([{"role": "user", "content": text}], self.tokenizer)
                if len(ids) <= limit or not answer:
                    break
                answer = answer[: len(answer) // 2]  # an over-long answer is judged on its beginning
            prompts.append(ids[-limit:])
        return prompts

    def __call__(self, samples, rows, params):
        output = generate_lib.generate(self.model_config, self.graphdef, params, self.judge_prompts(samples),
                                       self.settings, 0, pad_id=self.tokenizer.pad_id, mesh=self.mesh)
        grades = [parse_grade(self.tokenizer.decode(output.completion(i)), self.max_grade)
                  for i in range(len(samples))]
        rewards = np.asarray([g if g is not None else 0.0 for g in grades], np.float32)
        return rewards, {"judge_unparsed": float(np.mean([g is None for g in grades]))}


class Rewards:
    """The weighted sum of the rl.reward terms, with each term's mean logged as reward_<name>."""

    def __init__(self, config: Config, graphdef, tokenizer, mesh):
        self.terms = []
        for weight, name in parse_reward_spec(config.rl.reward):
            if name == "reward_model":
                source = RewardModelReward(config.rl.reward_model, config, mesh)
            elif name == "self_judge":
                source = SelfJudgeReward(config.rl.judge_template, config.model, graphdef, tokenizer, mesh)
            else:
                source = FunctionReward(name)
            self.terms.append((weight, name, source))

    def __call__(self, samples: list[Sample], rows: dict, params) -> tuple[np.ndarray, dict[str, float]]:
        total = np.zeros(len(samples), np.float32)
        metrics: dict[str, float] = {}
        for weight, name, source in self.terms:
            values, term_metrics = source(samples, rows, params)
            total += weight * values
            metrics.update(term_metrics)
            if len(self.terms) > 1:
                metrics[f"reward_{name}"] = float(values.mean())
        return total, metrics


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
    unembedding = model_lib.unembedding(graphdef, params).astype(hidden.dtype)
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
_scores_jit = jax.jit(steps_lib.sequence_scores, static_argnums=(0,), static_argnames=("head",))


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


# ----------------------------------------------------------------------------------------------
# The stage: prompts -> rollout -> rewards -> update batch.


class RolloutPrompts:
    """Update k reads prompt batch k // updates_per_batch of a random-access prompt iterator (one with
    `batch_at(k)`, `get_state()`, `set_state()`), so the data order stays a pure function of (seed, k)."""

    def __init__(self, prompts, updates_per_batch: int = 1):
        if not hasattr(prompts, "batch_at"):
            raise TypeError("the rl prompt iterator needs batch_at(k) (random access), like "
                            "jaxllm.data.pipeline.PromptIterator")
        self.prompts = prompts
        self.updates_per_batch = updates_per_batch
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        index = self.step // self.updates_per_batch
        batch = dict(self.prompts.batch_at(index), rollout_index=index)
        self.step += 1
        return batch

    @property
    def fingerprint(self) -> str | None:
        """The prompt data's fingerprint (compared with the checkpoint's on resume)."""
        return getattr(self.prompts, "fingerprint", None)

    def get_state(self) -> dict:
        return {**self.prompts.get_state(), "step": self.step // self.updates_per_batch, "update": self.step}

    def set_state(self, state: dict) -> None:
        inner = {k: v for k, v in state.items() if k != "update"}
        self.prompts.set_state(inner)
        self.step = int(state.get("update", int(state["step"]) * self.updates_per_batch))


@dataclasses.dataclass
class RolloutTimeSplit:
    """Where an on-policy run's wall time goes, in seconds: sampling rollouts (generation), rewards,
    scoring the rollouts (policy/reference log-probs), and the update (the train step, with its
    logging and checkpoint hand-off: the time between one rollout batch and the next, evaluation
    excluded). The first step is left out: its rollout and update include the compiles."""
    rollout: float = 0.0
    reward: float = 0.0
    score: float = 0.0
    update: float = 0.0
    steps: int = 0

    def fractions(self) -> dict[str, float]:
        total = self.rollout + self.reward + self.score + self.update
        parts = {"rollout": self.rollout, "reward": self.reward, "score": self.score, "update": self.update}
        return {name: (value / total if total else 0.0) for name, value in parts.items()}

    def metrics(self) -> dict[str, float]:
        """Cumulative seconds and fractions, as train-log fields."""
        values = {f"time_{name}_seconds_total": value for name, value in dataclasses.asdict(self).items()
                  if name != "steps"}
        values.update({f"time_{name}_fraction": value for name, value in self.fractions().items()})
        return values

    def describe(self) -> str:
        if not self.steps:
            return "rl time split: fewer than two steps, nothing measured past the compiles"
        shares = self.fractions()
        parts = ", ".join(f"{name} {getattr(self, name):.1f}s ({100 * shares[name]:.0f}%)"
                          for name in ("rollout", "reward", "score", "update"))
        return f"rl time split over {self.steps} updates and their rollouts after the first: {parts}"


class RLStage:
    """Holds what the rl stage needs between steps; `prepare_batch` and `evaluate` plug into run_loop."""

    def __init__(self, context: Any, rewards: Rewards, eval_prompts: list[dict],
                 log: Callable[[str], None] = print):
        config = context.config
        self.context, self.config, self.rewards, self.eval_prompts = context, config, rewards, eval_prompts
        self.log = log
        self.tokenizer = context.tokenizer or None
        self.pad_id = self.tokenizer.pad_id if self.tokenizer else PAD_ID
        self.eos_id = self.tokenizer.eos_id if self.tokenizer else EOS_ID
        rl = config.rl
        self.settings = generate_lib.SamplingSettings(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                                                      top_k=rl.top_k, top_p=rl.top_p, stop_ids=(self.eos_id,))
        self.greedy = dataclasses.replace(self.settings, temperature=0.0, top_k=0, top_p=1.0)
        self.ppo = rl.algorithm == "ppo"
        self.cached: tuple[int, dict, dict] | None = None
        self.time_split = RolloutTimeSplit()
        self._rollout_ended: float | None = None  # when the last prepare_batch returned
        self._eval_seconds = 0.0  # evaluation time since then (not part of the update)
        self._batches_prepared = 0

    # -- rollouts ----------------------------------------------------------------------------------
    def sample(self, params, prompt_batch: dict, settings, group_size: int, rng) -> tuple[list[Sample], dict, dict]:
        """G answers per prompt -> (samples, training rows, timing metrics)."""
        lengths = np.asarray(prompt_batch["prompt_lengths"])
        prompt_tokens = np.asarray(prompt_batch["prompt_tokens"])
        prompts = [prompt_tokens[i, :lengths[i]].tolist() for i in range(len(lengths)) for _ in range(group_size)]
        width = prompt_tokens.shape[1]
        started = time.perf_counter()
        output = generate_lib.generate(self.config.model, self.context.graphdef, params, prompts, settings, rng,
                                       pad_id=self.pad_id, prompt_width=width, bucket_batch=False,
                                       mesh=self.context.mesh)
        seconds = time.perf_counter() - started
        references = prompt_batch.get("references") or [None] * len(lengths)
        messages = prompt_batch.get("messages") or [None] * len(lengths)
        samples = []
        for row, prompt in enumerate(prompts):
            ids = output.completion(row)
            source = row // group_size
            samples.append(Sample(prompt, ids, self.tokenizer.decode(ids) if self.tokenizer else "",
                                  bool(output.finished[row]), references[source], messages[source],
                                  where=f"prompt {int(np.asarray(prompt_batch['example_ids'])[source, 0])}"
                                  if "example_ids" in prompt_batch else ""))
        rows = build_rows(prompts, output, width + settings.max_new_tokens)
        return samples, rows, {"generate_seconds": seconds}

    def prepare_batch(self, context: Any, prompt_batch: dict) -> tuple[dict, dict]:
        began = time.perf_counter()
        first = self._rollout_ended is None
        if self._batches_prepared >= 2:  # the time since the last batch: update k-1 (update 1 compiles)
            self.time_split.update += began - self._rollout_ended - self._eval_seconds
            self.time_split.steps += 1
        self._batches_prepared += 1
        self._eval_seconds = 0.0
        batch, metrics = self._prepare_batch(context, prompt_batch)
        if not first:
            self.time_split.rollout += metrics.get("generate_seconds", 0.0)
            self.time_split.reward += metrics.get("reward_seconds", 0.0)
            self.time_split.score += metrics.get("score_seconds", 0.0) if metrics.get("generate_seconds") else 0.0
        self._rollout_ended = time.perf_counter()
        return batch, {**metrics, **self.time_split.metrics()}

    def _prepare_batch(self, context: Any, prompt_batch: dict) -> tuple[dict, dict]:
        index = int(prompt_batch["rollout_index"])
        if self.cached is not None and self.cached[0] == index:  # rl.updates_per_batch > 1: same rollout
            return self.cached[1], {**self.cached[2], "generate_seconds": 0.0, "reward_seconds": 0.0}
        rl = self.config.rl
        params = lora.model_params(self.config.model, context.state.params, context.reference_params)  # + adapters
        rng = jax.random.fold_in(jax.random.key(self.config.train.seed), index)
        samples, rows, metrics = self.sample(params, prompt_batch, self.settings, rl.group_size, rng)
        started = time.perf_counter()
        rewards, reward_metrics = self.rewards(samples, rows, params)
        metrics["reward_seconds"] = time.perf_counter() - started
        metrics.update(reward_metrics)

        started = time.perf_counter()
        placed = sharding_lib.place_batch(rows, context.mesh)
        reference = lora.reference_params(self.config.model, context.state.params, context.reference_params)
        scores = _rollout_scores_jit(context.graphdef, params, reference, placed, with_values=self.ppo)
        scores = {k: generate_lib.host_rows(v, context.mesh) for k, v in scores.items()}
        advantages, equal_groups = group_advantages(jnp.asarray(rewards), algorithm="reinforce" if self.ppo
                                                    else rl.algorithm, group_size=rl.group_size)
        if self.ppo:
            advantages, scores["returns"] = ppo_advantages(rewards, scores["old_logprobs"],
                                                           scores["reference_logprobs"], scores["old_values"],
                                                           rows["loss_mask"], rl.kl_coef, rl.gamma, rl.gae_lambda)
        advantages = np.asarray(advantages)
        metrics["score_seconds"] = time.perf_counter() - started
        batch = {**rows, **scores, "advantages": advantages.astype(np.float32)}
        if "example_ids" in prompt_batch:
            batch["example_ids"] = np.repeat(np.asarray(prompt_batch["example_ids"]), rl.group_size, axis=0)
        lengths = np.asarray([len(s.completion_ids) for s in samples], np.float32)
        metrics.update({
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "equal_reward_groups": float(equal_groups),
            "answer_length": float(lengths.mean()), "finished_fraction": float(np.mean([s.finished for s in samples])),
            "advantage_abs_mean": float(np.abs(advantages).sum() / max(np.count_nonzero(advantages), 1)),
        })
        self._log_samples(context, index, samples, rewards)
        self.cached = (index, batch, metrics)
        return batch, metrics

    def _log_samples(self, context, index: int, samples: list[Sample], rewards: np.ndarray) -> None:
        step = index * self.config.rl.updates_per_batch + 1
        if not context.is_main_process or (step % self.config.train.log_every and index):
            return
        group = self.config.rl.group_size
        records = [{"step": step, "prompt": self._text(s.prompt_ids), "completion": s.completion,
                    "completion_ids": s.completion_ids if not self.tokenizer else None, "reference": s.reference,
                    "finished": s.finished, "reward": float(r)} for s, r in zip(samples[:group], rewards[:group])]
        with (context.workdir / "samples.jsonl").open("a") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        best = records[int(np.argmax([r["reward"] for r in records]))]
        self.log(f"step {step}: reward {rewards.mean():.3f} | e.g. {best['prompt'][-60:]!r} -> "
                 f"{(best['completion'] or str(best['completion_ids']))[:60]!r} (reward {best['reward']:.2f})")

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else " ".join(map(str, ids))

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, context: Any) -> dict[str, float]:
        """Greedy answers to the eval prompts: mean reward, answer length, finished fraction."""
        began = time.perf_counter()
        try:
            return self._evaluate(context)
        finally:
            self._eval_seconds += time.perf_counter() - began

    def _evaluate(self, context: Any) -> dict[str, float]:
        if not self.eval_prompts:
            return {}
        rewards, lengths, done = [], [], []
        params = lora.model_params(self.config.model, context.state.params, context.reference_params)
        for number, prompt_batch in enumerate(self.eval_prompts):
            samples, rows, _ = self.sample(params, prompt_batch, self.greedy, 1, jax.random.key(number))
            values, _ = self.rewards(samples, rows, params)
            present = np.asarray(prompt_batch.get("present", np.ones(len(samples), bool)))  # not a wrapped repeat
            rewards.extend(np.asarray(values)[present].tolist())
            lengths.extend(len(s.completion_ids) for s, keep in zip(samples, present) if keep)
            done.extend(s.finished for s, keep in zip(samples, present) if keep)
        return {"reward_mean": float(np.mean(rewards)), "answer_length": float(np.mean(lengths)),
                "finished_fraction": float(np.mean(done)), "prompts": float(len(rewards))}


def check_rl_config(config: Config) -> None:
    rl = config.rl
    algorithms = sorted(losses.ADVANTAGE_ESTIMATORS) + ["ppo"]
    if rl.algorithm not in algorithms:
        raise ConfigError(f"rl.algorithm='{rl.algorithm}' is not one of {', '.join(algorithms)}")
    if rl.policy_loss not in losses.POLICY_LOSSES:
        raise ConfigError(f"rl.policy_loss='{rl.policy_loss}' is not one of {', '.join(sorted(losses.POLICY_LOSSES))}")
    if rl.algorithm in ("grpo", "rloo") and rl.group_size < 2:
        raise ConfigError(f"rl.algorithm={rl.algorithm} compares answers within a group: rl.group_size must be at "
                          f"least 2, got {rl.group_size}")
    for name in ("group_size", "prompts_per_step", "max_new_tokens", "updates_per_batch"):
        if getattr(rl, name) < 1:
            raise ConfigError(f"rl.{name} must be at least 1")
    rows = rl.prompts_per_step * rl.group_size
    if config.train.batch_size != rows:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must equal rl.prompts_per_step x "
                          f"rl.group_size = {rl.prompts_per_step} x {rl.group_size} = {rows} for the rl stage (the "
                          f"update batch is every sampled answer); set train.batch_size={rows}")
    parse_reward_spec(rl.reward)
    generate_lib.SamplingSettings(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k,
                                  top_p=rl.top_p)


def rl_loss_fn(config: Config, graphdef):
    rl = config.rl
    return functools.partial(rl_loss, graphdef, policy_loss=rl.policy_loss, clip_epsilon=rl.clip_epsilon,
                             kl_coef=0.0 if rl.algorithm == "ppo" else rl.kl_coef, value_coef=rl.value_coef)


def _default_eval_prompts(config: Config, tokenizer) -> list[dict]:
    if not tokenizer or config.train.eval_batches < 1:
        return []
    iterator = make_batch_iterator(config, tokenizer, "eval", prefetch=0, data_format="prompts")
    return eval_prompt_batches(iterator, config.train.eval_batches)


def eval_prompt_batches(iterator, num_batches: int) -> list[dict]:
    """Up to num_batches prompt batches covering the eval prompts in order, each prompt once: the last
    batch is filled by wrapping around (generation needs full batches) and its "present" [host batch]
    bool marks the real rows, so the wrapped repeats are left out of the eval metrics."""
    prompts, global_batch = len(iterator.prompts), iterator.global_batch_size
    count = min(num_batches, -(-prompts // global_batch))
    batches = []
    for k in range(count):
        slots = k * global_batch + iterator.offset + np.arange(iterator.host_batch_size)
        batches.append({**iterator.batch_at(k), "present": slots < prompts})
    return batches


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


def rollout_hooks(context: Any, prompt_iterator, log: Callable[[str], None] = print, *,
                  eval_prompts: list[dict] | None = None,
                  reward_functions: dict[str, RewardFn] | None = None) -> tuple[Any, Callable, Callable, Callable]:
    """The on-policy loop's hooks for a set-up run `context`: (update-batch iterator over the prompt
    batches, prepare_batch(context, prompt_batch) that samples, rewards and scores answers with the current
    params, evaluate(context) answering the eval prompts greedily, finish(context) logging the time split
    between rollouts, rewards, scoring and updates).

    eval_prompts: prompt batches answered greedily at eval time (default: train.eval_batches batches of the
    eval split); reward_functions: extra `fn(sample) -> float` registered by name for rl.reward."""
    config = context.config
    for name, fn in (reward_functions or {}).items():
        register_reward(name)(fn)
    iterator = RolloutPrompts(prompt_iterator, config.rl.updates_per_batch)
    if eval_prompts is None:
        eval_prompts = _default_eval_prompts(config, context.tokenizer)
    rewards = Rewards(config, context.graphdef, context.tokenizer, context.mesh)
    stage = RLStage(context, rewards, eval_prompts, log)
    def finish(context: Any) -> None:
        if context.is_main_process:
            log(stage.time_split.describe())

    return iterator, stage.prepare_batch, stage.evaluate, finish


# ----------------------------------------------------------------------------------------------
# Scoring (prompt, answer) pairs with a reward model: `jaxllm score`.


def score_rows(config: Config, graphdef, params, rows: Sequence[tuple[list[int], list[int]]],
               batch_size: int = 16) -> np.ndarray:
    """Reward-head scores [N] of (ids, loss_mask) rows (a rendered conversation whose mask marks the
    answer + EOS). Rows longer than model.max_seq_len keep their last max_seq_len tokens."""
    if model_lib.HEADS_KEY not in params or "reward" not in params[model_lib.HEADS_KEY]:
        raise UsageError(f"the checkpoint has no reward head (its stage is '{config.train.stage}'); score with a "
                         "reward model trained with train.stage=reward")
    mesh = generate_lib.mesh_of(params)
    limit = config.model.max_seq_len
    rows = [(ids[-limit:], mask[-limit:]) for ids, mask in rows]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = generate_lib.bucket(max(len(ids) for ids, _ in chunk))
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        segments = np.zeros((batch_size, width), np.int32)
        for row, (ids, row_mask) in enumerate(chunk):
            tokens[row, :len(ids)], mask[row, :len(ids)], segments[row, :len(ids)] = ids, row_mask, 1
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()
        arrays = [generate_lib.place_rows(a, mesh) for a in (tokens, positions, segments, mask)]
        with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            out.append(np.asarray(jax.device_get(_scores_jit(graphdef, params, *arrays)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


_ANSWER_FIELDS = ("response", "answer", "completion")


def _score_record_rows(record: Any, where: str, tokenizer) -> tuple[list[str], list[tuple[list[int], list[int]]]]:
    """A record -> (names of the scores it gets, rendered rows)."""
    from jaxllm.data.chat import prompt_messages, render_chat

    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record must be a JSON object")
    messages = prompt_messages(record, where)  # a DataError (exit 2) names the record and the field
    if "chosen" in record and "rejected" in record:
        names, answers = ["chosen_score", "rejected_score"], [record["chosen"], record["rejected"]]
    else:
        field = next((f for f in _ANSWER_FIELDS if f in record), None)
        if field is None:
            raise UsageError(f"{where}: a record needs an answer to score: one of {', '.join(_ANSWER_FIELDS)}, "
                             "or 'chosen' and 'rejected'")
        names, answers = ["score"], [record[field]]
    rows = []
    for answer in answers:
        if not isinstance(answer, str):
            raise UsageError(f"{where}: answers must be strings, got {type(answer).__name__}")
        rows.append(render_chat(messages + [{"role": "assistant", "content": answer}], tokenizer))
    return names, rows


def score_file(checkpoint: str, input_path: str | Path, batch_size: int = 16) -> tuple[list[dict], list[float]]:
    """Scores a .jsonl file's records with the reward model in `checkpoint` (a train.stage=reward workdir):
    {prompt|messages, response|answer|completion} records get 'score', {prompt, chosen, rejected} ones get
    chosen_score/rejected_score. Returns (the scored records, every score in order)."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    path = Path(input_path)
    if not path.is_file():
        raise UsageError(f"input file {path} does not exist")
    records = [(record.where, record.data) for record in iter_records(f"jsonl:{path}")]
    if not records:
        raise UsageError(f"input file {path} has no records")
    config, graphdef, params, tokenizer = generate_lib.load_model_for_inference(checkpoint)
    if "reward" not in params.get(model_lib.HEADS_KEY, {}):
        raise UsageError(f"{checkpoint} is not a reward model (its stage is '{config.train.stage}'); train one "
                         "with `jaxllm train configs/reward_tiny.yaml`")
    layout, rows = [], []
    for where, record in records:
        names, record_rows = _score_record_rows(record, where, tokenizer)
        layout.append(names)
        rows.extend(record_rows)
    scores = score_rows(config, graphdef, params, rows, batch_size).tolist()
    output, position = [], 0
    for (_, record), names in zip(records, layout):
        scored = dict(record)
        for name in names:
            scored[name] = scores[position]
            position += 1
        output.append(scored)
    return output, scores


__all__ = [
    "Sample", "REWARD_FUNCTIONS", "register_reward", "normalize_answer", "parse_reward_spec", "parse_grade",
    "Rewards", "FunctionReward", "RewardModelReward", "SelfJudgeReward", "DEFAULT_JUDGE_TEMPLATE", "build_rows",
    "rollout_scores", "rl_loss", "rl_loss_fn", "ppo_advantages", "RolloutPrompts", "RLStage", "check_rl_config",
    "rollout_hooks", "update_batch_spec", "eval_prompt_batches", "score_rows", "score_file",
]
