"""The persistent XLA compilation cache of the `jaxllm` command (on by default).

Every `jaxllm generate`, `eval` or `train` call compiles its programs; with the cache, a second call on
the same model shapes loads them from disk instead. Set once in the CLI entry, before JAX starts, through
JAX's own environment variables (so nothing here imports JAX):

- directory: `$JAX_COMPILATION_CACHE_DIR` when set (JAX's own variable; used as given), else
  `$XDG_CACHE_HOME/jaxllm/jax/` or `~/.cache/jaxllm/jax/`, in a subdirectory named after the jax and jaxlib
  versions, so an upgrade never reads another version's entries (JAX's keys include the versions too;
  the subdirectory makes stale entries easy to delete), and in that one a subdirectory per host CPU
  (`host_tag`: its ISA and the number of CPUs this process may run on). XLA CPU generates code for the
  host's ISA and splits loops across the cores it can schedule, and JAX's cache key includes neither: a
  train step compiled under `taskset -c 0` and read back by a 2-core process ran 15-18% slower, and a
  home directory shared by machines of different CPUs would hand each the other's programs;
- off: `jaxllm --no-compile-cache COMMAND ...`, `JAXLLM_COMPILATION_CACHE=off`, or JAX's own
  `JAX_ENABLE_COMPILATION_CACHE=false`;
- multi-host: JAX writes entries only from process 0 and every process reads; a per-user directory on a
  host-local disk or a shared filesystem both work, and an unreadable entry is recompiled, never fatal.

Programs that compile in under `MIN_COMPILE_SECONDS` are not written (they would cost more to read back).

JAX's size-bounded cache keeps a `<key>-atime` file beside every `<key>-cache` entry and, before each write,
reads the atime of every entry; one entry without its atime (a process killed between the two writes, or a
program that wrote to the same directory without the size bound) made every later write fail with a
warning, so nothing new was cached again. `repair_cache_dir` gives such entries an atime (their mtime) and
removes empty entries and stray atimes, under the cache's own lock, each time the CLI starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from jaxllm import cpu_levers  # JAX-free

DISABLE_FLAG = "--no-compile-cache"
DISABLE_ENV = "JAXLLM_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.1  # CPU compiles of the small models take 0.1-2 s each; reading one back ~10 ms
MAX_CACHE_BYTES = 4 << 30  # least recently used entries are evicted past this (needs the filelock package)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"jax-{version('jax')}-jaxlib-{version('jaxlib')}"
    except PackageNotFoundError:
        return "jax-unknown"


def host_tag(isa: str | None = None, cpus: int | None = None) -> str:
    """'avx512-2cpu' style: the host CPU's ISA (`jaxllm.cpu_levers.cpu_info`) and the number of CPUs this
    process may be scheduled on (its affinity, which XLA sizes its CPU loop partitions by)."""
    if isa is None:
        isa = cpu_levers.cpu_info()["isa"]
    if cpus is None:
        cpus = cpu_levers.available_cpus()
    return f"{isa.lower().replace('-', '')}-{cpus}cpu"


def default_cache_dir(environ: Mapping[str, str], host: str | None = None) -> Path:
    """`$XDG_CACHE_HOME/jaxllm/jax/<versions>/<host>` (or under ~/.cache); `host` defaults to `host_tag()`."""
    root = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "jaxllm" / "jax" / _versions() / (host or host_tag())


def cache_disabled(environ: Mapping[str, str], argv: list[str]) -> bool:
    off = environ.get(DISABLE_ENV, "").strip().lower() in ("0", "off", "false", "no")
    return off or DISABLE_FLAG in argv or environ.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("0", "false")


def compile_cache_env(environ: Mapping[str, str], argv: list[str]) -> dict[str, str]:
    """The JAX environment variables that turn the cache on (empty when disabled). Values the user set win."""
    if cache_disabled(environ, argv):
        return {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    updates = {
        "JAX_COMPILATION_CACHE_DIR": str(default_cache_dir(environ)),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_SECONDS),
    }
    try:
        import filelock  # noqa: F401  JAX's size-bounded (LRU) cache locks with it
    except ImportError:
        pass
    else:
        updates["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(MAX_CACHE_BYTES)
    return {key: value for key, value in updates.items() if not environ.get(key)}


CACHE_SUFFIX, ATIME_SUFFIX, LOCK_NAME = "-cache", "-atime", ".lockfile"  # jax._src.lru_cache's layout


def repair_cache_dir(path: Path, lock_timeout: float = 10.0) -> dict[str, int]:
    """Makes a size-bounded cache directory consistent again (see the module docstring); returns the
    counts of what it fixed. Entries written without an atime get their mtime as last access. Holds the
    directory's lock (JAX's own `.lockfile`) while it works; skips the repair when the lock is busy."""
    fixed = {"atime_added": 0, "empty_removed": 0, "stray_atime_removed": 0}
    if not path.is_dir():
        return fixed
    try:
        import filelock
    except ImportError:
        return fixed
    try:
        with filelock.FileLock(path / LOCK_NAME, timeout=lock_timeout):
            names = set(os.listdir(path))
            for name in names:
                if name.endswith(CACHE_SUFFIX):
                    key = name[: -len(CACHE_SUFFIX)]
                    entry, atime = path / name, path / (key + ATIME_SUFFIX)
                    stat = entry.stat()
                    if stat.st_size == 0:  # killed before a byte was written: JAX would fail to read it forever
                        entry.unlink()
                        atime.unlink(missing_ok=True)
                        fixed["empty_removed"] += 1
                    elif key + ATIME_SUFFIX not in names:
                        atime.write_bytes(stat.st_mtime_ns.to_bytes(8, "little"))
                        fixed["atime_added"] += 1
                elif name.endswith(ATIME_SUFFIX) and name[: -len(ATIME_SUFFIX)] + CACHE_SUFFIX not in names:
                    (path / name).unlink(missing_ok=True)
                    fixed["stray_atime_removed"] += 1
    except (filelock.Timeout, OSError):  # a busy or read-only cache: JAX copes with it as it is
        pass
    return fixed


def enable_compile_cache(argv: list[str]) -> list[str]:
    """Sets the cache's environment for this process (before JAX is imported); returns argv without the
    `--no-compile-cache` flag."""
    os.environ.update(compile_cache_env(os.environ, argv))
    return [arg for arg in argv if arg != DISABLE_FLAG]


def repair_enabled_cache(environ: Mapping[str, str]) -> dict[str, int] | None:
    """`repair_cache_dir` on the directory `environ` points JAX at, when the cache is on and size-bounded (JAX
    keeps atimes only then); None otherwise. The CLI calls it once, in the process that runs the command."""
    directory = environ.get("JAX_COMPILATION_CACHE_DIR")
    if not directory or cache_disabled(environ, []) or environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", "-1") == "-1":
        return None
    return repair_cache_dir(Path(directory))


__all__ = ["compile_cache_env", "default_cache_dir", "cache_disabled", "enable_compile_cache", "host_tag",
           "repair_cache_dir", "repair_enabled_cache", "DISABLE_FLAG"]
