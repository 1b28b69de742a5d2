"""`jaxllm bench`: how fast a stage's step runs and how close it comes to the hardware's limit; with
`--levers`, every CPU speed lever measured A/B on this CPU (jaxllm.bench.levers)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jaxllm import bench
from jaxllm.bench.cases import STAGES, BenchSettings
from jaxllm.bench.levers import format_study, run_study
from jaxllm.bench.profile import format_profile
from jaxllm.bench.report import append_history, describe, format_table, process_index
from jaxllm.bench.run import run_bench
from jaxllm.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm bench", description=bench.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="25m", help="model preset (default 25m)")
    parser.add_argument("--stage", default="pretrain", choices=STAGES)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, in sequences (pairs for dpo)")
    parser.add_argument("--seq-len", type=int, default=0, help="default: the preset's context length")
    parser.add_argument("--mesh", default="", help="data=N,fsdp=N,tensor=N (default: data over all devices)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=value ... ; repeat to compare variants in one interleaved run "
                             "(donate=false turns off state donation)")
    parser.add_argument("--no-donate", action="store_true", help="do not donate the train state to the step")
    parser.add_argument("--prompt-len", type=int, default=128, help="generate: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="generate: decoded tokens")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (overrides the table)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the interleaved matmul ceiling")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--history", default="bench_history.jsonl", help="JSONL file the results are appended to")
    parser.add_argument("--no-history", action="store_true")
    parser.add_argument("--profile", default="", help="write a jax.profiler trace of the timed steps here")
    parser.add_argument("--levers", action="store_true",
                        help="measure the CPU speed levers A/B (several processes) and print the table")
    parser.add_argument("--lever", action="append", default=[], metavar="NAME",
                        help="with --levers: measure only this lever (repeatable; default: every lever)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every variant, e.g. model.remat=full")
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(preset=args.preset, stage=args.stage, batch_size=args.batch_size, seq_len=args.seq_len,
                         mesh=args.mesh, steps=args.steps, warmup=args.warmup, variants=tuple(args.variant),
                         donate=not args.no_donate, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                         peak_tflops=args.peak_tflops, ceiling=not args.no_ceiling, profile=args.profile,
                         overrides=tuple(args.overrides))


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def lever_study(settings: BenchSettings, json_path: str, log, only: tuple[str, ...] = ()) -> int:
    """Runs the study (of the levers in `only`, or all), prints the table and writes the JSON to --json."""
    study = run_study(settings, log=log, only=only)
    print(format_study(study))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(study, handle, indent=2)
    return 0


def bench_command(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    settings = settings_from_args(args)
    log = (lambda *_: None) if args.quiet else _log
    if args.lever and not args.levers:
        raise UsageError("--lever NAME chooses what --levers measures: add --levers")
    if args.levers:
        return lever_study(settings, args.json, log, tuple(args.lever))
    records = run_bench(settings, log=log)
    if process_index() != 0:
        return 0
    print(describe(records))
    print(format_table(records))
    if "profile" in records[0]:
        print(format_profile(records[0]["profile"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": records}, indent=2))
    if not args.no_history and args.history:
        append_history(args.history, records)
    bad = [r["name"] for r in records if r["loss_last"] is not None and not math.isfinite(r["loss_last"])]
    if bad:
        print(f"warning: non-finite loss in {', '.join(bad)}", file=sys.stderr)
    return 0
