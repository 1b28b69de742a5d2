"""`jaxllm sweep`: the grid is trained, losses are read back, the iso-FLOP law is fitted, runs resume."""

from __future__ import annotations

import json
import math

import pytest

from jaxllm.errors import UsageError
from jaxllm.cli.sweep import sweep_command
from jaxllm.lecture.sweep import SweepSettings, plan_runs, run_name, run_sweep


def _synthetic_train(calls: list):
    """A stand-in trainer whose loss is a parabola in ln N with its minimum at N* = sqrt(C / 120), i.e.
    Chinchilla's 20 tokens per parameter; it writes summary.json as the real trainer does."""
    def train(config, run_dir, log):
        calls.append(run_dir.name)
        params = [r for r, c in plan_runs(SETTINGS_SYNTHETIC) if run_name(r) == run_dir.name][0]
        flops = params.flops
        best = math.sqrt(flops / 120)
        loss = 2.0 + (math.log(params.params) - math.log(best)) ** 2
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps({"steps": config.train.steps, "eval": {"loss": loss}}))
        return loss
    return train


SETTINGS_SYNTHETIC = SweepSettings(budgets=(3e10, 1e11, 3e11), widths=(16, 24, 32, 48, 64),
                                   overrides=("mesh.num_devices=1",))


def test_fit_recovers_the_law_behind_the_losses_and_finished_runs_are_skipped(tmp_path):
    calls: list[str] = []
    report = run_sweep(SETTINGS_SYNTHETIC, tmp_path, log=lambda *_: None, train_fn=_synthetic_train(calls))
    assert len(calls) == len(report["runs"]) == 15
    fit = report["fit"]
    assert fit is not None, report["fit_error"]
    assert fit["params_exponent"] == pytest.approx(0.5, abs=0.01)
    for optimum in report["optima"]:
        assert optimum["params"] == pytest.approx(math.sqrt(optimum["flops"] / 120), rel=0.03)
        assert optimum["tokens_per_param"] == pytest.approx(20, rel=0.1)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["runs"] == report["runs"] and (tmp_path / "isoflop.png").stat().st_size > 10_000

    def must_not_train(*_):
        raise AssertionError("a finished run was trained again")

    again = run_sweep(SETTINGS_SYNTHETIC, tmp_path, log=lambda *_: None, train_fn=must_not_train)
    assert [r["loss"] for r in again["runs"]] == [r["loss"] for r in report["runs"]]


def test_a_run_directory_from_a_different_sweep_is_refused(tmp_path):
    calls: list[str] = []
    run_sweep(SETTINGS_SYNTHETIC, tmp_path, log=lambda *_: None, train_fn=_synthetic_train(calls))
    first = tmp_path / "runs" / calls[0]
    (first / "summary.json").unlink()  # unfinished, so the sweep would resume it ...
    run, config = plan_runs(SETTINGS_SYNTHETIC)[0]
    from jaxllm.config import save_config
    config.train.steps += 7  # ... but it was started with other settings
    save_config(config, first / "config.yaml")
    with pytest.raises(UsageError, match="different train.steps"):
        run_sweep(SETTINGS_SYNTHETIC, tmp_path, log=lambda *_: None, train_fn=_synthetic_train([]))


def test_micro_grid_trains_for_real_and_more_compute_gives_lower_loss(tmp_path):
    settings = SweepSettings(budgets=(5e7, 1e8), widths=(16, 32), seq_len=32, batch_size=4, min_steps=2,
                             eval_batches=1, overrides=("mesh.num_devices=1", "train.async_checkpointing=false"))
    report = run_sweep(settings, tmp_path, log=lambda *_: None)
    runs = {(r["flops"], r["model"]["d_model"]): r for r in report["runs"]}
    assert sorted(runs) == [(5e7, 16), (5e7, 32), (1e8, 16), (1e8, 32)]
    assert [runs[k]["steps"] for k in sorted(runs)] == [5, 2, 11, 4]
    for run in runs.values():
        summary = json.loads((tmp_path / "runs" / run["name"] / "summary.json").read_text())
        assert run["loss"] == summary["eval"]["loss"] and math.isfinite(run["loss"]) and run["loss"] < 6.5
        assert run["tokens"] == run["steps"] * 128
    assert runs[(1e8, 16)]["loss"] < runs[(5e7, 16)]["loss"]  # twice the budget, same size: lower loss
    assert report["fit"] is None and "at least 3 model sizes" in report["fit_error"]
    assert (tmp_path / "isoflop.png").exists()


def test_bad_arguments_exit_with_a_usage_error(tmp_path, capsys):
    with pytest.raises(UsageError, match="comma-separated list of numbers"):
        sweep_command(["--workdir", str(tmp_path), "--budgets", "1e10,lots"])
    with pytest.raises(UsageError, match="no run gets at least"):
        sweep_command(["--workdir", str(tmp_path), "--budgets", "1e5", "--dry-run"])
    with pytest.raises(UsageError, match="width 56"):
        sweep_command(["--workdir", str(tmp_path), "--widths", "16,56", "--dry-run"])
    assert sweep_command(["--workdir", str(tmp_path), "--dry-run", "mesh.num_devices=1"]) == 0
    assert "15 runs" in capsys.readouterr().out
