"""Reliability: kills, preemption, loss spikes and non-finite updates lose nothing.

The kill-anywhere test drives `jaxllm train` subprocesses with tools/kill_harness.py (SIGKILL at random
moments and while an async checkpoint is being written, SIGTERM, restart) and compares everything with an
uninterrupted run bit for bit. The others run the loop in-process on the synthetic data of helpers.py.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import SyntheticIterator, tiny_config

from jaxllm import checkpoint as ckpt
from jaxllm import sharding as sharding_lib
from jaxllm import train as train_lib
from jaxllm.config import MeshConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import kill_harness  # noqa: E402

QUIET = dict(log=lambda *_: None)
EXAMPLES_PER_ROW = 8


def one_device():
    return sharding_lib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


class DocumentIterator(SyntheticIterator):
    """Synthetic batches with document ids (row r of batch k is document k*B + r); `poison` batches get an
    infinite loss, `spike` batches random tokens (a loss well above the learned pattern's); `on_fetch`
    is called with the index of each batch fetched (to send signals at a known point)."""

    def __init__(self, batch=4, poison=(), spike=(), order=None, on_fetch=None):
        super().__init__("pretrain", batch, 32, 64)
        self.poison, self.spike, self.order, self.on_fetch = set(poison), set(spike), order, on_fetch

    def batch_at(self, k):
        source = self.order[k] if self.order is not None else k
        batch = super().batch_at(source)
        ids = np.full((self.batch, EXAMPLES_PER_ROW), -1, np.int32)
        ids[:, 0] = source * self.batch + np.arange(self.batch)
        batch["example_ids"] = ids
        if source in self.spike:
            batch["tokens"] = np.random.default_rng(source).integers(4, self.vocab, batch["tokens"].shape).astype(np.int32)
        if source in self.poison:
            batch["loss_mask"] = batch["loss_mask"] * np.float32(np.inf)
        return batch

    def __next__(self):
        if self.on_fetch is not None:
            self.on_fetch(self.index)
        return super().__next__()


def _config(*overrides):
    return tiny_config("train.batch_size=4", "train.async_checkpointing=false", "train.tensorboard=false",
                       *overrides)


def _train(config, workdir, iterator=None, **kwargs):
    return train_lib.train(config, workdir, tokenizer=False, batch_iterator=iterator or DocumentIterator(),
                           eval_batches=[], mesh=one_device(), **{**QUIET, **kwargs})


def _last_per_step(workdir):
    return {r["step"]: r["loss"] for r in train_lib.read_metrics(workdir)}


def _skipped_records(workdir):
    path = Path(workdir) / "skipped_batches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_same_state(a, b, step_a, step_b=None, keys=None):
    first = kill_harness.load_state_arrays(Path(a), step_a)
    second = kill_harness.load_state_arrays(Path(b), step_a if step_b is None else step_b)
    keys = keys or sorted(first)
    assert sorted(first) == sorted(second)
    for key in keys:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# Kill anywhere, preemption


def test_sigkill_anywhere_and_sigterm_resume_bit_exactly_like_an_uninterrupted_run(tmp_path):
    """SIGKILL while a checkpoint is written, after a random step and at a random time, and a SIGTERM:
    every redone step has the reference's loss, no checkpoint directory is ever half-written, each restart
    resumes from the newest complete checkpoint, and the final state equals the uninterrupted run's."""
    cache = Path(os.environ["JAXLLM_TEST_CACHE"])  # this test worker's compilation cache (conftest.py)
    config = kill_harness.HarnessConfig(steps=15, checkpoint_every=3, cycles=4, round_robin=True,
                                        modes=("checkpoint", "step", "sigterm", "time"), seed=7,
                                        compile_cache=cache, sigterm_timeout=120)
    summary = kill_harness.run(config, tmp_path, log=lambda *_: None)
    assert summary["problems"] == []
    details = summary["details"]
    assert [c["mode"] for c in details] == ["checkpoint", "step", "sigterm", "time"][:len(details)]
    assert details[0]["outcome"] == "killed" and "orbax-checkpoint-tmp" in details[0]["kill_detail"]
    assert summary["killed_during_checkpoint_write"] >= 1
    sigterms = [c for c in details if c["outcome"] == "sigterm"]
    assert sigterms and all(c["returncode"] == 0 for c in sigterms)
    assert summary["redone_steps"] > 0  # steps after the last checkpoint were trained again, on the same data


def test_sigterm_to_one_process_of_a_two_process_run_stops_both_at_one_step_and_resumes(tmp_path):
    """Two `jaxllm train` processes joined by jax.distributed (gloo on CPU); only process 1 gets SIGTERM.
    JAX's preemption notifier makes both reach the same sync step, save it together and exit 0."""
    cache = Path(os.environ["JAXLLM_TEST_CACHE"])  # this test worker's compilation cache (conftest.py)
    # Enough steps that the preemption sync point (agreed through the coordination service, some steps
    # after the signal on a fast idle machine) falls before the end of the run.
    steps = 100
    config = kill_harness.HarnessConfig(steps=steps, checkpoint_every=25, compile_cache=cache, sigterm_timeout=120)
    report = kill_harness.multihost_sigterm(config, tmp_path, processes=2, signalled=1, after_step=3)
    assert report["exit_codes"] == [0, 0] and report["problems"] == []
    stopped = report["stopped_at"]
    assert 3 <= stopped < steps and report["checkpoints"][-1] == stopped  # saved the step both had reached
    assert report["resumed_from"] == [stopped, stopped] and report["restart_exit_codes"] == [0, 0]
    assert report["final_checkpoints"][-1] == steps and report["steps"] == list(range(1, steps + 1))


def test_resume_ignores_leftover_temporary_dirs_and_partly_deleted_old_checkpoints(tmp_path):
    config = _config("train.steps=6", "train.checkpoint_every=3")
    _train(config, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["3", "6"]
    # A save killed mid-write (a newer step, only in a temporary dir) and an old step half removed by rotation.
    shutil.copytree(checkpoints / "6", checkpoints / "9.orbax-checkpoint-tmp")
    shutil.rmtree(checkpoints / "3" / "state")
    (checkpoints / "3" / "commit_success.txt").unlink()
    longer = _config("train.steps=9", "train.checkpoint_every=3")
    result = _train(longer, tmp_path / "run")
    assert result.final_step == 9
    assert not any("orbax-checkpoint-tmp" in p.name for p in checkpoints.iterdir())
    assert ckpt.latest_step(tmp_path / "run") == 9
    # The first start resumed from 6 (not from the temporary 9, not from the broken 3).
    assert sorted(_last_per_step(tmp_path / "run")) == list(range(1, 10))


def test_incomplete_newest_checkpoint_is_a_clear_error_not_a_silent_restart(tmp_path):
    config = _config("train.steps=3", "train.checkpoint_every=3")
    _train(config, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "3" / "meta")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/3 is incomplete \(no meta\).*Move it out"):
        _train(_config("train.steps=6"), tmp_path / "run")


def test_sigterm_mid_run_saves_that_step_exits_cleanly_and_resumes_to_the_same_result(tmp_path):
    config = _config("train.steps=8", "train.checkpoint_every=100")
    _train(config, tmp_path / "straight")

    def preempt(index):
        if index == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    result = _train(config, tmp_path / "preempted", DocumentIterator(on_fetch=preempt))
    assert result.stopped_early and result.final_step == 5  # the step under way finishes, then it saves
    assert ckpt.latest_step(tmp_path / "preempted") == 5
    assert _train(config, tmp_path / "preempted").final_step == 8
    assert _last_per_step(tmp_path / "preempted") == _last_per_step(tmp_path / "straight")
    _assert_same_state(tmp_path / "straight", tmp_path / "preempted", 8)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run


def test_sigterm_during_start_up_stops_before_training_and_keeps_the_checkpoint(tmp_path):
    config = _config("train.steps=6", "train.checkpoint_every=100")
    _train(config, tmp_path / "run", max_steps_this_run=3)

    def log(message):
        if message.startswith("resumed"):
            os.kill(os.getpid(), signal.SIGTERM)

    result = _train(config, tmp_path / "run", log=log)
    assert result.stopped_early and result.final_step == 3
    assert ckpt.latest_step(tmp_path / "run") == 3
    assert max(_last_per_step(tmp_path / "run")) == 3


def test_a_second_sigint_interrupts_at_once(tmp_path):
    config = _config("train.steps=6", "train.checkpoint_every=2")

    def impatient(index):
        if index == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _train(config, tmp_path / "run", DocumentIterator(on_fetch=impatient))
    assert ckpt.latest_step(tmp_path / "run") == 2  # the checkpoints written so far are intact


# ----------------------------------------------------------------------------------------------
# Loss spikes and non-finite updates


def test_planted_inf_batch_is_skipped_logged_with_its_document_ids_and_training_goes_on(tmp_path):
    config = _config("train.steps=7", "train.checkpoint_every=1", "train.keep_checkpoints=10")
    result = _train(config, tmp_path / "run", DocumentIterator(poison={4}))
    assert result.final_step == 7
    skipped = {r["step"]: r["skipped"] for r in train_lib.read_metrics(tmp_path / "run")}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 0, 7: 0}
    [record] = _skipped_records(tmp_path / "run")
    assert record["step"] == 5 and record["example_ids"] == [16, 17, 18, 19]  # batch 4's documents
    assert not np.isfinite(record["loss"])
    _assert_same_state(tmp_path / "run", tmp_path / "run", 4, 5,
                       keys=[k for k in kill_harness.load_state_arrays(tmp_path / "run", 4) if k != "step"])
    assert np.isfinite(train_lib.read_metrics(tmp_path / "run")[-1]["loss"])


def test_loss_above_k_times_the_running_median_is_skipped(tmp_path):
    config = _config("train.steps=16", "train.checkpoint_every=100", "train.spike_factor=1.08")
    _train(config, tmp_path / "run", DocumentIterator(spike={14}))
    records = train_lib.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["skipped"]] == [15]
    median = float(np.median([r["loss"] for r in records[:14]]))
    assert records[14]["loss"] > 1.08 * median > max(r["loss"] for r in records[10:14])
    assert _skipped_records(tmp_path / "run")[0]["example_ids"] == [56, 57, 58, 59]


def test_m_skips_in_a_row_halt_with_exit_code_1_and_keep_the_checkpoints(tmp_path, monkeypatch, capsys):
    from jaxllm.cli import main
    from jaxllm.data import pipeline

    real = pipeline.make_batch_iterator

    class Poisoned:
        def __init__(self, inner, poison):
            self.inner, self.poison = inner, poison

        def __next__(self):
            index = self.inner.step
            batch = next(self.inner)
            if index in self.poison:
                batch = {**batch, "loss_mask": batch["loss_mask"] * np.float32(np.nan)}
            return batch

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(pipeline, "make_batch_iterator", lambda *a, **k: Poisoned(real(*a, **k), {4, 5}))
    workdir = tmp_path / "run"
    code = main(["train", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--workdir", str(workdir),
                 "model.preset=micro", "mesh.num_devices=1", "train.batch_size=8", "train.progress=false",
                 "train.log_every=1", "train.eval_batches=1", "data.seq_len=64", "train.tensorboard=false",
                 "train.steps=10", "train.checkpoint_every=3", "train.max_bad_steps_in_a_row=2"])
    assert code == 1
    error = capsys.readouterr().err
    assert "TrainingHalted: 2 updates in a row were skipped" in error and "up to step 6" in error
    assert "skipped_batches.jsonl" in error and "rollback_on_halt" in error
    records = _skipped_records(workdir)
    assert [r["step"] for r in records] == [5, 6]
    assert all(len(r["example_ids"]) >= 8 for r in records)  # the documents of each bad batch, to filter
    assert ckpt.latest_step(workdir) == 6 and (workdir / "checkpoints" / "3").is_dir()


ROLLBACK = ("train.steps=14", "train.checkpoint_every=3", "train.keep_checkpoints=5",
            "train.max_bad_steps_in_a_row=3", "train.rollback_on_halt=true")


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory):
    """A run whose batches 7-9 (steps 8-10) give an infinite loss: 3 skips in a row, then a rollback."""
    workdir = tmp_path_factory.mktemp("rollback") / "run"
    result = _train(_config(*ROLLBACK), workdir, DocumentIterator(poison={7, 8, 9}))
    return workdir, result


def test_rollback_on_halt_restores_the_newest_checkpoint_before_the_bad_batches_and_goes_on(tmp_path, rolled_back):
    config = _config(*ROLLBACK)
    run, result = rolled_back
    assert result.final_step == 14 and not result.stopped_early
    rollback = [r for r in _skipped_records(run) if "rolled_back_to" in r]
    assert rollback == [{"step": 10, "rolled_back_to": 6, "undone_steps": [7], "skipped_steps": [8, 9, 10],
                         "undone_example_ids": [24, 25, 26, 27]}]
    # Equivalent: the accepted updates are those of batches 0-5 and then 10-13, in that order.
    order = [0, 1, 2, 3, 4, 5, 10, 11, 12, 13]
    _train(config, tmp_path / "reference", DocumentIterator(order=order), max_steps_this_run=10)
    keys = [k for k in kill_harness.load_state_arrays(tmp_path / "reference", 10) if k.startswith(("params", "opt"))]
    _assert_same_state(tmp_path / "reference", run, 10, 14, keys=keys)


def test_guard_state_is_saved_so_a_run_resumed_mid_streak_rolls_back_at_the_same_step(tmp_path, rolled_back):
    config = _config(*ROLLBACK)
    straight, _ = rolled_back
    _train(config, tmp_path / "resumed", DocumentIterator(poison={7, 8, 9}), max_steps_this_run=9)  # 2 skips
    meta = ckpt.read_meta(tmp_path / "resumed", 9)
    assert meta["guard"]["bad_in_a_row"] == 2 and meta["guard"]["streak_start"] == 8
    _train(config, tmp_path / "resumed", DocumentIterator(poison={7, 8, 9}))
    assert [r for r in _skipped_records(tmp_path / "resumed") if "rolled_back_to" in r][0]["step"] == 10
    assert _last_per_step(tmp_path / "resumed") == _last_per_step(straight)
    _assert_same_state(straight, tmp_path / "resumed", 14)


def test_rollback_without_an_older_checkpoint_halts(tmp_path):
    config = _config(*ROLLBACK)
    with pytest.raises(train_lib.TrainingHalted, match="no checkpoint from before them"):
        _train(config, tmp_path / "run", DocumentIterator(poison={1, 2, 3}))


def test_spike_guard_remembers_a_window_of_accepted_losses_and_round_trips():
    guard = train_lib.SpikeGuard()
    assert guard.loss_limit(2.0) == np.inf
    for step in range(1, 61):
        guard.record(step, False, float(step))
    assert len(guard.recent_losses) == guard.WINDOW and guard.loss_limit(2.0) == np.float32(2 * 35.5)
    guard.record(61, True, float("inf"))
    guard.record(62, True, float("nan"))
    assert (guard.bad_in_a_row, guard.streak_start) == (2, 61)
    assert train_lib.SpikeGuard.from_dict(json.loads(json.dumps(guard.to_dict()))) == guard


def test_metrics_log_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "split": "tr')
    assert [r["step"] for r in train_lib.read_metrics(tmp_path)] == [1]
    log = train_lib.MetricsLog(tmp_path, "pretrain", tensorboard=False)
    log.write(2, "train", {"loss": 0.5})
    assert [r["step"] for r in train_lib.read_metrics(tmp_path)] == [1, 2]
    assert path.read_text().count("\n") == 2
