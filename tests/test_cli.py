"""The command line: the three tiny recipes chained end to end (few steps), and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm import checkpoint as ckpt
from jaxllm.cli import DELEGATED, error_line, exit_code, main
from jaxllm.errors import CheckpointWriteError, ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
FAST = ["model.preset=micro", "train.batch_size=8", "train.progress=false", "train.eval_batches=1",
        "mesh.num_devices=1", "train.log_every=1"]


def _train(recipe: str, workdir: Path, *extra: str) -> int:
    return main(["train", str(ROOT / "configs" / recipe), "--workdir", str(workdir), *FAST, *extra])


def test_three_stage_recipes_chain_and_resume(tmp_path):
    assert _train("pretrain_tiny.yaml", tmp_path / "pt", "train.steps=3", "train.checkpoint_every=2") == 0
    assert ckpt.latest_step(tmp_path / "pt") == 3
    assert _train("sft_tiny.yaml", tmp_path / "sft", "train.steps=2", f"init_from={tmp_path / 'pt'}") == 0
    assert _train("dpo_tiny.yaml", tmp_path / "dpo", "train.steps=2", f"init_from={tmp_path / 'sft'}") == 0
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["stage"] == "dpo" and "preference_accuracy" in summary["eval"]
    assert (tmp_path / "dpo" / "config.yaml").exists()
    # Running a finished stage again resumes at its last step and does no more work.
    assert _train("dpo_tiny.yaml", tmp_path / "dpo", "train.steps=2", f"init_from={tmp_path / 'sft'}") == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2]


def test_dry_run_reports_parameters_flops_and_memory(capsys):
    assert main(["train", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--workdir", "unused", "--dry-run",
                 "mesh.num_devices=1"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "flops_per_token" in out and "MiB" in out


@pytest.mark.parametrize("override,message", [
    ("train.setps=3", "did you mean 'steps'"),
    ("model.d_model=abc", "expected an integer"),
    ("mesh.num_devices=16", "devices are available"),
])
def test_bad_configs_exit_2_with_a_clear_message(tmp_path, capsys, override, message):
    assert _train("pretrain_tiny.yaml", tmp_path / "run", override) == 2
    assert message in capsys.readouterr().err


def test_init_from_a_missing_run_exits_2(tmp_path, capsys):
    assert _train("sft_tiny.yaml", tmp_path / "sft", f"init_from={tmp_path / 'missing'}") == 2
    assert "missing: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()  # the workdir is left untouched (not even created)


def test_console_script_runs_as_a_subprocess():
    env = dict(os.environ, JAXLLM_NO_REEXEC="1")
    result = subprocess.run([sys.executable, "-m", "jaxllm.cli", "nonsense"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "unknown command" in result.stderr
    result = subprocess.run([sys.executable, "-m", "jaxllm.cli", "--help"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "train" in result.stdout


def test_every_command_parses_in_the_cli_package_and_nowhere_else():
    assert all(target.startswith("jaxllm.cli.") for target in DELEGATED.values())
    package = ROOT / "jaxllm"
    library = [p for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "cli"]
    assert [str(p) for p in library if "argparse" in p.read_text()] == []


def test_errors_map_to_exit_codes_once_with_one_prefix():
    assert exit_code(ConfigError("x")) == 2 and exit_code(RuntimeError("x")) == 1 and exit_code(KeyError("x")) is None
    assert exit_code(DataError("x"), "data stats") == 1  # the commands that always exited 1 on bad input still do
    assert error_line(ConfigError("bad key"), 2) == "jaxllm: error: bad key"
    assert error_line(CheckpointWriteError("disk full"), 1) == "jaxllm: error: CheckpointWriteError: disk full"


def test_the_dispatcher_imports_no_jax():
    code = "import sys, jaxllm.cli; assert 'jax' not in sys.modules and 'jaxllm.cli.train' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], env=dict(os.environ, JAXLLM_NO_REEXEC="1")).returncode == 0
