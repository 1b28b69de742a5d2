"""`jaxllm sweep`: model sizes trained at fixed FLOP budgets, iso-FLOP curves and the compute-optimal fit."""

from __future__ import annotations

import argparse
import sys

from jaxllm.errors import UsageError
from jaxllm.lecture.sweep import SweepSettings, format_sweep, plan_runs, run_name, run_sweep


def number_list(text: str, kind: type, what: str) -> tuple:
    """'1e10,3e10' -> (1e10, 3e10); with kind=int the numbers must be whole ('16,32' -> (16, 32))."""
    example = "1e10,3e10,1e11" if kind is float else "16,32,48"
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--{what} '{text}' must be a comma-separated list of numbers, e.g. {example}") from None
    if kind is int:
        if any(value != int(value) for value in values):
            raise UsageError(f"--{what} '{text}' must hold whole numbers, e.g. {example}")
        return tuple(int(value) for value in values)
    return values


def build_parser(defaults: SweepSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxllm sweep", description="Train model sizes at fixed FLOP budgets, plot iso-FLOP curves and fit "
                                         "the compute-optimal law (Chinchilla approach 2). Resumable.")
    parser.add_argument("--workdir", required=True, help="where the runs, sweep.json and isoflop.png go")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in defaults.budgets),
                        help="FLOP budgets, comma-separated (default %(default)s)")
    parser.add_argument("--widths", default=",".join(str(w) for w in defaults.widths),
                        help="model widths d_model; depth = width/32, heads of 16 (default %(default)s)")
    parser.add_argument("--recipe", help="YAML recipe every run starts from (default: built-in pretraining config)")
    parser.add_argument("--source", default=defaults.source, help="training data (default %(default)s)")
    parser.add_argument("--eval-source", default=defaults.eval_source, help="eval data (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--min-steps", type=int, default=defaults.min_steps,
                        help="leave out sizes that get fewer steps at a budget (default %(default)s)")
    parser.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dry-run", action="store_true", help="print the grid and stop")
    parser.add_argument("overrides", nargs="*", help="key.sub=value for every run, e.g. mesh.num_devices=1")
    return parser


def sweep_command(argv: list[str]) -> int:
    """`jaxllm sweep --workdir DIR [--budgets 1e10,3e10,1e11] [--widths 16,24,32,48,64] [key=value ...]`."""
    args = build_parser(SweepSettings()).parse_intermixed_args(argv)
    settings = SweepSettings(
        budgets=number_list(args.budgets, float, "budgets"), widths=number_list(args.widths, int, "widths"),
        recipe=args.recipe, source=args.source, eval_source=args.eval_source, seq_len=args.seq_len,
        batch_size=args.batch_size, learning_rate=args.learning_rate, min_steps=args.min_steps,
        eval_batches=args.eval_batches, seed=args.seed, overrides=tuple(args.overrides))
    if args.dry_run:
        planned = plan_runs(settings)
        for run, _ in planned:
            print(f"{run_name(run):<18} C={run.flops:.2g} N={run.params:,} D={run.tokens:,} steps={run.steps}")
        print(f"{len(planned)} runs, {sum(r.tokens for r, _ in planned):,} tokens in all")
        return 0
    report = run_sweep(settings, args.workdir, log=lambda line: print(line, file=sys.stderr))
    print(format_sweep(report))
    return 0
