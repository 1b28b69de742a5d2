"""Synthetic biographies of invented people, and questions about them (Physics of LMs 3.1 style).

Each person has six attributes: birth date, birth city, university, major, employer and the
employer's city. A biography states all six, one sentence each. It is written either once per person
(`rephrasings=1`: one fixed wording and order) or as K rephrasings with random sentence templates and a
permuted sentence order (the augmentation that makes knowledge extractable). Questions ("What is the
birth city of Ana Lopez?") have short exact answers ("Lisbon").

Everything is generated from a seed with `random.Random`; all names, universities and companies are
invented for this project (cities and fields of study are ordinary nouns).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator, Sequence

from jaxllm.answers import answers_match

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

FIRST_NAMES = (
    "Ana", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Luca",
    "Maya", "Nikolai", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wen", "Ximena",
    "Yusuf", "Zoe", "Amara", "Bruno", "Chloe", "Dmitri", "Emeka", "Fatima", "Gustav", "Hana", "Ivan", "Julia",
    "Kenji", "Leila", "Marco", "Nadia", "Oscar", "Priya", "Rafael", "Sofia", "Tomas", "Uma", "Viktor", "Willa",
    "Yara", "Zane", "Aiden", "Bianca", "Cyrus", "Daria", "Emil", "Freya", "Goran", "Helga", "Ismael", "Jana",
    "Kofi", "Lena", "Milan", "Noor", "Otto", "Paula", "Rohan", "Selin", "Theo", "Ulla", "Valeria", "Wanda",
    "Xavier", "Yuki", "Zara", "Alma", "Boris", "Celia", "Diego", "Esra", "Felix", "Gemma", "Hugo", "Irina",
    "Jamal", "Katya", "Lars", "Mira", "Nico", "Odile", "Pedro", "Rania", "Stefan", "Tanya", "Uri", "Vikram",
    "Ada", "Bashir", "Cosima", "Dalia", "Enzo", "Flora", "Gideon", "Hedda", "Ilya", "Josefa", "Karim", "Lucia",
    "Matteo", "Nina", "Orla", "Pavel", "Rhea", "Sven", "Talia", "Vito", "Wiebke", "Yonas", "Zeynep", "Arjun",
)
LAST_NAMES = (
    "Lopez", "Okafor", "Tanaka", "Novak", "Schmidt", "Haddad", "Ivanova", "Moreau", "Rossi", "Silva",
    "Kowalski", "Nguyen", "Petrov", "Larsen", "Costa", "Fischer", "Mendez", "Sato", "Kaya", "Brennan",
    "Dubois", "Horvat", "Jensen", "Khan", "Lindqvist", "Mahler", "Nakamura", "Oliveira", "Popescu", "Quiroga",
    "Richter", "Suzuki", "Torres", "Varga", "Weber", "Yilmaz", "Zielinski", "Abbott", "Barros", "Castillo",
    "Demir", "Eriksen", "Ferreira", "Gallo", "Hoffmann", "Ibarra", "Jovanovic", "Kovacs", "Lehmann", "Marino",
    "Nowak", "Ortega", "Pereira", "Ramos", "Santos", "Tomic", "Ueda", "Vasquez", "Wagner", "Yamada",
    "Zhou", "Adeyemi", "Bakker", "Conti", "Dahl", "Esposito", "Fontaine", "Gruber", "Holm", "Ito",
    "Jaramillo", "Keller", "Lund", "Moreno", "Nilsen", "Orlov", "Park", "Reyes", "Strand", "Takahashi",
    "Vidal", "Wolff", "Young", "Zamora", "Arslan", "Berg", "Chen", "Duarte", "Engel", "Farah",
    "Garcia", "Hansen", "Iyer", "Janssen", "Kim", "Laine", "Mensah", "Noor", "Osei", "Pinto",
)
CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Dublin", "Krakow", "Porto", "Seville", "Bergen",
    "Accra", "Osaka", "Quito", "Tallinn", "Valencia", "Lyon", "Turin", "Graz", "Leeds", "Cork",
    "Malmo", "Aarhus", "Bilbao", "Gdansk", "Riga", "Vilnius", "Zagreb", "Split", "Dakar", "Tunis",
    "Hanoi", "Busan", "Perth", "Denver", "Austin", "Halifax", "Recife", "Cusco", "Izmir", "Tbilisi",
)
UNIVERSITIES = (
    "Northfield University", "Hartwell Institute", "Silverlake College", "Eastmoor University",
    "Redcliff Polytechnic", "Brightwater University", "Oakridge College", "Stonebridge University",
    "Westhaven Institute", "Larkspur University", "Mariner College", "Highgate Polytechnic",
    "Fernwood University", "Ashford Institute", "Clearview College", "Kingsmere University",
    "Lowell Bay University", "Pinecrest Institute", "Riverside Polytechnic", "Summit Hill College",
)
MAJORS = (
    "biology", "chemistry", "physics", "mathematics", "history", "economics", "philosophy", "geology",
    "linguistics", "architecture", "music", "astronomy", "medicine", "law", "statistics", "psychology",
    "computer science", "civil engineering", "art history", "marine biology",
)
EMPLOYERS = (  # (company, the city it is based in)
    ("Northwind Labs", "Oslo"), ("Bluepeak Systems", "Austin"), ("Copperleaf Foods", "Lyon"),
    ("Granite Bay Bank", "Dublin"), ("Helios Energy", "Seville"), ("Ironwood Motors", "Turin"),
    ("Juniper Health", "Leeds"), ("Kestrel Airlines", "Lisbon"), ("Lumen Optics", "Kyoto"),
    ("Meridian Shipping", "Bergen"), ("Nimbus Software", "Tallinn"), ("Orchid Pharma", "Basel"),
    ("Pioneer Textiles", "Porto"), ("Quartz Robotics", "Osaka"), ("Redwood Publishing", "Halifax"),
    ("Sapphire Telecom", "Nairobi"), ("Tidewater Mining", "Perth"), ("Umbra Games", "Krakow"),
    ("Vantage Insurance", "Zagreb"), ("Willow Architects", "Aarhus"),
)
# Used only to pick "she"/"he" for biographies that name the person once (the paper's bioS style).
FEMININE_FIRST_NAMES = frozenset((
    "Ana", "Carla", "Elena", "Grace", "Ines", "Kira", "Maya", "Olga", "Rosa", "Tara", "Vera", "Wen", "Ximena",
    "Zoe", "Amara", "Chloe", "Fatima", "Hana", "Julia", "Leila", "Nadia", "Priya", "Sofia", "Uma", "Willa", "Yara",
    "Bianca", "Daria", "Freya", "Helga", "Jana", "Lena", "Noor", "Paula", "Selin", "Ulla", "Valeria", "Wanda",
    "Yuki", "Zara", "Alma", "Celia", "Esra", "Gemma", "Irina", "Katya", "Mira", "Odile", "Rania", "Tanya", "Ada",
    "Cosima", "Dalia", "Flora", "Hedda", "Josefa", "Lucia", "Nina", "Orla", "Rhea", "Talia", "Wiebke", "Zeynep",
))
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

# One list of sentence templates per attribute; template 0 is the fixed wording of a single biography.
SENTENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{name} was born on {birth_date}.", "{name}'s birthday is {birth_date}.",
                   "{name} came into the world on {birth_date}.", "The birth date of {name} is {birth_date}."),
    "birth_city": ("{name} was born in {birth_city}.", "{name} comes from {birth_city}.",
                   "{name} grew up in {birth_city}.", "The hometown of {name} is {birth_city}."),
    "university": ("{name} studied at {university}.", "{name} attended {university}.",
                   "{name} graduated from {university}.", "{name} went to {university}."),
    "major": ("{name} majored in {major}.", "{name} studied {major}.", "{name} earned a degree in {major}.",
              "The major of {name} was {major}."),
    "employer": ("{name} works for {employer}.", "{name} is employed by {employer}.", "{name} has a job at {employer}.",
                 "The employer of {name} is {employer}."),
    "employer_city": ("{name} works in {employer_city}.", "The office of {name} is in {employer_city}.",
                      "{name} has a workplace in {employer_city}.", "{name} commutes to work in {employer_city}."),
}

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("What is the birth date of {name}?", "When was {name} born?"),
    "birth_city": ("What is the birth city of {name}?", "Where was {name} born?"),
    "university": ("Which university did {name} attend?", "Which university did {name} study at?"),
    "major": ("What did {name} study?", "What was the major of {name}?"),
    "employer": ("Which company does {name} work for?", "Who is the employer of {name}?"),
    "employer_city": ("Where does {name} work?", "In which city does {name} work?"),
}

RAMBLING_ANSWERS = (
    "That is a good question, and there are many things one could say about it, so let me think.",
    "I am not sure. People move around a lot and records are often incomplete, so it is hard to say.",
    "Well, it depends on what you mean, and there are several ways to look at a question like this.",
    "Many people have asked me this before, and I always find it interesting to think about.",
)


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    def attribute(self, name: str) -> str:
        if name not in ATTRIBUTES:
            raise KeyError(f"unknown attribute '{name}'; one of {', '.join(ATTRIBUTES)}")
        return getattr(self, name)


def max_people() -> int:
    return len(FIRST_NAMES) * len(LAST_NAMES)


def make_people(count: int, seed: int = 0) -> list[Person]:
    """`count` people with unique full names and independently drawn attributes."""
    if count > max_people():
        raise ValueError(f"at most {max_people()} unique names are available, asked for {count}")
    rng = random.Random(seed)
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], count)
    people = []
    for name in names:
        employer, employer_city = rng.choice(EMPLOYERS)
        people.append(Person(
            name=name,
            birth_date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1940, 2004)}",
            birth_city=rng.choice(CITIES), university=rng.choice(UNIVERSITIES), major=rng.choice(MAJORS),
            employer=employer, employer_city=employer_city))
    return people


def pronouns(person: Person) -> tuple[str, str, str]:
    """(subject, possessive, object) pronouns of a person, from the first name."""
    feminine = person.name.split()[0] in FEMININE_FIRST_NAMES
    return ("She", "Her", "her") if feminine else ("He", "His", "him")


def _refer_by_pronoun(template: str, person: Person) -> str:
    """A sentence template with the name replaced by the fitting pronoun."""
    subject, possessive, object_ = pronouns(person)
    if template.startswith("{name}'s"):
        return possessive + template[len("{name}'s"):]
    if template.startswith("{name}"):
        return subject + template[len("{name}"):]
    if template.startswith("The ") and " of {name}" in template:  # "The major of {name} was" -> "Her major was"
        noun, rest = template[len("The "):].split(" of {name}", 1)
        return f"{possessive} {noun}{rest}"
    return template.replace("{name}", object_)


def biography(person: Person, rng: random.Random | None = None, *, permute: bool = True,
              name_once: bool = False) -> str:
    """One biography: fixed wording and order when `rng` is None, else random templates (and order).

    name_once: name the person in the first sentence only and use pronouns after it, as the paper's
    bioS data does (otherwise every sentence repeats the full name, the paper's "fullname" augmentation).
    """
    fields = dataclasses.asdict(person)
    order = list(ATTRIBUTES)
    if rng is not None and permute:
        rng.shuffle(order)
    sentences = []
    for position, attribute in enumerate(order):
        templates = SENTENCE_TEMPLATES[attribute]
        template = templates[0] if rng is None else rng.choice(templates)
        if name_once and position > 0:
            template = _refer_by_pronoun(template, person)
        sentences.append(template.format(**fields))
    return " ".join(sentences)


def biographies(people: Sequence[Person], rephrasings: int = 1, seed: int = 0,
                permute: bool = True, name_once: bool = False) -> list[dict]:
    """Records {"text", "person"}: one fixed biography per person (rephrasings=1) or K random rephrasings."""
    rng = random.Random(seed)
    records = []
    for index, person in enumerate(people):
        for _ in range(rephrasings):
            text = (biography(person, name_once=name_once) if rephrasings == 1
                    else biography(person, rng, permute=permute, name_once=name_once))
            records.append({"text": text, "person": index})
    return records


def question(person: Person, attribute: str, variant: int = 0) -> str:
    templates = QUESTION_TEMPLATES[attribute]
    return templates[variant % len(templates)].format(name=person.name)


def answer(person: Person, attribute: str) -> str:
    return person.attribute(attribute)


def qa_pairs(people: Sequence[Person], seed: int = 0, attributes: Sequence[str] = ATTRIBUTES,
             variants: str = "random") -> Iterator[dict]:
    """Records {"question", "answer", "attribute", "person"} for every person and attribute.

    variants: "random" picks a question wording per pair, "first" always the first, "all" yields each.
    """
    rng = random.Random(seed)
    for index, person in enumerate(people):
        for attribute in attributes:
            count = len(QUESTION_TEMPLATES[attribute])
            chosen = {"random": [rng.randrange(count)], "first": [0], "all": list(range(count))}[variants]
            for variant in chosen:
                yield {"question": question(person, attribute, variant), "answer": answer(person, attribute),
                       "attribute": attribute, "person": index}


# The values each attribute but the birth date is drawn from.
VALUE_POOLS: dict[str, tuple[str, ...]] = {
    "birth_city": CITIES, "university": UNIVERSITIES, "major": MAJORS,
    "employer": tuple(company for company, _ in EMPLOYERS),
    "employer_city": tuple(sorted({city for _, city in EMPLOYERS})),
}


def wrong_answer(person: Person, attribute: str, rng: random.Random) -> str:
    """A plausible but wrong value for the attribute (another value from the same pool)."""
    right = person.attribute(attribute)
    if attribute == "birth_date":
        while True:
            candidate = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1940, 2004)}"
            if candidate != right:
                return candidate
    return rng.choice([value for value in VALUE_POOLS[attribute] if value != right])


def exact_match(prediction: str, reference: str) -> bool:
    """The verifiable reward: equal after `jaxllm.answers.normalize_answer` (case, whitespace, final periods)."""
    return answers_match(prediction, reference)


def experiment_sets(num_people: int, rephrasings: int, seed: int = 0, permute: bool = True,
                    name_once: bool = False) -> dict[str, list[dict]]:
    """The Physics-of-LMs 3.1 knowledge experiment as record lists (write them as JSONL for `jsonl:` sources).

    pretrain: biographies of ALL people (one fixed biography each when rephrasings=1, else K rephrasings);
    sft: QA conversations about the first half; qa_train / qa_eval: {"prompt", "reference", "attribute",
    "person"} about the first half (memorised in SFT) / the second half (never seen in QA form).
    """
    people = make_people(num_people, seed)
    half = num_people // 2
    pretrain = [{"text": record["text"], "person": record["person"]}
                for record in biographies(people, rephrasings, seed=seed + 1, permute=permute, name_once=name_once)]
    random.Random(seed + 2).shuffle(pretrain)

    def prompts(group: Sequence[Person], offset: int, pair_seed: int) -> list[dict]:
        return [{"prompt": pair["question"], "reference": pair["answer"], "attribute": pair["attribute"],
                 "person": pair["person"] + offset} for pair in qa_pairs(group, seed=pair_seed)]

    qa_train = prompts(people[:half], 0, seed + 3)
    sft = [{"messages": [{"role": "user", "content": pair["prompt"]},
                         {"role": "assistant", "content": pair["reference"]}]} for pair in qa_train]
    return {"pretrain": pretrain, "sft": sft, "qa_train": qa_train, "qa_eval": prompts(people[half:], half, seed + 4)}
