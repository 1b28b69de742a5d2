"""Data errors and the data report: what was read, kept, truncated, dropped and why.

Every user-facing data failure is a `DataError` (a `ValueError`) whose message names the source,
the record (file and line where there is one) and what to do. With `data.on_bad_record: skip` the
same failures are counted per reason in a `DataReport` instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from jaxllm.errors import DataError  # noqa: F401  (re-exported: jaxllm.data.DataError)




# Reasons a record is rejected (bad input) or dropped (a policy decision); the report counts both.
BAD_RECORD_REASONS = (
    "malformed_json", "not_utf8", "missing_field", "wrong_type", "unknown_role", "empty_text",
    "prompt_too_long", "chosen_equals_rejected", "no_loss_tokens",
)
DROP_REASONS = ("too_long_dropped", "held_out_for_eval", "empty_text")

_MAX_EXAMPLE_MESSAGES = 5


@dataclasses.dataclass
class DataReport:
    """Counts for one pipeline build; `to_dict()` is JSON-serialisable."""

    source: str = ""
    stage: str = ""
    split: str = "train"
    seq_len: int = 0
    records_read: int = 0
    examples: int = 0  # records (or documents) that made it into rows
    rows: int = 0
    sequences_per_row: int = 1  # 2 for preference pairs: a chosen and a rejected sequence per row
    tokens: int = 0  # non-pad tokens in the rows
    loss_tokens: int = 0  # tokens with loss_mask == 1
    truncated: int = 0  # examples cut to seq_len (truncation: truncate)
    split_documents: int = 0  # pretraining documents longer than seq_len cut into several chunks
    bad_records: Counter = dataclasses.field(default_factory=Counter)
    dropped: Counter = dataclasses.field(default_factory=Counter)
    example_lengths: dict = dataclasses.field(default_factory=dict)  # tokens per example: min/mean/p50/p90/max
    messages: list = dataclasses.field(default_factory=list)  # the first few skip messages, verbatim
    notes: list = dataclasses.field(default_factory=list)

    def count_bad(self, reason: str, message: str) -> None:
        self.bad_records[reason] += 1
        if len(self.messages) < _MAX_EXAMPLE_MESSAGES:
            self.messages.append(message)

    def count_dropped(self, reason: str, amount: int = 1) -> None:
        self.dropped[reason] += amount

    @property
    def packing_efficiency(self) -> float:
        """Fraction of row slots holding real (non-pad) tokens."""
        capacity = self.rows * self.seq_len * self.sequences_per_row
        return self.tokens / capacity if capacity else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "stage": self.stage, "split": self.split, "seq_len": self.seq_len,
            "records_read": self.records_read, "examples": self.examples, "rows": self.rows,
            "sequences_per_row": self.sequences_per_row, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
            "pad_tokens": self.rows * self.seq_len * self.sequences_per_row - self.tokens,
            "packing_efficiency": round(self.packing_efficiency, 4), "truncated": self.truncated,
            "split_documents": self.split_documents, "bad_records": dict(sorted(self.bad_records.items())),
            "dropped": dict(sorted(self.dropped.items())), "example_lengths": dict(self.example_lengths),
            "messages": list(self.messages), "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataReport":
        report = cls(**{k: data[k] for k in ("source", "stage", "split", "seq_len", "records_read", "examples",
                                             "rows", "sequences_per_row", "tokens", "loss_tokens", "truncated",
                                             "split_documents")})
        report.bad_records = Counter(data.get("bad_records", {}))
        report.dropped = Counter(data.get("dropped", {}))
        report.example_lengths = dict(data.get("example_lengths", {}))
        report.messages = list(data.get("messages", []))
        report.notes = list(data.get("notes", []))
        return report


class BadRecordPolicy:
    """Raises or counts a bad record according to `data.on_bad_record` (fail | skip)."""

    def __init__(self, on_bad_record: str, report: DataReport):
        if on_bad_record not in ("fail", "skip"):
            raise DataError(f"data.on_bad_record='{on_bad_record}' must be 'fail' or 'skip'")
        self.skip = on_bad_record == "skip"
        self.report = report

    def __call__(self, reason: str, message: str) -> None:
        """Call for a bad record: raises DataError (fail) or counts it (skip) and returns."""
        if not self.skip:
            raise DataError(message + " (or set data.on_bad_record=skip to skip and count such records)", reason)
        self.report.count_bad(reason, message)

    def error(self, error: "DataError") -> None:
        """Routes a DataError raised while parsing one record."""
        self(error.reason or "wrong_type", str(error))


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable rendering of `DataReport.to_dict()`."""
    lines = [
        f"source            {report['source']}  (stage {report['stage']}, split {report['split']})",
        f"records read      {report['records_read']}",
        f"examples used     {report['examples']}",
        f"rows              {report['rows']} x seq_len {report['seq_len']}"
        + (" (a chosen and a rejected sequence per row)" if report.get("sequences_per_row", 1) == 2 else ""),
        f"tokens            {report['tokens']} ({report['loss_tokens']} with loss, {report['pad_tokens']} pad)",
        f"packing efficiency {report['packing_efficiency']:.1%}",
        f"truncated         {report['truncated']}",
        f"split documents   {report['split_documents']} (longer than seq_len, cut into chunks)",
    ]
    if report.get("example_lengths"):
        lengths = report["example_lengths"]
        lines.append("tokens/example    " + ", ".join(f"{key} {value}" for key, value in lengths.items()))
    for title, key in (("bad records", "bad_records"), ("dropped", "dropped")):
        counts = report[key]
        total = sum(counts.values())
        detail = ", ".join(f"{reason}: {count}" for reason, count in counts.items())
        lines.append(f"{title:<17} {total}" + (f" ({detail})" if detail else ""))
    for message in report.get("messages", []):
        lines.append(f"  e.g. {message}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
