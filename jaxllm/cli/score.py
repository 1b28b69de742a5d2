"""`jaxllm score`: (prompt, answer) records scored with a reward model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxllm.rl.scoring import score_file


def score_summary(records: list[dict], scores: list[float]) -> str:
    """One line: how many records, the mean score and, for preference pairs, how often chosen > rejected."""
    pairs = [r for r in records if "chosen_score" in r]
    correct = sum(r["chosen_score"] > r["rejected_score"] for r in pairs)
    summary = f"scored {len(records)} records: mean score {np.mean(scores):.4f}"
    if pairs:
        summary += f"; chosen > rejected on {correct}/{len(pairs)} pairs ({correct / len(pairs):.1%})"
    return summary


def score_command(argv: list[str]) -> int:
    """`jaxllm score --checkpoint REWARD_MODEL_WORKDIR --input F.jsonl [--out scores.jsonl]`."""
    parser = argparse.ArgumentParser(prog="jaxllm score", description="Score (prompt, answer) records with a reward "
                                     "model. Records: {prompt|messages, response|answer|completion} get 'score'; "
                                     "{prompt, chosen, rejected} get chosen_score/rejected_score.")
    parser.add_argument("--checkpoint", required=True, help="workdir of a train.stage=reward run")
    parser.add_argument("--input", required=True, help="a .jsonl file of records")
    parser.add_argument("--out", help="write the records with their scores here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    records, scores = score_file(args.checkpoint, args.input, args.batch_size)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        print("\n".join(lines))
    print(score_summary(records, scores), file=sys.stderr)
    return 0
