"""Benchmark of the CLI's persistent compilation cache: wall seconds of a first and a second `jaxllm eval`,
`jaxllm generate` and `jaxllm train` call on the same checkpoint / shapes, with the cache off and on (each
mode with its own fresh cache directory). Not a test: timings depend on the machine and its load.

    python tools/bench_compile_cache.py --workdir /tmp/cache_bench [--preset tiny] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _run(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jaxllm.cli", *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"`jaxllm {' '.join(argv)}` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args()
    root = Path(args.workdir).absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAXLLM_COMP"))}
    fast = [f"model.preset={args.preset}", "train.progress=false", "train.eval_batches=1", "mesh.num_devices=1"]
    checkpoint = root / "sft"
    _run(["train", "sft_tiny", "--workdir", str(checkpoint), "train.steps=2", *fast],
         {**base_env, "JAXLLM_COMPILATION_CACHE": "off"})
    commands = {
        "eval": ["eval", "--checkpoint", str(checkpoint), "--task", "bio_mc", "--task", "heldout_text", "--limit", "32",
                 "--no-progress"],
        "generate": ["generate", "--checkpoint", str(checkpoint), "--chat", "--max-new-tokens", "16",
                     "--prompt", "Where was Lucia Wagner born?",
                     "--prompt", "Which university did Noor Nguyen study at?"],
        "train": ["train", "sft_tiny", "train.steps=2", *fast],
    }
    results: dict[str, dict[str, list[float]]] = {}
    for mode in ("off", "on"):
        env = {**base_env, "XDG_CACHE_HOME": str(root / f"cache_{mode}")}
        if mode == "off":
            env["JAXLLM_COMPILATION_CACHE"] = "off"
        for name, argv in commands.items():
            times = []
            for attempt in (1, 2):
                extra = ["--workdir", str(root / f"train_{mode}_{attempt}")] if name == "train" else []
                times.append(round(_run(argv + extra, env), 1))
            results.setdefault(name, {})[mode] = times
            print(f"{name:>8} cache {mode:>3}: first {times[0]:6.1f}s  second {times[1]:6.1f}s", flush=True)
    entries = list((root / "cache_on").rglob("*-cache"))
    summary = {"preset": args.preset, "seconds": results, "cache_entries": len(entries),
               "cache_mib": round(sum(p.stat().st_size for p in entries) / 2**20, 1), "cpus": os.cpu_count(),
               "load_average": os.getloadavg()}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
