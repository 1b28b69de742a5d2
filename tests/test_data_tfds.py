"""A TFDS dataset (array_record, no TensorFlow) built from local JSONL and read end to end, offline."""

import json

import pytest

from jaxllm.config import load_config
from jaxllm.data import DataError, Tokenizer, build_tfds_from_jsonl, read_records
from jaxllm.stages import make_batch_iterator
from jaxllm.data import pipeline

TOKENIZER = Tokenizer.load("default")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", "off")
    monkeypatch.setenv("NO_GCE_CHECK", "true")


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_text_dataset_round_trips_through_tfds_in_order(tmp_path, monkeypatch):
    records = [{"text": f"Document {i}: Ana Lopez was born in Lisbon. 日本", "score": i, "ok": i % 2 == 0}
               for i in range(30)]
    train = _jsonl(tmp_path / "train.jsonl", records)
    held = _jsonl(tmp_path / "eval.jsonl", records[:5])
    dataset_dir = build_tfds_from_jsonl({"train": train, "validation": held}, tmp_path / "tfds", name="tiny_corpus")
    assert (dataset_dir / "dataset_info.json").exists()
    assert any("array_record" in p.name for p in dataset_dir.iterdir())

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    read = read_records("tfds:tiny_corpus:train")
    assert [r.data for r in read] == records  # bytes decoded, scalars converted, order kept
    assert [r.data for r in read_records(f"tfds:{dataset_dir}:validation")] == records[:5]
    assert len(read_records("tfds:tiny_corpus:train[:10]")) == 10

    config = load_config(overrides=["data.source=tfds:tiny_corpus:train", "train.batch_size=2",
                                    "data.eval_source=tfds:tiny_corpus:validation"])
    batch = next(make_batch_iterator(config, TOKENIZER))
    ids = batch["example_ids"][0]
    first = TOKENIZER.decode(batch["tokens"][0][batch["segment_ids"][0] == 1])
    assert first == records[int(ids[0])]["text"]


def test_chat_records_survive_tfds_as_message_lists(tmp_path, monkeypatch):
    conversations = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                                   {"role": "assistant", "content": f"Answer {i}"}]} for i in range(6)]
    dataset_dir = build_tfds_from_jsonl(_jsonl(tmp_path / "sft.jsonl", conversations), tmp_path / "tfds",
                                        name="tiny_chat")
    assert [r.data for r in read_records(f"tfds:{dataset_dir}")] == conversations
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    config = load_config(overrides=["train.stage=sft", "data.source=tfds:tiny_chat:train", "train.batch_size=2",
                                    f"data.eval_source=tfds:{dataset_dir}:train"])
    batch = next(make_batch_iterator(config, TOKENIZER))
    answers = TOKENIZER.decode(batch["tokens"][batch["loss_mask"] == 1])
    assert "Answer" in answers and "Question" not in answers
    pipeline._MEMORY_CACHE.clear()


def test_a_missing_tfds_dataset_is_explained_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="cannot open the dataset.*array_record"):
        read_records("tfds:no_such_dataset_here:train")
    with pytest.raises(DataError, match="snake_case"):
        build_tfds_from_jsonl(_jsonl(tmp_path / "a.jsonl", [{"text": "x"}]), tmp_path, name="Bad-Name")
