"""Meshes and logical-axis sharding.

Parameters and activations are named with logical axes ('batch', 'embed', 'heads', ...); the
rules below map each logical name onto mesh axes ('data', 'fsdp', 'tensor'). A dimension whose
size the mesh axes do not divide stays replicated, so every preset runs on every mesh.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import MeshConfig
from jaxllm.errors import MeshError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (a tuple shards over several mesh axes, None replicates).
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "seq": None,
    "head_dim": None,
    "layers": None,
    "norm": None,
}


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 ("the rest of the devices") and checks the product equals the device count."""
    sizes = [config.data, config.fsdp, config.tensor]
    if sum(1 for s in sizes if s == -1) > 1:
        raise MeshError("only one of mesh.data/mesh.fsdp/mesh.tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh sizes must be positive or -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh fsdp*tensor*data={known} does not divide the {num_devices} available devices; "
                            "choose sizes whose product divides the device count")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                        f"but {num_devices} are available; set the sizes (or one of them to -1) to use exactly "
                        f"{num_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if config.num_devices:
        if config.num_devices > len(devices):
            raise MeshError(f"mesh.num_devices={config.num_devices} but only {len(devices)} devices are available")
        devices = devices[: config.num_devices]
    shape = mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_sizes: dict[str, int] | None = None) -> PartitionSpec:
    """Logical names -> PartitionSpec; a mesh axis is used once and only where it divides the dim."""
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(axes):
        mesh_axes = LOGICAL_RULES.get(name) if name else None
        if not mesh_axes:
            spec.append(None)
            continue
        chosen = []
        for axis in mesh_axes:
            size = (mesh_sizes or {}).get(axis, 1)
            if axis in used or (mesh_sizes is not None and size == 1):
                continue
            if shape is not None and mesh_sizes is not None:
                total = size * math.prod(mesh_sizes[a] for a in chosen)
                if shape[dim] % total:
                    continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def _mesh_sizes(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names under the current mesh (`jax.set_mesh`); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(axes, x.shape, _mesh_sizes(mesh))
    return jax.lax.with_sharding_constraint(x, spec)


def tree_shardings(abstract_tree: Any, axes_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays/ShapeDtypeStructs given a matching tree of logical names."""
    sizes = _mesh_sizes(mesh)

    def one(leaf, axes):
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, sizes))

    return jax.tree.map(one, abstract_tree, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split their leading axis over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def data_parallel_size(mesh: Mesh) -> int:
    sizes = _mesh_sizes(mesh)
    return sizes["data"] * sizes["fsdp"]


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local batch -> global arrays sharded over the batch axes (multi-host aware)."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def maybe_initialize_distributed(config: MeshConfig) -> bool:
    """Joins a multi-host runtime when asked by the config or by the usual environment variables."""
    wanted = config.distributed or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not wanted:
        return False
    if jax.distributed.is_initialized():
        return True
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()  # cluster auto-detection: TPU pods, SLURM, ...
    return True
