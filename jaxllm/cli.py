"""`jaxllm` command line: a thin layer over the Python API.

Exit codes: 0 success; 2 bad usage or bad input (config, data, checkpoint, mesh); 1 runtime failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

# Subcommands implemented elsewhere: "name" or "group name" -> "module:function(argv) -> int".
DELEGATED = {
    "pipeline": "jaxllm.pipeline:pipeline_main",
    "generate": "jaxllm.generate:generate_main",
    "chat": "jaxllm.generate:chat_main",
    "score": "jaxllm.rl:score_main",
    "eval": "jaxllm.evaluate:eval_main",
    "lm-eval": "jaxllm.lm_eval_adapter:lm_eval_main",
    "bench": "jaxllm.bench_levers:bench_levers_main",
    "plan": "jaxllm.planning:plan_main",
    "sweep": "jaxllm.sweep:sweep_main",
    "tokenizer train": "jaxllm.data.tokenizer:tokenizer_train_main",
    "data stats": "jaxllm.cli:data_stats_main",
    "data filter": "jaxllm.quality:filter_main",
    "data train-quality": "jaxllm.quality:train_quality_main",
    "data select": "jaxllm.selection:select_main",
    "data generate": "jaxllm.teacher:generate_data_main",
    "analyze knowledge": "jaxllm.analysis:knowledge_main",
    "analyze shift": "jaxllm.analysis:shift_main",
    "experiment knowledge": "jaxllm.knowledge_experiment:experiment_main",
    "convert from-hf": "jaxllm.convert:from_hf_main",
    "convert to-hf": "jaxllm.convert:to_hf_main",
    "convert merge-lora": "jaxllm.convert:merge_lora_main",
}

from jaxllm.cpu_levers import MALLOC_ENV as _CPU_MALLOC_ENV  # noqa: E402 - JAX-free, read before JAX starts
from jaxllm.cpu_levers import YNN_DOT_FLAG as _CPU_XLA_FLAG  # noqa: E402
from jaxllm.cpu_levers import YNN_DOT_FLAG_JAXLIB as _CPU_XLA_FLAG_JAXLIB  # noqa: E402


def _cpu_levers(env) -> list[str]:
    """The process levers measured as a gain on this CPU's ISA (`jaxllm.cpu_levers.LEVER_GAINS`);
    JAXLLM_CPU_LEVERS=malloc,ynn_dot (or 'none') overrides the table."""
    from jaxllm import cpu_levers

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

        if not version("jaxlib").startswith(_CPU_XLA_FLAG_JAXLIB):
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


def _train_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm train", description="Train one stage from a YAML recipe.")
    parser.add_argument("recipe", help="a YAML recipe file, or a built-in recipe's name (e.g. pretrain_tiny; "
                        "`jaxllm recipes` lists them)")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, config)")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile ahead of time and print parameters, FLOPs/token and memory; no training")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=10 init_from=runs/pt")
    args = parser.parse_intermixed_args(argv)
    from jaxllm.config import load_config

    config = load_config(args.recipe, args.overrides, log=print)
    if args.dry_run:
        from jaxllm.aot import dry_run
        from jaxllm.train import load_tokenizer

        load_tokenizer(config)  # a fixed model.vocab_size smaller than the tokenizer fails here, as in a run

        report = dry_run(config)
        for key, value in report.items():
            print(f"{key:>28}: {value}")
        return 0
    try:  # a failed background save is re-raised by the loop as one clear error; Orbax's own logs repeat it
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:
        pass
    from jaxllm.train import train

    result = train(config, args.workdir)
    state = "stopped early at" if result.stopped_early else "finished at"
    print(f"{config.train.stage} {state} step {result.final_step}; workdir {result.workdir}")
    if result.eval_metrics:
        print("eval: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.eval_metrics.items())))
    return 0


def _recipes_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm recipes",
                                     description="List the recipes shipped with jaxllm (usable by name from any "
                                                 "directory: `jaxllm train pretrain_tiny --workdir runs/pt`).")
    parser.add_argument("--path", action="store_true", help="also print each recipe's file")
    args = parser.parse_args(argv)
    from jaxllm.config import builtin_recipes, recipe_summary

    recipes = builtin_recipes()
    width = max((len(name) for name in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}" + (f"  [{path}]" if args.path else ""))
    return 0


def _delegate(target: str, argv: list[str]) -> int:
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            print(f"jaxllm: this command is not available in this build ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, function_name)(argv) or 0)


def _usage() -> str:
    commands = ["train", "recipes"] + sorted(DELEGATED)
    return "usage: jaxllm [--no-compile-cache] COMMAND [ARGS]\n\ncommands:\n  " + "\n  ".join(commands) + \
        "\n\nRun `jaxllm COMMAND --help` for a command's arguments. Compiled programs are cached in " \
        "~/.cache/jaxllm/jax (JAX_COMPILATION_CACHE_DIR moves it; --no-compile-cache or " \
        "JAXLLM_COMPILATION_CACHE=off turns it off)."


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "version"):
        from jaxllm import __version__

        print(__version__)
        return 0
    if argv[0] == "train":
        return _train_command(argv[1:])
    if argv[0] == "recipes":
        return _recipes_command(argv[1:])
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in DELEGATED:
        return _delegate(DELEGATED[f"{argv[0]} {argv[1]}"], argv[2:])
    if argv[0] in DELEGATED:
        return _delegate(DELEGATED[argv[0]], argv[1:])
    groups = sorted({k.split()[0] for k in DELEGATED if " " in k})
    if argv[0] in groups:
        subs = sorted(k.split()[1] for k in DELEGATED if k.startswith(argv[0] + " "))
        print(f"jaxllm {argv[0]}: choose one of: {', '.join(subs)}", file=sys.stderr)
        return 2
    print(f"jaxllm: unknown command '{argv[0]}'\n\n{_usage()}", file=sys.stderr)
    return 2


def data_stats_main(argv: list[str]) -> int:
    """`jaxllm data stats SOURCE [--stage auto|pretrain|sft|dpo|...] [--seq-len N] ...`."""
    from jaxllm import stages
    from jaxllm.config import load_config
    from jaxllm.data import DataError, format_report

    parser = argparse.ArgumentParser(prog="jaxllm data stats",
                                     description="Count what the data pipeline makes of a source.")
    parser.add_argument("source", help="default:NAME, text:PATH, jsonl:PATH or tfds:NAME/CONFIG:SPLIT")
    parser.add_argument("--stage", default="auto", choices=("auto", *stages.names()),
                        help="read the records as this stage's data (auto: guessed from the first record's fields)")
    parser.add_argument("--config", default=None, help="a recipe YAML whose data.* settings to use")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help='"default" or a directory holding tokenizer.model')
    parser.add_argument("--text-field", default=None)
    parser.add_argument("--no-pack", action="store_true")
    parser.add_argument("--sft-mode", choices=("normal", "response_only", "all_tokens"), default=None)
    parser.add_argument("--truncation", choices=("truncate", "drop"), default=None)
    parser.add_argument("--on-bad-record", choices=("fail", "skip"), default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    overrides = [f"data.{key}={value}" for key, value in (
        ("seq_len", args.seq_len), ("tokenizer", args.tokenizer), ("text_field", args.text_field),
        ("sft_mode", args.sft_mode), ("truncation", args.truncation), ("on_bad_record", args.on_bad_record))
        if value is not None]
    if args.no_pack:
        overrides.append("data.pack=false")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.seq_len is not None:  # stats need no model; let any seq_len through validation
        overrides.append(f"model.max_seq_len={max(args.seq_len, 1)}")
    try:
        config = load_config(args.config, overrides)
        stats = stages.data_stats(args.source, config, stage=args.stage)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=1) if args.json else format_report(stats))
    return 0


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
        from jaxllm.compile_cache import enable_compile_cache

        argv = enable_compile_cache(argv)
    if from_command_line and argv and argv[0] not in ("-h", "--help", "--version", "version"):
        _add_cpu_xla_flag(os.environ)  # read when JAX starts its backends: no re-exec needed for it
        _maybe_reexec_with_fast_malloc(argv)
    try:  # Orbax and TFDS log through absl; keep the terminal for our own progress lines
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    from jaxllm.errors import USAGE_ERRORS, RUNTIME_ERRORS

    try:
        return run(argv)
    except USAGE_ERRORS as error:
        print(f"jaxllm: error: {error}", file=sys.stderr)
        return 2
    except RUNTIME_ERRORS as error:
        print(f"jaxllm: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

