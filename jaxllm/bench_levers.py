"""`jaxllm bench --levers`: the CPU speed levers, measured A/B, as one table.

Config levers (attention implementation, fused loss, donation, scanned layers) run as variants of
one process, interleaved step by step, so machine noise hits them alike. Process levers (the glibc
malloc settings, tcmalloc, XLA flags) need a fresh process each: those run the baseline and the
best config in their own process, and every number is also given as a fraction of the float32
matmul ceiling measured in the same process, which cancels most of the load difference between runs.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BASELINE = "model.attention=xla model.loss_chunk_size=0 donate=false"
BEST = "model.attention=blockwise model.loss_chunk_size=128 model.scan_layers=false"

CONFIG_LEVERS = [
    ("baseline: XLA attention, unfused loss, scanned layers, no donation", BASELINE),
    ("+ donation of the train state", "model.attention=xla model.loss_chunk_size=0"),
    ("+ block-causal attention", "model.attention=blockwise model.loss_chunk_size=0"),
    ("+ fused chunked lm head + loss", "model.attention=blockwise model.loss_chunk_size=128"),
    ("+ unrolled layers (scan_layers=false): best", BEST),
]
# Also measurable with --variant, left out to keep the study short: model.remat=full (a memory lever,
# about -13% speed), model.attention_block_size and model.loss_chunk_size (no measurable effect at 25m).

MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def find_tcmalloc() -> str | None:
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so*",
                    "/usr/lib64/libtcmalloc*.so*", "/usr/lib/libtcmalloc*.so*", "/opt/homebrew/lib/libtcmalloc*"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _process_levers() -> list[tuple[str, dict[str, str | None]]]:
    """(name, environment changes; None removes the variable). The first is the jaxllm CLI default,
    the process the config levers run in."""
    from jaxllm.cli import _CPU_MALLOC_ENV, _CPU_XLA_FLAG

    other_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                           if "ynn_fusion_type" not in f)
    with_flag = (other_flags + " " + _CPU_XLA_FLAG).strip()
    plain_malloc = {key: None for key in MALLOC_ENV}
    levers: list[tuple[str, dict[str, str | None]]] = [
        ("jaxllm CLI default: no-mmap malloc + YNN for dots only",
         {**_CPU_MALLOC_ENV, "XLA_FLAGS": with_flag, "LD_PRELOAD": None}),
        ("plain process: glibc malloc defaults, default XLA flags",
         {**plain_malloc, "XLA_FLAGS": other_flags or None, "LD_PRELOAD": None}),
        ("no-mmap malloc only", {**_CPU_MALLOC_ENV, "XLA_FLAGS": other_flags or None, "LD_PRELOAD": None}),
        ("YNN for dots only (XLA flag) only", {**plain_malloc, "XLA_FLAGS": with_flag, "LD_PRELOAD": None}),
    ]
    tcmalloc = find_tcmalloc()
    if tcmalloc:
        levers.append(("tcmalloc (LD_PRELOAD) + YNN for dots only",
                       {**plain_malloc, "XLA_FLAGS": with_flag, "LD_PRELOAD": tcmalloc}))
    return levers


def _bench_args(args, variants: list[tuple[str, str]], out: Path) -> list[str]:
    command = [sys.executable, "-m", "jaxllm.bench", "--preset", args.preset, "--stage", "pretrain",
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--json", str(out), "--no-history", "--quiet"]
    if args.seq_len:
        command += ["--seq-len", str(args.seq_len)]
    if args.mesh:
        command += ["--mesh", args.mesh]
    for index, (_, overrides) in enumerate(variants):  # long lever names stay here; variants get short ones
        command += ["--variant", f"lever{index}:{overrides}"]
    return command + list(args.overrides)


def _run(args, variants, env_changes: dict[str, str | None], workdir: Path, tag: str) -> list[dict]:
    env = dict(os.environ)
    env["JAXLLM_NO_REEXEC"] = "1"
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    out = workdir / f"{tag}.json"
    print(f"running {tag} ({len(variants)} variants) ...", file=sys.stderr, flush=True)
    completed = subprocess.run(_bench_args(args, variants, out), env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"the lever run '{tag}' failed (exit {completed.returncode})")
    return json.loads(out.read_text())["results"]


def format_lever_table(rows: list[tuple[str, str, dict]], baseline_fraction: float | None) -> str:
    header = ["lever", "process", "tokens/s", "% of f32 matmul ceiling", "% (CPU time)", "vs baseline"]
    lines = []
    for lever, process, record in rows:
        fraction = record["fraction_of_matmul_ceiling"]
        cpu_fraction = record.get("fraction_of_matmul_ceiling_cpu_time")
        relative = f"{fraction / baseline_fraction:.2f}x" if fraction and baseline_fraction else "-"
        lines.append([lever, process, f"{record['tokens_per_second']:,.0f}",
                      f"{100 * fraction:.1f}%" if fraction else "-",
                      f"{100 * cpu_fraction:.1f}%" if cpu_fraction else "-", relative])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def lever_study(args) -> int:
    """Runs every lever; prints a markdown table and writes all records to --json (if given)."""
    workdir = Path(tempfile.mkdtemp(prefix="jaxllm_levers_"))
    rows: list[tuple[str, str, dict]] = []
    (default_name, default_env), *others = _process_levers()
    config_records = _run(args, CONFIG_LEVERS, default_env, workdir, "config_levers")
    for (lever, _), record in zip(CONFIG_LEVERS, config_records):
        rows.append((lever, "CLI default", record))
    for index, (name, env_changes) in enumerate(others):
        records = _run(args, [("baseline", BASELINE), ("best", BEST)], env_changes, workdir, f"process_{index}")
        rows += [("baseline config", name, records[0]), ("best config", name, records[1])]
    baseline_fraction = config_records[0]["fraction_of_matmul_ceiling"]
    table = format_lever_table(rows, baseline_fraction)
    best = config_records[-1]
    summary = (f"{best['preset']}: batch {best['batch_size']} x seq {best['seq_len']}, {best['parameters'] / 1e6:.1f}M "
               f"params, {best['flops_per_token'] / 1e6:.0f}M model FLOPs/token; medians of {best['timed_steps']} "
               f"interleaved steps; each process measures its own float32 matmul ceiling "
               f"(this process: {best['matmul_ceiling_tflops'] * 1e3:.0f} GFLOP/s)")
    print(summary)
    print(table)
    if not find_tcmalloc():
        print("tcmalloc not found (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) - not measured")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "table": table,
                                               "rows": [{"lever": l, "process": p, **r} for l, p, r in rows]},
                                              indent=2))
    return 0
