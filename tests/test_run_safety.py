"""Run safety: resuming with a changed config, the range check of every setting, the non-finite-update
guard, the progress bar's numbers, atomic small-file writes and the workdir lock.

Training here is the tiny synthetic setup of helpers.py (a few steps, seconds); the lock is tested with a
real second process, since a flock only shows between processes.
"""

import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from helpers import SyntheticIterator, tiny_config

from jaxllm import files
from jaxllm import sharding as sharding_lib
from jaxllm import train as train_lib
from jaxllm.loop import progress
from jaxllm.cli import main
from jaxllm.config import ConfigError, INT_MINIMUMS, MeshConfig, iter_settings, load_config

ROOT = Path(__file__).resolve().parent.parent
MICRO = ["model.preset=micro", "mesh.num_devices=1", "train.batch_size=8", "train.progress=false",
         "train.log_every=1", "train.eval_batches=1", "data.seq_len=64", "train.tensorboard=false"]


def one_device():
    return sharding_lib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def _train(config, workdir, log=lambda *_: None, **kwargs):
    iterator = SyntheticIterator("pretrain", config.train.batch_size, config.data.seq_len, config.model.vocab_size)
    return train_lib.train(config, workdir, tokenizer=False, batch_iterator=iterator, eval_batches=[],
                           mesh=one_device(), log=log, **kwargs)


def _base(*overrides):
    return tiny_config("train.batch_size=4", "train.async_checkpointing=false", "train.tensorboard=false",
                       "train.checkpoint_every=3", *overrides)


# ----------------------------------------------------------------------------------------------
# Resuming with a changed config (#16.4)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resume") / "run"
    _train(_base("train.steps=3", "optimizer.warmup_steps=2"), workdir)
    return workdir


def _copy(workdir, tmp_path):
    import shutil

    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


def test_resume_with_an_unchanged_config_says_nothing_about_the_config(three_steps, tmp_path):
    workdir = _copy(three_steps, tmp_path)
    lines = []
    _train(_base("train.steps=3", "optimizer.warmup_steps=2", "train.log_every=2"), workdir, log=lines.append)
    assert not [line for line in lines if "changed since checkpoint" in line], lines


def test_resume_with_a_changed_schedule_warns_once_per_key_with_old_new_and_the_learning_rates(three_steps,
                                                                                                tmp_path):
    workdir = _copy(three_steps, tmp_path)
    lines = []
    result = _train(_base("train.steps=5", "optimizer.warmup_steps=2", "optimizer.learning_rate=0.001",
                          "optimizer.weight_decay=0.0"), workdir, log=lines.append)
    assert result.final_step == 5
    warnings = [line for line in lines if "changed since checkpoint 3" in line]
    assert len(warnings) == 3, warnings
    steps, = [w for w in warnings if w.startswith("warning: train.steps changed")]
    assert "3 -> 5" in steps and "ends at step 5 instead of 3" in steps and "learning rate at step 4" in steps
    learning_rate, = [w for w in warnings if w.startswith("warning: optimizer.learning_rate changed")]
    assert "0.003 -> 0.001" in learning_rate and "steps 1-3 followed the old learning-rate schedule" in learning_rate
    decay, = [w for w in warnings if w.startswith("warning: optimizer.weight_decay changed")]
    assert "0.1 -> 0.0" in decay


@pytest.mark.parametrize("overrides,listed", [
    (["model.d_model=48"], ["model.d_model: 32 -> 48"]),
    (["data.seq_len=16", "train.seed=3"], ["data.seq_len: 32 -> 16", "train.seed: 0 -> 3"]),
])
def test_resume_with_another_model_or_data_lists_every_changed_key_and_leaves_the_workdir_alone(
        three_steps, tmp_path, overrides, listed):
    workdir = _copy(three_steps, tmp_path)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != files.LOCK_FILE}
    with pytest.raises(ConfigError) as error:
        _train(_base("train.steps=6", "optimizer.warmup_steps=2", *overrides), workdir)
    message = str(error.value)
    assert "checkpoints/3 was trained with another model" in message and f"{len(listed)} changed" in message
    for item in listed:
        assert item in message, message
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != files.LOCK_FILE}
    assert after == before


# ----------------------------------------------------------------------------------------------
# One range check for every setting (#20.1, #20.2, #20.8)


FLOAT_KEYS = [key for key, _, kind in iter_settings(load_config()) if kind in ("float", float)]
INT_KEYS = [key for key, _, kind in iter_settings(load_config()) if kind in ("int", int)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_setting_must_be_finite(value):
    for key in FLOAT_KEYS:
        with pytest.raises(ConfigError, match=rf"^{key}={value.lstrip('-')}|^{key}=-inf"):
            load_config(None, [f"{key}={value}"])


def test_every_int_setting_below_its_minimum_is_an_error_naming_key_and_minimum():
    for key in INT_KEYS:
        minimum = INT_MINIMUMS.get(key, 0)
        with pytest.raises(ConfigError, match=rf"^{key}={minimum - 1} is out of range: it must be an integer >= "
                                              rf"{minimum}"):
            load_config(None, [f"{key}={minimum - 1}"])


@pytest.mark.parametrize("override,message", [
    ("train.keep_checkpoints=0", r"train.keep_checkpoints=0 is out of range: it must be an integer >= 1"),
    ("train.keep_checkpoints=-1", r"train.keep_checkpoints=-1 is out of range"),
    ("train.checkpoint_every=0", r"train.checkpoint_every=0 is out of range: it must be an integer >= 1"),
    ("train.log_every=0", r"train.log_every=0 is out of range"),
    ("data.seq_len=0", r"data.seq_len=0 is out of range"),
    ("optimizer.learning_rate=nan", r"optimizer.learning_rate=nan is not a finite number; it must be >= 0"),
    ("optimizer.learning_rate=inf", r"optimizer.learning_rate=inf is not a finite number"),
    ("optimizer.beta2=1.5", r"optimizer.beta2=1.5 is out of range: it must be >= 0 and < 1"),
    ("feedback.beta=0", r"feedback.beta=0 is out of range: it must be > 0"),
])
def test_out_of_range_settings_exit_2_before_the_workdir_is_created(override, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--workdir", str(workdir), *MICRO,
                 "train.steps=2", override]) == 2
    error = capsys.readouterr().err
    assert error.count("jaxllm:") == 1 and "Traceback" not in error
    assert re.search(message, error), error
    assert not workdir.exists()


def test_a_non_finite_update_is_skipped_and_blamed_on_the_update_not_the_data(tmp_path):
    """A learning rate that overflows the update (set past the range check, as a buggy optimizer would)
    gives finite losses and gradients but non-finite params: every such update is skipped with that cause."""
    config = _base("train.steps=2", "train.max_bad_steps_in_a_row=0")
    config.optimizer.learning_rate = math.inf
    lines = []
    _train(config, tmp_path / "run", log=lines.append)
    records = [json.loads(line) for line in (tmp_path / "run" / "skipped_batches.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["cause"] == "non-finite update" and math.isfinite(r["loss"]) for r in records), records
    assert any("not the data" in line for line in lines), lines


# ----------------------------------------------------------------------------------------------
# The progress bar (#16.5b)


def test_progress_bar_shows_the_loss_of_the_step_it_draws_and_no_zero_throughput():
    stream = io.StringIO()
    bar = progress.ProgressBar(10, 40, True, "pretrain", file=stream, mininterval=0)
    bar.update(11, {"loss": 7.0, "tokens_per_second": 0.0})  # the compiling step right after a resume
    assert "tok_s=-" in stream.getvalue() and "tok_s=0" not in stream.getvalue()
    bar.update(20, {"loss": 2.5, "tokens_per_second": 1234.0})
    drawn = stream.getvalue().rsplit("\r", 1)[-1]
    assert "20/40" in drawn and "loss=2.5000" in drawn and "tok_s=1234" in drawn, drawn
    bar.close()


# ----------------------------------------------------------------------------------------------
# Atomic small-file writes (#20.6)


def test_write_atomic_leaves_the_old_content_when_interrupted_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    files.write_json_atomic(path, {"steps": 8})

    def killed(*_):
        raise KeyboardInterrupt  # as a signal arriving between the write and the rename

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_json_atomic(path, {"steps": 10})
    assert json.loads(path.read_text()) == {"steps": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left


# ----------------------------------------------------------------------------------------------
# The workdir lock (#20.5)

HOLDER = textwrap.dedent("""
    import sys, time
    from jaxllm.files import WorkdirLock
    lock = WorkdirLock(sys.argv[1], "jaxllm train").acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_run_on_a_locked_workdir_exits_2_naming_the_holder_and_sigkill_releases_it(tmp_path, capsys):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        overrides = [*MICRO, "train.steps=1"]
        assert main(["train", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--workdir", str(workdir),
                     *overrides]) == 2
        error = capsys.readouterr().err
        assert f"is in use by another jaxllm train (pid {holder.pid} on host " in error, error
        assert not (workdir / "checkpoints").exists() and not (workdir / "config.yaml").exists()
        holder.kill()  # SIGKILL: the kernel drops the flock
        holder.wait(timeout=30)
        assert main(["train", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--workdir", str(workdir),
                     *overrides]) == 0
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ----------------------------------------------------------------------------------------------
# Data fingerprinted by content (#20.10)


def _rewrite_keeping_size_and_mtime(path: Path, old: bytes, new: bytes) -> None:
    stat = path.stat()
    content = path.read_bytes()
    assert len(old) == len(new) and old in content
    path.write_bytes(content.replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_a_data_file_changed_in_place_with_the_same_size_and_time_has_another_fingerprint(tmp_path):
    from jaxllm.data.sources import source_fingerprint

    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "Ada Lovelace was born in London."}\n')
    before = source_fingerprint(f"jsonl:{path}")
    _rewrite_keeping_size_and_mtime(path, b"London", b"Berlin")
    assert source_fingerprint(f"jsonl:{path}") != before


def test_resuming_on_changed_data_exits_2_unless_allowed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", "off")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Person {i} was born in London in {1800 + i}."}) + "\n"
                            for i in range(64)))
    workdir = tmp_path / "run"
    command = ["train", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--workdir", str(workdir), *MICRO,
               f"data.source=jsonl:{data}", "data.eval_source=", "train.checkpoint_every=2"]
    assert main([*command, "train.steps=2"]) == 0
    _rewrite_keeping_size_and_mtime(data, b"London", b"Berlin")
    capsys.readouterr()
    assert main([*command, "train.steps=3"]) == 2
    error = capsys.readouterr().err
    assert re.search(r"the data .* changed since .*checkpoints/2 was saved .* data.allow_change=true", error), error
    assert main([*command, "train.steps=3", "data.allow_change=true"]) == 0
    assert "warning: the data changed since" in capsys.readouterr().out


def test_resume_comparison_classifies_every_kind_of_change():
    from jaxllm.config import compare_for_resume, to_dict

    saved = to_dict(load_config(None, ["model.preset=micro"]))
    changed = load_config(None, ["model.preset=micro", "model.num_layers=3", "data.source=default:sft",
                                 "train.steps=7", "optimizer.beta1=0.8", "mesh.data=1", "train.log_every=3"])
    changes = compare_for_resume(saved, changed)
    assert [key for key, _, _ in changes.incompatible] == ["model.num_layers", "data.source"]
    assert changes.schedule == [("train.steps", 100, 7)]
    assert changes.other == [("optimizer.beta1", 0.9, 0.8)]  # mesh.* and logging settings: silent
    assert compare_for_resume(saved, load_config(None, ["model.preset=micro"])) == \
        type(changes)([], [], [])


def test_a_resumed_run_does_not_need_its_init_from_any_more_unless_it_keeps_a_reference(tmp_path):
    import shutil

    _train(_base("train.steps=1"), tmp_path / "pt")
    _train(_base("train.steps=1", f"init_from={tmp_path / 'pt'}"), tmp_path / "continued")
    shutil.rmtree(tmp_path / "pt")
    assert _train(_base("train.steps=2", f"init_from={tmp_path / 'pt'}"), tmp_path / "continued").final_step == 2
