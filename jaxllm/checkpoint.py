"""Orbax checkpoints: the train state, the data-iterator position and the resolved config, together.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Orbax writes each step into a temporary
directory and renames it only once complete, so an interrupted save is never picked up by resume.
Restoring takes target shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is missing or does not fit the model being restored."""


def checkpoint_dir(path: str | Path) -> Path:
    """A workdir or a checkpoints directory -> the checkpoints directory."""
    path = Path(path).absolute()
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR
    return path


def make_manager(workdir: str | Path, keep: int = 2, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=create)
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("state", "data", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any],
         meta: dict[str, Any], force: bool = False) -> bool:
    """Starts an (async) save of everything needed to resume at `step`."""
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta),
    ), force=force)


def _restore_args(abstract_tree: Any) -> Any:
    return ocp.checkpoint_utils.construct_restore_args(abstract_tree)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta) at `step` onto the shardings in `abstract_state`
    (a tree of ShapeDtypeStructs with `.sharding`)."""
    check_shapes(manager.directory, step, abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract_state, restore_args=_restore_args(abstract_state)),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    return restored["state"], restored["data"], restored["meta"]


def latest_step(path: str | Path) -> int | None:
    directory = checkpoint_dir(path)
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()
             and (p / "state").is_dir()]
    return max(steps) if steps else None


def _metadata_tree(directory: Path, step: int) -> Any:
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory / str(step) / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            flat[key] = tuple(shape)
    return flat


def check_shapes(directory: str | Path, step: int, abstract_tree: Any, prefix: str = "") -> None:
    """Raises CheckpointError listing every parameter whose saved shape differs from the target."""
    saved = _flat_shapes(_metadata_tree(Path(directory), step))
    wanted = _flat_shapes(abstract_tree)
    problems = []
    for key, shape in wanted.items():
        full = prefix + key
        if full not in saved:
            problems.append(f"{full}: missing from the checkpoint")
        elif saved[full] != shape:
            problems.append(f"{full}: checkpoint {saved[full]} vs model {shape}")
    if problems:
        listed = "\n  ".join(problems[:20]) + ("" if len(problems) <= 20 else f"\n  ... {len(problems) - 20} more")
        raise CheckpointError(f"checkpoint {directory}/{step} does not fit this model "
                              f"({len(problems)} mismatched parameters):\n  {listed}\n"
                              "Use the model config the checkpoint was trained with (see its config.yaml).")


def load_params(path: str | Path, abstract_params: Any, step: int | None = None) -> Any:
    """Params only (no optimizer state) from another run's workdir or checkpoints dir, restored onto
    the shardings of `abstract_params`. Extra heads in the target that the checkpoint lacks are an error."""
    directory = checkpoint_dir(path)
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no finished checkpoint under {directory}; train that stage first "
                              "(or point init_from at a workdir that has one)")
    check_shapes(directory, step, abstract_params, prefix="params/")
    target = {"params": abstract_params}
    checkpointer = ocp.PyTreeCheckpointer()
    restored = checkpointer.restore(
        directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(target, restore_args=_restore_args(target), partial_restore=True))
    return restored["params"]


def read_meta(path: str | Path, step: int | None = None) -> dict[str, Any]:
    directory = checkpoint_dir(path)
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"no finished checkpoint under {directory}")
    import json

    meta_dir = directory / str(step) / "meta"
    files = sorted(meta_dir.glob("*")) if meta_dir.is_dir() else []
    for candidate in files:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (ValueError, UnicodeDecodeError):
                continue
    return {}


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
