"""Regenerates the embedded default data in jaxllm/data/default/ from a seed.

    python tools/make_default_data.py --seed 0

Everything is made here: synthetic biographies of invented people (jaxllm.data.biographies) and
templated everyday prose. The sets (each `default:<name>`):

  pretrain          biographies of ALL people, the full name in every sentence (the paper's bioS "fullname"
                    augmentation; `--name-once` names them once, then pronouns), several rephrasings each with
                    permuted sentences, + a little prose
  pretrain_eval     one fresh rephrasing for some people + held-out prose
  sft               QA conversations about the first half of the people (every question wording, short answers)
  sft_eval          the same question types about the last quarter (held out)
  qa_eval           {"prompt", "reference"} about the held-out quarter, for exact-match accuracy
  preferences       {"prompt", "chosen", "rejected"} about the SFT half and the third quarter (people whose QA
                    SFT never saw: the feedback stage's new prompts): correct answer vs a plausible mistake (mostly
                    another person's value of the same attribute, the confusions a model makes; sometimes a
                    rambling non-answer)
  preferences_eval  the same about the held-out quarter
  feedback          {"prompt", "completion", "label"} thumbs up/down for KTO, about the same people as preferences
  feedback_eval     the same about the held-out quarter
  rl_prompts        {"prompt", "reference"} about the third quarter, exact-match verifiable
  people            the people and their six attributes ("split": train | feedback | held_out)

and tokenizer.model: BPE, 512 ids, trained on the training sets' text.

Why full names, rephrasings and a dummy-prefix tokenizer: that is what made pretrained knowledge extractable
for people never seen in QA form (README, "The knowledge experiment" and "What made held-out QA work"): with the
name in every sentence each fact sits next to the name it belongs to, and held-out QA after SFT rose from 15% to
24% over naming the person once (300 held-out questions, same steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxllm.data import biographies as bio  # noqa: E402
from jaxllm.data.tokenizer import train_tokenizer  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "jaxllm" / "data" / "default"
SYSTEM_PROMPT = "Answer questions about people with a short exact answer."

# ----------------------------------------------------------------------------------------------
# Templated everyday prose (a tiny grammar; no copied text)

SUBJECTS = ("the baker", "a young teacher", "my neighbour", "the old fisherman", "a tired doctor", "the little girl",
            "a student", "the farmer", "our captain", "the painter", "my grandmother", "a quiet boy", "the mayor",
            "a nurse", "the gardener", "two friends", "the musicians", "a small dog", "the children", "a stranger")
ACTIONS = ("opened the shop", "walked to the market", "read a long book", "cooked a warm soup",
           "fixed the old bicycle", "wrote a letter to a friend", "planted tomatoes in the garden",
           "watched the rain", "sang a quiet song", "cleaned the kitchen", "painted the front door",
           "counted the coins", "climbed the hill", "baked fresh bread", "fed the birds", "carried water from the well",
           "visited the library", "mended a torn coat", "waited for the train", "lit a small fire")
TIMES = ("Every morning", "On Sunday", "Late at night", "In the spring", "After lunch", "Before sunrise", "In winter",
         "Yesterday", "Once a year", "At noon", "During the summer", "On a cold evening")
WEATHER = ("The sky was grey and the wind was cold.", "The sun was warm and the streets were busy.",
           "It rained all day, and the river rose.", "Snow covered the roofs of the town.",
           "A soft fog hid the harbour.", "The air smelled of salt and pine.", "Clouds moved slowly over the hills.")
FEELINGS = ("Everyone was happy.", "Nobody said a word.", "It was a good day.", "The town felt calm.",
            "Some people laughed, and others smiled.", "It was quiet for a long time.", "The work was hard but fair.")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")


def _sentence_story(rng: random.Random) -> str:
    subject = rng.choice(SUBJECTS)
    return f"{rng.choice(TIMES)}, {subject} {rng.choice(ACTIONS)}."


def _sentence_then(rng: random.Random) -> str:
    return f"Then {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)}."


def _sentence_count(rng: random.Random) -> str:
    a, b = rng.randint(0, 6), rng.randint(0, 6)
    return rng.choice((f"{NUMBER_WORDS[a].capitalize()} and {NUMBER_WORDS[b]} make {NUMBER_WORDS[a + b]}.",
                       f"{a} plus {b} is {a + b}."))


def _sentence_calendar(rng: random.Random) -> str:
    month = rng.randrange(12)
    return rng.choice((f"After {bio.MONTHS[month]} comes {bio.MONTHS[(month + 1) % 12]}.",
                       f"{bio.MONTHS[month]} is month number {month + 1} of the year.",
                       "A year has twelve months.", "A week has seven days."))


def _sentence_world(rng: random.Random) -> str:
    company, city = rng.choice(bio.EMPLOYERS)
    return rng.choice((f"{company} is a company based in {city}.", f"The offices of {company} are in {city}.",
                       f"{rng.choice(bio.UNIVERSITIES)} has a strong department of {rng.choice(bio.MAJORS)}.",
                       f"{rng.choice(bio.CITIES)} is a city with a busy harbour and old streets.",
                       f"Many students come to {rng.choice(bio.CITIES)} to study {rng.choice(bio.MAJORS)}."))


def prose_paragraph(rng: random.Random) -> str:
    sentences = [_sentence_story(rng)]
    makers = (_sentence_then, _sentence_then, _sentence_count, _sentence_calendar, _sentence_world,
              lambda r: r.choice(WEATHER), lambda r: r.choice(FEELINGS))
    for _ in range(rng.randint(2, 5)):
        sentences.append(rng.choice(makers)(rng))
    return " ".join(sentences)


def prose(count: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    paragraphs: list[str] = []
    seen = set(exclude)
    while len(paragraphs) < count:
        paragraph = prose_paragraph(rng)
        if paragraph not in seen:
            seen.add(paragraph)
            paragraphs.append(paragraph)
    return paragraphs


# ----------------------------------------------------------------------------------------------
# The sets


def qa_conversations(people, rng: random.Random, seed: int, system_fraction: float, two_turn_fraction: float,
                     variants: str = "random"):
    pairs = list(bio.qa_pairs(people, seed=seed, variants=variants))
    rng.shuffle(pairs)
    records, index = [], 0
    while index < len(pairs):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < system_fraction else []
        turns = 2 if rng.random() < two_turn_fraction and index + 1 < len(pairs) else 1
        for pair in pairs[index:index + turns]:
            messages += [{"role": "user", "content": pair["question"]},
                         {"role": "assistant", "content": pair["answer"]}]
        records.append({"messages": messages})
        index += turns
    return records


def plausible_mistake(person, attribute: str, everyone, rng: random.Random) -> str:
    """A wrong answer of the kind a model that confuses people gives: another person's value of the same
    attribute (so common values are common mistakes), never the right one."""
    right = person.attribute(attribute)
    for _ in range(100):
        candidate = rng.choice(everyone).attribute(attribute)
        if candidate != right:
            return candidate
    return bio.wrong_answer(person, attribute, rng)


def preferences(people, rng: random.Random, seed: int, rambling_fraction: float = 0.1):
    records = []
    for pair in bio.qa_pairs(people, seed=seed):
        person = people[pair["person"]]
        if rng.random() < rambling_fraction:
            rejected = rng.choice(bio.RAMBLING_ANSWERS)
        else:
            rejected = plausible_mistake(person, pair["attribute"], people, rng)
        records.append({"prompt": pair["question"], "chosen": pair["answer"], "rejected": rejected})
    rng.shuffle(records)
    return records


def feedback(people, rng: random.Random, seed: int, rambling_fraction: float = 0.1):
    records = []
    for pair in bio.qa_pairs(people, seed=seed):
        person = people[pair["person"]]
        good = rng.random() < 0.5
        completion = pair["answer"] if good else (rng.choice(bio.RAMBLING_ANSWERS) if rng.random() < rambling_fraction
                                                   else plausible_mistake(person, pair["attribute"], people, rng))
        records.append({"prompt": pair["question"], "completion": completion, "label": good})
    rng.shuffle(records)
    return records


def prompts(people, seed: int, offset: int = 0):
    return [{"prompt": pair["question"], "reference": pair["answer"], "attribute": pair["attribute"],
             "person": pair["person"] + offset} for pair in bio.qa_pairs(people, seed=seed)]


def build(seed: int, num_people: int, rephrasings: int, prose_paragraphs: int,
          name_once: bool = False) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    people = bio.make_people(num_people, seed=seed)
    half, three_quarters = num_people // 2, num_people * 3 // 4
    train_people, feedback_people, held_out = people[:half], people[half:three_quarters], people[three_quarters:]

    bios = [dict(record, kind="biography")
            for record in bio.biographies(people, rephrasings, seed=seed + 1, name_once=name_once)]
    train_prose = prose(prose_paragraphs, random.Random(seed + 2))
    eval_prose = prose(max(prose_paragraphs // 8, 10), random.Random(seed + 3), exclude=set(train_prose))
    pretrain = bios + [{"text": text, "kind": "prose"} for text in train_prose]
    rng.shuffle(pretrain)
    eval_people = rng.sample(range(num_people), max(num_people // 5, 1))
    fresh = bio.biographies([people[i] for i in eval_people], rephrasings=2, seed=seed + 4, name_once=name_once)[1::2]
    pretrain_eval = ([{"text": r["text"], "kind": "biography", "person": eval_people[r["person"]]} for r in fresh]
                     + [{"text": text, "kind": "prose"} for text in eval_prose])

    sets = {
        "pretrain": pretrain,
        "pretrain_eval": pretrain_eval,
        "sft": qa_conversations(train_people, rng, seed + 5, system_fraction=0.1, two_turn_fraction=0.1,
                                variants="all"),
        "sft_eval": qa_conversations(held_out, rng, seed + 6, system_fraction=0.0, two_turn_fraction=0.0),
        "qa_eval": prompts(held_out, seed + 7, offset=three_quarters),
        "preferences": preferences(train_people + feedback_people, rng, seed + 8),
        "preferences_eval": preferences(held_out, rng, seed + 9),
        "feedback": feedback(train_people + feedback_people, rng, seed + 10),
        "feedback_eval": feedback(held_out, rng, seed + 11)[:120],
        "rl_prompts": prompts(feedback_people, seed + 12, offset=half),
        "people": [dict(name=p.name, **{a: p.attribute(a) for a in bio.ATTRIBUTES},
                        split="train" if i < half else "feedback" if i < three_quarters else "held_out")
                   for i, p in enumerate(people)],
    }
    return sets


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def training_text(sets: dict[str, list[dict]]) -> list[str]:
    lines = [record["text"] for record in sets["pretrain"]]
    for record in sets["sft"]:
        lines += [message["content"] for message in record["messages"]]
    for record in sets["preferences"]:
        lines += [record["prompt"], record["chosen"], record["rejected"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--rephrasings", type=int, default=5)
    parser.add_argument("--prose", type=int, default=100, help="prose paragraphs in the pretraining set")
    parser.add_argument("--name-once", action="store_true",
                        help="bioS style: the full name in a biography's first sentence only, pronouns after it")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    sets = build(args.seed, args.people, args.rephrasings, args.prose, name_once=args.name_once)
    for name, records in sets.items():
        write_jsonl(args.out / f"{name}.jsonl", records)
    with tempfile.TemporaryDirectory() as directory:
        corpus = Path(directory) / "corpus.txt"
        corpus.write_text("\n".join(training_text(sets)) + "\n", encoding="utf-8")
        tokenizer = train_tokenizer([corpus], args.vocab_size, directory, "bpe", character_coverage=1.0)
        (args.out / "tokenizer.model").write_bytes((Path(directory) / "tokenizer.model").read_bytes())

    files = sorted(p for p in args.out.iterdir() if p.suffix in (".jsonl", ".model"))
    manifest = {
        "generator": "tools/make_default_data.py", "seed": args.seed, "people": args.people,
        "rephrasings": args.rephrasings, "prose_paragraphs": args.prose, "name_once": args.name_once, "tokenizer_vocab_size": tokenizer.vocab_size,
        "licence": "generated by jaxllm; same licence as the code",
        "sets": {name: len(records) for name, records in sets.items()},
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {len(files)} files to {args.out} ({total / 1024:.0f} KiB); sets: "
          + ", ".join(f"{name} {count}" for name, count in manifest["sets"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
