"""Small state files written atomically, and the exclusive lock a run holds on its workdir.

`write_atomic` writes a temporary file beside the target, fsyncs it, renames it over the target and
fsyncs the directory: a reader (or a rerun after a kill) sees the old content or the new, never a
truncated file. `WorkdirLock` is an `fcntl.flock` on `WORKDIR/.jaxllm.lock`: the kernel releases it
when the process exits in any way (SIGKILL included); the file names the holder (host, pid, command).
Imports only jaxllm.errors: every layer may use it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxllm.errors import WorkdirBusy

LOCK_FILE = ".jaxllm.lock"
_HELD_BY_THIS_PROCESS: set[str] = set()  # resolved lock-file paths this process holds


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Replaces `path` with `text` (str: UTF-8) so that no reader ever sees a partial file."""
    path = Path(path)
    data = text.encode("utf-8") if isinstance(text, str) else text
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with _ignoring(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 2) -> None:
    write_atomic(path, json.dumps(value, indent=indent, default=str))


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in `path`, or ValueError naming the file and `what` it holds when it is damaged."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} ({what}) is damaged: {error}") from None


def _fsync_directory(directory: Path) -> None:
    with _ignoring(OSError):  # some file systems (and Windows) cannot open a directory
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class _ignoring:
    def __init__(self, *kinds: type[BaseException]):
        self.kinds = kinds

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is not None and issubclass(kind, self.kinds)


class WorkdirLock:
    """An exclusive, non-blocking `flock` on DIRECTORY/.jaxllm.lock, held until `release()` or process exit.

    The lock file stays behind after the run (its content names the last holder); only the flock counts."""

    def __init__(self, directory: str | Path, what: str = "run"):
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self._handle = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock, or raises WorkdirBusy naming its holder. Within one process it is re-entrant: a
        lock this process already holds (e.g. a `setup` used to inspect a run, then `train` on it) is not
        taken twice, and only the first holder's release frees it."""
        key = str(self.path.resolve())
        if key in _HELD_BY_THIS_PROCESS:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise WorkdirBusy(f"the workdir {self.path.parent} is in use by another {holder} (lock file "
                              f"{self.path}); wait for it to finish, stop it, or choose another --workdir") from None
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                 "command": " ".join(sys.argv)[:500]}) + "\n")
        handle.flush()
        self._handle = handle
        _HELD_BY_THIS_PROCESS.add(key)
        return self

    def release(self) -> None:
        if self._handle is not None:
            _HELD_BY_THIS_PROCESS.discard(str(self.path.resolve()))
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text.strip().splitlines()[-1])
        return (f"{holder.get('what', 'run')} (pid {holder.get('pid')} on host {holder.get('host')}, since "
                f"{holder.get('since')}: {holder.get('command', '')})")
    except (ValueError, IndexError, AttributeError):
        return "process (its lock file does not say which)"
