"""Compute-optimal planning (Chinchilla): how big a model, how many tokens, for a FLOP budget.

Training compute, in FLOPs, for a dense decoder with N parameters trained on D tokens:

    C ≈ 6·N·D                       (dense part: 2 FLOPs per multiply-add, ×3 for forward + backward)
      + 12·L·T·(h·hd)·D             (attention scores Q·Kᵀ and the weighted sum A·V: per token and
                                     layer 2·T·(h·hd) each forward, i.e. 4·L·T·(h·hd), ×3 for backward)

with L layers, T the sequence length (context), h heads of size hd. The attention term is counted
for full (not causal-halved) T×T score matrices, as PaLM and nanoGPT's MFU do. The planner itself uses
C = 6·N·D like Hoffmann et al. (2022); `flops_per_token` reports the attention term next to it.

Three ways to split C into N and D are shown side by side:
- the rule of thumb D = 20·N (Chinchilla: 70B parameters, 1.4T tokens);
- the parametric loss L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3), whose minimum
  under C = 6·N·D is N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)/N_opt, G = (α·A/(β·B))^(1/(α+β)).
  With the constants as published (E=1.69, A=406.4, B=410.7, α=0.34, β=0.28) this gives ~32B
  parameters and ~3T tokens (~93 tokens per parameter) at Chinchilla's 5.76e23 FLOPs — it does not
  reproduce the paper's own 20 tokens per parameter (the rounded constants are biased; Besiroglu et
  al. 2024, "Chinchilla Scaling: A replication attempt");
- the replication's refit (E=1.8172, A=482.01, B=2085.43, α=0.3478, β=0.3658), which gives ~72B
  parameters and ~1.3T tokens at that budget, in line with the paper's approaches 1 and 2.

The sweep half (`sweep_grid`, `fit_isoflop`, `plot_isoflop`) is approach 2: train several sizes at a
few fixed budgets, fit a parabola in log N per budget, and fit N_opt ∝ C^a, D_opt ∝ C^b.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from jaxllm import settings
from jaxllm.config import MODEL_PRESETS, ModelConfig

FLOPS_PER_PARAM_TOKEN = 6  # forward 2 + backward 4 FLOPs per parameter per token
TOKENS_PER_PARAM_RULE = 20.0  # Chinchilla: 70B parameters on 1.4T tokens
CHINCHILLA_FLOPS = 5.76e23  # Gopher's budget, at which Chinchilla (70B, 1.4T) was trained


@dataclasses.dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (loss in nats per token, N parameters, D tokens)."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    @property
    def params_exponent(self) -> float:
        """a in N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def tokens_exponent(self) -> float:
        """b in D_opt ∝ C^b (a + b = 1)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def _G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal_params(self, flops: float) -> float:
        return self._G * (flops / FLOPS_PER_PARAM_TOKEN) ** self.params_exponent

    def flops_for_optimal_params(self, params: float) -> float:
        """The budget at which `params` is the compute-optimal size (inverse of optimal_params)."""
        return FLOPS_PER_PARAM_TOKEN * (params / self._G) ** (1.0 / self.params_exponent)

    def flops_for_optimal_tokens(self, tokens: float) -> float:
        """The budget at which `tokens` is the compute-optimal data size."""
        # D_opt = (C/6)^(1-a) / G  =>  C = 6 (G D)^(1/(1-a))
        return FLOPS_PER_PARAM_TOKEN * (self._G * tokens) ** (1.0 / self.tokens_exponent)


CHINCHILLA_PUBLISHED = LossLaw("chinchilla-2022", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
                               source="Hoffmann et al. 2022, approach 3, constants as printed")
CHINCHILLA_REFIT = LossLaw("epoch-refit-2024", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                           source="Besiroglu et al. 2024, refit of Hoffmann et al.'s approach 3")
LOSS_LAWS: dict[str, LossLaw] = {law.name: law for law in (CHINCHILLA_PUBLISHED, CHINCHILLA_REFIT)}


# ----------------------------------------------------------------------------------------------
# Parameter and FLOP counts of the Llama-style model.

def _model_config(fields: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """ModelConfig from a preset's fields (or overrides with an optional 'preset' key)."""
    if isinstance(fields, ModelConfig):
        return fields
    fields = dict(fields)
    preset = fields.pop("preset", "") or ""
    merged: dict[str, Any] = {}
    if preset:
        if preset not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset '{preset}'; choose one of {', '.join(MODEL_PRESETS)}")
        merged.update(MODEL_PRESETS[preset])
    merged.update(fields)
    return settings.build(ModelConfig, merged, "model", ValueError, noun="model field")


def param_breakdown(model_config_fields: Mapping[str, Any] | ModelConfig) -> dict[str, int]:
    """Parameter counts by part for the Llama architecture (no biases).

    embedding vocab·d; per layer: q d·(h·hd), k and v d·(kv·hd) each, o (h·hd)·d, SwiGLU 3·d·ff,
    two RMSNorm scales d; a final RMSNorm d; an output head vocab·d unless tie_embeddings.
    """
    m = _model_config(model_config_fields)
    d, hd, ff = m.d_model, m.resolved_head_dim, m.resolved_d_ff
    attention = d * (m.num_heads * hd) + 2 * d * (m.num_kv_heads * hd) + (m.num_heads * hd) * d
    mlp = 3 * d * ff
    norms = 2 * d
    return {
        "embedding": m.vocab_size * d,
        "attention": m.num_layers * attention,
        "mlp": m.num_layers * mlp,
        "norms": m.num_layers * norms + d,
        "output_head": 0 if m.tie_embeddings else m.vocab_size * d,
    }


def count_params(model_config_fields: Mapping[str, Any] | ModelConfig) -> int:
    """Total parameters of the Llama-style model described by these ModelConfig fields."""
    return sum(param_breakdown(model_config_fields).values())


def flops_per_token(model_config_fields: Mapping[str, Any] | ModelConfig, seq_len: int | None = None) -> dict:
    """Training FLOPs per token (forward + backward).

    dense = 6 · (parameters used in matmuls): every parameter except the input embedding when it is
    untied (a lookup costs no FLOPs; a tied embedding is used once, as the output head).
    attention = 12 · L · T · (h·hd), T = seq_len (default: max_seq_len), full T×T scores.
    """
    m = _model_config(model_config_fields)
    parts = param_breakdown(m)
    matmul_params = sum(parts.values()) - (0 if m.tie_embeddings else parts["embedding"])
    seq_len = seq_len or m.max_seq_len
    dense = FLOPS_PER_PARAM_TOKEN * matmul_params
    attention = 12 * m.num_layers * seq_len * m.num_heads * m.resolved_head_dim
    return {"dense": dense, "attention": attention, "total": dense + attention, "seq_len": seq_len}


def preset_params() -> dict[str, int]:
    return {name: count_params(fields) for name, fields in MODEL_PRESETS.items()}


def nearest_preset(params: float) -> tuple[str, int]:
    """The preset whose parameter count is closest to `params` on a log scale."""
    counts = preset_params()
    name = min(counts, key=lambda n: abs(math.log(counts[n] / params)))
    return name, counts[name]


# ----------------------------------------------------------------------------------------------
# Planning: given one of C, N, D, the other two.

def _row(method: str, flops: float, params: float, tokens: float, law: LossLaw | None = None) -> dict:
    row = {"method": method, "flops": flops, "params": params, "tokens": tokens,
           "tokens_per_param": tokens / params}
    if law is not None:
        row["predicted_loss"] = law.loss(params, tokens)
    return row


def plan(*, flops: float | None = None, params: float | None = None, tokens: float | None = None,
         tokens_per_param: float = TOKENS_PER_PARAM_RULE, seq_len: int | None = None) -> dict:
    """Compute-optimal (N, D, C) from exactly one of flops, params, tokens, by each method.

    Returns {"given": ..., "rows": [{method, flops, params, tokens, tokens_per_param, ...}],
    "presets": [nearest preset per row with its own tokens and FLOPs]}.
    """
    given = {k: v for k, v in (("flops", flops), ("params", params), ("tokens", tokens)) if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of flops, params or tokens")
    (kind, value), = given.items()
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{kind} must be a positive finite number, got {value!r}")
    if tokens_per_param <= 0:
        raise ValueError(f"tokens_per_param must be positive, got {tokens_per_param}")
    k = FLOPS_PER_PARAM_TOKEN
    rows = []
    rule = f"rule: {tokens_per_param:g} tokens/param"
    if kind == "flops":
        n = math.sqrt(value / (k * tokens_per_param))
        rows.append(_row(rule, value, n, tokens_per_param * n))
        for law in LOSS_LAWS.values():
            n = law.optimal_params(value)
            rows.append(_row(f"law: {law.name}", value, n, value / (k * n), law))
    elif kind == "params":
        rows.append(_row(rule, k * value * tokens_per_param * value, value, tokens_per_param * value))
        for law in LOSS_LAWS.values():
            c = law.flops_for_optimal_params(value)
            rows.append(_row(f"law: {law.name}", c, value, c / (k * value), law))
    else:
        n = value / tokens_per_param
        rows.append(_row(rule, k * n * value, n, value))
        for law in LOSS_LAWS.values():
            c = law.flops_for_optimal_tokens(value)
            rows.append(_row(f"law: {law.name}", c, c / (k * value), value, law))
    presets = []
    for row in rows:
        name, n = nearest_preset(row["params"])
        fields = MODEL_PRESETS[name]
        per_token = flops_per_token(fields, seq_len)
        # The preset trained at this row's budget (flops/params given) or on its tokens (tokens given).
        preset_tokens = row["tokens"] if kind == "tokens" else row["flops"] / (k * n)
        presets.append({"method": row["method"], "preset": name, "params": n, "tokens": preset_tokens,
                        "flops_6ND": k * n * preset_tokens,
                        "flops_with_attention": (per_token["total"] * preset_tokens),
                        "attention_share": per_token["attention"] / per_token["total"],
                        "seq_len": per_token["seq_len"]})
    return {"given": {kind: value}, "tokens_per_param_rule": tokens_per_param, "rows": rows, "presets": presets,
            "laws": {law.name: dataclasses.asdict(law) for law in LOSS_LAWS.values()}}


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(result: dict) -> str:
    (kind, value), = result["given"].items()
    lines = [f"Compute-optimal plan for {kind} = {value:.3g}  (C = 6·N·D)", ""]
    header = f"{'method':<28} {'FLOPs':>10} {'params N':>10} {'tokens D':>10} {'D/N':>7} {'loss':>6}"
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        loss = f"{row['predicted_loss']:.3f}" if "predicted_loss" in row else ""
        lines.append(f"{row['method']:<28} {row['flops']:>10.3g} {_human(row['params']):>10} "
                     f"{_human(row['tokens']):>10} {row['tokens_per_param']:>7.1f} {loss:>6}")
    basis = "the same tokens" if kind == "tokens" else "tokens for the same budget"
    lines += ["", f"Nearest model preset ({basis}; FLOPs also with the attention term):"]
    header = (f"{'method':<28} {'preset':>7} {'params':>9} {'N/preset':>9} {'tokens':>9} {'6ND':>10} "
              f"{'+attn':>10} {'attn%':>6}")
    lines += [header, "-" * len(header)]
    for row, p in zip(result["rows"], result["presets"]):
        lines.append(f"{p['method']:<28} {p['preset']:>7} {_human(p['params']):>9} "
                     f"{row['params'] / p['params']:>8.2g}x {_human(p['tokens']):>9} "
                     f"{p['flops_6ND']:>10.3g} {p['flops_with_attention']:>10.3g} "
                     f"{100 * p['attention_share']:>5.1f}%")
    lines += ["", "Laws: " + "; ".join(f"{law['name']} = {law['source']}" for law in result["laws"].values()),
              "The published 2022 constants give more tokens per parameter than the paper's 20; the 2024 refit "
              "agrees with it."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The sweep: a grid of (budget, size) runs, and the iso-FLOP fit of their losses.

class SweepRun(NamedTuple):
    flops: float  # the budget this run belongs to (nominal)
    model: dict  # ModelConfig overrides for this size
    steps: int  # optimizer steps: tokens / tokens_per_step
    params: int  # count_params of the resolved model
    tokens: int  # steps · tokens_per_step (≈ flops / (6·params))


def default_sweep_sizes(widths: Iterable[int] = (32, 48, 64, 96, 128)) -> list[dict]:
    """CPU-sized models from one dial (width): depth = width/32, heads of size 16."""
    return [dict(d_model=w, num_layers=max(1, w // 32), num_heads=max(1, w // 16), num_kv_heads=max(1, w // 16))
            for w in widths]


def sweep_grid(budgets: Iterable[float], sizes: Iterable[Mapping[str, Any] | str], *, tokens_per_step: int,
               base_model: Mapping[str, Any] | None = None, min_steps: int = 1) -> list[SweepRun]:
    """One run per (budget, size): tokens D = C / (6·N), steps = round(D / tokens_per_step).

    sizes: ModelConfig overrides (dicts, may name a 'preset') or preset names; base_model: fields
    shared by every size (e.g. vocab_size of the tokenizer). Runs with fewer than min_steps steps are
    left out (that size is too big for that budget).
    """
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be at least 1, got {tokens_per_step}")
    runs = []
    for budget in budgets:
        if not budget > 0:
            raise ValueError(f"every FLOP budget must be positive, got {budget!r}")
        for size in sizes:
            overrides = {"preset": size} if isinstance(size, str) else dict(size)
            fields = {**(base_model or {}), **overrides}
            params = count_params(fields)
            steps = round(budget / (FLOPS_PER_PARAM_TOKEN * params) / tokens_per_step)
            if steps >= min_steps:
                runs.append(SweepRun(float(budget), overrides, steps, params, steps * tokens_per_step))
    return runs


def _linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


def _group_by_budget(results: Sequence[Mapping[str, float]], rtol: float = 0.01) -> list[tuple[float, list]]:
    groups: list[tuple[float, list]] = []
    for r in sorted(results, key=lambda r: r["flops"]):
        if groups and abs(r["flops"] - groups[-1][0]) <= rtol * groups[-1][0]:
            groups[-1][1].append(r)
        else:
            groups.append((float(r["flops"]), [r]))
    return groups


def fit_isoflop(results: Sequence[Mapping[str, float]]) -> dict:
    """Chinchilla approach 2 over runs [{flops, params, tokens, loss}, ...].

    Per budget (runs whose flops agree within 1%): fit loss = c2·x² + c1·x + c0, x = ln N; the vertex
    gives N_opt and the loss there; likewise in ln D for D_opt. Budgets with fewer than 3 sizes or
    no minimum (c2 ≤ 0) are reported but not used. Then ln N_opt = a·ln C + ln k_N and
    ln D_opt = b·ln C + ln k_D by least squares (needs 2 usable budgets).
    """
    import numpy as np

    for i, r in enumerate(results):
        for key in ("flops", "params", "tokens", "loss"):
            value = r.get(key) if isinstance(r, Mapping) else None
            if not isinstance(value, (int, float)) or not math.isfinite(value) or (key != "loss" and value <= 0):
                raise ValueError(f"run {i}: '{key}' must be a finite number (positive unless loss), got {value!r}")
    budgets = []
    for flops, runs in _group_by_budget(results):
        entry: dict[str, Any] = {"flops": flops, "runs": len(runs), "used": False}
        sizes = {r["params"] for r in runs}
        if len(sizes) < 3:
            entry["reason"] = f"needs at least 3 model sizes, has {len(sizes)}"
            budgets.append(entry)
            continue
        loss = np.array([r["loss"] for r in runs], float)
        for key, name in (("params", "params_opt"), ("tokens", "tokens_opt")):
            x = np.log(np.array([r[key] for r in runs], float))
            c2, c1, c0 = np.polyfit(x, loss, 2)
            if c2 <= 0:
                entry["reason"] = f"loss against ln({key}) is not U-shaped (curvature {c2:.3g} ≤ 0)"
                break
            vertex = -c1 / (2 * c2)
            entry[name] = float(np.exp(vertex))
            entry[f"curvature_{key}"] = float(c2)
            if key == "params":
                entry["loss_opt"] = float(c0 - c1 * c1 / (4 * c2))
                entry["inside_grid"] = bool(x.min() <= vertex <= x.max())
        else:
            entry["used"] = True
        budgets.append(entry)
    used = [b for b in budgets if b["used"]]
    if len(used) < 2:
        raise ValueError(f"fit_isoflop needs at least 2 FLOP budgets with a U-shaped curve over ≥3 sizes; "
                         f"got {len(used)} of {len(budgets)} ({[b.get('reason', 'ok') for b in budgets]})")
    log_c = [math.log(b["flops"]) for b in used]
    a, log_kn = _linear_fit(log_c, [math.log(b["params_opt"]) for b in used])
    b_, log_kd = _linear_fit(log_c, [math.log(b["tokens_opt"]) for b in used])
    return {"params_exponent": a, "params_coefficient": math.exp(log_kn),
            "tokens_exponent": b_, "tokens_coefficient": math.exp(log_kd),
            "budgets": budgets, "method": "iso-FLOP parabola in ln N per budget, then log-log line (approach 2)"}


def predict_optimum(fit: Mapping[str, float], flops: float) -> dict:
    """N_opt and D_opt at a budget from fit_isoflop's power laws."""
    n = fit["params_coefficient"] * flops ** fit["params_exponent"]
    d = fit["tokens_coefficient"] * flops ** fit["tokens_exponent"]
    return {"flops": flops, "params": n, "tokens": d, "tokens_per_param": d / n}


def plot_isoflop(results: Sequence[Mapping[str, float]], fit: Mapping[str, Any], png_path: str | Path) -> Path:
    """Two panels: loss against N per budget with the fitted parabolas; N_opt and D_opt against C."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    curves, optima = figure.subplots(1, 2)
    groups = _group_by_budget(results)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    by_flops = {b["flops"]: b for b in fit.get("budgets", [])}
    for colour, (flops, runs) in zip(colours, groups):
        n = np.array([r["params"] for r in runs], float)
        loss = np.array([r["loss"] for r in runs], float)
        curves.scatter(n, loss, color=colour, s=18, label=f"C={flops:.2g}")
        budget = by_flops.get(flops)
        if budget and budget.get("used"):
            x = np.log(n)
            c2, c1, c0 = np.polyfit(x, loss, 2)
            grid = np.linspace(x.min(), x.max(), 100)
            curves.plot(np.exp(grid), c2 * grid**2 + c1 * grid + c0, color=colour, lw=1)
            curves.scatter([budget["params_opt"]], [budget["loss_opt"]], color=colour, marker="*", s=120,
                           edgecolor="black", zorder=3)
    curves.set(xscale="log", xlabel="parameters N", ylabel="loss", title="iso-FLOP curves")
    curves.legend(fontsize=7)
    used = [b for b in fit.get("budgets", []) if b.get("used")]
    if used:
        c = np.array([b["flops"] for b in used])
        line = np.geomspace(c.min(), c.max(), 50)
        optima.scatter(c, [b["params_opt"] for b in used], color="C0", label="N_opt")
        optima.plot(line, fit["params_coefficient"] * line ** fit["params_exponent"], color="C0",
                    label=f"N ∝ C^{fit['params_exponent']:.2f}")
        optima.scatter(c, [b["tokens_opt"] for b in used], color="C1", label="D_opt")
        optima.plot(line, fit["tokens_coefficient"] * line ** fit["tokens_exponent"], color="C1",
                    label=f"D ∝ C^{fit['tokens_exponent']:.2f}")
    optima.set(xscale="log", yscale="log", xlabel="FLOPs C", title="compute-optimal N and D")
    optima.legend(fontsize=7)
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=110)
    return png_path


__all__ = [
    "FLOPS_PER_PARAM_TOKEN", "TOKENS_PER_PARAM_RULE", "CHINCHILLA_FLOPS", "LossLaw", "LOSS_LAWS",
    "CHINCHILLA_PUBLISHED", "CHINCHILLA_REFIT", "param_breakdown", "count_params", "flops_per_token",
    "preset_params", "nearest_preset", "plan", "format_plan", "SweepRun", "default_sweep_sizes",
    "sweep_grid", "fit_isoflop", "predict_optimum", "plot_isoflop",
]
