"""LoRA vs full fine-tuning on the same preset: optimizer-state memory, compiled step memory, step time.

    .venv/bin/python tools/bench_lora.py --preset small --rank 8 --steps 6 --out lora_bench.json
    .venv/bin/python tools/bench_lora.py --preset 25m --stage dpo --rank 16 model.dtype=bfloat16

Both variants run the step `jaxllm train` runs (built by `jaxllm.step_builder`, donated state, one device) on
one fixed synthetic batch of the stage; full fine-tuning differentiates every parameter, LoRA only the
adapters (the base is the step's reference_params, as in `jaxllm.train`). Timing: the median of
`--steps` steps after one warm-up step, the two variants interleaved step by step so other load on the
machine hits both alike. Memory: bytes of the optimizer state and of the trainable tree (exact), and
XLA's compiled memory analysis of the step (arguments, outputs, temporaries) per device. JSON on
stdout (and in --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxllm import lora  # noqa: E402
from jaxllm import model as model_lib  # noqa: E402
from jaxllm import sharding as sharding_lib  # noqa: E402
from jaxllm import state as state_lib  # noqa: E402
from jaxllm import step_builder  # noqa: E402
from jaxllm.config import MeshConfig, load_config  # noqa: E402


def synthetic_batch(stage: str, batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def rows():
        tokens = rng.integers(4, vocab, (batch, length)).astype(np.int32)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
        return {"tokens": tokens, "positions": positions, "segment_ids": np.ones((batch, length), np.int32),
                "loss_mask": (positions > length // 4).astype(np.float32)}

    if stage == "dpo":
        return {**{f"chosen_{k}": v for k, v in rows().items()}, **{f"rejected_{k}": v for k, v in rows().items()}}
    return rows()


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def build(config, batch: dict, base, mesh):
    """(compiled step, state, reference) of one variant: the step, optimizer and layouts come from
    `jaxllm.step_builder`, as in `jaxllm train`; LoRA trains fresh adapters on `base`, its reference."""
    built = step_builder.build(config, mesh)
    with jax.set_mesh(mesh):
        if built.base_abstract is not None:
            trainable = jax.jit(lambda: lora.init_adapters(config.model, 0))()
        else:
            trainable = jax.tree.map(jnp.copy, base)
        reference = base if built.reference_abstract is not None else None
        state = jax.jit(lambda p: state_lib.create_state(p, built.optimizer, 0),
                        out_shardings=built.state_shardings)(trainable)
        compiled = built.jit_train_step().lower(state, batch, reference, np.float32(np.inf)).compile()
    return compiled, state, reference


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--stage", choices=("sft", "dpo"), default="sft")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="q,k,v,o,gate,up,down")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dtype=bfloat16")
    args = parser.parse_args(argv)
    common = [f"model.preset={args.preset}", f"data.seq_len={args.seq_len}", f"train.stage={args.stage}",
              f"train.batch_size={args.batch_size}", "train.init_from=base", *args.overrides]
    full_config = load_config(None, common)
    lora_config = load_config(None, common + [f"model.lora_rank={args.rank}", f"model.lora_alpha={args.alpha}",
                                              f"model.lora_targets={args.targets}"])
    mesh = sharding_lib.make_mesh(MeshConfig(data=1, num_devices=1))
    batch = sharding_lib.place_batch(synthetic_batch(args.stage, args.batch_size, args.seq_len,
                                                     full_config.model.vocab_size), mesh)
    base = jax.jit(lambda: model_lib.init_model(full_config.model, 0)[1])()
    variants = {}
    for name, config in (("full", full_config), ("lora", lora_config)):
        began = time.perf_counter()
        compiled, state, reference = build(config, batch, base, mesh)
        memory = compiled.memory_analysis()
        variants[name] = {"compiled": compiled, "state": state, "reference": reference, "times": [],
                          "result": {
                              "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
                              "trainable_MiB": round(nbytes(state.params) / 2**20, 3),
                              "optimizer_state_MiB": round(nbytes(state.opt_state) / 2**20, 3),
                              "compile_seconds": round(time.perf_counter() - began, 2),
                              **({f"step_{k.replace('_in_bytes', '')}_MiB": round(getattr(memory, k) / 2**20, 2)
                                  for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
                                  if getattr(memory, k, None) is not None} if memory is not None else {})}}
    for round_number in range(args.steps + 1):  # round 0 warms up
        for variant in variants.values():
            began = time.perf_counter()
            with jax.set_mesh(mesh):
                variant["state"], metrics = variant["compiled"](variant["state"], batch, variant["reference"],
                                                                np.float32(np.inf))
            jax.block_until_ready(metrics["loss"])
            if round_number:
                variant["times"].append(time.perf_counter() - began)
            variant["result"]["last_loss"] = float(metrics["loss"])
    tokens = args.batch_size * args.seq_len * (2 if args.stage == "dpo" else 1)
    report = {"preset": args.preset, "stage": args.stage, "rank": args.rank, "targets": args.targets,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "device": jax.devices()[0].device_kind,
              "base_parameters": model_lib.count_params(base), "overrides": args.overrides}
    for name, variant in variants.items():
        median = statistics.median(variant["times"])
        report[name] = {**variant["result"], "step_seconds_median": round(median, 4),
                        "tokens_per_second": round(tokens / median, 1)}
    report["optimizer_state_ratio_lora_over_full"] = round(
        report["lora"]["optimizer_state_MiB"] / report["full"]["optimizer_state_MiB"], 5)
    report["step_time_ratio_lora_over_full"] = round(
        report["lora"]["step_seconds_median"] / report["full"]["step_seconds_median"], 3)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
