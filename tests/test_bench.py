"""`jaxllm bench` runs tiny configurations and reports every field the benchmark promises."""

import gzip
import json
import types

import pytest

from jaxllm.bench import cases, profile, report, run
from jaxllm.cli import main
from jaxllm import generate as generate_lib
from jaxllm import model as model_lib
from jaxllm.config import load_config
from jaxllm.hardware import device_peak

TINY = ["--preset", "micro", "--batch-size", "8", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--quiet"]


def _run(tmp_path, *extra):
    out = tmp_path / "out.json"
    history = tmp_path / "history.jsonl"
    assert main(["bench", *TINY, "--json", str(out), "--history", str(history), *extra]) == 0
    return json.loads(out.read_text())["results"], history


def test_train_bench_reports_speed_flops_mfu_memory_and_appends_history(tmp_path):
    (record,), history = _run(tmp_path)
    config = load_config(None, ["model.preset=micro", "data.seq_len=32"])
    assert record["flops_per_token"] == model_lib.flops_per_token(config.model, 32)
    assert "6*P + 12*L*T*N*H" in record["flops_formula"]
    assert record["tokens_per_step"] == 8 * 32
    assert record["timed_steps"] == 2 and len(record["step_seconds"]) == 2
    assert record["step_seconds_median"] > 0 and record["compile_seconds"] > 0
    assert record["tokens_per_second"] == pytest.approx(8 * 32 / record["step_seconds_median"])
    # On CPU the peak is the float32 matmul ceiling measured in the same run.
    assert record["platform"] == "cpu" and record["matmul_ceiling_tflops"] > 0
    assert record["peak_source"].startswith("float32 matmul ceiling") and record["matmul_ceiling_dtype"] == "float32"
    assert 0 < record["mfu"] and 0 < record["fraction_of_matmul_ceiling"]
    assert record["hardware_isa"] in ("AVX2", "AVX-512", "AMX", "SSE", "unknown") and "isa_emulated" in record
    assert record["memory"]["host_peak_rss_bytes"] > 0 and "temp_bytes" in record["memory"]["compiled"]
    assert record["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert record["loss_first"] > 0 and record["git_commit"] is not None and record["jax"]
    lines = history.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["name"] == "default"


def test_the_cpu_ceiling_is_a_bf16_matmul_when_every_case_computes_in_bf16():
    """A bf16 run on CPU is compared with bf16 x bf16 -> float32 matmuls (AMX CPUs: several times float32's),
    a float32 or mixed run with float32 ones."""
    for dtypes, expected in ((("bfloat16",), "bfloat16"), (("bfloat16", "float32"), "float32"), ((), "float32")):
        probe = cases.MatmulProbe("cpu", dtypes)
        assert probe.dtype == expected and probe.a.dtype == expected
        assert probe.fn(probe.a[:8], probe.b[:, :8]).dtype == "float32"


def test_variants_run_interleaved_in_one_process_and_peak_can_be_overridden(tmp_path):
    records, history = _run(tmp_path, "--variant", "plain:model.attention=xla donate=false",
                            "--variant", "fused:model.loss_chunk_size=8", "--peak-tflops", "2.0")
    assert [r["name"] for r in records] == ["plain", "fused"]
    assert records[0]["donate"] is False and records[1]["donate"] is True
    assert records[0]["model"]["attention"] == "xla" and records[1]["model"]["loss_chunk_size"] == 8
    assert records[0]["peak_source"] == "--peak-tflops"
    assert records[0]["mfu"] == pytest.approx(records[0]["model_tflops_per_second"] / 2.0)
    assert len(history.read_text().splitlines()) == 2


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sft_and_dpo_benches_run(tmp_path, stage):
    (record,), _ = _run(tmp_path, "--stage", stage, "--no-ceiling")
    assert record["stage"] == stage
    rows = 16 if stage == "dpo" else 8  # chosen and rejected rows
    assert record["tokens_per_step"] == rows * 32
    assert record["tokens_per_second"] > 0 and record["fraction_of_matmul_ceiling"] is None


def test_generate_bench_reports_prefill_and_decode(tmp_path):
    (record,), _ = _run(tmp_path, "--stage", "generate", "--prompt-len", "16", "--new-tokens", "8", "--no-ceiling")
    assert record["stage"] == "generate" and record["new_tokens"] == 8
    assert record["tokens_per_step"] == 8 * 8
    assert record["decode_tokens_per_second"] > 0 and record["prefill_tokens_per_second"] > 0
    assert record["decode_bytes_per_step"] > 0
    # Decode against prefill and against the train step's forward pass at the same batch, per round.
    assert record["forward_seq_len"] == 16 + 8 and record["forward_tokens_per_second"] > 0
    assert record["sampled_decode_tokens_per_second"] > 0
    assert record["row_groups"] == generate_lib.host_row_groups(8)  # as `generate` splits a batch of 8
    assert record["decode_step_seconds"] == pytest.approx(record["decode_seconds_median"] / 8)
    for key in ("decode_vs_prefill", "decode_vs_forward", "sampled_decode_vs_forward"):
        assert 0 < record[key] < 100, key


def test_generate_bench_ratios_are_medians_of_per_round_ratios():
    """decode_vs_forward compares decode and forward timed in the same round (robust to load drifting
    between rounds), skipping the warm-up entries that the extra timing lists also hold."""
    case = types.SimpleNamespace(
        tokens_per_step=10, times=[1.0, 2.0, 4.0], prefill_times=[9.0, 0.5, 1.0, 2.0],
        forward_times=[9.0, 0.25, 1.0, 4.0], sampled_times=[9.0, 2.0, 2.0, 8.0], prompt_len=5, new_tokens=10,
        prefill_tokens=10, forward_tokens=15, bytes_per_decode_step=1)
    fields = report.generate_fields(case, bandwidth=None, chips=1, platform="cpu")
    # decode 10, 5, 2.5 tokens/s; prefill 20, 10, 5; forward 60, 15, 3.75; sampled 5, 5, 1.25
    assert fields["decode_vs_prefill"] == pytest.approx(0.5)
    assert fields["decode_vs_forward"] == pytest.approx(1 / 3)
    assert fields["sampled_decode_vs_forward"] == pytest.approx(1 / 3)
    assert fields["decode_tokens_per_second"] == pytest.approx(5.0) and fields["decode_step_seconds"] == 0.2


def test_bad_arguments_are_sentences_and_exit_2(tmp_path, capsys):
    assert main(["bench", *TINY, "--batch-size", "3", "--no-history"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert main(["bench", *TINY, "--lever", "malloc", "--no-history"]) == 2  # chooses what --levers measures
    assert "add --levers" in capsys.readouterr().err
    with pytest.raises(cases.BenchError, match="NAME:key=value"):
        run.parse_variant("model.attention=xla")


def test_peak_table_and_mesh_parsing():
    assert device_peak("NVIDIA H100 80GB HBM3", "bfloat16") == (989.0, 3.35)
    assert device_peak("NVIDIA H200", "bfloat16")[0] == 989.0
    assert device_peak("NVIDIA A100-SXM4-80GB", "bfloat16")[0] == 312.0
    assert device_peak("TPU v4", "bfloat16")[0] == 275.0
    assert device_peak("TPU v5 lite", "bfloat16")[0] == 197.0
    assert device_peak("TPU v5p", "bfloat16")[0] == 459.0
    assert device_peak("TPU v6 lite", "bfloat16")[0] == 918.0
    assert device_peak("cpu", "float32") == (None, None)
    assert cases.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert cases.parse_mesh("fsdp=-1") == {"data": 1, "fsdp": -1, "tensor": 1}
    assert cases.parse_mesh("1,8,1") == {"data": 1, "fsdp": 8, "tensor": 1}


def test_profile_summary_splits_device_time_by_kernel_class(tmp_path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "nvjet_sm90_tst_256x128", "dur": 3000},
        {"ph": "X", "pid": 1, "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "dur": 1000},
        {"ph": "X", "pid": 1, "name": "loop_multiply_fusion", "dur": 1000},
        {"ph": "X", "pid": 2, "name": "host work", "dur": 99000},
    ]
    trace_dir = tmp_path / "plugins" / "profile" / "run"
    trace_dir.mkdir(parents=True)
    with gzip.open(trace_dir / "host.trace.json.gz", "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    summary = profile.summarize_trace(tmp_path)
    assert summary["device_events_only"]
    assert summary["share_by_class"] == {"matmul": 0.6, "attention": 0.2, "fusion/elementwise": 0.2}
    assert "matmul" in profile.format_profile(summary)


def test_mfu_is_achieved_flops_over_the_datasheet_peak_and_unknown_on_cpu():
    from jaxllm import hardware

    # 1000 tokens/s x 1e9 FLOPs/token on two H100 SXM (989 TFLOP/s bf16 each).
    assert hardware.mfu(1000.0, 1e9, "NVIDIA H100 80GB HBM3", "bfloat16", 2) == pytest.approx(1e12 / (2 * 989e12))
    assert hardware.mfu(1000.0, 1e9, "cpu", "float32", 1) is None
    assert hardware.mfu(0.0, 1e9, "NVIDIA H100 80GB HBM3", "bfloat16", 1) is None
