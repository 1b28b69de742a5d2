"""Rewards for on-policy learning: samples, reward functions registered by name (`@register_reward`),
a trained reward model, the policy as its own judge, and their weighted sum (`Rewards`, from rl.reward)."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import numpy as np

from jaxllm import generate as generate_lib
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import steps as steps_lib
from jaxllm.config import Config, ConfigError
from jaxllm.data.chat import prompt_ids as chat_prompt_ids
from jaxllm.answers import answers_match, normalize_answer
from jaxllm.errors import UsageError


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
# Reward-head scores [B] of rows (shared by the reward-model reward and `jaxllm score`).
sequence_scores_jit = jax.jit(steps_lib.sequence_scores, static_argnums=(0,), static_argnames=("head",))
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


@register_reward("exact_match", needs_reference=True)
def exact_match(sample: Sample) -> float:
    """1 if the answer equals the reference (after normalize_answer), else 0."""
    return float(answers_match(sample.completion, sample.reference or ""))


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
                              "(or register one with jaxllm.rl.rewards.register_reward)")
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
            scores = sequence_scores_jit(self.graphdef, self.params, placed["tokens"], placed["positions"],
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
        limit = self.model_config.max_seq_len - self.settings.max_new_tokens
        prompts = []
        for sample in samples:
            answer = sample.completion
            while True:
                text = self.template.format(question=sample.question, answer=answer, reference=sample.reference or "")
                ids = chat_prompt_ids([{"role": "user", "content": text}], self.tokenizer)
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
