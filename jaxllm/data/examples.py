"""Records -> fixed-length rows, one builder per data format (the tokenise-and-pack step, run once per
source). A stage names the format it trains on (jaxllm/stages/); the formats are:

- text (pretraining): `{text_field: str}` -> BOS + text + EOS, long documents cut into seq_len chunks, packed.
- chat (SFT): `{"messages"}` or `{"prompt", "response"}` -> the chat template and mask (chat.py), truncated or
  dropped when longer than seq_len (data.truncation), packed when data.pack.
- pairs (DPO, reward models, ORPO, SimPO): `{"prompt", "chosen", "rejected"}` (strings or message lists, or two full conversations
  that differ only in the last assistant message) -> one pair per row, the answer tokens masked in.
- feedback (KTO): `{"prompt", "completion", "label"}` with label true/false (or 1/0/-1), or `{"prompt",
  "completion", "rating"}` where rating >= KTO_RATING_THRESHOLD (3, i.e. 3-5 on a 0-5 scale) is a thumbs
  up; preference records are accepted too (chosen -> +1, rejected -> -1). One example per row.
- prompts (on-policy RL): `{"prompt" | "messages", "reference"?}` -> prompt records (`load_prompts`).

Bad records raise DataError or are counted (data.on_bad_record); see report.py for the reasons.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxllm.data.chat import prompt_messages, record_to_messages, render_chats, validate_messages
from jaxllm.data.packing import PackedRows, pack_examples, split_into_chunks
from jaxllm.data.report import BadRecordPolicy, DataError, DataReport
from jaxllm.data.sources import Record
from jaxllm.data.tokenizer import Tokenizer

DATA_FORMATS = ("text", "chat", "pairs", "feedback", "prompts")
KTO_RATING_THRESHOLD = 3.0


@dataclasses.dataclass
class StageRows:
    """The packed rows of one stage: `parts` maps a key prefix ("" or "chosen_"/"rejected_") to rows."""

    stage: str
    parts: dict[str, PackedRows]
    labels: np.ndarray | None  # [rows] float32 (kto)
    report: DataReport

    @property
    def num_rows(self) -> int:
        return next(iter(self.parts.values())).num_rows

    def batch(self, rows: np.ndarray, join_documents: bool = False) -> dict[str, np.ndarray]:
        """A batch dict for these row indices (see jaxllm/data/pipeline.py for the keys and shapes);
        join_documents: one attention segment per row (see PackedRows.batch)."""
        batch: dict[str, np.ndarray] = {}
        for prefix, part in self.parts.items():
            batch.update(part.batch(rows, prefix, join_documents))
        if self.labels is not None:  # a padding row (negative index) has label 0: neither good nor bad
            rows = np.asarray(rows, dtype=np.int64)
            batch["label"] = np.where(rows >= 0, self.labels[np.maximum(rows, 0)], 0).astype(np.float32)
        return batch

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"{prefix or 'main_'}{name}": value for prefix, part in self.parts.items()
                  for name, value in part.arrays().items()}
        if self.labels is not None:
            arrays["labels"] = self.labels
        return arrays

    @classmethod
    def from_arrays(cls, stage: str, arrays: dict[str, np.ndarray], report: DataReport) -> "StageRows":
        parts = {}
        for prefix in ("main_", "chosen_", "rejected_"):
            if f"{prefix}tokens" in arrays:
                parts["" if prefix == "main_" else prefix] = PackedRows(
                    **{name: arrays[f"{prefix}{name}"] for name in ("tokens", "segment_ids", "loss_mask",
                                                                     "example_ids")})
        return cls(stage, parts, arrays.get("labels"), report)


def _lengths_summary(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    values = np.asarray(lengths)
    return {"min": int(values.min()), "mean": round(float(values.mean()), 1), "p50": int(np.percentile(values, 50)),
            "p90": int(np.percentile(values, 90)), "max": int(values.max())}


def _parse_all(records: list[Record], parse: Callable[[Record], Any], policy: BadRecordPolicy) -> list[tuple]:
    """Runs `parse` on every record; a DataError goes to the policy (raise or count)."""
    parsed = []
    for record in records:
        try:
            parsed.append((record, parse(record)))
        except DataError as error:
            policy.error(error)
    return parsed


def no_examples_error(report: DataReport) -> DataError:
    counts = {**report.bad_records, **report.dropped}
    detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items())) or "none"
    return DataError(f"{report.source}: no usable {report.stage} examples out of {report.records_read} records "
                     f"(skipped or dropped: {detail}). Check the record format for stage '{report.stage}' "
                     "(see jaxllm/data/examples.py) and data.seq_len")


# ----------------------------------------------------------------------------------------------
# Pretraining


def pretrain_rows(records: list[Record], tokenizer: Tokenizer, seq_len: int, pack: bool, text_field: str,
                  policy: BadRecordPolicy, report: DataReport) -> StageRows:
    def parse(record: Record) -> str:
        if text_field not in record.data:
            raise DataError(f"{record.where}: record has no field '{text_field}' (fields: "
                            f"{', '.join(sorted(record.data)) or 'none'}); set data.text_field", "missing_field")
        text = record.data[text_field]
        if not isinstance(text, str):
            raise DataError(f"{record.where}: field '{text_field}' must be a string, got {type(text).__name__}",
                            "wrong_type")
        return text

    parsed_all = _parse_all(records, parse, policy)
    parsed = [(record, text) for record, text in parsed_all if text.strip()]
    if len(parsed) < len(parsed_all):
        report.count_dropped("empty_text", len(parsed_all) - len(parsed))
    encoded = tokenizer.encode_batch([text for _, text in parsed])
    examples, example_ids, lengths = [], [], []
    for (record, _), ids in zip(parsed, encoded):
        document = [tokenizer.bos_id, *ids, tokenizer.eos_id]
        lengths.append(len(document))
        mask = [0] + [1] * (len(document) - 1)
        chunks = split_into_chunks(document, mask, seq_len)
        report.split_documents += len(chunks) > 1
        examples.extend(chunks)
        example_ids.extend([record.index] * len(chunks))
    report.examples = len(parsed)
    report.example_lengths = _lengths_summary(lengths)
    if not examples:
        raise no_examples_error(report)
    return StageRows("pretrain", {"": pack_examples(examples, example_ids, seq_len, pack)}, None, report)


# ----------------------------------------------------------------------------------------------
# SFT


def _fit(ids: list[int], mask: list[int], seq_len: int, truncation: str, where: str,
         policy: BadRecordPolicy, report: DataReport) -> tuple[list[int], list[int]] | None:
    """Applies the prompt-length check and the truncation policy; None = skipped."""
    first_target = next((i for i, m in enumerate(mask) if m and i > 0), None)
    if first_target is None:
        policy("no_loss_tokens", f"{where}: the example has no tokens to train on")
        return None
    if first_target >= seq_len:
        policy("prompt_too_long", f"{where}: the prompt is {first_target} tokens, not shorter than data.seq_len="
                                  f"{seq_len}, so no answer tokens are left; raise data.seq_len or shorten the prompt")
        return None
    if len(ids) <= seq_len:
        return ids, mask
    if truncation == "drop":
        report.count_dropped("too_long_dropped")
        return None
    report.truncated += 1
    return ids[:seq_len], mask[:seq_len]


def sft_rows(records: list[Record], tokenizer: Tokenizer, seq_len: int, pack: bool, mode: str, truncation: str,
             policy: BadRecordPolicy, report: DataReport) -> StageRows:
    parsed = _parse_all(records, lambda record: record_to_messages(record.data, record.where), policy)
    rendered = render_chats([messages for _, messages in parsed], tokenizer, mode)
    examples, example_ids, lengths = [], [], []
    for (record, _), (ids, mask) in zip(parsed, rendered):
        lengths.append(len(ids))
        fitted = _fit(ids, mask, seq_len, truncation, record.where, policy, report)
        if fitted is not None:
            examples.append(fitted)
            example_ids.append(record.index)
    report.examples = len(examples)
    report.example_lengths = _lengths_summary(lengths)
    if not examples:
        raise no_examples_error(report)
    return StageRows("sft", {"": pack_examples(examples, example_ids, seq_len, pack)}, None, report)


# ----------------------------------------------------------------------------------------------
# Preference pairs (dpo, reward) and binary feedback (kto)


def _answer(record: Record, field: str) -> tuple[list[dict], str]:
    """(messages before the answer, answer text) of a chosen/rejected/completion field."""
    if field not in record.data:
        raise DataError(f"{record.where}: record has no field '{field}' (fields: "
                        f"{', '.join(sorted(record.data)) or 'none'})", "missing_field")
    value = record.data[field]
    if isinstance(value, str):
        return [], value
    if isinstance(value, list):
        messages = validate_messages(value, record.where, field)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{record.where}: the last message of '{field}' must be the assistant's answer, "
                            f"got role '{messages[-1]['role']}'", "wrong_type")
        return messages[:-1], messages[-1]["content"]
    raise DataError(f"{record.where}: field '{field}' must be a string or a list of messages, "
                    f"got {type(value).__name__}", "wrong_type")


def _prompt_of(record: Record, prefix: list[dict]) -> list[dict]:
    base = prompt_messages(record.data, record.where) if ("prompt" in record.data or "messages" in record.data) else []
    messages = base + prefix
    if not messages:
        raise DataError(f"{record.where}: record has no field 'prompt' (and the answers carry no conversation)",
                        "missing_field")
    return messages


def _parse_pair(record: Record) -> tuple[list[dict], str, str]:
    chosen_prefix, chosen = _answer(record, "chosen")
    rejected_prefix, rejected = _answer(record, "rejected")
    if chosen_prefix != rejected_prefix:
        raise DataError(f"{record.where}: 'chosen' and 'rejected' conversations must be identical except for the "
                        "last assistant message", "wrong_type")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{record.where}: 'chosen' and 'rejected' are the same answer, so the pair carries no "
                        "preference; fix or remove the record", "chosen_equals_rejected")
    return _prompt_of(record, chosen_prefix), chosen, rejected


def _label(record: Record) -> float:
    data = record.data
    if "label" in data:
        value = data["label"]
        if isinstance(value, bool):
            return 1.0 if value else -1.0
        if isinstance(value, (int, float)) and value in (1, 0, -1):
            return 1.0 if value == 1 else -1.0
        raise DataError(f"{record.where}: field 'label' must be true/false (or 1, 0, -1), got {value!r}; "
                        f"put scalar scores in a 'rating' field (>= {KTO_RATING_THRESHOLD:g} counts as good)",
                        "wrong_type")
    if "rating" in data:
        value = data["rating"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{record.where}: field 'rating' must be a number, got {value!r}", "wrong_type")
        return 1.0 if value >= KTO_RATING_THRESHOLD else -1.0
    raise DataError(f"{record.where}: record has no field 'label' (true/false) or 'rating' (a number) "
                    f"(fields: {', '.join(sorted(data)) or 'none'})", "missing_field")


def _parse_feedback(record: Record) -> list[tuple[list[dict], str, float]]:
    if "chosen" in record.data and "rejected" in record.data and "completion" not in record.data:
        prompt, chosen, rejected = _parse_pair(record)
        return [(prompt, chosen, 1.0), (prompt, rejected, -1.0)]
    prefix, completion = _answer(record, "completion")
    return [(_prompt_of(record, prefix), completion, _label(record))]


def _prompt_answer_examples(items: list[tuple[Record, list[dict], list[str]]], tokenizer: Tokenizer):
    """Tokenises (record, prompt messages, answers) in two batched calls: prompt ids and answer ids."""
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:  # a model's own template (jaxllm.data.hf_tokenizer): answers end with its end of turn
        return [(record, template.prompt_ids(prompt), [template.answer_ids(prompt, answer) for answer in group])
                for record, prompt, group in items]
    prompts = render_chats([prompt for _, prompt, _ in items], tokenizer)
    answers = tokenizer.encode_batch([answer for _, _, group in items for answer in group])
    out, start = [], 0
    for (record, _, group), (prompt, _) in zip(items, prompts):
        prompt = prompt + [tokenizer.assistant_id]
        group_ids = [ids + [tokenizer.eos_id] for ids in answers[start:start + len(group)]]
        start += len(group)
        out.append((record, prompt, group_ids))
    return out


def preference_rows(records: list[Record], tokenizer: Tokenizer, seq_len: int, truncation: str, stage: str,
                    policy: BadRecordPolicy, report: DataReport) -> StageRows:
    parsed = _parse_all(records, _parse_pair, policy)
    tokenised = _prompt_answer_examples([(record, prompt, [chosen, rejected])
                                         for record, (prompt, chosen, rejected) in parsed], tokenizer)
    chosen_examples, rejected_examples, example_ids, lengths = [], [], [], []
    for record, prompt, (chosen, rejected) in tokenised:
        sides, truncated_before = [], report.truncated
        for answer in (chosen, rejected):
            ids, mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
            lengths.append(len(ids))
            fitted = _fit(ids, mask, seq_len, truncation, record.where, policy, report)
            if fitted is None:
                break
            sides.append(fitted)
        report.truncated = min(report.truncated, truncated_before + 1)  # a pair counts once
        if len(sides) < 2:
            continue
        if sides[0][0] == sides[1][0]:
            policy("chosen_equals_rejected", f"{record.where}: 'chosen' and 'rejected' are identical within "
                                             f"data.seq_len={seq_len} tokens after truncation; raise data.seq_len")
            continue
        chosen_examples.append(sides[0])
        rejected_examples.append(sides[1])
        example_ids.append(record.index)
    report.examples = len(example_ids)
    report.example_lengths = _lengths_summary(lengths)
    if not example_ids:
        raise no_examples_error(report)
    parts = {"chosen_": pack_examples(chosen_examples, example_ids, seq_len, pack=False),
             "rejected_": pack_examples(rejected_examples, example_ids, seq_len, pack=False)}
    return StageRows(stage, parts, None, report)


def feedback_rows(records: list[Record], tokenizer: Tokenizer, seq_len: int, truncation: str,
                  policy: BadRecordPolicy, report: DataReport) -> StageRows:
    parsed = _parse_all(records, _parse_feedback, policy)
    flat = [(record, prompt, [completion], label) for record, items in parsed for prompt, completion, label in items]
    tokenised = _prompt_answer_examples([(record, prompt, group) for record, prompt, group, _ in flat], tokenizer)
    examples, example_ids, labels, lengths = [], [], [], []
    for (record, prompt, (answer,)), (_, _, _, label) in zip(tokenised, flat):
        ids, mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
        lengths.append(len(ids))
        fitted = _fit(ids, mask, seq_len, truncation, record.where, policy, report)
        if fitted is not None:
            examples.append(fitted)
            example_ids.append(record.index)
            labels.append(label)
    report.examples = len(examples)
    report.example_lengths = _lengths_summary(lengths)
    if not examples:
        raise no_examples_error(report)
    label_array = np.asarray(labels, dtype=np.float32)
    report.notes.append(f"{int((label_array > 0).sum())} desirable, {int((label_array < 0).sum())} undesirable")
    return StageRows(report.stage, {"": pack_examples(examples, example_ids, seq_len, pack=False)}, label_array, report)


# ----------------------------------------------------------------------------------------------
# The row builders by data format, and the batch layout each one makes

RowBuilder = Callable[[list[Record], Tokenizer, Any, BadRecordPolicy, DataReport], StageRows]

ROW_BUILDERS: dict[str, RowBuilder] = {
    "text": lambda records, tok, data, policy, report: pretrain_rows(
        records, tok, data.seq_len, data.pack, data.text_field, policy, report),
    "chat": lambda records, tok, data, policy, report: sft_rows(
        records, tok, data.seq_len, data.pack, data.sft_mode, data.truncation, policy, report),
    "pairs": lambda records, tok, data, policy, report: preference_rows(
        records, tok, data.seq_len, data.truncation, report.stage, policy, report),
    "feedback": lambda records, tok, data, policy, report: feedback_rows(
        records, tok, data.seq_len, data.truncation, policy, report),
}

_ROW_FIELDS = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32, "loss_mask": np.float32}


def batch_spec(data_format: str, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one batch of packed rows of a format (without example_ids)."""
    if data_format not in ROW_BUILDERS:
        raise DataError(f"data format '{data_format}' has no packed rows; one of {', '.join(ROW_BUILDERS)}")
    prefixes = ("chosen_", "rejected_") if data_format == "pairs" else ("",)
    spec = {p + k: jax.ShapeDtypeStruct((batch_size, seq_len), d) for p in prefixes for k, d in _ROW_FIELDS.items()}
    if data_format == "feedback":
        spec["label"] = jax.ShapeDtypeStruct((batch_size,), np.float32)
    return spec


# ----------------------------------------------------------------------------------------------
# Prompts for on-policy RL


def parse_prompt_record(record: Record) -> dict[str, Any]:
    """{"id", "messages", "reference" (str or None), "where"} of a prompt record."""
    data = record.data
    messages = prompt_messages(data, record.where)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{record.where}: a prompt must not end with an assistant message (it is what the model "
                        "writes)", "wrong_type")
    reference = data.get("reference", data.get("answer"))
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{record.where}: field 'reference' must be a string, got {type(reference).__name__}",
                        "wrong_type")
    return {"id": record.index, "messages": messages, "reference": reference, "where": record.where}
