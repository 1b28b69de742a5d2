"""Knowledge categories (Gekhman et al.) and token-shift analysis (URIAL) on a micro model that memorised one fact."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from helpers import train_memorised_qa, write_jsonl

from jaxllm.lecture.analysis import KnowledgeSettings, categorize, knowledge_categories, load_qa, token_shift
from jaxllm.cli.analyze import knowledge_command, shift_command
from jaxllm.data import DataError
from jaxllm.errors import UsageError

FACT = {"prompt": "What is the capital of Zorbia?", "reference": "Quxville"}
RANDOM_FACT = {"prompt": "Who founded the Plimsoll Guild?", "reference": "Ottoline Vesk-Aramby"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro model fine-tuned from scratch on one QA conversation until it has memorised it."""
    return train_memorised_qa(tmp_path_factory.mktemp("memorised"), FACT["prompt"], FACT["reference"])


@pytest.fixture(scope="module")
def model(checkpoint):
    from jaxllm.generate import load_model_for_inference

    return load_model_for_inference(checkpoint)


def test_categories_follow_gekhman_et_al():
    assert categorize(1.0, 0.0) == "HighlyKnown"
    assert categorize(0.5, 1.0) == categorize(0.1, 0.0) == "MaybeKnown"
    assert categorize(0.0, 0.25) == "WeaklyKnown"
    assert categorize(0.0, 0.0) == "Unknown"


def test_a_memorised_fact_is_highly_known_and_a_random_one_unknown(checkpoint, tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", [FACT, RANDOM_FACT])
    out = tmp_path / "knowledge"
    assert knowledge_command(["--checkpoint", str(checkpoint), "--qa", str(qa), "--out", str(out), "--shots", "1",
                              "--variants", "2", "--samples", "3", "--temperature", "0.7",
                              "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in (out / "knowledge.jsonl").read_text().splitlines()]
    assert [r["category"] for r in rows] == ["HighlyKnown", "Unknown"]
    assert rows[0]["greedy_answers"] == ["Quxville", "Quxville"] and rows[0]["shots"] == [1, 1]
    assert len(rows[1]["sampled_answers"]) == 6 and rows[1]["p_sampled"] == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"HighlyKnown": 1, "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": 1}
    sft = [json.loads(line) for line in (out / "sft" / "HighlyKnown.jsonl").read_text().splitlines()]
    assert sft == [{"messages": [{"role": "user", "content": FACT["prompt"]},
                                 {"role": "assistant", "content": "Quxville"}]}]
    assert "HighlyKnown 1 (50%)" in capsys.readouterr().out


def test_any_accepted_reference_counts_as_right(model):
    qa = load_qa_records([{"prompt": "Name any city.", "reference": ["Paris", "Quxville"]}, RANDOM_FACT])
    rows = knowledge_categories(model, qa, KnowledgeSettings(shots=1, variants=3, samples=0, max_new_tokens=8))
    assert rows[0]["category"] == "HighlyKnown" and rows[0]["p_greedy"] == 1.0 and rows[0]["sampled_answers"] == []
    assert rows[1]["category"] == "Unknown"


def load_qa_records(records):
    from jaxllm.lecture.analysis import QA

    return [QA(i, f"t:{i}", r["prompt"], r["reference"] if isinstance(r["reference"], list) else [r["reference"]])
            for i, r in enumerate(records)]


def test_identical_checkpoints_leave_every_token_unshifted(checkpoint, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": FACT["prompt"]}, {"prompt": "Tell me a story."}])
    out = tmp_path / "shift"
    assert shift_command(["--base", str(checkpoint), "--aligned", str(checkpoint), "--prompts", str(prompts),
                        "--out", str(out), "--max-new-tokens", "12"]) == 0
    result = json.loads((out / "shift.json").read_text())
    assert result["summary"]["positions"] > 2 and result["summary"]["unshifted"] == 1.0
    assert "".join(t["text"] for t in result["answers"][0]["tokens"]).startswith("Quxville")
    assert "unshifted</span> 100.0%" in (out / "shift.html").read_text()


def test_ranks_under_another_base_match_a_direct_sort(model):
    from jaxllm import model as model_lib

    config, graphdef, params, tokenizer = model
    _, other_params = model_lib.init_model(config.model, seed=7)  # an unrelated (untrained) base model
    base = (config, graphdef, other_params, tokenizer)
    from jaxllm.data.chat import prompt_ids

    prompt = prompt_ids([{"role": "user", "content": FACT["prompt"]}], tokenizer)
    result = token_shift(base, model, [prompt], max_new_tokens=6)
    tokens = result["answers"][0]["tokens"]
    sequence = prompt + [t["id"] for t in tokens]
    logits = np.asarray(jax.jit(model_lib.apply, static_argnums=0)(
        graphdef, other_params, np.asarray([sequence]), np.arange(len(sequence))[None], np.ones((1, len(sequence)),
                                                                                              np.int32)))[0]
    for offset, token in enumerate(tokens):
        row = logits[len(prompt) + offset - 1]
        assert token["base_rank"] == 1 + int(np.sum(row > row[token["id"]] + 1e-4))
        assert token["base_top_id"] == int(np.argmax(row))
        expected = "unshifted" if token["base_rank"] == 1 else "marginal" if token["base_rank"] <= 3 else "shifted"
        assert token["category"] == expected
    assert result["summary"]["unshifted"] < 1.0  # an untrained base disagrees with the memorised answer


def test_bad_input_is_a_clear_error(tmp_path, model):
    bad = write_jsonl(tmp_path / "qa.jsonl", [FACT, {"prompt": "no answer here"}])
    with pytest.raises(DataError, match=r"qa.jsonl:2.*'reference'"):
        load_qa(str(bad))
    with pytest.raises(UsageError, match="does not exist"):
        load_qa(str(tmp_path / "missing.jsonl"))
    config, graphdef, params, tokenizer = model
    bigger = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=1024))
    with pytest.raises(UsageError, match="vocabulary"):
        token_shift((bigger, graphdef, params, tokenizer), model, [[2, 5]], max_new_tokens=2)
    with pytest.raises(UsageError, match="temperature"):
        KnowledgeSettings(temperature=0.0).validate()
