"""Chat records -> token ids + per-token loss masks: the engine's codec for instruction data
(data_prep/engine.py runs it; data_prep/sft.py is the command and documents the output).

A chunk of input becomes validated conversations (data_prep/sft_readers.py), each rendered with the
chat template and tokenized as the exported HF tokenizer does (data_prep/sft_tokenize.py). Beside
the token dataset every shard holds the mask dataset (PREFIX.mask.bin/.idx, uint8, the same
lengths) and every reject as a JSON line (PREFIX.rejects.jsonl); rejects are counted, never fatal.
"""
from __future__ import annotations

import collections
import json
import sys
from typing import Dict, List

import numpy as np

from .chat_template import ChatRenderer, ChatTemplate, check_template
from .common import DataPrepError, human_bytes
from .engine import Codec, Layout, Run, Shard, ShardWriter, spill_result
from .sft_readers import ChatFileReader, parse_records, to_conversation
from .sft_tokenize import OVERLONG, ChatTokenizer, ConversationEncoder, Rejected
from .tokenizer import load_tokenizer
from megafox.formats.dtypes import dtype_name
from megafox.formats.indexed import MASK_DTYPE, mask_prefix

# Bump when a change alters what is written for the same inputs, so finished shards are redone.
SFT_FORMAT_VERSION = 1
MASK = mask_prefix("")  # the mask dataset's suffix, as megafox.formats.indexed names it
REJECTS = ".rejects.jsonl"
MAX_EXAMPLES = 20  # file:line samples per reason in the manifest (all of them in .rejects.jsonl)


# ---------------------------------------------------------------------------------------
# Worker side

_S: Dict[str, object] = {}


def worker_init(model_path: str, template_name: str, template_text: str, seq_length: int, overlong: str,
                dtype: str) -> None:
    sp = load_tokenizer(model_path)
    tokenizer = ChatTokenizer(sp)
    renderer = ChatRenderer(ChatTemplate(template_name, template_text), tokenizer.special_tokens)
    _S.update(encoder=ConversationEncoder(renderer, tokenizer, seq_length, overlong), dtype=np.dtype(dtype))


def encode_chunk(chunk: tuple):
    """chunk -> (token bytes, int32 lengths bytes, [], text bytes, mask bytes, rejects, stats): the
    engine's result, then the mask, the rejects (reason, line, action, detail) in line order and the
    counts. Only bytes and small lists cross processes."""
    encoder: ConversationEncoder = _S["encoder"]
    records, skips = parse_records(chunk)
    rejects = [(reason, line, "dropped", None) for reason, line in skips]
    ids, masks = [], []
    forms: collections.Counter = collections.Counter()
    text_bytes = 0
    for line, obj in records:
        msgs, form, reason = to_conversation(obj)
        forms[form] += 1
        if reason is not None:
            rejects.append((reason, line, "dropped", None))
            continue
        try:
            enc = encoder.encode(msgs)
        except Rejected as r:
            rejects.append((r.reason, line, "dropped", str(r)))
            continue
        if enc.kept_messages < len(msgs):
            rejects.append((OVERLONG, line, "truncated", f"kept {enc.kept_messages} of {len(msgs)} messages"))
        ids.append(enc.ids)
        masks.append(enc.mask)
        text_bytes += sum(len(m["content"].encode("utf-8")) for m in msgs[: enc.kept_messages])
    rejects.sort(key=lambda r: r[1])
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int32, count=len(ids))
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    mask = np.concatenate(masks) if masks else np.zeros(0, MASK_DTYPE)
    stats = {"records": len(records) + len(skips), "trained": int(mask.sum(dtype=np.int64)),
             "forms": dict(forms)}
    return flat.astype(_S["dtype"]).tobytes(), lengths.tobytes(), [], text_bytes, mask.tobytes(), rejects, stats


def encode_spill(chunk: tuple):
    return spill_result(encode_chunk(chunk), bulk=(0, 4))


# ---------------------------------------------------------------------------------------
# Shards


class ChatShardWriter(ShardWriter):
    """Also writes the mask, and every reject to the shard's rejects file (the record keeps counts
    and the first MAX_EXAMPLES of each reason)."""

    def __init__(self, shard: Shard, dtype):
        super().__init__(shard, dtype)
        self.read = self.trained = 0
        self.truncated: collections.Counter = collections.Counter()
        self.forms: collections.Counter = collections.Counter()
        self.per_reason: collections.Counter = collections.Counter()
        self.reject_examples: List[dict] = []

    def _reject(self, reason: str, piece, line: int, action: str, detail=None, count: int = 1) -> None:
        entry = {"reason": reason, "action": action, "file": piece.path, "line": line}
        if piece.start:
            entry["from_byte"] = piece.start  # line counted from that byte (a range of a big file)
        if count != 1:
            entry["count"] = count
        if detail:
            entry["detail"] = detail
        self.side[REJECTS].write(json.dumps(entry, ensure_ascii=False) + "\n")
        if self.per_reason[(action, reason)] < MAX_EXAMPLES:
            self.per_reason[(action, reason)] += 1
            self.reject_examples.append(entry)
        if action == "dropped":
            self.skipped[reason] += count
        else:
            self.truncated[reason] += count

    def skip(self, reason: str, piece, line: int, count: int = 1) -> None:
        """A reader-level loss (truncated or corrupt file): records that were never parsed."""
        self.read += count
        self._reject(reason, piece, line, "dropped", count=count)

    def add(self, piece, result) -> tuple:
        n, t = super().add(piece, result[:4])
        mask, rejects, stats = result[4:]
        self.datasets[0].write(mask)
        self.read += stats["records"]
        self.trained += stats["trained"]
        self.forms.update(stats["forms"])
        for reason, line, action, detail in rejects:
            self._reject(reason, piece, line, action, detail)
        return n, t

    def extra_meta(self) -> dict:
        return {"conversations_read": self.read, "trained_tokens": self.trained,
                "truncated": dict(sorted(self.truncated.items())), "forms": dict(sorted(self.forms.items())),
                "reject_examples": self.reject_examples}


# ---------------------------------------------------------------------------------------
# A run


class ChatRun(Run):
    """Instruction data: opts are data_prep.sft.SFTOptions (chat_template, seq_length, overlong)."""

    noun = "conversations"
    layout = Layout(datasets=((MASK, MASK_DTYPE),), side_files=(REJECTS,))

    def prepare(self, sp, tok: dict, dtype) -> None:
        check_template(self.opts.chat_template, ChatTokenizer(sp).special_tokens)

    def check_input(self, path: str, fmt: str) -> None:
        if fmt == "text":
            raise DataPrepError(f"{path}: chat data must be JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or parquet records")

    def signature(self) -> dict:
        opts = self.opts
        return {"kind": "sft", "sft_format": SFT_FORMAT_VERSION, "tokenizer_sha256": self.tok["sha256"],
                "chat_template_sha256": opts.chat_template.sha256, "seq_length": opts.seq_length,
                "overlong": opts.overlong, "dtype": dtype_name(self.dtype), "format": opts.fmt}

    def codec(self) -> Codec:
        opts, t = self.opts, self.opts.chat_template
        return Codec(worker_init,
                     (self.tok["path"], t.name, t.text, opts.seq_length, opts.overlong, dtype_name(self.dtype)),
                     encode_chunk, encode_spill,
                     lambda piece, fmt, chunk_bytes: ChatFileReader(piece.path, fmt, chunk_bytes, piece.start,
                                                                    piece.end),
                     ChatShardWriter)

    def manifest(self, metas: List[dict], elapsed: float) -> dict:
        opts = self.opts
        dropped: collections.Counter = collections.Counter()
        truncated: collections.Counter = collections.Counter()
        forms: collections.Counter = collections.Counter()
        for m in metas:
            dropped.update(m["skipped"])
            truncated.update(m["truncated"])
            forms.update(m["forms"])
        docs = sum(m["documents"] for m in metas)
        tokens = sum(m["tokens"] for m in metas)
        trained = sum(m["trained_tokens"] for m in metas)
        t = opts.chat_template
        return {
            "version": 1,
            "kind": "sft",
            "prefix": opts.output_prefix,
            "mask_prefix": mask_prefix(opts.output_prefix),
            "inputs": [i for m in metas for i in m["inputs"]],
            "tokenizer": self.tok,
            "chat_template": {"name": t.name, "sha256": t.sha256},
            "seq_length": opts.seq_length,
            "overlong": opts.overlong,
            "dtype": dtype_name(self.dtype),
            "mask_dtype": dtype_name(MASK_DTYPE),
            "conversations": {"read": sum(m["conversations_read"] for m in metas), "written": docs,
                              "dropped": int(sum(dropped.values())), "truncated": int(sum(truncated.values()))},
            "dropped": dict(sorted(dropped.items())),
            "truncated": dict(sorted(truncated.items())),
            "examples": _examples(r for m in metas for r in m["reject_examples"]),
            "record_forms": dict(sorted(forms.items())),
            "documents": docs,
            "tokens": tokens,
            "trained_tokens": trained,
            "text_bytes": sum(m["text_bytes"] for m in metas),
            "shards": len(self.shards),
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "signature": self.sig,
        }

    def print_summary(self, man: dict) -> None:
        c = man["conversations"]
        drop = ", ".join(f"{k}={v}" for k, v in man["dropped"].items()) or "none"
        print(f"{man['prefix']}: {c['written']:,} of {c['read']:,} conversations written, {man['tokens']:,} tokens "
              f"({man['trained_tokens']:,} trained, {100.0 * man['trained_tokens'] / max(man['tokens'], 1):.1f}%), "
              f"dropped {c['dropped']} ({drop}), truncated {c['truncated']} (seq_length {man['seq_length']}), "
              f"{human_bytes(man['text_bytes'])} text, {man['elapsed_s']:.1f}s", flush=True)
        for ex in man["examples"][:5]:
            sys.stderr.write(f"  {ex['action']} {ex['reason']} at {ex['file']}:{ex['line']}"
                             + (f" ({ex['detail']})" if ex.get("detail") else "") + "\n")
        if c["dropped"] + c["truncated"] > 5:
            sys.stderr.write(f"  (every one in {man['prefix']}.rejects.jsonl)\n")


def _examples(rejects) -> List[dict]:
    """The first MAX_EXAMPLES rejects of each (action, reason), in input order."""
    per: collections.Counter = collections.Counter()
    out = []
    for r in rejects:
        key = (r["action"], r["reason"])
        if per[key] < MAX_EXAMPLES:
            per[key] += 1
            out.append(r)
    return out
