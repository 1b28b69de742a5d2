"""`jaxllm data filter` (heuristics -> exact dedup -> MinHash near dedup -> quality classifier, with a report)
and `jaxllm data train-quality` (the classifier). JAX-free: the filter's workers fork from this process."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import yaml

from jaxllm.data.sources import TEXT_UNITS
from jaxllm.errors import UsageError
from jaxllm.lecture.quality.classifier import TrainOptions, train_quality_classifier
from jaxllm.lecture.quality.dedup import MinHashConfig
from jaxllm.lecture.quality.pipeline import FilterOptions, filter_documents, format_report, heuristic_settings
from jaxllm.lecture.quality.profiles import PROFILES, describe_profiles, describe_rules
from jaxllm.lecture.quality.rules import RULES, HeuristicConfig


def parse_setting(text: str) -> tuple[str, Any]:
    """--set NAME=VALUE -> (name, the value read as YAML: 20, null, [a, b], or the text itself)."""
    if "=" not in text:
        raise UsageError(f"--set '{text}' must look like name=value, e.g. --set min_words=20")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def heuristics_from_args(args: argparse.Namespace) -> HeuristicConfig | None:
    """The heuristic settings the filter's options stand for (None: --no-heuristics)."""
    if args.no_heuristics:
        return None
    settings = dict(parse_setting(s) for s in args.set or [])
    return heuristic_settings(args.profile, args.rules, settings, args.disable_rule or ())


def filter_epilog() -> str:
    rules = "\n".join("  " + line for line in describe_rules())
    profiles = "\n".join("  " + line for line in describe_profiles())
    return (f"heuristic rules, in the order they run, with their defaults (off = not checked; change one with "
            f"--set NAME=VALUE, null turns it off):\n{rules}\n\nprofiles (--profile; {', '.join(PROFILES)}), "
            f"the settings each changes from the defaults:\n{profiles}")


def build_filter_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxllm data filter",
        description="Heuristic rules -> exact dedup -> MinHash near dedup -> quality classifier, with a report.",
        epilog=filter_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IN", help="JSONL or text files, or directories of them")
    parser.add_argument("--out", required=True, help="kept documents, JSONL (.gz to compress)")
    parser.add_argument("--report", help="write the report as JSON here")
    parser.add_argument("--rejected", help="write rejected documents with step, rule and reason here (JSONL)")
    parser.add_argument("--classifier", help="directory of a classifier from `jaxllm data train-quality`")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep p(good) >= this (default 0.5)")
    parser.add_argument("--no-heuristics", action="store_true", help="skip the heuristic rules")
    parser.add_argument("--no-dedup", action="store_true", help="skip exact and near deduplication")
    parser.add_argument("--no-near-dedup", action="store_true", help="skip only MinHash near deduplication")
    parser.add_argument("--profile", default="web", choices=tuple(PROFILES),
                        help="built-in heuristic settings for a kind of text (default web; listed below); "
                        "--rules and --set apply on top")
    parser.add_argument("--rules", help="YAML/JSON file of heuristic settings (see HeuristicConfig)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="one heuristic setting, e.g. --set min_words=20 --set max_char_run=null")
    parser.add_argument("--disable-rule", action="append", metavar="RULE", help=f"one of: {', '.join(RULES)}")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--text-unit", default="file", choices=TEXT_UNITS,
                        help="a document in plain text inputs (default: the whole file)")
    parser.add_argument("--skip-malformed", action="store_true", help="skip malformed JSONL lines, counting them")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: every available core)")
    parser.add_argument("--chunk-size", type=int, default=256, help="documents per worker task")
    parser.add_argument("--num-perm", type=int, default=MinHashConfig.num_perm, help="MinHash hash functions")
    parser.add_argument("--bands", type=int, default=MinHashConfig.bands, help="LSH bands (num_perm / bands rows)")
    parser.add_argument("--shingle-size", type=int, default=MinHashConfig.shingle_size, help="words per shingle")
    return parser


def filter_command(argv: Sequence[str]) -> int:
    """`jaxllm data filter IN... --out OUT [--report R] [--classifier C --threshold T] ...`."""
    args = build_filter_parser().parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 (all cores) or more, got {args.workers}")
    if args.threshold != 0.5 and not args.classifier:
        raise UsageError("--threshold needs --classifier (the threshold applies to its score)")
    options = FilterOptions(
        heuristics=heuristics_from_args(args), exact_dedup=not args.no_dedup,
        near_dedup=not (args.no_dedup or args.no_near_dedup),
        minhash=MinHashConfig(num_perm=args.num_perm, bands=args.bands, shingle_size=args.shingle_size),
        classifier=args.classifier, threshold=args.threshold, text_field=args.text_field,
        text_unit=args.text_unit, workers=args.workers, chunk_size=args.chunk_size,
        skip_malformed=args.skip_malformed)
    report = filter_documents(args.inputs, args.out, options, report_path=args.report, rejected_path=args.rejected)
    print(format_report(report))
    return 0


def train_quality_command(argv: Sequence[str]) -> int:
    """`jaxllm data train-quality --good G... --bad B... --out DIR`."""
    defaults = TrainOptions()
    parser = argparse.ArgumentParser(
        prog="jaxllm data train-quality",
        description="Train a hashed n-gram logistic-regression quality classifier (good vs bad documents).")
    parser.add_argument("--good", nargs="+", required=True, help="files/directories of good documents")
    parser.add_argument("--bad", nargs="+", required=True, help="files/directories of bad documents")
    parser.add_argument("--out", required=True, help="directory to write weights.npz and classifier.json")
    parser.add_argument("--buckets", type=int, default=defaults.buckets, help="hash buckets (default 2**18)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--l2", type=float, default=defaults.l2)
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--text-unit", default="file", choices=TEXT_UNITS)
    args = parser.parse_args(argv)
    for name in ("buckets", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise UsageError("--validation-fraction must be in [0, 1)")
    options = TrainOptions(buckets=args.buckets, epochs=args.epochs, batch_size=args.batch_size,
                           learning_rate=args.learning_rate, l2=args.l2,
                           validation_fraction=args.validation_fraction, seed=args.seed)
    classifier = train_quality_classifier(args.good, args.bad, args.out, options=options,
                                          text_field=args.text_field, text_unit=args.text_unit)
    metrics = classifier.metadata["training"]
    validation = metrics["validation_accuracy"]
    print(f"trained on {metrics['good_documents']} good / {metrics['bad_documents']} bad documents: "
          f"train accuracy {metrics['train_accuracy']:.3f}"
          + (f", validation accuracy {validation:.3f} ({metrics['validation_documents']} held out)"
             if validation is not None else ", no validation split (fewer than 10 documents per class)")
          + f"; saved to {args.out}")
    return 0
