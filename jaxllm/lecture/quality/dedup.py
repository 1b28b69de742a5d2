"""Exact and near-duplicate detection that keeps only hashes, never documents.

Exact: an 8-byte BLAKE2b hash of the normalised text (NFKC, lowercase, no punctuation, single spaces).

Near: MinHash over word 5-gram shingles with locality-sensitive hashing (Broder 1997; the setup of
FineWeb: 112 hash functions in 14 bands of 8). Vectorised with numpy over a batch of documents:
  words -> 64-bit word hashes -> shingle hashes [shingles] -> num_perm multiply-add-shift hashes
  [shingles, num_perm] -> per-document minimum (the signature, [docs, num_perm] uint32)
  -> one 64-bit key per band ([docs, bands]).
Two documents become candidates when any band key agrees; with Jaccard similarity s of their shingle
sets that happens with probability 1 - (1 - s^rows)^bands (≈ 0.5 at s ≈ (1/bands)^(1/rows) ≈ 0.72,
> 0.99 at s = 0.85, < 0.01 at s = 0.45 for 14×8). A candidate of an earlier kept document is dropped;
only kept documents enter the index (~1 KB of Python dict entries per kept document at 14 bands).
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def exact_hash(normalised_text: str) -> int:
    """64-bit hash of already-normalised text (see rules.normalise)."""
    return int.from_bytes(hashlib.blake2b(normalised_text.encode("utf-8"), digest_size=8).digest(), "little")


@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    num_perm: int = 112
    bands: int = 14
    shingle_size: int = 5  # words per shingle; documents shorter than this are one shingle
    seed: int = 1

    def __post_init__(self) -> None:
        if self.num_perm < 1 or self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a positive multiple of bands ({self.bands})")
        if self.shingle_size < 1:
            raise ValueError(f"shingle_size must be at least 1, got {self.shingle_size}")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    @property
    def threshold(self) -> float:
        """Jaccard similarity at which a pair becomes a candidate with probability ~1/2."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def candidate_probability(self, similarity: float) -> float:
        return 1.0 - (1.0 - similarity**self.rows) ** self.bands


class MinHasher:
    """Signatures and LSH band keys for batches of documents (given as lists of words)."""

    def __init__(self, config: MinHashConfig = MinHashConfig(), max_cells: int = 1 << 21):
        self.config = config
        rng = np.random.default_rng(config.seed)
        draw = lambda *shape: rng.integers(0, 2**63, size=shape, dtype=np.uint64) * np.uint64(2)  # noqa: E731
        self.multipliers = draw(config.num_perm) | np.uint64(1)  # odd: multiply-add-shift hashing
        self.offsets = draw(config.num_perm)
        self.shingle_weights = draw(config.shingle_size) | np.uint64(1)
        self.band_weights = draw(config.rows) | np.uint64(1)
        self.max_cells = max_cells  # bounds the [shingles, num_perm] work array (~16 MB)
        self._word_hashes: dict[str, int] = {}

    def _word_hash(self, word: str) -> int:
        value = self._word_hashes.get(word)
        if value is None:
            if len(self._word_hashes) > 1_000_000:
                self._word_hashes.clear()
            value = zlib.crc32(word.encode("utf-8")) | (zlib.adler32(word.encode("utf-8")) << 32)
            self._word_hashes[word] = value
        return value

    def _shingle_hashes(self, documents: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' 32-bit shingle hashes, concatenated, and each document's first index."""
        n = self.config.shingle_size
        hashes: list[int] = []
        lengths = np.empty(len(documents), dtype=np.int64)
        cached = self._word_hashes.get
        for i, words in enumerate(documents):
            row = list(map(cached, words))
            if None in row:
                row = [self._word_hash(w) for w in words]
            if len(row) < n:
                row += [0] * (n - len(row))  # a short document is one (padded) shingle
            hashes.extend(row)
            lengths[i] = len(row)
        word_hashes = np.array(hashes, dtype=np.uint64)
        word_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        shingle_counts = lengths - n + 1
        # start index of every shingle: word_starts[d] + 0 .. shingle_counts[d]-1
        doc_of_shingle = np.repeat(np.arange(len(documents)), shingle_counts)
        shingle_first = np.concatenate([[0], np.cumsum(shingle_counts)[:-1]])
        starts = word_starts[doc_of_shingle] + (np.arange(len(doc_of_shingle)) - shingle_first[doc_of_shingle])
        combined = np.zeros(len(starts), dtype=np.uint64)
        for k in range(n):
            combined += word_hashes[starts + k] * self.shingle_weights[k]  # wraps mod 2^64 on purpose
        return combined >> _SHIFT32, shingle_first

    def signatures(self, documents: list[list[str]]) -> np.ndarray:
        """[docs, num_perm] uint32 MinHash signatures."""
        if not documents:
            return np.zeros((0, self.config.num_perm), dtype=np.uint32)
        with np.errstate(over="ignore"):
            shingles, first = self._shingle_hashes(documents)
            out = np.empty((len(documents), self.config.num_perm), dtype=np.uint32)
            step = max(1, self.max_cells // self.config.num_perm)
            # Process whole documents in slices of about `step` shingles.
            doc = 0
            while doc < len(documents):
                end_doc = int(np.searchsorted(first, first[doc] + step, side="left"))
                end_doc = max(end_doc, doc + 1)
                lo = first[doc]
                hi = first[end_doc] if end_doc < len(documents) else len(shingles)
                block = np.multiply(shingles[lo:hi, None], self.multipliers[None, :])
                block += self.offsets[None, :]
                # x >> 32 is monotone, so the minimum's high half is the minimum of the high halves
                out[doc:end_doc] = np.minimum.reduceat(block, first[doc:end_doc] - lo, axis=0) >> _SHIFT32
                doc = end_doc
        return out

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """[docs, bands] uint64: each band's rows folded into one key."""
        rows = signatures.reshape(len(signatures), self.config.bands, self.config.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            return (rows * self.band_weights).sum(axis=-1, dtype=np.uint64)


def estimated_jaccard(signature_a: np.ndarray, signature_b: np.ndarray) -> float:
    return float(np.mean(signature_a == signature_b))


class ExactDeduplicator:
    """Remembers normalised-text hashes; `check` says which earlier document a hash repeats."""

    def __init__(self) -> None:
        self._first: dict[int, int] = {}

    def check(self, text_hash: int, document: int) -> int | None:
        """None if new (and remembered as `document`), else the earlier document's number."""
        earlier = self._first.get(text_hash)
        if earlier is None:
            self._first[text_hash] = document
        return earlier

    def __len__(self) -> int:
        return len(self._first)


class NearDeduplicator:
    """LSH index over band keys of kept documents."""

    def __init__(self, bands: int) -> None:
        self._bands: list[dict[int, int]] = [{} for _ in range(bands)]

    def check(self, keys: np.ndarray | list[int], document: int) -> int | None:
        """None if no band matches (the document is added), else an earlier matching document's number."""
        keys = keys.tolist() if isinstance(keys, np.ndarray) else [int(k) for k in keys]
        for band, key in zip(self._bands, keys):
            earlier = band.get(key)
            if earlier is not None:
                return earlier
        for band, key in zip(self._bands, keys):
            band[key] = document
        return None

    def __len__(self) -> int:
        return len(self._bands[0]) if self._bands else 0
