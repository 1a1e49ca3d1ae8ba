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
never fatal. data_prep/chat_codec.py is the codec that data_prep/engine.py runs, as for pretraining
text: the output is byte-identical for any worker count, shard count or array split, and a rerun
skips finished shards.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np


from .chat_codec import ChatRun
from .chat_template import ChatTemplate, check_template, load_chat_template
from .common import DataPrepError, cli_main, command_parser, expand_inputs, read_json
from .engine import RunOptions, add_engine_arguments, add_run_arguments, run_options
from .tokenizer import load_tokenizer
from megafox.formats.indexed import mask_prefix, read_idx

OVERLONG_POLICIES = ("truncate", "drop")


@dataclass
class SFTOptions(RunOptions):
    chat_template: ChatTemplate
    seq_length: int
    overlong: str = "truncate"

    def __post_init__(self):
        super().__post_init__()
        if self.overlong not in OVERLONG_POLICIES:
            raise DataPrepError(f"overlong must be truncate or drop, got {self.overlong!r}")
        if not isinstance(self.seq_length, int) or self.seq_length < 2:
            raise DataPrepError(f"seq_length must be an integer >= 2, got {self.seq_length!r}")


def preprocess_sft(opts: SFTOptions, merge_only: bool = False) -> dict:
    """Run (a slice of) the SFT preprocessing; returns the manifest (or an array task's stats)."""
    return ChatRun(opts).run(merge_only)


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
        dt, lengths, _ = read_idx(p + ".idx")
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
    p = command_parser("data_prep.sft", __doc__)
    add_run_arguments(p, ".jsonl, .jsonl.gz, .jsonl.zst or .parquet chat records (globs allowed, repeatable)",
                      required=False)  # not with --show
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="built-in template name (fox1) or a Jinja file, as transformers renders it")
    p.add_argument("--seq-length", type=int, default=None, help="longest conversation kept, in tokens")
    p.add_argument("--overlong", default="truncate", choices=OVERLONG_POLICIES,
                   help="longer conversations: cut after the last whole exchange that fits, or drop them")
    add_engine_arguments(p, ["auto", "jsonl", "parquet"], None)
    p.add_argument("--show", metavar="PREFIX", help="print one written conversation with its trained tokens marked")
    p.add_argument("--index", type=int, default=0, help="with --show: which conversation")
    return p


@cli_main
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.show:
        show(a.show, a.tokenizer, a.index)
        return 0
    for flag, v in (("--input", a.input), ("--tokenizer", a.tokenizer), ("--output-prefix", a.output_prefix),
                    ("--chat-template", a.chat_template), ("--seq-length", a.seq_length)):
        if not v:
            raise DataPrepError(f"{flag} is required")
    kw = run_options(a)
    try:
        template = load_chat_template(a.chat_template)
    except DataPrepError as e:
        raise DataPrepError(f"--chat-template: {e}") from None
    opts = SFTOptions(expand_inputs(a.input), a.tokenizer, a.output_prefix, template, a.seq_length, a.overlong, **kw)
    preprocess_sft(opts, merge_only=a.merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
