"""The rl stage between steps: prompt batches -> rollouts (sampled answers) -> rewards -> update batch,
greedy evaluation of eval prompts, the time split, and the hooks that plug it into the one loop."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import generate as generate_lib
from jaxllm import lora, losses
from jaxllm import sharding as sharding_lib
from jaxllm.config import Config, ConfigError
from jaxllm.data.pipeline import make_batch_iterator
from jaxllm.rl.rewards import RewardFn, Rewards, Sample, parse_reward_spec, register_reward
from jaxllm.rl.update import _rollout_scores_jit, build_rows, group_advantages, ppo_advantages


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
        self.pad_id = self.tokenizer.pad_id if self.tokenizer else generate_lib.PAD_ID
        self.eos_id = self.tokenizer.eos_id if self.tokenizer else generate_lib.EOS_ID
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
        scores = _rollout_scores_jit(context.built.forward_graphdef, params, reference, placed, with_values=self.ppo)
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
