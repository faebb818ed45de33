"""Exact and near-duplicate detection with shingled MinHash and LSH banding.

Documents are compared on word 5-gram shingles. Each document gets a MinHash signature
(``num_perm`` universal hashes over 32-bit shingle hashes, vectorised with numpy); LSH
splits it into ``bands`` of ``rows`` so that only documents sharing a band bucket are
compared, which keeps the work near-linear up to 100k+ documents. A candidate pair is a
near duplicate when the signature agreement (an estimate of Jaccard similarity) reaches
``threshold``. The *first* document in input order is kept, so the result does not depend
on timing.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

_PRIME = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64((1 << 32) - 1)
_WORD = re.compile(r"\w+")


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def exact_key(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


def shingles(text: str, k: int = 5) -> np.ndarray:
    """Stable 64-bit hashes of the word k-grams of ``text`` (a polynomial roll over crc32 word hashes)."""
    words = _WORD.findall(text.lower()) or [""]
    w = np.fromiter((zlib.crc32(x.encode()) for x in words), dtype=np.uint64, count=len(words))
    if len(w) < k:
        w = np.concatenate([w, np.zeros(k - len(w), dtype=np.uint64)])
    n = len(w) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * np.uint64(1_000_003) + w[j : j + n]
    return np.unique(h)


@dataclass
class MinHasher:
    num_perm: int = 128
    bands: int = 16
    seed: int = 1

    def __post_init__(self) -> None:
        if self.num_perm % self.bands:
            raise ValueError("num_perm must be a multiple of bands")
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(1, int(_PRIME), size=self.num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_PRIME), size=self.num_perm, dtype=np.uint64)

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    def signature(self, text: str) -> np.ndarray:
        h = shingles(text)
        # universal hashing (a*h + b) mod p, with the multiplication wrapping at 2**64 as in the usual
        # numpy MinHash implementations, truncated to 32 bits
        with np.errstate(over="ignore"):
            return (((self.a[:, None] * h[None, :] + self.b[:, None]) % _PRIME) & _MASK32).min(axis=1)


def bands_for(threshold: float, num_perm: int = 128) -> int:
    """Most rows per band whose LSH threshold (1/b)**(1/r) stays well below ``threshold``,
    so pairs at the threshold become candidates with near certainty."""
    for rows in (8, 4, 2, 1):
        bands = num_perm // rows
        if (1 / bands) ** (1 / rows) <= 0.85 * threshold:
            return bands
    return num_perm


class DedupIndex:
    """Incremental index: ``check(text)`` says whether ``text`` duplicates a document already
    added; ``add`` indexes a kept document. Duplicates are never indexed, so later documents
    are compared with kept ones only."""

    def __init__(self, threshold: float = 0.8, hasher: MinHasher | None = None):
        self.threshold = threshold
        self.hasher = hasher or MinHasher(bands=bands_for(threshold))
        self._exact: dict[str, str] = {}
        self._sigs: dict[str, np.ndarray] = {}
        self._buckets: dict[tuple[int, bytes], list[str]] = defaultdict(list)

    def _bands(self, sig: np.ndarray):
        r = self.hasher.rows
        return [(b, sig[b * r : (b + 1) * r].tobytes()) for b in range(self.hasher.bands)]

    def check(self, text: str) -> tuple[str, float] | None:
        """(id of the kept document it duplicates, similarity) or None."""
        key = exact_key(text)
        if key in self._exact:
            return self._exact[key], 1.0
        sig = self.hasher.signature(text)
        candidates = {doc_id for band in self._bands(sig) for doc_id in self._buckets.get(band, ())}
        best: tuple[str, float] | None = None
        for doc_id in sorted(candidates):
            sim = float(np.mean(self._sigs[doc_id] == sig))
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (doc_id, sim)
        return best

    def add(self, doc_id: str, text: str) -> None:
        self._exact.setdefault(exact_key(text), doc_id)
        sig = self.hasher.signature(text)
        self._sigs[doc_id] = sig
        for band in self._bands(sig):
            self._buckets[band].append(doc_id)


def near_duplicates(texts: list[str], threshold: float = 0.8, hasher: MinHasher | None = None) -> dict[int, tuple[int, float]]:
    """Map index -> (index of the earlier kept document it duplicates, similarity), first one kept.

    Exact duplicates (after normalising case, punctuation and whitespace) get similarity 1.0.
    """
    index = DedupIndex(threshold, hasher)
    dupes: dict[int, tuple[int, float]] = {}
    for i, text in enumerate(texts):
        hit = index.check(text)
        if hit is None:
            index.add(str(i), text)
        else:
            dupes[i] = (int(hit[0]), hit[1])
    return dupes
