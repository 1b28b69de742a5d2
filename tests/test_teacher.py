"""Teacher data generation: distillation, non-instructional continuation and rephrasing, end to end."""

from __future__ import annotations

import json

import pytest

from helpers import train_memorised_qa, write_jsonl

from jaxllm.cli.data import generate_command
from jaxllm.data import DataError
from jaxllm.errors import UsageError
from jaxllm.lecture.teacher import build_request, split_in_half

ANSWER = "Quxville"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro teacher fine-tuned from scratch on one QA conversation: it answers 'Quxville' to anything."""
    return train_memorised_qa(tmp_path_factory.mktemp("teacher"), "What is the capital of Zorbia?", ANSWER)


@pytest.fixture(scope="module")
def model(checkpoint):
    from jaxllm.generate import load_model_for_inference

    return load_model_for_inference(checkpoint)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distill_writes_the_teachers_answers_as_conversations(checkpoint, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Where is Zorbia?"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a city."},
                      {"role": "assistant", "content": "an old answer that the teacher replaces"}]},
        {"question": "What is the capital of Zorbia?"}])
    out = tmp_path / "sft.jsonl"
    assert generate_command(["--teacher", str(checkpoint), "--prompts", str(prompts), "--out", str(out),
                             "--mode", "distill", "--samples", "2", "--temperature", "0.5",
                             "--max-new-tokens", "8", "--report", str(tmp_path / "report.json")]) == 0
    records = _read(out)
    assert len(records) == 6
    assert records[2]["messages"][:2] == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Name a city."}]
    assert all(r["messages"][-1] == {"role": "assistant", "content": ANSWER} for r in records)
    from jaxllm.data.chat import record_to_messages
    assert all(record_to_messages(r)[-1]["role"] == "assistant" for r in records)  # usable as SFT data
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["read"] == 3 and report["written"] == 6 and report["skipped"] == {}


def test_unfinished_answers_are_dropped_unless_kept(checkpoint, tmp_path):
    prompts = tmp_path / "questions.txt"
    prompts.write_text("Where is Zorbia?\n\nWho lives there?\n")  # one prompt a line, blank lines ignored
    out = tmp_path / "sft.jsonl"
    argv = ["--teacher", str(checkpoint), "--prompts", str(prompts), "--out", str(out), "--greedy",
            "--max-new-tokens", "2", "--report", str(tmp_path / "report.json")]
    assert generate_command(argv) == 0
    assert _read(out) == [] and json.loads((tmp_path / "report.json").read_text())["skipped"] == {"unfinished": 2}
    assert generate_command(argv + ["--keep-unfinished"]) == 0
    answers = [r["messages"][-1]["content"] for r in _read(out)]
    assert len(answers) == 2 and all(ANSWER.startswith(a) and a != ANSWER for a in answers)


def test_continue_cuts_documents_in_half_and_continues_the_plain_text(checkpoint, model, tmp_path):
    # The QA-memorising teacher may end plain text at once; an EOS bias (the same in both paths) makes it go on.
    documents = tmp_path / "corpus.txt"
    text = "Zorbia is a small country. Its capital is Quxville, on the river Ple. The people fish and farm."
    documents.write_text(f"{text}\n\nOneword\n")
    out = tmp_path / "nift.jsonl"
    assert generate_command(["--teacher", str(checkpoint), "--prompts", str(documents), "--out", str(out),
                             "--mode", "continue", "--greedy", "--max-new-tokens", "10", "--eos-bias", "-30",
                             "--report", str(tmp_path / "report.json")]) == 0
    (record,) = _read(out)
    first, second = split_in_half(text)
    assert record["prompt"] == first and text == f"{first} {second}"
    assert abs(len(first) - len(text) / 2) < 10
    from jaxllm.generate import SamplingSettings, generate  # the same continuation through the plain API
    config, graphdef, params, tokenizer = model
    output = generate(config.model, graphdef, params, [[tokenizer.bos_id] + tokenizer.encode(first)],
                      SamplingSettings(max_new_tokens=10, temperature=0.0, token_bias=((tokenizer.eos_id, -30.0),)))
    assert record["response"] == tokenizer.decode(output.completion(0)).strip()
    assert json.loads((tmp_path / "report.json").read_text())["skipped"] == {"too_short": 1}


def test_rephrase_asks_through_the_chat_template_and_writes_pretraining_text(checkpoint, model, tmp_path):
    from jaxllm.data.chat import render_text
    from jaxllm.data.sources import Record
    from jaxllm.lecture.teacher import REPHRASE_STYLES

    tokenizer = model[3]
    document = "zorbia capital quxville. fish farm river."
    request, reason = build_request(Record(0, {"body": document}, "t:1"), "rephrase", tokenizer, 100,
                                    instruction=REPHRASE_STYLES["easy"], style="easy", text_field="body")
    assert reason == "" and tokenizer.decode(request.prompt_ids) == render_text(
        [{"role": "user", "content": f"{REPHRASE_STYLES['easy']}\n\n{document}"}], add_generation_prompt=True)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"body": document}])
    out = tmp_path / "rephrased.jsonl"
    assert generate_command(["--teacher", str(checkpoint), "--prompts", str(corpus), "--out", str(out),
                             "--mode", "rephrase", "--instruction", "Say it better.", "--text-field", "body",
                             "--greedy", "--max-new-tokens", "8"]) == 0
    assert _read(out) == [{"text": ANSWER, "original": document, "style": "custom"}]


def test_bad_input_is_a_clear_error(checkpoint, tmp_path):
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(UsageError, match="does not exist"):
        generate_command(["--teacher", str(checkpoint), "--prompts", str(tmp_path / "none.jsonl"), "--out", out])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"title": "no prompt"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2.*'prompt'"):
        generate_command(["--teacher", str(checkpoint), "--prompts", str(bad), "--out", out, "--max-new-tokens", "4"])
    with pytest.raises(DataError, match=r"bad.jsonl:1.*'text'"):
        generate_command(["--teacher", str(checkpoint), "--prompts", str(bad), "--out", out, "--mode", "rephrase"])
    with pytest.raises(UsageError, match="no room"):
        generate_command(["--teacher", str(checkpoint), "--prompts", str(bad), "--out", out,
                            "--max-new-tokens", "200"])
    with pytest.raises(SystemExit):
        generate_command(["--teacher", str(checkpoint), "--prompts", str(bad), "--out", out, "--mode", "translate"])


def test_data_pairs_turns_the_models_wrong_answers_into_preference_pairs(checkpoint, tmp_path):
    from jaxllm.cli.data import pairs_command

    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"prompt": "What is the capital of Zorbia?", "reference": ANSWER},  # right: no pair
        {"prompt": "Where was Ann born?", "reference": "Oslo"}])
    out = tmp_path / "pairs.jsonl"
    assert pairs_command(["--model", str(checkpoint), "--questions", str(questions), "--out", str(out),
                          "--samples", "3", "--temperature", "0.5", "--max-new-tokens", "8"]) == 0
    # the teacher says Quxville whatever it is asked, greedy or sampled: one distinct wrong answer
    assert _read(out) == [{"prompt": "Where was Ann born?", "chosen": "Oslo", "rejected": ANSWER}]
    with pytest.raises(DataError, match="record 0: own pairs need a string 'prompt' and 'reference'"):
        pairs_command(["--model", str(checkpoint), "--questions", "default:sft", "--out", str(out)])


def test_own_answers_with_nothing_wrong_and_nothing_to_mix_is_a_clear_error(model, tmp_path):
    from jaxllm.evaluate.scoring import EvalModel
    from jaxllm.lecture.own_pairs import OwnAnswersSpec, write_own_answers

    questions = write_jsonl(tmp_path / "questions.jsonl",
                            [{"prompt": "What is the capital of Zorbia?", "reference": ANSWER}])
    spec = OwnAnswersSpec(prompts=f"jsonl:{questions}", samples=2, temperature=0.5, max_new_tokens=8)
    with pytest.raises(DataError, match="answered all 1 questions of jsonl:.* right"):
        write_own_answers(EvalModel(*model), spec, tmp_path)
    mixed = OwnAnswersSpec(prompts=f"jsonl:{questions}", samples=1, mix=[f"jsonl:{questions}"], format="thumbs")
    assert write_own_answers(EvalModel(*model), mixed, tmp_path)["pairs"] == 0
    assert (tmp_path / "own.jsonl").read_text() == "" and len(_read(tmp_path / "mix-0.jsonl")) == 1
