"""Bad input: each case is a clear DataError naming the record, or a count in the data report with skip."""

import json

import pytest

from jaxllm.config import load_config
from jaxllm.data import DataError, load_prompts, read_records
from jaxllm.stages import data_report, make_batch_iterator
from jaxllm.data import pipeline
from jaxllm.data.tokenizer import Tokenizer

TOKENIZER = Tokenizer.load("default")


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", "off")
    pipeline._MEMORY_CACHE.clear()


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines))
    return path


def _config(path, stage, **data):
    overrides = [f"train.stage={stage}", f"data.source=jsonl:{path}", "data.eval_source=jsonl:" + str(path),
                 "train.batch_size=2", *[f"data.{k}={v}" for k, v in data.items()]]
    return load_config(overrides=overrides)


GOOD_SFT = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]}


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, [GOOD_SFT, b'{"messages": [', GOOD_SFT])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON .*on_bad_record=skip"):
        make_batch_iterator(_config(path, "sft"), TOKENIZER)


def test_malformed_json_is_skipped_and_counted_with_skip(tmp_path):
    path = _write(tmp_path, [GOOD_SFT, b'{"messages": [', b"[1, 2]", GOOD_SFT])
    report = data_report(_config(path, "sft", on_bad_record="skip"), TOKENIZER)
    assert report["bad_records"] == {"malformed_json": 1, "wrong_type": 1}
    assert report["records_read"] == 4 and report["examples"] == 2
    assert f"{path}:2" in report["messages"][0]


def test_missing_field_is_named(tmp_path):
    path = _write(tmp_path, [{"prompt": "Q?", "chosen": "A"}])
    with pytest.raises(DataError, match=r"data.jsonl:1: record has no field 'rejected'"):
        make_batch_iterator(_config(path, "dpo"), TOKENIZER)
    path = _write(tmp_path, [{"body": "some text"}], "text.jsonl")
    with pytest.raises(DataError, match=r"no field 'text' \(fields: body\); set data.text_field"):
        make_batch_iterator(_config(path, "pretrain"), TOKENIZER)


def test_mistyped_field_is_named(tmp_path):
    path = _write(tmp_path, [{"prompt": "Q?", "completion": "A", "label": "yes"}])
    with pytest.raises(DataError, match=r"field 'label' must be true/false"):
        make_batch_iterator(_config(path, "kto"), TOKENIZER)
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": 3}]}], "b.jsonl")
    with pytest.raises(DataError, match=r"messages\[0\].content must be a string, got int"):
        make_batch_iterator(_config(path, "sft"), TOKENIZER)


def test_empty_source_is_an_error(tmp_path):
    path = _write(tmp_path, [])
    with pytest.raises(DataError, match="is empty"):
        make_batch_iterator(_config(path, "pretrain"), TOKENIZER)
    with pytest.raises(DataError, match="has no records"):
        read_records(f"jsonl:{path}")


def test_every_record_skipped_is_an_error_that_counts_why(tmp_path):
    path = _write(tmp_path, [b"{oops", b"{oops"])
    with pytest.raises(DataError, match="no usable sft examples out of 2 records .*malformed_json: 2"):
        make_batch_iterator(_config(path, "sft", on_bad_record="skip"), TOKENIZER)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = _write(tmp_path, [{"text": "fine"}, b'{"text": "caf\xe9"}'])
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8 \(byte 0xe9"):
        make_batch_iterator(_config(path, "pretrain"), TOKENIZER)
    text = tmp_path / "doc.txt"
    text.write_bytes(b"good paragraph\n\nbad \xff line\n")
    with pytest.raises(DataError, match=rf"{text}:3: not valid UTF-8"):
        read_records(f"text:{text}")


def test_unknown_role_is_named(tmp_path):
    path = _write(tmp_path, [{"messages": [{"role": "bot", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"messages\[0\] has unknown role 'bot'; roles must be one of system, user"):
        make_batch_iterator(_config(path, "sft"), TOKENIZER)


def test_prompt_longer_than_seq_len_leaves_no_answer_tokens(tmp_path):
    long_prompt = "word " * 200
    path = _write(tmp_path, [{"prompt": long_prompt, "response": "A"}, GOOD_SFT])
    with pytest.raises(DataError, match=r"data.jsonl:1: the prompt is \d+ tokens, not shorter than data.seq_len=64"):
        make_batch_iterator(_config(path, "sft", seq_len=64), TOKENIZER)
    report = data_report(_config(path, "sft", seq_len=64, on_bad_record="skip"), TOKENIZER)
    assert report["bad_records"] == {"prompt_too_long": 1}
    path = _write(tmp_path, [{"prompt": long_prompt, "chosen": "A", "rejected": "B"}], "p.jsonl")
    with pytest.raises(DataError, match="no answer tokens are left"):
        make_batch_iterator(_config(path, "dpo", seq_len=64), TOKENIZER)
    with pytest.raises(DataError, match="no answer tokens fit"):
        load_prompts(f"jsonl:{path}", TOKENIZER, seq_len=64)


def test_chosen_equal_to_rejected_is_an_error(tmp_path):
    path = _write(tmp_path, [{"prompt": "Q?", "chosen": "Lisbon", "rejected": " Lisbon "}])
    with pytest.raises(DataError, match="'chosen' and 'rejected' are the same answer"):
        make_batch_iterator(_config(path, "dpo"), TOKENIZER)


def test_sft_conversation_without_answer_is_dropped_and_counted_never_a_zero_loss_row(tmp_path):
    no_answer = {"messages": [{"role": "user", "content": "just a question"}]}
    path = _write(tmp_path, [no_answer, GOOD_SFT, GOOD_SFT])
    report = data_report(_config(path, "sft", on_bad_record="skip"), TOKENIZER)
    assert report["bad_records"] == {"no_loss_tokens": 1}
    iterator = make_batch_iterator(_config(path, "sft", on_bad_record="skip", pack=False), TOKENIZER)
    for _ in range(3):
        assert (next(iterator)["loss_mask"].sum(axis=1) > 0).all()


def test_too_long_examples_follow_the_truncation_policy(tmp_path):
    path = _write(tmp_path, [{"prompt": "Q?", "response": "long answer " * 40}, GOOD_SFT])
    truncated = data_report(_config(path, "sft", seq_len=32), TOKENIZER)
    assert truncated["truncated"] == 1 and truncated["examples"] == 2
    dropped = data_report(_config(path, "sft", seq_len=32, truncation="drop"), TOKENIZER)
    assert dropped["dropped"] == {"too_long_dropped": 1} and dropped["examples"] == 1


def test_vocab_mismatch_is_a_clear_error_not_an_index_wrap(tmp_path):
    config = load_config(overrides=["model.vocab_size=256"])
    with pytest.raises(ValueError, match="512 ids but model.vocab_size is 256"):
        make_batch_iterator(config, TOKENIZER)


def test_unknown_source_kind_and_missing_files_are_explained(tmp_path):
    with pytest.raises(DataError, match="is not understood"):
        read_records("csv:foo.csv")
    with pytest.raises(DataError, match="no such file"):
        read_records(f"jsonl:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(DataError, match="no embedded data set 'nope'; available: feedback"):
        read_records("default:nope")
