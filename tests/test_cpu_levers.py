"""CPU ISA detection, the per-ISA lever table the CLI reads, and the lever study's worker protocol."""

import os
import sys

import jax
import pytest

from jaxllm import cli, cpu_levers
from jaxllm.bench import levers as bench_levers
from jaxllm.bench.cases import BenchSettings
from jaxllm.errors import UsageError

AVX2_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 fma avx avx2 bmi2"
CPUINFO = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("flags,isa", [
    (AVX2_FLAGS, "AVX2"),
    (AVX2_FLAGS + " avx512f avx512bw avx512vl", "AVX-512"),
    (AVX2_FLAGS + " avx512f avx512bw amx_tile amx_bf16", "AMX"),
    ("fpu sse sse2 avx", "SSE"),  # AVX without AVX2/FMA: no ISA the table knows
])
def test_isa_is_the_widest_vector_extension_in_the_cpuinfo_flags(tmp_path, flags, isa):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(flags=flags))
    assert cpu_levers.cpu_info(path) == {"model": "Test CPU 9000", "isa": isa}


def test_unreadable_or_flagless_cpuinfo_is_unknown(tmp_path):
    assert cpu_levers.cpu_info(tmp_path / "missing")["isa"] == "unknown"
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_levers.cpu_info(tmp_path / "arm")["isa"] == "unknown"


def test_xla_max_isa_emulates_a_smaller_cpu_but_never_a_bigger_one():
    assert cpu_levers.effective_isa("AVX-512", "--xla_force_host_platform_device_count=8") == "AVX-512"
    assert cpu_levers.effective_isa("AVX-512", "--foo --xla_cpu_max_isa=AVX2") == "AVX2"
    assert cpu_levers.effective_isa("AMX", "--xla_cpu_max_isa=AVX512") == "AVX-512"
    assert cpu_levers.effective_isa("AVX2", "--xla_cpu_max_isa=AVX512_BF16") == "AVX2"
    assert cpu_levers.effective_isa("unknown", "--xla_cpu_max_isa=AVX2") == "unknown"


def test_a_lever_is_applied_only_on_an_isa_where_it_measured_a_gain():
    gains = {"AVX-512": {"malloc": 0.20, "ynn_dot": 0.01}, "AVX2": {"malloc": 0.10, "ynn_dot": -0.04}}
    assert cpu_levers.levers_for("AVX-512", gains) == ["malloc"]  # +1% is within the noise
    assert cpu_levers.levers_for("AVX2", gains) == ["malloc"]  # a measured loss is never applied
    assert cpu_levers.levers_for("AMX", gains) == []  # never measured there: nothing applied
    for isa, measured in cpu_levers.LEVER_GAINS.items():  # the shipped table only names known levers
        assert isa in cpu_levers.ISA_ORDER and set(measured) <= {"malloc", "ynn_dot"}


def test_cli_takes_its_process_levers_from_the_table_for_this_cpu(monkeypatch):
    monkeypatch.setattr(cpu_levers, "LEVER_GAINS", {"AVX2": {"malloc": 0.2, "ynn_dot": -0.1}})
    monkeypatch.setattr(cpu_levers, "cpu_info", lambda path="/proc/cpuinfo": {"model": "x", "isa": "AVX2"})
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert cli._cpu_levers(env) == ["malloc"]
    cli._add_cpu_xla_flag(env)
    assert "ynn_fusion_type" not in env["XLA_FLAGS"]  # measured as a loss on AVX2: not added
    assert cli._cpu_levers({"JAXLLM_CPU_LEVERS": "ynn_dot"}) == ["ynn_dot"]
    assert cli._cpu_levers({"JAXLLM_CPU_LEVERS": "none"}) == []
    monkeypatch.setattr(cpu_levers, "cpu_info", lambda path="/proc/cpuinfo": {"model": "x", "isa": "AMX"})
    execs = []
    monkeypatch.setattr(os, "execve", lambda *a: execs.append(a))
    for key in cpu_levers.MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("JAXLLM_NO_REEXEC", raising=False)
    monkeypatch.delenv("JAXLLM_CPU_LEVERS", raising=False)
    cli._maybe_reexec_with_fast_malloc(["train"])
    assert execs == []  # no measurement on AMX: the process is left as it is
    monkeypatch.setattr(cpu_levers, "cpu_info", lambda path="/proc/cpuinfo": {"model": "x", "isa": "AVX2"})
    cli._maybe_reexec_with_fast_malloc(["train"])
    assert len(execs) == 1 and execs[0][2]["MALLOC_ARENA_MAX"] == "1"


def test_lever_gain_is_the_median_same_round_speedup():
    assert bench_levers.lever_gain([1.0, 2.0, 1.0], [1.2, 2.0, 1.5]) == pytest.approx(0.2)  # seconds with, without


def test_rounds_rotate_which_variant_runs_first():
    assert [bench_levers.rotated("abc", r)[0] for r in range(4)] == ["a", "b", "c", "a"]
    assert sorted(bench_levers.rotated("abc", 5)) == ["a", "b", "c"] and bench_levers.rotated([], 3) == []


def test_each_process_lever_switches_only_its_own_settings():
    reference = bench_levers.reference_env({"XLA_FLAGS": "--a"}, "0.10.1")
    assert reference["XLA_FLAGS"] == "--a " + cpu_levers.YNN_DOT_FLAG and reference["MALLOC_ARENA_MAX"] == "1"
    levers = {lever.name: lever for lever in bench_levers.process_levers(reference, "/lib/libtcmalloc.so")}
    assert levers["malloc"].env["MALLOC_ARENA_MAX"] is None
    assert levers["malloc"].env["XLA_FLAGS"] == reference["XLA_FLAGS"]
    assert levers["ynn_dot"].env["XLA_FLAGS"] == "--a" and levers["ynn_dot"].env["MALLOC_ARENA_MAX"] == "1"
    assert levers["tcmalloc"].env["LD_PRELOAD"] == "/lib/libtcmalloc.so" and not levers["tcmalloc"].on_in_reference
    assert "host_devices" not in levers  # opt-in: only measured when asked for (cores that split the batch)
    split = {lever.name: lever for lever in bench_levers.process_levers(reference, None, host_devices=2)}
    assert split["host_devices"].env["XLA_FLAGS"] == reference["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"
    assert not split["host_devices"].on_in_reference and split["host_devices"].env["MALLOC_ARENA_MAX"] == "1"
    assert bench_levers.host_devices_flags("--a --xla_force_host_platform_device_count=8", 2) == \
        "--a --xla_force_host_platform_device_count=2"
    # A jaxlib without the YNN flag: the flag is neither set nor measured.
    assert "ynn_dot" not in {lever.name for lever in bench_levers.process_levers(
        bench_levers.reference_env({}, "0.9.0"), None)}


def test_a_lever_process_compiles_once_and_answers_one_interleaved_round_per_request():
    settings = BenchSettings(preset="micro", batch_size=2, seq_len=16, warmup=1)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]  # one CPU device
    env = {"XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu",  # and the tests' persistent compile cache
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    process = bench_levers._Process("test", env, settings, [("reference", [], True), ("xla", ["model.attention=xla"],
                                                                                    False)])
    try:
        assert process.ready["ready"] and len(process.ready["compile_seconds"]) == 2
        first, second = process.round(), process.round()
    finally:
        process.close()
    assert process.process.returncode == 0
    for result in (first, second):
        assert len(result["times"]) == 2 and min(result["times"]) > 0 and result["ceiling_tflops"] > 0
        assert result["tokens_per_step"] == [2 * 16, 2 * 16] and min(result["fractions"]) > 0


def test_the_study_measures_only_the_levers_asked_for():
    reference = bench_levers.reference_env({}, "0.10.2")
    process = bench_levers.process_levers(reference, None)
    config, others = bench_levers.select_levers(bench_levers.CONFIG_LEVERS, process, ("malloc", "attention"))
    assert [lever.name for lever in config] == ["attention"] and [lever.name for lever in others] == ["malloc"]
    config, others = bench_levers.select_levers(bench_levers.CONFIG_LEVERS, process, ())
    assert len(config) == len(bench_levers.CONFIG_LEVERS) and len(others) == len(process)
    with pytest.raises(UsageError, match="--lever malloc_typo: not a lever .*choose from attention, .*malloc"):
        bench_levers.select_levers(bench_levers.CONFIG_LEVERS, process, ("malloc_typo",))


def test_a_lever_process_that_dies_mid_study_is_named_with_the_signal_that_killed_it():
    # A stand-in worker: answers "ready", then is killed (as the out-of-memory killer would) on its first round.
    worker = ("import json, os, signal, sys; print('LEVERS ' + json.dumps({'ready': True}), flush=True); "
              "sys.stdin.readline(); os.kill(os.getpid(), signal.SIGKILL)")
    settings = BenchSettings(preset="micro", batch_size=2, seq_len=16)
    process = bench_levers._Process("malloc", {}, settings, [], command=[sys.executable, "-c", worker])
    assert process.ready == {"ready": True}
    with pytest.raises(RuntimeError, match="'malloc' was killed by SIGKILL .*out-of-memory.*--lever NAME"):
        process.round()
    process.close()
    with pytest.raises(RuntimeError, match="'exits' exited \\(code 3\\) before answering"):
        bench_levers._Process("exits", {}, settings, [], command=[sys.executable, "-c", "raise SystemExit(3)"])


def test_the_reference_is_the_process_the_cli_runs_and_each_lever_is_switched_from_it():
    # AVX-512 / AMX today: the CLI applies the malloc settings, not the YNN flag.
    reference = bench_levers.reference_env({"XLA_FLAGS": "--a"}, "0.10.2", applied=("malloc",))
    assert reference["XLA_FLAGS"] == "--a" and reference["MALLOC_ARENA_MAX"] == "1"
    levers = {lever.name: lever for lever in bench_levers.process_levers(reference, None, ynn_known=True)}
    assert levers["malloc"].on_in_reference and levers["malloc"].env["MALLOC_ARENA_MAX"] is None
    assert not levers["ynn_dot"].on_in_reference  # measured by turning it on
    assert levers["ynn_dot"].env["XLA_FLAGS"] == "--a " + cpu_levers.YNN_DOT_FLAG
    assert levers["ynn_dot"].env["MALLOC_ARENA_MAX"] == "1"
    assert "none" not in levers  # one lever on: turning "all" off is the malloc lever itself
    # An ISA the table does not know: nothing applied, every process lever measured by turning it on.
    bare = bench_levers.reference_env({}, "0.10.2", applied=())
    assert bare["XLA_FLAGS"] is None and bare["MALLOC_ARENA_MAX"] is None
    levers = {lever.name: lever for lever in bench_levers.process_levers(bare, None, ynn_known=True)}
    assert not levers["malloc"].on_in_reference and levers["malloc"].env["MALLOC_MMAP_MAX_"] == "0"
    assert not levers["ynn_dot"].on_in_reference and "none" not in levers
