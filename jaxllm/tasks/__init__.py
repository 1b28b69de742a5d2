"""Evaluation tasks: small definitions registered by name, run by `jaxllm eval` (see jaxllm.evaluate).

A task is a `Task`: a kind, where its records come from (a data source the data layer reads, or a
Python loader), how record fields map onto the kind's canonical fields, and a few prompt settings.

    kind              canonical fields                      scored by
    perplexity        text                                  log-likelihood of every token (bits per byte)
    multiple_choice   question, choices, answer             log-likelihood of each choice (sum, per byte)
    generate          question, answer                      greedy answer vs reference (exact/contains/regex)
    pairwise          question, [baseline]                  a judge compares two answers in both orders

Ways to name a task on the command line (`jaxllm eval --task SPEC`):
- a registered name: `heldout_text`, `bio_qa`, `bio_mc`, `bio_mc_text` (built in), or one added with
  `register_task`;
- a YAML file whose keys are `Task` fields (`name`, `kind`, `source`, `fields`, `template`, ...);
- `KIND:SOURCE` for an ad-hoc task over any data source: KIND is `perplexity`, `mc` (multiple_choice),
  `generate` or `pairwise`; SOURCE is `jsonl:PATH`, `tfds:NAME[:SPLIT]`, `text:PATH`, `default:NAME` or a
  bare file path (read as JSONL, or as text for perplexity). `jsonl_mc:PATH` etc. are accepted too.
  Map record fields with `--field question=query --field choices=opa,opb,opc,opd --field answer=label`
  (a dotted path reads nested fields, `choices.text`; a comma list gathers several fields into a list).
  Ad-hoc pairwise tasks use the chat template by default; the others do not (`--chat` turns it on).

A YAML task (HellaSwag from a TFDS dataset prepared in array_record format):

    name: hellaswag
    kind: multiple_choice
    source: tfds:hellaswag:validation
    fields: {question: context, choices: endings, answer: label}
    num_fewshot: 5
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxllm import settings
from jaxllm.data.chat import validate_messages
from jaxllm.data.report import DataError
from jaxllm.data.sources import iter_records
from jaxllm.errors import UsageError

KINDS = ("perplexity", "multiple_choice", "generate", "pairwise")
KIND_ALIASES = {"perplexity": "perplexity", "ppl": "perplexity", "text": "perplexity", "mc": "multiple_choice",
                "multiple_choice": "multiple_choice", "generate": "generate", "gen": "generate",
                "pairwise": "pairwise"}
CANONICAL_FIELDS = {
    "perplexity": ("text",),
    "multiple_choice": ("question", "choices", "answer"),
    "generate": ("question", "answer"),
    "pairwise": ("question", "baseline"),
}
GENERATIVE_METRICS = ("exact_match", "contains", "regex")
GSM8K_ANSWER_REGEX = r"####\s*(-?[0-9][0-9.,]*)"
DEFAULT_JUDGE_TEMPLATE = ("Which answer to the question is better? Reply with the letter A or B only.\n"
                          "Question: {question}\nAnswer A: {answer_a}\nAnswer B: {answer_b}")
_SOURCE_KINDS = ("default", "jsonl", "text", "tfds", "parquet")


@dataclasses.dataclass
class Task:
    """One evaluation task. Only `name` and `kind` are required; the rest have working defaults."""

    name: str
    kind: str
    source: str = ""  # a data source spec (default:/jsonl:/text:/tfds:/parquet:); or use `loader`
    loader: Callable[[], list[dict]] | None = None  # Python-generated records (e.g. bio_mc)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)  # canonical name -> record field path
    template: str = "{question}"  # the prompt; may use the canonical names and any top-level record field
    chat: bool = False  # wrap prompts in the chat template (for SFT'd models)
    num_fewshot: int = 0  # solved examples before each prompt (chat: as earlier turns)
    fewshot_source: str = ""  # where the shots come from; default: the task's other examples
    fewshot_separator: str = "\n\n"
    fewshot_seed: int = 1234
    choice_prefix: str = " "  # plain (non-chat) prompts: text between the prompt and a choice / answer
    metric: str = "exact_match"  # generate: exact_match | contains | regex
    answer_regex: str = GSM8K_ANSWER_REGEX  # generate with metric regex: group 1 (else the match) is the answer
    max_new_tokens: int = 32  # generate / pairwise answers
    stop: tuple[str, ...] = ()  # generate: the answer is cut at the first of these strings
    judge_template: str = DEFAULT_JUDGE_TEMPLATE  # pairwise: {question} {answer_a} {answer_b}
    limit: int = 0  # evaluate the first N examples only (0 = all)
    description: str = ""

    def __post_init__(self):
        kind = KIND_ALIASES.get(self.kind)
        if kind is None:
            raise UsageError(f"task '{self.name}': kind '{self.kind}' must be one of {', '.join(KINDS)}")
        self.kind = kind
        self.stop = tuple(self.stop)
        self.fields = dict(self.fields)
        bad = [name for name, path in self.fields.items() if not isinstance(path, str) or not path.strip()]
        if bad:
            raise UsageError(f"task '{self.name}': the mapping of '{bad[0]}' must be a record field name (a dotted "
                             f"path, or a comma list for choices), got {self.fields[bad[0]]!r}")
        unknown = sorted(set(self.fields) - set(CANONICAL_FIELDS[kind]))
        if unknown:
            raise UsageError(f"task '{self.name}': field mapping for {', '.join(unknown)}, but a {kind} task has "
                             f"the fields {', '.join(CANONICAL_FIELDS[kind])}")
        if self.metric not in GENERATIVE_METRICS:
            raise UsageError(f"task '{self.name}': metric '{self.metric}' must be one of "
                             f"{', '.join(GENERATIVE_METRICS)}")
        if self.metric == "regex":
            try:
                re.compile(self.answer_regex)
            except re.error as error:
                raise UsageError(f"task '{self.name}': answer_regex {self.answer_regex!r} is not a valid regular "
                                 f"expression ({error})") from None
        if self.num_fewshot < 0 or self.limit < 0 or self.max_new_tokens < 1:
            raise UsageError(f"task '{self.name}': num_fewshot and limit must be >= 0 and max_new_tokens >= 1")
        if not self.source and self.loader is None:
            raise UsageError(f"task '{self.name}' needs a 'source' (e.g. jsonl:data.jsonl, tfds:NAME:SPLIT)")
        if self.source:
            self.source = _as_source(self.source, self.kind)

    # -- records ---------------------------------------------------------------------------------
    def records(self, limit: int | None = None) -> list[tuple[str, dict]]:
        """(where, record) pairs in order, at most `limit` (0/None = all)."""
        limit = limit or None
        if self.loader is not None:
            rows = self.loader()
            return [(f"{self.name} example {i}", dict(r)) for i, r in enumerate(rows[:limit])]

        out = []
        for record in iter_records(self.source, self.fields.get("text", "text")):
            out.append((record.where, record.data))
            if limit is not None and len(out) >= limit:
                break
        if not out:
            raise DataError(f"task '{self.name}': the source {self.source} has no records")
        return out

    def examples(self, limit: int | None = None) -> list["Example"]:
        """The task's records parsed into canonical fields (a DataError names the record and field)."""
        return [parse_example(self, where, record) for where, record in self.records(limit)]

    def fewshot_pool(self, examples: Sequence["Example"]) -> list["Example"]:
        if not self.num_fewshot:
            return []
        if self.fewshot_source:
            shots = dataclasses.replace(self, source=self.fewshot_source, loader=None, num_fewshot=0, limit=0)
            return shots.examples()
        if self.limit or len(examples) < self.num_fewshot + 1:
            return self.examples()  # the whole source, not only the evaluated part
        return list(examples)

    def fewshot(self, example: "Example", pool: Sequence["Example"]) -> list["Example"]:
        """`num_fewshot` examples other than `example`, the same ones for the same example every run."""
        others = [shot for shot in pool if shot.where != example.where]
        if len(others) < self.num_fewshot:
            raise UsageError(f"task '{self.name}': num_fewshot={self.num_fewshot} but only {len(others)} other "
                             "examples are available; lower it or set fewshot_source")
        rng = random.Random(f"{self.fewshot_seed}:{example.where}")
        return rng.sample(others, self.num_fewshot)

    def prompt_text(self, example: "Example") -> str:
        return render_template(self.template, example, self.name)


@dataclasses.dataclass
class Example:
    """A record in canonical form. `values` holds the canonical fields and the record's own fields."""

    where: str
    values: dict[str, Any]

    @property
    def question(self) -> str:
        return self.values["question"]

    @property
    def choices(self) -> list[str]:
        return self.values["choices"]

    @property
    def answer(self):
        return self.values["answer"]

    @property
    def text(self) -> str:
        return self.values["text"]


# ----------------------------------------------------------------------------------------------
# Fields


def lookup(record: Any, path: str, where: str) -> Any:
    """A field by dotted path; through a list of dicts the rest of the path is read from each item."""
    value = record
    parts = path.split(".")
    for number, part in enumerate(parts):
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            rest = ".".join(parts[number:])
            return [lookup(item, rest, where) for item in value]
        if not isinstance(value, dict) or part not in value:
            fields = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{where}: record has no field '{path}' (fields: {fields or 'none'})", "missing_field")
        value = value[part]
    return value


def _field(task: Task, record: dict, name: str, where: str, required: bool = True) -> Any:
    path = task.fields.get(name, name)
    if "," in path:
        return [lookup(record, part.strip(), where) for part in path.split(",") if part.strip()]
    if not required and path.split(".")[0] not in record:
        return None
    try:
        return lookup(record, path, where)
    except DataError as error:
        raise DataError(f"{error}; task '{task.name}' reads its '{name}' from '{path}': map another record field with "
                        f"--field {name}=FIELD (or the task's 'fields')", "missing_field") from None


def _string(value: Any, task: Task, name: str, where: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: task '{task.name}' field '{task.fields.get(name, name)}' ({name}) must be a "
                        f"string, got {type(value).__name__}", "wrong_type")
    return value


def _answer_index(answer: Any, choices: list[str], task: Task, where: str) -> int:
    """An answer as a choice index: an int, a digit string, a letter A, B, ... or the choice's text."""
    name = task.fields.get("answer", "answer")
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        index = ord(answer.strip().upper()) - ord("A")
    else:
        raise DataError(f"{where}: task '{task.name}' answer field '{name}' is {answer!r}: give a choice index "
                        f"(0-based), a letter (A, B, ...) or the text of one of the choices", "wrong_type")
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: task '{task.name}' answer {answer!r} is out of range for {len(choices)} choices",
                        "wrong_type")
    return index


def parse_example(task: Task, where: str, record: dict) -> Example:
    values = {k: v for k, v in record.items() if isinstance(k, str)}
    if task.kind == "perplexity":
        values["text"] = _string(_field(task, record, "text", where), task, "text", where)
        return Example(where, values)
    question = _field(task, record, "question", where)
    if isinstance(question, list) and task.kind != "multiple_choice":
        messages = validate_messages(question, where, task.fields.get("question", "question"))
        while messages and messages[-1]["role"] == "assistant":  # the prompt is the conversation before the answer
            messages.pop()
        if not messages:
            raise DataError(f"{where}: task '{task.name}': the conversation has no user message to answer",
                            "wrong_type")
        values["messages"] = messages
        question = messages[-1]["content"]
    values["question"] = _string(question, task, "question", where)
    if task.kind == "multiple_choice":
        choices = _field(task, record, "choices", where)
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{where}: task '{task.name}' choices ('{task.fields.get('choices', 'choices')}') must be "
                            f"a list of at least 2 strings, got {choices!r:.80}", "wrong_type")
        values["choices"] = [_string(c, task, "choices", where) for c in choices]
        values["answer"] = _answer_index(_field(task, record, "answer", where), values["choices"], task, where)
    elif task.kind == "generate":
        answer = _field(task, record, "answer", where)
        answers = answer if isinstance(answer, list) else [answer]
        if not answers:
            raise DataError(f"{where}: task '{task.name}' has an empty answer list", "wrong_type")
        values["answer"] = [_string(a, task, "answer", where) for a in answers]
    elif task.kind == "pairwise":
        baseline = _field(task, record, "baseline", where, required=False)
        values["baseline"] = None if baseline is None else _string(baseline, task, "baseline", where)
    return Example(where, values)


class _Missing(dict):
    def __init__(self, values: dict, task: str):
        super().__init__(values)
        self.task = task

    def __missing__(self, key):
        raise UsageError(f"task '{self.task}': the template uses {{{key}}} but the record has no such field "
                         f"(fields: {', '.join(sorted(self)) or 'none'})")


def render_template(template: str, example: Example, task_name: str) -> str:
    try:
        return template.format_map(_Missing(example.values, task_name))
    except (IndexError, ValueError) as error:
        raise UsageError(f"task '{task_name}': template {template!r} cannot be filled: {error}") from None


# ----------------------------------------------------------------------------------------------
# The registry


_REGISTRY: dict[str, Callable[[], Task]] = {}


def register_task(name: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Decorator for a function that returns a Task; the task is then available by `name`."""
    def register(factory: Callable[[], Task]) -> Callable[[], Task]:
        if name in _REGISTRY:
            raise ValueError(f"task '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory
    return register


def _load_builtins() -> None:
    from jaxllm.tasks import builtin  # noqa: F401  (registers on import)


def list_tasks() -> dict[str, str]:
    """Registered task names -> one-line descriptions."""
    _load_builtins()
    return {name: _REGISTRY[name]().description for name in sorted(_REGISTRY)}


def is_registered(spec: str) -> bool:
    """Whether `spec` names a registered task (rather than a YAML file or KIND:SOURCE)."""
    _load_builtins()
    return spec in _REGISTRY


def _as_source(spec: str, kind: str) -> str:
    """A data source spec; a bare path becomes jsonl:PATH (text:PATH for a perplexity task on a non-.jsonl)."""
    head = spec.split(":", 1)[0]
    if head in _SOURCE_KINDS and ":" in spec:
        return spec
    if kind == "perplexity" and not spec.endswith(".jsonl"):
        return f"text:{spec}"
    return f"jsonl:{spec}"


def load_task_file(path: str | Path) -> Task:
    """A task from a YAML file whose keys are Task fields."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"task file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a task file must be a mapping of Task fields (name, kind, source, ...)")
    raw.setdefault("name", path.stem)
    if "kind" not in raw:
        raise UsageError(f"{path}: a task needs a 'kind' ({', '.join(KINDS)})")
    if "fields" in raw and not isinstance(raw["fields"], dict):
        raise UsageError(f"{path}: 'fields' must map canonical names to record fields, e.g. {{question: query}}")
    if raw.get("source") and not str(raw["source"]).split(":", 1)[0] in _SOURCE_KINDS:
        source = Path(str(raw["source"]))
        if not source.is_absolute():  # a relative file is relative to the task file
            raw["source"] = str(path.parent / source)
    return settings.build(Task, raw, str(path), UsageError, exclude=("loader",))


def _adhoc_name(kind: str, source: str) -> str:
    tail = source.rsplit(":", 1)[-1] if source.startswith("tfds:") else source.split(":", 1)[-1]
    stem = Path(tail).stem if "/" in tail or "." in tail else tail
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_]+', '_', stem).strip('_') or 'data'}"


def get_task(spec: str) -> Task:
    """A task by registered name, YAML file, or `KIND:SOURCE` (see the module docstring)."""
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]()
    if spec.endswith((".yaml", ".yml")):
        return load_task_file(spec)
    head, sep, rest = spec.partition(":")
    if sep and head.startswith("jsonl_") and KIND_ALIASES.get(head[len("jsonl_"):]):
        head, rest = head[len("jsonl_"):], f"jsonl:{rest}"
    if sep and head in KIND_ALIASES and rest:
        kind = KIND_ALIASES[head]
        source = _as_source(rest, kind)
        # Pairwise compares assistant answers: chat by default (--no-chat for base models).
        return Task(name=_adhoc_name(head, source), kind=kind, source=source, chat=kind == "pairwise")
    known = ", ".join(sorted(_REGISTRY))
    raise UsageError(f"unknown task '{spec}': use a registered task ({known}), a task YAML file, or KIND:SOURCE "
                     "with KIND one of perplexity, mc, generate, pairwise (e.g. mc:jsonl:questions.jsonl)")


def with_overrides(task: Task, **overrides: Any) -> Task:
    """A copy with some fields replaced (None values are ignored; `fields` entries are merged)."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "fields" in changes:
        changes["fields"] = {**task.fields, **changes["fields"]}
        changes["fields"] = {k: v for k, v in changes["fields"].items() if k in CANONICAL_FIELDS[task.kind]}
    return dataclasses.replace(task, **changes)


__all__ = ["Task", "Example", "KINDS", "CANONICAL_FIELDS", "GSM8K_ANSWER_REGEX", "DEFAULT_JUDGE_TEMPLATE",
           "register_task", "get_task", "is_registered", "list_tasks", "load_task_file", "with_overrides", "lookup",
           "parse_example", "render_template"]
