"""`jaxllm data generate`: build training data with a teacher model (any jaxllm checkpoint), batched.

Three modes (the lecture's ways to make data with a model rather than by hand):
- distill   knowledge distillation (Alpaca, Vicuna, s1): the teacher answers each prompt through the chat
            template -> {"messages": [...prompt..., {"role": "assistant", "content": answer}]}.
- continue  non-instructional fine-tuning data (Xie et al. 2024): each document is cut in half at the
            whitespace nearest its middle, the teacher continues the first half as plain text (no chat
            template) -> {"prompt": first half, "response": continuation}.
- rephrase  "Rephrasing the Web" (Maini et al. 2024): the teacher rewrites each document in a style,
            asked through the chat template -> {"text": rephrased, "original": document, "style": ...},
            a pretraining record (`jsonl:` source, text field "text").

Inputs: a .jsonl file ({"prompt"|"messages"|"question"|"text"}), a text file (distill: one prompt per
line; continue/rephrase: blank-line separated documents), or any data source (default:pretrain, ...).
Records are read as a stream and generated in blocks, sorted by length inside a block so batches
are padded little; outputs keep the input order. Answers that did not end (no EOS within
--max-new-tokens) are dropped in distill and rephrase modes unless --keep-unfinished; a report
counts what was written and why the rest was not.

    jaxllm data generate --teacher runs/sft --prompts questions.jsonl --out sft.jsonl --mode distill
    jaxllm data generate --teacher runs/pt --prompts default:pretrain --out nift.jsonl --mode continue
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from jaxllm.data import DataError
from jaxllm.data.chat import prompt_ids, prompt_messages
from jaxllm.data.sources import iter_records
from jaxllm.errors import UsageError
from jaxllm.generate import generate, load_model_for_inference
from jaxllm.lecture.selection import source_spec

MODES = ("distill", "continue", "rephrase")

# Rewrite instructions in the spirit of the paper's four styles (our own wording).
REPHRASE_STYLES = {
    "wikipedia": "Rewrite the following text as clear, well-formed prose in the style of an encyclopedia "
                 "article. Keep every fact.",
    "easy": "Rewrite the following text in very simple words that a young child could understand. Keep every fact.",
    "hard": "Rewrite the following text in terse, precise, formal language, as in a scholarly paper. "
            "Keep every fact.",
    "qa": "Turn the following text into questions and answers, one pair per line, written as "
          "'Question: ... Answer: ...'. Cover every fact.",
}


# ----------------------------------------------------------------------------------------------
# Batched generation with any loaded model (also used by jaxllm.lecture.analysis).


@dataclasses.dataclass
class Completion:
    ids: list  # generated token ids, without the stop token
    text: str
    finished: bool  # ended with a stop token (else it ran out of max_new_tokens)


def batched_generate(model, prompts: Sequence[Sequence[int]], settings, *, batch_size: int = 32,
                     seed: int = 0) -> list[Completion]:
    """Completions of token-id prompts, in prompt order. `model` is (config, graphdef, params, tokenizer) as
    `jaxllm.generate.load_model_for_inference` returns; `settings` a `jaxllm.generate.SamplingSettings`.
    Prompts are sorted by length and generated `batch_size` at a time; batch b samples with
    fold_in(key(seed), b), so the same call gives the same answers."""
    import jax

    config, graphdef, params, tokenizer = model
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    for number, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start:start + batch_size]
        result = generate(config.model, graphdef, params, [prompts[i] for i in chunk], settings,
                          jax.random.fold_in(jax.random.key(seed), number), pad_id=tokenizer.pad_id)
        for row, index in enumerate(chunk):
            ids = result.completion(row)
            out[index] = Completion(ids, tokenizer.decode(ids), bool(result.finished[row]))
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Requests: what the teacher is asked, and how its answer becomes a record.


@dataclasses.dataclass
class Request:
    index: int  # input record number
    where: str
    prompt_ids: list
    make_record: Callable[[str], dict]  # the teacher's answer -> the output record


def split_in_half(text: str) -> tuple[str, str] | None:
    """(first half, second half) cut at the whitespace nearest the middle character; None without whitespace."""
    middle = len(text) // 2
    spaces = [i for i, ch in enumerate(text) if ch.isspace()]
    inner = [i for i in spaces if text[:i].strip() and text[i:].strip()]
    if not inner:
        return None
    cut = min(inner, key=lambda i: (abs(i - middle), i))
    return text[:cut].rstrip(), text[cut:].lstrip()


def request_messages(data: dict, where: str) -> list[dict]:
    """Distillation prompt: the conversation up to (not including) a trailing assistant answer."""
    if "messages" not in data and "prompt" not in data:
        for field in ("question", "instruction", "text"):
            if isinstance(data.get(field), str):
                return [{"role": "user", "content": data[field]}]
        raise DataError(f"{where}: a prompt record needs 'prompt', 'messages', 'question' or 'text' "
                        f"(fields: {', '.join(sorted(data)) or 'none'})", "missing_field")
    messages = prompt_messages(data, where)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the conversation must end with a user message for the teacher to answer",
                        "missing_field")
    return messages


def _document(data: dict, where: str, text_field: str) -> str:
    value = data.get(text_field)
    if not isinstance(value, str):
        raise DataError(f"{where}: needs a string field '{text_field}' holding the document "
                        f"(fields: {', '.join(sorted(data)) or 'none'}); set --text-field", "missing_field")
    return value


def build_request(record, mode: str, tokenizer, room: int, *, instruction: str = "", style: str = "",
                  text_field: str = "text") -> tuple[Request | None, str]:
    """(the request, "") or (None, why it was skipped). `room`: the most prompt tokens that still leave
    room for max_new_tokens within model.max_seq_len."""
    data, where = record.data, record.where
    if mode == "distill":
        messages = request_messages(data, where)
        ids = prompt_ids(messages, tokenizer)
        if len(ids) > room:
            return None, "prompt_too_long"
        return Request(record.index, where, ids,
                       lambda answer: {"messages": messages + [{"role": "assistant", "content": answer}]}), ""
    document = _document(data, where, text_field).strip()
    if mode == "continue":
        halves = split_in_half(document)
        if halves is None:
            return None, "too_short"
        first, _ = halves
        context = tokenizer.encode(first)
        ids = [tokenizer.bos_id] + context[max(0, len(context) - (room - 1)):]  # the words nearest the cut
        return Request(record.index, where, ids, lambda answer: {"prompt": first, "response": answer}), ""
    if mode == "rephrase":
        if not document:
            return None, "empty_text"
        ids = prompt_ids([{"role": "user", "content": f"{instruction}\n\n{document}"}], tokenizer)
        if len(ids) > room:
            return None, "prompt_too_long"
        return Request(record.index, where, ids,
                       lambda answer: {"text": answer, "original": document, "style": style or "custom"}), ""
    raise UsageError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")


def read_inputs(path_or_source: str, mode: str, text_field: str = "text") -> Iterator:
    """Input records as a stream (jaxllm.data.sources.Record). A plain text file holds one prompt per line
    in distill mode and blank-line separated documents otherwise. A missing input fails here, at once."""
    spec = source_spec(path_or_source)
    if mode == "distill" and spec.startswith("text:") and Path(spec[5:]).is_file():
        return iter_records(f"lines:{spec[5:]}", "prompt")
    return iter_records(spec, text_field)


@dataclasses.dataclass
class TeacherSettings:
    mode: str = "distill"
    style: str = "wikipedia"  # rephrase: one of REPHRASE_STYLES
    instruction: str = ""  # rephrase: a custom instruction instead of the style's
    samples: int = 1  # answers per prompt
    batch_size: int = 32
    block: int = 512  # requests generated (and written) together
    keep_unfinished: bool | None = None  # None: keep them only in continue mode
    text_field: str = "text"
    limit: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.mode == "rephrase" and not self.instruction and self.style not in REPHRASE_STYLES:
            raise UsageError(f"unknown rephrase style '{self.style}'; choose one of {', '.join(REPHRASE_STYLES)} "
                             "or give --instruction")
        for name in ("samples", "batch_size", "block"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def keeps_unfinished(self) -> bool:
        return self.mode == "continue" if self.keep_unfinished is None else self.keep_unfinished


def generate_data(model, records: Iterable, sampling, settings: TeacherSettings, out: str | Path,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the teacher over `records`, writes the output JSONL to `out` and returns a report
    {read, requests, written, skipped: {reason: count}, generated_tokens, seconds, tokens_per_second}."""
    settings.validate()
    config, _, _, tokenizer = model
    room = config.model.max_seq_len - sampling.max_new_tokens
    if room < 2:
        raise UsageError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt within "
                         f"model.max_seq_len={config.model.max_seq_len}; lower it")
    instruction = settings.instruction or REPHRASE_STYLES.get(settings.style, "")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped: collections.Counter = collections.Counter()
    report = {"mode": settings.mode, "read": 0, "requests": 0, "written": 0, "generated_tokens": 0,
              "unfinished_kept": 0}
    started = time.perf_counter()
    block_number = 0

    def flush(block: list[Request], handle) -> None:
        nonlocal block_number
        prompts = [request.prompt_ids for request in block for _ in range(settings.samples)]
        completions = batched_generate(model, prompts, sampling, batch_size=settings.batch_size,
                                       seed=settings.seed * 1_000_003 + block_number)
        block_number += 1
        for position, completion in enumerate(completions):
            request = block[position // settings.samples]
            report["generated_tokens"] += len(completion.ids) + int(completion.finished)
            answer = completion.text.strip()
            if not answer:
                skipped["empty_answer"] += 1
                continue
            if not completion.finished:
                if not settings.keeps_unfinished:
                    skipped["unfinished"] += 1
                    continue
                report["unfinished_kept"] += 1
            handle.write(json.dumps(request.make_record(answer), ensure_ascii=False) + "\n")
            report["written"] += 1
        log(f"{settings.mode}: {report['read']} read, {report['written']} written, "
            f"{sum(skipped.values())} skipped ({time.perf_counter() - started:.0f} s)")

    with out.open("w", encoding="utf-8") as handle:
        block: list[Request] = []
        for record in records:
            if settings.limit is not None and report["read"] >= settings.limit:
                break
            report["read"] += 1
            request, reason = build_request(record, settings.mode, tokenizer, room, instruction=instruction,
                                            style=settings.style if not settings.instruction else "custom",
                                            text_field=settings.text_field)
            if request is None:
                skipped[reason] += 1
                continue
            block.append(request)
            report["requests"] += 1
            if len(block) * settings.samples >= settings.block:
                flush(block, handle)
                block = []
        if block:
            flush(block, handle)
    if report["read"] == 0:
        raise UsageError("the input holds no records")
    seconds = time.perf_counter() - started
    report.update(skipped=dict(skipped), seconds=seconds, tokens_per_second=report["generated_tokens"] / seconds,
                  out=str(out))
    return report


def stop_ids_for(mode: str, tokenizer) -> tuple[int, ...]:
    """Token ids that end an answer besides EOS: in the chat modes a new user turn ends it too."""
    return () if mode == "continue" else (tokenizer.user_id,)


__all__ = ["MODES", "REPHRASE_STYLES", "Completion", "batched_generate", "Request", "request_messages",
           "split_in_half", "build_request", "read_inputs", "TeacherSettings", "generate_data",
           "stop_ids_for"]
