"""`jaxllm pipeline`: tokenizer -> pretrain -> SFT -> feedback -> evaluation, with a report."""

from __future__ import annotations

import argparse

from jaxllm.pipeline import run_pipeline
from jaxllm.pipeline_recipe import DEFAULT_RECIPE


def pipeline_command(argv: list[str]) -> int:
    """Exit code 1 when a stage stopped the pipeline early (the report says which and why)."""
    parser = argparse.ArgumentParser(prog="jaxllm pipeline",
                                     description="Tokenizer -> pretrain -> SFT -> feedback -> evaluation, with a report.")
    parser.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help=f"pipeline recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--workdir", required=True, help="directory for every stage's run and the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = parser.parse_args(argv)
    report = run_pipeline(args.recipe, args.workdir, progress=not args.no_progress)
    return 0 if "stopped" not in report else 1
