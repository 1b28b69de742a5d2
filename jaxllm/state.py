"""The one train state every stage uses, the optimizer, and their shardings."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
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


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak = config.learning_rate
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = peak * config.min_lr_ratio
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


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


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=config.beta1, b2=config.beta2, eps=config.eps, weight_decay=config.weight_decay,
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
