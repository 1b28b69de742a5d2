"""Model-based quality filter: logistic regression on hashed word uni- and bigrams.

Features of a document: lowercase tokens (words and single punctuation marks), their unigrams and
bigrams hashed into `buckets` (default 2**18) slots, counts -> log(1 + count), L2-normalised.
p(good | document) = sigmoid(w · x + b). Trained with optax Adam on a class-balanced logistic loss
(+ L2), like the fastText classifiers of DCLM and FineWeb-Edu in spirit, in ~1 MB.

Saved as a directory: `weights.npz` (non-zero weight indices and values, bias) and
`classifier.json` (buckets, tokenisation, training metrics). Scoring needs only numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.data.sources import iter_documents, record_text

FORMAT_VERSION = 1
DEFAULT_BUCKETS = 2**18
_TOKEN = re.compile(r"\w+|[^\w\s]")
_BIGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)
_FINAL_MIX = np.uint64(0xD6E8FEB86659FD93)


class _TokenHashes:
    """crc32 of a token, cached per process (tokens repeat a lot)."""

    def __init__(self, limit: int = 500_000):
        self.cache: dict[str, int] = {}
        self.limit = limit

    def __call__(self, tokens: list[str]) -> np.ndarray:
        cache = self.cache
        out = []
        for token in tokens:
            value = cache.get(token)
            if value is None:
                if len(cache) > self.limit:
                    cache.clear()
                value = cache[token] = zlib.crc32(token.encode("utf-8"))
            out.append(value)
        return np.array(out, dtype=np.uint64)


_token_hashes = _TokenHashes()


def hashed_features(text: str, buckets: int = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """(indices int32 [k], values float32 [k]): unique buckets of the uni+bigrams, L2-normalised log counts."""
    tokens = _TOKEN.findall(text.lower())
    if not tokens:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    unigrams = _token_hashes(tokens)
    with np.errstate(over="ignore"):
        bigrams = unigrams[:-1] * _BIGRAM_MIX + unigrams[1:] + np.uint64(1)
        hashed = np.concatenate([unigrams, bigrams]) * _FINAL_MIX
    index, counts = np.unique((hashed >> np.uint64(32)) % np.uint64(buckets), return_counts=True)
    values = np.log1p(counts.astype(np.float32))
    values /= np.linalg.norm(values)
    return index.astype(np.int32), values.astype(np.float32)


def _padded_batch(features: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """[docs, width] index and value arrays, width a power of two (padding: index 0, value 0)."""
    longest = max((len(i) for i, _ in features), default=1)
    width = 1 << max(0, math.ceil(math.log2(max(longest, 1))))
    index = np.zeros((len(features), width), np.int32)
    value = np.zeros((len(features), width), np.float32)
    for row, (i, v) in enumerate(features):
        index[row, : len(i)] = i
        value[row, : len(v)] = v
    return index, value


class QualityClassifier:
    """p(good) for texts from a hashed n-gram logistic regression."""

    def __init__(self, weights: np.ndarray, bias: float, metadata: dict[str, Any] | None = None):
        self.weights = np.asarray(weights, dtype=np.float32)
        self.bias = float(bias)
        self.metadata = dict(metadata or {})

    @property
    def buckets(self) -> int:
        return len(self.weights)

    def logits(self, texts: Iterable[str]) -> np.ndarray:
        out = []
        for text in texts:
            index, value = hashed_features(text, self.buckets)
            out.append(float(self.weights[index] @ value) + self.bias)
        return np.array(out, dtype=np.float64)

    def score(self, texts: Iterable[str]) -> np.ndarray:
        """[len(texts)] probabilities that each text is of the "good" kind."""
        return 1.0 / (1.0 + np.exp(-self.logits(texts)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        nonzero = np.flatnonzero(self.weights).astype(np.int32)
        np.savez_compressed(path / "weights.npz", index=nonzero, value=self.weights[nonzero],
                            bias=np.float32(self.bias), buckets=np.int64(self.buckets))
        meta = {"format": "jaxllm-quality-classifier", "version": FORMAT_VERSION, "buckets": self.buckets,
                "features": "lowercase word/punctuation unigrams + bigrams, hashed; log1p counts, L2-normalised",
                **{k: v for k, v in self.metadata.items() if k not in ("format", "version", "buckets")}}
        (path / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QualityClassifier":
        path = Path(path)
        weights_file, meta_file = path / "weights.npz", path / "classifier.json"
        if not weights_file.is_file() or not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a quality classifier: expected weights.npz and classifier.json "
                                    "in it (train one with `jaxllm data train-quality`)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != "jaxllm-quality-classifier" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: not a version-{FORMAT_VERSION} jaxllm quality classifier")
        with np.load(weights_file) as data:
            weights = np.zeros(int(data["buckets"]), np.float32)
            weights[data["index"]] = data["value"]
            bias = float(data["bias"])
        return cls(weights, bias, meta)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    buckets: int = DEFAULT_BUCKETS
    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 0.05
    l2: float = 1e-6  # per-weight penalty, mean over the batch's loss scale
    validation_fraction: float = 0.1  # held out (when there are at least 10 documents per class)
    seed: int = 0


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((probabilities >= 0.5) == (labels == 1))) if len(labels) else float("nan")


def fit_logistic(features: Sequence[tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
                 options: TrainOptions) -> tuple[np.ndarray, float, list[float]]:
    """Class-balanced L2 logistic regression with optax Adam; returns (weights, bias, loss per epoch)."""
    import jax
    import jax.numpy as jnp
    import optax

    labels = np.asarray(labels, np.float32)
    positives = max(float(labels.sum()), 1.0)
    negatives = max(float(len(labels) - labels.sum()), 1.0)
    # each class carries half the loss, whatever its size
    sample_weight = np.where(labels == 1, len(labels) / (2 * positives), len(labels) / (2 * negatives))
    params = {"w": jnp.zeros(options.buckets, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    optimizer = optax.adam(options.learning_rate)
    opt_state = optimizer.init(params)

    def loss_fn(params, index, value, y, weight):
        logits = jnp.sum(params["w"][index] * value, axis=-1) + params["b"]  # [batch]
        losses = optax.sigmoid_binary_cross_entropy(logits, y)
        data_loss = jnp.sum(losses * weight) / jnp.maximum(jnp.sum(weight), 1e-9)
        return data_loss + options.l2 * jnp.sum(params["w"] ** 2)

    @jax.jit
    def step(params, opt_state, index, value, y, weight):
        loss, grads = jax.value_and_grad(loss_fn)(params, index, value, y, weight)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(options.seed)
    batch = min(options.batch_size, len(labels))
    epoch_losses = []
    for _ in range(options.epochs):
        order = rng.permutation(len(labels))
        total = 0.0
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            if len(rows) < batch:  # keep one batch shape per width; pad with zero-weight rows
                rows = np.concatenate([rows, order[: batch - len(rows)]])
                weight = sample_weight[rows].copy()
                weight[len(order) - start:] = 0.0
            else:
                weight = sample_weight[rows]
            index, value = _padded_batch([features[r] for r in rows])
            params, opt_state, loss = step(params, opt_state, index, value, labels[rows], weight.astype(np.float32))
            total += float(loss) * len(rows)
        epoch_losses.append(total / len(order))
    return np.asarray(params["w"]), float(params["b"]), epoch_losses


def document_texts(paths: Sequence[str | Path], text_field: str = "text", text_unit: str = "file") -> list[str]:
    """Every document's text, read like `jaxllm data filter` reads them (JSONL records or plain text)."""
    return [record_text(record, text_field) for record in iter_documents(paths, text_unit, text_field)]


def train_quality_classifier(good_files: Sequence[str | Path], bad_files: Sequence[str | Path],
                             out_path: str | Path, *, options: TrainOptions = TrainOptions(),
                             text_field: str = "text", text_unit: str = "file") -> QualityClassifier:
    """Trains p(good) on documents of good_files (label 1) vs bad_files (label 0), saves it to out_path.

    Documents are read like `jaxllm data filter` reads them (JSONL records or plain text). Training
    holds all documents' sparse features in memory (a few KB each).
    """
    started = time.time()
    good = document_texts(good_files, text_field, text_unit)
    bad = document_texts(bad_files, text_field, text_unit)
    if not good or not bad:
        which = "good" if not good else "bad"
        raise ValueError(f"no {which} documents found in {', '.join(map(str, good_files if not good else bad_files))}; "
                         "both classes need at least one document")
    texts = good + bad
    labels = np.array([1] * len(good) + [0] * len(bad), np.int32)
    rng = np.random.default_rng(options.seed)
    held_out = np.zeros(len(texts), bool)
    if options.validation_fraction > 0 and min(len(good), len(bad)) >= 10:
        for cls in (0, 1):
            members = np.flatnonzero(labels == cls)
            count = max(1, int(round(options.validation_fraction * len(members))))
            held_out[rng.choice(members, size=count, replace=False)] = True
    features = [hashed_features(t, options.buckets) for t in texts]
    train_rows = np.flatnonzero(~held_out)
    weights, bias, losses = fit_logistic([features[i] for i in train_rows], labels[train_rows], options)
    classifier = QualityClassifier(weights, bias)
    probabilities = 1.0 / (1.0 + np.exp(-np.array(
        [float(weights[i] @ v) + bias for i, v in features])))
    metrics = {"good_documents": len(good), "bad_documents": len(bad),
               "train_accuracy": _accuracy(probabilities[~held_out], labels[~held_out]),
               "validation_documents": int(held_out.sum()),
               "validation_accuracy": _accuracy(probabilities[held_out], labels[held_out]) if held_out.any() else None,
               "final_train_loss": losses[-1] if losses else None, "seconds": round(time.time() - started, 2)}
    classifier.metadata = {"training": metrics, "options": dataclasses.asdict(options),
                           "good_files": [str(p) for p in good_files], "bad_files": [str(p) for p in bad_files],
                           "text_field": text_field}
    classifier.save(out_path)
    return classifier
