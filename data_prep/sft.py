"""Instruction-tuning (SFT) data: chat records -> token ids + per-token loss masks, packed-ready.

    python -m data_prep.sft --input GLOB [GLOB ...] --tokenizer MODEL --output-prefix PREFIX
        --chat-template fox1|FILE.jinja --seq-length N [--overlong truncate|drop]
        [--workers N] [--dtype auto|uint16|int32] [--format auto|jsonl|parquet] [--shards K]
        [--array-index I --array-count N] [--merge] [--keep-shards]
    python -m data_prep.sft --show PREFIX [--tokenizer MODEL] [--index I]   # one conversation, targets marked

Or as a stage of a data plan (`kind: sft`, see configs/data/fox1_sft.yaml):
    make preprocess DATA_PLAN=configs/data/fox1_sft.yaml

THE CONTRACT WITH THE TRAINING SIDE. For each source, under <output_dir>/<stage>/:
  <source>.bin/.idx       token ids in Megatron's indexed format (what megatron-core's
                          IndexedDataset reads; uint16 when the vocabulary is < 65500, else int32,
                          as for pretraining). ONE sequence (= one document) per conversation: the
                          whole rendered conversation, bos included if the template writes one.
  <source>.mask.bin/.idx  a second indexed dataset, dtype uint8, with identical sequence lengths
                          and document boundaries: mask[i] = 1 when token i is a TARGET the model
                          must learn to produce (assistant content tokens and the end-of-turn/eos
                          token closing each assistant turn), else 0. The trainer shifts: the
                          input at position t is trained iff mask[t + 1] == 1.
  <source>.manifest.json  counts: conversations read / written / dropped and truncated by reason
                          with file:line samples, tokens, trained tokens; inputs with sha256,
                          tokenizer hash, template name and hash.
  <source>.rejects.jsonl  every dropped or truncated conversation: {"reason", "action", "file",
                          "line", "detail"}.
  blend.json              the pretraining blend (megafox/formats/blend.py: stage, tokenizer,
                          datasets[{prefix, weight, documents, tokens}], token_budget) plus
                          "kind": "sft", per dataset "mask_prefix" and "trained_tokens",
                          "seq_length" (every conversation written has at most that many tokens)
                          and "chat_template" (the template text itself: the trainer records it in
                          its checkpoints and megafox-to-hf writes it into tokenizer_config.json).

How a conversation becomes ids and a mask: data_prep/chat_template.py renders it exactly as
transformers' apply_chat_template does and locates the assistant spans ({% generation %} tags, or
rendering prefix by prefix); data_prep/sft_tokenize.py tokenizes the whole rendered text as the
exported HF tokenizer does (cut at added tokens such as </s>, SentencePiece between them) and
marks the tokens overlapping a span. Tokenization boundary effects: the text is never tokenized
span by span, so the ids equal apply_chat_template's; a token SentencePiece merged across a span
boundary is a target (it holds characters the model must produce), byte-fallback pieces follow
their character. Records are validated first (data_prep/sft_readers.py); rejects are counted,
never fatal. Work is split into shards as in data_prep/preprocess.py (its parallel loop is reused):
the output is byte-identical for any worker count, shard count or array split, and a rerun skips
finished shards.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from . import preprocess as pre
from .chat_template import ChatRenderer, ChatTemplate, check_template, load_chat_template
from megafox.runtime.fs import atomic_write_json

from .common import (DataPrepError, detect_format, expand_inputs, human_bytes, read_json, run_main, setup_logging,
                     tmp_name)
from .indexed import choose_dtype, merge_prefixes
from .sft_readers import ChatFileReader, parse_records, to_conversation
from .sft_tokenize import OVERLONG, ChatTokenizer, ConversationEncoder, Rejected
from .tokenizer import load_tokenizer
from megafox.formats import FormatError
from megafox.formats.dtypes import dtype_name
from megafox.formats.indexed import read_idx, write_idx
from megafox.formats.tokenizer import tokenizer_info

# Bump when a change alters what is written for the same inputs, so finished shards are redone.
SFT_FORMAT_VERSION = 1
MASK_DTYPE = np.uint8
MAX_EXAMPLES = 20  # file:line samples per reason in the manifest (all of them in .rejects.jsonl)
OVERLONG_POLICIES = ("truncate", "drop")


@dataclass
class SFTOptions:
    inputs: List[str]
    tokenizer: str
    output_prefix: str
    chat_template: ChatTemplate
    seq_length: int
    overlong: str = "truncate"
    workers: int = 1
    dtype: str = "auto"
    fmt: str = "auto"
    shards: Optional[int] = None
    array_index: Optional[int] = None
    array_count: Optional[int] = None
    keep_shards: bool = False
    chunk_bytes: int = pre.DEFAULT_CHUNK_BYTES
    progress: str = "auto"
    log_interval: float = 30.0
    quiet: bool = False

    def __post_init__(self):
        self.output_prefix = os.path.abspath(self.output_prefix)
        self.workers = max(1, int(self.workers))
        if self.overlong not in OVERLONG_POLICIES:
            raise DataPrepError(f"overlong must be truncate or drop, got {self.overlong!r}")
        if not isinstance(self.seq_length, int) or self.seq_length < 2:
            raise DataPrepError(f"seq_length must be an integer >= 2, got {self.seq_length!r}")


def mask_prefix(prefix: str) -> str:
    return prefix + ".mask"


# ---------------------------------------------------------------------------------------
# Worker side

_S: Dict[str, object] = {}


def _worker_init(model_path: str, template_name: str, template_text: str, seq_length: int, overlong: str,
                 dtype: str, spill_dir: Optional[str] = None) -> None:
    sp = load_tokenizer(model_path)
    tokenizer = ChatTokenizer(sp)
    renderer = ChatRenderer(ChatTemplate(template_name, template_text), tokenizer.special_tokens)
    _S.update(encoder=ConversationEncoder(renderer, tokenizer, seq_length, overlong), dtype=np.dtype(dtype),
              spill=spill_dir, spilled=0)


def _encode_chunk(chunk: tuple):
    """chunk -> (token bytes, mask bytes, int32 lengths bytes, rejects, stats). Rejects are
    (reason, line, action, detail) in line order; only bytes and small lists cross processes."""
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
             "forms": dict(forms), "text_bytes": text_bytes}
    return flat.astype(_S["dtype"]).tobytes(), mask.tobytes(), lengths.tobytes(), rejects, stats


def _encode_spill(chunk: tuple):
    """As _encode_chunk, with tokens and mask handed over in spill files (see preprocess._encode_spill)."""
    tok, mask, lens, rejects, stats = _encode_chunk(chunk)
    _S["spilled"] += 1
    refs = []
    for kind, data in (("tok", tok), ("mask", mask)):
        path = os.path.join(_S["spill"], f".worker{os.getpid()}-{_S['spilled']}.{kind}.spill.tmp")
        with open(path, "wb") as f:
            f.write(data)
        refs.append((path, len(data)))
    return refs[0], refs[1], lens, rejects, stats


# ---------------------------------------------------------------------------------------
# Shards


class SFTShard(pre.Shard):
    def rejects_path(self) -> str:
        return self.prefix + ".rejects.jsonl"

    def is_complete(self) -> bool:
        if not super().is_complete():
            return False
        tokens = read_json(self.meta_path())["tokens"]
        m = mask_prefix(self.prefix)
        return (os.path.exists(m + ".idx") and os.path.exists(m + ".bin") and os.path.getsize(m + ".bin") == tokens
                and os.path.exists(self.rejects_path()))


class SFTShardWriter(pre.ShardWriter):
    """ShardWriter that also writes the mask dataset, and every reject to a file of its own (the
    record keeps counts and the first MAX_EXAMPLES of each reason)."""

    def __init__(self, shard: SFTShard, dtype):
        super().__init__(shard, dtype)
        m = mask_prefix(shard.prefix)
        self.mask_bin_tmp, self.mask_idx_tmp = tmp_name(m + ".bin"), tmp_name(m + ".idx")
        self.rejects_tmp = tmp_name(shard.rejects_path())
        self.mask_f = open(self.mask_bin_tmp, "wb")
        self.rejects_f = open(self.rejects_tmp, "w", encoding="utf-8")
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
        self.rejects_f.write(_json_line(entry))
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
        tok, mask, lens, rejects, stats = result
        n, t = super().add(piece, (tok, lens, [], stats["text_bytes"]))
        if isinstance(mask, tuple):
            pre._copy_spill(mask, self.mask_f)
        else:
            self.mask_f.write(mask)
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

    def finish(self) -> dict:
        self.mask_f.close()
        self.rejects_f.close()
        os.replace(self.rejects_tmp, self.shard.rejects_path())
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        write_idx(self.mask_idx_tmp, lengths, MASK_DTYPE)
        m = mask_prefix(self.shard.prefix)
        os.replace(self.mask_idx_tmp, m + ".idx")
        os.replace(self.mask_bin_tmp, m + ".bin")
        return super().finish()  # tokens, then the shard record that marks it complete

    def abort(self) -> None:
        try:
            self.mask_f.close()
            self.rejects_f.close()
            for p in (self.mask_bin_tmp, self.mask_idx_tmp, self.rejects_tmp):
                if os.path.exists(p):
                    os.unlink(p)
        finally:
            super().abort()


# ---------------------------------------------------------------------------------------
# Driver


def _setup(opts: SFTOptions):
    sp = load_tokenizer(opts.tokenizer)
    tok = tokenizer_info(sp, opts.tokenizer)
    dtype = choose_dtype(opts.dtype, tok["vocab_size"])
    check_template(opts.chat_template, ChatTokenizer(sp).special_tokens)
    fmts = {}
    for f in opts.inputs:
        fmts[f] = detect_format(f, opts.fmt)
        if fmts[f] == "text":
            raise DataPrepError(f"{f}: chat data must be JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or parquet records")
    sig_common = {"kind": "sft", "sft_format": SFT_FORMAT_VERSION, "tokenizer_sha256": tok["sha256"],
                  "chat_template_sha256": opts.chat_template.sha256, "seq_length": opts.seq_length,
                  "overlong": opts.overlong, "dtype": dtype_name(dtype), "format": opts.fmt}
    groups = pre.group_pieces(pre.plan_pieces(opts.inputs, fmts, opts.shards), opts.shards)
    shards = [SFTShard(i, g, opts, sig_common, fmts) for i, g in enumerate(groups)]
    return tok, dtype, shards, dict(sig_common, shards=[s.signature["files"] for s in shards])


def _codec(opts: SFTOptions, tok: dict, dtype) -> pre.Codec:
    t = opts.chat_template
    return pre.Codec(_worker_init, (tok["path"], t.name, t.text, opts.seq_length, opts.overlong, dtype_name(dtype)),
                     _encode_chunk, _encode_spill,
                     lambda piece, fmt, chunk_bytes: ChatFileReader(piece.path, fmt, chunk_bytes, piece.start,
                                                                    piece.end),
                     SFTShardWriter)


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


def _manifest(shards, opts: SFTOptions, tok: dict, dtype, sig: dict, elapsed: float) -> dict:
    metas = [read_json(s.meta_path()) for s in shards]
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
        "tokenizer": tok,
        "chat_template": {"name": t.name, "sha256": t.sha256},
        "seq_length": opts.seq_length,
        "overlong": opts.overlong,
        "dtype": dtype_name(dtype),
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
        "shards": len(shards),
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "signature": sig,
    }


def _finalize(shards, opts: SFTOptions, tok: dict, dtype, sig: dict, t0: float) -> dict:
    missing = [s.index for s in shards if not s.is_complete()]
    if missing:
        raise DataPrepError(f"{opts.output_prefix}: {len(missing)} of {len(shards)} shards are not finished "
                            f"(e.g. shard {missing[0]} under {opts.output_prefix}.shards/); rerun them first")
    man = _manifest(shards, opts, tok, dtype, sig, time.monotonic() - t0)
    out, out_mask = opts.output_prefix, mask_prefix(opts.output_prefix)
    if len(shards) == 1 and not opts.keep_shards:
        for src, dst in ((mask_prefix(shards[0].prefix), out_mask), (shards[0].prefix, out)):
            os.replace(src + ".idx", dst + ".idx")
            os.replace(src + ".bin", dst + ".bin")
    else:
        merge_prefixes([mask_prefix(s.prefix) for s in shards], out_mask, MASK_DTYPE)
        merge_prefixes([s.prefix for s in shards], out, dtype)
    rejects_tmp = tmp_name(out + ".rejects.jsonl")
    try:
        with open(rejects_tmp, "wb") as f:
            for s in shards:
                with open(s.rejects_path(), "rb") as part:
                    shutil.copyfileobj(part, f, 1 << 20)
        os.replace(rejects_tmp, out + ".rejects.jsonl")
    finally:
        if os.path.exists(rejects_tmp):
            os.unlink(rejects_tmp)
    man["elapsed_s"] = round(time.monotonic() - t0, 3)
    man["tokens_per_s"] = round(man["tokens"] / man["elapsed_s"], 1) if man["elapsed_s"] > 0 else None
    atomic_write_json(out + ".manifest.json", man)  # last: marks the output complete
    if not opts.keep_shards:
        shutil.rmtree(out + ".shards", ignore_errors=True)
    return man


def _json_line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _up_to_date(opts: SFTOptions, sig: dict) -> Optional[dict]:
    try:
        man = read_json(opts.output_prefix + ".manifest.json")
    except (OSError, ValueError):
        return None
    if man.get("signature") != sig:
        return None
    want = {opts.output_prefix + ".bin": man["tokens"] * np.dtype(man["dtype"]).itemsize,
            mask_prefix(opts.output_prefix) + ".bin": man["tokens"]}
    for path, size in want.items():
        if not (os.path.exists(path) and os.path.exists(path[:-4] + ".idx") and os.path.getsize(path) == size):
            return None
    return man


def preprocess_sft(opts: SFTOptions, merge_only: bool = False) -> dict:
    """Run (a slice of) the SFT preprocessing; returns the manifest (or an array task's stats)."""
    t0 = time.monotonic()
    os.makedirs(os.path.dirname(opts.output_prefix) or ".", exist_ok=True)
    tok, dtype, shards, sig = _setup(opts)
    label = opts.output_prefix
    man = _up_to_date(opts, sig)
    if man is not None:
        if not opts.quiet:
            print(f"{label}: up to date ({man['documents']} conversations, {man['tokens']} tokens)", flush=True)
        return man
    if opts.array_count is not None:
        if opts.array_index is None or not (0 <= opts.array_index < opts.array_count):
            raise DataPrepError(f"--array-index must be in [0, {opts.array_count})")
        mine = [shards[i] for i in pre.array_slice(len(shards), opts.array_index, opts.array_count)]
        stats = (pre._process(mine, opts, tok, dtype, None, label, _codec(opts, tok, dtype))
                 if mine and not merge_only else {})
        el = time.monotonic() - t0
        if not opts.quiet:
            print(f"{label}: array task {opts.array_index}/{opts.array_count}: {len(mine)} of {len(shards)} shards, "
                  f"{stats.get('documents', 0)} conversations, {stats.get('tokens', 0)} tokens, {el:.1f}s", flush=True)
        return dict(stats, shards=[s.index for s in mine], elapsed_s=el)
    if not merge_only:
        pre._process(shards, opts, tok, dtype, None, label, _codec(opts, tok, dtype))
    man = _finalize(shards, opts, tok, dtype, sig, t0)
    if not opts.quiet:
        print_summary(man)
    return man


def print_summary(man: dict) -> None:
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


# ---------------------------------------------------------------------------------------
# A data plan's `kind: sft` stage (data_prep/plan.py calls these)

STAGE_FIELDS = ("kind", "chat_template", "seq_length", "overlong")


def stage_settings(raw: dict, sources: List[dict], where: str) -> dict:
    """Validate an sft stage's own fields; errors name the field (the caller adds the plan path)."""
    if "chat_template" not in raw:
        raise DataPrepError(f"{where}.chat_template: required for kind: sft (fox1, or a .jinja file)")
    try:
        template = load_chat_template(raw["chat_template"])
        # stand-in strings, only to check the template renders before the tokenizer exists (a plan may
        # train it); _setup checks it again with the real tokenizer's special tokens
        check_template(template, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                  "pad_token": "<pad>"})
    except DataPrepError as e:
        raise DataPrepError(f"{where}.chat_template: {e}") from None
    seq = raw.get("seq_length")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 2:
        raise DataPrepError(f"{where}.seq_length: required for kind: sft, an integer >= 2 (the longest "
                            f"conversation kept, in tokens), got {seq!r}")
    overlong = raw.get("overlong", "truncate")
    if overlong not in OVERLONG_POLICIES:
        raise DataPrepError(f"{where}.overlong: must be truncate or drop, got {overlong!r}")
    for i, src in enumerate(sources):
        if src["format"] == "text":
            raise DataPrepError(f"{where}.sources[{i}].format: text is not chat data (use auto, jsonl or parquet)")
        if src["json_key"] != "text":
            raise DataPrepError(f"{where}.sources[{i}].json_key: not used by kind: sft (records are recognised "
                                "by their messages / conversations / instruction+output fields)")
    return {"chat_template": template, "seq_length": seq, "overlong": overlong}


def run_sft_stage(plan: dict, stage: str, tok_path: str, workers: int = 0, array_index=None, array_count=None,
                  finalize: bool = False, quiet: bool = False) -> Optional[Dict[str, dict]]:
    """Preprocess every source of an sft stage; returns {source: manifest} (the plan writes the
    stage's blend.json from them), None for an array task."""
    st = plan["stages"][stage]
    cfg = st["sft"]
    pp = plan["preprocess"]
    manifests = {}
    for src in st["sources"]:
        try:
            inputs = expand_inputs(src["globs"], what="glob")
        except DataPrepError as e:
            raise DataPrepError(f"{plan['path']}: {src['where'].split(': ', 1)[-1]}.globs: {e}") from None
        opts = SFTOptions(inputs, tok_path, os.path.join(plan["output_dir"], stage, src["name"]),
                          cfg["chat_template"], cfg["seq_length"], cfg["overlong"],
                          workers=workers or pp["workers"] or os.cpu_count() or 1, dtype=pp["dtype"],
                          fmt=src["format"], shards=pp["shards"], array_index=array_index,
                          array_count=array_count, chunk_bytes=int(pp["chunk_mb"] * (1 << 20)), quiet=quiet)
        manifests[src["name"]] = preprocess_sft(opts, merge_only=finalize)
    return None if array_count is not None else manifests


# ---------------------------------------------------------------------------------------
# Looking at the result


def show(prefix: str, tokenizer: Optional[str], index: int = 0, out=None) -> None:
    """Print conversation `index` of PREFIX token by token, the trained ones between [[ and ]]
    (control tokens by name, SentencePiece's ▁ as a space: what the model sees)."""
    out = out or sys.stdout
    data = {}
    for p in (prefix, mask_prefix(prefix)):
        if not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")):
            raise DataPrepError(f"{p}.bin/.idx: not found")
        try:
            dt, lengths, _ = read_idx(p + ".idx")
        except FormatError as e:
            raise DataPrepError(str(e)) from None
        if not 0 <= index < len(lengths):
            raise DataPrepError(f"--index {index}: {prefix} holds {len(lengths)} conversations")
        start = int(lengths[:index].astype(np.int64).sum())
        data[p] = np.fromfile(p + ".bin", dtype=dt, count=int(lengths[index]),
                              offset=start * np.dtype(dt).itemsize).tolist()
    ids, mask = data[prefix], data[mask_prefix(prefix)]
    if tokenizer is None:
        try:
            tokenizer = read_json(prefix + ".manifest.json")["tokenizer"]["path"]
        except (OSError, ValueError, KeyError):
            raise DataPrepError(f"{prefix}.manifest.json: unreadable; give --tokenizer") from None
    sp = load_tokenizer(tokenizer)
    text, pending = [], bytearray()
    for i, (t, m) in enumerate(zip(ids, mask)):
        if i == 0 or m != mask[i - 1]:
            text.append(pending.decode("utf-8", "replace"))
            pending.clear()
            text.append("[[" if m else "]]" if i else "")
        piece = sp.id_to_piece(t)
        if sp.is_byte(t):
            pending.append(int(piece[3:5], 16))
        else:
            pending.extend((piece if sp.is_control(t) else piece.replace("\u2581", " ")).encode("utf-8"))
    text.append(pending.decode("utf-8", "replace") + ("]]" if mask and mask[-1] else ""))
    out.write(f"{prefix} conversation {index}: {len(ids)} tokens, {sum(mask)} trained ([[...]])\n")
    out.write("".join(text) + "\n")


# ---------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.sft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", action="extend", metavar="GLOB",
                   help=".jsonl, .jsonl.gz, .jsonl.zst or .parquet chat records (globs allowed, repeatable)")
    p.add_argument("--tokenizer", metavar="MODEL", help="SentencePiece .model file (or a dir with tokenizer.model)")
    p.add_argument("--output-prefix", metavar="PREFIX")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="built-in template name (fox1) or a Jinja file, as transformers renders it")
    p.add_argument("--seq-length", type=int, default=None, help="longest conversation kept, in tokens")
    p.add_argument("--overlong", default="truncate", choices=OVERLONG_POLICIES,
                   help="longer conversations: cut after the last whole exchange that fits, or drop them")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "int32"])
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet"])
    p.add_argument("--shards", type=int, default=None, metavar="K")
    p.add_argument("--keep-shards", action="store_true")
    p.add_argument("--array-index", type=int, default=None)
    p.add_argument("--array-count", type=int, default=None)
    p.add_argument("--merge", action="store_true", help="only merge finished shards into PREFIX + manifest")
    p.add_argument("--chunk-mb", type=float, default=pre.DEFAULT_CHUNK_BYTES / (1 << 20))
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "log", "none"])
    p.add_argument("--log-interval", type=float, default=30.0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--show", metavar="PREFIX", help="print one written conversation with its trained tokens marked")
    p.add_argument("--index", type=int, default=0, help="with --show: which conversation")
    return p


def _main(argv=None) -> int:
    setup_logging()
    a = build_parser().parse_args(argv)
    if a.show:
        show(a.show, a.tokenizer, a.index)
        return 0
    for flag, v in (("--input", a.input), ("--tokenizer", a.tokenizer), ("--output-prefix", a.output_prefix),
                    ("--chat-template", a.chat_template), ("--seq-length", a.seq_length)):
        if not v:
            raise DataPrepError(f"{flag} is required")
    if (a.array_index is None) != (a.array_count is None) and not a.merge:
        raise DataPrepError("--array-index and --array-count go together")
    if a.shards is not None and a.shards < 1:
        raise DataPrepError("--shards must be >= 1")
    try:
        template = load_chat_template(a.chat_template)
    except DataPrepError as e:
        raise DataPrepError(f"--chat-template: {e}") from None
    opts = SFTOptions(expand_inputs(a.input), a.tokenizer, a.output_prefix, template, a.seq_length, a.overlong,
                      workers=a.workers, dtype=a.dtype, fmt=a.format, shards=a.shards, array_index=a.array_index,
                      array_count=None if a.merge else a.array_count, keep_shards=a.keep_shards,
                      chunk_bytes=max(1024, int(a.chunk_mb * (1 << 20))), progress=a.progress,
                      log_interval=a.log_interval, quiet=a.quiet)
    preprocess_sft(opts, merge_only=a.merge)
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
