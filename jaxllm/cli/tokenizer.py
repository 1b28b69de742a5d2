"""`jaxllm tokenizer train`: a sentencepiece tokenizer with jaxllm's special tokens."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxllm.data.tokenizer import MODEL_FILENAME, ROLE_MARKERS, train_tokenizer_from_inputs


def tokenizer_train_command(argv: list[str]) -> int:
    """`jaxllm tokenizer train --input FILES... --vocab-size N --out DIR [--model-type bpe|unigram]`."""
    parser = argparse.ArgumentParser(prog="jaxllm tokenizer train",
                                     description="Train a sentencepiece tokenizer with jaxllm's special tokens.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files (one sentence per line) or sources such as default:pretrain, jsonl:PATH")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="directory to write tokenizer.model into")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer_from_inputs(args.input, args.vocab_size, args.out, args.model_type,
                                            character_coverage=args.character_coverage)
    markers = ", ".join(f"{marker}={tokenizer.role_ids[role]}" for role, marker in ROLE_MARKERS.items())
    print(f"wrote {Path(args.out) / MODEL_FILENAME}: {args.model_type}, {tokenizer.vocab_size} ids "
          f"(pad=0 unk=1 bos=2 eos=3, role markers {markers})")
    return 0
