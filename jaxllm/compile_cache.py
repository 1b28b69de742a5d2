"""The persistent XLA compilation cache of the `jaxllm` command (on by default).

Every `jaxllm generate`, `eval` or `train` call compiles its programs; with the cache, a second call on
the same model shapes loads them from disk instead. Set once in the CLI entry, before JAX starts, through
JAX's own environment variables (so nothing here imports JAX):

- directory: `$JAX_COMPILATION_CACHE_DIR` when set (JAX's own variable; used as given), else
  `$XDG_CACHE_HOME/jaxllm/jax/` or `~/.cache/jaxllm/jax/`, in a subdirectory named after the jax and jaxlib
  versions, so an upgrade never reads another version's entries (JAX's keys include the versions too;
  the subdirectory makes stale entries easy to delete);
- off: `jaxllm --no-compile-cache COMMAND ...`, `JAXLLM_COMPILATION_CACHE=off`, or JAX's own
  `JAX_ENABLE_COMPILATION_CACHE=false`;
- multi-host: JAX writes entries only from process 0 and every process reads; a per-user directory on a
  host-local disk or a shared filesystem both work, and an unreadable entry is recompiled, never fatal.

Programs that compile in under `MIN_COMPILE_SECONDS` are not written (they would cost more to read back).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

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


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """`$XDG_CACHE_HOME/jaxllm/jax/<versions>` (or under ~/.cache)."""
    root = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "jaxllm" / "jax" / _versions()


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


def enable_compile_cache(argv: list[str]) -> list[str]:
    """Sets the cache's environment for this process (before JAX is imported); returns argv without the
    `--no-compile-cache` flag."""
    os.environ.update(compile_cache_env(os.environ, argv))
    return [arg for arg in argv if arg != DISABLE_FLAG]


__all__ = ["compile_cache_env", "default_cache_dir", "cache_disabled", "enable_compile_cache", "DISABLE_FLAG"]
