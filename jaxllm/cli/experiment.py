"""`jaxllm experiment knowledge`: single vs multi+permute biographies (the knowledge-extraction experiment)."""

from __future__ import annotations

import argparse

from jaxllm.lecture.knowledge_experiment import load_settings, run_experiment


def knowledge_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm experiment knowledge",
                                     description="Single vs multi+permute biographies: is pretrained knowledge "
                                                 "extractable after QA fine-tuning on half of the people?")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", help="YAML of experiment settings, e.g. configs/knowledge_cpu.yaml")
    parser.add_argument("--people", type=int)
    parser.add_argument("--versions", type=int)
    parser.add_argument("--preset")
    parser.add_argument("--pretrain-steps", type=int, dest="pretrain_steps")
    parser.add_argument("--sft-steps", type=int, dest="sft_steps")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("people", "versions", "preset", "pretrain_steps", "sft_steps", "seed")}
    settings = load_settings(args.config, overrides)
    run_experiment(settings, args.workdir, progress=not args.no_progress)
    return 0
