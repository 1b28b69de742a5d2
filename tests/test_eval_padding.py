"""Evaluation counts every example exactly once: the last, partial eval batch is filled with padding rows
(all masked) that every loss treats as absent, never with repeats of earlier rows."""

import json
import types

import jax
import numpy as np
import pytest

from jaxllm import losses
from jaxllm import model as model_lib
from jaxllm.rl import rollouts
from jaxllm import state as state_lib
from jaxllm import steps as steps_lib
from jaxllm.config import load_config
from jaxllm.data import pipeline
from jaxllm import stages
from jaxllm.stages import make_batch_iterator, make_eval_batches
from jaxllm.stages.kto import kto_loss
from jaxllm.data.tokenizer import Tokenizer

TOKENIZER = Tokenizer.load("default")
MICRO = ["model.preset=micro", "data.seq_len=64", "train.progress=false", "train.eval_batches=100"]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f"jsonl:{path}"


def _config(stage: str, source: str, batch_size: int, *overrides: str):
    return load_config(overrides=MICRO + [f"train.stage={stage}", f"data.source={source}",
                                          f"data.eval_source={source}", f"train.batch_size={batch_size}",
                                          *overrides])


def _eval(config, batches, reference_seed: int = 1) -> dict[str, float]:
    """The train-time eval of `batches` (eval_step per batch, then summarize_eval), with a reference
    model different from the policy so the pair metrics are not all zero."""
    graphdef, params = model_lib.init_model(config.model, 0)
    heads = stages.head_names(config)
    if heads:
        params[model_lib.HEADS_KEY] = state_lib.init_heads(config.model, heads, 0)
    _, reference = model_lib.init_model(config.model, reference_seed)
    step = jax.jit(stages.build_eval_step(config, graphdef))
    return steps_lib.summarize_eval(jax.device_get([step(params, b, reference) for b in batches]))


def _pairs(count: int) -> list[dict]:
    return [{"prompt": f"Where does person {i} work?", "chosen": f"In town {i}.", "rejected": "I do not know."}
            for i in range(count)]


def test_the_last_eval_batch_is_padded_never_wrapped(tmp_path):
    config = _config("dpo", _write(tmp_path / "pairs.jsonl", _pairs(10)), 4)
    batches = make_eval_batches(config, TOKENIZER)
    assert [b["chosen_tokens"].shape[0] for b in batches] == [4, 4, 4]
    ids = np.concatenate([b["example_ids"][:, 0] for b in batches])
    assert sorted(ids[ids >= 0].tolist()) == list(range(10)) and (ids[10:] == -1).all()  # each pair once
    for key in ("chosen_loss_mask", "rejected_loss_mask", "chosen_segment_ids", "chosen_tokens"):
        assert (batches[-1][key][2:] == 0).all(), key


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_a_10_pair_preference_eval_reports_10_pairs_and_the_metrics_of_exactly_those_pairs(tmp_path, stage):
    config = _config(stage, _write(tmp_path / "pairs.jsonl", _pairs(10)), 4)
    padded = _eval(config, make_eval_batches(config, TOKENIZER))
    assert padded["pairs"] == 10 and padded["denominator"] == 10
    # The same pairs in batches that need no padding (5 + 5): every mean agrees. Rows are computed
    # independently, so only the batch shape differs: 1e-5 covers float32 reordering of the sums.
    unpadded = _eval(config, make_eval_batches(_config(stage, config.data.source, 5), TOKENIZER))
    assert unpadded["pairs"] == 10
    for key in ("loss", "preference_accuracy", "reward_margin"):
        assert padded[key] == pytest.approx(unpadded[key], rel=1e-5, abs=1e-6), key


def test_an_sft_eval_reports_exactly_the_answer_tokens_of_the_file(tmp_path):
    conversations = [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                                   {"role": "assistant", "content": f"Answer {i} " * (1 + i % 3)}]}
                     for i in range(20)]
    config = _config("sft", _write(tmp_path / "chat.jsonl", conversations), 8)
    rows = stages.build_rows(config, TOKENIZER, "eval").parts[""]
    answer_tokens = float(np.asarray(losses.target_weights(rows.loss_mask.astype(np.float32),
                                                           rows.segment_ids)).sum())
    assert rows.num_rows % 8, "the test needs a partial last batch"
    result = _eval(config, make_eval_batches(config, TOKENIZER))
    assert result["denominator"] == answer_tokens and result["tokens"] == answer_tokens


def test_a_kto_eval_counts_each_example_once_and_padding_leaves_the_reference_point_alone(tmp_path):
    records = [{"prompt": f"Where does person {i} work?", "completion": f"In town {i}.", "label": i % 3 != 0}
               for i in range(10)]
    config = _config("kto", _write(tmp_path / "feedback.jsonl", records), 4)
    batches = make_eval_batches(config, TOKENIZER)
    result = _eval(config, batches)
    assert result["examples"] == 10 and result["desirable"] + result["undesirable"] == 10
    # z0 of the padded batch (2 real rows + 2 padding) equals z0 of its 2 real rows alone.
    graphdef, params = model_lib.init_model(config.model, 0)
    _, reference = model_lib.init_model(config.model, 1)
    last = batches[-1]
    alone = {k: v[:2] for k, v in last.items()}

    def kl(batch):
        return float(kto_loss(graphdef, params, batch, reference, beta=0.1, desirable_weight=1.0,
                                        undesirable_weight=1.0)[2]["kl_reference"])

    # Same rows, another batch shape: float32 reordering only.
    assert kl(last) == pytest.approx(kl(alone), rel=1e-5, abs=1e-7)


def test_rl_eval_prompts_cover_each_prompt_once(tmp_path):
    prompts = [{"prompt": f"What is {i} plus one?", "reference": str(i + 1)} for i in range(10)]
    config = _config("rl", _write(tmp_path / "prompts.jsonl", prompts), 4, "rl.prompts_per_step=4",
                     "rl.group_size=2")
    iterator = make_batch_iterator(config, TOKENIZER, "eval", prefetch=0)
    batches = rollouts.eval_prompt_batches(iterator, 100)
    assert len(batches) == 3
    present = np.concatenate([b["present"] for b in batches])
    ids = np.concatenate([b["example_ids"][:, 0] for b in batches])
    assert present.sum() == 10 and sorted(ids[present].tolist()) == sorted(p["id"] for p in iterator.prompts)
    assert len(rollouts.eval_prompt_batches(iterator, 2)) == 2  # train.eval_batches still caps the batches

    # RLStage.evaluate leaves the wrapped repeats out: a stub model answers, every answer earns reward 1.
    stage = rollouts.RLStage.__new__(rollouts.RLStage)
    stage.config, stage.eval_prompts, stage.greedy, stage._eval_seconds = config, batches, None, 0.0
    answer = types.SimpleNamespace(completion_ids=[5, 6], finished=True)
    stage.sample = lambda params, batch, settings, group, key: ([answer] * len(batch["present"]), {}, {})
    stage.rewards = lambda samples, rows, params: (np.ones(len(samples), np.float32), {})
    context = types.SimpleNamespace(state=types.SimpleNamespace(params={}), reference_params=None)
    assert stage.evaluate(context)["prompts"] == 10.0
