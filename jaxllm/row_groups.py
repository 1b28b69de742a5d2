"""Row groups: a batch's rows split into equal groups that run side by side, one host thread each.

XLA CPU runs one program's ops mostly one after another: a matmul too small to be split over the cores
runs on one, and so does every elementwise op (a train step of size d256 x 4 layers on two cores has
only one op running for about half of its time; a decode step's ~130 small ops run on one core). Calls of
a compiled program from separate host threads do run at the same time, each on a core. So on a CPU that
holds the model on one device, `jaxllm.generate` and the train step (`jaxllm.step_builder`) split a
batch's rows into one group per core; on accelerators and multi-device meshes there is one group (the
mesh parallelises the batch).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Any, Callable, Iterator

import jax

from jaxllm import cpu_levers


def on_one_cpu_device(mesh: jax.sharding.Mesh | None = None) -> bool:
    """True where the program runs on one CPU device in one process (`mesh`: None = the default device)."""
    if jax.process_count() > 1 or (mesh is not None and mesh.size > 1):
        return False
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return device.platform == "cpu"


def cpu_row_groups(rows: int, mesh: jax.sharding.Mesh | None = None, *, min_rows: int = 1,
                   multiple: int = 1, most: int | None = None) -> int:
    """How many groups `rows` split into: on one CPU device, the most groups (up to one per CPU this process
    may use, and up to `most`) such that each has at least `min_rows` rows and the groups divide `rows` into
    parts that `multiple` divides (e.g. micro-batches); 1 elsewhere."""
    if not on_one_cpu_device(mesh):
        return 1
    most = max(min(cpu_levers.available_cpus(), rows // max(min_rows, 1), most or rows), 1)
    return next(groups for groups in range(most, 0, -1) if rows % (groups * multiple) == 0)


def map_row_groups(call: Callable[[int], Any], groups: int, mesh: jax.sharding.Mesh | None = None) -> list:
    """[call(0), ..., call(groups - 1)], each on its own host thread (one group runs inline), under `mesh`
    (a mesh context is per thread). `call` should block until its result is computed: the work then runs
    on that thread."""
    return list(map_on_threads(call, groups, groups, mesh))


def map_on_threads(call: Callable[[int], Any], count: int, workers: int,
                   mesh: jax.sharding.Mesh | None = None) -> Iterator[Any]:
    """call(0), ..., call(count - 1) on `workers` host threads (inline for one), yielded in order as they
    finish, each under `mesh`: independent calls of compiled programs (e.g. the batches of an evaluation) side
    by side, with the results exactly those of the calls one after another."""
    def run(index: int):
        with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            return call(index)

    if workers <= 1 or count <= 1:
        yield from map(run, range(count))
        return
    with concurrent.futures.ThreadPoolExecutor(min(workers, count), thread_name_prefix="jaxllm-rows") as pool:
        yield from pool.map(run, range(count))


def host_workers(mesh: jax.sharding.Mesh | None = None, most: int = 4) -> int:
    """Host threads for independent calls: one per CPU this process may use (up to `most`) on one CPU device,
    1 elsewhere (an accelerator or a mesh runs one call at a time better)."""
    return max(min(cpu_levers.available_cpus(), most), 1) if on_one_cpu_device(mesh) else 1
