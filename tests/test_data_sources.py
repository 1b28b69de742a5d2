"""Local sources: text files (blank-line blocks or one document per file) and JSONL files or directories."""

import json

import pytest

from jaxllm.data import read_records
from jaxllm.data.sources import lookup_records, source_fingerprint
from jaxllm.errors import DataError


def test_text_file_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\n\n\n  \nnext doc\r\n\nlast")
    records = read_records(f"text:{path}")
    assert [r.data["text"] for r in records] == ["first line\nsecond line", "next doc", "last"]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:6", f"{path}:8"]


def test_text_directory_is_one_document_per_file_sorted_without_hidden_files(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("ay\n\nstill ay")
    (tmp_path / ".hidden").write_text("no")
    records = read_records(f"text:{tmp_path}", text_field="body")
    assert [r.data for r in records] == [{"body": "bee"}, {"body": "ay\n\nstill ay"}]


def test_jsonl_directory_numbers_records_across_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "three"}')
    records = read_records(f"jsonl:{tmp_path}")
    assert [(r.index, r.data["text"]) for r in records] == [(0, "one"), (1, "two"), (2, "three")]
    assert lookup_records(f"jsonl:{tmp_path}", [2, -1])[2].data["text"] == "three"


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "one"}))
    before = source_fingerprint(f"jsonl:{path}")
    path.write_text(json.dumps({"text": "one, edited"}))
    assert source_fingerprint(f"jsonl:{path}") != before


def test_parquet_files_are_read_row_by_row(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    rows = [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no", "score": i} for i in range(10)]
    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "pairs.parquet", row_group_size=3)
    records = read_records(f"parquet:{tmp_path / 'pairs.parquet'}")
    assert [r.data for r in records] == rows
    assert [r.data for r in read_records(f"parquet:{tmp_path}")] == rows


def test_lines_source_gives_one_record_per_non_empty_line_with_its_line_number(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Where was Ada born?\n\n  What did Bo study?  \n")
    records = read_records(f"lines:{path}", "prompt")
    assert [r.data for r in records] == [{"prompt": "Where was Ada born?"}, {"prompt": "What did Bo study?"}]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3"] and [r.index for r in records] == [0, 1]
    # its fingerprint (data cache key, resume check) hashes the file, as for the other local sources
    before = source_fingerprint(f"lines:{path}")
    path.write_text("Where was Ada born?\n")
    assert source_fingerprint(f"lines:{path}") != before
    with pytest.raises(DataError, match="no such file"):
        source_fingerprint(f"lines:{tmp_path / 'missing.txt'}")
