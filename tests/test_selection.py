"""SFT data selection: longest-k, the model's loss and IFD, k-center diversity, and their combination."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxllm.cli.data import select_command
from jaxllm.data import DataError
from jaxllm.data.chat import render_chat
from jaxllm.errors import UsageError
from jaxllm.lecture.selection import (Example, ModelScorer, SelectionOptions, ifd_scores, k_center_greedy,
                                      load_examples, select_examples)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro model fine-tuned briefly on the embedded QA conversations."""
    from jaxllm.config import load_config
    from jaxllm.train import train

    workdir = tmp_path_factory.mktemp("sft")
    config = load_config("configs/sft_tiny.yaml", ["model.preset=micro", "mesh.num_devices=1", "train.steps=40",
                                                   "train.batch_size=8", "train.progress=false",
                                                   "train.eval_batches=1", "optimizer.learning_rate=3e-3"])
    train(config, workdir, log=lambda *_: None)
    return workdir


@pytest.fixture(scope="module")
def scorer(checkpoint):
    from jaxllm.generate import load_model_for_inference

    return ModelScorer(load_model_for_inference(checkpoint), batch_size=4)


def _qa(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _examples(records: list[dict]) -> list[Example]:
    return [Example(i, f"test:{i + 1}", r, r["messages"]) for i, r in enumerate(records)]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_longest_k_writes_the_k_longest_answers_in_input_order(tmp_path):
    records = [{"prompt": "Where does Ana work?", "response": "Oslo"},
               {"prompt": "Describe Ana.", "response": "Ana studied history at Hartwell Institute and works in Oslo."},
               {"prompt": "Who employs Ana?", "response": "Northwind Labs"},
               {"prompt": "Tell me about Bo.", "response": "Bo was born in Lyon on June 2, 1980 and majored in art."}]
    out = tmp_path / "chosen.jsonl"
    assert select_command([str(_write(tmp_path / "in.jsonl", records)), "--out", str(out), "--k", "2",
                           "--by", "length", "--scores", str(tmp_path / "scores.jsonl")]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [records[1], records[3]]
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [s["selected"] for s in scores] == [False, True, False, True]
    assert scores[1]["length"] > scores[2]["length"] > scores[0]["length"]


def test_answer_loss_and_ifd_equal_a_direct_computation(scorer):
    examples = _examples([_qa("Where was Lucia Wagner born?", "Seville"),
                          _qa("Who is the employer of Felix Chen?", "Kestrel Airlines"),
                          {"messages": [{"role": "system", "content": "Be brief."}, *_qa("Hi?", "Hello")["messages"],
                                        *_qa("Where does Bo work?", "in Lyon, France")["messages"]]}])
    config, graphdef, params, tokenizer = scorer.config, scorer.graphdef, scorer.params, scorer.tokenizer
    from jaxllm import model

    forward = jax.jit(model.apply, static_argnums=0)

    def direct_loss(messages, mode):  # one conversation alone in a row of 64 (segment 0 after it)
        ids, mask = render_chat(messages, tokenizer, mode)
        tokens = np.zeros((1, 64), np.int32)
        tokens[0, :len(ids)] = ids
        segments = (np.arange(64) < len(ids)).astype(np.int32)[None]
        logits = np.asarray(forward(graphdef, params, tokens, np.arange(64)[None], segments))
        logprobs = jax.nn.log_softmax(logits[0, :len(ids) - 1], axis=-1)
        picked = np.asarray([logprobs[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]])
        return -picked.mean()

    scores = ifd_scores(scorer, examples)
    for i, example in enumerate(examples):
        conditioned = direct_loss(example.messages, "normal")
        alone = direct_loss(example.messages, "response_only")
        assert scores["conditioned"][i] == pytest.approx(conditioned, rel=1e-4)
        assert scores["direct"][i] == pytest.approx(alone, rel=1e-4)
        assert scores["ifd"][i] == pytest.approx(conditioned / alone, rel=1e-4)


def test_model_loss_ranks_an_answer_unlike_the_training_data_highest(scorer):
    records = [r.record for r in load_examples("default:sft", limit=6)]
    records.insert(3, _qa("Where does Bo work?", "Qzx vvk jjw 9$7 ~~ plq"))
    examples = _examples(records)
    hardest = select_examples(examples, SelectionOptions(k=1, by="loss"), scorer=scorer)
    assert hardest["selected"] == [3]
    easiest = select_examples(examples, SelectionOptions(k=6, by="perplexity", lowest=True), scorer=scorer)
    assert 3 not in easiest["selected"]
    losses = easiest["scores"]["loss"]
    assert list(losses[easiest["selected"]]) == sorted(losses[easiest["selected"]])


def test_diversity_picks_every_distinct_example_before_any_duplicate(scorer):
    a, b, c, d = (_qa("Where does Ana work?", "Oslo"), _qa("What did Bo study?", "history of art"),
                  _qa("When was Cy born?", "May 1, 1990"), {"prompt": "Hello", "response": "Hi there, how can I help?"})
    from jaxllm.data.chat import record_to_messages

    records = [a, a, b, a, b, c, c, d]
    examples = [Example(i, f"t:{i}", r, record_to_messages(r)) for i, r in enumerate(records)]
    result = select_examples(examples, SelectionOptions(k=4, diversity=True), scorer=scorer)
    picked = [json.dumps(records[i], sort_keys=True) for i in result["selected"]]
    assert len(set(picked)) == 4


def test_score_then_diversity_chooses_only_from_the_best_scored_pool(scorer):
    long_answer = _qa("Tell me about Ana.", "Ana studied history at Hartwell Institute and now works in Oslo.")
    medium = _qa("Where was Bo born?", "Bo was born in Lyon, France.")
    short = _qa("Cy?", "No")
    records = [short, long_answer, long_answer, medium, short, long_answer]
    result = select_examples(_examples(records), SelectionOptions(k=2, by="length", diversity=True, pool=4),
                             scorer=scorer)
    assert [records[i] for i in result["selected"]] == [long_answer, medium]  # not a duplicate, not a short one
    assert result["funnel"][-2:] == [("best 4 by length", 4), ("k-center", 2)]


def test_k_center_greedy_is_farthest_first():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0], [9.9, 0.0]])
    assert k_center_greedy(points, 3) == [0, 2, 3]
    assert k_center_greedy(points, 10) == [0, 2, 3, 1, 4]


def test_bad_input_is_a_clear_error(tmp_path, checkpoint):
    bad = _write(tmp_path / "bad.jsonl", [_qa("q", "a"), {"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2.*'prompt' and 'response'"):
        select_command([str(bad), "--out", str(tmp_path / "o.jsonl"), "--k", "1", "--by", "length"])
    good = _write(tmp_path / "good.jsonl", [_qa("q", "a")])
    with pytest.raises(UsageError, match="--checkpoint"):
        select_command([str(good), "--out", str(tmp_path / "o.jsonl"), "--k", "1", "--by", "ifd"])
    with pytest.raises(UsageError, match="--by .*--diversity"):
        select_command([str(good), "--out", str(tmp_path / "o.jsonl"), "--k", "1"])
    with pytest.raises(UsageError, match="does not exist"):
        select_command([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--k", "1",
                        "--by", "length"])
    with pytest.raises(UsageError, match="at least 1"):
        select_command([str(good), "--out", str(tmp_path / "o.jsonl"), "--k", "0", "--by", "length"])
