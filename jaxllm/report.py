"""A run report people can read: report.md with PNG plots, and report.json with every number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
    for axis, stage in zip(axes[0], stages):
        train = read_metrics(stage["workdir"], "train")
        evals = [r for r in read_metrics(stage["workdir"], "eval") if "loss" in r]
        axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        if evals:
            axis.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
        axis.set_title(f"{stage['name']} ({stage['stage']})")
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


def _row(stage: dict) -> str:
    e = stage["evaluation"]
    qa, text = e["qa_heldout"], e["text"]
    trained = e.get("qa_trained", {}).get("exact_match")
    pref = e.get("preferences", {}).get("preference_accuracy")
    fmt = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
    return (f"| {stage['name']} | {stage['stage']} | {stage['steps']} | {text['perplexity']:.2f} | "
            f"{text['bits_per_byte']:.3f} | {fmt(qa['exact_match'])} | {fmt(trained)} | {fmt(qa['eos_rate'])} | "
            f"{qa['mean_answer_tokens']:.1f} | {fmt(pref)} |")


def _markdown(report: dict[str, Any], plots: dict[str, bool]) -> str:
    stages = report["stages"]
    lines = ["# jaxllm pipeline report", "",
             f"Recipe `{report['recipe']}`; wall time {report['wall_seconds']:.0f} s; tokenizer `{report['tokenizer']}`.",
             "", "## Evaluation after each stage (held-out data)", "",
             "| stage | kind | steps | text perplexity | bits/byte | held-out QA | trained-people QA | ends with EOS | "
             "answer tokens | preference acc. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(s) for s in stages]
    lines += ["", "Held-out QA: exact match of greedy answers about people whose QA was never trained "
              "(their biographies were in the pretraining text). Trained-people QA: questions from the SFT set. "
              "Preference accuracy: log p(chosen) > log p(rejected) on held-out pairs.", ""]
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
    for stage in stages:
        summary = stage["summary"]
        lines.append(f"- **{stage['name']}** (`{stage['workdir']}`): {stage['steps']} steps, "
                     f"init from `{stage['init_from'] or 'scratch'}`, final train loss "
                     f"{summary['train'].get('loss', float('nan')):.4f}, "
                     f"{summary.get('tokens_per_second', 0):.0f} tokens/s, compile {summary.get('compile_seconds', 0):.1f} s")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], workdir: str | Path) -> Path:
    workdir = Path(workdir)
    stages = report["stages"]
    plots = {}
    if stages:
        plots["losses"] = _plot_losses(stages, workdir / "losses.png")
        plots["eval"] = _plot_eval(stages, workdir / "eval.png")
        plots["rewards"] = _plot_rewards(stages, workdir / "rewards.png")
    from jaxllm.files import write_atomic

    write_atomic(workdir / "report.json", json.dumps(report, indent=2, default=str))
    path = workdir / "report.md"
    write_atomic(path, _markdown(report, plots))
    return path
