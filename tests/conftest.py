"""Test setup: 8 simulated CPU devices and the persistent compilation cache, before JAX is imported."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:  # tests are compile-bound: skip XLA's slow backend passes
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402

# One cache directory per pytest-xdist worker (gw0, gw1, ...): JAX reads and writes an unbounded cache without a
# lock, so a worker could read another's half-written entry; a size bound would lock, but it also rescans the
# directory on every write (the suite took 1.45x as long). Subprocesses a test starts get the worker's directory
# through JAXLLM_TEST_CACHE.
_CACHE = Path(os.environ.get("JAXLLM_TEST_CACHE", Path(__file__).resolve().parent.parent / ".jax_cache"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    _CACHE = _CACHE / os.environ["PYTEST_XDIST_WORKER"]
os.environ["JAXLLM_TEST_CACHE"] = str(_CACHE)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
