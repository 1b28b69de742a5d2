"""Data-quality pipeline: rules, dedup, classifier, report, command lines (tiny data, < 10 s)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.lecture.quality import (RULES, FilterOptions, HeuristicConfig, MinHashConfig, MinHasher, QualityClassifier,
                                    TrainOptions, estimated_jaccard, filter_documents, first_failing_rule, TextView,
                                    heuristic_config_from, normalise, train_quality_classifier)

ADJECTIVES = ("quiet bright ancient narrow heavy gentle rapid careful distant honest curious modern rural broken "
              "silent golden eager fragile humble massive clever bitter frozen hollow loyal noble").split()
NOUNS = ("river mountain teacher engine village market garden library bridge harbor island forest doctor "
         "painter soldier kitchen window letter journey festival station museum valley desert castle").split()
VERBS = "crossed described visited repaired followed painted measured opened carried studied watched built".split()


def prose(seed: int, sentences: int = 10) -> str:
    """An English-looking document that passes every default rule."""
    r = random.Random(seed)
    out = []
    for _ in range(sentences):
        out.append(f"The {r.choice(ADJECTIVES)} {r.choice(NOUNS)} {r.choice(VERBS)} the {r.choice(ADJECTIVES)} "
                   f"{r.choice(NOUNS)} near the {r.choice(NOUNS)} with a {r.choice(NOUNS)}.")
    return " ".join(out[: sentences // 2]) + "\n\n" + " ".join(out[sentences // 2:])


SPAM_WORDS = "buy cheap pills now click here free offer winner casino bonus deal viagra loan cash prize".split()


def spam(seed: int) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(SPAM_WORDS) for _ in range(60)) + " !!! $$$ >>> click"


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path, texts, **options):
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    options.setdefault("workers", 1)
    report = filter_documents([source], tmp_path / "out.jsonl", FilterOptions(**options),
                              report_path=tmp_path / "report.json", rejected_path=tmp_path / "rejected.jsonl")
    kept = [r["text"] for r in read_jsonl(tmp_path / "out.jsonl")]
    rejected = read_jsonl(tmp_path / "rejected.jsonl")
    return report, kept, rejected


# ----------------------------------------------------------------------------------------------
# Rules

def test_clean_prose_passes_every_default_rule():
    for seed in range(20):
        assert first_failing_rule(prose(seed), HeuristicConfig()) is None


BAD_DOCUMENTS = {
    "char_run": prose(1) + " MMMMMMMMMMMMMMMMMMMMmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm",
    "word_count": "The river crossed the valley.",
    "mean_word_length": prose(2).replace(" ", " a b c d e f g h i j "),
    "duplicate_lines": "\n".join(["The river crossed the valley near the old mill today."] * 12),
    "lorem_ipsum": prose(3) + " Lorem ipsum dolor sit amet.",
    "symbol_word_ratio": prose(4) + " #tag" * 30,
    "alpha_words": prose(5) + "".join(f" {n} ({n + 7})" for n in range(0, 900, 9)),
    "symbol_chars": " ".join(word + "~+<" for word in prose(6).split()),
    "script": "Быстрая коричневая лиса перепрыгнула через ленивую собаку и побежала в лес. " * 8,
    "stop_words": " ".join(f"{random.Random(i).choice(ADJECTIVES)} {random.Random(i).choice(NOUNS)}."
                           for i in range(40)),
    "bullet_lines": "\n".join(f"- the {n} of the {a} {n} is great." for a, n in zip(ADJECTIVES, NOUNS)),
    "ellipsis_lines": "\n".join(f"the {a} {n} with the {n} and the {a} {a} {n} of the {n}" + (
        "..." if i % 2 else ".") for i, (a, n) in enumerate(zip(ADJECTIVES, NOUNS))),
    "punctuated_lines": "\n".join(f"the {a} {n} and the {n} with a {a} {n}" for a, n in zip(ADJECTIVES, NOUNS)),
    "top_ngram": prose(7, 4) + " the quick brown fox" * 20 + ".",
    "duplicate_ngrams": prose(8, 6) + " " + " ".join([prose(9, 3).replace("\n\n", " ")] * 3),
}


@pytest.mark.parametrize("rule", sorted(BAD_DOCUMENTS))
def test_each_rule_rejects_its_planted_document(rule):
    config = HeuristicConfig()
    failed = first_failing_rule(BAD_DOCUMENTS[rule], config)
    assert failed is not None and failed[0] == rule, failed
    keep, reason = RULES[rule](TextView(BAD_DOCUMENTS[rule]), config)
    assert not keep and reason


def test_a_disabled_or_null_threshold_turns_a_rule_off():
    text = BAD_DOCUMENTS["char_run"]
    assert first_failing_rule(text, HeuristicConfig(disabled_rules=("char_run",))) is None
    assert first_failing_rule(text, heuristic_config_from({"max_char_run": None})) is None
    with pytest.raises(ValueError, match="did you mean 'max_char_run'"):
        heuristic_config_from({"max_char_runs": 5})


def test_char_run_prefilter_finds_runs_at_every_offset_and_case():
    config = HeuristicConfig(max_char_run=30)
    for offset in range(9):
        for run in (30, 31):
            text = "x" * offset + "Zz" * (run // 2) + "z" * (run % 2) + " end"
            keep, _ = RULES["char_run"](TextView(text), config)
            assert keep == (run <= 30), (offset, run)


# ----------------------------------------------------------------------------------------------
# Dedup

def test_normalisation_ignores_case_spacing_and_punctuation():
    assert normalise("Hello,  World!\n Foo-bar") == normalise("hello world foobar")
    assert normalise("Ünïcode, TEXT…") == "ünïcode text"


def test_minhash_estimates_jaccard_similarity():
    hasher = MinHasher(MinHashConfig(num_perm=256, bands=16, shingle_size=1))
    a = [f"w{i}" for i in range(200)]
    b = [f"w{i}" for i in range(100, 300)]  # Jaccard 100/300
    signatures = hasher.signatures([a, b, a])
    assert abs(estimated_jaccard(signatures[0], signatures[1]) - 1 / 3) < 0.1
    assert estimated_jaccard(signatures[0], signatures[2]) == 1.0
    keys = hasher.band_keys(signatures)
    assert keys.shape == (3, 16) and (keys[0] == keys[2]).all()


def test_planted_near_duplicate_is_removed_and_unrelated_document_kept(tmp_path):
    original = prose(10, 12)
    words = original.split(" ")
    words[5], words[40] = "harbor", "museum"  # two words changed: Jaccard of 5-gram shingles ~0.85
    near_copy = " ".join(words)
    unrelated = prose(11, 12)
    report, kept, rejected = run(tmp_path, [original, near_copy, unrelated])
    assert kept == [original, unrelated]
    near = {s["step"]: s for s in report["steps"]}["near_dedup"]
    assert near["rejected"] == {"near_duplicate": 1}
    assert rejected[0]["rule"] == "near_duplicate" and rejected[0]["duplicate_of"] == 0
    assert rejected[0]["document"] == 1 and rejected[0]["text"] == near_copy


def test_exact_duplicates_after_normalisation_are_removed(tmp_path):
    original = prose(12)
    variant = "  " + original.upper().replace(".", " !").replace(" ", "   ") + "\n"
    report, kept, rejected = run(tmp_path, [original, variant, prose(13)], near_dedup=False)
    assert kept == [original, prose(13)]
    assert {s["step"]: s for s in report["steps"]}["exact_dedup"]["rejected"] == {"exact_duplicate": 1}
    assert rejected[0]["duplicate_of"] == 0


# ----------------------------------------------------------------------------------------------
# The chain and its report

def test_repetitive_documents_are_filtered_with_the_reason_in_the_report(tmp_path):
    mmmm = "M" * 400 + "m" * 1500
    repeated_lines = "\n".join(["I love this forum so much, thanks to everyone here!"] * 40)
    report, kept, rejected = run(tmp_path, [prose(20), mmmm, repeated_lines, prose(21)])
    assert kept == [prose(20), prose(21)]
    heuristics = report["steps"][0]
    assert heuristics["step"] == "heuristics"
    assert heuristics["rejected"] == {"char_run": 1, "duplicate_lines": 1}
    reasons = {r["rule"]: r["reason"] for r in rejected}
    assert "'M'" in reasons["char_run"] and "max_char_run 30" in reasons["char_run"]
    assert "repeats" in reasons["duplicate_lines"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["steps"] == report["steps"]


def test_report_counts_add_up(tmp_path):
    texts = [prose(i) for i in range(12)] + [prose(3), prose(4).lower(), "too short", "Z" * 200]
    texts += [prose(40 + i) + " " + " ".join(["filler"] * 3) for i in range(3)]
    report, kept, rejected = run(tmp_path, texts)
    steps = report["steps"]
    assert [s["step"] for s in steps] == ["heuristics", "exact_dedup", "near_dedup"]
    assert steps[0]["documents_in"] == report["input"]["documents"] == len(texts)
    assert steps[0]["words_in"] == report["input"]["words"] == sum(len(t.split()) for t in texts)
    for before, after in zip(steps, steps[1:]):
        assert after["documents_in"] == before["documents_kept"]
        assert after["words_in"] == before["words_kept"]
    for step in steps:
        assert step["documents_in"] == step["documents_kept"] + sum(step["rejected"].values())
    assert report["kept"]["documents"] == len(kept) == steps[-1]["documents_kept"]
    assert len(rejected) == len(texts) - len(kept)
    assert report["kept"]["words"] == sum(len(t.split()) for t in kept)
    assert report["funnel"].startswith("100% input -> ")


def test_worker_pool_gives_the_same_output_as_one_process(tmp_path):
    texts = [prose(i % 9) if i % 4 else prose(100 + i) for i in range(60)] + ["M" * 100]
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    one = filter_documents([source], tmp_path / "one.jsonl", FilterOptions(workers=1, chunk_size=7))
    two = filter_documents([source], tmp_path / "two.jsonl", FilterOptions(workers=2, chunk_size=7))
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    assert one["steps"] == two["steps"]


def test_plain_text_inputs_split_into_paragraph_documents(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(prose(30).replace("\n\n", " ") + "\n\n\n" + prose(31).replace("\n\n", " ") + "\n\nhi\n")
    report = filter_documents([corpus], tmp_path / "out.jsonl", FilterOptions(workers=1, text_unit="paragraph"))
    out = read_jsonl(tmp_path / "out.jsonl")
    assert report["input"]["documents"] == 3 and len(out) == 2
    assert out[1]["source"] == f"{corpus}:4"


# ----------------------------------------------------------------------------------------------
# The classifier

@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    good = write_jsonl(root / "good.jsonl", [prose(200 + i) for i in range(30)])
    bad = write_jsonl(root / "bad.jsonl", [spam(i) for i in range(30)])
    out = root / "model"
    train_quality_classifier([good], [bad], out, options=TrainOptions(buckets=2**14, epochs=15, batch_size=32))
    return out


def test_classifier_ranks_held_out_good_document_above_bad_one(classifier_dir):
    classifier = QualityClassifier.load(classifier_dir)
    good, bad = classifier.score([prose(999), spam(999)])
    assert good > 0.5 > bad
    assert classifier.metadata["training"]["validation_accuracy"] == 1.0
    assert (classifier_dir / "weights.npz").stat().st_size < 200_000


def test_classifier_step_rejects_low_scores_with_reason(tmp_path, classifier_dir):
    texts = [prose(300), spam(300) + " The end of the story and the rest of it, with the whole thing."]
    report, kept, rejected = run(tmp_path, texts, classifier=str(classifier_dir), threshold=0.5,
                                 heuristics=None)
    assert kept == [texts[0]]
    assert report["steps"][-1]["rejected"] == {"low_quality_score": 1}
    assert rejected[0]["score"] < 0.5


def test_train_quality_main_writes_a_loadable_classifier(tmp_path, capsys):
    good = write_jsonl(tmp_path / "g.jsonl", [prose(i) for i in range(4)])
    bad = write_jsonl(tmp_path / "b.jsonl", [spam(i) for i in range(4)])
    code = main(["data", "train-quality", "--good", str(good), "--bad", str(bad), "--out", str(tmp_path / "m"),
                 "--buckets", "4096", "--epochs", "5"])
    assert code == 0, capsys.readouterr().err
    assert QualityClassifier.load(tmp_path / "m").buckets == 4096
    assert main(["data", "train-quality", "--good", str(good), "--out", str(tmp_path / "m")]) == 2
    assert main(["data", "train-quality", "--good", str(tmp_path / "nope.jsonl"), "--bad", str(bad),
                 "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Command line and bad input

def test_filter_main_writes_output_and_report(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [prose(1), prose(1), "MMMMmmmm" * 50])
    code = main(["data", "filter", str(source), "--out", str(tmp_path / "out.jsonl"), "--report",
                 str(tmp_path / "r.json"), "--workers", "1", "--set", "min_words=20"])
    assert code == 0
    assert "funnel" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kept"]["documents"] == 1 and report["options"]["heuristics"]["min_words"] == 20


@pytest.mark.parametrize("problem", ["missing", "malformed", "empty", "no_text_field", "bad_setting"])
def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, capsys, problem):
    source = tmp_path / "in.jsonl"
    extra = []
    if problem == "malformed":
        source.write_text(json.dumps({"text": prose(1)}) + "\n" + '{"text": "broken\n')
    elif problem == "empty":
        source.write_text("\n")
    elif problem == "no_text_field":
        source.write_text(json.dumps({"body": prose(1)}) + "\n")
    elif problem == "bad_setting":
        source.write_text(json.dumps({"text": prose(1)}) + "\n")
        extra = ["--set", "min_wrods=3"]
    code = main(["data", "filter", str(source), "--out", str(tmp_path / "out.jsonl"), "--workers", "1", *extra])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("jaxllm: error: ")
    expected = {"missing": "does not exist", "malformed": f"{source}:2: not valid JSON",
                "empty": "no documents", "no_text_field": f"{source}:1: the text field 'text' is missing",
                "bad_setting": "did you mean 'min_words'"}[problem]
    assert expected in error
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.tmp").exists()


def test_skip_malformed_counts_bad_lines(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": prose(1)}) + "\nnot json\n")
    report = filter_documents([source], tmp_path / "o.jsonl", FilterOptions(workers=1, skip_malformed=True))
    assert report["input"]["malformed_skipped"] == 1 and report["input"]["documents"] == 1


def test_band_keys_are_deterministic_across_instances():
    words = [prose(5).split()]
    a = MinHasher().band_keys(MinHasher().signatures(words))
    b = MinHasher().band_keys(MinHasher().signatures(words))
    assert np.array_equal(a, b)


def test_gzip_output_is_compressed(tmp_path):
    import gzip

    source = write_jsonl(tmp_path / "in.jsonl", [prose(1), prose(2)])
    filter_documents([source], tmp_path / "out.jsonl.gz", FilterOptions(workers=1))
    with gzip.open(tmp_path / "out.jsonl.gz", "rt") as handle:
        assert [json.loads(line)["text"] for line in handle] == [prose(1), prose(2)]


def test_lsh_candidate_rate_follows_the_banding_s_curve():
    config = MinHashConfig(shingle_size=1)
    hasher = MinHasher(config)
    for similarity in (0.3, 0.7, 0.9):
        shared = int(round(200 * 2 * similarity / (1 + similarity)))  # two 200-word sets, Jaccard = similarity
        docs = []
        for t in range(100):
            common = [f"t{t}c{i}" for i in range(shared)]
            docs += [common + [f"t{t}a{i}" for i in range(200 - shared)],
                     common + [f"t{t}b{i}" for i in range(200 - shared)]]
        keys = hasher.band_keys(hasher.signatures(docs))
        rate = np.mean([(keys[2 * i] == keys[2 * i + 1]).any() for i in range(100)])
        assert abs(rate - config.candidate_probability(similarity)) < 0.15, (similarity, rate)
