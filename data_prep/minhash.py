"""Document fingerprints for deduplication and decontamination, vectorised with numpy.

* `normalize` / `exact_hash`: the exact-duplicate key, a 128-bit BLAKE2b of the text after
  normalisation (Unicode NFC, lower case, every run of whitespace -> one space, ends stripped), so
  copies that differ only in case, line wrapping or indentation count as the same document.
* `word_hashes`: the document's words (`\\w+` runs of the lower-cased text: punctuation and
  spacing never matter) as 64-bit hashes; `ngram_hashes` combines n consecutive ones.
* `MinHasher`: MinHash signatures of the word n-gram shingles, with multiply-shift hash families
  (one 64-bit multiply-add per shingle and permutation, the whole (shingles x permutations) block
  at once) instead of datasketch's per-call Mersenne-prime arithmetic; bench/dedup.py measures both.
* `lsh_params` / `band_keys`: the LSH banding (b bands of r rows) for a Jaccard threshold, chosen
  like datasketch's optimal parameters (least false positive + false negative probability mass).

Every hash is seeded with constants, never Python's per-process `hash`, so the same text gives the
same fingerprint in every worker, run and machine.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from typing import Tuple

import numpy as np

WORD_RE = re.compile(r"\w+")
_WS_RE = re.compile(r"\s+")
_M64 = (1 << 64) - 1


def _constants(n: int, seed: int) -> np.ndarray:
    """n odd 64-bit constants from a fixed seed (numpy's PCG64: the same on every platform)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, 2 ** 63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole word (uint64 in, uint64 out)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def normalize(text: str) -> str:
    return _WS_RE.sub(" ", unicodedata.normalize("NFC", text).lower()).strip()


def exact_hash(text: str) -> Tuple[int, int]:
    d = hashlib.blake2b(normalize(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def words(text: str):
    return WORD_RE.findall(text.lower())


def word_hashes(text: str) -> np.ndarray:
    ws = words(text)
    h = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in ws), dtype=np.uint64, count=len(ws))
    return mix64(h)


_GRAM_C = _constants(64, 20261205)


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the len(wh)-n+1 runs of n consecutive word hashes (position-sensitive)."""
    m = len(wh) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    acc = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc += wh[k:k + m] * _GRAM_C[k % len(_GRAM_C)] + np.uint64(k)
    return mix64(acc)


def shingles(text: str, n: int) -> np.ndarray:
    """Distinct word n-gram hashes; a document shorter than n words is one shingle of all its words."""
    wh = word_hashes(text)
    if len(wh) == 0:
        return wh
    return np.unique(ngram_hashes(wh, min(n, len(wh))))


class MinHasher:
    """h_j(x) = high 32 bits of (a_j * x + b_j) mod 2^64, a_j odd: a multiply-shift family over the
    64-bit shingle hashes; the signature is min_x h_j(x) for j < num_perm (uint32)."""

    BLOCK = 2048  # shingles per step: bounds the (shingles x num_perm) temporary to ~2 MB

    def __init__(self, num_perm: int = 128, seed: int = 1):
        self.num_perm = num_perm
        self.a = _constants(num_perm, seed)
        self.b = _constants(num_perm, seed + 1000003)

    def signature(self, sh: np.ndarray) -> np.ndarray:
        out = np.full(self.num_perm, 0xFFFFFFFF, np.uint32)
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), self.BLOCK):
                x = sh[i:i + self.BLOCK, None]
                h = ((x * self.a + self.b) >> np.uint64(32)).astype(np.uint32)
                np.minimum(out, h.min(axis=0), out=out)
        return out


def jaccard_estimate(s1: np.ndarray, s2: np.ndarray) -> float:
    return float(np.mean(s1 == s2))


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> Tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted probability mass of
    false positives (similarity < threshold, yet a shared band) and false negatives."""
    best, best_err = (1, num_perm), float("inf")
    lo = np.linspace(0.0, threshold, 201)
    hi = np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = _trapezoid(1 - (1 - (1 - hi ** r) ** b), hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
    return best


def _trapezoid(y, x):
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


_BAND_C = _constants(256, 977)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n docs, num_perm) uint32 signatures -> (n, bands) uint64 keys, one per band of `rows` values."""
    sigs = np.asarray(sigs, np.uint64).reshape(len(sigs), -1)
    out = np.empty((len(sigs), bands), np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            acc = np.full(len(sigs), np.uint64(b) * np.uint64(0x9E3779B97F4A7C15), np.uint64)
            for k in range(rows):
                acc += sigs[:, b * rows + k] * _BAND_C[k % len(_BAND_C)]
            out[:, b] = mix64(acc)
    return out
