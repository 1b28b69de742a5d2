"""The filter chain: heuristics -> exact dedup -> near dedup -> quality classifier, streamed.

Documents are streamed by jaxllm.data.sources.iter_documents (the main process parses each JSONL line
and takes its text field) and grouped in chunks; a pool of worker processes computes everything that
needs only the document's text (the heuristic rules, the normalised-text hash, the MinHash band keys,
the classifier score), and the main process applies the steps in order, keeping only hashes for
dedup, writing kept documents as they come and counting, per step, documents and words in and kept
and the rejections per reason (DataComp-LM's funnel: 100% -> 20% -> 13% -> 1.4%).
At most 2·workers chunks are in flight, so memory stays flat whatever the input size.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxllm import cpu_levers
from jaxllm.data.sources import TEXT_UNITS, Record, expand_paths, iter_documents, record_text
from jaxllm.errors import DataError
from jaxllm.lecture.quality.classifier import QualityClassifier
from jaxllm.lecture.quality.dedup import ExactDeduplicator, MinHashConfig, MinHasher, NearDeduplicator, exact_hash
from jaxllm.lecture.quality.profiles import heuristic_config_from, profile_config
from jaxllm.lecture.quality.rules import RULES, HeuristicConfig, TextView, first_failing_rule

STEPS = ("heuristics", "exact_dedup", "near_dedup", "quality_classifier")


@dataclasses.dataclass(frozen=True)
class FilterOptions:
    heuristics: HeuristicConfig | None = HeuristicConfig()  # None turns the step off
    exact_dedup: bool = True
    near_dedup: bool = True
    minhash: MinHashConfig = MinHashConfig()
    classifier: str | None = None  # directory written by train_quality_classifier
    threshold: float = 0.5  # keep documents with p(good) >= threshold
    text_field: str = "text"
    text_unit: str = "file"  # plain text inputs: file | paragraph | line
    workers: int = 0  # processes; 0 = every available core; 1 = in this process
    chunk_size: int = 256  # documents per task
    skip_malformed: bool = False  # count and skip bad JSONL lines instead of stopping

    def active_steps(self) -> tuple[str, ...]:
        on = {"heuristics": self.heuristics is not None, "exact_dedup": self.exact_dedup,
              "near_dedup": self.near_dedup, "quality_classifier": self.classifier is not None}
        return tuple(step for step in STEPS if on[step])


# ----------------------------------------------------------------------------------------------
# Per-document work (runs in the worker processes).

@dataclasses.dataclass
class ChunkResult:
    words: list[int]
    failed_rule: list[str | None]  # first heuristic rule that rejected the document
    reasons: list[str]
    exact_hashes: list[int | None]
    band_keys: np.ndarray  # [docs, bands] uint64 (zeros where not computed)
    scores: list[float | None]


class ChunkProcessor:
    def __init__(self, options: FilterOptions):
        self.options = options
        self.hasher = MinHasher(options.minhash) if options.near_dedup else None
        self.classifier = QualityClassifier.load(options.classifier) if options.classifier else None

    def __call__(self, texts: list[str]) -> ChunkResult:
        options = self.options
        n = len(texts)
        result = ChunkResult([0] * n, [None] * n, [""] * n, [None] * n,
                             np.zeros((n, options.minhash.bands if self.hasher else 0), np.uint64), [None] * n)
        survivors: list[int] = []
        survivor_words: list[list[str]] = []
        survivor_texts: list[str] = []
        for i, text in enumerate(texts):
            view = TextView(text)
            result.words[i] = len(view.words)
            if options.heuristics is not None:
                failed = first_failing_rule(view, options.heuristics)
                if failed:
                    result.failed_rule[i], result.reasons[i] = failed
                    continue
            if options.exact_dedup:
                result.exact_hashes[i] = exact_hash(view.normalised)
            survivors.append(i)
            if self.hasher is not None:
                survivor_words.append(view.normalised_words)
            if self.classifier is not None:
                survivor_texts.append(text)
        if self.hasher is not None and survivors:
            result.band_keys[survivors] = self.hasher.band_keys(self.hasher.signatures(survivor_words))
        if self.classifier is not None and survivors:
            for i, score in zip(survivors, self.classifier.score(survivor_texts)):
                result.scores[i] = float(score)
        return result


_WORKER: ChunkProcessor | None = None


def _init_worker(options: FilterOptions) -> None:
    global _WORKER
    _WORKER = ChunkProcessor(options)


def _run_chunk(texts: list[str]) -> ChunkResult:
    assert _WORKER is not None
    return _WORKER(texts)


# ----------------------------------------------------------------------------------------------
# The ordered steps and the report (main process).

class StepCounts:
    def __init__(self, name: str):
        self.name = name
        self.documents_in = self.documents_kept = self.words_in = self.words_kept = 0
        self.rejected: collections.Counter[str] = collections.Counter()

    def as_dict(self, input_documents: int, input_words: int) -> dict[str, Any]:
        return {"step": self.name, "documents_in": self.documents_in, "documents_kept": self.documents_kept,
                "words_in": self.words_in, "words_kept": self.words_kept,
                "kept_fraction_of_step": self.documents_kept / max(self.documents_in, 1),
                "kept_fraction_of_input": self.documents_kept / max(input_documents, 1),
                "words_kept_fraction_of_input": self.words_kept / max(input_words, 1),
                "rejected": dict(self.rejected.most_common())}


def start_method() -> str:
    """"fork" when it is safe (no JAX threads in this process yet), else "spawn".

    Spawned workers re-import the main script, so a script that filters with workers > 1 after
    importing JAX must guard its entry point with `if __name__ == "__main__":`.
    """
    if "fork" in multiprocessing.get_all_start_methods() and "jax" not in sys.modules:
        return "fork"
    return "spawn"


def _documents(files: Sequence[Path], options: FilterOptions, totals: dict[str, int]) -> Iterable[tuple[Record, str]]:
    """(record, text) of every document; a malformed one raises, or is counted and skipped with skip_malformed."""
    def on_bad(reason: str, message: str) -> None:
        if not options.skip_malformed:
            raise DataError(f"{message} (or pass --skip-malformed to skip such lines)", reason)
        totals["malformed_skipped"] += 1

    for record in iter_documents(files, options.text_unit, options.text_field, on_bad):
        try:
            yield record, record_text(record, options.text_field)
        except DataError as error:
            on_bad(error.reason, str(error))


def _chunks(records: Iterable[tuple[Record, str]], size: int) -> Iterable[list[tuple[Record, str]]]:
    iterator = iter(records)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _open_text_out(path: Path, compressed: bool):
    if compressed:
        import gzip

        return gzip.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def filter_documents(inputs: Sequence[str | Path], output: str | Path, options: FilterOptions = FilterOptions(),
                     *, report_path: str | Path | None = None, rejected_path: str | Path | None = None) -> dict:
    """Runs the chain over `inputs`, writes kept documents to `output` (JSONL) and returns the report.

    JSONL inputs are written back line for line; plain-text documents become {"text", "source"}.
    rejected_path, if given, gets one JSON line per rejected document: its number (0-based, in input
    order), source, step, rule, reason, duplicate_of (dedup steps) and text. Raises DataError for
    missing, empty or malformed input (malformed JSONL lines unless options.skip_malformed).
    """
    started = time.perf_counter()
    files = expand_paths(inputs)  # fails early on a missing input
    output = Path(output)
    if any(output.resolve() == f.resolve() for f in files):
        raise DataError(f"the output {output} is also an input; write it somewhere else")
    if options.text_unit not in TEXT_UNITS:
        raise DataError(f"text unit '{options.text_unit}' is not one of {', '.join(TEXT_UNITS)}")
    if options.chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {options.chunk_size}")
    if options.classifier:
        QualityClassifier.load(options.classifier)  # fail here, not in a worker
    steps = {name: StepCounts(name) for name in options.active_steps()}
    exact = ExactDeduplicator() if options.exact_dedup else None
    near = NearDeduplicator(options.minhash.bands) if options.near_dedup else None
    workers = options.workers or cpu_levers.available_cpus()
    totals = {"documents": 0, "words": 0, "bytes": 0, "malformed_skipped": 0}

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    rejected_temporary = Path(str(rejected_path) + ".tmp") if rejected_path else None
    pool = None
    try:
        with _open_text_out(temporary, output.name.endswith(".gz")) as out, \
                (_open_text_out(rejected_temporary, str(rejected_path).endswith(".gz")) if rejected_temporary
                 else open(os.devnull, "w")) as rejected_out:
            def handle(chunk: list[tuple[Record, str]], result: ChunkResult) -> None:
                for i, (record, text) in enumerate(chunk):
                    number = totals["documents"]
                    words = result.words[i]
                    totals["documents"] += 1
                    totals["words"] += words
                    totals["bytes"] += record.size
                    verdict = None  # (step, rule, reason, duplicate_of)
                    for name, counts in steps.items():
                        counts.documents_in += 1
                        counts.words_in += words
                        if name == "heuristics" and result.failed_rule[i] is not None:
                            verdict = (name, result.failed_rule[i], result.reasons[i], None)
                        elif name == "exact_dedup":
                            earlier = exact.check(result.exact_hashes[i], number)
                            if earlier is not None:
                                verdict = (name, "exact_duplicate",
                                           f"same normalised text as document {earlier}", earlier)
                        elif name == "near_dedup":
                            earlier = near.check(result.band_keys[i], number)
                            if earlier is not None:
                                verdict = (name, "near_duplicate",
                                           f"MinHash LSH candidate of document {earlier}", earlier)
                        elif name == "quality_classifier" and result.scores[i] < options.threshold:
                            verdict = (name, "low_quality_score",
                                       f"p(good) {result.scores[i]:.3f} < threshold {options.threshold}", None)
                        if verdict:
                            counts.rejected[verdict[1]] += 1
                            break
                        counts.documents_kept += 1
                        counts.words_kept += words
                    if verdict is None:
                        out.write(record.raw.rstrip("\r\n") + "\n" if record.raw is not None else
                                  json.dumps({"text": text, "source": record.where}, ensure_ascii=False)
                                  + "\n")
                    elif rejected_temporary:
                        step, rule, reason, duplicate_of = verdict
                        entry = {"document": number, "source": record.where, "step": step, "rule": rule,
                                 "reason": reason}
                        if duplicate_of is not None:
                            entry["duplicate_of"] = duplicate_of
                        if step == "quality_classifier":
                            entry["score"] = result.scores[i]
                        entry["text"] = text
                        rejected_out.write(json.dumps(entry, ensure_ascii=False) + "\n")

            def payload(chunk: list[tuple[Record, str]]) -> list[str]:
                return [text for _, text in chunk]

            chunks = _chunks(_documents(files, options, totals), options.chunk_size)
            if workers <= 1:
                processor = ChunkProcessor(options)
                for chunk in chunks:
                    handle(chunk, processor(payload(chunk)))
            else:
                pool = multiprocessing.get_context(start_method()).Pool(workers, _init_worker, (options,))
                pending: collections.deque = collections.deque()
                for chunk in chunks:
                    pending.append((chunk, pool.apply_async(_run_chunk, (payload(chunk),))))
                    if len(pending) >= 2 * workers:
                        done, task = pending.popleft()
                        handle(done, task.get())
                while pending:
                    done, task = pending.popleft()
                    handle(done, task.get())
        if totals["documents"] == 0:
            skipped = f" ({totals['malformed_skipped']} malformed lines skipped)" if totals["malformed_skipped"] else ""
            raise DataError(f"no documents in {', '.join(map(str, inputs))}{skipped}; "
                             "nothing to filter (are the files empty?)")
        os.replace(temporary, output)
        if rejected_temporary:
            os.replace(rejected_temporary, rejected_path)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for path in (temporary, rejected_temporary):
            if path is not None and path.exists():
                path.unlink()

    seconds = time.perf_counter() - started
    step_reports = [counts.as_dict(totals["documents"], totals["words"]) for counts in steps.values()]
    final = step_reports[-1] if step_reports else None
    kept_documents = final["documents_kept"] if final else totals["documents"]
    kept_words = final["words_kept"] if final else totals["words"]
    funnel = " -> ".join(["100% input"] + [f"{100 * s['kept_fraction_of_input']:.3g}% {s['step']}"
                                            for s in step_reports])
    report = {
        "inputs": [str(p) for p in inputs], "output": str(output),
        "rejected_output": str(rejected_path) if rejected_path else None,
        "input": {"documents": totals["documents"], "words": totals["words"], "bytes": totals["bytes"],
                  "malformed_skipped": totals["malformed_skipped"]},
        "steps": step_reports,
        "kept": {"documents": kept_documents, "words": kept_words,
                 "fraction_of_documents": kept_documents / totals["documents"],
                 "fraction_of_words": kept_words / max(totals["words"], 1)},
        "funnel": funnel,
        "throughput": {"seconds": round(seconds, 3), "workers": workers,
                       "documents_per_second": round(totals["documents"] / seconds, 1),
                       "megabytes_per_second": round(totals["bytes"] / 1e6 / seconds, 3)},
        "options": _options_dict(options),
    }
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _options_dict(options: FilterOptions) -> dict[str, Any]:
    data = dataclasses.asdict(options)
    if options.near_dedup:
        data["minhash"]["lsh_threshold"] = round(options.minhash.threshold, 3)
    return data


def format_report(report: dict) -> str:
    lines = [f"{'step':<20} {'docs in':>10} {'docs kept':>10} {'% of input':>10} {'words kept':>12}  rejected by"]
    source = report["input"]
    lines.append(f"{'input':<20} {'':>10} {source['documents']:>10} {'100%':>10} {source['words']:>12}")
    for step in report["steps"]:
        reasons = ", ".join(f"{rule} {count}" for rule, count in step["rejected"].items())
        lines.append(f"{step['step']:<20} {step['documents_in']:>10} {step['documents_kept']:>10} "
                     f"{100 * step['kept_fraction_of_input']:>9.3g}% {step['words_kept']:>12}  {reasons}")
    speed = report["throughput"]
    lines.append(f"funnel: {report['funnel']}")
    lines.append(f"{speed['documents_per_second']:.0f} documents/s, {speed['megabytes_per_second']:.2f} MB/s "
                 f"on {speed['workers']} worker(s), {speed['seconds']:.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Heuristic settings from a profile, a rules file and single settings.


def heuristic_settings(profile: str = "web", rules_file: str | Path | None = None,
                       settings: Mapping[str, Any] | None = None,
                       disabled_rules: Sequence[str] = ()) -> HeuristicConfig:
    """The profile's heuristic settings, changed by a YAML/JSON rules file's, then by `settings` (name ->
    value; None turns a rule off), with `disabled_rules` switched off."""
    merged: dict[str, Any] = {}
    if rules_file:
        path = Path(rules_file)
        if not path.is_file():
            raise DataError(f"rules file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise DataError(f"{path}: expected a mapping of heuristic settings, e.g. 'min_words: 20'")
        merged.update(loaded)
    merged.update(settings or {})
    if disabled_rules:
        unknown = [r for r in disabled_rules if r not in RULES]
        if unknown:
            raise ValueError(f"unknown rule(s) {', '.join(unknown)}; rules are: {', '.join(RULES)}")
        merged["disabled_rules"] = tuple(merged.get("disabled_rules", ())) + tuple(disabled_rules)
    return heuristic_config_from(merged, base=profile_config(profile))
