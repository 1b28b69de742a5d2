"""LoRA: low-rank adapters on a frozen base, for every stage.

`model.lora_rank: 8` (with `model.lora_alpha`, `model.lora_targets: q,k,v,o,gate,up,down`) gives each
targeted projection W two float32 adapters, A [*in, r] (random) and B [r, *out] (zeros), and the model
computes x.W + (alpha / r) * (x.A).B (`jaxllm.model._project`). B = 0 at the start, so a fresh run
starts exactly at the base model.

How a LoRA run fits the one train state and the one generic step:
- `TrainState.params` holds only the trainable tree: the adapters (plus reward/value heads when the
  stage has them). Gradients and optimizer moments exist only for it; checkpoints save it alone.
- The frozen base (params of `train.init_from`, without adapters) is the step's `reference_params`
  argument. `adapter_loss` wraps any stage loss: the policy is base + adapters, the reference is the
  same base with the adapters at zero, so DPO/KTO/RL need no second copy of the weights.
- `combine(base, trainable)` builds the model's params (no copy: the leaves are shared);
  `merge(base, adapters, config)` folds the adapters into the weights (W + alpha/r * A.B) for export,
  generation and the next stage (`load_params` does this for any workdir, LoRA or not).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm import checkpoint as ckpt
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm.config import ModelConfig, load_config

Params = dict[str, Any]
_SUFFIXES = ("_lora_a", "_lora_b")
# adapter name -> (the module holding it, the weight it adapts)
_WEIGHTS = {"q": ("attention", "q_proj"), "k": ("attention", "k_proj"), "v": ("attention", "v_proj"),
            "o": ("attention", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
            "down": ("mlp", "down_proj")}


def is_adapter(name: str) -> bool:
    return name.endswith(_SUFFIXES)


def split(params: Params) -> tuple[Params, Params]:
    """A full params tree (with adapter leaves) -> (base without adapters, adapters only). Empty
    sub-dicts are dropped; leaves may be arrays, ShapeDtypeStructs or logical-axis tuples."""
    base: Params = {}
    adapters: Params = {}
    for key, value in params.items():
        if isinstance(value, dict):
            sub_base, sub_adapters = split(value)
            if sub_base:
                base[key] = sub_base
            if sub_adapters:
                adapters[key] = sub_adapters
        elif is_adapter(key):
            adapters[key] = value
        else:
            base[key] = value
    return base, adapters


def combine(base: Params, trainable: Params) -> Params:
    """base + trainable (adapters, heads) as one params tree; no arrays are copied."""
    out = dict(base)
    for key, value in trainable.items():
        out[key] = combine(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def adapters_only(trainable: Params) -> Params:
    return {k: v for k, v in trainable.items() if k != model_lib.HEADS_KEY}


def zero_adapters(trainable: Params) -> Params:
    """The adapters of `trainable` set to zero (heads dropped): the base model, exactly."""
    return jax.tree.map(jnp.zeros_like, adapters_only(trainable))


def init_adapters(config: ModelConfig, seed: int) -> Params:
    """Fresh adapters (A random, B zero). Under jit only the adapters are computed (the base's random
    initialisation is dead code), so this is cheap for any model size."""
    if not config.lora_rank:
        raise ValueError("init_adapters needs model.lora_rank > 0")
    return split(model_lib.init_model(config, seed)[1])[1]


def abstract_adapters(config: ModelConfig) -> Params:
    return split(model_lib.abstract_model(config)[1])[1]


def adapter_logical_axes(config: ModelConfig) -> Params:
    return split(model_lib.logical_axes(config))[1]


def count_adapter_params(config: ModelConfig) -> int:
    return int(sum(x.size for x in jax.tree.leaves(abstract_adapters(config))))


def merge(base: Params, adapters: Params, config: ModelConfig) -> Params:
    """The base with every adapter folded in: W + (alpha / r) * A.B, in W's dtype. [L, *in, r] x
    [L, r, *out] -> [L, *in, *out]. Other leaves (and any heads in `base`) are kept as they are."""
    scale = config.lora_alpha / config.lora_rank
    merged = jax.tree.map(lambda x: x, base)  # new dicts, same arrays
    blocks = adapters_only(adapters).get("blocks", {})
    for name, (module, weight_name) in _WEIGHTS.items():
        holder = blocks.get(module, {})
        if f"{name}_lora_a" not in holder:
            continue
        a, b = holder[f"{name}_lora_a"], holder[f"{name}_lora_b"]
        weight = merged["blocks"][module][weight_name]
        layers, rank = a.shape[0], a.shape[-1]
        delta = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank).astype(jnp.float32),
                           b.reshape(layers, rank, -1).astype(jnp.float32))
        updated = weight.astype(jnp.float32) + scale * delta.reshape(weight.shape)
        merged["blocks"][module][weight_name] = updated.astype(weight.dtype)
    return merged


def adapter_loss(loss_fn: Callable) -> Callable:
    """A stage loss `(params, batch, reference_params)` -> the same loss of a LoRA run, called as
    `(trainable, batch, base)`: the policy is base + trainable, the reference is the base with the
    adapters at zero. Only `trainable` is differentiated by the generic step."""

    def wrapped(trainable, batch, base):
        base = jax.lax.stop_gradient(base)
        reference = combine(base, zero_adapters(trainable))
        return loss_fn(combine(base, trainable), batch, reference)

    return wrapped


def model_params(config: ModelConfig, state_params: Params, reference_params: Params | None) -> Params:
    """The params the model runs with: the state's, or for LoRA the base plus the trained adapters."""
    if not config.lora_rank:
        return state_params
    return combine(reference_params, state_params)


def reference_params(config: ModelConfig, state_params: Params, reference: Params | None) -> Params | None:
    """The frozen reference as the model takes it: for LoRA the base with zero adapters."""
    if not config.lora_rank:
        return reference
    return combine(reference, zero_adapters(state_params))


# ----------------------------------------------------------------------------------------------
# Loading any workdir's model params, LoRA runs included.


def _workdir_of(path: str | Path) -> Path:
    path = Path(path).absolute()
    if (path / "config.yaml").is_file():
        return path
    if (path.parent / "config.yaml").is_file():  # a checkpoints directory
        return path.parent
    return path


def _lora_run_config(path: str | Path):
    """The config of a LoRA workdir at `path`, else None."""
    workdir = _workdir_of(path)
    if not (workdir / "config.yaml").is_file():
        return None

    config = load_config(workdir / "config.yaml")
    return config if config.model.lora_rank else None


def _resolve(workdir: Path, init_from: str) -> Path:
    """init_from as written in a workdir's config: absolute, relative to the cwd, or to the workdir's parent."""
    path = Path(init_from)
    if path.is_absolute() or path.exists():
        return path
    candidate = workdir.parent / path
    return candidate if candidate.exists() else path


def _target_shardings(target: Params, abstract: Params, axes: Params) -> Params:
    """Shardings for `abstract` on the mesh (or single device) that `target`'s leaves use."""
    leaf = jax.tree.leaves(target)[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return sharding_lib.tree_shardings(abstract, axes, sharding.mesh)
    device = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract)


def load_params(path: str | Path, target: Params, step: int | None = None) -> Params:
    """`checkpoint.load_params` for any workdir: a LoRA run's model is its base (loaded the same way,
    from its train.init_from) with its adapters merged in. `target`: ShapeDtypeStructs with shardings
    of the plain (adapter-free) model, plus 'heads' when wanted."""
    run = _lora_run_config(path)
    if run is None:
        return ckpt.load_params(path, target, step)
    heads = target.get(model_lib.HEADS_KEY)
    base_target = {k: v for k, v in target.items() if k != model_lib.HEADS_KEY}
    base = load_params(_resolve(_workdir_of(path), run.train.init_from), base_target)
    abstract = abstract_adapters(run.model)
    shardings = _target_shardings(target, abstract, adapter_logical_axes(run.model))
    adapter_target: Params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          abstract, shardings)
    if heads is not None:
        adapter_target[model_lib.HEADS_KEY] = heads
    trained = ckpt.load_params(path, adapter_target, step)
    merged = merge(base, adapters_only(trained), run.model)
    if heads is not None:
        merged[model_lib.HEADS_KEY] = trained[model_lib.HEADS_KEY]
    return merged


def load_base(config, base_abstract: Params, mesh: jax.sharding.Mesh) -> Params:
    """The frozen base of a LoRA run (`config.train.init_from`, itself possibly a LoRA run), sharded by
    its logical axes on `mesh`."""
    axes = split(model_lib.logical_axes(config.model))[0]
    shardings = sharding_lib.tree_shardings(base_abstract, axes, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), base_abstract, shardings)
    return load_params(config.train.init_from, target)


def base_config(config: ModelConfig) -> ModelConfig:
    """The model config without adapters (what merged params fit)."""
    return dataclasses.replace(config, lora_rank=0)


__all__ = ["split", "combine", "merge", "init_adapters", "abstract_adapters", "adapter_logical_axes",
           "adapter_loss", "zero_adapters", "model_params", "reference_params", "load_params", "load_base", "base_config",
           "count_adapter_params", "is_adapter"]
