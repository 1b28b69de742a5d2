"""`jaxllm data stats|select|generate|pairs`: what the data pipeline makes of a source, choosing a small SFT set,
making training data with a teacher model, and preference pairs from a model's own mistakes (`data filter` and
`data train-quality`: cli/quality.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxllm import stages
from jaxllm.cli.sampling import add_sampling_arguments, settings_from_args
from jaxllm.config import load_config
from jaxllm.data import format_report
from jaxllm.generate import load_model_for_inference
from jaxllm.evaluate import read_records
from jaxllm.evaluate.scoring import EvalModel
from jaxllm.lecture.own_pairs import (OwnPairsSettings, own_mistake_pairs, question_records, thumbs_from_pairs,
                                      write_pairs)
from jaxllm.lecture.selection import SCORES, SelectionOptions, run_selection, source_spec
from jaxllm.lecture.teacher import MODES, REPHRASE_STYLES, TeacherSettings, generate_data, read_inputs, stop_ids_for


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


def select_command(argv: list[str]) -> int:
    """`jaxllm data select IN.jsonl --out OUT.jsonl --k K [--by SCORE] [--diversity] [--checkpoint WORKDIR]`."""
    parser = argparse.ArgumentParser(
        prog="jaxllm data select",
        description="Choose a small SFT set: by answer length, the model's loss/perplexity, instruction-following "
                    "difficulty (IFD), and/or diversity (k-center on the model's hidden states).")
    parser.add_argument("input", help='SFT records: .jsonl with {"messages"} or {"prompt","response"}, or a source')
    parser.add_argument("--out", required=True, help="the chosen records, JSONL, in input order")
    parser.add_argument("--k", type=int, required=True, help="how many examples to choose")
    parser.add_argument("--by", choices=SCORES, help="rank by this score (highest first unless --lowest)")
    parser.add_argument("--lowest", action="store_true", help="prefer the lowest scores")
    parser.add_argument("--diversity", action="store_true", help="k-center greedy on mean hidden states")
    parser.add_argument("--pool", type=int, help="with --by and --diversity: k-center picks from this many "
                                                 "best-scored examples (default 4·k)")
    parser.add_argument("--max-ifd", type=float, default=1.0, help="--by ifd: drop IFD >= this (default 1)")
    parser.add_argument("--checkpoint", help="a training workdir; needed for loss, perplexity, ifd and --diversity")
    parser.add_argument("--tokenizer", default="default", help="for --by length without a checkpoint")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="read only the first N records")
    parser.add_argument("--scores", help="also write every example's scores here (JSONL)")
    args = parser.parse_args(argv)
    options = SelectionOptions(k=args.k, by=args.by, lowest=args.lowest, diversity=args.diversity, pool=args.pool,
                               max_ifd=args.max_ifd)
    result = run_selection(args.input, args.out, options, checkpoint=args.checkpoint, tokenizer=args.tokenizer,
                           batch_size=args.batch_size, limit=args.limit, scores_path=args.scores)
    print(" -> ".join(f"{name}: {left}" for name, left in result["funnel"]), file=sys.stderr)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(result['selected'])} of {result['read']} examples to {result['out']}")
    return 0


def generate_command(argv: list[str]) -> int:
    """`jaxllm data generate --teacher WORKDIR --prompts FILE --out OUT.jsonl --mode distill|continue|rephrase`."""
    parser = argparse.ArgumentParser(
        prog="jaxllm data generate",
        description="Make training data with a teacher checkpoint: distill (answer prompts), continue (cut "
                    "documents in half and continue them) or rephrase (rewrite documents in a style).")
    parser.add_argument("--teacher", required=True, help="the teacher's training workdir")
    parser.add_argument("--prompts", required=True,
                        help="prompts or documents: .jsonl, a text file, or a source such as default:pretrain")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--mode", choices=MODES, default="distill")
    parser.add_argument("--style", choices=sorted(REPHRASE_STYLES), default="wikipedia", help="rephrase style")
    parser.add_argument("--instruction", default="", help="rephrase: your own rewrite instruction")
    parser.add_argument("--samples", type=int, default=1, help="answers per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, help="use only the first N input records")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the documents")
    unfinished = parser.add_mutually_exclusive_group()
    unfinished.add_argument("--keep-unfinished", dest="keep_unfinished", action="store_true", default=None,
                            help="keep answers cut off by --max-new-tokens (default only in continue mode)")
    unfinished.add_argument("--drop-unfinished", dest="keep_unfinished", action="store_false")
    parser.add_argument("--report", help="also write the report as JSON here")
    add_sampling_arguments(parser, 64)
    args = parser.parse_args(argv)
    settings = TeacherSettings(mode=args.mode, style=args.style, instruction=args.instruction, samples=args.samples,
                               batch_size=args.batch_size, keep_unfinished=args.keep_unfinished,
                               text_field=args.text_field, limit=args.limit, seed=args.seed)
    settings.validate()
    records = read_inputs(args.prompts, args.mode, args.text_field)
    model = load_model_for_inference(args.teacher)
    sampling = settings_from_args(args, model[3], extra_stop_ids=stop_ids_for(args.mode, model[3]))
    report = generate_data(model, records, sampling, settings, args.out,
                           log=lambda line: print(line, file=sys.stderr))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report["skipped"].items())) or "none"
    print(f"wrote {report['written']} records from {report['read']} inputs to {report['out']} "
          f"(skipped: {reasons}; {report['generated_tokens']} tokens, {report['tokens_per_second']:.0f} tokens/s)")
    return 0


def pairs_command(argv: list[str]) -> int:
    """`jaxllm data pairs --model WORKDIR --questions SOURCE --out PAIRS.jsonl`."""
    parser = argparse.ArgumentParser(
        prog="jaxllm data pairs",
        description="Preference pairs from a model's own mistakes: it answers each question (greedy, then sampled); "
                    "each distinct wrong answer (exact match against the record's 'reference') becomes "
                    '{"prompt", "chosen": reference, "rejected": answer}, DPO/IPO/ORPO data.')
    parser.add_argument("--model", required=True, help="the training workdir of the model that answers")
    parser.add_argument("--questions", required=True,
                        help='{"prompt", "reference"} records: a .jsonl file or a source such as default:rl_prompts')
    parser.add_argument("--out", required=True, help="output JSONL of pairs")
    parser.add_argument("--format", choices=("pairs", "thumbs"), default="pairs",
                        help='pairs (DPO) or thumbs: {"prompt", "completion", "label"}, the right answer up and each '
                             "wrong one down (KTO)")
    parser.add_argument("--samples", type=int, default=4, help="answers per question, the greedy one first (default 4)")
    parser.add_argument("--temperature", type=float, default=1.0, help="for the sampled answers (default 1.0)")
    parser.add_argument("--max-pairs-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--keep-unfinished", action="store_true",
                        help="also answers that never stopped within --max-new-tokens")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = OwnPairsSettings(samples=args.samples, temperature=args.temperature,
                                max_pairs_per_prompt=args.max_pairs_per_prompt, max_new_tokens=args.max_new_tokens,
                                keep_unfinished=args.keep_unfinished, batch_size=args.batch_size, seed=args.seed)
    settings.validate()
    questions = question_records(read_records(source_spec(args.questions, jsonl_only=True), args.limit),
                                 args.questions)
    pairs, report = own_mistake_pairs(EvalModel.load(args.model), questions, settings)
    write_pairs(args.out, pairs if args.format == "pairs" else thumbs_from_pairs(pairs))
    written = "pairs" if args.format == "pairs" else "wrong answers (+ the right ones)"
    print(f"wrote {report['pairs']} {written} about {report['questions_with_pairs']} of {report['questions']} "
          f"questions to {args.out} (greedy answers right: {report['greedy_correct']:.1%}, "
          f"any of {args.samples} right: {report['any_correct']:.1%})")
    return 0
