"""The built-in tasks, on the embedded default data (what `jaxllm pipeline` trains on).

- heldout_text: bits per byte (and perplexity) of the held-out text `default:pretrain_eval`.
- bio_qa: held-out biography QA (`default:qa_eval`: people whose QA pairs SFT never saw), greedy answer
  through the chat template, exact match.
- bio_mc: the same people and attributes as multiple choice: the right value against 3 distractors drawn
  from the same pool (cities, universities, ...), asked through the chat template; an easier probe
  than generation, and it needs no EOS.
- bio_mc_text: the same choices as plain sentence completion ("Lucia Wagner was born in" + " Seville"):
  what a pretrained (base) model stores, before any fine-tuning teaches it to answer questions.

The multiple-choice sets are generated deterministically from `jaxllm.data.biographies` and the
embedded people (`default:people`), not shipped as files.
"""

from __future__ import annotations

import functools
import random

from jaxllm.data import biographies as bio
from jaxllm.data.sources import read_records
from jaxllm.tasks import Task, register_task

CHOICES = 4


@functools.lru_cache(maxsize=1)
def _held_out_people() -> tuple[bio.Person, ...]:
    names = [field.name for field in bio.dataclasses.fields(bio.Person)]
    people = [bio.Person(**{name: record.data[name] for name in names})
              for record in read_records("default:people") if record.data.get("split") == "held_out"]
    return tuple(people)


def _choices(person: bio.Person, attribute: str) -> tuple[list[str], int]:
    """The right value and CHOICES - 1 distinct wrong ones, in an order fixed by (person, attribute)."""
    rng = random.Random(f"bio_mc:{person.name}:{attribute}")
    right = person.attribute(attribute)
    options = [right]
    while len(options) < CHOICES:
        wrong = bio.wrong_answer(person, attribute, rng)
        if wrong not in options:
            options.append(wrong)
    rng.shuffle(options)
    return options, options.index(right)


def biography_mc_records(form: str) -> list[dict]:
    """One record per held-out person and attribute: {"question", "choices", "answer", "attribute", "person"}.

    form "question": a question ("Where was Ana Lopez born?"); "sentence": the opening of the fixed
    biography sentence ("Ana Lopez was born in")."""
    records = []
    for number, person in enumerate(_held_out_people()):
        for position, attribute in enumerate(bio.ATTRIBUTES):
            choices, answer = _choices(person, attribute)
            if form == "question":
                prompt = bio.question(person, attribute, variant=number + position)
            else:
                template = bio.SENTENCE_TEMPLATES[attribute][0]
                prompt = template.split("{" + attribute + "}")[0].rstrip().format(name=person.name)
            records.append({"question": prompt, "choices": choices, "answer": answer, "attribute": attribute,
                            "person": person.name})
    return records


@register_task("heldout_text")
def heldout_text() -> Task:
    return Task(name="heldout_text", kind="perplexity", source="default:pretrain_eval",
                description="bits per byte and perplexity of the held-out text default:pretrain_eval")


@register_task("bio_qa")
def bio_qa() -> Task:
    return Task(name="bio_qa", kind="generate", source="default:qa_eval",
                fields={"question": "prompt", "answer": "reference"}, chat=True, metric="exact_match",
                max_new_tokens=24, description="held-out biography QA (default:qa_eval), greedy, chat template, "
                                               "exact match")


@register_task("bio_mc")
def bio_mc() -> Task:
    return Task(name="bio_mc", kind="multiple_choice", loader=lambda: biography_mc_records("question"), chat=True,
                description="held-out biography questions, the right attribute vs 3 distractors, chat template")


@register_task("bio_mc_text")
def bio_mc_text() -> Task:
    return Task(name="bio_mc_text", kind="multiple_choice", loader=lambda: biography_mc_records("sentence"),
                description="held-out people's attributes as sentence completion vs 3 distractors (base models)")
