"""Data sources: where records come from. Every source yields plain dict records.

Source specs (the value of `data.source` / `data.eval_source`):
- `default:NAME`   a set embedded in the package (jaxllm/data/default/NAME.jsonl); `list_default_sets()`.
- `text:PATH`      a file: one document per blank-line-separated block; a directory: one document per
                   file (recursive, sorted, hidden files skipped). Records are {text_field: document}.
- `lines:FILE`     one record per non-empty line of a text file (prompts, questions): {text_field: line}.
- `jsonl:PATH`     one JSON object per line (blank lines ignored); a directory: all *.jsonl, sorted.
- `parquet:PATH`   a Parquet file or a directory of *.parquet, read with pyarrow (optional dependency);
                   the row count is checked against the file metadata.
- `tfds:NAME[/CONFIG][:SPLIT]`  a prepared TensorFlow-Datasets dataset in array_record format, read with
                   `tfds.data_source` (no TensorFlow needed; never downloads). The data dir is
                   $TFDS_DATA_DIR or TFDS's default. `tfds:/path/to/name/version[:SPLIT]` reads a dataset
                   directory directly. SPLIT defaults to train and may be a slice ("train[:90%]").
                   Text comes back as bytes and is decoded as UTF-8; a Sequence of dicts (e.g. messages)
                   comes back as a list of dicts.

`jaxllm.data.tfds_writer.build_tfds_from_jsonl` turns local JSONL into such a TFDS dataset (offline).

`iter_documents(paths, text_unit)` streams documents from files and directories given as plain paths
(JSONL by suffix, optionally .gz; other files are plain text split by TEXT_UNITS), for `jaxllm data filter`
and the quality classifier: memory stays flat whatever the input size.

Record ids: the 0-based ordinal of the record in its source (JSONL: the n-th non-blank line; text:
the n-th document; tfds: the index in the split). Batches carry them as `example_ids`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np

from jaxllm.data.report import DataError

SOURCE_KINDS = ("default", "text", "lines", "jsonl", "parquet", "tfds")
DEFAULT_DIR = "default"
# An eval set paired with a default training set (used when data.eval_source is empty).
DEFAULT_EVAL_PAIRS = {
    "pretrain": "pretrain_eval", "sft": "sft_eval", "preferences": "preferences_eval",
    "feedback": "feedback_eval", "rl_prompts": "qa_eval",
}

# A callback for bad records: called with (reason, message); raises (fail) or returns (skip).
BadRecord = Callable[[str, str], None]


@dataclasses.dataclass
class Record:
    index: int  # the record id (see the module docstring)
    data: dict[str, Any]
    where: str  # "file.jsonl:17" style, for messages
    raw: str | None = None  # the JSON line as read (iter_documents), to write a kept record back unchanged
    size: int = 0  # bytes read for this record (iter_documents)


def _fail(reason: str, message: str) -> None:
    raise DataError(message, reason)


def parse_source(spec: str) -> tuple[str, str]:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or not rest:
        raise DataError(f"data source '{spec}' is not understood: use one of "
                        "default:NAME, text:PATH, lines:FILE, jsonl:PATH, parquet:PATH, tfds:NAME/CONFIG:SPLIT")
    return kind, rest


# ----------------------------------------------------------------------------------------------
# Embedded default sets


def _default_root():
    return resources.files("jaxllm.data").joinpath(DEFAULT_DIR)


def list_default_sets() -> list[str]:
    return sorted(entry.name[:-len(".jsonl")] for entry in _default_root().iterdir()
                  if entry.name.endswith(".jsonl"))


def _default_bytes(name: str) -> bytes:
    entry = _default_root().joinpath(f"{name}.jsonl")
    if not entry.is_file():
        raise DataError(f"there is no embedded data set '{name}'; available: {', '.join(list_default_sets())}")
    return entry.read_bytes()


# ----------------------------------------------------------------------------------------------
# Files


def _decode_line(raw: bytes, where: str, on_bad: BadRecord) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        on_bad("not_utf8", f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                           "re-encode the file as UTF-8")
        return None


def _jsonl_records(data: bytes, name: str, start_index: int, on_bad: BadRecord) -> Iterator[Record]:
    index = start_index
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{name}:{line_number}"
        record_index, index = index, index + 1
        line = _decode_line(raw, where, on_bad)
        value = None if line is None else _json_object(line, where, on_bad)
        if value is not None:
            yield Record(record_index, value, where)


def _json_object(line: str, where: str, on_bad: BadRecord) -> dict[str, Any] | None:
    """One JSONL line as a dict; None (after `on_bad`) when it is not a JSON object of text."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        on_bad("malformed_json", f"{where}: not valid JSON ({error.msg} at column {error.colno})")
        return None
    if not isinstance(value, dict):
        on_bad("wrong_type", f"{where}: each line must be a JSON object, got {type(value).__name__}")
        return None
    if "\\u" in line:  # escapes like "\ud800" decode to lone surrogates, which are not text
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            on_bad("not_utf8", f"{where}: a string holds a lone surrogate escape (like \\ud800), which is "
                               "not text; fix or drop the line")
            return None
    return value


def data_files(path: Path, kind: str) -> list[Path]:
    """The *.{kind} files of a directory (sorted, hidden ones left out), or the one file; missing is an error."""
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*.{kind}") if not p.name.startswith("."))
        if not files:
            raise DataError(f"{kind}:{path}: the directory holds no *.{kind} files")
        return files
    if not path.is_file():
        raise DataError(f"{kind}:{path}: no such file or directory")
    return [path]


def _parquet_records(files: list[Path]) -> Iterator[Record]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError("parquet sources need pyarrow: pip install pyarrow (or convert the data to JSONL)") from None
    index = 0
    for path in files:
        try:
            handle = parquet.ParquetFile(path)
        except Exception as error:
            raise DataError(f"parquet:{path}: cannot read the file: {error}") from None
        expected, seen = handle.metadata.num_rows, 0
        for batch in handle.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield Record(index, row, f"{path} row {seen}")
                index, seen = index + 1, seen + 1
        if seen != expected:
            raise DataError(f"parquet:{path}: read {seen} rows but the file metadata says {expected}; "
                            "the file is damaged or was written incompletely")


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not path.is_file():
        raise DataError(f"text:{path}: no such file or directory")
    return [path]


def _text_block_records(data: bytes, name: str, text_field: str, on_bad: BadRecord) -> Iterator[Record]:
    """Documents separated by blank lines; a line that is not UTF-8 is reported (or skipped)."""
    block: list[str] = []
    start_line = 1
    index = 0
    lines = data.split(b"\n")
    for line_number, raw in enumerate(lines + [b""], start=1):
        line = _decode_line(raw.rstrip(b"\r"), f"{name}:{line_number}", on_bad) if raw.strip() else ""
        if line is None:
            continue
        if line.strip():
            if not block:
                start_line = line_number
            block.append(line)
        elif block:
            yield Record(index, {text_field: "\n".join(block)}, f"{name}:{start_line}")
            index += 1
            block = []


def _lines_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"lines:{path}: no such file")
    return path


def _line_records(path: Path, text_field: str, on_bad: BadRecord) -> Iterator[Record]:
    """One record per non-empty line of a text file (prompts, questions), `where` = file:line."""
    _lines_file(path)
    index = 0
    for line_number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        line = _decode_line(raw.rstrip(b"\r"), f"{path}:{line_number}", on_bad) if raw.strip() else None
        if line is not None:
            yield Record(index, {text_field: line.strip()}, f"{path}:{line_number}")
            index += 1


def _text_dir_records(files: list[Path], text_field: str, on_bad: BadRecord) -> Iterator[Record]:
    for index, path in enumerate(files):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw[:error.start].count(b"\n") + 1
            on_bad("not_utf8", f"{path}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); "
                               "re-encode the file as UTF-8")
            continue
        yield Record(index, {text_field: text}, str(path))


# ----------------------------------------------------------------------------------------------
# Documents from plain paths, streamed (`jaxllm data filter`, the quality classifier)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_UNITS = ("file", "paragraph", "line")  # how a plain text file splits into documents


def is_jsonl(path: Path) -> bool:
    """JSONL by its suffix (.jsonl / .ndjson / .json, optionally .gz); anything else is plain text."""
    return path.name.lower().removesuffix(".gz").endswith(JSONL_SUFFIXES)


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files given and files inside directories given (sorted, recursive, hidden files skipped)."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = _text_files(path)
            if not inside:
                raise DataError(f"input directory {path} holds no files")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist (give JSONL or text files, or directories of them)")
    return files


def _open_stream(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _stream_jsonl(path: Path, handle: IO[bytes], on_bad: BadRecord) -> Iterator[tuple[str, str, int, dict | None]]:
    for number, data in enumerate(handle, 1):
        if data.strip():
            where = f"{path}:{number}"
            line = _decode_line(data, where, on_bad)
            if line is not None:
                yield where, line, len(data), _json_object(line, where, on_bad)


def _stream_paragraphs(path: Path, handle: IO[bytes], on_bad: BadRecord) -> Iterator[tuple[str, str, int]]:
    lines: list[str] = []
    first = size = 0
    for number, data in enumerate(handle, 1):
        line = _decode_line(data, f"{path}:{number}", on_bad)
        if line is None:
            continue
        if line.strip():
            if not lines:
                first = number
            lines.append(line)
            size += len(data)
        elif lines:
            yield f"{path}:{first}", "".join(lines).strip(), size
            lines, size = [], 0
    if lines:
        yield f"{path}:{first}", "".join(lines).strip(), size


def _stream_file(path: Path, handle: IO[bytes], text_unit: str,
                 on_bad: BadRecord) -> Iterator[tuple[str, str | None, int, dict | str | None]]:
    """(where, raw JSON line or None, bytes, parsed object or document text) of one file."""
    if is_jsonl(path):
        yield from _stream_jsonl(path, handle, on_bad)
    elif text_unit == "file":
        data = handle.read()
        text = _decode_line(data, str(path), on_bad)
        if text is not None:
            yield str(path), None, len(data), text
    elif text_unit == "line":
        for number, data in enumerate(handle, 1):
            text = _decode_line(data, f"{path}:{number}", on_bad)
            if text is not None and text.strip():
                yield f"{path}:{number}", None, len(data), text.strip()
    else:
        for where, text, size in _stream_paragraphs(path, handle, on_bad):
            yield where, None, size, text


def iter_documents(paths: Sequence[str | Path], text_unit: str = "file", text_field: str = "text",
                   on_bad: BadRecord = _fail) -> Iterator[Record]:
    """Records of files and directories in input order, read line by line (gzip too). A JSONL line keeps its
    `raw` text; a plain text document (a whole file, a blank-line-separated paragraph or a line, by
    `text_unit`) becomes {text_field: text}. Bad lines go to `on_bad(reason, message)` (default: raise)."""
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text unit '{text_unit}' is not one of {', '.join(TEXT_UNITS)}")
    index = 0
    for path in expand_paths(paths):
        with _open_stream(path) as handle:
            for where, raw, size, value in _stream_file(path, handle, text_unit, on_bad):
                if value is not None:
                    data = value if isinstance(value, dict) else {text_field: value}
                    yield Record(index, data, where, raw, size)
                    index += 1


def record_text(record: Record, text_field: str = "text") -> str:
    """The document text of a record; DataError (naming the record) when the field is missing or not text."""
    text = record.data.get(text_field)
    if not isinstance(text, str):
        present = ", ".join(sorted(record.data)) or "none"
        missing = text_field not in record.data
        problem = "is missing" if missing else f"is a {type(text).__name__}, not a string"
        raise DataError(f"{record.where}: the text field '{text_field}' {problem} (fields: {present}); "
                        "pick the field with --text-field", "missing_field" if missing else "wrong_type")
    return text


# ----------------------------------------------------------------------------------------------
# Public API


def iter_records(spec: str, text_field: str = "text", on_bad: BadRecord = _fail) -> Iterator[Record]:
    """Records of a source in order; bad lines go to `on_bad(reason, message)` (default: raise)."""
    kind, rest = parse_source(spec)
    if kind == "default":
        yield from _jsonl_records(_default_bytes(rest), f"default:{rest}", 0, on_bad)
    elif kind == "jsonl":
        index = 0
        for path in data_files(Path(rest), "jsonl"):
            data = path.read_bytes()
            yield from _jsonl_records(data, str(path), index, on_bad)
            index += sum(1 for raw in data.split(b"\n") if raw.strip())
    elif kind == "parquet":
        yield from _parquet_records(data_files(Path(rest), "parquet"))
    elif kind == "lines":
        yield from _line_records(Path(rest), text_field, on_bad)
    elif kind == "text":
        path = Path(rest)
        files = _text_files(path)
        if path.is_dir():
            yield from _text_dir_records(files, text_field, on_bad)
        else:
            yield from _text_block_records(path.read_bytes(), str(path), text_field, on_bad)
    else:
        from jaxllm.data.tfds_source import tfds_records  # TFDS is heavy to import: only for tfds: sources

        for index, data, where in tfds_records(rest, on_bad):
            yield Record(index, data, where)


def read_records(spec: str, text_field: str = "text", on_bad: BadRecord = _fail) -> list[Record]:
    """All records of a source; an empty source is an error."""
    records = list(iter_records(spec, text_field, on_bad))
    if not records:
        raise DataError(f"data source '{spec}' has no records (it is empty, or every record was bad and skipped)")
    return records


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "role":
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def read_texts(spec: str, text_field: str = "text") -> Iterator[str]:
    """Every piece of text in a source (for tokenizer training): the text field, else all string values."""
    for record in iter_records(spec, text_field):
        if isinstance(record.data.get(text_field), str):
            yield record.data[text_field]
        else:
            yield from (text for text in _strings(record.data) if text.strip())


def file_content_digest(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """blake2b-128 of a file's bytes, read in 4 MiB chunks (~1 GB/s on one core)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(spec: str) -> str:
    """Changes when the source's content changed: a hash of every byte of local files (a rewrite that keeps
    size and modification time is seen too), the TFDS split's size otherwise."""
    kind, rest = parse_source(spec)
    parts: list[str] = [spec]
    if kind == "default":
        parts.append(hashlib.sha256(_default_bytes(rest)).hexdigest())
    elif kind in ("jsonl", "parquet", "text", "lines"):
        path = Path(rest)
        files = [_lines_file(path)] if kind == "lines" else _text_files(path) if kind == "text" else \
            data_files(path, kind)
        for file in files:
            parts.append(f"{file.resolve()}:{file_content_digest(file)}")
    else:
        from jaxllm.data.tfds_source import open_tfds

        source, label = open_tfds(rest)
        parts.append(f"{label}:{len(source)}:{os.environ.get('TFDS_DATA_DIR', '')}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def default_eval_source(spec: str) -> str | None:
    """The embedded eval set paired with a default training set, if any."""
    kind, rest = parse_source(spec)
    if kind == "default" and rest in DEFAULT_EVAL_PAIRS:
        return f"default:{DEFAULT_EVAL_PAIRS[rest]}"
    return None


def lookup_records(spec: str, example_ids: Sequence[int], text_field: str = "text") -> dict[int, Record]:
    """The source records behind some example ids (e.g. a loss spike's batch); ids < 0 are ignored."""
    wanted = {int(i) for i in np.asarray(example_ids).ravel() if int(i) >= 0}
    found = {}
    for record in iter_records(spec, text_field, on_bad=lambda reason, message: None):
        if record.index in wanted:
            found[record.index] = record
            if len(found) == len(wanted):
                break
    return found
