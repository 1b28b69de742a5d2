"""Setting a run up and training it: the entry point of every stage.

`train(config, workdir)` builds the mesh, the state (fresh, from `train.init_from`, or resumed from
the workdir's own checkpoint), the data iterator for the stage, and runs the one loop (`jaxllm.loop`)
with its hooks: periodic logging, evaluation, async checkpoints, the spike guard; SIGTERM/SIGINT save
and stop cleanly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm import checkpoint as ckpt
from jaxllm import lora as lora_lib
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import stages as stages_lib
from jaxllm import state as state_lib
from jaxllm import step_builder
from jaxllm.config import Config, ConfigError, compare_for_resume
from jaxllm.data.tokenizer import Tokenizer, check_vocab
from jaxllm.errors import DataError
from jaxllm.files import WorkdirLock
from jaxllm.loop import signals
from jaxllm.loop.context import RunContext, abstract_with_shardings, release

# Re-exported: what callers and tests use as jaxllm.train.X.
from jaxllm.errors import TrainingHalted  # noqa: F401
from jaxllm.loop.checkpointing import save_checkpoint  # noqa: F401
from jaxllm.loop.context import jit_step  # noqa: F401
from jaxllm.loop.evaluation import evaluate, save_if_best  # noqa: F401
from jaxllm.loop.loop import TrainResult, count_tokens, run_loop  # noqa: F401
from jaxllm.loop.metrics_log import MetricsLog  # noqa: F401
from jaxllm.loop.spike_guard import SpikeGuard  # noqa: F401
from jaxllm.report import read_metrics  # noqa: F401


def check_batch_fits_mesh(config: Config, mesh: jax.sharding.Mesh) -> None:
    parallel = sharding_lib.data_parallel_size(mesh)
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % parallel or config.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={config.train.batch_size} (micro-batches of {micro}) must be divisible "
                          f"by the data-parallel size mesh.data x mesh.fsdp = {parallel} and by the "
                          f"{jax.process_count()} processes; change the batch size or the mesh")


def load_tokenizer(config: Config):
    try:
        tokenizer = Tokenizer.load(config.data.tokenizer)
    except RuntimeError as error:  # sentencepiece's parse failure of a damaged or foreign file
        raise DataError(f"data.tokenizer={config.data.tokenizer}: not a readable sentencepiece model "
                        f"({str(error).strip()[:200]}); point it at a directory made by `jaxllm tokenizer train` "
                        "or use data.tokenizer=default") from None
    check_vocab(tokenizer, config.model.vocab_size)
    return tokenizer


def check_init_from(config: Config, tokenizer, workdir: Path) -> None:
    """`train.init_from` must be an existing directory holding a finished checkpoint made with this run's
    tokenizer; checked before the workdir is touched. A resumed run reads it only for a frozen reference or
    LoRA base (its params come from its own checkpoint), so only then must it still exist."""
    init_from = config.train.init_from
    if not init_from:
        return
    resuming = ckpt.latest_step(workdir) is not None
    if resuming and not (config.model.lora_rank or stages_lib.get(config.train.stage).needs_reference):
        return
    if not Path(init_from).exists():
        raise ckpt.CheckpointError(f"train.init_from={init_from}: no such directory ({Path(init_from).absolute()} "
                                   "does not exist); check the path (it names the workdir of an earlier stage)")
    if not config.model.lora_rank:
        ckpt.check_tokenizer(ckpt.read_meta(init_from), tokenizer, init_from)


def lock_workdir(workdir: Path, what: str = "jaxllm train") -> WorkdirLock | None:
    """The workdir's exclusive lock, taken by process 0 only (one lock per run; see the README on shared
    multi-host workdirs). None on the other processes."""
    if jax.process_index() != 0:
        return None
    return WorkdirLock(workdir, what).acquire()


def check_resume_config(saved: dict | None, config: Config, step: int, where: str,
                        log: Callable[[str], None]) -> None:
    """Compares the checkpoint's saved config with this run's: a change of the model, tokenizer, data, stage,
    seed or batch size is a ConfigError listing every changed key; a schedule change warns once per key
    with the old and new value and the learning rate at the next step under both; other changes that
    alter training warn once per key; changes that only affect logging, checkpointing or the kernels used
    are silent."""
    if not isinstance(saved, dict):
        return
    changes = compare_for_resume(saved, config)
    if changes.incompatible:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes.incompatible)
        raise ConfigError(f"{where} was trained with another model, tokenizer, data, stage, seed or batch size "
                          f"({len(changes.incompatible)} changed: {listed}); resuming would continue a different run. "
                          "Use the checkpoint's settings (see the workdir's config.yaml) or choose a new --workdir")
    if changes.schedule:
        old_lr, new_lr = _learning_rates_at(saved, config, step)
        for key, old, new in changes.schedule:
            effect = (f"the run now ends at step {new} instead of {old}, so the decay after the resume point is "
                      f"{'compressed' if new < old else 'stretched'}" if key == "train.steps"
                      else "the schedule from the resume point on uses the new value")
            log(f"warning: {key} changed since checkpoint {step}: {old!r} -> {new!r}; steps 1-{step} followed the old "
                f"learning-rate schedule and {effect} (learning rate at step {step + 1}: {old_lr:.4g} on the old "
                f"schedule, {new_lr:.4g} on the new)")
    for key, old, new in changes.other:
        log(f"warning: {key} changed since checkpoint {step}: {old!r} -> {new!r}; steps 1-{step} were trained with "
            f"the old value, the steps from {step + 1} on use the new one")


def _learning_rates_at(saved: dict, config: Config, step: int) -> tuple[float, float]:
    """The learning rate of update `step + 1` under the saved settings and under this run's."""
    names = {f.name for f in dataclasses.fields(config.optimizer)}
    saved_optimizer = dataclasses.replace(config.optimizer, **{k: v for k, v in (saved.get("optimizer") or {}).items()
                                                               if k in names})
    saved_steps = int((saved.get("train") or {}).get("steps", config.train.steps))
    return (state_lib.learning_rate(saved_optimizer, saved_steps, step),
            state_lib.learning_rate(config.optimizer, config.train.steps, step))


def setup(config: Config, workdir: str | Path, mesh: jax.sharding.Mesh | None = None, tokenizer=None,
          log: Callable[[str], None] = print) -> RunContext:
    """Checks everything, then locks the workdir and builds or restores the state. Nothing in the workdir
    is written here except its lock file (config.yaml is written by `run_loop`, once every check passed).
    On failure the lock is released and the checkpoint manager shut down."""
    sharding_lib.maybe_initialize_distributed(config.mesh)
    workdir = Path(workdir).absolute()
    mesh = mesh or sharding_lib.make_mesh(config.mesh)
    check_batch_fits_mesh(config, mesh)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
    check_init_from(config, tokenizer, workdir)
    ckpt.check_writable(workdir)
    lock = lock_workdir(workdir)
    manager = None
    try:
        built = step_builder.build(config, mesh)
        graphdef, abstract_params, optimizer = built.graphdef, built.abstract_params, built.optimizer
        abstract_state, shardings = built.abstract_state, built.state_shardings

        manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints,
                                    async_save=config.train.async_checkpointing)
        resume_step = manager.latest_step()
        data_state = None
        reference_params = None
        guard_state: dict = {}
        with jax.set_mesh(mesh):
            if resume_step is not None:
                where = f"{workdir}/checkpoints/{resume_step}"
                saved_meta = ckpt.read_meta(workdir, resume_step)
                ckpt.check_tokenizer(saved_meta, tokenizer, where)
                check_resume_config(saved_meta.get("config"), config, resume_step, where, log)
                state, data_state, meta = ckpt.restore(manager, resume_step,
                                                       abstract_with_shardings(abstract_state, shardings))
                guard_state = meta.get("guard") or {}
                log(f"resumed {workdir} at step {resume_step}")
            else:
                params = _initial_params(config, graphdef, abstract_params, shardings.params, built.heads, log)
                state = jax.jit(lambda p: state_lib.create_state(p, optimizer, config.train.seed),
                                out_shardings=shardings)(params)
            if config.model.lora_rank:
                reference_params = lora_lib.load_base(config, built.base_abstract, mesh)
            elif built.stage.needs_reference:
                reference_params = _reference_params(config, state, abstract_params, shardings.params, resume_step,
                                                     log)
    except BaseException:
        release(manager, lock)
        raise
    return RunContext(config, workdir, mesh, graphdef, optimizer, state, shardings, reference_params, manager,
                      tokenizer, data_state, resume_step, guard_state, built, lock)


def _initial_params(config: Config, graphdef, abstract_params, param_shardings, heads: tuple[str, ...], log) -> Any:
    model_abstract = step_builder.without_heads(abstract_params)
    model_shardings = step_builder.without_heads(param_shardings)
    if config.model.lora_rank:
        params = jax.jit(lambda: lora_lib.init_adapters(config.model, config.train.seed), out_shardings=model_shardings)()
        log(f"LoRA rank {config.model.lora_rank} adapters on the frozen base {config.train.init_from}")
    elif config.train.init_from:
        params = lora_lib.load_params(config.train.init_from, abstract_with_shardings(model_abstract, model_shardings))
        log(f"initialised params from {config.train.init_from} (fresh optimizer)")
    else:
        params = compile_once_run(jax.jit(lambda: model_lib.init_model(config.model, config.train.seed)[1],
                                          out_shardings=model_shardings))()
    if heads:
        params[model_lib.HEADS_KEY] = jax.jit(lambda: state_lib.init_heads(config.model, heads, config.train.seed),
                                              out_shardings=param_shardings[model_lib.HEADS_KEY])()
    return params


def compile_once_run(jitted):
    """A program that runs once (the random init), compiled for compile speed: on CPU with LLVM at -O1, which
    compiles the tiny model's init in 0.75 s instead of 2.7 s (per-weight truncated-normal kernels); the values
    agree to float32 rounding (a few elements in a hundred differ in the last bit; the default pipeline's init
    came out bitwise equal); elsewhere as usual."""
    if not model_lib.on_cpu():
        return jitted
    return jitted.lower().compile(compiler_options={"xla_backend_optimization_level": 1})


def _reference_params(config: Config, state, abstract_params, param_shardings, resume_step, log):
    """The frozen reference: the init_from params (reloaded on resume), else the initial params."""
    model_abstract = step_builder.without_heads(abstract_params)
    model_shardings = step_builder.without_heads(param_shardings)
    if config.train.init_from:
        return lora_lib.load_params(config.train.init_from, abstract_with_shardings(model_abstract, model_shardings))
    if resume_step is not None:
        log("warning: no init_from; the reference is the resumed params, not the original initialisation")
    return jax.tree.map(jnp.copy, step_builder.without_heads(state.params))


def train(config: Config, workdir: str | Path, *, mesh=None, tokenizer=None, batch_iterator=None,
          eval_batches: list | None = None, log: Callable[[str], None] = print,
          max_steps_this_run: int | None = None, **stage_options) -> TrainResult:
    """Trains the configured stage to `train.steps`, resuming from the workdir's checkpoint if present.

    batch_iterator: default `jaxllm.stages.make_batch_iterator(config)` (prompt batches for on-policy
    stages); `max_steps_this_run` stops early (with a checkpoint), as a preemption would; stage_options
    go to an on-policy stage's rollout hooks (rl: eval_prompts, reward_functions)."""
    stage = stages_lib.of(config, **stage_options)
    sharding_lib.maybe_initialize_distributed(config.mesh)  # before anything asks JAX about processes
    with signals.stop_signals():
        # The mesh, tokenizer and data are checked first: bad input fails before the workdir is written.
        mesh = mesh or sharding_lib.make_mesh(config.mesh)
        check_batch_fits_mesh(config, mesh)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
        if batch_iterator is None:
            batch_iterator = stages_lib.make_batch_iterator(config, tokenizer or None, "train", jax.process_index(),
                                                            jax.process_count())
        if eval_batches is None and stage.rollouts is None:
            eval_batches = stages_lib.make_eval_batches(config, tokenizer or None, config.train.eval_batches,
                                                        jax.process_index(), jax.process_count())
        context = None
        try:
            context = setup(config, workdir, mesh=mesh, tokenizer=tokenizer, log=log)
            prepare_batch = evaluate_fn = hooks = None
            if stage.rollouts is not None:  # on-policy: each update's batch is sampled from the current params
                hooks = stage.rollouts(context, batch_iterator, log, **stage_options)
                batch_iterator, prepare_batch, evaluate_fn = hooks.batches, hooks.prepare, hooks.evaluate
            if context.data_state is not None:
                restore_data_position(context, batch_iterator, log)
            result = run_loop(context, batch_iterator, context.built.train_step, context.built.eval_step,
                              eval_batches or [], prepare_batch=prepare_batch, evaluate_fn=evaluate_fn, log=log,
                              max_steps_this_run=max_steps_this_run)
            if hooks is not None and hooks.finish is not None:
                hooks.finish(context)
            return result
        except BaseException as error:
            if context is not None:
                release(context.manager, context.lock)
            failure = ckpt.write_failure(error, workdir) if isinstance(error, Exception) else None
            if failure is not None:
                raise failure from error
            raise


def restore_data_position(context: RunContext, batch_iterator, log: Callable[[str], None] = print) -> None:
    """Puts the iterator at the checkpoint's data position. Data whose content changed since the checkpoint
    is an error unless `data.allow_change=true` (then a warning); a damaged saved position names the
    checkpoint."""
    where = f"{context.workdir}/checkpoints/{context.resumed_from}"
    saved = context.data_state
    saved_fingerprint = saved.get("data_fingerprint") if isinstance(saved, dict) else None
    current = getattr(batch_iterator, "fingerprint", None)
    if saved_fingerprint and current and saved_fingerprint != current:
        if not context.config.data.allow_change:
            raise DataError(f"the data (its content, tokenizer or settings) changed since {where} was saved "
                            f"(fingerprint {saved_fingerprint} -> {current}); resuming would continue at batch "
                            f"{saved.get('step')} of other data. Restore the data, start a new --workdir, or set "
                            "data.allow_change=true to continue on the new data")
        log(f"warning: the data changed since {where} was saved; continuing at batch {saved.get('step')} of the "
            "new data (data.allow_change=true)")
        saved = {**saved, "data_fingerprint": current}
    try:
        batch_iterator.set_state(saved)
    except DataError as error:
        raise DataError(f"{where}: its saved data position does not fit this run: {error}") from None
