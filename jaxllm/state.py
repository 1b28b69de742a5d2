"""The one train state every stage uses, the optimizer, and their shardings."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm.config import Config, ModelConfig, OptimizerConfig

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    """step: [] int32 (batches consumed); params: model params (+ optional 'heads');
    opt_state: optax state; rng: [2] uint32 raw PRNG key data."""

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array


def optimizer_values(config: OptimizerConfig, total_steps: int) -> dict[str, float]:
    """The numbers of an optimizer config that the update may take as program inputs (`make_optimizer`'s
    `values`): the learning-rate schedule's, the weight decay and the clipping norm. The Adam betas and
    epsilon stay constants of the program: optax computes 1 - beta inside it, which in float32 would change
    the updates. The schedule's products of constants are folded here, in float32, as XLA folds them in
    optax's schedules (a division by a step count becomes a product with its reciprocal), so the learning
    rate is bitwise the same whether these numbers are constants or inputs."""
    peak, ratio = config.learning_rate, config.min_lr_ratio
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = peak * ratio
    f32 = np.float32
    return {"peak": peak, "warmup": warmup, "inverse_warmup": float(f32(1) / f32(warmup)) if warmup else 0.0,
            "decay_steps": decay_steps, "inverse_decay_steps": float(f32(1) / f32(decay_steps)),
            "angle_per_step": float(f32(np.pi) * (f32(1) / f32(decay_steps))),
            "alpha": ratio, "half_one_minus_alpha": float(f32(0.5) * f32(1 - ratio)), "end": end,
            "peak_minus_end": peak - end, "weight_decay": config.weight_decay,
            "grad_clip_norm": config.grad_clip_norm}


def learning_rate_at(count: jax.Array, kind: str, values: Mapping[str, Any]) -> jax.Array:
    """[] learning rate after `count` updates: linear warmup from 0 to values['peak'] over values['warmup']
    updates, then `kind` ("cosine" to peak * alpha, "linear" to values['end'], or "constant") over
    values['decay_steps']. optax's join_schedules(linear_schedule, cosine_decay_schedule / linear_schedule /
    constant_schedule) on `optimizer_values`, which may be traced arrays (optax's constructors need concrete
    step counts); tests/test_steps.py checks it against optax bit for bit."""
    peak, warmup, decay_steps = values["peak"], values["warmup"], values["decay_steps"]
    warm = (-peak) * (1 - jnp.clip(count, 0, warmup) * values["inverse_warmup"]) + peak
    decay_count = count - warmup
    if kind == "cosine":
        cosine = jnp.cos(jnp.minimum(decay_count, decay_steps) * values["angle_per_step"])
        decayed = ((cosine + 1) * values["half_one_minus_alpha"] + values["alpha"]) * peak
    elif kind == "linear":
        remaining = 1 - jnp.clip(decay_count, 0, decay_steps) * values["inverse_decay_steps"]
        decayed = values["peak_minus_end"] * remaining + values["end"]
    else:
        decayed = jnp.broadcast_to(jnp.asarray(peak, jnp.float32), jnp.shape(count))
    return jnp.where(count < warmup, warm, decayed)


def learning_rate(config: OptimizerConfig, total_steps: int, count: int) -> float:
    """The learning rate of the update after `count` updates, on the host."""
    return float(learning_rate_at(jnp.int32(count), config.schedule, optimizer_values(config, total_steps)))


def weight_decay_mask(params: Params, decay_embeddings: bool) -> Params:
    """True where weight decay applies: matrices, not norms/biases; embeddings only if asked."""

    def decays(path, leaf) -> bool:
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        if any(n in ("scale", "bias") or n.endswith("_bias") for n in names):
            return False
        if any(n in ("embed", "lm_head") for n in names):
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig, total_steps: int,
                   values: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    """Global-norm clipping (when config.grad_clip_norm > 0) and AdamW with the config's schedule. `values`:
    `optimizer_values` as arrays, given where the update is traced with them as inputs, so that one compiled
    update serves every stage whose optimizers differ only in these numbers (the persistent compilation
    cache then finds it); the same state and the same arithmetic as with the config's numbers."""
    values = optimizer_values(config, total_steps) if values is None else values
    return optax.chain(
        optax.clip_by_global_norm(values["grad_clip_norm"]) if config.grad_clip_norm > 0 else optax.identity(),
        optax.adamw(functools.partial(learning_rate_at, kind=config.schedule, values=values), b1=config.beta1,
                    b2=config.beta2, eps=config.eps, weight_decay=values["weight_decay"],
                    mask=lambda p: weight_decay_mask(p, config.decay_embeddings)),
    )


def init_heads(model_config: ModelConfig, names: tuple[str, ...], seed: int) -> Params:
    """Scalar heads (reward/value) on the final hidden state: {name: {"kernel": [D], "bias": []}}."""
    heads = {}
    for i, name in enumerate(names):
        key = jax.random.key(seed + 1000 + i)
        heads[name] = {
            "kernel": 0.02 * jax.random.normal(key, (model_config.d_model,), jnp.float32),
            "bias": jnp.zeros((), jnp.float32),
        }
    return heads


def create_state(params: Params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def param_logical_axes(config: Config, params_like: Params) -> Params:
    axes = _restrict(model_lib.logical_axes(config.model), params_like)  # LoRA states hold only the adapters
    if model_lib.HEADS_KEY in params_like:
        axes[model_lib.HEADS_KEY] = jax.tree.map(lambda leaf: (None,) * len(leaf.shape),
                                                 params_like[model_lib.HEADS_KEY])
    return axes


def _restrict(axes: Params, like: Params) -> Params:
    """The part of the axes tree whose keys `like` (a params tree, maybe a subset) also has."""
    return {k: _restrict(axes[k], v) if isinstance(v, dict) else axes[k] for k, v in like.items() if k in axes}


def state_shardings(config: Config, abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Shardings for every leaf of the state; optimizer moments take their parameter's sharding
    (matched by key path), everything else in the optimizer state is replicated."""
    axes = param_logical_axes(config, abstract_state.params)
    param_shardings = sharding_lib.tree_shardings(abstract_state.params, axes, mesh)
    replicated = sharding_lib.replicated(mesh)
    by_path = {_path_key(path): s for path, s in jax.tree_util.tree_leaves_with_path(param_shardings)}

    def opt_leaf(path, leaf):
        keys = _path_key(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
                return sharding
        return replicated

    opt_shardings = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def optimizer_total_steps(config: Config) -> int:
    return config.train.steps
