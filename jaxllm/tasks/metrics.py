"""Metrics of evaluation tasks: pure functions of strings and numbers (no model, no JAX).

Generative answers are compared after `jaxllm.answers.normalize_answer` (case, surrounding whitespace, runs of
spaces and a final period do not count; the RL rewards use the same rule):
- exact_match: the answer equals a reference;
- contains: a reference occurs in the answer;
- regex: the answer extracted by a pattern (GSM8K's `#### 42` by default; the last match, group 1 if the
  pattern has a group) equals the reference, from which the same pattern extracts the value when it
  matches there too; numbers are compared without thousands separators ("1,000" == "1000").
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from jaxllm.answers import normalize_answer


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    answer = normalize_answer(prediction)
    return any(answer == normalize_answer(reference) for reference in references)


def contains(prediction: str, references: Sequence[str]) -> bool:
    answer = normalize_answer(prediction)
    return any(normalize_answer(reference) in answer for reference in references if reference.strip())


def extract_answer(text: str, pattern: str) -> str | None:
    """The last match of `pattern` in `text` (its group 1 when it has groups); None when nothing matches."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.re.groups else last.group(0)


def _canonical_number(text: str) -> str:
    value = normalize_answer(text).replace(",", "").replace("$", "")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else repr(number)


def regex_match(prediction: str, references: Sequence[str], pattern: str) -> tuple[bool, str | None]:
    """(correct, extracted answer or None)."""
    extracted = extract_answer(prediction, pattern)
    if extracted is None:
        return False, None
    wanted = {_canonical_number(extract_answer(r, pattern) or r) for r in references}
    return _canonical_number(extracted) in wanted, extracted


def score_generation(prediction: str, references: Sequence[str], metric: str, pattern: str = "") -> dict:
    """{"correct": bool, and for regex "extracted": str | None}."""
    if metric == "exact_match":
        return {"correct": exact_match(prediction, references)}
    if metric == "contains":
        return {"correct": contains(prediction, references)}
    if metric == "regex":
        correct, extracted = regex_match(prediction, references, pattern)
        return {"correct": correct, "extracted": extracted}
    raise ValueError(f"unknown generative metric '{metric}'")


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); stderr 0 for n < 2."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def pairwise_outcome(model_first_preferred: bool, model_second_preferred: bool) -> float:
    """One prompt judged twice, the model's answer shown first (as A) and then second (as B): 1 = win
    (preferred in both orders), 0 = loss (in neither), 0.5 = tie (the judge followed the position)."""
    return (float(model_first_preferred) + float(model_second_preferred)) / 2.0


def win_rate(outcomes: Sequence[float]) -> dict[str, float]:
    """Win rate (ties count one half) with the counts of wins, ties and losses."""
    wins = sum(1 for o in outcomes if o == 1.0)
    losses = sum(1 for o in outcomes if o == 0.0)
    ties = len(outcomes) - wins - losses
    rate, stderr = mean_and_stderr(list(outcomes))
    return {"win_rate": rate, "win_rate_stderr": stderr, "wins": wins, "ties": ties, "losses": losses}
