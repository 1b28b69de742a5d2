"""Running evaluation tasks (`jaxllm eval`): the prompts of a task, one runner per task kind (perplexity,
multiple_choice, generate, pairwise), the results table and the tasks as asked for on the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxllm import losses
from jaxllm.data.chat import answer_ids, prompt_ids as chat_prompt_ids
from jaxllm.errors import UsageError
from jaxllm.evaluate.scoring import (EvalModel, generate_completions, greedy_settings, score_continuations,
                                    score_documents)
from jaxllm.generate import generate
from jaxllm.tasks import CANONICAL_FIELDS, Task, get_task, is_registered, with_overrides
from jaxllm.tasks.metrics import cut_at_stop, exact_match, mean_and_stderr, pairwise_outcome, score_generation, win_rate


# ----------------------------------------------------------------------------------------------
# Prompts of a task


def _encode_plain(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def _reference(task, example) -> str:
    """The solved answer a few-shot example shows."""
    if task.kind == "multiple_choice":
        return example.choices[example.answer]
    if task.kind == "generate":
        return example.answer[0]
    return example.values.get("baseline") or ""


def prompt_ids(task, example, shots: Sequence, tokenizer) -> list[int]:
    """Token ids of the prompt: the few-shot examples, then the example's prompt (chat: as turns, ending
    with the assistant marker; plain: BOS + text)."""
    if task.chat:
        messages: list[dict[str, str]] = []
        for shot in shots:
            messages += [{"role": "user", "content": task.prompt_text(shot)},
                         {"role": "assistant", "content": _reference(task, shot)}]
        if "messages" in example.values:
            messages += example.values["messages"]
        else:
            messages.append({"role": "user", "content": task.prompt_text(example)})
        return chat_prompt_ids(messages, tokenizer)
    prefix = "".join(task.prompt_text(shot) + task.choice_prefix + _reference(task, shot) + task.fewshot_separator
                     for shot in shots)
    return _encode_plain(tokenizer, prefix + task.prompt_text(example))


def _answer_ids(task, text: str, tokenizer) -> list[int]:
    """A choice as the continuation of the prompt (chat: the answer then EOS)."""
    return answer_ids(text, tokenizer) if task.chat else tokenizer.encode(task.choice_prefix + text)


# ----------------------------------------------------------------------------------------------
# Running tasks


@dataclasses.dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]
    samples: list[dict[str, Any]]
    seconds: float

    @property
    def examples(self) -> int:
        return len(self.samples)

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "examples": self.examples, "metrics": self.metrics, "seconds": self.seconds,
                "examples_per_second": self.examples / max(self.seconds, 1e-9)}


@dataclasses.dataclass
class RunSettings:
    """How tasks run: batch size, progress bars, decoding for generative tasks, pairwise models."""

    batch_size: int = 16
    progress: bool = False
    sampling: Any = None  # a SamplingSettings for generate/pairwise (None: greedy); max_new_tokens is the task's
    seed: int = 0
    judge: EvalModel | None = None  # pairwise: None = the evaluated model judges
    baseline: EvalModel | None = None  # pairwise: None = the records' baseline answers


def _sampling(task, tokenizer, settings: RunSettings):
    if settings.sampling is None:
        return greedy_settings(tokenizer, task.max_new_tokens, task.chat)
    stops = tuple(settings.sampling.stop_ids)
    if task.chat and tokenizer.user_id not in stops:
        stops += (tokenizer.user_id,)
    return dataclasses.replace(settings.sampling, max_new_tokens=task.max_new_tokens, stop_ids=stops)


def _shots(task, examples) -> list[list]:
    pool = task.fewshot_pool(examples)
    return [task.fewshot(example, pool) if task.num_fewshot else [] for example in examples]


def run_perplexity(model: EvalModel, task, examples, settings: RunSettings) -> tuple[dict, list[dict]]:
    tokenizer = model.tokenizer
    kept = [example for example in examples if example.text.strip()]
    encoded = tokenizer.encode_batch([example.text for example in kept], num_threads=1)
    documents = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in encoded]
    scores = score_documents(model.config.model, model.graphdef, model.params, documents,
                             batch_size=settings.batch_size, mesh=model.mesh, pad_id=tokenizer.pad_id,
                             progress=settings.progress, desc=task.name)
    text_bytes = [len(example.text.encode("utf-8")) for example in kept]
    nats, tokens, total_bytes = -float(np.sum(scores.logprob)), int(np.sum(scores.tokens)), sum(text_bytes)
    loss = nats / max(tokens, 1)
    metrics = {"bits_per_byte": nats / math.log(2) / max(total_bytes, 1), "perplexity": math.exp(min(loss, 30.0)),
               "loss": loss, "tokens": tokens, "bytes": total_bytes}
    if len(kept) < len(examples):
        metrics["empty_documents_skipped"] = len(examples) - len(kept)
    samples = [{"where": example.where, "tokens": int(count), "bytes": size, "nats": -float(logprob),
                "bits_per_byte": -float(logprob) / math.log(2) / max(size, 1)}
               for example, count, size, logprob in zip(kept, scores.tokens, text_bytes, scores.logprob)]
    return metrics, samples


def run_multiple_choice(model: EvalModel, task, examples, settings: RunSettings) -> tuple[dict, list[dict]]:
    tokenizer = model.tokenizer
    requests, spans = [], []
    for example, shots in zip(examples, _shots(task, examples)):
        context = prompt_ids(task, example, shots, tokenizer)
        spans.append((len(requests), len(example.choices)))
        requests.extend((context, _answer_ids(task, choice, tokenizer)) for choice in example.choices)
    scores = score_continuations(model.config.model, model.graphdef, model.params, requests,
                                 batch_size=settings.batch_size, mesh=model.mesh, pad_id=tokenizer.pad_id,
                                 progress=settings.progress, desc=task.name)
    samples, correct, correct_norm = [], [], []
    for example, (start, count) in zip(examples, spans):
        logprobs = scores.logprob[start:start + count]
        sizes = np.asarray([max(len(((task.choice_prefix if not task.chat else "") + c).encode("utf-8")), 1)
                            for c in example.choices], np.float64)
        prediction, prediction_norm = int(np.argmax(logprobs)), int(np.argmax(logprobs / sizes))
        correct.append(float(prediction == example.answer))
        correct_norm.append(float(prediction_norm == example.answer))
        samples.append({"where": example.where, "question": example.question, "choices": example.choices,
                        "answer": example.answer, "logprobs": [float(x) for x in logprobs],
                        "prediction": prediction, "prediction_norm": prediction_norm,
                        "correct": bool(correct[-1]), "correct_norm": bool(correct_norm[-1])})
    acc, acc_stderr = mean_and_stderr(correct)
    acc_norm, acc_norm_stderr = mean_and_stderr(correct_norm)
    chance = float(np.mean([1.0 / len(example.choices) for example in examples]))
    return {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_stderr,
            "chance": chance}, samples


def run_generate(model: EvalModel, task, examples, settings: RunSettings) -> tuple[dict, list[dict]]:
    tokenizer = model.tokenizer
    prompts = [prompt_ids(task, example, shots, tokenizer) for example, shots in zip(examples, _shots(task, examples))]
    outputs = generate_completions(model, prompts, _sampling(task, tokenizer, settings), batch_size=settings.batch_size,
                                   seed=settings.seed, progress=settings.progress, desc=task.name)
    samples, correct = [], []
    for example, output in zip(examples, outputs):
        prediction = cut_at_stop(output["text"], task.stop)
        scored = score_generation(prediction, example.answer, task.metric, task.answer_regex)
        correct.append(float(scored["correct"]))
        samples.append({"where": example.where, "question": example.question, "references": example.answer,
                        "prediction": prediction, **scored, "finished": output["finished"],
                        "tokens": output["tokens"]})
    value, stderr = mean_and_stderr(correct)
    return {task.metric: value, f"{task.metric}_stderr": stderr,
            "eos_rate": float(np.mean([o["finished"] for o in outputs])) if outputs else 0.0,
            "mean_answer_tokens": float(np.mean([o["tokens"] for o in outputs])) if outputs else 0.0}, samples


def _judge_prompt(task, judge: EvalModel, question: str, answer_a: str, answer_b: str) -> list[int]:
    """The judge's chat prompt; over-long answers are judged on their beginnings."""
    room = judge.max_len - max(len(answer_ids(letter, judge.tokenizer)) for letter in "AB")
    while True:
        text = task.judge_template.format(question=question, answer_a=answer_a, answer_b=answer_b)
        ids = chat_prompt_ids([{"role": "user", "content": text}], judge.tokenizer)
        if len(ids) <= room or not (answer_a or answer_b):
            return ids[-room:]
        answer_a, answer_b = answer_a[: len(answer_a) // 2], answer_b[: len(answer_b) // 2]


def run_pairwise(model: EvalModel, task, examples, settings: RunSettings) -> tuple[dict, list[dict]]:
    try:
        task.judge_template.format(question="", answer_a="", answer_b="")
    except (KeyError, IndexError, ValueError) as error:
        raise UsageError(f"task '{task.name}': judge_template may only use {{question}}, {{answer_a}} and "
                         f"{{answer_b}} ({error!r})") from None
    judge = settings.judge or model
    all_shots = _shots(task, examples)
    answers = generate_completions(
        model, [prompt_ids(task, e, s, model.tokenizer) for e, s in zip(examples, all_shots)],
        _sampling(task, model.tokenizer, settings), batch_size=settings.batch_size, seed=settings.seed,
        progress=settings.progress, desc=f"{task.name} answers")
    if settings.baseline is not None:
        baseline = settings.baseline
        baselines = [o["text"] for o in generate_completions(
            baseline, [prompt_ids(task, e, s, baseline.tokenizer) for e, s in zip(examples, all_shots)],
            _sampling(task, baseline.tokenizer, settings), batch_size=settings.batch_size, seed=settings.seed,
            progress=settings.progress, desc=f"{task.name} baseline")]
    else:
        missing = [e.where for e in examples if e.values.get("baseline") is None]
        if missing:
            raise UsageError(f"task '{task.name}': {missing[0]} has no baseline answer (field "
                             f"'{task.fields.get('baseline', 'baseline')}'); give --baseline CHECKPOINT or map the "
                             "field with --field baseline=FIELD")
        baselines = [e.values["baseline"] for e in examples]
    letters = [answer_ids(letter, judge.tokenizer) for letter in "AB"]
    requests = []
    for example, answer, other in zip(examples, answers, baselines):
        for first, second in ((answer["text"], other), (other, answer["text"])):
            context = _judge_prompt(task, judge, example.question, first, second)
            requests += [(context, letters[0]), (context, letters[1])]
    scores = score_continuations(judge.config.model, judge.graphdef, judge.params, requests,
                                 batch_size=settings.batch_size, mesh=judge.mesh, pad_id=judge.tokenizer.pad_id,
                                 progress=settings.progress, desc=f"{task.name} judge")
    logprobs = scores.logprob.reshape(len(examples), 2, 2)  # [example, order, letter]
    picks_a = logprobs[:, :, 0] > logprobs[:, :, 1]
    outcomes, samples = [], []
    for number, (example, answer, other) in enumerate(zip(examples, answers, baselines)):
        outcome = pairwise_outcome(bool(picks_a[number, 0]), not bool(picks_a[number, 1]))
        outcomes.append(outcome)
        samples.append({"where": example.where, "question": example.question, "answer": answer["text"],
                        "baseline": other, "judge_logprobs_model_first": logprobs[number, 0].tolist(),
                        "judge_logprobs_model_second": logprobs[number, 1].tolist(), "outcome": outcome})
    metrics = win_rate(outcomes)
    metrics["judge_picks_first"] = float(np.mean(picks_a)) if len(examples) else 0.0
    return metrics, samples


RUNNERS = {"perplexity": run_perplexity, "multiple_choice": run_multiple_choice, "generate": run_generate,
           "pairwise": run_pairwise}


def run_task(model: EvalModel, task, settings: RunSettings | None = None, limit: int | None = None) -> TaskResult:
    """Evaluates one task (a jaxllm.tasks.Task) on the first `limit` examples (default: task.limit, else all)."""
    settings = settings or RunSettings()
    if model.tokenizer is None:
        raise UsageError("evaluation needs the model's tokenizer (load it with load_tokenizer=True)")
    started = time.perf_counter()
    examples = task.examples(limit or task.limit or None)
    metrics, samples = RUNNERS[task.kind](model, task, examples, settings)
    return TaskResult(task.name, task.kind, metrics, samples, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Tasks as asked for, results as a table


def _format_metrics(kind: str, metrics: dict[str, float]) -> str:
    shown = {"perplexity": ("bits_per_byte", "perplexity", "loss", "tokens"),
             "multiple_choice": ("acc", "acc_norm", "chance"),
             "generate": ("exact_match", "contains", "regex", "eos_rate"),
             "pairwise": ("win_rate", "wins", "ties", "losses", "judge_picks_first")}[kind]
    parts = []
    for key in shown:
        if key not in metrics:
            continue
        value = metrics[key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        if f"{key}_stderr" in metrics:
            text += f"±{metrics[f'{key}_stderr']:.3f}"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def format_table(results: Sequence[TaskResult]) -> str:
    """The summary table: one line per task."""
    rows = [("task", "kind", "n", "metrics", "ex/s")]
    for result in results:
        rows.append((result.name, result.kind, str(result.examples), _format_metrics(result.kind, result.metrics),
                     f"{result.examples / max(result.seconds, 1e-9):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | Path, tasks: Sequence, settings: RunSettings | None = None,
                        limit: int | None = None, log=print) -> list[TaskResult]:
    """Loads a workdir's model and runs the tasks; returns their results (the CLI without the files)."""
    model = EvalModel.load(checkpoint)
    results = []
    for task in tasks:
        results.append(run_task(model, task, settings, limit))
        log(f"{task.name}: {_format_metrics(task.kind, results[-1].metrics)} ({results[-1].seconds:.1f}s)")
    return results


def configure_tasks(specs: Sequence[str], fields: dict[str, str] | None = None, template: str | None = None,
                    num_fewshot: int | None = None, fewshot_source: str | None = None, chat: bool | None = None,
                    metric: str | None = None, answer_regex: str | None = None, stop: Sequence[str] | None = None,
                    max_new_tokens: int | None = None) -> list[Task]:
    """The tasks `specs` name (registered names, task YAML files or KIND:SOURCE), with the given settings
    overriding the tasks' own (None: keep it). `fields` (canonical field -> record field) and `template`
    apply only to KIND:SOURCE and YAML tasks, whose record layout is the user's."""
    fields = dict(fields or {})
    known = {name for names in CANONICAL_FIELDS.values() for name in names}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UsageError(f"--field {unknown[0]}=...: '{unknown[0]}' is not a task field; map one of "
                         f"{', '.join(sorted(known))}")
    tasks, names, adhoc = [], set(), 0
    for spec in specs:
        task = get_task(spec)
        if not is_registered(spec):  # a KIND:SOURCE or YAML task: the record layout is the user's
            adhoc += 1
            task = with_overrides(task, fields=fields or None, template=template)
        task = with_overrides(task, num_fewshot=num_fewshot, fewshot_source=fewshot_source, chat=chat,
                              metric=metric, answer_regex=answer_regex,
                              stop=tuple(stop) if stop else None, max_new_tokens=max_new_tokens)
        if task.name in names:
            raise UsageError(f"task '{task.name}' is given twice")
        names.add(task.name)
        tasks.append(task)
    if (fields or template) and not adhoc:
        raise UsageError("--field and --template apply to KIND:SOURCE and YAML tasks (registered tasks have their own "
                         "mapping and template); give such a task or drop them")
    return tasks


def write_samples(path: str | Path, samples: Sequence[dict]) -> None:
    """One JSON line per example (a TaskResult's samples), the directory created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
