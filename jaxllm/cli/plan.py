"""`jaxllm plan`: compute-optimal model size and token count (Chinchilla)."""

from __future__ import annotations

import argparse
import json
import math

from jaxllm.errors import UsageError
from jaxllm.lecture.planning import TOKENS_PER_PARAM_RULE, format_plan, plan

NUMBER_FLAGS = ("--flops", "--params", "--tokens", "--tokens-per-param")


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (e.g. 1e21)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (write e.g. 1e21)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive number")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def glue_numbers(argv: list[str]) -> list[str]:
    """argparse reads "-1e21" as an option: glue numbers to their flag ("--flops=-1e21") so the value check
    can say what is wrong."""
    argv = list(argv)
    for i in range(len(argv) - 1, 0, -1):
        if argv[i - 1] in NUMBER_FLAGS and _is_number(argv[i]):
            argv[i - 1: i + 1] = [f"{argv[i - 1]}={argv[i]}"]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxllm plan", description="Compute-optimal model size and token count (Chinchilla).")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--flops", type=positive_number, help="training budget in FLOPs, e.g. 1e21")
    group.add_argument("--params", type=positive_number, help="model size in parameters, e.g. 1e9")
    group.add_argument("--tokens", type=positive_number, help="training tokens, e.g. 2e10")
    parser.add_argument("--tokens-per-param", type=positive_number, default=TOKENS_PER_PARAM_RULE,
                        help="the rule of thumb's ratio (default 20)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="context length for the attention FLOPs (default: each preset's max_seq_len)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def plan_command(argv: list[str]) -> int:
    """`jaxllm plan --flops C | --params N | --tokens D [--json] [--seq-len T]`."""
    args = build_parser().parse_args(glue_numbers(argv))
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError("--seq-len must be at least 1")
    result = plan(flops=args.flops, params=args.params, tokens=args.tokens,
                  tokens_per_param=args.tokens_per_param, seq_len=args.seq_len)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0
