"""What the accelerators can do: datasheet peaks per chip, for MFU in the train log and `jaxllm bench`."""

from __future__ import annotations

import re

# Datasheet dense peaks per chip (TFLOP/s) and memory bandwidth (TB/s). float32 on GPU is the TF32
# tensor-core rate (JAX's default matmul precision uses it); TPU float32 matmuls run as bfloat16 passes.
PEAKS: list[tuple[str, dict[str, float], float]] = [
    (r"H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}, 4.8),
    (r"H100.*PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}, 2.0),
    (r"H100.*NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 418.0}, 3.9),
    (r"H100|GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}, 3.35),
    (r"A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}, 2.0),
    (r"TPU v4", {"bfloat16": 275.0, "float32": 275.0}, 1.2),
    (r"TPU v5 ?lite|TPU v5e", {"bfloat16": 197.0, "float32": 197.0}, 0.82),
    (r"TPU v5p|TPU v5", {"bfloat16": 459.0, "float32": 459.0}, 2.76),
    (r"TPU v6 ?lite|TPU v6e|Trillium", {"bfloat16": 918.0, "float32": 918.0}, 1.64),
]


def device_peak(device_kind: str, dtype: str) -> tuple[float | None, float | None]:
    """(peak TFLOP/s, memory TB/s) of one chip from the table, or (None, None) when unknown."""
    for pattern, peaks, bandwidth in PEAKS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return peaks.get(dtype, peaks["bfloat16"]), bandwidth
    return None, None


def mfu(tokens_per_second: float, flops_per_token: float, device_kind: str, dtype: str,
        num_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' datasheet peak; None where the peak is
    unknown (CPUs: `jaxllm bench` measures a matmul ceiling instead)."""
    peak, _ = device_peak(device_kind, dtype)
    if peak is None or tokens_per_second <= 0:
        return None
    return tokens_per_second * flops_per_token / (peak * 1e12 * num_devices)
