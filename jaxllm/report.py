"""A run report people can read: report.md with PNG plots, and report.json with every number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxllm.files import write_atomic


def read_metrics(workdir: str | Path, split: str = "train") -> list[dict]:
    """The records of one split in file order. After a resume, the steps since the last checkpoint appear
    twice (they were trained again, on the same data): keep the last record of each step."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill or a full disk
        if isinstance(record, dict) and record.get("split") == split:
            records.append(record)
    return records


def _plot_losses(stages: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for axis, run in zip(axes[0], stages):
        train = read_metrics(run["workdir"], "train")
        evals = [r for r in read_metrics(run["workdir"], "eval") if "loss" in r]
        axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        if evals:
            axis.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
        axis.set_title(f"{run['name']} ({run['stage']})")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def _plot_eval(stages: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [s["name"] for s in stages]
    series = {
        "held-out QA exact match": [s["evaluation"]["qa_heldout"]["exact_match"] for s in stages],
        "trained-people QA exact match": [s["evaluation"].get("qa_trained", {}).get("exact_match", 0) for s in stages],
        "answers ending with EOS": [s["evaluation"]["qa_heldout"]["eos_rate"] for s in stages],
        "preference accuracy": [s["evaluation"].get("preferences", {}).get("preference_accuracy", 0) for s in stages],
    }
    if any("own_mistakes" in s["evaluation"] for s in stages):
        series["own-mistakes accuracy"] = [s["evaluation"].get("own_mistakes", {}).get("preference_accuracy", 0)
                                           for s in stages]
    figure, axis = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
        axis.bar(x + i * width, values, width, label=label)
    axis.set_xticks(x + width * (len(series) - 1) / 2, names)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("fraction")
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def _plot_rewards(stages: list[dict], path: Path) -> bool:
    curves = [(s["name"], read_metrics(s["workdir"], "train")) for s in stages if s["stage"] in ("rl", "dpo", "kto")]
    keys = ("reward_mean", "reward_margin")
    curves = [(name, [(r["step"], r[k]) for r in rows for k in keys if k in r]) for name, rows in curves]
    curves = [(name, points) for name, points in curves if points]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2))
    for name, points in curves:
        axis.plot([p[0] for p in points], [p[1] for p in points], label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("reward (RL) / implicit reward margin (DPO)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _stage_compile_seconds(stage: dict) -> float | None:
    """Seconds this run spent compiling the stage's programs (train step, eval step, generation), from JAX's
    compile events; None when the stage was reused from an earlier run and its evaluation too."""
    parts = [value for value in (stage.get("compile_seconds") or {}).values() if value is not None]
    return sum(parts) if parts else None


def compile_share(report: dict[str, Any]) -> tuple[float, float]:
    """(seconds spent compiling in this run, their share of the run's wall time)."""
    total = sum(_stage_compile_seconds(run) or 0.0 for run in report["stages"])
    return total, total / report["wall_seconds"] if report["wall_seconds"] else 0.0


def _compile_line(report: dict[str, Any]) -> str:
    seconds, share = compile_share(report)
    return f"Compiling took {seconds:.0f} s of the {report['wall_seconds']:.0f} s wall time ({share:.1%})."


def _row(stage: dict) -> str:
    e = stage["evaluation"]
    qa, text = e["qa_heldout"], e["text"]
    trained = e.get("qa_trained", {}).get("exact_match")
    pref = e.get("preferences", {}).get("preference_accuracy")
    own = e.get("own_mistakes", {}).get("preference_accuracy")
    compile_seconds = _stage_compile_seconds(stage)
    return (f"| {stage['name']} | {stage['stage']} | {stage['steps']} | {text['perplexity']:.2f} | "
            f"{text['bits_per_byte']:.3f} | {_percent(e.get('completion_probe'))} | {_percent(qa['exact_match'])} | "
            f"{_percent(trained)} | {_percent(qa['eos_rate'])} | {qa['mean_answer_tokens']:.1f} | {_percent(pref)} | "
            f"{_percent(own)} | "
            f"{_seconds(stage.get('train_seconds'))} | "
            f"{'–' if compile_seconds is None else f'{compile_seconds:.1f}'} |")


# What each kind of stage illustrates in the lecture (docs/MISSION: "the one idea" and the three stages).
LECTURE_CLAIMS = {
    "pretrain": "any text is training data: next-token prediction stores the facts of the biographies (probe), "
                "but a base model continues text instead of answering",
    "sft": "SFT teaches the format, not the knowledge: answers now stop with EOS, and because pretraining saw "
           "diverse rephrasings, QA tuned on some people transfers to people only seen in pretraining "
           "(Physics of LMs 3.1)",
    "dpo": "learning from feedback: raise the probability of preferred answers, lower the rejected ones (DPO; "
           "the NLL term on chosen answers keeps them likely) without losing what SFT taught",
    "kto": "learning from thumbs up/down: no pairs needed, good answers up and bad ones down (KTO) without "
           "losing what SFT taught",
    "rl": "on-policy RL: the model answers, a reward scores whole answers, it learns from its own samples "
          "(GRPO) without losing what SFT taught",
    "reward": "a reward model learns to stand in for human judgments",
}


def _stage_metrics(stage: dict) -> dict[str, float | None]:
    e = stage["evaluation"]
    return {"probe": e.get("completion_probe"), "held-out QA": e["qa_heldout"]["exact_match"],
            "trained QA": e.get("qa_trained", {}).get("exact_match"), "EOS": e["qa_heldout"]["eos_rate"],
            "preference acc.": e.get("preferences", {}).get("preference_accuracy"),
            "own-mistakes acc.": e.get("own_mistakes", {}).get("preference_accuracy")}


def story_line(stage: dict, previous: dict | None) -> str:
    """One line: what this stage changed (each metric before -> after) beside the lecture's claim it shows."""
    after = _stage_metrics(stage)
    before = _stage_metrics(previous) if previous else {}
    changes = []
    for key, value in after.items():
        if value is None:
            continue
        old = before.get(key)
        changes.append(f"{key} {_percent(value)}" if old is None else f"{key} {_percent(old)} → {_percent(value)}")
    claim = LECTURE_CLAIMS.get(stage["stage"], "")
    data = ""
    own = stage.get("own_answers")
    if own and "pairs" in own:
        data = (f" *Data*: {own['pairs']} wrong answers of the starting model itself to {own['questions']} "
                f"questions of {own['prompts']} (its greedy answer was right for {_percent(own['greedy_correct'])})"
                f" as {own['format']}" + (f", with {', '.join(own['mix'])}" if own["mix"] else "") + ".")
    return f"- **{stage['name']}**: {', '.join(changes)}.{data} *Lecture*: {claim}."


def _markdown(report: dict[str, Any], plots: dict[str, bool]) -> str:
    stages = report["stages"]
    lines = ["# jaxllm pipeline report", "",
             f"Recipe `{report['recipe']}`; wall time {report['wall_seconds']:.0f} s; tokenizer `{report['tokenizer']}`.",
             "", "## Evaluation after each stage (held-out data)", "",
             "| stage | kind | steps | text perplexity | bits/byte | completion probe | held-out QA | "
             "trained-people QA | ends with EOS | answer tokens | preference acc. | own-mistakes acc. | train s | "
             "compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(s) for s in stages]
    lines += ["", "Completion probe: does the model pick a held-out person's value from the attribute's pool after "
              "\"<name> was born in\" (and three more attributes)? It shows whether the knowledge is stored. "
              "Held-out QA: exact match of greedy answers about people whose QA was never trained "
              "(their biographies were in the pretraining text). Trained-people QA: questions from the SFT set. "
              "Preference accuracy: log p(chosen) > log p(rejected) on held-out pairs. Own-mistakes accuracy: the "
              "same on "
              "pairs whose rejected answer is a wrong greedy answer of the stage named by "
              "`evaluation.own_mistakes_after` to a held-out question (by construction low for that stage: did "
              "a later stage learn to rank the right answer above the mistake?). Train s: the stage's "
              "wall time (compile included); compile s: tracing, lowering and compiling the stage's programs "
              "(train and eval steps, generation) in this run, from JAX's compile events.", "",
              _compile_line(report), "",
              "## What each stage shows", ""]
    lines += [story_line(stage, previous) for stage, previous in zip(stages, [None, *stages[:-1]])]
    lines += [""]
    for name, title in (("losses", "Loss curves"), ("eval", "Evaluation"), ("rewards", "Reward curve")):
        if plots.get(name):
            lines += [f"## {title}", "", f"![{title}]({name}.png)", ""]
    prompts = [s["evaluation"].get("prompts", []) for s in stages]
    if any(prompts):
        lines += ["## The same prompts after every stage", ""]
        for i, first in enumerate(prompts[0]):
            lines += [f"**{first['prompt']}**", ""]
            for stage, answers in zip(stages, prompts):
                if i < len(answers):
                    answer = answers[i]["answer"].replace("\n", " ").replace("|", "\\|")
                    stop = "⏹" if answers[i]["ended_with_eos"] else "…(no EOS)"
                    lines.append(f"- {stage['name']}: {answer[:160]} {stop}")
            lines.append("")
    lines += ["## Stages", ""]
    for run in stages:
        summary = run["summary"]
        lines.append(f"- **{run['name']}** (`{run['workdir']}`): {run['steps']} steps, "
                     f"init from `{run['init_from'] or 'scratch'}`, final train loss "
                     f"{summary['train'].get('loss', float('nan')):.4f}, "
                     f"{summary.get('tokens_per_second', 0):.0f} tokens/s, "
                     f"first step (compiling included) {summary.get('compile_seconds', 0):.1f} s")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], workdir: str | Path) -> Path:
    workdir = Path(workdir)
    stages = report["stages"]
    plots = {}
    if stages:
        plots["losses"] = _plot_losses(stages, workdir / "losses.png")
        plots["eval"] = _plot_eval(stages, workdir / "eval.png")
        plots["rewards"] = _plot_rewards(stages, workdir / "rewards.png")
    write_atomic(workdir / "report.json", json.dumps(report, indent=2, default=str))
    path = workdir / "report.md"
    write_atomic(path, _markdown(report, plots))
    return path
