"""`jaxllm train`: one stage from a YAML recipe (or `--dry-run`: its checks and ahead-of-time compile)."""

from __future__ import annotations

import argparse

from jaxllm.aot import dry_run
from jaxllm.config import load_config
from jaxllm.train import load_tokenizer, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm train", description="Train one stage from a YAML recipe.")
    parser.add_argument("recipe", help="a YAML recipe file, or a built-in recipe's name (e.g. pretrain_tiny; "
                        "`jaxllm recipes` lists them)")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, config)")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile ahead of time and print parameters, FLOPs/token and memory; no training")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=10 init_from=runs/pt")
    return parser


def train_command(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    config = load_config(args.recipe, args.overrides, log=print)
    if args.dry_run:
        load_tokenizer(config)  # a fixed model.vocab_size smaller than the tokenizer fails here, as in a run
        report = dry_run(config)
        for key, value in report.items():
            print(f"{key:>28}: {value}")
        return 0
    try:  # a failed background save is re-raised by the loop as one clear error; Orbax's own logs repeat it
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:
        pass
    result = train(config, args.workdir)
    state = "stopped early at" if result.stopped_early else "finished at"
    print(f"{config.train.stage} {state} step {result.final_step}; workdir {result.workdir}")
    if result.eval_metrics:
        print("eval: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.eval_metrics.items())))
    return 0
