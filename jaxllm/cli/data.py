"""`jaxllm data stats|select|generate`: what the data pipeline makes of a source, choosing a small SFT set,
and making training data with a teacher model (`data filter` and `data train-quality`: cli/quality.py)."""

from __future__ import annotations

import argparse
import json

from jaxllm import stages
from jaxllm.config import load_config
from jaxllm.data import format_report


def stats_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides `data stats`'s options stand for."""
    overrides = [f"data.{key}={value}" for key, value in (
        ("seq_len", args.seq_len), ("tokenizer", args.tokenizer), ("text_field", args.text_field),
        ("sft_mode", args.sft_mode), ("truncation", args.truncation), ("on_bad_record", args.on_bad_record))
        if value is not None]
    if args.no_pack:
        overrides.append("data.pack=false")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.seq_len is not None:  # stats need no model; let any seq_len through validation
        overrides.append(f"model.max_seq_len={max(args.seq_len, 1)}")
    return overrides


def stats_command(argv: list[str]) -> int:
    """`jaxllm data stats SOURCE [--stage auto|pretrain|sft|dpo|...] [--seq-len N] ...`."""
    parser = argparse.ArgumentParser(prog="jaxllm data stats",
                                     description="Count what the data pipeline makes of a source.")
    parser.add_argument("source", help="default:NAME, text:PATH, jsonl:PATH or tfds:NAME/CONFIG:SPLIT")
    parser.add_argument("--stage", default="auto", choices=("auto", *stages.names()),
                        help="read the records as this stage's data (auto: guessed from the first record's fields)")
    parser.add_argument("--config", default=None, help="a recipe YAML whose data.* settings to use")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help='"default" or a directory holding tokenizer.model')
    parser.add_argument("--text-field", default=None)
    parser.add_argument("--no-pack", action="store_true")
    parser.add_argument("--sft-mode", choices=("normal", "response_only", "all_tokens"), default=None)
    parser.add_argument("--truncation", choices=("truncate", "drop"), default=None)
    parser.add_argument("--on-bad-record", choices=("fail", "skip"), default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    config = load_config(args.config, stats_overrides(args))
    stats = stages.data_stats(args.source, config, stage=args.stage)
    print(json.dumps(stats, indent=1) if args.json else format_report(stats))
    return 0
