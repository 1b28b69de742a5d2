"""`jaxllm convert from-hf|to-hf|merge-lora`: Hugging Face model folders in and out, LoRA merged into its base."""

from __future__ import annotations

import argparse

from jaxllm.convert.hf_config import SUPPORTED_FAMILIES
from jaxllm.convert.hf_export import merge_lora, to_hf
from jaxllm.convert.hf_import import from_hf


def from_hf_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm convert from-hf",
                                     description="Convert a Hugging Face model folder into a jaxllm workdir.")
    parser.add_argument("hf_dir", help="folder with config.json, *.safetensors and the tokenizer files")
    parser.add_argument("--out", required=True, help="the jaxllm workdir to write (must not hold a checkpoint)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="parameter dtype (default: bfloat16 for bf16 checkpoints, else float32)")
    parser.add_argument("--fsdp", type=int, default=1,
                        help="shard the parameters over this many devices while converting (large models)")
    args = parser.parse_args(argv)
    from_hf(args.hf_dir, args.out, dtype=args.dtype, fsdp=args.fsdp)
    return 0


def to_hf_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm convert to-hf",
                                     description="Write a jaxllm workdir as a Hugging Face model folder "
                                                 "(LoRA adapters are merged into their base).")
    parser.add_argument("workdir")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--family", choices=SUPPORTED_FAMILIES,
                        help="model_type to write (default: the converted source's, else inferred)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    to_hf(args.workdir, args.out, family=args.family, dtype=args.dtype,
          max_shard_bytes=int(args.max_shard_gb * 2**30))
    return 0


def merge_lora_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm convert merge-lora",
                                     description="Merge a LoRA run's adapters into its base: a plain workdir.")
    parser.add_argument("workdir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    merge_lora(args.workdir, args.out)
    return 0
