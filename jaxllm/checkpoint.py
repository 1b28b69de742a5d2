"""Orbax checkpoints: the train state, the data-iterator position and the resolved config, together.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Orbax writes each step into a temporary
directory (`<step>.orbax-checkpoint-tmp*`) and renames it only once complete, so an interrupted save is
never picked up by resume; the manager deletes such leftovers when it starts. Restoring takes target
shardings, so a checkpoint written on one mesh restores onto another. The meta item records the
tokenizer's fingerprint, so resuming or initialising with another tokenizer is an error.
"""

from __future__ import annotations

import contextlib
import logging

import errno
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxllm.errors import CheckpointError, CheckpointWriteError, WorkdirError

CHECKPOINT_DIR = "checkpoints"


# Errors that only a write can cause (a permission error could come from reading an init_from checkpoint).
_WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only"}


# What a run writes in its workdir: these directories (when they exist) get a probe file, these files (when
# they exist) are opened for appending, before step 1.
RUN_DIRECTORIES = (CHECKPOINT_DIR, "best", "tensorboard")
RUN_FILES = ("metrics.jsonl", "skipped_batches.jsonl", "config.yaml", "summary.json")


def check_writable(workdir: Path) -> None:
    """Creates the workdir and probes every directory and file of it that the run writes, so an unwritable
    or full disk is one clear error before any work (WorkdirError: read-only/permissions; CheckpointWriteError:
    full). A read-only `checkpoints/` in a writable workdir is caught here, not at the first save."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(workdir, workdir, error) from None
    for directory in [workdir] + [workdir / name for name in RUN_DIRECTORIES if (workdir / name).is_dir()]:
        _probe_directory(directory, workdir)
    for name in RUN_FILES:
        path = workdir / name
        if path.is_file():
            try:
                with path.open("ab"):
                    pass
            except OSError as error:
                raise _unwritable(path, workdir, error) from None


def _probe_directory(directory: Path, workdir: Path) -> None:
    probe = directory / f".jaxllm-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as error:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise _unwritable(directory, workdir, error) from None


def _unwritable(path: Path, workdir: Path, error: OSError) -> Exception:
    what = "the workdir" if path == workdir else f"{path.name} in the workdir"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(f"cannot write to {what} {path}: {_WRITE_ERRNOS[error.errno]} "
                                    f"({error.strerror}); free some space or choose another --workdir")
    return WorkdirError(f"cannot write to {what} {path}: {error.strerror or error}; choose a writable --workdir "
                        "(or fix its permissions or mount)")


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how TensorStore (Orbax's array writer) reports errno


def _write_errno(error: BaseException | None) -> int | None:
    """The errno of a failed write anywhere in the exception chain (OSError, or TensorStore's ValueError
    'RESOURCE_EXHAUSTED ... [os_error_code=28]'), if it is one of _WRITE_ERRNOS."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            return error.errno
        match = _OS_ERROR_CODE.search(str(error)) if isinstance(error, (ValueError, RuntimeError)) else None
        if match and int(match.group(1)) in _WRITE_ERRNOS:
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def write_failure(error: BaseException, workdir: str | Path) -> Exception | None:
    """A clear error for a failed write to the workdir during training (ENOSPC, EROFS, ...), naming what
    is safe: the newest complete checkpoint, which the failure did not touch. None for other errors."""
    if isinstance(error, (CheckpointError, CheckpointWriteError)):
        return None
    code = _write_errno(error)
    if code is None:
        return None
    newest = latest_step(workdir)
    kept = (f"the newest complete checkpoint (step {newest}) is intact and the same command resumes from it"
            if newest is not None else "no checkpoint had been completed yet")
    return CheckpointWriteError(f"writing to the workdir {Path(workdir).absolute()} failed: {_WRITE_ERRNOS[code]} "
                                f"({os.strerror(code)}); {kept}. Free space (or remount it writable) and run it again")


def check_tokenizer(meta: dict[str, Any], tokenizer: Any, where: str | Path) -> None:
    """The tokenizer must be the one the checkpoint was trained with (same fingerprint), else every token
    id would mean another piece. Checkpoints without a recorded fingerprint are accepted."""
    saved = (meta or {}).get("tokenizer_fingerprint")
    current = getattr(tokenizer, "fingerprint", None)
    if saved and current and saved != current:
        trained = ((meta.get("config") or {}).get("data") or {}).get("tokenizer", "?")
        raise CheckpointError(f"the checkpoint {where} was trained with another tokenizer (data.tokenizer={trained}, "
                              f"fingerprint {saved}) than this run's {getattr(tokenizer, 'name', '')} (fingerprint "
                              f"{current}); token ids would mean other pieces. Use the checkpoint's tokenizer "
                              f"(data.tokenizer={trained})")


def checkpoint_dir(path: str | Path) -> Path:
    """A workdir or a checkpoints directory -> the checkpoints directory."""
    path = Path(path).absolute()
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR
    return path


def make_manager(workdir: str | Path, keep: int = 2, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=create, cleanup_tmp_directories=create)
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("state", "data", "meta"))


def array_digests(tree: Any) -> dict[str, str]:
    """{"path/of/leaf": "crc32:<hex>"} of the bytes of every array leaf, or {} when some leaf is not fully
    addressable by this process (several hosts: each sees only its shards; no digests are written then)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable for _, leaf in leaves):
        return {}
    digests = {}
    for path, leaf in leaves:
        host = np.ascontiguousarray(jax.device_get(leaf)).reshape(-1)
        digests[_path_key(path)] = f"crc32:{zlib.crc32(host.view(np.uint8)):08x}"
    return digests


def check_digests(saved: dict[str, str] | None, tree: Any, where: str, directory: Path, prefix: str = "") -> None:
    """Raises CheckpointError naming the checkpoint and the arrays whose bytes differ from the digests
    written with it (the checkpoint's files were damaged after the save). Nothing to check without digests."""
    if not saved:
        return
    actual = array_digests(tree)
    damaged = [key for key, digest in actual.items() if prefix + key in saved and saved[prefix + key] != digest]
    if damaged:
        steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())
        older = [s for s in steps if s < int(Path(where).name)] if Path(where).name.isdigit() else []
        instead = f"to resume from step {older[-1]}" if older else "to start again from step 0"
        raise CheckpointError(f"checkpoint {where} is damaged: {len(damaged)} array(s) differ from the digests written "
                              f"with it ({', '.join(damaged[:5])}{', ...' if len(damaged) > 5 else ''}). Move it out "
                              f"of {directory} {instead}")


def _path_key(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def shut_down(manager: ocp.CheckpointManager | None) -> None:
    """Closes the manager after a failure and cancels Orbax's background save threads that still wait for a
    signal which will never come (e.g. 'the directory was created' after its creation failed): they are
    non-daemon threads waiting up to 300 s, which would keep a failing process alive at interpreter exit."""
    import threading

    try:
        if manager is not None:
            manager.close()
    except Exception:  # noqa: BLE001 - a failed save re-raises on close; the caller is already failing
        pass
    try:
        from orbax.checkpoint._src.futures import future as orbax_future
    except ImportError:  # another Orbax layout: nothing known to cancel
        return
    thread_class = getattr(orbax_future, "_SignalingThread", None)
    if thread_class is None:
        return
    for thread in threading.enumerate():
        if isinstance(thread, thread_class) and thread.is_alive():
            thread.cancel()
            try:  # wake it: it checks the cancel flag once its awaited signals are set
                orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
            except Exception:  # noqa: BLE001
                pass


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any],
         meta: dict[str, Any], force: bool = False) -> bool:
    """Starts an (async) save of everything needed to resume at `step`. The meta item gets a crc32 digest of
    every array (`array_digests`), checked on every restore."""
    meta = {**meta, "array_digests": array_digests(state)}
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta),
    ), force=force)


def _restore_args(abstract_tree: Any) -> Any:
    return ocp.checkpoint_utils.construct_restore_args(abstract_tree)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta) at `step` onto the shardings in `abstract_state`
    (a tree of ShapeDtypeStructs with `.sharding`)."""
    directory = Path(manager.directory)
    missing = [item for item in ("state", "data", "meta") if not (directory / str(step) / item).is_dir()]
    if missing:
        raise CheckpointError(f"checkpoint {directory}/{step} is incomplete (no {', '.join(missing)}): it was not "
                              f"written by a finished save. Move it out of {directory} to resume from the one before")
    _filter_abandoned_read_noise()  # before the read: a failed read's other reads report from other threads
    try:
        check_shapes(manager.directory, step, abstract_state)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract_state, restore_args=_restore_args(abstract_state)),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - Orbax wraps TensorStore's read errors in a bare Exception
        damaged = _read_failure(error, f"{directory}/{step}", "Move it out of {directory} to resume from the one before"
                                .format(directory=directory))
        if damaged is None:
            raise
        raise damaged from error
    meta = restored["meta"] or {}
    check_digests(meta.get("array_digests"), restored["state"], f"{directory}/{step}", directory)
    return restored["state"], restored["data"] or {}, meta


def _read_failure(error: BaseException, where: str, what_to_do: str) -> CheckpointError | None:
    """A CheckpointError for a failed read of a damaged checkpoint (a ValueError, OSError or KeyError anywhere
    in the exception chain, e.g. TensorStore's OUT_OF_RANGE wrapped by Orbax in a bare Exception); None for
    other failures (a failed write, a bug), which propagate unchanged."""
    if _write_errno(error) is not None:
        return None
    cause, seen = error, set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, (ValueError, OSError, KeyError)):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if cause is None or id(cause) in seen:
        return None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # the abandoned reads' unretrieved task errors
    return CheckpointError(f"checkpoint {where} cannot be read ({type(cause).__name__}: {str(cause)[:300]}); it is "
                           f"damaged. {what_to_do}")


def _is_abandoned_read_noise(unraisable) -> bool:
    """Errors that a failed checkpoint read's *other* array reads raise where nobody can catch them: their
    own read errors when garbage-collected, and TensorStore completions posted to Orbax's event loop after
    it closed (`RuntimeError: Event loop is closed`, reported with no object from a C++ thread)."""
    value = unraisable.exc_value
    if "Encountered error while reading array" in str(value):
        return True
    if "_read_array" in str(getattr(unraisable.object, "__qualname__", "")):
        return True
    return unraisable.object is None and isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _filter_abandoned_read_noise() -> None:
    """Installs (once) an unraisable hook that drops exactly the noise `_is_abandoned_read_noise` describes
    and passes everything else on: after a damaged checkpoint the user sees the one clear error, not a
    traceback per abandoned read (a successful read leaves none of these)."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxllm_quiet_reads", False):
        return

    def hook(unraisable) -> None:
        if not _is_abandoned_read_noise(unraisable):
            previous(unraisable)

    hook._jaxllm_quiet_reads = True
    sys.unraisablehook = hook
    # asyncio may log an abandoned read's error ("Task exception was never retrieved") before the failed read
    # reaches `_read_failure`, when that raises the asyncio logger's level; drop exactly those records.
    logging.getLogger("asyncio").addFilter(_AbandonedReadLogFilter())


class _AbandonedReadLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return "Encountered error while reading array" not in f"{record.getMessage()} {error}"


def latest_step(path: str | Path) -> int | None:
    directory = checkpoint_dir(path)
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()
             and (p / "state").is_dir()]
    return max(steps) if steps else None


def _metadata_tree(directory: Path, step: int) -> Any:
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory / str(step) / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        key = _path_key(path)
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            flat[key] = tuple(shape)
    return flat


def saved_head_names(path: str | Path, step: int | None = None) -> tuple[str, ...]:
    """The scalar heads (e.g. "reward", "value") in a run's saved params, () when none or no checkpoint."""
    directory = checkpoint_dir(path)
    step = latest_step(directory) if step is None else step
    if step is None:
        return ()
    prefix = "params/heads/"
    return tuple(sorted({key[len(prefix):].split("/")[0] for key in _flat_shapes(_metadata_tree(directory, step))
                         if key.startswith(prefix)}))


def check_shapes(directory: str | Path, step: int, abstract_tree: Any, prefix: str = "") -> None:
    """Raises CheckpointError listing every parameter whose saved shape differs from the target."""
    saved = _flat_shapes(_metadata_tree(Path(directory), step))
    if not saved:
        raise CheckpointError(f"checkpoint {directory}/{step} cannot be read (its state has no readable array "
                              f"metadata): it is damaged or was not written by jaxllm. Move it out of {directory} "
                              "to use the one before")
    wanted = _flat_shapes(abstract_tree)
    problems = []
    for key, shape in wanted.items():
        full = prefix + key
        if full not in saved:
            problems.append(f"{full}: missing from the checkpoint")
        elif saved[full] != shape:
            problems.append(f"{full}: checkpoint {saved[full]} vs model {shape}")
    if problems:
        listed = "\n  ".join(problems[:20]) + ("" if len(problems) <= 20 else f"\n  ... {len(problems) - 20} more")
        raise CheckpointError(f"checkpoint {directory}/{step} does not fit this model "
                              f"({len(problems)} mismatched parameters):\n  {listed}\n"
                              "Use the model config the checkpoint was trained with (see its config.yaml).")


def load_params(path: str | Path, abstract_params: Any, step: int | None = None) -> Any:
    """Params only (no optimizer state) from another run's workdir or checkpoints dir, restored onto
    the shardings of `abstract_params`. Extra heads in the target that the checkpoint lacks are an error."""
    directory = checkpoint_dir(path)
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no finished checkpoint under {directory}; train that stage first "
                              "(or point init_from at a workdir that has one)")
    check_shapes(directory, step, abstract_params, prefix="params/")
    target = {"params": abstract_params}
    checkpointer = ocp.PyTreeCheckpointer()
    _filter_abandoned_read_noise()
    try:
        with _quiet_absl():  # reading one item of a managed step: Orbax warns that the step's metadata is a level up
            restored = checkpointer.restore(
                directory / str(step) / "state",
                args=ocp.args.PyTreeRestore(target, restore_args=_restore_args(target), partial_restore=True))
    except Exception as error:  # noqa: BLE001 - see restore
        damaged = _read_failure(error, f"{directory}/{step}", "Train that stage again or point init_from at another "
                                "checkpoint")
        if damaged is None:
            raise
        raise damaged from error
    check_digests(read_meta(directory, step).get("array_digests"), {"params": restored["params"]},
                  f"{directory}/{step}", directory)
    return restored["params"]


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def read_meta(path: str | Path, step: int | None = None) -> dict[str, Any]:
    directory = checkpoint_dir(path)
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no finished checkpoint under {directory}")
    import json

    meta_dir = directory / str(step) / "meta"
    files = sorted(meta_dir.glob("*")) if meta_dir.is_dir() else []
    for candidate in files:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (ValueError, UnicodeDecodeError):
                continue
    return {}


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
