"""Shared test fixtures: tiny configs and synthetic batch iterators (no files needed)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import model as model_lib
from jaxllm.config import Config, load_config

TINY = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.max_seq_len=64", "data.seq_len=32", "train.progress=false",
        "train.log_every=1", "optimizer.warmup_steps=0"]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, TINY + list(overrides))


def lm_rows(rng: np.random.Generator, batch: int, length: int, vocab: int, docs_per_row: int = 1) -> dict:
    """Packed rows of a learnable pattern (each token repeats the one before it)."""
    tokens = rng.integers(4, vocab, (batch, length)).astype(np.int32)
    tokens[:, 1::2] = tokens[:, 0::2]
    bounds = np.linspace(0, length, docs_per_row + 1).astype(int)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for d in range(docs_per_row):
        segment_ids[:, bounds[d]:bounds[d + 1]] = d + 1
        positions[:, bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    loss_mask = (positions > 0).astype(np.float32)
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "loss_mask": loss_mask}


class SyntheticIterator:
    """Batch k is a pure function of k (like the real loader), with get_state/set_state."""

    def __init__(self, stage: str, batch: int, length: int, vocab: int, seed: int = 0):
        self.stage, self.batch, self.length, self.vocab, self.seed = stage, batch, length, vocab, seed
        self.index = 0

    def batch_at(self, k: int) -> dict:
        rng = np.random.default_rng((self.seed, k))
        if self.stage in ("dpo", "reward"):
            chosen = lm_rows(rng, self.batch, self.length, self.vocab)
            rejected = {k: v.copy() for k, v in chosen.items()}
            rejected["tokens"][:, 1::2] = rng.integers(4, self.vocab, rejected["tokens"][:, 1::2].shape)
            out = {f"chosen_{k}": v for k, v in chosen.items()}
            out.update({f"rejected_{k}": v for k, v in rejected.items()})
            return out
        rows = lm_rows(rng, self.batch, self.length, self.vocab, docs_per_row=2)
        if self.stage == "kto":
            rows["label"] = np.where(np.arange(self.batch) % 2 == 0, 1.0, -1.0).astype(np.float32)
            rows["tokens"][1::2, 1::2] = rng.integers(4, self.vocab, rows["tokens"][1::2, 1::2].shape)
        return rows

    def __next__(self) -> dict:
        batch = self.batch_at(self.index)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def train_memorised_qa(directory, prompt: str, answer: str):
    """A micro model fine-tuned from scratch on one QA conversation until it has memorised it; returns
    its workdir (for tests of tools that load a checkpoint)."""
    import json

    from jaxllm.train import train

    data = directory / "fact.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "configs" / "sft_tiny.yaml"
    config = load_config(recipe, [
        "model.preset=micro", "mesh.num_devices=1", "train.steps=40", "train.batch_size=8", "train.progress=false",
        "train.eval_batches=1", f"data.source=jsonl:{data}", f"data.eval_source=jsonl:{data}",
        "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=5"])
    train(config, directory / "run", log=lambda *_: None)
    return directory / "run"


def random_params(model_config, std: float, seed: int = 0):
    """Model params drawn with NumPy (no compilation, unlike the jitted initialiser): N(0, std) weights, unit norms."""
    rng = np.random.default_rng(seed)
    _, abstract = model_lib.abstract_model(model_config)

    def draw(path, leaf):
        if getattr(path[-1], "key", None) == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def write_jsonl(path, records):
    """Writes records as JSON lines to `path` and returns it."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
