"""Profiles: a device-time breakdown of a jax.profiler trace (`jaxllm bench --profile`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_KERNEL_CLASSES = [
    ("attention", r"fmha|flash|sdpa|cudnn|attention|splash"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|sm90_|sm80_|dot|convolution|matmul|wgmma|ynn|onednn|xnn"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all_reduce|all_gather|collective"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("fusion/elementwise", r"fusion|loop_|input_|reduce|scatter|gather|select|convert|add|multiply"),
]


def summarize_trace(trace_dir: str | Path, top: int = 12) -> dict[str, Any]:
    """Device time by kernel class and the top kernels, from the perfetto trace that
    `jax.profiler.start_trace(..., create_perfetto_trace=True)` writes under `trace_dir`."""
    import gzip

    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        return {}
    with gzip.open(files[-1], "rt") as handle:
        trace = json.load(handle)
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    process_names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process_names.items() if re.search(r"/device:(GPU|TPU)", name)}
    by_class: dict[str, float] = {}
    by_kernel: dict[str, float] = {}
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        if device_pids and event.get("pid") not in device_pids:
            continue
        name = str(event.get("name", ""))
        if not device_pids and (name.startswith(("$", "Thunk", "Pjit", "while", "conditional", "call"))
                                or "::" in name):
            continue  # host trace (CPU): keep the XLA ops, not Python frames or containers of other ops
        duration = float(event["dur"]) / 1e6
        kind = next((k for k, pattern in _KERNEL_CLASSES if re.search(pattern, name, re.IGNORECASE)), "other")
        by_class[kind] = by_class.get(kind, 0.0) + duration
        by_kernel[name] = by_kernel.get(name, 0.0) + duration
    total = sum(by_class.values()) or 1.0
    return {
        "trace_file": str(files[-1]),
        "device_events_only": bool(device_pids),
        "seconds_by_class": {k: round(v, 6) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "share_by_class": {k: round(v / total, 4) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top_kernels": [(k[:120], round(v, 6)) for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]],
    }


def format_profile(summary: dict[str, Any]) -> str:
    if not summary:
        return "profile: no trace found"
    lines = [f"profile ({'device kernels' if summary['device_events_only'] else 'all events'}, "
             f"{summary['trace_file']}):"]
    for kind, seconds in summary["seconds_by_class"].items():
        lines.append(f"  {kind:<20} {seconds:9.4f}s  {100 * summary['share_by_class'][kind]:5.1f}%")
    lines.append("  top kernels:")
    lines += [f"    {seconds:9.4f}s  {name}" for name, seconds in summary["top_kernels"]]
    return "\n".join(lines)
