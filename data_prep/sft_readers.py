"""Chat records on disk -> validated conversations ([{role, content}, ...]), with a reason for every reject.

Files are read by data_prep.readers.FileReader (JSONL, .gz, .zst: complete lines with their line
numbers; parquet: here, by rows, every column a record form needs). A record is one of:
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
  alpaca    {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
            -> [system], user: instruction (+ "\\n\\n" + input when non-empty), assistant: output
A conversation is valid when it is: an optional system message first, then user and assistant
alternating from a user message, ending with an assistant message; no assistant or user turn
empty. Anything else is counted under a reason below, never fatal.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from .readers import INVALID_UTF8, MISSING_KEY, FileReader, json_objects

# Reject reasons (manifest keys) decided here; the reader's own ones are reused as they are.
MALFORMED_RECORD = "malformed_record"  # the fields exist but have the wrong shape or type
UNKNOWN_ROLE = "unknown_role"
WRONG_ROLE_ORDER = "wrong_role_order"
EMPTY_ASSISTANT = "empty_assistant_turn"
EMPTY_USER = "empty_user_turn"

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
# every column some record form reads (parquet: only these are loaded)
COLUMNS = ("messages", "conversations", "instruction", "input", "output", "system")


class ChatFileReader(FileReader):
    """FileReader whose parquet chunks are whole records ("rows", [dict, ...], first_row)."""

    PARQUET_BATCH = 1024

    def __init__(self, path: str, fmt: str, chunk_bytes: int, start: int = 0, end: Optional[int] = None):
        super().__init__(path, fmt, "messages", chunk_bytes, start, end)

    def _parquet_columns(self, names: List[str]) -> List[str]:
        return [c for c in COLUMNS if c in names]

    def _parquet_chunk(self, batch) -> tuple:
        return "rows", batch.to_pylist()


def parse_records(chunk: tuple) -> Tuple[List[Tuple[int, dict]], List[Tuple[str, int]]]:
    """A reader chunk -> ([(line, object)], [(reason, line)])."""
    kind = chunk[0]
    if kind == "rows":
        _, rows, first = chunk
        return [(first + i, r) for i, r in enumerate(rows)], []
    if kind != "lines":
        raise ValueError(f"unknown chunk kind {kind!r}")
    _, block, first = chunk
    skips: List[Tuple[str, int]] = []
    return list(json_objects(block, first, skips)), skips


def _is_text(v) -> bool:
    return isinstance(v, str)


# the list forms: (form, field, role key, content key, role names)
_TURN_FORMS = (("messages", "messages", "role", "content", {r: r for r in ROLES}),
               ("sharegpt", "conversations", "from", "value", SHAREGPT_ROLES))


def to_conversation(obj: dict) -> Tuple[Optional[List[dict]], str, Optional[str]]:
    """(messages, form, None) for a valid record, or (None, form, reason)."""
    for form, field, role_key, content_key, roles in _TURN_FORMS:
        if obj.get(field) is not None:
            msgs, reason = _turns(obj[field], role_key, content_key, roles)
            break
    else:
        if "instruction" not in obj and "output" not in obj:
            return None, "unknown", MISSING_KEY
        form = "alpaca"
        ins, inp, out, sys_ = obj.get("instruction"), obj.get("input"), obj.get("output"), obj.get("system")
        if not _is_text(ins) or not _is_text(out) or not (inp is None or _is_text(inp)) \
                or not (sys_ is None or _is_text(sys_)):
            return None, form, MALFORMED_RECORD
        user = ins if not inp or not inp.strip() else f"{ins}\n\n{inp}"
        msgs = ([{"role": "system", "content": sys_}] if sys_ and sys_.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": out}]
        reason = None
    if reason is None:
        reason = check_conversation(msgs)
    return (None, form, reason) if reason else (msgs, form, None)


def _turns(raw, role_key: str, content_key: str, roles: dict) -> Tuple[Optional[List[dict]], Optional[str]]:
    """A list form's turns -> ([{role, content}], None), or (None, reason)."""
    if not isinstance(raw, list) or not raw:
        return None, MALFORMED_RECORD
    msgs = []
    for m in raw:
        if not isinstance(m, dict) or not _is_text(m.get(role_key)) or not _is_text(m.get(content_key)):
            return None, MALFORMED_RECORD
        role = roles.get(m[role_key])
        if role is None:
            return None, UNKNOWN_ROLE
        msgs.append({"role": role, "content": m[content_key]})
    return msgs, None


def check_conversation(msgs: List[dict]) -> Optional[str]:
    """None when valid, else the reject reason (roles already known to be system/user/assistant)."""
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body or body[-1]["role"] != "assistant":
        return WRONG_ROLE_ORDER
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            return WRONG_ROLE_ORDER
    for m in msgs:
        if m["role"] == "assistant" and not m["content"].strip():
            return EMPTY_ASSISTANT
        if m["role"] == "user" and not m["content"].strip():
            return EMPTY_USER
    for m in msgs:
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON \\ud800 escapes
            return INVALID_UTF8
    return None
