"""`jaxllm sweep`: train a grid of model sizes at a few fixed FLOP budgets and fit the compute-optimal law.

Chinchilla's approach 2 at CPU scale. For every budget C and every size N in the grid, one pretraining
run on D = C / (6·N) tokens (`jaxllm.lecture.planning.sweep_grid`); each run's final eval loss goes into
`jaxllm.lecture.planning.fit_isoflop` (a parabola in ln N per budget, then N_opt ∝ C^a and D_opt ∝ C^b), and
`plot_isoflop` draws the iso-FLOP curves. Outputs in the workdir:

    runs/C3e10-d16-l1/    one ordinary training workdir per run (resumable, inspectable)
    sweep.json            settings, every run {flops, params, tokens, steps, loss, ...}, the fit (or why not)
    isoflop.png           loss against N per budget with the fitted parabolas; N_opt and D_opt against C

Running the command again skips finished runs (their summary.json holds the final eval loss) and resumes
an interrupted one from its checkpoint. The defaults (5 widths × 3 budgets, 12k–140k parameters,
vocabulary 512, 64-token rows, batch 8; 6.1M tokens in all) took 16 minutes on a busy 2-core VM. The
fit needs at least 2 budgets whose losses are U-shaped over at least 3 sizes; the sweep says which
budgets were not and why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from jaxllm.lecture import planning
from jaxllm.config import ConfigError, load_config
from jaxllm.errors import UsageError
from jaxllm.train import train

# Model fields that define a size in the grid (the rest come from the recipe and the overrides).
SIZE_FIELDS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff")


@dataclasses.dataclass
class SweepSettings:
    """What to train. Budgets in FLOPs (C = 6·N·D); widths pick sizes via `planning.default_sweep_sizes`."""

    budgets: tuple[float, ...] = (3e10, 6e10, 1e11)
    widths: tuple[int, ...] = (16, 24, 32, 48, 64)
    recipe: str | None = None  # a YAML recipe every run starts from (default: the built-in pretraining config)
    source: str = "default:pretrain"
    eval_source: str = "default:pretrain_eval"
    seq_len: int = 64
    batch_size: int = 8
    learning_rate: float = 3e-3
    min_steps: int = 10  # sizes that get fewer steps at a budget are left out of that budget
    eval_batches: int = 4
    seed: int = 0
    overrides: tuple[str, ...] = ()  # key.sub=value for every run, e.g. mesh.num_devices=1

    def validate(self) -> None:
        if not self.budgets:
            raise UsageError("the sweep needs at least one FLOP budget (--budgets 1e10,3e10)")
        for budget in self.budgets:
            if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
                raise UsageError(f"FLOP budget {budget!r} must be a positive number, e.g. 1e10")
        if not self.widths:
            raise UsageError("the sweep needs at least one model width (--widths 16,32,64)")
        for width in self.widths:
            heads = max(1, width // 16) if isinstance(width, int) else 1
            if not isinstance(width, int) or width < 8 or width % heads:
                raise UsageError(f"width {width!r} must be at least 8 and divisible by its {heads} heads "
                                 "(width // 16 of them), e.g. 16,24,32,48,64")
        for name in ("seq_len", "batch_size", "min_steps", "eval_batches"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UsageError(f"learning-rate must be positive, got {self.learning_rate}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step: packed rows are full, so batch_size · seq_len."""
        return self.batch_size * self.seq_len


def run_name(run: planning.SweepRun) -> str:
    """A directory name for a run, e.g. 'C3e10-d32-l1'."""
    mantissa, exponent = f"{run.flops:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    model = run.model
    size = f"d{model.get('d_model', 'x')}-l{model.get('num_layers', 'x')}"
    return f"C{mantissa}e{int(exponent)}-{size}"


def _base_overrides(settings: SweepSettings) -> list[str]:
    return [
        "train.stage=pretrain", f"data.source={settings.source}", f"data.eval_source={settings.eval_source}",
        f"data.seq_len={settings.seq_len}", f"train.batch_size={settings.batch_size}",
        f"optimizer.learning_rate={settings.learning_rate}", f"train.eval_batches={settings.eval_batches}",
        f"train.seed={settings.seed}", "train.eval_every=0", "train.progress=false", *settings.overrides,
    ]


def plan_runs(settings: SweepSettings) -> list[tuple[planning.SweepRun, Any]]:
    """(run, its Config) for every (budget, size) of the grid, in budget then size order."""
    settings.validate()
    base = load_config(settings.recipe, _base_overrides(settings))
    base_model = {k: v for k, v in dataclasses.asdict(base.model).items() if k != "preset" and k not in SIZE_FIELDS}
    base_model["max_seq_len"] = max(base.model.max_seq_len, settings.seq_len)
    sizes = planning.default_sweep_sizes(settings.widths)
    runs = planning.sweep_grid(settings.budgets, sizes, tokens_per_step=settings.tokens_per_step,
                               base_model=base_model, min_steps=settings.min_steps)
    if not runs:
        smallest = min(planning.count_params({**base_model, **size}) for size in sizes)
        needed = planning.FLOPS_PER_PARAM_TOKEN * smallest * settings.tokens_per_step * settings.min_steps
        raise UsageError(f"no run gets at least {settings.min_steps} steps: raise the budgets or lower the widths "
                         f"(the smallest model needs about {needed:.2g} FLOPs)")
    planned = []
    for run in runs:
        fields = {**run.model, "max_seq_len": base_model["max_seq_len"]}
        model_overrides = [f"model.{key}={value}" for key, value in fields.items()]
        steps = [f"train.steps={run.steps}", f"optimizer.warmup_steps={max(1, min(20, run.steps // 10))}",
                 f"train.checkpoint_every={run.steps}", f"train.log_every={max(1, run.steps // 10)}"]
        config = load_config(settings.recipe, _base_overrides(settings) + model_overrides + steps)
        counted = planning.count_params(config.model)
        if counted != run.params:  # the recipe's preset or an override changed the size behind the grid's back
            raise UsageError(f"run {run_name(run)}: the resolved model has {counted} parameters but the grid planned "
                             f"{run.params}; do not override model size fields ({', '.join(SIZE_FIELDS)}) in a sweep")
        planned.append((run, config))
    return planned


def _finished_loss(run_dir: Path, steps: int) -> float | None:
    """The final eval loss of a finished run, or None when the run has not finished."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return None
    loss = (summary.get("eval") or {}).get("loss")
    if summary.get("steps") != steps or not isinstance(loss, (int, float)):
        return None
    return float(loss)


def _check_same_run(run_dir: Path, config) -> None:
    """A run directory left by a different sweep (other steps, size or data) must not be resumed silently."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = load_config(saved_path)
    except ConfigError:
        return
    checks = {"train.steps": (saved.train.steps, config.train.steps), "model": (saved.model, config.model),
              "data.source": (saved.data.source, config.data.source),
              "data.seq_len": (saved.data.seq_len, config.data.seq_len),
              "train.batch_size": (saved.train.batch_size, config.train.batch_size),
              "optimizer.learning_rate": (saved.optimizer.learning_rate, config.optimizer.learning_rate)}
    different = [key for key, (old, new) in checks.items() if old != new]
    if different:
        raise UsageError(f"{run_dir} holds a run with a different {', '.join(different)} than this sweep plans; "
                         "use a new --workdir (or delete that run directory)")


def train_run(config, run_dir: Path, log: Callable[[str], None]) -> float:
    """Trains one run to the end (resuming if it was interrupted) and returns its final eval loss."""
    result = train(config, run_dir, log=log)
    loss = result.eval_metrics.get("loss")
    if result.stopped_early or loss is None:
        raise RuntimeError(f"run {run_dir} stopped at step {result.final_step} of {config.train.steps} "
                           "without a final eval loss; run the sweep again to resume it")
    return float(loss)


def run_sweep(settings: SweepSettings, workdir: str | Path, *, log: Callable[[str], None] = print,
              train_fn: Callable[[Any, Path, Callable[[str], None]], float] = train_run) -> dict[str, Any]:
    """Trains (or skips, when finished) every run of the grid, fits the iso-FLOP law, writes sweep.json
    and isoflop.png into `workdir`, and returns the sweep.json content.

    train_fn(config, run_dir, log) -> final eval loss; the default trains with `jaxllm.train.train`."""
    workdir = Path(workdir).absolute()
    planned = plan_runs(settings)
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"sweep: {len(planned)} runs over {len(settings.budgets)} budgets, "
        f"{settings.tokens_per_step} tokens per step, in {workdir}")
    results = []
    for number, (run, config) in enumerate(planned, 1):
        name = run_name(run)
        run_dir = workdir / "runs" / name
        _check_same_run(run_dir, config)
        loss = _finished_loss(run_dir, run.steps)
        seconds = 0.0
        if loss is None:
            log(f"[{number}/{len(planned)}] {name}: N={run.params:,} parameters, D={run.tokens:,} tokens, "
                f"{run.steps} steps")
            started = time.perf_counter()
            loss = train_fn(config, run_dir, log)
            seconds = time.perf_counter() - started
            log(f"[{number}/{len(planned)}] {name}: eval loss {loss:.4f} ({seconds:.1f} s)")
        else:
            log(f"[{number}/{len(planned)}] {name}: finished earlier (eval loss {loss:.4f}), skipped")
        results.append({"name": name, "flops": run.flops, "params": run.params, "tokens": run.tokens,
                        "steps": run.steps, "model": run.model, "loss": loss, "seconds": seconds,
                        "workdir": str(run_dir)})
    report: dict[str, Any] = {"settings": dataclasses.asdict(settings), "tokens_per_step": settings.tokens_per_step,
                              "runs": results, "fit": None, "fit_error": None}
    fit: dict[str, Any] = {}
    try:
        fit = planning.fit_isoflop(results)
    except ValueError as error:
        report["fit_error"] = str(error)
        log(f"no fit: {error}")
    else:
        report["fit"] = fit
        report["optima"] = [planning.predict_optimum(fit, budget) for budget in settings.budgets]
    with warnings.catch_warnings():  # an empty optima panel (no fit) makes matplotlib warn about its legend
        warnings.simplefilter("ignore", UserWarning)
        png = planning.plot_isoflop(results, fit, workdir / "isoflop.png")
    report["png"] = str(png)
    (workdir / "sweep.json").write_text(json.dumps(report, indent=2))
    return report


def format_sweep(report: dict[str, Any]) -> str:
    lines = [f"{'run':<18} {'FLOPs':>9} {'params N':>10} {'tokens D':>10} {'steps':>6} {'eval loss':>9}"]
    lines.append("-" * len(lines[0]))
    for run in report["runs"]:
        lines.append(f"{run['name']:<18} {run['flops']:>9.2g} {run['params']:>10,} {run['tokens']:>10,} "
                     f"{run['steps']:>6} {run['loss']:>9.4f}")
    fit = report.get("fit")
    if fit:
        lines += ["", f"fit: N_opt ∝ C^{fit['params_exponent']:.2f}, D_opt ∝ C^{fit['tokens_exponent']:.2f} "
                      "(Chinchilla: both ≈ 0.5)"]
        for optimum in report.get("optima", []):
            lines.append(f"  C={optimum['flops']:.2g}: N_opt≈{optimum['params']:,.0f}, "
                         f"D_opt≈{optimum['tokens']:,.0f} "
                         f"({optimum['tokens_per_param']:.1f} tokens/parameter)")
    else:
        lines += ["", f"no fit: {report.get('fit_error')}"]
    lines.append(f"plot: {report['png']}")
    return "\n".join(lines)


__all__ = ["SweepSettings", "plan_runs", "run_name", "run_sweep", "train_run", "format_sweep"]
