"""A conversation -> token ids + per-token loss mask, with the ids the exported HF tokenizer gives.

Token ids. `apply_chat_template(messages, tokenize=True)` renders the conversation to one string
and encodes it with the HF tokenizer (checkpoints_tools/hf_tokenizer.py builds it from the same
SentencePiece model): that tokenizer first cuts the text at every added token (the model's control,
unknown and user-defined pieces, e.g. `</s>` written by `{{ eos_token }}`), longest match first,
emits their ids, and encodes each piece of text between them on its own, SentencePiece's dummy
prefix included. `ChatTokenizer.encode` does exactly that with SentencePiece, so the ids are equal
(tests/data_prep/test_sft_masks.py checks it against transformers on real and trained tokenizers).

Loss mask. The template gives character spans to train on (data_prep/chat_template.py); a token
is a target (mask 1) when its characters overlap a span. The conversation is always tokenized as
one text, never span by span, so the ids stay the ones inference sees; where SentencePiece merges
template text with the first or last characters of an assistant turn into one token, that token is
a target (it carries characters the model must produce) - the rule transformers'
`return_assistant_tokens_mask` uses. Byte-fallback tokens of one character and a standalone dummy
prefix `▁` have no characters of their own: they take the mask of the token they precede.

Overlong conversations (more than seq_length tokens) are dropped, or cut after the last whole
user/assistant exchange that fits (the system prompt kept); one whose first exchange alone does not
fit is dropped. The rendered prefix is tokenized again, since cutting the ids could split a merge.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .chat_template import ChatRenderer, TemplateRenderError

# sentencepiece_model.proto piece types
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

CONTROL_TOKEN = "control_token_in_content"
TEMPLATE_ERROR = "template_error"
OVERLONG = "overlong"


class Rejected(Exception):
    """A conversation that is not written; `reason` is the manifest key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def _proto_pieces(sp, text: str):
    """(id, byte begin, byte end) of each piece, whatever the sentencepiece version calls it."""
    try:
        proto = sp.encode(text, out_type="proto")
    except (ValueError, TypeError, RuntimeError):  # sentencepiece < 0.2.1
        proto = sp.encode(text, out_type="immutable_proto")
    return [(p.id, p.begin, p.end) for p in proto.pieces]


class ChatTokenizer:
    """SentencePiece encoding of rendered chats, cut at added tokens as the HF tokenizer does."""

    def __init__(self, sp):
        # late: protobuf (30-130 ms to import) is not needed by plan validation or --show
        from sentencepiece import sentencepiece_model_pb2

        self.sp = sp
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        added = {p.piece: i for i, p in enumerate(proto.pieces)
                 if p.type in (_UNKNOWN, _CONTROL, _USER_DEFINED) and p.piece}
        self.added = added
        self.control = {p.piece for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL) and p.piece}
        self._split = (re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
                       if added else None)
        self._control_re = (re.compile("|".join(re.escape(t) for t in sorted(self.control, key=len, reverse=True)))
                            if self.control else None)
        # the template variables apply_chat_template passes (tokenizer.special_tokens_map)
        n = sp.GetPieceSize()
        self.special_tokens: Dict[str, str] = {}
        for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id())):
            if 0 <= i < n:
                self.special_tokens[f"{name}_token"] = sp.id_to_piece(i)

    def control_token_in(self, text: str) -> Optional[str]:
        """The first control-token string in `text` (the HF tokenizer would turn it into that id)."""
        if self._control_re is None:
            return None
        m = self._control_re.search(text)
        return m.group(0) if m else None

    def encode(self, text: str, spans: Sequence[Tuple[int, int]] = ()) -> Tuple[List[int], List[int]]:
        """(ids, mask): mask[i] = 1 when token i overlaps one of the character spans."""
        ids: List[int] = []
        mask: List[int] = []
        pos = 0
        if self._split is not None:
            for m in self._split.finditer(text):
                if m.start() > pos:
                    self._encode_text(text[pos:m.start()], pos, spans, ids, mask)
                ids.append(self.added[m.group(0)])
                mask.append(int(_overlaps(m.start(), m.end(), spans)))
                pos = m.end()
        if pos < len(text):
            self._encode_text(text[pos:], pos, spans, ids, mask)
        return ids, mask

    def _encode_text(self, seg: str, lo: int, spans, ids: List[int], mask: List[int]) -> None:
        hi = lo + len(seg)
        inside = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in spans if a < hi and b > lo]
        if not inside or inside == [(0, len(seg))]:
            seg_ids = self.sp.encode(seg)
            ids.extend(seg_ids)
            mask.extend([1 if inside else 0] * len(seg_ids))
            return
        pieces = _proto_pieces(self.sp, seg)
        if not seg.isascii():  # proto offsets are UTF-8 bytes
            inside = [(len(seg[:a].encode("utf-8")), len(seg[:b].encode("utf-8"))) for a, b in inside]
        begin = np.fromiter((p[1] for p in pieces), dtype=np.int64, count=len(pieces))
        end = np.fromiter((p[2] for p in pieces), dtype=np.int64, count=len(pieces))
        # A piece without bytes of its own (byte-fallback continuation, lone dummy prefix) takes the
        # end of the next piece that has some, so it overlaps whatever that piece overlaps (at the
        # end of the text: the start of the previous one).
        empty = end <= begin
        if empty.any():
            idx = np.where(~empty, np.arange(len(end)), len(end))
            nxt = np.minimum.accumulate(idx[::-1])[::-1]  # index of the next non-empty piece
            has_next = nxt < len(end)
            end = np.where(empty & has_next, end[np.minimum(nxt, len(end) - 1)], end)
            prv = np.maximum.accumulate(np.where(~empty, np.arange(len(end)), -1))
            tail = empty & ~has_next & (prv >= 0)
            begin = np.where(tail, begin[np.maximum(prv, 0)], begin)
        hit = np.zeros(len(pieces), dtype=bool)
        for a, b in inside:
            hit |= (begin < b) & (end > a)
        ids.extend(p[0] for p in pieces)
        mask.extend(hit.astype(np.uint8).tolist())


def _overlaps(b: int, e: int, spans) -> bool:
    return any(b < s_end and e > s_start for s_start, s_end in spans)


@dataclass
class EncodedConversation:
    ids: np.ndarray  # int64
    mask: np.ndarray  # uint8
    kept_messages: int  # < len(messages) when truncated


class ConversationEncoder:
    """Messages -> EncodedConversation, or Rejected(reason)."""

    def __init__(self, renderer: ChatRenderer, tokenizer: ChatTokenizer, seq_length: int, overlong: str):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be truncate or drop, got {overlong!r}")
        self.renderer = renderer
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.overlong = overlong

    def _encode(self, messages: Sequence[dict]) -> Tuple[List[int], List[int]]:
        try:
            text, spans = self.renderer.render_with_spans(messages)
        except TemplateRenderError as e:
            raise Rejected(TEMPLATE_ERROR, str(e)) from None
        ids, mask = self.tokenizer.encode(text, spans)
        if not any(mask):
            raise Rejected(TEMPLATE_ERROR, "the template rendered no assistant text")
        return ids, mask

    def encode(self, messages: Sequence[dict]) -> EncodedConversation:
        for m in messages:
            tok = self.tokenizer.control_token_in(m["content"])
            if tok is not None:
                raise Rejected(CONTROL_TOKEN, f"{m['role']} content holds {tok!r}")
        ids, mask = self._encode(messages)
        kept = len(messages)
        if len(ids) > self.seq_length:
            if self.overlong == "drop":
                raise Rejected(OVERLONG, f"{len(ids)} tokens > seq_length {self.seq_length}")
            ids, mask, kept = self._truncate(messages, len(ids))
        return EncodedConversation(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8), kept)

    def _truncate(self, messages: Sequence[dict], full_len: int):
        # Cut points: after each assistant message but the last (the whole conversation is too long).
        cuts = [j + 1 for j, m in enumerate(messages) if m["role"] == "assistant"][:-1]
        best = None
        lo, hi = 0, len(cuts) - 1
        while lo <= hi:  # token count grows with the cut: binary search for the longest that fits
            mid = (lo + hi) // 2
            ids, mask = self._encode(messages[: cuts[mid]])
            if len(ids) <= self.seq_length:
                best = (ids, mask, cuts[mid])
                lo = mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise Rejected(OVERLONG, f"{full_len} tokens and the first exchange alone exceeds seq_length "
                                     f"{self.seq_length}")
        return best
