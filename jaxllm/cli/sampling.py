"""The sampling options shared by `generate`, `chat`, `data generate` and `eval`, and the SamplingSettings
they stand for."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jaxllm.errors import UsageError
from jaxllm.generate import EOS_ID, SamplingSettings


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    group.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    group.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--top-p", type=float, default=0.95)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--eos-bias", type=float, default=0.0, help="added to the end-of-sequence logit")
    group.add_argument("--bias", action="append", default=[], metavar="TOKEN=VALUE",
                       help="add VALUE to a token's logit; TOKEN is an id or a text piece (repeatable)")
    group.add_argument("--seed", type=int, default=0)


def parse_bias(items: Sequence[str], tokenizer) -> list[tuple[int, float]]:
    """--bias TOKEN=VALUE items -> (token id, logit bias); TOKEN is an id or a text piece of one token."""
    biases = []
    for item in items:
        token, sep, value = item.rpartition("=")
        if not sep or not token:
            raise UsageError(f"--bias {item!r} must look like TOKEN=VALUE, e.g. --bias 3=2.0 or --bias ' the=-1'")
        try:
            amount = float(value)
        except ValueError:
            raise UsageError(f"--bias {item!r}: {value!r} is not a number") from None
        if token.isdigit():
            biases.append((int(token), amount))
            continue
        ids = tokenizer.encode(token) if tokenizer is not None else []
        if len(ids) != 1:
            raise UsageError(f"--bias {item!r}: {token!r} is {len(ids)} tokens, not one; give a token id instead")
        biases.append((ids[0], amount))
    return biases


def sampling_settings(tokenizer, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      min_p: float, repetition_penalty: float, eos_bias: float, bias: Sequence[str],
                      extra_stop_ids: Sequence[int] = ()) -> SamplingSettings:
    """SamplingSettings from the sampling options; generation stops at EOS and at `extra_stop_ids`."""
    biases = parse_bias(bias, tokenizer)
    eos = tokenizer.eos_id if tokenizer is not None else EOS_ID
    if eos_bias:
        biases.append((eos, eos_bias))
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, token_bias=tuple(biases),
                            stop_ids=(eos, *extra_stop_ids))


def settings_from_args(args: argparse.Namespace, tokenizer, extra_stop_ids: Sequence[int] = ()) -> SamplingSettings:
    """SamplingSettings from the options `add_sampling_arguments` added (--greedy: temperature 0)."""
    return sampling_settings(tokenizer, max_new_tokens=args.max_new_tokens,
                             temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                             top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                             eos_bias=args.eos_bias, bias=args.bias, extra_stop_ids=extra_stop_ids)
