"""Document fingerprints for deduplication and decontamination, vectorised with numpy.

* `normalize` / `exact_hash`: the exact-duplicate key, a 128-bit BLAKE2b of the text after
  normalisation (Unicode NFC, lower case, every run of whitespace -> one space, ends stripped), so
  copies that differ only in case, line wrapping or indentation count as the same document.
* `word_hashes`: the document's words (`\\w+` runs of the lower-cased text: punctuation and
  spacing never matter) as 64-bit hashes (BLAKE2b, cached per process); `ngram_hashes` combines n
  consecutive ones; the `_many` variants do a whole chunk of documents in one numpy pass.
* `MinHasher`: MinHash signatures of the word n-gram shingles, with multiply-shift hash families
  (one 64-bit multiply-add per shingle and permutation, the whole (shingles x permutations) block
  at once, and many small documents in one block) instead of datasketch's per-document Mersenne-prime
  arithmetic; bench/dedup.py measures both.
* `lsh_params` / `band_keys`: the LSH banding (b bands of r rows) for a Jaccard threshold, chosen
  like datasketch's optimal parameters (least false positive + false negative probability mass).

Every hash is seeded with constants, never Python's per-process `hash`, so the same text gives the
same fingerprint in every worker, run and machine.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Optional, Sequence, Tuple

import numpy as np

WORD_RE = re.compile(r"\w+")


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


def normalize(text: str, lowered: Optional[str] = None) -> str:
    """NFC, lower case, whitespace runs -> one space, ends stripped (str.split's Unicode whitespace)."""
    low = lowered if lowered is not None else text.lower()
    if not low.isascii():
        low = unicodedata.normalize("NFC", low)
    return " ".join(low.split())


def exact_hash(text: str, lowered: Optional[str] = None) -> Tuple[int, int]:
    d = hashlib.blake2b(normalize(text, lowered).encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def words(text: str):
    return WORD_RE.findall(text.lower())


_WORD_CACHE: dict = {}  # per process; words repeat (Zipf), a hash costs a dict lookup after the first


def _word_hash(w: str) -> int:
    if len(_WORD_CACHE) >= 1 << 21:
        _WORD_CACHE.clear()
    h = _WORD_CACHE[w] = int.from_bytes(
        hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h


def word_hashes_many(lowered: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """The 64-bit word hashes (BLAKE2b of the UTF-8 word) of several lower-cased texts, concatenated,
    and each text's word count."""
    per = [WORD_RE.findall(t) for t in lowered]
    counts = np.fromiter((len(w) for w in per), np.int64, len(per))
    get = _WORD_CACHE.get
    flat = [get(w) or _word_hash(w) for ws in per for w in ws]
    return np.array(flat, dtype=np.uint64) if flat else np.zeros(0, np.uint64), counts


def word_hashes(text: str) -> np.ndarray:
    return word_hashes_many([text.lower()])[0]


def ngrams_many(wh: np.ndarray, counts: np.ndarray, n: int, short_whole: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Word n-gram hashes of several documents (word hashes concatenated, `counts` words each):
    (hashes, document index of each), grouped by document in order.  short_whole: a document of
    fewer than n words (but some) gives one n-gram of all its words, as ngram_hashes(wh, len)."""
    ends = np.cumsum(counts)
    starts = ends - counts
    g = ngram_hashes(wh, n)
    doc_of = np.repeat(np.arange(len(counts)), counts)[: len(g)]
    valid = np.arange(len(g)) + n <= ends[doc_of] if len(g) else np.zeros(0, bool)
    grams, docs = [g[valid]], [doc_of[valid]]
    if short_whole:
        for d in np.nonzero((counts > 0) & (counts < n))[0].tolist():
            grams.append(ngram_hashes(wh[starts[d]:ends[d]], int(counts[d])))
            docs.append(np.array([d]))
    g, d = np.concatenate(grams), np.concatenate(docs)
    order = np.argsort(d, kind="stable")
    return g[order], d[order]


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
    """h_j(x) = (a_j * x + b_j) mod 2^32, a_j odd, x the high 32 bits of the (mixed, 64-bit) shingle
    hash: a multiply-add family; the signature is min_x h_j(x) for j < num_perm (uint32)."""

    BLOCK = 512  # shingles per step: the (shingles x num_perm) temporary (256 KB) stays in cache

    def __init__(self, num_perm: int = 128, seed: int = 1):
        self.num_perm = num_perm
        self.a = (_constants(num_perm, seed) >> np.uint64(32)).astype(np.uint32) | np.uint32(1)
        self.b = (_constants(num_perm, seed + 1000003) >> np.uint64(32)).astype(np.uint32)

    def _h(self, sh: np.ndarray) -> np.ndarray:
        # 32-bit lanes: half the memory traffic of 64-bit ones, ~2x faster (bench/dedup.py)
        x = (sh >> np.uint64(32)).astype(np.uint32)[:, None]
        with np.errstate(over="ignore"):
            h = x * self.a
            h += self.b
        return h

    def signature(self, sh: np.ndarray) -> np.ndarray:
        out = np.full(self.num_perm, 0xFFFFFFFF, np.uint32)
        for i in range(0, len(sh), self.BLOCK):
            np.minimum(out, self._h(sh[i:i + self.BLOCK]).min(axis=0), out=out)
        return out


    def signatures(self, grams: np.ndarray, docs: np.ndarray, ndocs: int) -> np.ndarray:
        """(ndocs, num_perm) signatures of shingles grouped by document (ngrams_many's output);
        many small documents share one (shingles x permutations) block, not one numpy call each."""
        out = np.full((ndocs, self.num_perm), 0xFFFFFFFF, np.uint32)
        if not len(grams):
            return out
        bounds = np.nonzero(np.diff(docs))[0] + 1
        seg_starts = np.concatenate([[0], bounds])
        seg_docs = docs[seg_starts]
        seg_ends = np.concatenate([bounds, [len(grams)]])
        i = 0
        with np.errstate(over="ignore"):
            while i < len(seg_starts):
                j = i + 1  # segments [i, j) whose shingles fit one block (at least one segment)
                while j < len(seg_starts) and seg_ends[j] - seg_starts[i] <= self.BLOCK:
                    j += 1
                lo, hi = seg_starts[i], seg_ends[j - 1]
                if j == i + 1 and hi - lo > self.BLOCK:
                    out[seg_docs[i]] = self.signature(grams[lo:hi])
                else:
                    out[seg_docs[i:j]] = np.minimum.reduceat(self._h(grams[lo:hi]), seg_starts[i:j] - lo, axis=0)
                i = j
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
