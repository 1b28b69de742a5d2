"""`jaxllm analyze knowledge|shift`: what a model already knows (Gekhman et al. 2024) and which answer tokens
alignment changed (URIAL)."""

from __future__ import annotations

import argparse
import sys

from jaxllm.lecture.analysis import (CATEGORIES, KnowledgeSettings, knowledge_categories, load_qa, shift_between,
                                     summarize_knowledge, write_knowledge, write_shift)
from jaxllm.generate import load_model_for_inference


def knowledge_command(argv: list[str]) -> int:
    """`jaxllm analyze knowledge --checkpoint WORKDIR --qa FILE --out DIR`."""
    defaults = KnowledgeSettings()
    parser = argparse.ArgumentParser(
        prog="jaxllm analyze knowledge",
        description="Sort QA pairs by what the model already knows: HighlyKnown / MaybeKnown / WeaklyKnown / "
                    "Unknown (Gekhman et al. 2024), from greedy and sampled few-shot answers.")
    parser.add_argument("--checkpoint", required=True, help="a training workdir")
    parser.add_argument("--qa", required=True, help='QA records: .jsonl of {"prompt", "reference"} or a source')
    parser.add_argument("--out", required=True, help="directory for knowledge.jsonl, summary.json and sft/*.jsonl")
    parser.add_argument("--exemplars", help="QA records to draw few-shot exemplars from (default: the --qa file)")
    parser.add_argument("--shots", type=int, default=defaults.shots)
    parser.add_argument("--variants", type=int, default=defaults.variants, help="exemplar sets (greedy once each)")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="sampled answers per exemplar set")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--limit", type=int, help="only the first N questions")
    args = parser.parse_args(argv)
    settings = KnowledgeSettings(shots=args.shots, variants=args.variants, samples=args.samples,
                                 temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, seed=args.seed)
    settings.validate()
    qa = load_qa(args.qa, args.limit)
    exemplars = load_qa(args.exemplars) if args.exemplars else None
    model = load_model_for_inference(args.checkpoint)
    rows = knowledge_categories(model, qa, settings, exemplars)
    summary = summarize_knowledge(rows, settings)
    out = write_knowledge(rows, summary, args.out)
    print(f"{summary['scored']} questions: " + ", ".join(
        f"{c} {summary['counts'][c]} ({summary['fractions'][c]:.0%})" for c in CATEGORIES))
    if summary["skipped"]:
        print(f"{summary['skipped']} questions were too long to ask and are left out", file=sys.stderr)
    print(f"wrote {out / 'knowledge.jsonl'}, {out / 'summary.json'} and {out / 'sft'}/<category>.jsonl")
    return 0


def shift_command(argv: list[str]) -> int:
    """`jaxllm analyze shift --base WORKDIR --aligned WORKDIR --prompts FILE --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="jaxllm analyze shift",
        description="Which answer tokens did alignment change? The aligned model answers greedily; each token is "
                    "ranked under the base model: unshifted (1), marginal (2-3), shifted (beyond) (URIAL).")
    parser.add_argument("--base", required=True, help="the base model's workdir")
    parser.add_argument("--aligned", required=True, help="the aligned (fine-tuned) model's workdir")
    parser.add_argument("--prompts", required=True, help=".jsonl of prompt/messages records, or one prompt a line")
    parser.add_argument("--out", required=True, help="directory for shift.html and shift.json")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    args = parser.parse_args(argv)
    result = shift_between(args.base, args.aligned, args.prompts, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, limit=args.limit)
    out = write_shift(result, args.out, f"Token shift: {args.aligned} vs {args.base}")
    s = result["summary"]
    print(f"{s['positions']} tokens: unshifted {s['unshifted']:.1%}, marginal {s['marginal']:.1%}, "
          f"shifted {s['shifted']:.1%}")
    if s["top_shifted_tokens"]:
        top = s["top_shifted_tokens"][:8]
        print("most often shifted: " + ", ".join(f"{t['token']!r} ({t['shifted']})" for t in top))
    print(f"wrote {out / 'shift.html'} and {out / 'shift.json'}")
    return 0
