"""When a generated answer is the reference answer: one rule for the evaluation's exact match
(`jaxllm.tasks.metrics`, the pipeline's held-out QA), the RL rewards (`jaxllm.rl.rewards`), the own-pairs
judge and the knowledge experiment (`jaxllm.data.biographies`), so that what RL rewards is what the report
counts as right."""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Lowercase, surrounding whitespace and trailing periods stripped, runs of whitespace collapsed:
    ' Lisbon. ' and 'lisbon' normalise alike; 'Lisbon, Portugal' stays different from 'Lisbon'."""
    return " ".join(text.strip().rstrip(".").split()).lower()


def answers_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


__all__ = ["answers_match", "normalize_answer"]
