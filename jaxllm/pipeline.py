"""`jaxllm pipeline`: the whole recipe end to end — tokenizer, pretraining, SFT, a feedback stage —
with an evaluation after every stage and a report (Markdown + PNG plots + JSON).

A pipeline recipe (YAML, `jaxllm.pipeline_recipe`) names the stage recipes and the evaluation.

`own_answers` makes the stage's data from the starting model's own wrong answers (jaxllm.lecture.own_pairs) just
before it trains; `own_mistakes_after` scores every stage from the named one on that stage's wrong answers to the
held-out questions (the report's own-mistakes column).

Each stage trains in `WORKDIR/<name>/` from the previous stage's checkpoint. Running the command
again skips finished stages and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from jaxllm import checkpoint as ckpt
from jaxllm import evaluate
from jaxllm.compile_time import CompileClock
from jaxllm.config import ConfigError, load_config, to_dict
from jaxllm.data import biographies as bio
from jaxllm.data.sources import data_files, file_content_digest, iter_records, parse_source, source_fingerprint
from jaxllm.data.tokenizer import Tokenizer, train_tokenizer
from jaxllm.files import WorkdirLock, write_atomic, write_json_atomic
from jaxllm.generate import load_model_for_inference
from jaxllm.evaluate.scoring import EvalModel
from jaxllm.lecture.knowledge_experiment import completion_probe as probe_people
from jaxllm.lecture.own_pairs import (OwnPairsSettings, own_mistake_pairs, question_records, write_own_answers,
                                      write_pairs)
from jaxllm.pipeline_recipe import EvaluationSpec, PipelineRecipe, StageSpec, load_recipe, qa_record, resolve_path
from jaxllm.report import write_report
from jaxllm.train import train

# ----------------------------------------------------------------------------------------------


def prepare_tokenizer(recipe: PipelineRecipe, workdir: Path, log: Callable[[str], None]) -> str:
    """Trains the pipeline's tokenizer once (or reuses it); returns the `data.tokenizer` value."""
    spec = recipe.tokenizer
    if not spec.train:
        return "default"
    directory = workdir / "tokenizer"
    sources = [spec.input] if isinstance(spec.input, str) else list(spec.input)
    if not sources or not all(isinstance(source, str) for source in sources):
        raise ConfigError(f"tokenizer.input={spec.input!r} must be a data source or a list of them, "
                          "e.g. [default:pretrain, default:sft]")
    wanted = {**dataclasses.asdict(spec), "input_fingerprint": [source_fingerprint(source) for source in sources]}
    recorded = _read_record(directory / TOKENIZER_RECORD, log)
    if (directory / "tokenizer.model").exists():
        if recorded == wanted:
            log(f"[tokenizer] reusing {directory}")
            return str(directory)
        log("[tokenizer] its settings or input changed since it was trained (or it was never finished): "
            "training it again; every stage reruns")
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TOKENIZER_RECORD).unlink(missing_ok=True)
    corpus = directory / "corpus.txt"
    with corpus.open("w") as handle:
        for source in sources:
            for record in iter_records(source):
                for text in _record_texts(record.data):
                    handle.write(text.replace("\n", " ") + "\n")
    train_tokenizer([str(corpus)], spec.vocab_size, str(directory), model_type=spec.model_type,
                    add_dummy_prefix=spec.add_dummy_prefix)
    corpus.unlink()
    write_json_atomic(directory / TOKENIZER_RECORD, wanted)  # last: its presence says the tokenizer is complete
    log(f"[tokenizer] trained a {spec.model_type} tokenizer of {spec.vocab_size} pieces on {', '.join(sources)} "
        f"in {time.perf_counter() - started:.1f}s -> {directory}")
    return str(directory)


def _record_texts(data: dict) -> list[str]:
    """The text of a pretraining record, or the contents of a chat record's messages (for tokenizer training)."""
    texts = [data.get("text")] + [m.get("content") for m in data.get("messages") or [] if isinstance(m, dict)]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def stage_configs(recipe: PipelineRecipe, workdir: Path, tokenizer: str) -> list[tuple[StageSpec, Any, Path]]:
    out, previous = [], None
    for spec in recipe.stages:
        overrides = list(recipe.common) + [f"data.tokenizer={tokenizer}"] + list(spec.overrides)
        if previous is not None and not any(o.startswith(("init_from=", "train.init_from=")) for o in spec.overrides):
            overrides.append(f"train.init_from={previous}")
        if spec.own_answers is not None:
            overrides.append(f"data.source=jsonl:{own_pairs_dir(workdir, spec.name)}")
        config = load_config(resolve_path(spec.recipe), overrides)
        if spec.own_answers is not None and not config.train.init_from:
            raise ConfigError(f"stage {spec.name}: own_answers are the answers of the model the stage starts from; "
                              "give it train.init_from or put an earlier stage before it")
        stage_dir = workdir / spec.name
        out.append((spec, config, stage_dir))
        previous = stage_dir
    return out


TOKENIZER_RECORD = "pipeline_tokenizer.json"  # the settings and input fingerprint the tokenizer was trained with
STAGE_RECORD = "pipeline_stage.json"  # {"fingerprint": ..., "finished": bool} of the stage's results
IGNORED_FOR_FINGERPRINT = {("train", "progress"), ("train", "tensorboard")}  # do not change any result


def _read_record(path: Path, log: Callable[[str], None]) -> Any:
    """A small JSON record, or None when it is missing or damaged (then said: its results are recomputed)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        log(f"warning: {path} is damaged; recomputing what it records")
        return None


def stage_fingerprint(config, workdir: Path, upstream: str) -> str:
    """A hash of everything a stage's results depend on: its resolved config (paths inside the pipeline's
    workdir made relative, so a moved workdir keeps its results), the tokenizer's content, the data's
    content, and the previous stage's fingerprint (so a change reruns every later stage too)."""
    resolved = to_dict(config)
    for section, key in IGNORED_FOR_FINGERPRINT:
        resolved[section].pop(key, None)
    prefix = str(workdir) + "/"
    text = json.dumps(resolved, sort_keys=True, default=str).replace(prefix, "WORKDIR/")
    data = {name: _data_fingerprint(getattr(config.data, name), workdir) for name in ("source", "eval_source")
            if getattr(config.data, name)}
    parts = {"config": text, "tokenizer": Tokenizer.load(config.data.tokenizer).fingerprint, "data": data,
             "upstream": upstream}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _data_fingerprint(source: str, workdir: Path) -> str:
    """`source_fingerprint`, but a JSONL source inside the workdir (a stage's own pairs) is hashed by its paths
    relative to the workdir, so a moved workdir keeps its results."""
    kind, rest = parse_source(source)
    path = Path(rest)
    if kind != "jsonl" or not path.is_relative_to(workdir):
        return source_fingerprint(source)
    files = data_files(path, "jsonl")
    text = "\n".join(f"{file.relative_to(workdir)}:{file_content_digest(file)}" for file in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_finished(config, stage_dir: Path, fingerprint: str | None = None,
                   log: Callable[[str], None] = print) -> bool:
    """The stage's results are complete and (with `fingerprint`) were made from these exact inputs."""
    if ckpt.latest_step(stage_dir) != config.train.steps:
        return False
    if fingerprint is not None:
        record = _read_record(stage_dir / STAGE_RECORD, log)
        if not (isinstance(record, dict) and record.get("fingerprint") == fingerprint and record.get("finished")):
            return False
    return isinstance(_read_record(stage_dir / "summary.json", log), dict)


def set_aside_stale_stage(stage_dir: Path, fingerprint: str, log: Callable[[str], None], header: str) -> None:
    """A stage directory whose results were made from other inputs (another fingerprint, or none recorded)
    is moved to `<name>.stale` (replacing an older one) so the stage starts afresh."""
    if not stage_dir.exists():
        return
    record = _read_record(stage_dir / STAGE_RECORD, log)
    if isinstance(record, dict) and record.get("fingerprint") == fingerprint:
        return
    stale = stage_dir.with_name(stage_dir.name + ".stale")
    if stale.exists():
        shutil.rmtree(stale)
    stage_dir.rename(stale)
    log(f"{header} its settings, tokenizer, data or an earlier stage changed since it ran: running it again "
        f"(the old results are in {stale})")


def own_pairs_dir(workdir: Path, stage_name: str) -> Path:
    return workdir / f"{stage_name}.pairs"


OWN_PAIRS_RECORD = "pairs.json"  # {"key", "report"}: written last, so its presence says the pairs are complete


def _current_record(record_path: Path, key: str, log: Callable[[str], None]) -> dict | None:
    """The record {"key", "report"} when it was written for `key`, else None (its files are made again)."""
    record = _read_record(record_path, log)
    return record if isinstance(record, dict) and record.get("key") == key else None


def prepare_own_pairs(spec: StageSpec, config, workdir: Path, upstream: str, log: Callable[[str], None],
                      header: str) -> dict[str, Any]:
    """Writes `WORKDIR/<stage>.pairs/`: own.jsonl (the starting model's wrong answers to `own_answers.prompts` as
    pairs or thumbs) and mix-<i>.jsonl (the `mix` sources' records); reused while the starting stage and the settings
    are the same (the key records both). Returns what they are: the pair maker's report, format, prompts, mix."""
    own = spec.own_answers
    directory = own_pairs_dir(workdir, spec.name)
    key = hashlib.sha256(json.dumps([upstream, dataclasses.asdict(own),
                                     [source_fingerprint(s) for s in [own.prompts, *own.mix]]],
                                    sort_keys=True).encode()).hexdigest()[:24]
    summary = {"format": own.format, "prompts": own.prompts, "mix": list(own.mix)}
    record = _current_record(directory / OWN_PAIRS_RECORD, key, log)
    if record is not None:
        return {**record["report"], **summary}
    started = time.perf_counter()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    report = write_own_answers(EvalModel.load(config.train.init_from), own, directory)
    write_json_atomic(directory / OWN_PAIRS_RECORD, {"key": key, "report": report})
    log(f"{header} own {own.format}: {report['pairs']} wrong answers of {config.train.init_from} to "
        f"{report['questions']} questions of {own.prompts} (greedy right {report['greedy_correct']:.1%}, "
        f"any of {own.samples} right {report['any_correct']:.1%}) + {', '.join(own.mix) or 'nothing else'} "
        f"({time.perf_counter() - started:.0f}s)")
    return {**report, **summary}


OWN_MISTAKES_EVAL = "own_mistakes_eval.jsonl"


def prepare_own_mistakes(stage_dir: Path, spec: EvaluationSpec, workdir: Path, fingerprint: str,
                         log: Callable[[str], None], header: str) -> int:
    """`WORKDIR/own_mistakes_eval.jsonl`: the finished stage's wrong greedy answers to the held-out questions as
    pairs (reference vs answer); remade when that stage changed. Returns how many pairs it holds (0: the stage
    answered every question right, and there is nothing to score)."""
    path, record_path = workdir / OWN_MISTAKES_EVAL, workdir / "own_mistakes_eval.json"
    key = hashlib.sha256(json.dumps([fingerprint, spec.qa_source, spec.qa_examples, spec.max_new_tokens,
                                     source_fingerprint(spec.qa_source)]).encode()).hexdigest()[:24]
    record = _current_record(record_path, key, log)
    if path.exists() and record is not None:
        return int(record["report"]["pairs"])
    record_path.unlink(missing_ok=True)
    records = [r for r in map(qa_record, evaluate.read_records(spec.qa_source, spec.qa_examples)) if r]
    pairs, report = own_mistake_pairs(EvalModel.load(stage_dir), question_records(records, spec.qa_source),
                                      OwnPairsSettings(samples=1, max_new_tokens=spec.max_new_tokens,
                                                       keep_unfinished=True))
    write_pairs(path, pairs)
    write_json_atomic(record_path, {"key": key, "report": report})
    log(f"{header} own-mistakes eval set: {len(pairs)} held-out questions it answers wrong -> {path}"
        + ("" if pairs else " (none: the own-mistakes column stays empty)"))
    return len(pairs)


def cached_evaluation(stage_dir: Path, spec: EvaluationSpec, fingerprint: str,
                      log: Callable[[str], None], extra_preferences: dict[str, str] | None = None) -> dict[str, Any]:
    """`evaluate_stage`, reused only when eval.json was computed for this stage fingerprint, evaluation spec
    and extra preference sets (recorded in eval.key) and is readable; otherwise recomputed."""
    extra_preferences = extra_preferences or {}
    extras = {name: source_fingerprint(source) for name, source in extra_preferences.items()}
    key = hashlib.sha256(json.dumps([fingerprint, dataclasses.asdict(spec)] + ([extras] if extras else []),
                                    sort_keys=True).encode()).hexdigest()
    key_path, cached = stage_dir / "eval.key", stage_dir / "eval.json"
    if key_path.exists() and key_path.read_text().strip() == key:
        result = _read_record(cached, log)
        if isinstance(result, dict):
            return result
    cached.unlink(missing_ok=True)
    key_path.unlink(missing_ok=True)
    result = evaluate_stage(stage_dir, spec, extra_preferences)
    write_atomic(key_path, key)
    return result


def evaluate_stage(stage_dir: Path, spec: EvaluationSpec,
                   extra_preferences: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluation of one finished stage (cached in the stage's eval.json). extra_preferences: {result name:
    pair source} scored like `preference_source` (e.g. "own_mistakes")."""
    cached = stage_dir / "eval.json"
    if cached.exists():
        return json.loads(cached.read_text())
    config, graphdef, params, tokenizer = load_model_for_inference(stage_dir)
    model = (config, graphdef, params, tokenizer)
    started = time.perf_counter()
    result: dict[str, Any] = {}
    result["text"] = evaluate.perplexity(*model, spec.text_source, num_batches=spec.text_batches)
    qa_records = [r for r in map(qa_record, evaluate.read_records(spec.qa_source, spec.qa_examples)) if r]
    result["qa_heldout"] = evaluate.qa_accuracy(*model, qa_records, spec.max_new_tokens)
    if spec.trained_qa_source and spec.trained_qa_examples:
        trained = [qa_record(r) for r in evaluate.read_records(spec.trained_qa_source, spec.trained_qa_examples)]
        result["qa_trained"] = evaluate.qa_accuracy(*model, [r for r in trained if r], spec.max_new_tokens)
    if spec.preference_source:
        result["preferences"] = evaluate.preference_accuracy(*model, spec.preference_source, spec.preference_pairs)
    for name, source in (extra_preferences or {}).items():
        result[name] = evaluate.preference_accuracy(*model, source, max_pairs=10**9)
    if spec.probe_source and spec.probe_people:
        result["completion_probe"] = completion_probe(model, spec.probe_source, spec.probe_people)
    if spec.prompts:
        answers = evaluate.answer_questions(*model, spec.prompts, spec.max_new_tokens)
        result["prompts"] = [{"prompt": p, **a} for p, a in zip(spec.prompts, answers)]
    result["seconds"] = time.perf_counter() - started
    write_json_atomic(cached, result)
    return result


def completion_probe(model: tuple, people_source: str, count: int) -> float:
    """Is the pretrained knowledge stored? Accuracy of picking each held-out person's attribute value from its
    pool after "<name> was born in" (and three more attributes; chance 2.5-5%). model: (config, graphdef,
    params, tokenizer); people_source: records with a "split" and the six attributes."""
    fields = [field.name for field in dataclasses.fields(bio.Person)]
    people = [bio.Person(**{name: record[name] for name in fields})
              for record in evaluate.read_records(people_source, None) if record.get("split") == "held_out"][:count]
    if not people:
        raise ConfigError(f"evaluation.probe_source={people_source} has no records with split 'held_out'")
    return probe_people(*model, people)


def run_pipeline(recipe_path: str | Path, workdir: str | Path, log: Callable[[str], None] = print,
                 progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) every stage, evaluates each, writes report.md / report.json; returns the report.

    The pipeline's workdir is locked for the whole run (a second pipeline on it exits 2). A stage is reused
    only when its recorded fingerprint (`stage_fingerprint`) matches; otherwise it and every later stage
    run again."""
    recipe = load_recipe(recipe_path)
    workdir = Path(workdir).absolute()
    ckpt.check_writable(workdir)
    with WorkdirLock(workdir, "jaxllm pipeline"):
        return _run_pipeline(recipe, recipe_path, workdir, log, progress)


def _run_pipeline(recipe: PipelineRecipe, recipe_path, workdir: Path, log: Callable[[str], None],
                  progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    tokenizer = prepare_tokenizer(recipe, workdir, log)
    stages = stage_configs(recipe, workdir, tokenizer)
    results = []
    upstream = ""
    own_mistakes: dict[str, str] = {}  # {"own_mistakes": source} once the stage that makes them has run
    for index, (stage, config, stage_dir) in enumerate(stages, 1):
        header = f"[{index}/{len(stages)} {stage.name}]"
        train_seconds, train_compile = None, None
        own_answers = None
        with CompileClock() as pairs_compile:
            if stage.own_answers is not None:
                own_answers = prepare_own_pairs(stage, config, workdir, upstream, log, header)
        fingerprint = stage_fingerprint(config, workdir, upstream)
        upstream = fingerprint
        set_aside_stale_stage(stage_dir, fingerprint, log, header)
        if stage_finished(config, stage_dir, fingerprint, log):
            log(f"{header} already finished ({config.train.steps} steps) — skipped")
        else:
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stage_dir / STAGE_RECORD, {"fingerprint": fingerprint, "finished": False})
            resumed = ckpt.latest_step(stage_dir)
            log(f"{header} {config.train.stage}: {config.train.steps} steps on {config.data.source}"
                + (f", resuming at step {resumed}" if resumed else "")
                + (f", from {config.train.init_from}" if config.train.init_from else ""))
            stage_started = time.perf_counter()
            if not progress:
                config.train.progress = False
            with CompileClock() as train_compile:
                result = train(config, stage_dir, log=log)
            if result.stopped_early:
                log(f"{header} stopped at step {result.final_step}; run the same command again to resume")
                return {"stopped": stage.name}
            write_json_atomic(stage_dir / STAGE_RECORD, {"fingerprint": fingerprint, "finished": True})
            train_seconds = time.perf_counter() - stage_started
            log(f"{header} done in {train_seconds:.0f}s "
                f"(final loss {result.last_metrics.get('loss', float('nan')):.3f})")
        with CompileClock() as eval_compile:
            if stage.name == recipe.evaluation.own_mistakes_after:
                if prepare_own_mistakes(stage_dir, recipe.evaluation, workdir, fingerprint, log, header):
                    own_mistakes = {"own_mistakes": f"jsonl:{workdir / OWN_MISTAKES_EVAL}"}
            evaluation = cached_evaluation(stage_dir, recipe.evaluation, fingerprint, log, own_mistakes)
        qa = evaluation["qa_heldout"]
        probe = evaluation.get("completion_probe")
        log(f"{header} eval: held-out QA {qa['exact_match']:.1%}, EOS rate {qa['eos_rate']:.1%}, "
            f"text perplexity {evaluation['text']['perplexity']:.2f}"
            + (f", completion probe {probe:.1%}" if probe is not None else ""))
        summary = json.loads((stage_dir / "summary.json").read_text())
        results.append({"name": stage.name, "stage": config.train.stage, "workdir": str(stage_dir),
                        "init_from": config.train.init_from, "steps": config.train.steps,
                        "train_seconds": train_seconds, "summary": summary, "evaluation": evaluation,
                        "compile_seconds": {"train": train_compile.seconds if train_compile else None,
                                            "evaluation": eval_compile.seconds,
                                            **({"own_answers": pairs_compile.seconds} if stage.own_answers else {})},
                        **({"own_answers": own_answers} if own_answers is not None else {})})
    report = {"recipe": str(resolve_path(recipe_path)), "workdir": str(workdir), "tokenizer": tokenizer,
              "stages": results, "wall_seconds": time.perf_counter() - started}
    write_report(report, workdir)
    log(f"\npipeline finished in {report['wall_seconds']:.0f}s. Report: {workdir / 'report.md'} "
        f"(numbers in {workdir / 'report.json'})")
    return report
