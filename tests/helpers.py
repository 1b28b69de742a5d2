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


# ----------------------------------------------------------------------------------------------
# Comparing runs that are the same computation but not the same program (another mesh, another process
# count, another CPU): what float32 reordering can change, and by how much.
#
# - Losses and gradients: sums reordered across shards differ by a few ulps of the summed terms, so they
#   are compared tightly (rtol ~1e-5, many times the measured ~2e-7).
# - Parameters after AdamW: Adam divides each gradient element by its own running RMS, so a last-bit
#   difference in a near-zero gradient element can change that element's update by up to the whole step
#   (lr per step, in either direction). Such parameters get an elementwise bound from the step size
#   (`adam_drift_bound`) and a tight bound on the norm of the difference relative to the training update.
# - Bit-exact comparisons only where the same program runs on the same machine (a rerun, a resume).


def adam_update_ratio_bound(step: int, beta1: float, beta2: float) -> float:
    """The largest |m̂/√v̂| Adam's bias-corrected moments allow after `step` steps, for any gradients:
    by Cauchy-Schwarz sqrt(Σ a_i² / b_i) with a_i, b_i the weights of gradient i in m̂ and v̂
    (exactly 1 at step 1; 1.001 at step 3 and 1.011 at step 10 for betas 0.9/0.95)."""
    a = [(1 - beta1) * beta1 ** (step - i) / (1 - beta1 ** step) for i in range(1, step + 1)]
    b = [(1 - beta2) * beta2 ** (step - i) / (1 - beta2 ** step) for i in range(1, step + 1)]
    return float(np.sqrt(sum(x * x / y for x, y in zip(a, b))))


def adam_drift_bound(config: Config, steps: int) -> float:
    """Elementwise bound on |p_a - p_b| for two AdamW runs of `steps` steps from the same start whose
    gradients differ in the last bits: each step moves an element by at most lr * |m̂/√v̂| (+ the
    decoupled decay lr * wd * |p|, covered by the factor 1 + wd for |p| <= 1), in either run, and the
    scheduled lr never exceeds the peak optimizer.learning_rate."""
    opt = config.optimizer
    per_run = sum(opt.learning_rate * adam_update_ratio_bound(t, opt.beta1, opt.beta2) for t in range(1, steps + 1))
    return 2 * per_run * (1 + opt.weight_decay)


def assert_adam_trained_params_close(got, expected, initial, config: Config, steps: int,
                                     relative_norm: float = 1e-3) -> None:
    """Parameters of two AdamW runs of the same training that differ only in float32 reordering (mesh,
    process count, CPU kernels). Every element within `adam_drift_bound`; and the norm of the difference
    within `relative_norm` (1e-3: measured 8e-6 to 1.3e-5 across meshes and x86 ISAs; a lost or doubled
    shard moves a whole tensor's update, O(0.1-1)) of the norm of the training update, plus room for two
    elements whose near-zero gradient flipped its update to the bound."""
    got, expected, initial = (jax.tree.leaves(jax.device_get(t)) for t in (got, expected, initial))
    bound = adam_drift_bound(config, steps)
    for index, (a, b) in enumerate(zip(got, expected)):
        worst = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
        assert worst <= bound, f"leaf {index}: an element differs by {worst:.3g} > the Adam drift bound {bound:.3g}"
    difference = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - b) ** 2) for a, b in zip(got, expected)))
    update = np.sqrt(sum(np.sum((np.asarray(b, np.float64) - i) ** 2) for b, i in zip(expected, initial)))
    allowed = relative_norm * update + 2 * bound
    assert difference <= allowed, f"params differ by {difference:.3g} in norm > {allowed:.3g} (update {update:.3g})"


def assert_gradients_close(got, expected, relative: float = 1e-5) -> None:
    """Gradients of the same loss computed with another reduction order: each element within `relative`
    of the largest gradient element (float32 sums of positive and negative terms err relative to the
    terms, not to their possibly cancelling sum), and the whole within `relative` in norm. Measured
    ~2.4e-7 across meshes; a wrong shard's contribution is O(1)."""
    got, expected = jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(expected))
    scale = max(float(np.max(np.abs(g))) for g in expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, rtol=0, atol=relative * scale, err_msg=f"gradient leaf {index}")
    difference = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - b) ** 2) for a, b in zip(got, expected)))
    norm = np.sqrt(sum(np.sum(np.asarray(b, np.float64) ** 2) for b in expected))
    assert difference <= relative * norm, f"gradients differ by {difference:.3g} in norm (of {norm:.3g})"


def assert_greedy_choices_are_decided(logits, margin: float = 1e-3) -> None:
    """Comparing greedy (argmax) tokens exactly across programs is sound only where the best logit leads
    the runner-up by more than the logits' cross-program error (~1e-5 here; logprobs are compared at
    1e-4): this checks that precondition. logits [..., V] at the positions whose argmax is compared."""
    top2 = np.sort(np.asarray(logits, np.float32), axis=-1)[..., -2:]
    lead = top2[..., 1] - top2[..., 0]
    assert float(lead.min()) > margin, f"a greedy choice is a near tie (lead {float(lead.min()):.2g}): " \
                                       "comparing argmax tokens across programs would depend on rounding"
