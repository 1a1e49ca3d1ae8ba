"""A SentencePiece model -> the files `AutoTokenizer.from_pretrained` loads offline.

Writes `tokenizer.model` (the original), `tokenizer.json` (built here with the `tokenizers`
library straight from the SentencePiece proto), `tokenizer_config.json` and
`special_tokens_map.json`. transformers' own Llama/Gemma converters hard-code which ids are
special (Llama: unk 0, bos 1, eos 2; Gemma: pad 0, eos 1, bos 2), and Fox-1's tokenizer is
neither, so the conversion reads the ids, pieces, normalizer settings and byte fallback from the
model itself. The SentencePiece BPE encoder repeatedly merges the adjacent pair whose merged
piece scores highest; a HF BPE with merges ranked by that score reproduces it.

A chat template (the SFT data's, from its blend.json / the checkpoint's records) goes both into
tokenizer_config.json["chat_template"], which every transformers version and most serving stacks
read, and into chat_template.jinja, which recent transformers (5.x) prefers when both exist (and writes
itself on save_pretrained): the two hold the same text.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional

from checkpoints_tools.common import ToolError

# sentencepiece_model.proto piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SP_BPE = 2


def load_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception:
        raise ToolError(f"{path}: not a SentencePiece model") from None
    if not proto.pieces:
        raise ToolError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def resolve_model_file(path: str) -> Path:
    """A `.model` file, or a directory holding `tokenizer.model` (data_prep's output or a HF dir)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise ToolError(f"tokenizer {path}: no SentencePiece model found (expected a .model file or a "
                        f"directory with tokenizer.model)")
    return p


def special_ids(proto) -> Dict[str, Optional[int]]:
    t = proto.trainer_spec
    n = len(proto.pieces)
    return {name: (i if 0 <= i < n else None)
            for name, i in (("unk", t.unk_id), ("bos", t.bos_id), ("eos", t.eos_id), ("pad", t.pad_id))}


def build_tokenizer(proto):
    """The `tokenizers.Tokenizer` equivalent of a SentencePiece BPE model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    if proto.trainer_spec.model_type != SP_BPE:
        raise ToolError("only SentencePiece BPE models are supported (Fox-1's tokenizer is BPE); "
                        f"this one has model_type={proto.trainer_spec.model_type}")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                # highest score first, then the piece's id; several splits of one piece in id order
                merges.append((-score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    ids = special_ids(proto)
    unk = pieces[ids["unk"]][0] if ids["unk"] is not None else None
    tok = Tokenizer(BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
                        byte_fallback=proto.trainer_spec.byte_fallback, dropout=None))

    spec = proto.normalizer_spec
    norm = []
    if spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    if spec.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)

    # SentencePiece never splits control/unknown pieces out of text, but HF users expect to write
    # "<eos>" in a prompt; user-defined pieces are matched verbatim in text by both.
    added = [AddedToken(piece, special=(kind in (CONTROL, UNKNOWN)), normalized=False)
             for piece, _, kind in pieces if kind in (CONTROL, UNKNOWN, USER_DEFINED)]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    if ids["bos"] is not None:
        bos = pieces[ids["bos"]][0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ids["bos"])])
    return tok


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def write_hf_tokenizer(model_file: Path, out_dir: Path, model_max_length: int,
                       vocab_limit: Optional[int] = None,
                       chat_template: Optional[str] = None) -> Dict[str, Optional[int]]:
    """Write the tokenizer files into `out_dir` (with `chat_template`, the Jinja text, when given);
    return its special ids {unk, bos, eos, pad}."""
    proto = load_proto(model_file)
    if vocab_limit is not None and len(proto.pieces) > vocab_limit:
        raise ToolError(f"tokenizer {model_file}: has {len(proto.pieces)} pieces but the model's vocab_size "
                        f"is {vocab_limit}")
    tok = build_tokenizer(proto)
    out_dir = Path(out_dir)
    if Path(model_file).resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(model_file, out_dir / "tokenizer.model")
    tok.save(str(out_dir / "tokenizer.json"))
    ids = special_ids(proto)
    names = {k: (proto.pieces[i].piece if i is not None else None) for k, i in ids.items()}
    special_map = {f"{k}_token": v for k, v in names.items() if v is not None}
    config = {
        # The generic fast class loads tokenizer.json exactly as written (the Llama class would
        # rebuild its own normalizer and assume Llama's special ids).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": ids["bos"] is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "sp_model_kwargs": {},
    }
    template_file = out_dir / CHAT_TEMPLATE_FILE
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ToolError("chat template: empty (expected the Jinja text)")
        config["chat_template"] = chat_template
        template_file.write_text(chat_template, encoding="utf-8")
    elif template_file.exists():  # a template left by an earlier export would be loaded as this one's
        template_file.unlink()
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids
