"""Pretraining documents -> token ids: the engine's codec for text (data_prep/engine.py runs it).

A chunk of input (data_prep/readers.py) becomes its documents' SentencePiece ids, the tokenizer's
eos appended to each (unless --no-append-eod); records that are no document are counted by reason
with file:line samples. The manifest (PREFIX.manifest.json) sums the shards' records.
"""

from __future__ import annotations

import collections
import sys
from typing import Dict, List, Optional

import numpy as np

from .common import DataPrepError, human_bytes
from .engine import MAX_EXAMPLES, Codec, Run, ShardWriter, spill_result
from .readers import EMPTY, INVALID_UTF8, FileReader, parse_chunk
from .tokenizer import load_tokenizer
from megafox.formats.dtypes import dtype_name

MANIFEST_VERSION = 1

# This process's tokenizer and settings: a pool worker's, or the main process's with one worker
# (data_prep/dedup.py's filtering codec encodes with them too).
WORKER: Dict[str, object] = {}


def worker_init(model_path: str, json_key: str, eos: Optional[int], dtype: str) -> None:
    WORKER.update(sp=load_tokenizer(model_path), key=json_key, eos=eos, dtype=np.dtype(dtype))


def encode_chunk(chunk: tuple):
    """chunk -> (token bytes, int32 lengths bytes, skips, text bytes).  Only bytes cross processes."""
    return encode_texts(*parse_chunk(chunk, WORKER["key"]))


def encode_spill(chunk: tuple):
    return spill_result(encode_chunk(chunk))


def encode_texts(texts: List[str], lines: List[int], skips: list):
    """Parsed documents -> encode_chunk's result (also data_prep.dedup's, after it drops some)."""
    sp = WORKER["sp"]
    nbytes_text = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    try:
        arrs = sp.encode(texts, return_type="numpy", num_threads=1) if texts else []
    except Exception:  # e.g. lone surrogates from JSON escapes: isolate the bad documents
        arrs, kept = [], []
        for t, ln in zip(texts, lines):
            try:
                arrs.append(sp.encode([t], return_type="numpy", num_threads=1)[0])
                kept.append(ln)
            except Exception:
                skips.append((INVALID_UTF8, ln))
        lines = kept
        skips.sort(key=lambda s: s[1])
    eos = WORKER["eos"]
    if any(len(a) == 0 for a in arrs):  # nothing to train on (possible only without eos)
        skips.extend((EMPTY, ln) for a, ln in zip(arrs, lines) if len(a) == 0)
        skips.sort(key=lambda s: s[1])
        arrs = [a for a in arrs if len(a)]
    n = len(arrs)
    lengths = np.fromiter((len(a) for a in arrs), dtype=np.int32, count=n)
    if eos is not None and n:
        lengths += 1
        e = np.array([eos], dtype=np.int32)
        parts = []
        for a in arrs:
            parts.append(a)
            parts.append(e)
    else:
        parts = arrs
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return flat.astype(WORKER["dtype"], copy=False).tobytes(), lengths.tobytes(), skips, nbytes_text


class TextRun(Run):
    """Pretraining text: opts are data_prep.preprocess.Options (json_key, append_eod, drop_filter)."""

    def prepare(self, sp, tok: dict, dtype) -> None:
        self.eos = None
        if self.opts.append_eod:
            self.eos = tok["eos_id"]
            if self.eos is None or self.eos < 0:
                raise DataPrepError(f"tokenizer {tok['path']} has no eos id; use --no-append-eod")

    def signature(self) -> dict:
        opts = self.opts
        sig = {"tokenizer_sha256": self.tok["sha256"], "json_key": opts.json_key,
               "append_eod": bool(opts.append_eod), "dtype": dtype_name(self.dtype), "format": opts.fmt}
        if opts.drop_filter is not None:  # other removals: the shards are tokenized again
            sig["removed"] = opts.drop_filter.digest
        return sig

    def codec(self) -> Codec:
        opts = self.opts
        codec = Codec(worker_init, (self.tok["path"], opts.json_key, self.eos, dtype_name(self.dtype)),
                      encode_chunk, encode_spill,
                      lambda piece, fmt, chunk_bytes: FileReader(piece.path, fmt, opts.json_key, chunk_bytes,
                                                                 piece.start, piece.end),
                      ShardWriter)
        return opts.drop_filter.codec(codec) if opts.drop_filter is not None else codec

    def manifest(self, metas: List[dict], elapsed: float) -> dict:
        opts = self.opts
        skipped: collections.Counter = collections.Counter()
        examples: List[dict] = []
        for m in metas:
            skipped.update(m["skipped"])
            examples.extend(m["skipped_examples"][: MAX_EXAMPLES - len(examples)])
        docs = sum(m["documents"] for m in metas)
        tokens = sum(m["tokens"] for m in metas)
        removed: collections.Counter = collections.Counter()  # by the stage's dedup / decontamination
        for m in metas:
            removed.update(m.get("removed", {}))
        extra = {"removed": dict(sorted(removed.items()))} if any("removed" in m for m in metas) else {}
        return {
            "version": MANIFEST_VERSION,
            "prefix": opts.output_prefix,
            "inputs": [i for m in metas for i in m["inputs"]],
            "tokenizer": self.tok,
            "dtype": dtype_name(self.dtype),
            "json_key": opts.json_key,
            "append_eod": bool(opts.append_eod),
            "documents": docs,
            "tokens": tokens,
            "text_bytes": sum(m.get("text_bytes", 0) for m in metas),
            "skipped": dict(sorted(skipped.items())),
            "skipped_total": int(sum(skipped.values())),
            "skipped_examples": examples,
            "shards": len(self.shards),
            "shard_prefixes": [s.prefix for s in self.shards] if opts.keep_shards else [],
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "signature": self.sig,
            **extra,
        }

    def print_summary(self, man: dict) -> None:
        sk = man["skipped"]
        sk_s = ", ".join(f"{k}={v}" for k, v in sk.items()) if sk else "none"
        print(f"{man['prefix']}: {man['documents']:,} documents, {man['tokens']:,} tokens ({man['dtype']}), "
              f"{human_bytes(man['text_bytes'])} text, skipped {man['skipped_total']} ({sk_s}), "
              f"{man['elapsed_s']:.1f}s, {man['tokens_per_s'] or 0:,.0f} tokens/s", flush=True)
        for ex in man["skipped_examples"][:5]:
            where = f"{ex['file']}:{ex['line']}"
            if ex.get("from_byte"):
                where = f"{ex['file']}: line {ex['line']} of the lines from byte {ex['from_byte']}"
            sys.stderr.write(f"  skipped {ex['reason']} at {where}\n")
        if man["skipped_total"] > 5:
            sys.stderr.write(f"  (all skip counts in {man['prefix']}.manifest.json)\n")
