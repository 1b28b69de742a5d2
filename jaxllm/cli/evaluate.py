"""`jaxllm eval`: a checkpoint evaluated on tasks (`jaxllm lm-eval`: cli/lm_eval.py)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxllm import checkpoint as ckpt
from jaxllm.cli.sampling import sampling_settings
from jaxllm.errors import UsageError
from jaxllm.evaluate.runner import RunSettings, configure_tasks, format_table, run_task, write_samples
from jaxllm.evaluate.scoring import EvalModel
from jaxllm.tasks import list_tasks


def parse_fields(items: Sequence[str]) -> dict[str, str]:
    """--field NAME=RECORD_FIELD items -> {canonical field: record field}."""
    fields = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UsageError(f"--field {item!r} must look like NAME=RECORD_FIELD, e.g. --field question=query")
        fields[name.strip()] = path.strip()
    return fields


def sample_path(out: Path | None, samples_dir: str | None, name: str) -> Path | None:
    """Where a task's per-example JSONL goes: --samples-dir/NAME.jsonl, else beside --out (OUT.NAME.jsonl)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if samples_dir:
        return Path(samples_dir) / f"{safe}.jsonl"
    if out is not None:
        return out.with_name(f"{out.stem}.{safe}.jsonl")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxllm eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a checkpoint on tasks: perplexity / bits per byte, multiple choice by "
                    "log-likelihood, generative exact match / contains / regex, pairwise win rate with a judge.",
        epilog="tasks: a registered name (--list-tasks), a task YAML file, or KIND:SOURCE with KIND one of "
               "perplexity, mc, generate, pairwise and SOURCE jsonl:PATH, tfds:NAME:SPLIT, text:PATH, default:NAME "
               "or a file path.\nexamples:"
               "\n  jaxllm eval --checkpoint runs/sft --task bio_qa --task bio_mc --out r.json"
               "\n  jaxllm eval --checkpoint runs/pt --task mc:tfds:medmcqa:validation --field question=question "
               "--field choices=opa,opb,opc,opd --field answer=cop --num-fewshot 5"
               "\n  jaxllm eval --checkpoint runs/dpo --task pairwise:prompts.jsonl --baseline runs/sft "
               "--judge runs/judge")
    parser.add_argument("--checkpoint", help="a training workdir (config.yaml + checkpoints/)")
    parser.add_argument("--task", action="append", default=[], help="a task to run (repeatable)")
    parser.add_argument("--list-tasks", action="store_true", help="print the registered tasks and exit")
    parser.add_argument("--out", help="write the summary here as JSON, and per-example JSONL beside it")
    parser.add_argument("--samples-dir", help="directory for the per-example JSONL files (one per task)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per scoring / generation batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    task = parser.add_argument_group("task settings (override the tasks' own)")
    task.add_argument("--field", action="append", default=[], metavar="NAME=FIELD",
                      help="KIND:SOURCE and YAML tasks: read a canonical field (text, question, choices, answer, "
                           "baseline) from a record field; dotted paths read nested fields, a comma list gathers "
                           "several fields into choices")
    task.add_argument("--template", help="KIND:SOURCE and YAML tasks: the prompt template, "
                                         "e.g. 'Question: {question}\\nAnswer:'")
    task.add_argument("--num-fewshot", type=int, help="solved examples before each prompt")
    task.add_argument("--fewshot-source", help="data source of the few-shot examples (default: the task's own)")
    task.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                      help="wrap prompts in the chat template (default: the task's setting)")
    task.add_argument("--metric", choices=("exact_match", "contains", "regex"), help="generative metric")
    task.add_argument("--answer-regex", help="regex metric: the pattern that extracts the answer (group 1)")
    task.add_argument("--stop", action="append", help="generative tasks: cut answers at this string (repeatable)")
    task.add_argument("--max-new-tokens", type=int, help="generative and pairwise answers: at most this many tokens")
    pair = parser.add_argument_group("pairwise")
    pair.add_argument("--judge", help="workdir of the judge model (default: the evaluated model judges)")
    pair.add_argument("--baseline", help="workdir of the model to compare against (default: the records' "
                                         "baseline answers)")
    decoding = parser.add_argument_group("decoding (generative and pairwise tasks; default greedy)")
    decoding.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    decoding.add_argument("--top-k", type=int, default=0)
    decoding.add_argument("--top-p", type=float, default=1.0)
    decoding.add_argument("--min-p", type=float, default=0.0)
    decoding.add_argument("--repetition-penalty", type=float, default=1.0)
    decoding.add_argument("--eos-bias", type=float, default=0.0, help="added to the end-of-sequence logit")
    decoding.add_argument("--bias", action="append", default=[], metavar="TOKEN=VALUE")
    decoding.add_argument("--seed", type=int, default=0)
    return parser


def eval_command(argv: list[str]) -> int:
    """`jaxllm eval --checkpoint DIR --task TASK [--task ...] [--out results.json]`."""
    args = build_parser().parse_args(argv)
    if args.list_tasks:
        for name, description in list_tasks().items():
            print(f"{name:<16} {description}")
        return 0
    if not args.checkpoint or not args.task:
        raise UsageError("give --checkpoint WORKDIR and at least one --task (see --list-tasks)")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    tasks = configure_tasks(args.task, fields=parse_fields(args.field), template=args.template,
                            num_fewshot=args.num_fewshot, fewshot_source=args.fewshot_source, chat=args.chat,
                            metric=args.metric, answer_regex=args.answer_regex, stop=args.stop,
                            max_new_tokens=args.max_new_tokens)
    if (args.judge or args.baseline) and not any(task.kind == "pairwise" for task in tasks):
        raise UsageError("--judge and --baseline are for pairwise tasks; none was given")
    model = EvalModel.load(args.checkpoint)
    sampling = None
    if args.temperature or args.top_k or args.top_p != 1.0 or args.min_p or args.repetition_penalty != 1.0 \
            or args.eos_bias or args.bias:
        sampling = sampling_settings(model.tokenizer, max_new_tokens=1,  # the tasks set the length
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                     eos_bias=args.eos_bias, bias=args.bias)
    settings = RunSettings(batch_size=args.batch_size, progress=not args.no_progress, sampling=sampling,
                           seed=args.seed, judge=EvalModel.load(args.judge) if args.judge else None,
                           baseline=EvalModel.load(args.baseline) if args.baseline else None)
    out = Path(args.out) if args.out else None
    results = []
    for task in tasks:
        result = run_task(model, task, settings, args.limit)
        results.append(result)
        path = sample_path(out, args.samples_dir, task.name)
        if path is not None:
            write_samples(path, result.samples)
    print(format_table(results))
    if out is not None:
        summary = {"checkpoint": str(args.checkpoint), "step": ckpt.latest_step(args.checkpoint),
                   "tasks": {result.name: {**result.summary(),
                                           "samples": str(sample_path(out, args.samples_dir, result.name))}
                             for result in results},
                   "settings": {"limit": args.limit, "batch_size": args.batch_size, "temperature": args.temperature,
                                "judge": args.judge, "baseline": args.baseline,
                                "devices": len(model.mesh.devices.flat) if model.mesh is not None else 1}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    return 0
