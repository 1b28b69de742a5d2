"""The embedded default data: present, small, reproducible from its seed, and split as documented."""

import importlib.util
import random
import re
from pathlib import Path

from jaxllm.data import biographies as bio
from jaxllm.data import list_default_sets, read_records

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "jaxllm" / "data" / "default"
TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_default_data.py"


def _names_in(records):
    pattern = re.compile(r"(?:of|did|does|was|is) ([A-Z][a-z]+ [A-Z][a-z]+)")
    names = set()
    for record in records:
        text = record.data.get("prompt") or record.data["messages"][-2]["content"]
        names.update(pattern.findall(text))
    return names


def test_every_stage_has_a_set_and_the_data_is_small():
    assert {"pretrain", "pretrain_eval", "sft", "sft_eval", "qa_eval", "preferences", "feedback",
            "rl_prompts"} <= set(list_default_sets())
    assert sum(p.stat().st_size for p in DEFAULT_DIR.iterdir()) < 2 * 1024 * 1024
    assert (DEFAULT_DIR / "tokenizer.model").exists()


def test_generator_reproduces_the_shipped_files_from_seed_0(tmp_path):
    spec = importlib.util.spec_from_file_location("make_default_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--seed", "0", "--out", str(tmp_path)]) == 0
    for shipped in DEFAULT_DIR.iterdir():
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name


def test_sft_feedback_and_held_out_people_are_disjoint_and_all_are_in_pretraining():
    trained, held_out = _names_in(read_records("default:sft")), _names_in(read_records("default:qa_eval"))
    people = [r.data for r in read_records("default:people")]
    judged = {p["name"] for p in people if p["split"] == "feedback"}
    assert len(trained) == 100 and len(judged) == 50 and len(held_out) == 50
    assert not trained & held_out and not judged & (trained | held_out)
    pretrain_text = " ".join(r.data["text"] for r in read_records("default:pretrain"))
    assert all(name in pretrain_text for name in trained | judged | held_out)


def test_answers_are_short_and_references_are_exact_attributes():
    people = {r.data["name"]: r.data for r in read_records("default:people")}
    for record in read_records("default:qa_eval")[:50]:
        name = next(n for n in people if n in record.data["prompt"])
        assert record.data["reference"] == people[name][record.data["attribute"]]
        assert len(record.data["reference"]) < 30


def test_rephrasings_permute_sentences_and_keep_every_fact():
    people = bio.make_people(5, seed=1)
    single = bio.biographies(people, rephrasings=1)
    multi = bio.biographies(people, rephrasings=4, seed=2)
    assert len(single) == 5 and len(multi) == 20
    assert single[0]["text"] == bio.biography(people[0])
    texts = [r["text"] for r in multi if r["person"] == 0]
    assert len(set(texts)) > 1
    for text in texts:
        assert all(people[0].attribute(a) in text for a in bio.ATTRIBUTES)
        assert text.count(people[0].name) == 6  # the full name in every sentence


def test_name_once_biographies_name_the_person_first_then_use_pronouns():
    people = bio.make_people(6, seed=1)
    for record in bio.biographies(people, rephrasings=3, seed=2, name_once=True):
        person = people[record["person"]]
        text = record["text"]
        assert text.startswith(person.name) or text.startswith("The birth date of " + person.name) \
            or text.startswith("The hometown of " + person.name) or text.startswith("The major of " + person.name) \
            or text.startswith("The employer of " + person.name)
        assert text.count(person.name) == 1
        assert all(person.attribute(a) in text for a in bio.ATTRIBUTES)
        subject, possessive, _ = bio.pronouns(person)
        assert text.count(f" {subject} ") + text.count(f" {possessive} ") == 5
    fixed = bio.biography(people[0], name_once=True)
    assert fixed.split(". ")[1].startswith(bio.pronouns(people[0])[0] + " was born in")


def test_questions_have_exact_answers_and_wrong_answers_differ():
    person = bio.make_people(1, seed=3)[0]
    pairs = list(bio.qa_pairs([person], variants="all"))
    assert len(pairs) == 12
    assert {p["answer"] for p in pairs} == {person.attribute(a) for a in bio.ATTRIBUTES}
    assert bio.question(person, "birth_city") == f"What is the birth city of {person.name}?"
    rng = random.Random(0)
    assert all(bio.wrong_answer(person, a, rng) != person.attribute(a) for a in bio.ATTRIBUTES)
    assert bio.exact_match(" lisbon. ", "Lisbon") and not bio.exact_match("Lisbon, Portugal", "Lisbon")


def test_experiment_sets_split_people_between_sft_and_held_out_questions():
    sets = bio.experiment_sets(20, rephrasings=3, seed=5)
    assert len(sets["pretrain"]) == 60 and len(sets["sft"]) == 60 and len(sets["qa_eval"]) == 60
    assert {r["person"] for r in sets["qa_train"]} == set(range(10))
    assert {r["person"] for r in sets["qa_eval"]} == set(range(10, 20))
    single = bio.experiment_sets(20, rephrasings=1, seed=5)["pretrain"]
    assert len(single) == 20 and len({r["text"].split(" was born on")[0] for r in single}) == 20


def _all_text(record) -> str:
    """Every string in a record (prompts, answers, messages), joined."""
    data = record.data
    parts = [value for value in data.values() if isinstance(value, str)]
    parts += [message["content"] for message in data.get("messages", [])]
    return "\n".join(parts)


def test_no_held_out_person_appears_in_any_sft_or_feedback_training_set():
    people = [r.data for r in read_records("default:people")]
    held_out = [p for p in people if p["split"] == "held_out"]
    assert len(held_out) == len(people) // 4
    names = {split: {p["name"] for p in people if p["split"] == split} for split in ("train", "feedback", "held_out")}
    everyone = set().union(*names.values())
    # SFT asks about the "train" people; the feedback stages judge answers about people SFT never asked
    # about ("feedback") and, offline, about the SFT people too
    both = names["train"] | names["feedback"]
    for name, split in (("sft", names["train"]), ("preferences", both), ("feedback", both),
                        ("rl_prompts", names["feedback"])):
        records = read_records(f"default:{name}")
        text = "\n".join(_all_text(r) for r in records)
        leaked = [p["name"] for p in held_out if p["name"] in text]
        assert not leaked, f"default:{name} mentions held-out people {leaked[:5]}"
        asked = _names_in(records) if name == "sft" else {
            n for r in records for n in everyone if n in r.data["prompt"]}
        assert asked == split, name
    # and every held-out question is about a held-out person, with the person's true value as the reference
    by_name = {p["name"]: p for p in held_out}
    for record in read_records("default:qa_eval"):
        (name,) = [n for n in by_name if n in record.data["prompt"]]
        assert record.data["reference"] == by_name[name][record.data["attribute"]]


def test_rejected_answers_are_plausible_mistakes_about_the_same_attribute():
    people = {r.data["name"]: r.data for r in read_records("default:people")}
    pools = {attribute: {p[attribute] for p in people.values()} for attribute in bio.ATTRIBUTES}
    records = read_records("default:preferences")
    same_attribute = 0
    for record in records:
        chosen, rejected = record.data["chosen"], record.data["rejected"]
        assert chosen != rejected
        attribute = next(a for a in bio.ATTRIBUTES if chosen in pools[a])
        same_attribute += rejected in pools[attribute]
    assert same_attribute >= 0.8 * len(records)
