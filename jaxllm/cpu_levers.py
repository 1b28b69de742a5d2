"""The CPU's instruction set, and the process-level speed levers the CLI applies on it.

Kept free of JAX imports: the CLI reads it before JAX starts (environment variables only take effect
in a fresh process). `jaxllm bench --levers` measures every lever on the machine it runs on; the
table below records those measurements, and the CLI applies a lever only on an ISA where it measured
a gain (an ISA that is not in the table gets no process lever).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Most capable first. "AMX" machines (Sapphire Rapids and later) also have AVX-512.
ISA_ORDER = ("AMX", "AVX-512", "AVX2", "SSE")

# glibc malloc without mmap churn: one arena, no mmap for big blocks, no trimming (RSS stays at its peak).
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "268435456",
}
# XLA CPU: YNNPACK for the matmuls only (its reduce fusions were slow). Unknown XLA flags abort the
# process, so it is only set for jaxlib versions known to have it.
YNN_DOT_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"
YNN_DOT_FLAG_JAXLIB = ("0.10.",)


def ynn_flag_known(jaxlib_version: str) -> bool:
    """Whether this jaxlib version knows `YNN_DOT_FLAG` (an unknown XLA flag aborts the process)."""
    return jaxlib_version.startswith(YNN_DOT_FLAG_JAXLIB)

# Measured gain of the train step with each lever (step time without it / with it - 1), per ISA, and
# where it comes from. `jaxllm bench --levers` prints the entry its run supports.
#   AVX-512 (AMD EPYC Zen 4, 2 cores, jaxlib 0.10.2), `--levers` on the idle machine, ninth session (the
#     model's 2-D matmuls since the seventh): size S (d256 L4 seq256 b8 V4096), 16 rounds: malloc +15.6%
#     (without it 81.8k minor page faults per step, with it 0), YNN dots -0.2%, both +18.9%; size M (d512 L8
#     seq512 b8 V8192), 5 rounds: malloc +25.1%, YNN dots -2.4%, both +26.3%. The main job without the YNN
#     flag: 252 s instead of 265-285 s (three runs with it), compiling 23.7 s instead of 28.1-28.5 s.
#     Before (fourth session, loaded machine, older model code): malloc +18.1%, YNN dots +11.6%.
#   AVX2: the same machine and run with XLA capped by --xla_cpu_max_isa=AVX2 (emulation: XLA's own
#     code only; the matmul libraries still dispatch on AVX-512): malloc +12.2%, YNN dots +23.5%, both
#     +16.0%. On a real AVX2-only EPYC (issue 21, idle) the two together: +29% at S, +21% at d512 L8.
#   AMX (Intel Xeon with AMX and AVX-512, 2 cores, jaxlib 0.10.2), `--levers` on the idle machine, thirteenth
#     session, the reference being the CLI's process (malloc on, YNN flag off): size S, 10 rounds: malloc +12.3%
#     (84.5k minor page faults per step without it, 2 with it), YNN dots -2.9%; size M, 5 rounds (`--lever malloc
#     --lever ynn_dot --lever bf16`: all the levers at once do not fit 24 GiB at M): malloc +64.2% (754k faults
#     per step without it), YNN dots -11.3%. With both on in the reference (the earlier study): S malloc +68.2%,
#     YNN dots -8.0%; M +46.5%, -11.1%. Before this entry the CLI applied nothing on AMX.
#   The AVX-512 and AVX2 entries were measured with every process lever on in the reference.
LEVER_GAINS: dict[str, dict[str, float]] = {
    "AMX": {"malloc": 0.123, "ynn_dot": -0.029},
    "AVX-512": {"malloc": 0.156, "ynn_dot": -0.002},
    "AVX2": {"malloc": 0.122, "ynn_dot": 0.235},
}
MIN_GAIN = 0.02  # below this a lever's effect is within the run-to-run noise of these measurements


def isa_from_flags(flags: set[str]) -> str:
    """The widest vector ISA in a set of /proc/cpuinfo flags: 'AMX', 'AVX-512', 'AVX2' or 'SSE'."""
    if "amx_tile" in flags and "avx512f" in flags:
        return "AMX"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags and "fma" in flags:
        return "AVX2"
    return "SSE"


def available_cpus() -> int:
    """The CPUs this process may be scheduled on (its affinity: `taskset`, a container's cpuset), which XLA
    CPU sizes its loop partitions by; all CPUs where affinity is unknown (not Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_info(cpuinfo_path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """{'model': CPU model name, 'isa': hardware ISA}; ISA 'unknown' where /proc/cpuinfo is unreadable
    (not Linux) or lists no flags (e.g. ARM)."""
    try:
        text = Path(cpuinfo_path).read_text()
    except OSError:
        return {"model": "", "isa": "unknown"}
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    return {"model": model.group(1).strip() if model else "",
            "isa": isa_from_flags(set(flags.group(1).split())) if flags else "unknown"}


def xla_max_isa(xla_flags: str) -> str | None:
    """The ISA that `--xla_cpu_max_isa=...` in XLA_FLAGS caps XLA's code generation at, or None."""
    match = re.search(r"--xla_cpu_max_isa=(\S+)", xla_flags or "")
    if not match:
        return None
    value = match.group(1).upper().replace("_", "")
    if value.startswith("AMX"):
        return "AMX"
    if value.startswith("AVX512"):
        return "AVX-512"
    if value.startswith("AVX"):  # AVX2 (plain AVX is below AVX2: treated as SSE-class here)
        return "AVX2" if value.startswith("AVX2") else "SSE"
    return "SSE"


def effective_isa(hardware_isa: str, xla_flags: str) -> str:
    """The hardware ISA, lowered to the XLA cap when XLA_FLAGS emulates a smaller CPU."""
    cap = xla_max_isa(xla_flags)
    if hardware_isa not in ISA_ORDER or cap is None:
        return hardware_isa
    return max(hardware_isa, cap, key=ISA_ORDER.index)


def levers_for(isa: str, gains: dict[str, dict[str, float]] | None = None) -> list[str]:
    """The process levers ('malloc', 'ynn_dot') measured as a gain on this ISA."""
    measured = (LEVER_GAINS if gains is None else gains).get(isa, {})
    return sorted(name for name, gain in measured.items() if gain > MIN_GAIN)
