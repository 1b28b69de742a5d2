"""The exception families the CLI maps to exit codes (2: bad usage/input, 1: runtime failure)."""

from __future__ import annotations

from jaxllm.checkpoint import CheckpointError
from jaxllm.config import ConfigError
from jaxllm.files import WorkdirBusy
from jaxllm.sharding import MeshError


class UsageError(ValueError):
    """Bad arguments or input that the user must fix (exit code 2)."""


def _data_error() -> type[Exception]:
    try:
        from jaxllm.data import DataError
    except ImportError:
        return UsageError
    return DataError


USAGE_ERRORS: tuple[type[BaseException], ...] = (ConfigError, MeshError, CheckpointError, UsageError, WorkdirBusy,
                                                 _data_error(), FileNotFoundError)
RUNTIME_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, OSError)
