"""Kill-anywhere harness: SIGKILL (and SIGTERM) `jaxllm train` at random moments, restart it, and
check that nothing was lost.

    python tools/kill_harness.py --rounds 8 --cycles 10 --steps 30 --seed 1   # a soak run, prints a JSON summary
    python tools/kill_harness.py --modes checkpoint,sigterm --root runs/kh2     # only kills mid-save, and SIGTERM
    python tools/kill_harness.py --multihost-sigterm 2 ...                      # + SIGTERM to 1 of 2 processes

One reference run trains to the end without interruption. Then, `--rounds` times, a run in a fresh workdir
is started up to `--cycles` times (until it reaches the end), each time stopped in one of these ways
(`--modes`, picked at random per cycle, or in turn with `--round-robin`):

- `time`:       SIGKILL after a random delay (start-up, compilation, a step, a save, anything);
- `step`:       SIGKILL right after metrics.jsonl shows a random step;
- `checkpoint`: SIGKILL as soon as an Orbax temporary directory (`<step>.orbax-checkpoint-tmp*`)
                appears, plus a random 0-40 ms, i.e. while an async checkpoint is being written or renamed;
- `sigterm`:    SIGTERM (what schedulers send on preemption) at a random step: the run must save and exit 0
                within `HarnessConfig.sigterm_timeout` seconds, its last checkpoint being the step it had reached.

After every stop the checkpoint directory is audited: the newest directory named `<step>` must be a complete,
committed checkpoint whose saved data-iterator position equals its step (an older one may be half deleted
by the rotation of old checkpoints, which resume never picks; that is noted), and the next start must resume
from the newest of them (its "resumed ... at step N" line is checked). Then the run is finished and
compared with the reference: every train record in metrics.jsonl, including the steps that were redone
after a kill, must have the reference's loss and gradient norm bit for bit (a step redone on other data
would differ), every step must be present, and the final parameters and optimizer state must be equal.

Used by tests/test_reliability.py (a few cycles) and for longer soak runs from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jaxllm.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
MODES = ("time", "step", "checkpoint", "sigterm")
TMP_MARKER = ".orbax-checkpoint-tmp"
# A tiny run: the micro model on the embedded data, one device, a checkpoint every few steps.
DEFAULT_OVERRIDES = ("model.preset=micro", "mesh.num_devices=1", "train.batch_size=8", "train.progress=false",
                     "train.log_every=1", "train.eval_batches=1", "train.eval_every=0", "data.seq_len=64",
                     "train.tensorboard=false")


@dataclasses.dataclass
class HarnessConfig:
    recipe: Path = ROOT / "configs" / "pretrain_tiny.yaml"
    steps: int = 30
    checkpoint_every: int = 3
    keep_checkpoints: int = 2
    extra_overrides: tuple[str, ...] = ()
    cycles: int = 5  # stops per round (a round ends early when the run reaches the end)
    rounds: int = 1  # killed-and-resumed runs, each in a fresh workdir, each compared with the reference
    modes: tuple[str, ...] = MODES
    round_robin: bool = False  # cycle through `modes` in order instead of drawing each at random
    seed: int = 0
    sigterm_timeout: float = 120.0
    run_timeout: float = 600.0
    compile_cache: Path | None = None

    def overrides(self) -> list[str]:
        return [*DEFAULT_OVERRIDES, f"train.steps={self.steps}", f"train.checkpoint_every={self.checkpoint_every}",
                f"train.keep_checkpoints={self.keep_checkpoints}", *self.extra_overrides]


@dataclasses.dataclass
class Cycle:
    index: int
    mode: str
    outcome: str  # "killed" | "sigterm" | "finished before the kill"
    returncode: int | None
    seconds: float  # process lifetime
    resumed_from: int | None  # what the process said it resumed from
    expected_resume: int | None  # the newest complete checkpoint before it started
    last_step_logged: int | None  # the last train step in metrics.jsonl when it stopped
    checkpoints_after: list[int]
    temporary_dirs_after: list[str]
    kill_detail: str = ""
    sigterm_seconds: float | None = None  # signal -> exit
    notes: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Running jaxllm train


def environment(config: HarnessConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAXLLM_NO_REEXEC="1", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.setdefault("PYTHONPATH", str(ROOT))
    if config.compile_cache is not None:  # the persistent compilation cache: later starts skip compiling
        env.update(JAX_COMPILATION_CACHE_DIR=str(config.compile_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def train_command(config: HarnessConfig, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "jaxllm.cli", "train", str(config.recipe), "--workdir", str(workdir),
            *config.overrides()]


def start(config: HarnessConfig, workdir: Path, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("wb")
    process = subprocess.Popen(train_command(config, workdir), stdout=handle, stderr=subprocess.STDOUT,
                               env=environment(config), cwd=ROOT, start_new_session=True)
    handle.close()
    return process


def run_to_completion(config: HarnessConfig, workdir: Path, log_path: Path) -> tuple[int, float]:
    began = time.monotonic()
    process = start(config, workdir, log_path)
    try:
        returncode = process.wait(timeout=config.run_timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"jaxllm train did not finish within {config.run_timeout} s; see {log_path}") from None
    return returncode, time.monotonic() - began


# ----------------------------------------------------------------------------------------------
# Reading a workdir


def train_records(workdir: Path) -> list[dict[str, Any]]:
    """Every train record of metrics.jsonl in file order (redone steps appear more than once)."""
    return read_metrics(workdir, "train")


def last_step_logged(workdir: Path) -> int | None:
    records = train_records(workdir)
    return records[-1]["step"] if records else None


def _metrics_size(workdir: Path) -> int:
    try:
        return (workdir / "metrics.jsonl").stat().st_size
    except FileNotFoundError:
        return 0


def _steps_logged_since(workdir: Path, offset: int) -> list[int]:
    """Train steps this process logged (records after byte `offset` of metrics.jsonl)."""
    try:
        with (workdir / "metrics.jsonl").open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return []
    steps = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") == "train":
            steps.append(record["step"])
    return steps


def trajectory(workdir: Path) -> dict[int, dict[str, float]]:
    """step -> the LAST train record of that step (steps after the last checkpoint are redone)."""
    return {r["step"]: r for r in train_records(workdir)}


def audit_checkpoints(workdir: Path) -> tuple[list[int], list[str], list[str]]:
    """(complete steps, temporary directory names, problems). A directory named `<step>` is complete when
    Orbax committed it (commit_success.txt, checkpoint metadata) and it holds state, data and meta, whose
    data-iterator position is the step itself. An incomplete one older than the newest complete one is a
    checkpoint that rotation (max_to_keep) was deleting when the process died: resume never picks it, so it
    is reported as "note: ..." rather than as a problem."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return [], [], []
    complete, temporary, problems = [], [], []
    for entry in sorted(directory.iterdir()):
        if TMP_MARKER in entry.name:
            temporary.append(entry.name)
            continue
        if not (entry.is_dir() and entry.name.isdigit()):
            continue
        step = int(entry.name)
        missing = [name for name in ("commit_success.txt", "_CHECKPOINT_METADATA", "state", "data", "meta")
                   if not (entry / name).exists()]
        if missing:
            problems.append(f"checkpoints/{step} is visible but incomplete (missing {', '.join(missing)})")
            continue
        try:
            data_state = json.loads((entry / "data" / "metadata").read_text())
        except (OSError, ValueError) as error:
            problems.append(f"checkpoints/{step}/data is unreadable: {error}")
            continue
        if data_state.get("step") != step:
            problems.append(f"checkpoints/{step} holds data-iterator step {data_state.get('step')}: a resume would "
                            "train a step on other data")
            continue
        complete.append(step)
    newest = max(complete, default=-1)
    problems = [f"note: {p} (older than {newest}: a rotation interrupted by the kill; resume takes the newest)"
                if "visible but incomplete" in p and int(p.split("/")[1].split()[0]) < newest else p for p in problems]
    return sorted(complete), temporary, problems


def load_state_arrays(workdir: Path, step: int) -> dict[str, Any]:
    """The saved train state (params, optimizer state, step, rng) of a checkpoint as numpy arrays."""
    import numpy as np
    import orbax.checkpoint as ocp
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    import jax

    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    flat = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in key_path)
        flat[key] = np.asarray(leaf)
    return flat


def compare_runs(reference: Path, resumed: Path, steps: int) -> list[str]:
    """Problems (empty = identical): losses of every record, missing steps, final state bit for bit."""
    import numpy as np

    problems = []
    expected = trajectory(reference)
    if sorted(expected) != list(range(1, steps + 1)):
        problems.append(f"the reference run logged steps {sorted(expected)}, not 1..{steps}")
    seen = set()
    for record in train_records(resumed):
        step = record["step"]
        seen.add(step)
        want = expected.get(step)
        if want is None:
            problems.append(f"step {step} is not in the reference run")
            continue
        for key in ("loss", "grad_norm", "skipped", "denominator"):
            if record.get(key) != want.get(key):
                problems.append(f"step {step}: {key} {record.get(key)!r} != reference {want.get(key)!r} "
                                "(a step trained on other data or from other params)")
    missing = sorted(set(expected) - seen)
    if missing:
        problems.append(f"steps never logged by the killed-and-resumed run: {missing}")
    ref_steps, _, ref_problems = audit_checkpoints(reference)
    got_steps, _, got_problems = audit_checkpoints(resumed)
    problems += [f"reference: {p}" for p in ref_problems] + [p for p in got_problems if not p.startswith("note: ")]
    if not ref_steps or not got_steps or ref_steps[-1] != steps or got_steps[-1] != steps:
        problems.append(f"final checkpoints: reference {ref_steps}, resumed {got_steps}; both should end at {steps}")
        return problems
    want_state, got_state = load_state_arrays(reference, steps), load_state_arrays(resumed, steps)
    if sorted(want_state) != sorted(got_state):
        problems.append("the final states have different leaves")
    for key in sorted(set(want_state) & set(got_state)):
        if want_state[key].shape != got_state[key].shape or not np.array_equal(want_state[key], got_state[key]):
            difference = np.max(np.abs(want_state[key].astype(np.float64) - got_state[key].astype(np.float64)))
            problems.append(f"final state {key} differs (max abs difference {difference:.3g})")
    for name in ("summary.json",):
        a, b = reference / name, resumed / name
        if a.exists() and b.exists():
            if json.loads(a.read_text())["eval"] != json.loads(b.read_text())["eval"]:
                problems.append("the final eval metrics differ")
        else:
            problems.append(f"{name} is missing")
    return problems


_RESUMED = re.compile(r"resumed \S+ at step (\d+)")


def _resumed_from(log_path: Path) -> int | None:
    match = _RESUMED.search(log_path.read_text(errors="replace")) if log_path.exists() else None
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------
# One stop-and-restart cycle


def _wait_for(process: subprocess.Popen, condition, timeout: float, poll: float = 0.001) -> bool:
    """Polls `condition()` until it holds (True) or the process exits / the time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(poll)
    return False


def _temporary_dirs(workdir: Path) -> set[tuple[str, int]]:
    """(name, inode) of the Orbax temporary directories now in the checkpoints directory."""
    found = set()
    try:
        with os.scandir(workdir / "checkpoints") as entries:
            for entry in entries:
                if TMP_MARKER in entry.name:
                    try:
                        found.add((entry.name, entry.inode()))
                    except OSError:
                        continue
    except OSError:
        pass
    return found


def stop_once(config: HarnessConfig, workdir: Path, log_path: Path, mode: str, rng: random.Random,
              index: int, typical_seconds: float) -> Cycle:
    """Starts the run, stops it the way `mode` says, audits the workdir. Raises AssertionError on a loss."""
    before, _, _ = audit_checkpoints(workdir)
    expected_resume = before[-1] if before else None
    start_step = expected_resume or 0
    offset = _metrics_size(workdir)
    leftovers = _temporary_dirs(workdir)  # from an earlier kill: not a save of this process
    began = time.monotonic()

    def logged_step_at_least(step: int):
        return lambda: max(_steps_logged_since(workdir, offset), default=0) >= step

    process = start(config, workdir, log_path)
    detail, sigterm_seconds = "", None
    # A step a little past the resume point (before the end), so stops come often and everywhere.
    target = min(config.steps - 1, start_step + rng.randint(1, 2 * config.checkpoint_every))
    if mode == "time":
        delay = rng.uniform(0.0, typical_seconds)
        detail = f"after {delay:.2f} s"
        _wait_for(process, lambda: time.monotonic() - began >= delay, delay + 1, poll=0.01)
        reached = process.poll() is None
    elif mode == "step":
        detail = f"after step {target} was logged"
        reached = _wait_for(process, logged_step_at_least(target), config.run_timeout, 0.005)
    elif mode == "checkpoint":
        saves_to_skip = rng.randint(0, min(1, max(0, (config.steps - start_step) // config.checkpoint_every - 1)))
        extra = rng.uniform(0.0, 0.04)
        seen: list[str] = []

        def tmp_dir_of_wanted_save() -> bool:
            new = sorted(_temporary_dirs(workdir) - leftovers)
            for name, inode in new:
                if name not in seen:
                    seen.append(name)
            return bool(new) and len(seen) > saves_to_skip

        reached = _wait_for(process, tmp_dir_of_wanted_save, config.run_timeout, poll=0.001)
        if reached:
            time.sleep(extra)
        detail = f"{extra * 1000:.0f} ms after {seen[-1] if seen else 'no temporary directory'} appeared"
    elif mode == "sigterm":
        detail = f"SIGTERM after step {target} was logged"
        reached = _wait_for(process, logged_step_at_least(target), config.run_timeout, 0.005)
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")

    outcome = "finished before the kill"
    if reached and process.poll() is None:
        if mode == "sigterm":
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=config.sigterm_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(f"cycle {index}: no exit within {config.sigterm_timeout} s of SIGTERM; "
                                     f"see {log_path}") from None
            sigterm_seconds = time.monotonic() - signalled
            outcome = "sigterm"
        else:
            process.kill()  # SIGKILL: no handler, no cleanup
            outcome = "killed"
    returncode = process.wait(timeout=config.run_timeout)
    seconds = time.monotonic() - began
    complete, temporary, problems = audit_checkpoints(workdir)
    notes = [p for p in problems if p.startswith("note: ")]
    problems = [p for p in problems if not p.startswith("note: ")]
    cycle = Cycle(index, mode, outcome, returncode, round(seconds, 2), _resumed_from(log_path), expected_resume,
                  last_step_logged(workdir), complete, temporary, detail,
                  None if sigterm_seconds is None else round(sigterm_seconds, 2), notes)
    if problems:
        raise AssertionError(f"cycle {index} ({mode}, {detail}): {'; '.join(problems)}")
    if cycle.resumed_from is not None and cycle.resumed_from != expected_resume:
        raise AssertionError(f"cycle {index}: resumed from step {cycle.resumed_from} but the newest complete "
                             f"checkpoint was {expected_resume}")
    if expected_resume is not None and cycle.resumed_from is None and cycle.last_step_logged and \
            cycle.last_step_logged > expected_resume and outcome != "killed":
        raise AssertionError(f"cycle {index}: trained past step {expected_resume} without saying it resumed")
    if outcome == "sigterm":
        if returncode != 0:
            raise AssertionError(f"cycle {index}: SIGTERM gave exit code {returncode}, not 0; see {log_path}")
        if not complete or complete[-1] != cycle.last_step_logged:
            raise AssertionError(f"cycle {index}: after SIGTERM the newest checkpoint is {complete[-1:]} but the run "
                                 f"had logged step {cycle.last_step_logged}: that progress would be lost")
    if outcome == "finished before the kill" and returncode != 0:
        raise AssertionError(f"cycle {index}: the run failed with exit code {returncode}; see {log_path}")
    return cycle


def run(config: HarnessConfig, root: Path, log=print) -> dict[str, Any]:
    """The reference run; then `config.rounds` times: up to `config.cycles` stops and restarts in a fresh
    workdir, the last run to the end, the comparison with the reference."""
    rng = random.Random(config.seed)
    root.mkdir(parents=True, exist_ok=True)
    reference, logs = root / "reference", root / "logs"
    returncode, reference_seconds = run_to_completion(config, reference, logs / "reference.log")
    if returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {returncode}); see {logs / 'reference.log'}")
    log(f"reference run: {reference_seconds:.1f} s")
    cycles, problems, records, final_resume = [], [], [], []
    for round_index in range(config.rounds):
        resumed = root / ("resumed" if config.rounds == 1 else f"resumed{round_index}")
        for index in range(config.cycles):
            mode = config.modes[index % len(config.modes)] if config.round_robin else rng.choice(config.modes)
            number = len(cycles)
            cycle = stop_once(config, resumed, logs / f"cycle{number:03d}.log", mode, rng, number, reference_seconds)
            cycles.append(cycle)
            log(f"cycle {number}: {mode:<10} {cycle.outcome:<8} {cycle.kill_detail:<40} rc={cycle.returncode} "
                f"resumed_from={cycle.resumed_from} last_step={cycle.last_step_logged} "
                f"checkpoints={cycle.checkpoints_after} tmp={cycle.temporary_dirs_after}")
            if cycle.outcome == "finished before the kill" or (cycle.checkpoints_after or [0])[-1] == config.steps:
                break
        final_log = logs / f"final{round_index}.log"
        returncode, _ = run_to_completion(config, resumed, final_log)
        if returncode != 0:
            raise RuntimeError(f"the final resumed run failed (exit {returncode}); see {final_log}")
        final_resume.append(_resumed_from(final_log))
        problems += [f"round {round_index}: {p}" for p in compare_runs(reference, resumed, config.steps)]
        records += train_records(resumed)
        log(f"round {round_index}: {len(problems)} problems so far")
    return {
        "rounds": config.rounds,
        "cycles": len(cycles),
        "stops": {outcome: sum(c.outcome == outcome for c in cycles) for outcome in {c.outcome for c in cycles}},
        "modes": {mode: sum(c.mode == mode for c in cycles) for mode in config.modes},
        "killed_during_checkpoint_write": sum(c.mode == "checkpoint" and c.outcome == "killed" for c in cycles),
        "leftover_temporary_dirs_seen": sum(bool(c.temporary_dirs_after) for c in cycles),
        "sigterm_exit_seconds": [c.sigterm_seconds for c in cycles if c.sigterm_seconds is not None],
        "final_resumed_from": final_resume,
        "train_records": len(records),
        "redone_steps": len(records) - config.rounds * config.steps,
        "problems": problems,
        "details": [dataclasses.asdict(c) for c in cycles],
    }


# ----------------------------------------------------------------------------------------------
# Preemption of a multi-process run


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_processes(config: HarnessConfig, workdir: Path, logs: Path, processes: int, tag: str,
                     extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """`processes` local JAX processes (one CPU device each) joined by jax.distributed into one run."""
    port = _free_port()
    command = [*train_command(config, workdir), "mesh.num_devices=0", *extra]  # every device of every process
    started = []
    for index in range(processes):
        env = environment(config)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(index), XLA_FLAGS="--xla_force_host_platform_device_count=1")
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{tag}.process{index}.log").open("wb") as handle:
            started.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                            start_new_session=True))
    return started


def multihost_sigterm(config: HarnessConfig, root: Path, processes: int = 2, signalled: int = 1,
                      after_step: int = 4) -> dict[str, Any]:
    """SIGTERM to ONE process of a multi-process run once step `after_step` is logged: every process must
    stop at the same step (JAX's preemption sync point), save it together and exit 0; a restart of all
    processes resumes from that step and finishes. Returns what happened."""
    workdir, logs = root / "multihost", root / "logs"
    running = _start_processes(config, workdir, logs, processes, "preempted")
    try:
        reached = _wait_for(running[0], lambda: (last_step_logged(workdir) or 0) >= after_step, config.run_timeout,
                            0.01)
        if not reached:
            raise AssertionError(f"the {processes}-process run ended before step {after_step}; see {logs}")
        signalled_at = time.monotonic()
        running[signalled].send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=config.sigterm_timeout) for process in running]
        seconds = time.monotonic() - signalled_at
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    complete, _, problems = audit_checkpoints(workdir)
    stopped_at = last_step_logged(workdir)
    restarted = _start_processes(config, workdir, logs, processes, "restarted")
    final_codes = [process.wait(timeout=config.run_timeout) for process in restarted]
    resumed = [_resumed_from(logs / f"restarted.process{i}.log") for i in range(processes)]
    return {"exit_codes": codes, "sigterm_exit_seconds": round(seconds, 2), "stopped_at": stopped_at,
            "checkpoints": complete, "problems": problems, "restart_exit_codes": final_codes,
            "resumed_from": resumed, "final_checkpoints": audit_checkpoints(workdir)[0],
            "steps": sorted(trajectory(workdir))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/kill_harness"), help="where the two workdirs go")
    parser.add_argument("--cycles", type=int, default=10, help="stops per round")
    parser.add_argument("--rounds", type=int, default=1, help="killed-and-resumed runs, each compared")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--round-robin", action="store_true", help="use the modes in turn, not at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", type=Path, default=HarnessConfig.recipe)
    parser.add_argument("--compile-cache", type=Path, default=ROOT / ".jax_cache",
                        help="persistent compilation cache shared by the runs ('' to disable)")
    parser.add_argument("--multihost-sigterm", type=int, default=0, metavar="N",
                        help="also run N local processes as one jax.distributed run and SIGTERM one of them")
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for both runs")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if args.root.exists() and any(args.root.iterdir()):
        parser.error(f"--root {args.root} is not empty; give a fresh directory")
    config = HarnessConfig(recipe=args.recipe, steps=args.steps, checkpoint_every=args.checkpoint_every,
                           keep_checkpoints=args.keep_checkpoints, extra_overrides=tuple(args.overrides),
                           cycles=args.cycles, rounds=args.rounds, modes=modes, round_robin=args.round_robin, seed=args.seed,
                           compile_cache=args.compile_cache if str(args.compile_cache) else None)
    summary = run(config, args.root, log=lambda line: print(line, file=sys.stderr))
    if args.multihost_sigterm:
        summary["multihost_sigterm"] = multihost_sigterm(config, args.root, args.multihost_sigterm)
    details = summary.pop("details")
    (args.root / "summary.json").write_text(json.dumps({**summary, "details": details}, indent=1))
    print(json.dumps(summary, indent=1))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
