"""One process of tests/test_multihost.py: joins a 2-process JAX runtime on CPU and trains.

Usage (the test sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and XLA_FLAGS):
    python tests/multihost_worker.py WORKDIR REPORT_JSON
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

from helpers import SyntheticIterator  # noqa: E402
from multihost_config import multihost_config  # noqa: E402

from jaxllm import sharding as sharding_lib  # noqa: E402
from jaxllm import train as train_lib  # noqa: E402


class ProcessRows:
    """This process's rows of each global batch (batch k is a pure function of k), nothing else."""

    def __init__(self, source: SyntheticIterator, process_index: int, process_count: int):
        self.source, self.process_index, self.process_count = source, process_index, process_count
        self.index = 0
        self.loaded: list[tuple[int, int, int]] = []  # (batch, first row, end row)

    def __next__(self) -> dict:
        rows = self.source.batch // self.process_count
        first = self.process_index * rows
        batch = {k: v[first:first + rows] for k, v in self.source.batch_at(self.index).items()}
        self.loaded.append((self.index, first, first + rows))
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def main(workdir: str, report: str) -> None:
    config = multihost_config()
    cache = os.environ.get("JAXLLM_TEST_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    assert sharding_lib.maybe_initialize_distributed(config.mesh)  # from the JAX_* variables
    iterator = ProcessRows(SyntheticIterator("pretrain", config.train.batch_size, config.data.seq_len,
                                             config.model.vocab_size), jax.process_index(), jax.process_count())
    result = train_lib.train(config, workdir, tokenizer=False, batch_iterator=iterator, eval_batches=[],
                             log=lambda *_: None)
    Path(report).write_text(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
        "final_step": result.final_step, "loss": result.last_metrics.get("loss"), "loaded": iterator.loaded,
    }))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
