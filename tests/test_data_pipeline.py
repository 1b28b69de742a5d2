"""Batch iterators: shapes per stage, deterministic replay-free resume, per-host slices, eval, stats."""

import json

import numpy as np
import pytest

from jaxllm.config import load_config
from jaxllm import stages
from jaxllm.cli import main
from jaxllm.data import Tokenizer, lookup_records
from jaxllm.stages import data_report, make_batch_iterator, make_eval_batches
from jaxllm.data import pipeline
from jaxllm.data.sources import iter_records

TOKENIZER = Tokenizer.load("default")


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", "off")


def _config(*overrides):
    return load_config(overrides=["train.batch_size=4", *overrides])


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key]


def test_pretrain_batches_have_the_contract_keys_dtypes_and_shapes():
    batch = next(make_batch_iterator(_config(), TOKENIZER))
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "tokens": ("int32", (4, 128)), "positions": ("int32", (4, 128)), "segment_ids": ("int32", (4, 128)),
        "loss_mask": ("float32", (4, 128)), "example_ids": ("int32", (4, 8))}
    starts = batch["positions"] == 0
    assert (batch["loss_mask"][starts] == 0).all()  # no target for any segment's first token
    assert (batch["tokens"][batch["segment_ids"] == 0] == 0).all()


def test_resume_from_state_gives_the_same_next_batches_without_replay():
    config = _config("train.seed=3")
    iterator = make_batch_iterator(config, TOKENIZER)
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # goes through a JSON checkpoint
    expected = [next(iterator) for _ in range(3)]
    restored = make_batch_iterator(config, TOKENIZER)
    restored.set_state(state)
    for want in expected:
        _equal(next(restored), want)
    fresh = make_batch_iterator(config, TOKENIZER)
    _equal(fresh.batch_at(6), expected[1])  # batch k is a pure function of (seed, k)


def test_a_different_seed_gives_a_different_order_and_set_state_checks_the_seed():
    a = next(make_batch_iterator(_config("train.seed=0"), TOKENIZER))
    b = next(make_batch_iterator(_config("train.seed=1"), TOKENIZER))
    assert not np.array_equal(a["tokens"], b["tokens"])
    iterator = make_batch_iterator(_config("train.seed=1"), TOKENIZER)
    with pytest.raises(ValueError, match="seed=0"):
        iterator.set_state({"step": 2, "seed": 0})


def test_every_row_is_seen_once_per_epoch_and_epochs_are_reshuffled():
    config = _config("data.source=default:sft", "train.stage=sft", "train.batch_size=5")
    iterator = make_batch_iterator(config, TOKENIZER)
    rows = iterator.rows.num_rows
    stream = [next(iterator)["tokens"] for _ in range(2 * rows // 5)]
    flat = np.concatenate(stream)
    keys = [row.tobytes() for row in flat]
    epoch1, epoch2 = keys[:rows], keys[rows:2 * rows]
    distinct = {row.tobytes() for row in iterator.rows.parts[""].tokens}
    assert set(epoch1) == distinct and len(set(epoch1)) == len(distinct)
    assert epoch1 != epoch2


def test_host_slices_concatenate_to_the_single_host_batch():
    config = _config("train.batch_size=6")
    single = make_batch_iterator(config, TOKENIZER)
    hosts = [make_batch_iterator(config, TOKENIZER, process_index=i, process_count=3) for i in range(3)]
    for _ in range(2):
        whole = next(single)
        parts = [next(host) for host in hosts]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        make_batch_iterator(config, TOKENIZER, process_count=4)


def test_sft_loss_mask_covers_exactly_the_answers():
    iterator = make_batch_iterator(_config("train.stage=sft", "data.source=default:sft"), TOKENIZER)
    batch = next(iterator)
    assert (batch["loss_mask"].sum(axis=1) > 0).all()
    trained = batch["tokens"][batch["loss_mask"] == 1]
    assert set(trained.tolist()) & {TOKENIZER.user_id, TOKENIZER.assistant_id, TOKENIZER.bos_id} == set()
    # every assistant marker is followed by a trained token, every EOS is trained
    tokens, mask = batch["tokens"], batch["loss_mask"]
    follows_marker = np.roll(tokens == TOKENIZER.assistant_id, 1, axis=1)
    assert (mask[follows_marker] == 1).all()
    assert (mask[tokens == TOKENIZER.eos_id] == 1).all()


def test_preference_batches_pair_chosen_and_rejected_with_a_shared_prompt():
    batch = next(make_batch_iterator(_config("train.stage=dpo", "data.source=default:preferences"), TOKENIZER))
    expected = {f"{side}_{name}" for side in ("chosen", "rejected")
                for name in ("tokens", "positions", "segment_ids", "loss_mask")} | {"example_ids"}
    assert set(batch) == expected
    for row in range(4):
        chosen_start = int(np.argmax(batch["chosen_loss_mask"][row]))
        rejected_start = int(np.argmax(batch["rejected_loss_mask"][row]))
        assert chosen_start == rejected_start  # the same prompt precedes both answers
        np.testing.assert_array_equal(batch["chosen_tokens"][row, :chosen_start],
                                      batch["rejected_tokens"][row, :rejected_start])
        assert batch["chosen_tokens"][row, chosen_start - 1] == TOKENIZER.assistant_id
        assert batch["chosen_segment_ids"][row].max() == 1  # one pair per row, no packing
    reward = next(make_batch_iterator(_config("train.stage=reward", "data.source=default:preferences"), TOKENIZER))
    assert set(reward) == expected


def test_kto_batches_carry_a_plus_minus_one_label():
    batch = next(make_batch_iterator(_config("train.stage=kto", "data.source=default:feedback"), TOKENIZER))
    assert batch["label"].dtype == np.float32 and batch["label"].shape == (4,)
    assert set(batch["label"].tolist()) <= {1.0, -1.0}
    assert batch["tokens"].shape == (4, 128)


def test_rl_iterator_yields_prompt_batches_with_references():
    config = _config("train.stage=rl", "data.source=default:rl_prompts", "rl.prompts_per_step=3")
    batch = next(make_batch_iterator(config, TOKENIZER))
    assert batch["prompt_tokens"].shape[0] == 3 and batch["prompt_lengths"].shape == (3,)
    for row in range(3):
        length = batch["prompt_lengths"][row]
        assert batch["prompt_tokens"][row, length - 1] == TOKENIZER.assistant_id
        assert (batch["prompt_tokens"][row, length:] == 0).all()
    assert all(isinstance(reference, str) and reference for reference in batch["references"])


def test_eval_batches_are_deterministic_and_come_from_the_held_out_set():
    config = _config("train.eval_batches=3")
    first = make_eval_batches(config, TOKENIZER)
    second = make_eval_batches(config, TOKENIZER, 3)
    assert len(first) == 3
    for a, b in zip(first, second):
        _equal(a, b)
    assert data_report(config, TOKENIZER, "eval")["source"] == "default:pretrain_eval"
    eval_rows = stages.build_rows(config, TOKENIZER, "eval").num_rows
    assert len(make_eval_batches(config, TOKENIZER, 10_000)) == -(-eval_rows // 4)


def test_without_eval_source_every_20th_record_is_held_out_of_training(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 4}) for i in range(60)))
    config = _config(f"data.source=jsonl:{path}")
    train = stages.build_rows(config, TOKENIZER, "train").parts[""].example_ids
    held = stages.build_rows(config, TOKENIZER, "eval").parts[""].example_ids
    train_ids, held_ids = set(train[train >= 0].tolist()), set(held[held >= 0].tolist())
    assert held_ids == {19, 39, 59} and train_ids == set(range(60)) - held_ids
    assert data_report(config, TOKENIZER)["dropped"] == {"held_out_for_eval": 3}


def test_example_ids_trace_a_row_back_to_its_source_records():
    batch = next(make_batch_iterator(_config(), TOKENIZER))
    records = lookup_records("default:pretrain", batch["example_ids"][0])
    first = records[int(batch["example_ids"][0, 0])]
    segment = batch["tokens"][0][batch["segment_ids"][0] == 1]
    assert first.data["text"].startswith(TOKENIZER.decode(segment[:20]))


def test_disk_cache_round_trips_the_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", str(tmp_path))
    monkeypatch.setattr(pipeline, "DISK_CACHE_MIN_SECONDS", 0.0)
    pipeline._MEMORY_CACHE.clear()
    config = _config("train.stage=kto", "data.source=default:feedback")
    built = stages.build_rows(config, TOKENIZER)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    pipeline._MEMORY_CACHE.clear()
    loaded = stages.build_rows(config, TOKENIZER)
    assert loaded is not built
    _equal(loaded.batch(np.arange(5)), built.batch(np.arange(5)))
    assert loaded.report.to_dict() == built.report.to_dict()


def test_data_stats_cli_guesses_the_stage_and_prints_counts(capsys):
    assert main(["data", "stats", "default:sft"]) == 0
    out = capsys.readouterr().out
    assert "stage sft" in out and "packing efficiency" in out and "dropped" in out
    assert main(["data", "stats", "default:preferences", "--json", "--seq-len", "64"]) == 0
    stats = json.loads(capsys.readouterr().out)
    pairs = len(list(iter_records("default:preferences")))  # every pair in the file is counted once
    assert stats["stage"] == "dpo" and stats["examples"] + stats["dropped"].get("too_long_dropped", 0) == pairs
    assert main(["data", "stats", "jsonl:/nonexistent.jsonl"]) == 1


def test_kto_accepts_ratings_with_a_threshold_and_preference_pairs(tmp_path):
    path = tmp_path / "ratings.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}", "rating": r})
                              for i, r in enumerate([5, 3, 2.5, 0])))
    config = _config("train.stage=kto", f"data.source=jsonl:{path}", f"data.eval_source=jsonl:{path}")
    rows = stages.build_rows(config, TOKENIZER)
    assert dict(zip(rows.parts[""].example_ids[:, 0].tolist(), rows.labels.tolist())) == {
        0: 1.0, 1: 1.0, 2: -1.0, 3: -1.0}
    pairs = stages.build_rows(_config("train.stage=kto", "data.source=default:preferences"), TOKENIZER)
    count = len(list(iter_records("default:preferences")))
    assert pairs.num_rows == 2 * count and pairs.labels.sum() == 0  # each pair: one +1, one -1


def test_join_documents_joins_pretraining_rows_only_and_changes_the_resume_fingerprint():
    # rows of 256 tokens: room for two or more biographies (~90 tokens each with the default tokenizer)
    joined = make_batch_iterator(_config("data.join_documents=true", "data.seq_len=256"), TOKENIZER)
    isolated = make_batch_iterator(_config("data.seq_len=256"), TOKENIZER)
    a, b = next(joined), next(isolated)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["segment_ids"], (b["segment_ids"] > 0).astype(np.int32))
    assert b["segment_ids"].max() > 1  # the default rows do pack several documents
    assert joined.get_state()["data_fingerprint"] != isolated.get_state()["data_fingerprint"]
    sft = next(make_batch_iterator(_config("train.stage=sft", "data.source=default:sft", "data.join_documents=true"),
                                   TOKENIZER))
    assert sft["segment_ids"].max() > 1  # SFT conversations stay isolated
