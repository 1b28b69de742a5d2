"""The knowledge experiment of "Physics of Language Models 3.1" (Allen-Zhu & Li), end to end.

N synthetic people with six attributes. Two pretraining variants:
  single         — one fixed biography per person;
  multi+permute  — K rephrasings per person, sentence order permuted.
Each variant: pretrain on all biographies -> fine-tune QA on the first half of the people ->
exact-match QA on the trained half and on the held-out half. The paper's finding: knowledge
pretrained from one biography per person is memorised but not *extractable* (held-out QA near 0),
while diverse rephrasings make it extractable (held-out QA high). At CPU scale the effect is
small; see the README for the numbers at each scale.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from jaxllm import checkpoint as ckpt
from jaxllm import evaluate
from jaxllm.evaluate import scoring
from jaxllm import settings as settings_lib
from jaxllm.config import ConfigError, load_config, resolve_recipe
from jaxllm.data import biographies as bio
from jaxllm.data.biographies import experiment_sets, make_people
from jaxllm.data.tokenizer import train_tokenizer
from jaxllm.generate import load_model_for_inference
from jaxllm.train import read_metrics, train

VARIANTS = {"single": (1, False), "multi+permute": (None, True)}


@dataclasses.dataclass
class ExperimentSettings:
    people: int = 300
    versions: int = 5
    name_once: bool = True  # bioS style: full name in the first sentence, pronouns after (False: name every sentence)
    join_documents: bool = False  # True: pretraining rows are one stream of biographies (GPT-2 style)
    # A tokenizer trained on the experiment's biographies (names become whole tokens, the same at the start
    # of a biography and inside a question); 0 = the embedded default tokenizer (512 pieces).
    tokenizer_vocab: int = 2048
    seed: int = 0
    preset: str = "tiny"
    pretrain_steps: int = 1200
    pretrain_learning_rate: float = 3e-3
    sft_steps: int = 300
    sft_learning_rate: float = 1e-3
    batch_size: int = 32
    seq_len: int = 192
    eval_people: int = 100  # questions of at most this many people per half are scored
    max_new_tokens: int = 16
    variants: tuple[str, ...] = ("single", "multi+permute")
    mesh_devices: int = 0  # 0 = all devices


def load_settings(path: str | None, overrides: dict[str, Any]) -> ExperimentSettings:
    data: dict[str, Any] = {}
    if path:
        path = str(resolve_recipe(path))  # a file, or a built-in one: knowledge_cpu, configs/knowledge_gpu.yaml
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: an experiment config is a mapping of settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    settings = settings_lib.build(ExperimentSettings, data, path or "experiment settings", noun="experiment setting")
    bad = [v for v in settings.variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if settings.people < 4 or settings.versions < 1:
        raise ConfigError("people must be at least 4 and versions at least 1")
    return settings


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f"jsonl:{path}"


def prepare_tokenizer(settings: ExperimentSettings, workdir: Path) -> str:
    """The `data.tokenizer` value: "default", or a tokenizer trained once on this experiment's text (the
    multi+permute biographies of everyone and the fine-tuning questions) under workdir/tokenizer."""
    if not settings.tokenizer_vocab:
        return "default"

    directory = workdir / "tokenizer"
    if not (directory / "tokenizer.model").exists():
        sets = experiment_sets(settings.people, settings.versions, seed=settings.seed, permute=True,
                               name_once=settings.name_once)
        lines = [r["text"] for r in sets["pretrain"]] + [f"{r['prompt']} {r['reference']}" for r in sets["qa_train"]]
        corpus = workdir / "tokenizer_corpus.txt"
        corpus.write_text("\n".join(lines) + "\n")
        train_tokenizer([corpus], settings.tokenizer_vocab, directory, add_dummy_prefix=True)
        corpus.unlink()
    return str(directory)


def _stage_config(settings: ExperimentSettings, stage: str, source: str, steps: int, lr: float, init_from: str,
                  tokenizer: str = "default"):
    overrides = [
        f"model.preset={settings.preset}", f"data.tokenizer={tokenizer}",
        f"model.max_seq_len={max(settings.seq_len, 256)}",
        f"train.stage={stage}", f"train.steps={steps}", f"train.batch_size={settings.batch_size}",
        f"train.seed={settings.seed}", f"data.source={source}", f"data.eval_source={source}",
        f"data.seq_len={settings.seq_len}", f"optimizer.learning_rate={lr}",
        f"optimizer.warmup_steps={max(steps // 20, 1)}", "train.log_every=20", f"train.checkpoint_every={steps}",
        "train.eval_batches=2", f"mesh.num_devices={settings.mesh_devices}",
    ]
    if init_from:
        overrides.append(f"train.init_from={init_from}")
    if settings.tokenizer_vocab:
        overrides.append(f"model.vocab_size={settings.tokenizer_vocab}")
    if settings.join_documents:  # read by plain-text (pretraining) rows only; chat rows stay isolated
        overrides.append("data.join_documents=true")
    return load_config(None, overrides)


PROBE_PREFIXES = {"birth_city": "{name} was born in", "university": "{name} studied at",
                  "major": "{name} majored in", "employer": "{name} works for"}


def completion_probe(config, graphdef, params, tokenizer, people) -> float:
    """Is the pretrained knowledge there at all? For each person and attribute, the model picks the most
    likely value from the attribute's pool after "<name> was born in" (a biography's own wording);
    returns the mean accuracy over birth city, university, major and employer (chance 2.5-5%)."""
    import numpy as np

    accuracies = []
    for attribute, template in PROBE_PREFIXES.items():
        pool = bio.VALUE_POOLS[attribute]
        requests = []
        for person in people:
            prefix = template.format(name=person.name)
            context = [tokenizer.bos_id, *tokenizer.encode(prefix)]
            for value in pool:
                full = [tokenizer.bos_id, *tokenizer.encode(f"{prefix} {value}.")]
                requests.append((context, full[len(context):]))
        scores = scoring.score_continuations(config.model, graphdef, params, requests, batch_size=64).logprob
        chosen = np.asarray(scores).reshape(len(people), len(pool)).argmax(axis=1)
        accuracies.append(np.mean([pool[c] == p.attribute(attribute) for c, p in zip(chosen, people)]))
    return float(np.mean(accuracies))


def run_variant(settings: ExperimentSettings, variant: str, workdir: Path, log: Callable[[str], None],
                progress: bool, tokenizer: str = "default") -> dict[str, Any]:
    rephrasings, permute = VARIANTS[variant]
    sets = experiment_sets(settings.people, rephrasings or settings.versions, seed=settings.seed, permute=permute,
                           name_once=settings.name_once)
    data_dir = workdir / "data"
    pretrain_source = _write_jsonl(data_dir / "pretrain.jsonl", sets["pretrain"])
    sft_source = _write_jsonl(data_dir / "sft.jsonl", sets["sft"])
    stages = [("pretrain", pretrain_source, settings.pretrain_steps, settings.pretrain_learning_rate, ""),
              ("sft", sft_source, settings.sft_steps, settings.sft_learning_rate, str(workdir / "pretrain"))]
    timings = {}
    for name, source, steps, lr, init_from in stages:
        config = _stage_config(settings, name, source, steps, lr, init_from, tokenizer)
        config.train.progress = progress
        stage_dir = workdir / name
        if ckpt.latest_step(stage_dir) == steps and (stage_dir / "summary.json").exists():
            log(f"[{variant}] {name}: finished earlier — skipped")
            continue
        started = time.perf_counter()
        log(f"[{variant}] {name}: {steps} steps on {len(sets[name])} records")
        train(config, stage_dir, log=log)
        timings[name] = time.perf_counter() - started

    held_out_people = make_people(settings.people, settings.seed)[settings.people // 2:][:settings.eval_people]
    probe = completion_probe(*load_model_for_inference(workdir / "pretrain"), held_out_people)
    config, graphdef, params, tokenizer = load_model_for_inference(workdir / "sft")
    limit = settings.eval_people * 6
    scores = {}
    for split in ("qa_train", "qa_eval"):
        records = sets[split][:limit]
        scores[split] = evaluate.qa_accuracy(config, graphdef, params, tokenizer, records, settings.max_new_tokens)
    pretrain_summary = json.loads((workdir / "pretrain" / "summary.json").read_text())
    return {
        "variant": variant, "biographies": len(sets["pretrain"]), "sft_examples": len(sets["sft"]),
        "qa_trained_people": scores["qa_train"]["exact_match"], "qa_held_out_people": scores["qa_eval"]["exact_match"],
        "probe_held_out_people": probe,
        "pretrain_final_loss": pretrain_summary["train"].get("loss"), "seconds": timings,
        "samples_held_out": scores["qa_eval"]["samples"][:4], "workdir": str(workdir),
    }


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for result in results:
        for axis, phase in zip(axes, ("pretrain", "sft")):
            rows = read_metrics(Path(result["workdir"]) / phase)
            axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=result["variant"])
            axis.set_title(f"{phase} loss")
            axis.set_xlabel("step")
            axis.set_yscale("log")
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def run_experiment(settings: ExperimentSettings, workdir: str | Path, log: Callable[[str], None] = print,
                   progress: bool = True) -> dict[str, Any]:
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "settings.yaml").write_text(yaml.safe_dump(dataclasses.asdict(settings)))
    started = time.perf_counter()
    tokenizer = prepare_tokenizer(settings, workdir)
    results = [run_variant(settings, v, workdir / v.replace("+", "_"), log, progress, tokenizer)
               for v in settings.variants]
    _plot(results, workdir / "losses.png")
    report = {"settings": dataclasses.asdict(settings), "results": results,
              "wall_seconds": time.perf_counter() - started}
    (workdir / "results.json").write_text(json.dumps(report, indent=2))
    lines = ["# Knowledge experiment (Physics of Language Models 3.1)", "",
             f"{settings.people} people, {settings.versions} rephrasings for multi+permute, preset `{settings.preset}`, "
             f"{settings.pretrain_steps} pretraining + {settings.sft_steps} QA fine-tuning steps; "
             f"wall time {report['wall_seconds']:.0f} s.", "",
             "| variant | biographies | QA accuracy, trained people | QA accuracy, held-out people "
             "| pretrained completion probe, held-out people |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['biographies']} | {r['qa_trained_people']:.1%} | {r['qa_held_out_people']:.1%} "
              f"| {r['probe_held_out_people']:.1%} |" for r in results]
    lines += ["", "The probe asks the pretrained model to complete \"<name> was born in\" (and three more "
              "attributes) by picking from each attribute's pool: it shows whether the knowledge is stored; "
              "QA on held-out people shows whether fine-tuning can extract it."]
    lines += ["", "![loss curves](losses.png)", ""]
    (workdir / "report.md").write_text("\n".join(lines))
    log("\n".join(lines[4:4 + 2 + len(results)]))
    log(f"report: {workdir / 'report.md'}")
    return report
