"""Preference pairs from the model's own mistakes (`jaxllm data pairs`, and the pipeline's `own_answers`).

The model answers each question with a reference answer (the greedy answer, then `samples - 1` sampled ones);
every distinct wrong answer that ended becomes a pair {"prompt", "chosen": reference, "rejected": that answer}.
This is on-policy preference data as Llama 3's recipe builds it from the latest model (there with a reward
model and people; here with an exact-match judge, which the biography questions allow): the rejected answers are
the confusions this model makes, not somebody else's guess at them, so DPO pushes down exactly what the policy
would say. A question the model always answers right gives no pair. `thumbs_from_pairs` unzips them for KTO
(the right answer thumbs-up, each wrong one thumbs-down).

Greedy-only pairs over held-out questions (`samples=1`) are also an evaluation set: "of the answers the SFT model
got wrong, how many does a later model now rank below the right one?" (the pipeline's `own_mistakes` column).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from jaxllm.data import DataError
from jaxllm.data.chat import prompt_ids
from jaxllm.errors import UsageError
from jaxllm.evaluate import read_records as read_source_records
from jaxllm.evaluate.scoring import EvalModel, generate_completions
from jaxllm.files import write_atomic
from jaxllm.generate import SamplingSettings
from jaxllm.tasks.metrics import exact_match


@dataclasses.dataclass
class OwnPairsSettings:
    samples: int = 4  # answers per question: the greedy one, then samples - 1 sampled at `temperature`
    temperature: float = 1.0
    max_new_tokens: int = 16
    max_pairs_per_prompt: int = 2  # distinct wrong answers kept per question (the greedy one first)
    keep_unfinished: bool = False  # also answers that hit max_new_tokens without a stop token
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        for name in ("samples", "max_new_tokens", "max_pairs_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"own pairs: {name}={getattr(self, name)} must be at least 1")
        if self.samples > 1 and self.temperature <= 0:
            raise UsageError(f"own pairs: temperature={self.temperature} must be > 0 to sample "
                             f"{self.samples - 1} answers besides the greedy one (or set samples=1)")


def question_records(records: Iterable[dict], where: str = "input") -> list[dict]:
    """{"prompt", "reference"} records (a string reference, or the first of a list); anything else is an error
    naming the record."""
    out = []
    for number, record in enumerate(records):
        reference = record.get("reference")
        if isinstance(reference, list) and reference:
            reference = reference[0]
        if not isinstance(record.get("prompt"), str) or not isinstance(reference, str):
            raise DataError(f"{where} record {number}: own pairs need a string 'prompt' and 'reference' "
                            f"(fields: {', '.join(sorted(record)) or 'none'})", "missing_field")
        out.append({"prompt": record["prompt"], "reference": reference})
    if not out:
        raise DataError(f"{where}: no questions to answer")
    return out


def _answers(model: EvalModel, prompts: Sequence[list[int]], settings: OwnPairsSettings) -> list[list[dict]]:
    """[question][answer] -> {"text", "finished"}: the greedy answer first, then the sampled ones."""
    stops = (model.tokenizer.eos_id, model.tokenizer.user_id)
    greedy = SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=0.0, stop_ids=stops)
    answers = [[a] for a in generate_completions(model, prompts, greedy, batch_size=settings.batch_size)]
    if settings.samples > 1:
        sampled = SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                   stop_ids=stops)
        repeated = [p for p in prompts for _ in range(settings.samples - 1)]
        outputs = generate_completions(model, repeated, sampled, batch_size=settings.batch_size,
                                       seed=settings.seed)
        for index, output in enumerate(outputs):
            answers[index // (settings.samples - 1)].append(output)
    return answers


def pairs_from_answers(questions: Sequence[dict], answers: Sequence[Sequence[dict]], max_pairs_per_prompt: int,
                       keep_unfinished: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """(pairs, report) from each question's answers ({"text", "finished"}, the greedy one first): every distinct
    finished (or, with keep_unfinished, any), non-empty wrong answer (exact match against the reference, as the QA
    evaluation judges) becomes {"prompt", "chosen": reference, "rejected": answer}, at most max_pairs_per_prompt
    per question in answer order. report: questions, greedy_correct and any_correct (fractions of questions), pairs,
    questions_with_pairs."""
    pairs, greedy_correct, any_correct, with_pairs = [], 0, 0, 0
    for question, given in zip(questions, answers, strict=True):
        right = [exact_match(a["text"], [question["reference"]]) for a in given]
        greedy_correct += bool(right and right[0])
        any_correct += any(right)
        wrong: list[str] = []
        for answer, correct in zip(given, right):
            text = answer["text"].strip()
            if not correct and (answer["finished"] or keep_unfinished) and text and text not in wrong:
                wrong.append(text)
        wrong = wrong[:max_pairs_per_prompt]
        with_pairs += bool(wrong)
        pairs += [{"prompt": question["prompt"], "chosen": question["reference"], "rejected": text}
                  for text in wrong]
    count = max(len(questions), 1)
    report = {"questions": len(questions), "greedy_correct": greedy_correct / count,
              "any_correct": any_correct / count, "pairs": len(pairs), "questions_with_pairs": with_pairs}
    return pairs, report


def own_mistake_pairs(model: EvalModel, questions: Sequence[dict], settings: OwnPairsSettings
                      ) -> tuple[list[dict], dict[str, Any]]:
    """`pairs_from_answers` over the model's own answers to `questions` ({"prompt", "reference"}, asked as one
    user turn through the chat template)."""
    settings.validate()
    prompts = [prompt_ids([{"role": "user", "content": q["prompt"]}], model.tokenizer) for q in questions]
    return pairs_from_answers(questions, _answers(model, prompts, settings), settings.max_pairs_per_prompt,
                              settings.keep_unfinished)


def thumbs_from_pairs(pairs: Sequence[dict]) -> list[dict]:
    """The pairs unzipped for KTO: per question (in first-seen order) {"prompt", "completion": chosen, "label":
    True} once, then {"prompt", "completion": rejected, "label": False} for each of its pairs."""
    by_prompt: dict[str, list[dict]] = {}
    for pair in pairs:
        by_prompt.setdefault(pair["prompt"], []).append(pair)
    thumbs = []
    for prompt, group in by_prompt.items():
        thumbs.append({"prompt": prompt, "completion": group[0]["chosen"], "label": True})
        thumbs += [{"prompt": prompt, "completion": pair["rejected"], "label": False} for pair in group]
    return thumbs


@dataclasses.dataclass
class OwnAnswersSpec:
    """Feedback data from a model's own answers (a pipeline stage's `own_answers`: made from the model the stage
    starts from, just before it trains; they and the `mix` sources become its data.source, WORKDIR/<stage>.pairs/).
    format pairs: {"prompt", "chosen": reference, "rejected": a wrong answer} (DPO and kin); thumbs: the same
    unpaired, {"prompt", "completion", "label"} (KTO)."""
    format: Literal["pairs", "thumbs"] = "pairs"
    prompts: str = "default:rl_prompts"  # {"prompt", "reference"} records the model answers
    questions: int = 0  # the first this many of them (0: all)
    samples: int = 4  # answers per prompt: greedy + samples - 1 sampled at `temperature`
    temperature: float = 1.0
    max_pairs_per_prompt: int = 2
    max_new_tokens: int = 16
    keep_unfinished: bool = False  # also answers that never stopped (within max_new_tokens)
    seed: int = 0  # of the sampled answers
    mix: list[str] = dataclasses.field(default_factory=list)  # pair sources trained on as well


def write_own_answers(model: EvalModel, spec: OwnAnswersSpec, directory: Path) -> dict[str, Any]:
    """Writes directory/own.jsonl (the model's wrong answers to spec.prompts, as pairs or thumbs) and
    directory/mix-<i>.jsonl (the records of each `mix` source); returns own_mistake_pairs' report."""
    questions = question_records(read_source_records(spec.prompts, spec.questions or None), spec.prompts)
    pairs, report = own_mistake_pairs(model, questions, OwnPairsSettings(
        samples=spec.samples, temperature=spec.temperature, max_pairs_per_prompt=spec.max_pairs_per_prompt,
        max_new_tokens=spec.max_new_tokens, keep_unfinished=spec.keep_unfinished, seed=spec.seed))
    if not pairs and not spec.mix:
        raise DataError(f"own answers: the model answered all {report['questions']} questions of {spec.prompts} "
                        "right (or never finished an answer), so there is nothing to learn from; give harder "
                        "prompts, more samples, or `mix` sources to train on")
    write_pairs(directory / "own.jsonl", pairs if spec.format == "pairs" else thumbs_from_pairs(pairs))
    for number, source in enumerate(spec.mix):
        write_pairs(directory / f"mix-{number}.jsonl", read_source_records(source))
    return report


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> None:
    """Records (pairs or thumbs) as JSONL, written atomically (a reader never sees half a file)."""
    write_atomic(Path(path), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))


__all__ = ["OwnAnswersSpec", "write_own_answers", "OwnPairsSettings", "question_records", "pairs_from_answers",
           "own_mistake_pairs", "thumbs_from_pairs", "write_pairs"]
