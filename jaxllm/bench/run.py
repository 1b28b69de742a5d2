"""`jaxllm bench`'s library side: settings -> the cases (variants), run interleaved -> records."""

from __future__ import annotations

import jax

from jaxllm import sharding as sharding_lib
from jaxllm.bench.cases import BenchError, BenchSettings, GenerateCase, MatmulProbe, TrainCase, bench_config
from jaxllm.bench.profile import summarize_trace
from jaxllm.bench.report import bench_environment, run_interleaved, summarize_case


def parse_variant(text: str) -> tuple[str, list[str], bool]:
    """'name:key=value key=value' -> (name, overrides, donate); 'donate=false' is the bench's own switch."""
    name, _, rest = text.partition(":")
    if not name or "=" in name:
        raise BenchError(f"--variant '{text}' must look like NAME:key=value [key=value ...]")
    overrides, donate = [], True
    for item in rest.replace(",", " ").split():
        if item.split("=")[0] == "donate":
            donate = item.split("=", 1)[1].lower() in ("1", "true", "yes")
        else:
            overrides.append(item)
    return name, overrides, donate


def run_bench(settings: BenchSettings, log=print) -> list[dict]:
    """Compiles and times every variant interleaved; one record (JSON-ready) per variant."""
    kind = settings.stage  # a stage's train step, or "generate"
    if settings.steps < 1 or settings.warmup < 0 or settings.batch_size < 1:
        raise BenchError("--steps and --batch-size must be at least 1 and --warmup at least 0")
    variants = [parse_variant(v) for v in settings.variants] or [("default", [], settings.donate)]
    configs = [(name, bench_config(settings, list(settings.overrides) + extra), donate, extra) for name, extra, donate in variants]
    sharding_lib.maybe_initialize_distributed(configs[0][1].mesh)
    mesh = sharding_lib.make_mesh(configs[0][1].mesh)
    parallel = sharding_lib.data_parallel_size(mesh)
    if settings.batch_size % parallel:
        raise BenchError(f"--batch-size {settings.batch_size} must be divisible by the data-parallel size "
                         f"(mesh data x fsdp = {parallel}); change the batch or the mesh")
    cases = []
    for name, config, donate, extra in configs:
        log(f"compiling {name} ...")
        if kind == "generate":
            case = GenerateCase(name, config, mesh, settings.prompt_len, settings.new_tokens)
        else:
            case = TrainCase(name, config, mesh, donate=donate and settings.donate)
        case.overrides = list(settings.overrides) + extra
        log(f"  compiled in {case.compile_seconds:.1f}s")
        cases.append(case)
    platform = mesh.devices.flat[0].platform
    probe = MatmulProbe(platform, tuple(case.config.model.dtype for case in cases)) if settings.ceiling else None
    ceilings = run_interleaved(cases, settings.warmup, settings.steps, probe, log=log)
    environment = bench_environment()
    cpu_ceilings = probe.cpu_samples if probe is not None else []
    records = [summarize_case(case, ceilings, settings.peak_tflops, environment, case.overrides, cpu_ceilings,
                              probe.dtype if probe is not None else "float32")
               for case in cases]
    if settings.profile:  # a few more steps under the profiler, apart from the timed ones
        jax.profiler.start_trace(settings.profile, create_perfetto_trace=True)
        try:
            for case in cases:
                for _ in range(2):
                    case.run_once()
        finally:
            jax.profiler.stop_trace()
        records[0]["profile"] = summarize_trace(settings.profile)
    return records
