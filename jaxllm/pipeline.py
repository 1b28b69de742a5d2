"""`jaxllm pipeline`: the whole recipe end to end — tokenizer, pretraining, SFT, a feedback stage —
with an evaluation after every stage and a report (Markdown + PNG plots + JSON).

A pipeline recipe (YAML) names the stage recipes and the evaluation:

    tokenizer: {train: true, vocab_size: 512, model_type: bpe, input: default:pretrain}
    common: [model.preset=tiny]            # overrides for every stage
    stages:
      - {name: pretrain, recipe: configs/pretrain_tiny.yaml, overrides: [train.steps=300]}
      - {name: sft, recipe: configs/sft_tiny.yaml}
      - {name: dpo, recipe: configs/dpo_tiny.yaml}
    evaluation: {qa_source: default:qa_eval, qa_examples: 120, text_source: default:pretrain_eval, ...}

Each stage trains in `WORKDIR/<name>/` from the previous stage's checkpoint. Running the command
again skips finished stages and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from jaxllm import checkpoint as ckpt
from jaxllm.config import ConfigError, load_config

DEFAULT_RECIPE = "configs/pipeline_tiny.yaml"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class StageSpec:
    name: str
    recipe: str
    overrides: list[str] = dataclasses.field(default_factory=list)


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
    """A recipe path as given, else relative to the source checkout (so `configs/...` works anywhere)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    candidate = PACKAGE_ROOT / path
    return candidate if candidate.exists() else path


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    return cls(**data)


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
    stages = [_build(StageSpec, s, f"{path}: stages[{i}]") for i, s in enumerate(raw.pop("stages"))]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must be unique, got {names}")
    recipe = PipelineRecipe(
        stages=stages,
        common=list(raw.pop("common", []) or []),
        tokenizer=_build(TokenizerSpec, raw.pop("tokenizer", {}) or {}, f"{path}: tokenizer"),
        evaluation=_build(EvaluationSpec, raw.pop("evaluation", {}) or {}, f"{path}: evaluation"),
    )
    if raw:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(raw))}; valid: stages, common, tokenizer, "
                          "evaluation")
    for stage in recipe.stages:
        load_config(resolve_path(stage.recipe), recipe.common + stage.overrides)  # fail early on bad recipes
    return recipe


# ----------------------------------------------------------------------------------------------


def prepare_tokenizer(recipe: PipelineRecipe, workdir: Path, log: Callable[[str], None]) -> str:
    """Trains the pipeline's tokenizer once (or reuses it); returns the `data.tokenizer` value."""
    spec = recipe.tokenizer
    if not spec.train:
        return "default"
    directory = workdir / "tokenizer"
    if (directory / "tokenizer.model").exists():
        log(f"[tokenizer] reusing {directory}")
        return str(directory)
    from jaxllm.data.sources import iter_records
    from jaxllm.data.tokenizer import train_tokenizer

    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    sources = [spec.input] if isinstance(spec.input, str) else list(spec.input)
    if not sources or not all(isinstance(source, str) for source in sources):
        raise ConfigError(f"tokenizer.input={spec.input!r} must be a data source or a list of them, "
                          "e.g. [default:pretrain, default:sft]")
    with corpus.open("w") as handle:
        for source in sources:
            for record in iter_records(source):
                for text in _record_texts(record.data):
                    handle.write(text.replace("\n", " ") + "\n")
    train_tokenizer([str(corpus)], spec.vocab_size, str(directory), model_type=spec.model_type,
                    add_dummy_prefix=spec.add_dummy_prefix)
    corpus.unlink()
    log(f"[tokenizer] trained a {spec.model_type} tokenizer of {spec.vocab_size} pieces on {', '.join(sources)} "
        f"in {time.perf_counter() - started:.1f}s -> {directory}")
    return str(directory)


def _record_texts(data: dict) -> list[str]:
    """The text of a pretraining record, or the contents of a chat record's messages (for tokenizer training)."""
    texts = [data.get("text")] + [m.get("content") for m in data.get("messages") or [] if isinstance(m, dict)]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def stage_configs(recipe: PipelineRecipe, workdir: Path, tokenizer: str) -> list[tuple[StageSpec, Any, Path]]:
    out, previous = [], None
    for stage in recipe.stages:
        overrides = list(recipe.common) + [f"data.tokenizer={tokenizer}"] + list(stage.overrides)
        if previous is not None and not any(o.startswith(("init_from=", "train.init_from=")) for o in stage.overrides):
            overrides.append(f"train.init_from={previous}")
        config = load_config(resolve_path(stage.recipe), overrides)
        stage_dir = workdir / stage.name
        out.append((stage, config, stage_dir))
        previous = stage_dir
    return out


def stage_finished(config, stage_dir: Path) -> bool:
    return ckpt.latest_step(stage_dir) == config.train.steps and (stage_dir / "summary.json").exists()


def evaluate_stage(stage_dir: Path, spec: EvaluationSpec) -> dict[str, Any]:
    """Evaluation of one finished stage (cached in the stage's eval.json)."""
    cached = stage_dir / "eval.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from jaxllm import evaluate
    from jaxllm.generate import load_model_for_inference

    config, graphdef, params, tokenizer = load_model_for_inference(stage_dir)
    model = (config, graphdef, params, tokenizer)
    started = time.perf_counter()
    result: dict[str, Any] = {}
    result["text"] = evaluate.perplexity(*model, spec.text_source, num_batches=spec.text_batches)
    qa_records = [r for r in map(_qa_record, evaluate.read_records(spec.qa_source, spec.qa_examples)) if r]
    result["qa_heldout"] = evaluate.qa_accuracy(*model, qa_records, spec.max_new_tokens)
    if spec.trained_qa_source and spec.trained_qa_examples:
        trained = [_qa_record(r) for r in evaluate.read_records(spec.trained_qa_source, spec.trained_qa_examples)]
        result["qa_trained"] = evaluate.qa_accuracy(*model, [r for r in trained if r], spec.max_new_tokens)
    if spec.preference_source:
        result["preferences"] = evaluate.preference_accuracy(*model, spec.preference_source, spec.preference_pairs)
    if spec.probe_source and spec.probe_people:
        result["completion_probe"] = completion_probe(model, spec.probe_source, spec.probe_people)
    if spec.prompts:
        answers = evaluate.answer_questions(*model, spec.prompts, spec.max_new_tokens)
        result["prompts"] = [{"prompt": p, **a} for p, a in zip(spec.prompts, answers)]
    result["seconds"] = time.perf_counter() - started
    cached.write_text(json.dumps(result, indent=2))
    return result


def completion_probe(model: tuple, people_source: str, count: int) -> float:
    """Is the pretrained knowledge stored? Accuracy of picking each held-out person's attribute value from its
    pool after "<name> was born in" (and three more attributes; chance 2.5-5%). model: (config, graphdef,
    params, tokenizer); people_source: records with a "split" and the six attributes."""
    from jaxllm.data import biographies as bio
    from jaxllm.evaluate import read_records
    from jaxllm.knowledge_experiment import completion_probe as probe

    fields = [field.name for field in dataclasses.fields(bio.Person)]
    people = [bio.Person(**{name: record[name] for name in fields})
              for record in read_records(people_source, None) if record.get("split") == "held_out"][:count]
    if not people:
        raise ConfigError(f"evaluation.probe_source={people_source} has no records with split 'held_out'")
    return probe(*model, people)


def _qa_record(record: dict) -> dict | None:
    """An SFT conversation (or prompt/reference record) -> {"prompt", "reference"}."""
    if "prompt" in record and "reference" in record:
        return record
    messages = record.get("messages") or []
    users = [m["content"] for m in messages if m.get("role") == "user"]
    answers = [m["content"] for m in messages if m.get("role") == "assistant"]
    if users and answers:
        return {"prompt": users[0], "reference": answers[0]}
    return None


def run_pipeline(recipe_path: str | Path, workdir: str | Path, log: Callable[[str], None] = print,
                 progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) every stage, evaluates each, writes report.md / report.json; returns the report."""
    from jaxllm.report import write_report
    from jaxllm.train import train

    recipe = load_recipe(recipe_path)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = prepare_tokenizer(recipe, workdir, log)
    stages = stage_configs(recipe, workdir, tokenizer)
    results = []
    for index, (stage, config, stage_dir) in enumerate(stages, 1):
        header = f"[{index}/{len(stages)} {stage.name}]"
        train_seconds = None
        if stage_finished(config, stage_dir):
            log(f"{header} already finished ({config.train.steps} steps) — skipped")
        else:
            resumed = ckpt.latest_step(stage_dir)
            log(f"{header} {config.train.stage}: {config.train.steps} steps on {config.data.source}"
                + (f", resuming at step {resumed}" if resumed else "")
                + (f", from {config.train.init_from}" if config.train.init_from else ""))
            stage_started = time.perf_counter()
            if not progress:
                config.train.progress = False
            result = train(config, stage_dir, log=log)
            if result.stopped_early:
                log(f"{header} stopped at step {result.final_step}; run the same command again to resume")
                return {"stopped": stage.name}
            train_seconds = time.perf_counter() - stage_started
            log(f"{header} done in {train_seconds:.0f}s "
                f"(final loss {result.last_metrics.get('loss', float('nan')):.3f})")
        evaluation = evaluate_stage(stage_dir, recipe.evaluation)
        qa = evaluation["qa_heldout"]
        probe = evaluation.get("completion_probe")
        log(f"{header} eval: held-out QA {qa['exact_match']:.1%}, EOS rate {qa['eos_rate']:.1%}, "
            f"text perplexity {evaluation['text']['perplexity']:.2f}"
            + (f", completion probe {probe:.1%}" if probe is not None else ""))
        summary = json.loads((stage_dir / "summary.json").read_text())
        results.append({"name": stage.name, "stage": config.train.stage, "workdir": str(stage_dir),
                        "init_from": config.train.init_from, "steps": config.train.steps,
                        "train_seconds": train_seconds, "summary": summary, "evaluation": evaluation})
    report = {"recipe": str(resolve_path(recipe_path)), "workdir": str(workdir), "tokenizer": tokenizer,
              "stages": results, "wall_seconds": time.perf_counter() - started}
    write_report(report, workdir)
    log(f"\npipeline finished in {report['wall_seconds']:.0f}s. Report: {workdir / 'report.md'} "
        f"(numbers in {workdir / 'report.json'})")
    return report


def pipeline_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm pipeline",
                                     description="Tokenizer -> pretrain -> SFT -> feedback -> evaluation, with a report.")
    parser.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help=f"pipeline recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--workdir", required=True, help="directory for every stage's run and the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = parser.parse_args(argv)
    report = run_pipeline(args.recipe, args.workdir, progress=not args.no_progress)
    return 0 if "stopped" not in report else 1
