"""A pipeline recipe (YAML): the stages it trains, the tokenizer and the evaluation after every stage.

    tokenizer: {train: true, vocab_size: 512, model_type: bpe, input: default:pretrain}
    common: [model.preset=tiny]            # overrides for every stage
    stages:
      - {name: pretrain, recipe: configs/pretrain_tiny.yaml, overrides: [train.steps=300]}
      - {name: sft, recipe: configs/sft_tiny.yaml}
      - name: dpo
        recipe: configs/dpo_tiny.yaml
        own_answers: {prompts: default:rl_prompts, samples: 4, mix: [default:preferences]}  # optional
    evaluation: {qa_source: default:qa_eval, qa_examples: 120, own_mistakes_after: sft, ...}

`load_recipe` reads and checks one (every stage's config is loaded and checked before anything runs);
`jaxllm.pipeline.run_pipeline` runs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from jaxllm import evaluate
from jaxllm import settings
from jaxllm import stages as stages_lib
from jaxllm.config import ConfigError, load_config, resolve_recipe
from jaxllm.lecture.own_pairs import OwnAnswersSpec

DEFAULT_RECIPE = "configs/pipeline_tiny.yaml"


@dataclasses.dataclass
class StageSpec:
    name: str
    recipe: str
    overrides: list[str] = dataclasses.field(default_factory=list)
    own_answers: OwnAnswersSpec | None = None


@dataclasses.dataclass
class EvaluationSpec:
    qa_source: str = "default:qa_eval"
    qa_examples: int = 120
    trained_qa_source: str = "default:sft"
    trained_qa_examples: int = 60
    text_source: str = "default:pretrain_eval"
    text_batches: int = 4
    preference_source: str = "default:preferences_eval"
    preference_pairs: int = 96
    prompts: list[str] = dataclasses.field(default_factory=list)
    max_new_tokens: int = 24
    # The completion probe ("<name> was born in" -> the most likely value of the attribute's pool) over the
    # first probe_people held-out people of probe_source (records with the six attributes and "split").
    probe_source: str = "default:people"
    probe_people: int = 50
    # After the stage named here, its wrong greedy answers to the held-out questions (qa_source, qa_examples)
    # become pairs (reference vs that answer) scored for it and every later stage: the "own mistakes" column.
    own_mistakes_after: str = ""


@dataclasses.dataclass
class TokenizerSpec:
    train: bool = True
    vocab_size: int = 512
    model_type: str = "bpe"
    input: str | list[str] = "default:pretrain"  # one source or a list; text records and chat messages are read
    add_dummy_prefix: bool = False  # a word opening a document gets the same tokens as inside a sentence


@dataclasses.dataclass
class PipelineRecipe:
    stages: list[StageSpec]
    common: list[str] = dataclasses.field(default_factory=list)
    tokenizer: TokenizerSpec = dataclasses.field(default_factory=TokenizerSpec)
    evaluation: EvaluationSpec = dataclasses.field(default_factory=EvaluationSpec)


def resolve_path(path: str | Path) -> Path:
    """A recipe path as given, else the built-in recipe it names (`configs/sft_tiny.yaml`, `sft_tiny`), so
    pipeline recipes that name stage recipes work from any directory after `pip install`."""
    try:
        return resolve_recipe(path)
    except ConfigError:
        return Path(path)  # the caller says that it does not exist


def load_recipe(path: str | Path) -> PipelineRecipe:
    path = resolve_path(path)
    if not path.exists():
        raise ConfigError(f"pipeline recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict) or not raw.get("stages"):
        raise ConfigError(f"{path}: a pipeline recipe needs a 'stages' list")
    stages = [settings.build(StageSpec, s, f"{path}: stages[{i}]") for i, s in enumerate(raw.pop("stages"))]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must be unique, got {names}")
    recipe = PipelineRecipe(
        stages=stages,
        common=list(raw.pop("common", []) or []),
        tokenizer=settings.build(TokenizerSpec, raw.pop("tokenizer", {}) or {}, f"{path}: tokenizer"),
        evaluation=settings.build(EvaluationSpec, raw.pop("evaluation", {}) or {}, f"{path}: evaluation"),
    )
    settings.check_keys(raw, ("stages", "common", "tokenizer", "evaluation"), str(path))
    if recipe.evaluation.own_mistakes_after and recipe.evaluation.own_mistakes_after not in names:
        raise ConfigError(f"{path}: evaluation.own_mistakes_after={recipe.evaluation.own_mistakes_after!r} "
                          f"names no stage; the stages are {', '.join(names)}")
    for spec in recipe.stages:
        stages_lib.of(load_config(resolve_path(spec.recipe), recipe.common + spec.overrides))  # fail early
        if spec.own_answers is not None:
            check_held_out(spec, recipe.evaluation.qa_source)
    return recipe


def check_held_out(spec: StageSpec, qa_source: str) -> None:
    """A stage's own pairs must not ask the held-out questions the report scores (that would train on them)."""
    own = spec.own_answers
    held_out = {r["prompt"] for r in map(qa_record, evaluate.read_records(qa_source)) if r}
    leaked = [r.get("prompt") for r in evaluate.read_records(own.prompts, own.questions or None)
              if r.get("prompt") in held_out]
    if leaked:
        raise ConfigError(f"stage {spec.name}: {len(leaked)} of own_answers.prompts={own.prompts} are held-out "
                          f"questions of evaluation.qa_source={qa_source} (e.g. {leaked[0]!r}); training on them "
                          "would make the held-out numbers meaningless: use other prompts")


def qa_record(record: dict) -> dict | None:
    """An SFT conversation (or prompt/reference record) -> {"prompt", "reference"}."""
    if "prompt" in record and "reference" in record:
        return record
    messages = record.get("messages") or []
    users = [m["content"] for m in messages if m.get("role") == "user"]
    answers = [m["content"] for m in messages if m.get("role") == "assistant"]
    if users and answers:
        return {"prompt": users[0], "reference": answers[0]}
    return None


__all__ = ["DEFAULT_RECIPE", "EvaluationSpec", "PipelineRecipe", "StageSpec", "TokenizerSpec", "check_held_out",
           "load_recipe", "qa_record", "resolve_path"]
