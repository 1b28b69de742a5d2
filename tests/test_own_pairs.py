"""Preference pairs from the model's own mistakes: the pairing rule (pure), its invariants (hypothesis) and the
model path (a micro model's greedy answer is the first of its answers)."""

import json

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from jaxllm.errors import DataError, UsageError
from jaxllm.lecture.own_pairs import (OwnPairsSettings, pairs_from_answers, question_records, write_pairs)
from jaxllm.tasks.metrics import exact_match


def _answer(text, finished=True):
    return {"text": text, "finished": finished}


def test_wrong_finished_answers_become_pairs_greedy_first_deduplicated_and_capped():
    questions = [{"prompt": "Where was Ann born?", "reference": "Oslo"},
                 {"prompt": "Where was Bo born?", "reference": "Lima"},
                 {"prompt": "Where was Cy born?", "reference": "Rome"}]
    answers = [
        [_answer("Paris"), _answer("oslo."), _answer("Paris"), _answer("Cork"), _answer("Bonn")],  # right once
        [_answer("Lima")],  # right: no pair
        [_answer("Rome is", finished=False), _answer(" "), _answer("Nice")],  # unfinished and empty skipped
    ]
    pairs, report = pairs_from_answers(questions, answers, max_pairs_per_prompt=2)
    assert pairs == [{"prompt": "Where was Ann born?", "chosen": "Oslo", "rejected": "Paris"},
                     {"prompt": "Where was Ann born?", "chosen": "Oslo", "rejected": "Cork"},
                     {"prompt": "Where was Cy born?", "chosen": "Rome", "rejected": "Nice"}]
    assert report == {"questions": 3, "greedy_correct": pytest.approx(1 / 3), "any_correct": pytest.approx(2 / 3),
                      "pairs": 3, "questions_with_pairs": 2}
    kept, _ = pairs_from_answers(questions[2:], answers[2:], max_pairs_per_prompt=5, keep_unfinished=True)
    assert [p["rejected"] for p in kept] == ["Rome is", "Nice"]


@hypothesis_settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Oslo", "Lima", "Rome"]),
                          st.lists(st.tuples(st.sampled_from(["Oslo", "oslo.", "Lima", "Rome ", "", "Cork"]),
                                             st.booleans()), min_size=1, max_size=6)), min_size=1, max_size=6),
       st.integers(1, 4), st.booleans())
def test_no_pair_rejects_a_right_answer_and_each_question_keeps_at_most_the_cap(data, cap, keep_unfinished):
    questions = [{"prompt": f"q{i}", "reference": reference} for i, (reference, _) in enumerate(data)]
    answers = [[_answer(text, finished) for text, finished in given_answers] for _, given_answers in data]
    pairs, report = pairs_from_answers(questions, answers, cap, keep_unfinished)
    by_prompt = {q["prompt"]: q["reference"] for q in questions}
    for pair in pairs:
        assert pair["chosen"] == by_prompt[pair["prompt"]]
        assert pair["rejected"].strip() and not exact_match(pair["rejected"], [pair["chosen"]])
    counts = [sum(p["prompt"] == q["prompt"] for p in pairs) for q in questions]
    assert max(counts) <= cap and report["pairs"] == len(pairs)
    assert report["questions_with_pairs"] == sum(c > 0 for c in counts)
    assert report["greedy_correct"] <= report["any_correct"] <= 1.0


def test_bad_questions_and_settings_are_clear_errors():
    with pytest.raises(DataError, match="record 1: own pairs need a string 'prompt' and 'reference'"):
        question_records([{"prompt": "a", "reference": "b"}, {"prompt": "c"}], "qs.jsonl")
    assert question_records([{"prompt": "a", "reference": ["b", "c"]}], "x") == [{"prompt": "a", "reference": "b"}]
    with pytest.raises(UsageError, match="temperature=0.0 must be > 0"):
        OwnPairsSettings(samples=3, temperature=0.0).validate()
    with pytest.raises(UsageError, match="samples=0 must be at least 1"):
        OwnPairsSettings(samples=0).validate()


def test_pairs_are_written_as_jsonl_the_dpo_reader_accepts(tmp_path):
    from jaxllm.data.sources import read_records

    pairs = [{"prompt": "Where was Ann born?", "chosen": "Oslo", "rejected": "Paris — ü"}]
    write_pairs(tmp_path / "own.jsonl", pairs)
    assert [json.loads(line) for line in (tmp_path / "own.jsonl").read_text().splitlines()] == pairs
    assert [r.data for r in read_records(f"jsonl:{tmp_path}")] == pairs


def test_thumbs_unzip_the_pairs_the_right_answer_up_once_per_question():
    from jaxllm.lecture.own_pairs import thumbs_from_pairs

    pairs = [{"prompt": "a", "chosen": "Oslo", "rejected": "Paris"}, {"prompt": "b", "chosen": "Lima", "rejected": "Rome"},
             {"prompt": "a", "chosen": "Oslo", "rejected": "Cork"}]
    assert thumbs_from_pairs(pairs) == [
        {"prompt": "a", "completion": "Oslo", "label": True}, {"prompt": "a", "completion": "Paris", "label": False},
        {"prompt": "a", "completion": "Cork", "label": False}, {"prompt": "b", "completion": "Lima", "label": True},
        {"prompt": "b", "completion": "Rome", "label": False}]
    assert thumbs_from_pairs([]) == []
