"""Reading documents one at a time from JSONL records or plain text files (optionally .gz).

A path may be a file or a directory (its files, sorted, recursively; hidden files skipped).
Files ending in .jsonl / .ndjson / .json (optionally .gz) hold one JSON object per line with the text
under `text_field`; any other file is plain text, split into documents by `text_unit`:
"file" (the whole file), "paragraph" (blank-line separated) or "line".
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, NamedTuple

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_UNITS = ("file", "paragraph", "line")


class InputError(ValueError):
    """Bad input data; the message names the file (and line) and what to do."""


class Record(NamedTuple):
    source: str  # "path:line" (JSONL / paragraph / line) or "path" (whole file)
    raw: str | None  # the JSON line, still to be parsed (JSONL input)
    text: str | None  # the document (plain text input)
    size: int  # bytes read for this record


def is_jsonl(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(JSONL_SUFFIXES)


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not inside:
                raise InputError(f"input directory {path} holds no files")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"input {path} does not exist (give JSONL or text files, or directories of them)")
    return files


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def iter_records(paths: Sequence[str | Path], text_unit: str = "file") -> Iterator[Record]:
    """Records in input order; JSONL lines are left unparsed (the workers parse them)."""
    if text_unit not in TEXT_UNITS:
        raise InputError(f"text unit '{text_unit}' is not one of {', '.join(TEXT_UNITS)}")
    for path in expand_paths(paths):
        with _open(path) as handle:
            if is_jsonl(path):
                for number, data in enumerate(handle, 1):
                    if data.strip():
                        yield Record(f"{path}:{number}", _decode(data, f"{path}:{number}"), None, len(data))
            elif text_unit == "file":
                data = handle.read()
                yield Record(str(path), None, _decode(data, str(path)), len(data))
            elif text_unit == "line":
                for number, data in enumerate(handle, 1):
                    text = _decode(data, f"{path}:{number}").strip()
                    if text:
                        yield Record(f"{path}:{number}", None, text, len(data))
            else:
                lines: list[str] = []
                first = size = 0
                for number, data in enumerate(handle, 1):
                    line = _decode(data, f"{path}:{number}")
                    if line.strip():
                        if not lines:
                            first = number
                        lines.append(line)
                        size += len(data)
                    elif lines:
                        yield Record(f"{path}:{first}", None, "".join(lines).strip(), size)
                        lines, size = [], 0
                if lines:
                    yield Record(f"{path}:{first}", None, "".join(lines).strip(), size)


def parse_json_text(raw: str, text_field: str, where: str) -> str:
    """The text field of one JSONL line; InputError (with file:line) when it is malformed."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with a '{text_field}' field, got {type(record).__name__}")
    text = record.get(text_field)
    if not isinstance(text, str):
        present = ", ".join(sorted(record)) or "none"
        problem = "is missing" if text_field not in record else f"is a {type(text).__name__}, not a string"
        raise InputError(f"{where}: the text field '{text_field}' {problem} (fields: {present}); "
                         "pick the field with --text-field")
    return text


def iter_texts(paths: Sequence[str | Path], text_field: str = "text", text_unit: str = "file") -> Iterator[str]:
    """Document texts, parsed in this process (for small inputs such as classifier training sets)."""
    for record in iter_records(paths, text_unit):
        yield record.text if record.raw is None else parse_json_text(record.raw, text_field, record.source)
