#!/usr/bin/env python
"""Peer comparison on CPU: nanoGPT (PyTorch, float32 eager, its own AdamW) vs jaxllm's default train step.

    python tools/compare_nanogpt.py --nanogpt PATH/TO/nanoGPT [--sizes S,M] [--rounds 3] [--json out.json]
    python tools/compare_nanogpt.py --nanogpt PATH/TO/nanoGPT --dtype bfloat16   # both in mixed precision

nanoGPT's `model.py` is imported from the path given (a checkout of github.com/karpathy/nanoGPT, or
the file itself); it is read, never copied into this repository. PyTorch must be installed (CPU build:
`pip install torch --index-url https://download.pytorch.org/whl/cpu`).

Both run in this one process, in alternating rounds (nanoGPT steps, jaxllm steps, the next size, ...),
each round bracketed by the in-run float32 2048^3 matmul ceiling (through JAX, and through PyTorch for
nanoGPT's own ceiling), so load from other processes hits both alike. jaxllm runs as `jaxllm train`
would: its default config and the CLI's process levers for this CPU (`jaxllm.cpu_levers`: the tool
re-executes itself once with them; `--no-cli-env` keeps the plain process).

Sizes (GPT-style, tied embeddings, batch 8): S = d256 L4 H4 seq256 V4096, M = d512 L8 H8 seq512 V8192.
Model FLOPs per token for both: 6 * (matmul params incl. the output head) + 12 * L * T * d (nanoGPT's
`estimate_mfu` convention); jaxllm's SwiGLU (3 matrices of d x 8/3 d) and nanoGPT's GELU MLP (2 of
d x 4d) have the same matmul FLOPs. The JSON has per-round tokens/s, the ceiling, and the ratio.

`--dtype bfloat16`: mixed precision on both sides, float32 weights and optimizer: nanoGPT's forward under
`torch.autocast("cpu", dtype=torch.bfloat16)` (its train.py's recipe on GPUs; on CPU it trains in float32),
jaxllm with `model.dtype=bfloat16`; the ceilings are then bf16 x bf16 -> float32 matmuls (AMX CPUs run these
several times faster than float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "S": dict(d_model=256, num_layers=4, num_heads=4, seq_len=256, vocab_size=4096, batch_size=8),
    "M": dict(d_model=512, num_layers=8, num_heads=8, seq_len=512, vocab_size=8192, batch_size=8),
}


def model_flops_per_token(d_model: int, num_layers: int, seq_len: int, vocab_size: int, **_) -> float:
    """Training FLOPs per token: 6 * (12 * L * d^2 + d * V) + 12 * L * T * d."""
    matmul_params = 12 * num_layers * d_model**2 + d_model * vocab_size
    return 6 * matmul_params + 12 * num_layers * seq_len * d_model


def load_nanogpt(path: str):
    """nanoGPT's model module, imported from a checkout directory or its model.py."""
    file = Path(path)
    file = file / "model.py" if file.is_dir() else file
    if not file.is_file():
        raise SystemExit(f"compare_nanogpt: error: no nanoGPT model.py at {file}; pass --nanogpt with a checkout "
                         "of https://github.com/karpathy/nanoGPT (git clone it anywhere outside this repository)")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("compare_nanogpt: error: PyTorch is not installed; install the CPU build with "
                         "`pip install torch --index-url https://download.pytorch.org/whl/cpu`") from None
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NanoGPTCase:
    """nanoGPT's GPT (bias=False, dropout 0) with its configure_optimizers AdamW, float32 eager (bfloat16: its
    forward under autocast, float32 weights and optimizer)."""

    def __init__(self, nanogpt, size: dict, seed: int = 0, dtype: str = "float32"):
        import contextlib
        import io

        import torch

        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" \
            else contextlib.nullcontext

        torch.manual_seed(seed)
        config = nanogpt.GPTConfig(block_size=size["seq_len"], vocab_size=size["vocab_size"],
                                   n_layer=size["num_layers"], n_head=size["num_heads"], n_embd=size["d_model"],
                                   dropout=0.0, bias=False)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints parameter counts
            self.model = nanogpt.GPT(config)
            self.optimizer = self.model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), "cpu")
        generator = torch.Generator().manual_seed(seed)
        shape = (size["batch_size"], size["seq_len"])
        self.tokens = torch.randint(0, size["vocab_size"], shape, generator=generator)
        self.targets = torch.randint(0, size["vocab_size"], shape, generator=generator)
        self.tokens_per_step = size["batch_size"] * size["seq_len"]
        self.losses: list[float] = []

    def run_once(self) -> float:
        began = time.perf_counter()
        with self.autocast():
            _, loss = self.model(self.tokens, self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        return time.perf_counter() - began


def jaxllm_case(size: dict, overrides: list[str]):
    """jaxllm's train step as `jaxllm train` builds it, at this size (default config + overrides)."""
    from jaxllm.bench.cases import TrainCase
    from jaxllm.config import load_config
    from jaxllm import sharding as sharding_lib

    config = load_config(None, [
        f"model.d_model={size['d_model']}", f"model.num_layers={size['num_layers']}",
        f"model.num_heads={size['num_heads']}", f"model.num_kv_heads={size['num_heads']}",
        f"model.vocab_size={size['vocab_size']}", f"model.max_seq_len={size['seq_len']}",
        f"data.seq_len={size['seq_len']}", f"train.batch_size={size['batch_size']}", "train.steps=1000",
        "train.progress=false", *overrides])
    return TrainCase("jaxllm", config, sharding_lib.make_mesh(config.mesh))


class Ceilings:
    """2048^3 matmuls through JAX (float32: the ceiling jaxllm's bench uses) and through PyTorch; bfloat16:
    bf16 operands, float32 results in JAX (what jaxllm's bf16 matmuls ask for), bf16 tensors in PyTorch."""

    def __init__(self, repeats: int = 3, dtype: str = "float32"):
        import jax
        import jax.numpy as jnp
        import torch

        self.n, self.repeats = 2048, repeats
        self.a = jax.random.normal(jax.random.key(0), (self.n, self.n), jnp.dtype(dtype))
        self.jax_matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
        self.jax_matmul(self.a).block_until_ready()
        self.ta = torch.randn(self.n, self.n, dtype=getattr(torch, dtype))
        torch.mm(self.ta, self.ta)

    def measure(self) -> tuple[float, float]:
        import torch

        flops = 2 * self.n**3
        jax_times, torch_times = [], []
        for _ in range(self.repeats):
            began = time.perf_counter()
            self.jax_matmul(self.a).block_until_ready()
            jax_times.append(time.perf_counter() - began)
            began = time.perf_counter()
            torch.mm(self.ta, self.ta)
            torch_times.append(time.perf_counter() - began)
        return flops / min(jax_times) / 1e12, flops / min(torch_times) / 1e12


def compare(args, log) -> dict:
    import jax
    import jaxlib
    import torch

    from jaxllm import cpu_levers

    nanogpt = load_nanogpt(args.nanogpt)
    ceilings = Ceilings(dtype=args.dtype)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"compare_nanogpt: error: unknown size {unknown}; choose from {', '.join(SIZES)}")
    cases = {}
    for name in sizes:
        log(f"building {name}: nanoGPT and jaxllm (compiling) ...")
        overrides = [f"model.dtype={args.dtype}", *args.jaxllm_overrides]
        jax_case = jaxllm_case(SIZES[name], overrides)
        cases[name] = (NanoGPTCase(nanogpt, SIZES[name], dtype=args.dtype), jax_case)
        for case in cases[name]:
            for _ in range(args.warmup):
                case.run_once()
    rounds: dict[str, list[dict]] = {name: [] for name in sizes}
    for index in range(args.rounds):
        for name in sizes:
            torch_case, jax_case = cases[name]
            before = ceilings.measure()
            torch_times = [torch_case.run_once() for _ in range(args.steps)]
            jax_times = [jax_case.run_once() for _ in range(args.steps)]
            after = ceilings.measure()
            jax_ceiling, torch_ceiling = (max(before[0], after[0]), max(before[1], after[1]))
            flops = model_flops_per_token(**SIZES[name])
            torch_tps = torch_case.tokens_per_step / statistics.median(torch_times)
            jax_tps = jax_case.tokens_per_step / statistics.median(jax_times)
            rounds[name].append({
                "nanogpt_tokens_per_second": torch_tps, "jaxllm_tokens_per_second": jax_tps,
                "jax_matmul_ceiling_tflops": jax_ceiling, "torch_matmul_ceiling_tflops": torch_ceiling,
                "nanogpt_fraction_of_jax_ceiling": torch_tps * flops / 1e12 / jax_ceiling,
                "nanogpt_fraction_of_torch_ceiling": torch_tps * flops / 1e12 / torch_ceiling,
                "jaxllm_fraction_of_jax_ceiling": jax_tps * flops / 1e12 / jax_ceiling,
                "jaxllm_over_nanogpt": jax_tps / torch_tps})
            log(f"  round {index + 1}/{args.rounds} {name}: nanoGPT {torch_tps:,.0f} tok/s, jaxllm {jax_tps:,.0f} "
                f"tok/s ({jax_tps / torch_tps:.2f}x); ceiling jax {jax_ceiling * 1e3:.0f} / torch "
                f"{torch_ceiling * 1e3:.0f} GFLOP/s")
    cpu = cpu_levers.cpu_info()
    results = {}
    for name in sizes:
        r = rounds[name]
        median = lambda key: statistics.median(x[key] for x in r)  # noqa: E731
        results[name] = {"size": SIZES[name], "model_flops_per_token": model_flops_per_token(**SIZES[name]),
                         **{key: median(key) for key in r[0]}, "rounds": r,
                         "jaxllm_compile_seconds": cases[name][1].compile_seconds,
                         "loss_first_last": {"nanogpt": [cases[name][0].losses[0], cases[name][0].losses[-1]],
                                             "jaxllm": [cases[name][1].losses[0], cases[name][1].losses[-1]]}}
    try:
        commit = subprocess.run(["git", "-C", str(Path(args.nanogpt).resolve()), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu_model": cpu["model"], "hardware_isa": cpu["isa"],
            "isa": cpu_levers.effective_isa(cpu["isa"], os.environ.get("XLA_FLAGS", "")),
            "cpu_count": os.cpu_count(), "load_average_end": list(os.getloadavg()),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "python": platform.python_version(), "nanogpt_commit": commit,
            "dtype": args.dtype, "jaxllm_overrides": args.jaxllm_overrides, "cli_env": not args.no_cli_env,
            "env": {k: os.environ[k] for k in ("XLA_FLAGS", "MALLOC_ARENA_MAX", "LD_PRELOAD") if k in os.environ},
            "rounds": args.rounds, "steps_per_round": args.steps, "sizes": results}


def _apply_cli_env(argv: list[str]) -> None:
    """The process levers `jaxllm` applies on this CPU; malloc settings need a re-exec, done once."""
    from jaxllm import cli

    cli._add_cpu_xla_flag(os.environ)
    if "malloc" in cli._cpu_levers(os.environ) and not os.environ.get("JAXLLM_NO_REEXEC"):
        env = {**os.environ, **cli._CPU_MALLOC_ENV, "JAXLLM_NO_REEXEC": "1"}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (or its model.py)")
    parser.add_argument("--sizes", default="S,M", help="comma-separated: S, M (default both)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework per round (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per framework before timing")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: mixed precision on both sides (nanoGPT under autocast, jaxllm model.dtype)")
    parser.add_argument("--jaxllm-overrides", nargs="*", default=[], help="config overrides for jaxllm's step")
    parser.add_argument("--no-cli-env", action="store_true", help="do not apply the CLI's process levers")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        print("compare_nanogpt: error: --rounds and --steps must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if not args.no_cli_env:
        _apply_cli_env(argv)
    result = compare(args, log=lambda text: print(text, file=sys.stderr, flush=True))
    print(f"{result['cpu_model']} ({result['isa']}, {result['cpu_count']} cores, {result['dtype']}), "
          f"torch {result['torch']} ({result['torch_threads']} threads), jax {result['jax']}, "
          f"load average {result['load_average_end']}")
    for name, r in result["sizes"].items():
        print(f"{name}: nanoGPT {r['nanogpt_tokens_per_second']:,.0f} tok/s "
              f"({100 * r['nanogpt_fraction_of_torch_ceiling']:.0f}% of its own ceiling), jaxllm "
              f"{r['jaxllm_tokens_per_second']:,.0f} tok/s ({100 * r['jaxllm_fraction_of_jax_ceiling']:.0f}% of "
              f"the JAX ceiling); jaxllm/nanoGPT {r['jaxllm_over_nanogpt']:.2f}x (median of per-round ratios)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
