"""`jaxllm` command line: a thin layer over the Python API, and the only place that parses arguments.

One module per command group (train, pipeline, generate, evaluate, data, ...) turns argv into the library's
typed settings and calls it; this module dispatches to them and maps every error to an exit code, once.

Exit codes: 0 success; 2 bad usage or bad input (config, data, checkpoint, mesh); 1 runtime failure.
"""

from __future__ import annotations

import importlib
import os
import sys

from jaxllm import cpu_levers  # JAX-free: read before JAX starts, to set the process levers
from jaxllm.compile_cache import enable_compile_cache, repair_enabled_cache  # JAX-free
from jaxllm.cpu_levers import MALLOC_ENV as _CPU_MALLOC_ENV
from jaxllm.cpu_levers import YNN_DOT_FLAG as _CPU_XLA_FLAG
from jaxllm.cpu_levers import ynn_flag_known as _ynn_flag_known
from jaxllm.errors import RUNTIME_ERRORS, USAGE_ERRORS, DataError  # imports nothing

# Every command: "name" or "group name" -> "module:function(argv) -> int", the module imported only when its
# command runs (so `jaxllm --help` and the CPU-lever re-exec stay JAX-free).
DELEGATED = {
    "train": "jaxllm.cli.train:train_command",
    "recipes": "jaxllm.cli.recipes:recipes_command",
    "pipeline": "jaxllm.cli.pipeline:pipeline_command",
    "generate": "jaxllm.cli.generate:generate_command",
    "chat": "jaxllm.cli.generate:chat_command",
    "score": "jaxllm.cli.score:score_command",
    "eval": "jaxllm.cli.evaluate:eval_command",
    "lm-eval": "jaxllm.cli.lm_eval:lm_eval_command",
    "bench": "jaxllm.cli.bench:bench_command",
    "plan": "jaxllm.cli.plan:plan_command",
    "sweep": "jaxllm.cli.sweep:sweep_command",
    "tokenizer train": "jaxllm.cli.tokenizer:tokenizer_train_command",
    "data stats": "jaxllm.cli.data:stats_command",
    "data filter": "jaxllm.cli.quality:filter_command",
    "data train-quality": "jaxllm.cli.quality:train_quality_command",
    "data select": "jaxllm.cli.data:select_command",
    "data generate": "jaxllm.cli.data:generate_command",
    "data pairs": "jaxllm.cli.data:pairs_command",
    "analyze knowledge": "jaxllm.cli.analyze:knowledge_command",
    "analyze shift": "jaxllm.cli.analyze:shift_command",
    "experiment knowledge": "jaxllm.cli.experiment:knowledge_command",
    "convert from-hf": "jaxllm.cli.convert:from_hf_command",
    "convert to-hf": "jaxllm.cli.convert:to_hf_command",
    "convert merge-lora": "jaxllm.cli.convert:merge_lora_command",
}


def _cpu_levers(env) -> list[str]:
    """The process levers measured as a gain on this CPU's ISA (`jaxllm.cpu_levers.LEVER_GAINS`);
    JAXLLM_CPU_LEVERS=malloc,ynn_dot (or 'none') overrides the table."""
    chosen = env.get("JAXLLM_CPU_LEVERS")
    if chosen is not None:
        return [name for name in chosen.replace(" ", "").split(",") if name and name != "none"]
    isa = cpu_levers.effective_isa(cpu_levers.cpu_info()["isa"], env.get("XLA_FLAGS", ""))
    return cpu_levers.levers_for(isa)


def _add_cpu_xla_flag(env) -> None:
    flags = env.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags or env.get("JAXLLM_NO_XLA_FLAGS"):
        return
    if "ynn_dot" not in _cpu_levers(env):
        return
    try:
        from importlib.metadata import version

        if not _ynn_flag_known(version("jaxlib")):
            return
    except Exception:  # noqa: BLE001 - no jaxlib metadata: leave the flags alone
        return
    env["XLA_FLAGS"] = (flags + " " + _CPU_XLA_FLAG).strip()


def _maybe_reexec_with_fast_malloc(argv: list[str]) -> None:
    """glibc reads its malloc settings at process start, so set them and re-exec once."""
    if os.environ.get("JAXLLM_NO_REEXEC") or not sys.platform.startswith("linux"):
        return
    if all(os.environ.get(k) for k in _CPU_MALLOC_ENV) or "malloc" not in _cpu_levers(os.environ):
        return
    env = dict(os.environ)
    for key, value in _CPU_MALLOC_ENV.items():
        env.setdefault(key, value)
    env["JAXLLM_NO_REEXEC"] = "1"
    try:
        os.execve(sys.executable, [sys.executable, "-m", "jaxllm.cli", *argv], env)
    except OSError:
        return


def _delegate(target: str, argv: list[str]) -> int:
    """Imports the command's module (only now: most pull in JAX) and runs its function on `argv`."""
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name or (error.name or "").startswith("jaxllm."):
            print(f"jaxllm: this command is not available in this build ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, function_name)(argv) or 0)


def _usage() -> str:
    commands = ["train", "recipes"] + sorted(name for name in DELEGATED if name not in ("train", "recipes"))
    return "usage: jaxllm [--no-compile-cache] COMMAND [ARGS]\n\ncommands:\n  " + "\n  ".join(commands) + \
        "\n\nRun `jaxllm COMMAND --help` for a command's arguments. Compiled programs are cached in " \
        "~/.cache/jaxllm/jax (JAX_COMPILATION_CACHE_DIR moves it; --no-compile-cache or " \
        "JAXLLM_COMPILATION_CACHE=off turns it off)."


def command_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """The command `argv` names ("train", "data stats", ...) and its own arguments, or None."""
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in DELEGATED:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv and argv[0] in DELEGATED:
        return argv[0], argv[1:]
    return None


# Errors that a command reports with another exit code than the shared table (`jaxllm.errors.USAGE_ERRORS` -> 2,
# `RUNTIME_ERRORS` -> 1) gives them, as each command did before its handling moved here: `data stats` and
# `tokenizer train` exit 1 on bad input; the quality commands report any ValueError of their checks as bad input.
COMMAND_ERRORS: dict[str, tuple[tuple[type[BaseException], ...], int]] = {
    "data stats": ((DataError, ValueError), 1),
    "tokenizer train": ((DataError,), 1),
    "data filter": ((ValueError, FileNotFoundError), 2),
    "data train-quality": ((ValueError,), 2),
}


def exit_code(error: BaseException, command: str = "") -> int | None:
    """2 for bad usage or input, 1 for a runtime failure, None for an error jaxllm does not expect (a bug:
    its traceback is shown)."""
    types, code = COMMAND_ERRORS.get(command, ((), 0))
    if isinstance(error, types):
        return code
    if isinstance(error, USAGE_ERRORS):
        return 2
    if isinstance(error, RUNTIME_ERRORS):
        return 1
    return None


def error_line(error: BaseException, code: int) -> str:
    """The one line every command prints for an error: `jaxllm: error: ...`; a runtime failure also names
    its type (CheckpointWriteError, TrainingHalted, OSError...)."""
    if code == 1 and isinstance(error, RUNTIME_ERRORS):
        return f"jaxllm: error: {type(error).__name__}: {error}"
    return f"jaxllm: error: {error}"


def run(argv: list[str]) -> int:
    """Runs the command `argv` names and returns its exit code: an expected error becomes one line on stderr
    and its code, argparse's exits their code (so a caller in Python gets 2, not SystemExit)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "version"):
        from jaxllm import __version__

        print(__version__)
        return 0
    found = command_of(argv)
    if found is None:
        groups = sorted({k.split()[0] for k in DELEGATED if " " in k})
        if argv[0] in groups:
            subs = sorted(k.split()[1] for k in DELEGATED if k.startswith(argv[0] + " "))
            print(f"jaxllm {argv[0]}: choose one of: {', '.join(subs)}", file=sys.stderr)
            return 2
        print(f"jaxllm: unknown command '{argv[0]}'\n\n{_usage()}", file=sys.stderr)
        return 2
    command, arguments = found
    try:
        return _delegate(DELEGATED[command], arguments)
    except SystemExit as exit_:  # argparse's --help (0) and usage errors (2), its message already printed
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        raise
    except Exception as error:  # noqa: BLE001 - mapped to an exit code, or re-raised
        code = exit_code(error, command)
        if code is None:
            raise
        print(error_line(error, code), file=sys.stderr)
        return code


def _interrupt_on_sigterm() -> None:
    """Until `train` installs its own handler (a clean save and stop), SIGTERM ends the process at once as
    the default action would, but with one line and exit code 130 instead of death by signal (-15). Raising
    KeyboardInterrupt instead is not safe: it can land in a garbage-collection callback and be ignored."""
    import signal

    def interrupt(signum, frame):  # noqa: ARG001
        try:
            sys.stderr.write("jaxllm: interrupted (SIGTERM)\n")
            sys.stderr.flush()
        finally:
            os._exit(130)

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not in the main thread: leave signals alone
        pass


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    if from_command_line:
        _interrupt_on_sigterm()
    try:
        return _main(argv, from_command_line)
    except KeyboardInterrupt:
        print("jaxllm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None, from_command_line: bool) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_command_line:  # the persistent compilation cache (jaxllm.compile_cache), before JAX starts
        argv = enable_compile_cache(argv)
    if from_command_line and argv and argv[0] not in ("-h", "--help", "--version", "version"):
        _add_cpu_xla_flag(os.environ)  # read when JAX starts its backends: no re-exec needed for it
        _maybe_reexec_with_fast_malloc(argv)
        repair_enabled_cache(os.environ)  # after the re-exec: once per command
    try:  # Orbax and TFDS log through absl; keep the terminal for our own progress lines
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("jaxllm: interrupted", file=sys.stderr)
        return 130


