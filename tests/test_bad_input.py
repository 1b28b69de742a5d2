"""Bad input everywhere, through `jaxllm train`: one clear message, exit code 2 (usage/data) or 1 (runtime),
and the workdir's existing checkpoints (and config.yaml) left exactly as they were. Plus property-based
fuzzing of the data parsers: any JSON (or any bytes) gives rows or a DataError, never another exception.

The read-only and full workdirs are real tmpfs mounts when the tests run as root (a 'ro' mount; a mount
a little larger than one checkpoint); without root the read-only case uses a directory without write
permission and the full disk is simulated by a save that raises ENOSPC.
"""

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllm import checkpoint as ckpt
from jaxllm import stages
from jaxllm.cli import main
from jaxllm.config import load_config
from jaxllm.data import DataError, load_prompts
from jaxllm.data import pipeline
from jaxllm.data.sources import read_records
from jaxllm.data.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FAST = ["model.preset=micro", "mesh.num_devices=1", "train.batch_size=8", "train.progress=false",
        "train.log_every=1", "train.eval_batches=1", "data.seq_len=64", "train.tensorboard=false",
        "train.checkpoint_every=3"]
RECIPE = ROOT / "configs" / "pretrain_tiny.yaml"
TOKENIZER = Tokenizer.load("default")


def _train(workdir, *overrides, recipe=RECIPE):
    return main(["train", str(recipe), "--workdir", str(workdir), *FAST, *overrides])


def _snapshot(workdir: Path) -> dict[str, str]:
    """sha256 of every file of the checkpoints and config.yaml."""
    files = [p for p in sorted(Path(workdir).rglob("*")) if p.is_file()
             and (p.name == "config.yaml" or "checkpoints" in p.relative_to(workdir).parts)]
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert _train(workdir, "train.steps=3") == 0
    return workdir


@pytest.fixture
def existing(trained, tmp_path):
    """A copy of a finished 3-step run (checkpoint 3) and a snapshot of its files."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir, _snapshot(workdir)


def _one_clear_error(capsys) -> str:
    """stderr holds exactly one error message (it may list details on further lines), no traceback."""
    error = capsys.readouterr().err.strip()
    assert error.startswith("jaxllm: ") and error.count("jaxllm:") == 1 and "Traceback" not in error, error
    return error


def _bad_jsonl(directory: Path, name: str, content: bytes) -> str:
    path = directory / name
    path.write_bytes(content)
    return f"data.source=jsonl:{path}"


GOOD = json.dumps({"text": "Ada Lovelace was born in London in 1815."}).encode()
CASES = {
    "malformed_json": (lambda d: [_bad_jsonl(d, "bad.jsonl", GOOD + b'\n{"text": "oops\n' + GOOD)],
                       r"bad.jsonl:2: not valid JSON"),
    "truncated_file": (lambda d: [_bad_jsonl(d, "cut.jsonl", GOOD + b"\n" + GOOD + b'\n{"text": "Ada Lovel')],
                       r"cut.jsonl:3: not valid JSON"),
    "not_utf8": (lambda d: [_bad_jsonl(d, "latin1.jsonl", GOOD + b'\n{"text": "caf\xe9"}')],
                 r"latin1.jsonl:2: not valid UTF-8"),
    "not_an_object": (lambda d: [_bad_jsonl(d, "list.jsonl", b'["a", "b"]')], r"list.jsonl:1: each line must be a JSON object"),
    "empty_file": (lambda d: [_bad_jsonl(d, "empty.jsonl", b"")], r"is empty"),
    "missing_file": (lambda d: [f"data.source=jsonl:{d / 'nothing.jsonl'}"], r"nothing.jsonl: no such file"),
    "wrong_text_field": (lambda d: [_bad_jsonl(d, "body.jsonl", b'{"body": "x"}')], r"no field 'text' .*data.text_field"),
    "tokenizer_larger_than_the_model": (lambda d: ["model.vocab_size=256"],
                                        r"tokenizer \(default\) has 512 ids but model.vocab_size is 256"),
    "tokenizer_not_a_sentencepiece_model": (lambda d: _garbage_tokenizer(d), r"not a readable sentencepiece model"),
    "tokenizer_other_than_the_checkpoints": (lambda d: _other_tokenizer(d), r"trained with another tokenizer"),
    "checkpoint_of_another_shape": (lambda d: ["model.d_model=96"],
                                    r"checkpoints/3 was trained with another model.*model.d_model: 64 -> 96"),
    "resume_with_another_batch_size": (lambda d: ["train.batch_size=4"],
                                       r"checkpoints/3 was trained with another .*train.batch_size: 8 -> 4"),
    "resume_with_other_data_settings": (lambda d: ["data.seq_len=32", "data.shuffle=false"],
                                        r"2 changed: data.seq_len: 64 -> 32; data.shuffle: True -> False"),
    "unknown_key": (lambda d: ["train.stpes=4"], r"'train.stpes' is not a known key \(did you mean 'steps'\?\)"),
    "wrong_type": (lambda d: ["train.batch_size=eight"], r"'train.batch_size': expected an integer, got 'eight'"),
    "mesh_larger_than_the_devices": (lambda d: ["mesh.num_devices=0", "mesh.data=3"],
                                     r"mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are available"),
    "batch_not_divisible_by_the_mesh": (lambda d: ["mesh.num_devices=8", "train.batch_size=4"],
                                        r"train.batch_size=4 .* must be divisible by the data-parallel size"),
}


def _garbage_tokenizer(directory: Path) -> list[str]:
    (directory / "tok").mkdir()
    (directory / "tok" / "tokenizer.model").write_bytes(np.random.default_rng(0).bytes(300))
    return [f"data.tokenizer={directory / 'tok'}"]


def _other_tokenizer(directory: Path) -> list[str]:
    text = directory / "corpus.txt"
    text.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(500)))
    train_tokenizer([text], 300, directory / "other")  # 300 ids: fits the 512-row embedding, other pieces
    return [f"data.tokenizer={directory / 'other'}"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_clear_message_and_leaves_the_checkpoints_intact(case, existing, tmp_path,
                                                                                     capsys, monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", "off")
    workdir, before = existing
    make_overrides, message = CASES[case]
    overrides = make_overrides(tmp_path)
    capsys.readouterr()
    assert _train(workdir, "train.steps=6", *overrides) == 2
    line = _one_clear_error(capsys)
    assert re.search(message, line, re.S), line
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("recipe,message", [
    ("model:\n  preset: micro\ntrian:\n  steps: 3\n", r"'trian' is not a known key \(did you mean 'train'\?\)"),
    ("train:\n  steps: ten\n", r"'train.steps': expected an integer, got 'ten'"),
    ("train:\n  steps: [1, 2]\n", r"'train.steps': expected an integer, got \[1, 2\]"),
    ("train: 5\n", r"'train' is a section; give it a mapping"),
    ("- just\n- a list\n", r"a recipe must be a mapping"),
    ("train: {steps: 3\n", r"not valid YAML"),
])
def test_bad_recipe_files_exit_2_naming_the_file_and_key(recipe, message, existing, tmp_path, capsys):
    workdir, before = existing
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    assert _train(workdir, recipe=path) == 2
    line = _one_clear_error(capsys)
    assert str(path) in line and re.search(message, line, re.S), line
    assert _snapshot(workdir) == before


def test_damaged_newest_checkpoint_exits_2_and_says_which_to_move(existing, capsys):
    workdir, _ = existing
    shutil.rmtree(workdir / "checkpoints" / "3" / "state" / "d")
    for path in (workdir / "checkpoints" / "3" / "state").glob("ocdbt.process_*"):
        shutil.rmtree(path)
    before = _snapshot(workdir)
    assert _train(workdir, "train.steps=6") == 2
    line = _one_clear_error(capsys)
    assert "checkpoints/3 cannot be read" in line and "Move it out" in line
    assert _snapshot(workdir) == before


def test_flipped_bytes_in_a_checkpoint_array_exit_2_naming_the_checkpoint(existing, capsys):
    """XOR 16 bytes in the middle of the largest array file: the crc32 digests written with the checkpoint
    no longer match what is read back (before, the run resumed with NaN losses)."""
    workdir, _ = existing
    largest = max((p for p in (workdir / "checkpoints" / "3" / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    largest.write_bytes(bytes(data))
    before = _snapshot(workdir)
    capsys.readouterr()
    assert _train(workdir, "train.steps=6") == 2
    line = _one_clear_error(capsys)
    assert re.search(r"checkpoints/3 is damaged: \d+ array\(s\) differ from the digests written with it", line), line
    assert "Move it out of" in line and "to start again from step 0" in line
    assert _snapshot(workdir) == before


def test_truncated_array_file_exits_2_with_one_line_and_no_tracebacks(existing):
    """TensorStore's read error arrives wrapped in a bare Exception, and the abandoned parallel reads used to
    print their tracebacks at garbage collection: in a real process, only the one clear line is printed."""
    workdir, _ = existing
    largest = max((p for p in (workdir / "checkpoints" / "3" / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    with largest.open("r+b") as handle:
        handle.truncate(100)
    result = _cli(workdir, "train.steps=6")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.count("jaxllm:") == 1, result.stderr[-3000:]
    assert f"checkpoint {workdir}/checkpoints/3 cannot be read" in result.stderr


def test_damaged_data_position_exits_2_naming_the_checkpoint(existing, capsys):
    workdir, _ = existing
    (workdir / "checkpoints" / "3" / "data" / "metadata").write_text('{"step": "three", "seed": 0}')
    before = _snapshot(workdir)
    capsys.readouterr()
    assert _train(workdir, "train.steps=6") == 2
    line = _one_clear_error(capsys)
    assert f"{workdir}/checkpoints/3: its saved data position does not fit this run" in line, line
    assert _snapshot(workdir) == before


def test_sigterm_during_start_up_exits_130_with_one_line_not_by_the_signal(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXLLM_NO_REEXEC": "1"}
    process = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "train", str(RECIPE), "--workdir",
                                str(tmp_path / "run"), *FAST, "train.steps=3"], env=env, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(1.5)  # inside start-up: importing JAX alone takes longer (an early clean stop would exit 0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 130), (process.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Unwritable and full workdirs


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


@pytest.fixture
def mount_point(tmp_path):
    path = tmp_path / "mnt"
    yield path
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_workdir_exits_2_before_any_work(trained, mount_point, capsys):
    if _mount_tmpfs(mount_point, "size=8m"):
        shutil.copytree(trained, mount_point / "run")
        before = _snapshot(mount_point / "run")
        _remount(mount_point, "ro")
        reason = "Read-only file system"
    elif os.geteuid() != 0:
        shutil.copytree(trained, mount_point / "run")
        before = _snapshot(mount_point / "run")
        os.chmod(mount_point / "run", 0o555)
        os.chmod(mount_point, 0o555)
        reason = "Permission denied"
    else:
        pytest.skip("running as root without permission to mount a tmpfs: no way to make a read-only directory")
    capsys.readouterr()
    assert _train(mount_point / "run", "train.steps=6") == 2
    line = _one_clear_error(capsys)
    assert f"cannot write to the workdir {mount_point / 'run'}: {reason}; choose a writable --workdir" in line
    assert _snapshot(mount_point / "run") == before
    assert _train(mount_point / "fresh", "train.steps=6") == 2  # a workdir that cannot even be created


def test_full_disk_exits_1_names_the_intact_checkpoint_and_the_same_command_resumes(trained, mount_point, capsys,
                                                                                  monkeypatch):
    size_kib = sum(p.stat().st_size for p in trained.rglob("*") if p.is_file()) // 1024
    if _mount_tmpfs(mount_point, f"size={size_kib + 900}k"):  # room for less than one more checkpoint
        simulated = False
    else:  # no tmpfs: the second save fails as a full disk would (errno ENOSPC)
        simulated = True
        real_save = ckpt.save

        def save(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(mount_point))

        monkeypatch.setattr(ckpt, "save", save)
    workdir = mount_point / "run"
    shutil.copytree(trained, workdir)
    before = _snapshot(workdir)
    capsys.readouterr()
    assert _train(workdir, "train.steps=9") == 1
    line = _one_clear_error(capsys)
    assert "CheckpointWriteError: writing to the workdir" in line and "the disk is full (No space left on device)" in line
    assert "the newest complete checkpoint (step 3) is intact" in line
    assert {k: v for k, v in _snapshot(workdir).items() if k.startswith("checkpoints/3/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/3/")}
    assert ckpt.latest_step(workdir) == 3
    if simulated:
        monkeypatch.setattr(ckpt, "save", real_save)
    else:
        _remount(mount_point, "size=16m")
    assert _train(workdir, "train.steps=9") == 0
    assert ckpt.latest_step(workdir) == 9


def _cli(workdir: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`jaxllm train` in its own process: a hang in interpreter shutdown (Orbax threads) shows only there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXLLM_DATA_CACHE": "off"}
    return subprocess.run([sys.executable, "-m", "jaxllm.cli", "train", str(RECIPE), "--workdir", str(workdir),
                           *FAST, *overrides], capture_output=True, text=True, timeout=timeout, env=env)


@contextlib.contextmanager
def _read_only_checkpoints(trained: Path, tmp_path: Path):
    """A copy of the `trained` run whose checkpoints/ is a read-only tmpfs mount (root ignores permission
    bits, so a mount is the only way to make it read-only here); skips where mounting is not allowed."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    if not _mount_tmpfs(workdir / "checkpoints", "size=8m"):
        pytest.skip("needs root and mount to make a read-only directory (root ignores permission bits)")
    try:
        shutil.copytree(trained / "checkpoints", workdir / "checkpoints", dirs_exist_ok=True)
        _remount(workdir / "checkpoints", "ro")
        yield workdir
    finally:
        subprocess.run(["umount", "-l", str(workdir / "checkpoints")], check=False)


def test_read_only_checkpoints_dir_in_a_writable_workdir_exits_2_at_once(trained, tmp_path):
    with _read_only_checkpoints(trained, tmp_path) as workdir:
        began = time.monotonic()
        result = _cli(workdir, "train.steps=6")
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"cannot write to checkpoints in the workdir {workdir / 'checkpoints'}: Read-only file system" \
            in result.stderr and "Traceback" not in result.stderr
        assert not (workdir / "metrics.jsonl").read_text().count('"step": 4'), "it trained before failing"
        print(f"read-only checkpoints/: exit 2 after {time.monotonic() - began:.1f}s")


PROBE_MISSED = ("import sys; from jaxllm import checkpoint; checkpoint.check_writable = lambda workdir: None; "
                "from jaxllm.cli import main; sys.exit(main(sys.argv[1:]))")


def test_a_save_failing_mid_run_exits_promptly_without_hanging_in_shutdown(trained, tmp_path):
    """With the start-up probe disabled (as if it missed a failure), the first save into a read-only
    checkpoints/ fails mid-run: the failure path shuts the checkpoint manager down, so the process exits
    with the clean error at once (it used to hang ~4.5 min in Orbax's threads at interpreter shutdown)."""
    with _read_only_checkpoints(trained, tmp_path) as workdir:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXLLM_DATA_CACHE": "off"}
        began = time.monotonic()
        result = subprocess.run([sys.executable, "-c", PROBE_MISSED, "train", str(RECIPE), "--workdir",
                                 str(workdir), *FAST, "train.steps=9"], capture_output=True, text=True, timeout=150,
                                env=env)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "the file system is read-only" in result.stderr and "step 3) is intact" in result.stderr, \
            result.stderr[-2000:]
        print(f"failed save: exit 1 after {time.monotonic() - began:.1f}s")


# ----------------------------------------------------------------------------------------------
# Fuzzing the parsers


KEYS = ["text", "messages", "prompt", "response", "chosen", "rejected", "completion", "label", "rating", "reference",
        "role", "content"]
LEAVES = (st.none() | st.booleans() | st.integers(-2, 6) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=40))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4), max_leaves=10)
TEXT = st.text(max_size=80)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT})
CONVERSATION = st.lists(MESSAGE, min_size=1, max_size=4)
# Well-formed records of each stage (see jaxllm/data/examples.py) ...
VALID = {
    "pretrain": st.fixed_dictionaries({"text": TEXT}),
    "sft": st.fixed_dictionaries({"messages": CONVERSATION}) | st.fixed_dictionaries({"prompt": TEXT, "response": TEXT}),
    "dpo": st.fixed_dictionaries({"prompt": TEXT | CONVERSATION, "chosen": TEXT, "rejected": TEXT}),
    "kto": st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT,
                                  "label": st.booleans() | st.sampled_from([0, 1, -1])})
    | st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT, "rating": st.integers(0, 5) | st.floats()}),
    "rl": st.fixed_dictionaries({"prompt": TEXT}, optional={"reference": TEXT | st.none()})
    | st.fixed_dictionaries({"messages": CONVERSATION}),
}
VALID["reward"] = VALID["dpo"]


def _mutated(record: dict, data) -> dict:
    """... with one field deleted, replaced by any JSON value, or one unknown field added (or none of these)."""
    record = dict(record)
    action = data.draw(st.sampled_from(["keep", "delete", "replace", "add"]))
    if action != "keep" and record:
        key = data.draw(st.sampled_from(sorted(record)))
        if action == "delete":
            del record[key]
        elif action == "replace":
            record[key] = data.draw(VALUES)
        else:
            record[data.draw(st.sampled_from(KEYS))] = data.draw(VALUES)
    return record


def _lines(stage: str, data) -> list:
    """A mix of well-formed, mutated and arbitrary JSON lines for `stage`."""
    count = data.draw(st.integers(0, 6))
    kinds = data.draw(st.lists(st.sampled_from(["valid", "mutated", "any"]), min_size=count, max_size=count))
    lines = []
    for kind in kinds:
        if kind == "any":
            lines.append(data.draw(VALUES | st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5)))
        else:
            record = data.draw(VALID[stage])
            lines.append(record if kind == "valid" else _mutated(record, data))
    return lines
_FILES = itertools.count()


def _fuzz_config(stage: str, on_bad_record: str):
    return load_config(overrides=[f"train.stage={stage}", "train.batch_size=2", "model.vocab_size=512",
                                  "model.max_seq_len=48", "data.seq_len=48", f"data.on_bad_record={on_bad_record}"])


def _check_rows(rows, stage: str, records: int) -> None:
    batch = rows.batch(np.arange(rows.num_rows))
    for key, value in batch.items():
        if key.endswith("tokens"):
            assert value.shape == (rows.num_rows, 48) and value.min() >= 0 and value.max() < TOKENIZER.vocab_size
        if key.endswith("loss_mask"):
            assert set(np.unique(value)) <= {0.0, 1.0}
        if key.endswith("example_ids"):
            assert value.min() >= -1 and value.max() < records
    if stage == "kto":
        assert set(np.unique(batch["label"])) <= {-1.0, 1.0}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "reward", "kto", "rl"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), on_bad_record=st.sampled_from(["fail", "skip"]))
def test_any_json_gives_rows_or_a_data_error_for_every_stage(stage, data, on_bad_record, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", "off")
    lines = _lines(stage, data)
    path = tmp_path / f"fuzz{next(_FILES)}.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    config = _fuzz_config(stage, on_bad_record)
    try:
        if stage == "rl":
            prompts = load_prompts(f"jsonl:{path}", TOKENIZER, on_bad_record=on_bad_record, seq_len=48)
            assert prompts and all(len(p["prompt_ids"]) < 48 for p in prompts)
        else:
            rows = stages.build_rows(config, TOKENIZER, stage=stage, source=f"jsonl:{path}")
            _check_rows(rows, stage, len(lines))
    except DataError as error:
        assert str(error)  # a message for the user


def test_a_lone_surrogate_escape_is_a_data_error_naming_the_line(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", "off")
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken \\ud800 half of a pair"}\n')
    with pytest.raises(DataError, match="surrogate.jsonl:2"):
        stages.build_rows(_fuzz_config("pretrain", "fail"), TOKENIZER, stage="pretrain", source=f"jsonl:{path}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), kind=st.sampled_from(["jsonl", "text"]), on_bad=st.sampled_from(["fail", "skip"]))
def test_any_bytes_give_records_or_a_data_error(data, kind, on_bad, tmp_path):
    path = tmp_path / f"bytes{next(_FILES)}.{kind}"
    path.write_bytes(data)
    skipped = []

    def handler(reason, message):
        if on_bad == "fail":
            raise DataError(message, reason)
        skipped.append(reason)

    try:
        records = read_records(f"{kind}:{path}", on_bad=handler)
    except DataError as error:
        assert str(error)
        return
    assert records and all(isinstance(r.data, dict) for r in records)
    assert [r.index for r in records] == sorted(r.index for r in records)
