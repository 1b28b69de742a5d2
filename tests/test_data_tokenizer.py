"""The sentencepiece tokenizer: fixed special ids, lossless round trips, vocab checks, training."""

import pytest
from hypothesis import given, settings, strategies as st

from jaxllm.cli import main
from jaxllm.data import DataError, Tokenizer, check_vocab, read_records, train_tokenizer
from jaxllm.data.tokenizer import ROLE_MARKERS

MIXED = "Ana Lopez was born in Lisbon.\n\n  Two  spaces,\ttab; Ünïcödé, 日本語のテキスト, русский, عربى, 🙂🚀 — ok?\r\n"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load("default")


def test_default_tokenizer_has_the_fixed_special_ids_and_512_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert [tokenizer.piece(i) for i in (4, 5, 6)] == list(ROLE_MARKERS.values())
    assert (tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id) == (4, 5, 6)
    assert tokenizer.vocab_size == 512


def test_round_trip_is_lossless_on_mixed_script_text_through_byte_fallback(tokenizer):
    ids = tokenizer.encode(MIXED)
    assert tokenizer.decode(ids) == MIXED
    assert tokenizer.unk_id not in ids
    assert any(tokenizer.piece(i).startswith("<0x") for i in ids)  # CJK etc. came through byte pieces
    assert tokenizer.encode(MIXED)[:3] != [tokenizer.bos_id] * 3  # encode adds no BOS


# U+2581 is sentencepiece's own space symbol: it decodes to a space (a documented limitation).
@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",))))
def test_round_trip_is_lossless_on_any_text(text):
    tokenizer = Tokenizer.load("default")
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_batch_matches_encode_and_decode_drops_pads(tokenizer):
    texts = ["hello world", "", "Lisbon 1971", MIXED]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    ids = tokenizer.encode("Lisbon")
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, 0, 0]) == "Lisbon"


def test_piece_bytes_add_up_to_the_decoded_utf8_bytes(tokenizer):
    ids = [tokenizer.bos_id, *tokenizer.encode(MIXED), tokenizer.eos_id]
    assert b"".join(tokenizer.piece_bytes(i) for i in ids) == MIXED.encode("utf-8")


def test_check_vocab_rejects_a_model_smaller_than_the_tokenizer(tokenizer):
    check_vocab(tokenizer, 512)
    check_vocab(tokenizer, 1024)
    with pytest.raises(ValueError, match="512 ids but model.vocab_size is 256"):
        check_vocab(tokenizer, 256)


def test_load_names_a_missing_tokenizer(tmp_path):
    with pytest.raises(DataError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tokenizer_gives_the_special_ids_and_lossless_round_trips(tmp_path, model_type):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(record.data["text"] for record in read_records("default:pretrain")[:300]))
    tokenizer = train_tokenizer([corpus], 400, tmp_path / "tok", model_type)
    assert tokenizer.vocab_size == 400
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.user_id) == (2, 3, 5)
    assert tokenizer.decode(tokenizer.encode(MIXED)) == MIXED
    assert Tokenizer.load(tmp_path / "tok").encode("Lisbon") == tokenizer.encode("Lisbon")


def test_dummy_prefix_gives_a_word_the_same_tokens_at_the_start_and_inside_a_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Flora Orlov was born in Lisbon {i}. Where was Flora Orlov born?" for i in range(50)))
    plain = train_tokenizer([corpus], 300, tmp_path / "plain")
    prefixed = train_tokenizer([corpus], 300, tmp_path / "prefixed", add_dummy_prefix=True)
    start, inside = prefixed.encode("Flora Orlov born?"), prefixed.encode("Where was Flora Orlov born?")
    assert inside[-len(start):] == start
    assert prefixed.piece(start[0]).startswith("\u2581")
    assert not plain.piece(plain.encode("Flora Orlov born?")[0]).startswith("\u2581")  # unlike "was Flora"
    text = "Flora Orlov was born in Lisbon."
    assert prefixed.decode(prefixed.encode(text)) == text  # the added space is not decoded


def test_train_tokenizer_is_deterministic(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat {i} sat on mat {i % 7}" for i in range(200)))
    train_tokenizer([corpus], 290, tmp_path / "a")
    train_tokenizer([corpus], 290, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()


def test_train_tokenizer_explains_a_too_small_vocab(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc\n")
    with pytest.raises(DataError, match="too small"):
        train_tokenizer([corpus], 100, tmp_path / "tok")


def test_tokenizer_train_cli_reads_files_and_sources(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of text" for i in range(100)))
    assert main(["tokenizer", "train", "--input", str(corpus), "default:sft", "--vocab-size", "400",
                 "--out", str(tmp_path / "tok")]) == 0
    assert "400 ids" in capsys.readouterr().out
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 400
    assert main(["tokenizer", "train", "--input", "nosuch:thing", "--vocab-size", "320",
                 "--out", str(tmp_path / "x")]) == 1
