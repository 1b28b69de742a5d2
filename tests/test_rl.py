"""On-policy RL: rewards, the policy-gradient step, GRPO/RLOO/PPO runs on a toy task, reward models, `jaxllm score`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import checkpoint as ckpt
from jaxllm import generate as gen
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import stages
from jaxllm import state as state_lib
from jaxllm import steps as steps_lib
from jaxllm import train as train_lib
from jaxllm.cli import main
from jaxllm.config import ConfigError, MeshConfig, save_config
from jaxllm.data import biographies as bio
from jaxllm.rl.rewards import REWARD_FUNCTIONS, FunctionReward, Rewards, Sample, parse_grade, parse_reward_spec
from jaxllm.rl import rollouts, scoring, update
from jaxllm.tasks import metrics as task_metrics

from helpers import random_params, tiny_config

QUIET = dict(log=lambda *_: None)
TARGET, NEW_TOKENS = 7, 8


def one_device():
    return sharding_lib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


class ToyPrompts:
    """Random token prompts of 2-6 tokens (BOS first); batch k is a pure function of (seed, k)."""

    def __init__(self, batch: int, seed: int = 0):
        self.batch, self.seed, self.step = batch, seed, 0

    def batch_at(self, k: int) -> dict:
        rng = np.random.default_rng((self.seed, k))
        lengths = rng.integers(2, 7, self.batch).astype(np.int32)
        tokens = np.zeros((self.batch, 6), np.int32)
        for row, length in enumerate(lengths):
            tokens[row, 0] = 2
            tokens[row, 1:length] = rng.integers(10, 64, length - 1)
        return {"prompt_tokens": tokens, "prompt_lengths": lengths}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = state["step"]


def target_count(sample: Sample) -> float:
    """The toy task: the fraction of the answer budget spent on the target token (learnable in seconds)."""
    return sum(token == TARGET for token in sample.completion_ids) / NEW_TOKENS


def toy_config(*overrides):
    return tiny_config("train.stage=rl", "train.batch_size=32", "rl.prompts_per_step=4", "rl.group_size=8",
                       f"rl.max_new_tokens={NEW_TOKENS}", "rl.reward=target", "rl.kl_coef=0.02",
                       "optimizer.learning_rate=3e-2", "optimizer.schedule=constant", "optimizer.weight_decay=0",
                       "train.checkpoint_every=1000", *overrides)


def run_toy(workdir, *overrides, eval_prompts=()):
    return train_lib.train(toy_config(*overrides), workdir, mesh=one_device(), tokenizer=False,
                           batch_iterator=ToyPrompts(4), eval_prompts=list(eval_prompts),
                       reward_functions={"target": target_count}, **QUIET)


# ----------------------------------------------------------------------------------------------
# Rewards.


def test_reward_functions_normalise_answers_and_combine_by_weight():
    sample = Sample([2], [5, 6], completion=" Oslo.", finished=True, reference="oslo")
    assert REWARD_FUNCTIONS["exact_match"](sample) == 1.0
    assert REWARD_FUNCTIONS["exact_match"](Sample([2], [5], completion="in Oslo", reference="Oslo")) == 0.0
    assert REWARD_FUNCTIONS["contains"](Sample([2], [5], completion="in Oslo, Norway", reference="oslo")) == 1.0
    # the evaluation's rule (jaxllm.answers): what RL rewards is what the report counts as right
    for completion in (" Oslo.", "oslo", '"Oslo"', "Oslo!", "Oslo, Norway"):
        rewarded = REWARD_FUNCTIONS["exact_match"](Sample([2], [5], completion=completion, reference="Oslo"))
        judged = task_metrics.exact_match(completion, ["Oslo"])
        assert rewarded == float(judged) == float(bio.exact_match(completion, "Oslo"))
    assert REWARD_FUNCTIONS["finished"](sample) == 1.0
    assert REWARD_FUNCTIONS["single_line"](Sample([2], [5], completion="a\nb")) == 0.0
    assert parse_reward_spec("exact_match+0.1*finished") == [(1.0, "exact_match"), (0.1, "finished")]
    with pytest.raises(ConfigError, match="unknown reward 'exact'.*exact_match"):
        parse_reward_spec("exact")
    with pytest.raises(gen.UsageError, match="reference"):
        FunctionReward("exact_match")([Sample([2], [5], completion="x", where="prompt 3")], {}, None)


def test_judge_grades_are_parsed_from_the_reply():
    assert parse_grade("4") == 0.8
    assert parse_grade("Grade: 5/5") == 1.0
    assert parse_grade("no idea") is None
    assert parse_grade("7") is None  # out of range is not a grade


# ----------------------------------------------------------------------------------------------
# The policy-gradient step.


def test_one_policy_gradient_step_raises_good_answers_and_lowers_bad_ones(tmp_path):
    config = toy_config("train.steps=1", "optimizer.learning_rate=1e-3")  # a small step: first-order effects
    context = train_lib.setup(config, tmp_path, mesh=one_device(), tokenizer=False, **QUIET)
    graphdef, params = context.graphdef, jax.device_get(context.state.params)
    prompt_batch = ToyPrompts(32).batch_at(0)
    prompts = [row[:n].tolist() for row, n in zip(prompt_batch["prompt_tokens"], prompt_batch["prompt_lengths"])]
    labels = np.where(np.arange(32) % 2 == 0, 1.0, -1.0).astype(np.float32)  # thumbs up / down
    good, bad = [20, 21, 22, 23], [40, 41, 42, 43]  # no shared token, so one update can move both ways
    answers = np.asarray([(good if label > 0 else bad) + [0] * (NEW_TOKENS - 4) for label in labels], np.int32)
    output = gen.GenerationOutput(answers, np.zeros(answers.shape, np.float32), np.full(32, 4, np.int32),
                                  np.zeros(32, bool))
    rows = update.build_rows(prompts, output, 6 + NEW_TOKENS)
    with jax.set_mesh(context.mesh):
        placed = sharding_lib.place_batch(rows, context.mesh)
        scores = jax.device_get(update._rollout_scores_jit(graphdef, context.state.params, context.reference_params,
                                                       placed, with_values=False))
        step = train_lib.jit_step(context, steps_lib.build_train_step(config, graphdef, context.optimizer,
                                                                      loss_fn=update.rl_loss_fn(config, graphdef)))
        batch = sharding_lib.place_batch({**rows, **scores, "advantages": labels}, context.mesh)
        new_state, metrics = step(context.state, batch, context.reference_params, np.float32(np.inf))
    assert float(metrics["skipped"]) == 0.0 and float(metrics["clipped_fraction"]) == 0.0
    answer_logprob = jax.jit(lambda p: steps_lib.sequence_logprobs(graphdef, p, rows["tokens"], rows["positions"],
                                                                   rows["segment_ids"], rows["loss_mask"]))
    change = np.asarray(answer_logprob(jax.device_get(new_state.params)) - answer_logprob(params))
    assert (change[labels > 0] > 0).all() and (change[labels < 0] < 0).all(), change


# ----------------------------------------------------------------------------------------------
# Whole runs on the toy task.


def test_grpo_raises_the_mean_reward_on_a_toy_task(tmp_path):
    eval_prompts = [ToyPrompts(32, seed=99).batch_at(0)]  # 32 rows: the rollouts' compiled shape
    result = run_toy(tmp_path / "grpo", "train.steps=10", "rl.algorithm=grpo", eval_prompts=eval_prompts)
    curve = [r["reward_mean"] for r in train_lib.read_metrics(tmp_path / "grpo")]
    assert len(curve) == 10
    assert np.mean(curve[-3:]) > 0.3 > 5 * np.mean(curve[:3]), curve  # from ~1/64 (chance) to most tokens
    last = train_lib.read_metrics(tmp_path / "grpo")[-1]
    for key in ("reward_std", "equal_reward_groups", "kl", "answer_length", "generate_seconds", "step_seconds",
                "clipped_fraction"):
        assert np.isfinite(last[key]), key
    assert result.eval_metrics["reward_mean"] > 0.3 and result.eval_metrics["prompts"] == 32
    samples = [json.loads(line) for line in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion_ids", "reward"} <= set(samples[0])


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_rloo_and_ppo_run_a_few_steps(tmp_path, algorithm):
    run_toy(tmp_path / algorithm, "train.steps=4", f"rl.algorithm={algorithm}", "rl.updates_per_batch=2")
    records = train_lib.read_metrics(tmp_path / algorithm)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)
    # Updates 1 and 2 share one rollout: the second is off-policy, so the ratio moves off 1.
    assert records[0]["reward_mean"] == records[1]["reward_mean"] and records[1]["generate_seconds"] == 0.0
    if algorithm == "ppo":
        assert all(np.isfinite(r["value_loss"]) for r in records)
    # The time split leaves out the first rollout and update (compiles); updates 2 and 4 reuse a rollout.
    assert records[0]["time_rollout_seconds_total"] == 0.0 == records[0]["time_update_seconds_total"]
    assert records[1]["time_rollout_seconds_total"] == 0.0 == records[1]["time_update_seconds_total"]
    assert records[2]["time_rollout_seconds_total"] > 0 and records[2]["time_update_seconds_total"] > 0
    assert records[3]["time_rollout_seconds_total"] == records[2]["time_rollout_seconds_total"]  # reused rollout
    last = records[-1]
    assert last["time_rollout_seconds_total"] > 0 and last["time_update_seconds_total"] > 0
    fractions = [last[f"time_{part}_fraction"] for part in ("rollout", "reward", "score", "update")]
    assert min(fractions) >= 0 and sum(fractions) == pytest.approx(1.0)


def test_rollout_time_split_reports_shares_of_the_measured_time():
    split = rollouts.RolloutTimeSplit(rollout=3.0, reward=0.5, score=0.5, update=4.0, steps=7)
    assert split.fractions() == {"rollout": 0.375, "reward": 0.0625, "score": 0.0625, "update": 0.5}
    assert split.metrics()["time_rollout_seconds_total"] == 3.0
    assert "rollout 3.0s (38%)" in split.describe() and "7 updates" in split.describe()
    assert "nothing measured" in rollouts.RolloutTimeSplit().describe()


def test_rl_resumes_to_the_same_rewards_as_a_straight_run(tmp_path):
    run_toy(tmp_path / "straight", "train.steps=2", "train.async_checkpointing=false")
    for _ in range(2):
        train_lib.train(toy_config("train.steps=2", "train.async_checkpointing=false"), tmp_path / "resumed",
                        mesh=one_device(), tokenizer=False, batch_iterator=ToyPrompts(4), eval_prompts=[],
                    reward_functions={"target": target_count}, max_steps_this_run=1, **QUIET)
    curve = lambda name: [r["reward_mean"] for r in train_lib.read_metrics(tmp_path / name)]  # noqa: E731
    # Same program, same machine: rewards (counts of target tokens over fixed rollouts) agree to rounding.
    np.testing.assert_allclose(curve("straight"), curve("resumed"), rtol=1e-6)


def test_bad_rl_settings_are_clear_errors(tmp_path):
    cases = [
        (("train.batch_size=16",), "train.batch_size=32"),
        (("rl.algorithm=a2c",), "rl.algorithm"),
        (("rl.group_size=1", "train.batch_size=4"), "group_size must be at least 2"),
        (("rl.reward=exact",), "unknown reward"),
        (("rl.policy_loss=dpo",), "rl.policy_loss"),
        (("rl.top_p=0",), "top_p"),
    ]
    for overrides, message in cases:
        with pytest.raises((ConfigError, gen.UsageError), match=message):
            run_toy(tmp_path / "bad", "train.steps=1", *overrides)
    with pytest.raises(ConfigError, match="train.batch_size=32"):  # `train` hands the rl stage to jaxllm.rl
        train_lib.train(toy_config("train.batch_size=8"), tmp_path / "bad", mesh=one_device(), tokenizer=False, **QUIET)
    with pytest.raises(ConfigError, match="rl.reward_model is empty"):
        run_toy(tmp_path / "bad", "train.steps=1", "rl.reward=reward_model")


# ----------------------------------------------------------------------------------------------
# The embedded biography prompts, the self-judge, reward models and `jaxllm score` (real tokenizer).


def _save_run(path, config):
    """A workdir as `jaxllm train` leaves it: config.yaml and a checkpoint of fresh params (+ heads)."""
    path.mkdir(parents=True)
    save_config(config, path / "config.yaml")
    params = random_params(config.model, 0.3)
    heads = stages.head_names(config)
    if heads:
        params[model_lib.HEADS_KEY] = state_lib.init_heads(config.model, heads, 0)
    optimizer = state_lib.make_optimizer(config.optimizer, 1)
    manager = ckpt.make_manager(path, async_save=False)
    ckpt.save(manager, 1, state_lib.create_state(params, optimizer, 0), {}, {}, force=True)
    manager.wait_until_finished()
    return params


BIO = ("model.vocab_size=512", "model.max_seq_len=128", "data.seq_len=64", "mesh.num_devices=1")


def test_biography_rollouts_are_rewarded_by_exact_match_and_by_the_model_judging_itself(tmp_path):
    from jaxllm.stages import make_batch_iterator

    config = tiny_config(*BIO, "train.stage=rl", "data.source=default:rl_prompts", "train.batch_size=4",
                         "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=4",
                         "rl.reward=exact_match+0.5*self_judge")
    rollouts.check_rl_config(config)
    context = train_lib.setup(config, tmp_path, **QUIET)
    stage = rollouts.RLStage(context, Rewards(config, context.graphdef, context.tokenizer, context.mesh), [], **QUIET)
    prompts = make_batch_iterator(config, context.tokenizer, prefetch=0)
    with jax.set_mesh(context.mesh):
        batch, metrics = stage.prepare_batch(context, dict(prompts.batch_at(0), rollout_index=0))
    assert batch["tokens"].shape == (4, prompts.batch_at(0)["prompt_tokens"].shape[1] + 4)
    assert batch["advantages"].shape == (4,) and np.isfinite(batch["reference_logprobs"]).all()
    assert 0 <= metrics["judge_unparsed"] <= 1 and {"reward_exact_match", "reward_self_judge"} <= set(metrics)
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|user|>") and sample["reference"]
    judge_prompt = context.tokenizer.decode(stage.rewards.terms[1][2].judge_prompts(
        [Sample([], [], completion="Vilnius", messages=[{"role": "user", "content": "Where?"}])])[0])
    assert "Question: Where?" in judge_prompt and "Answer: Vilnius" in judge_prompt


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "rm"
    params = _save_run(path, tiny_config(*BIO, "train.stage=reward", "model.init_std=0.3"))
    return path, params


def test_score_cli_scores_answers_and_preference_pairs(reward_model, tmp_path, capsys):
    path, _ = reward_model
    records = [{"prompt": "Where was Noor Nguyen born?", "response": "Vilnius"},
               {"messages": [{"role": "user", "content": "Hi"}], "answer": "Hello"},
               {"prompt": "Where does Theo Garcia work?", "chosen": "Basel", "rejected": "Oslo"}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--checkpoint", str(path), "--input", str(source), "--out", str(out),
                 "--batch-size", "4"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert isinstance(scored[0]["score"], float) and "chosen_score" in scored[2] and "rejected_score" in scored[2]
    assert "chosen > rejected on" in capsys.readouterr().err
    # The same score as the reward head read directly.
    config, graphdef, params, tokenizer = gen.load_model_for_inference(path)
    from jaxllm.data.chat import render_chat

    ids, mask = render_chat([{"role": "user", "content": records[0]["prompt"]},
                             {"role": "assistant", "content": "Vilnius"}], tokenizer)
    direct = jax.jit(steps_lib.sequence_scores, static_argnums=0)(
        graphdef, params, np.asarray([ids]), np.arange(len(ids))[None], np.ones((1, len(ids)), np.int32),
        np.asarray([mask], np.float32))
    np.testing.assert_allclose(scored[0]["score"], float(direct[0]), rtol=1e-4, atol=1e-5)


def test_reward_model_rewards_score_rollout_rows(reward_model):
    path, _ = reward_model
    policy = tiny_config(*BIO, "train.stage=rl", f"rl.reward_model={path}", "rl.reward=reward_model")
    rewards = Rewards(policy, None, None, one_device())
    prompts = [[2, 5, 6, 7], [2, 8]]
    output = gen.GenerationOutput(np.asarray([[9, 10, 3], [11, 3, 0]], np.int32), np.zeros((2, 3), np.float32),
                                  np.asarray([3, 2], np.int32), np.ones(2, bool))
    rows = update.build_rows(prompts, output, 16)
    values, _ = rewards([Sample(p, []) for p in prompts], rows, None)
    config, graphdef, params, _ = gen.load_model_for_inference(path, load_tokenizer=False)
    expected = scoring.score_rows(config, graphdef, params, [(p + output.completion(i, keep_stop=True),
                                                         [0] * len(p) + [1] * int(output.lengths[i]))
                                                        for i, p in enumerate(prompts)], batch_size=2)
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5)


def test_bad_score_input_is_a_usage_error(reward_model, tmp_path, capsys):
    path, _ = reward_model
    not_rm = tmp_path / "lm"
    _save_run(not_rm, tiny_config(*BIO))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "x"}) + "\n")
    cases = [
        (["--checkpoint", str(not_rm), "--input", str(good)], "not a reward model"),
        (["--checkpoint", str(path), "--input", str(no_answer)], "needs an answer"),
        (["--checkpoint", str(path), "--input", str(tmp_path / "missing.jsonl")], "does not exist"),
    ]
    for args, message in cases:
        assert main(["score", *args]) == 2, args
        assert message in capsys.readouterr().err, args
