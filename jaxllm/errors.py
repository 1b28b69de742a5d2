"""Every exception type jaxllm raises on purpose, and the exit code the CLI maps each family to
(2: bad usage or input the user must fix; 1: a runtime failure). The bottom layer: imports nothing
from jaxllm, so any module can raise these and the CLI can catch them without importing the rest."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad arguments or input that the user must fix (exit code 2)."""


class ConfigError(ValueError):
    """A recipe or override is invalid; the message says which key and what to do."""


class MeshError(ValueError):
    """The requested mesh does not fit the available devices."""


class CheckpointError(ValueError):
    """A checkpoint is missing or does not fit the model being restored."""


class WorkdirError(CheckpointError):
    """The workdir cannot be written (read-only, permissions): a usage error, exit code 2."""


class CheckpointWriteError(RuntimeError):
    """Writing to the workdir failed while training (disk full, quota): a runtime error, exit code 1."""


class DataError(ValueError):
    """Bad or unusable input data; the message says which record, what is wrong and what to do.

    `reason` (one of jaxllm.data.report.BAD_RECORD_REASONS, or "") is the key under which a skipped
    record is counted.
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class WorkdirBusy(ValueError):
    """Another process holds the workdir's lock (the message names it): a usage error, exit code 2."""


class TrainingHalted(RuntimeError):
    """Too many updates in a row were skipped (non-finite or spiking loss)."""


USAGE_ERRORS: tuple[type[BaseException], ...] = (ConfigError, MeshError, CheckpointError, UsageError, DataError,
                                                 WorkdirBusy, FileNotFoundError)
RUNTIME_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, OSError)
