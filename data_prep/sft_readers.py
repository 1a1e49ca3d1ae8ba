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

import json
import os
from typing import Iterator, List, Optional, Tuple

from .readers import CORRUPT, INVALID_UTF8, MALFORMED_JSON, MISSING_KEY, NOT_OBJECT, FileReader

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

    def __init__(self, path: str, fmt: str, chunk_bytes: int, start: int = 0, end: Optional[int] = None):
        super().__init__(path, fmt, "messages", chunk_bytes, start, end)

    def _parquet_chunks(self) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        from .readers import _FileSha

        self.sha = _FileSha(self.path)
        size = os.path.getsize(self.path)
        try:
            pf = pq.ParquetFile(self.path)
        except Exception:
            self._tick(size)
            yield ("skip", CORRUPT, 0, 1)
            return
        nrows = pf.metadata.num_rows
        columns = [c for c in COLUMNS if c in pf.schema_arrow.names]
        if not columns:
            self._tick(size)
            if nrows:
                yield ("skip", MISSING_KEY, 1, nrows)
            return
        row, done = 1, 0
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=columns):
                rows = batch.to_pylist()
                yield ("rows", rows, row)
                row += len(rows)
                step = int(size * row / max(nrows, 1)) - done
                done += step
                self._tick(step)
        except Exception:
            yield ("skip", CORRUPT, row, max(nrows - row + 1, 1))
        self._tick(size - done)


def parse_records(chunk: tuple) -> Tuple[List[Tuple[int, dict]], List[Tuple[str, int]]]:
    """A reader chunk -> ([(line, object)], [(reason, line)])."""
    kind = chunk[0]
    if kind == "rows":
        _, rows, first = chunk
        return [(first + i, r) for i, r in enumerate(rows)], []
    if kind != "lines":
        raise ValueError(f"unknown chunk kind {kind!r}")
    _, block, first = chunk
    records: List[Tuple[int, dict]] = []
    skips: List[Tuple[str, int]] = []
    try:
        lines = block.decode("utf-8").split("\n")
        decoded = True
    except UnicodeDecodeError:
        lines = block.split(b"\n")
        decoded = False
    if lines and not lines[-1]:
        lines.pop()
    for i, ln in enumerate(lines):
        if not decoded:
            try:
                ln = ln.decode("utf-8")
            except UnicodeDecodeError:
                skips.append((INVALID_UTF8, first + i))
                continue
        if not ln or ln.isspace():
            continue  # a blank line is not a record
        try:
            obj = json.loads(ln)
        except ValueError:
            skips.append((MALFORMED_JSON, first + i))
            continue
        if not isinstance(obj, dict):
            skips.append((NOT_OBJECT, first + i))
            continue
        records.append((first + i, obj))
    return records, skips


def _is_text(v) -> bool:
    return isinstance(v, str)


def to_conversation(obj: dict) -> Tuple[Optional[List[dict]], str, Optional[str]]:
    """(messages, form, None) for a valid record, or (None, form, reason)."""
    if obj.get("messages") is not None:
        form = "messages"
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            return None, form, MALFORMED_RECORD
        msgs = []
        for m in raw:
            if not isinstance(m, dict) or not _is_text(m.get("role")) or not _is_text(m.get("content")):
                return None, form, MALFORMED_RECORD
            if m["role"] not in ROLES:
                return None, form, UNKNOWN_ROLE
            msgs.append({"role": m["role"], "content": m["content"]})
    elif obj.get("conversations") is not None:
        form = "sharegpt"
        raw = obj["conversations"]
        if not isinstance(raw, list) or not raw:
            return None, form, MALFORMED_RECORD
        msgs = []
        for m in raw:
            if not isinstance(m, dict) or not _is_text(m.get("from")) or not _is_text(m.get("value")):
                return None, form, MALFORMED_RECORD
            role = SHAREGPT_ROLES.get(m["from"])
            if role is None:
                return None, form, UNKNOWN_ROLE
            msgs.append({"role": role, "content": m["value"]})
    elif "instruction" in obj or "output" in obj:
        form = "alpaca"
        ins, inp, out, sys_ = obj.get("instruction"), obj.get("input"), obj.get("output"), obj.get("system")
        if not _is_text(ins) or not _is_text(out) or not (inp is None or _is_text(inp)) \
                or not (sys_ is None or _is_text(sys_)):
            return None, form, MALFORMED_RECORD
        user = ins if not inp or not inp.strip() else f"{ins}\n\n{inp}"
        msgs = ([{"role": "system", "content": sys_}] if sys_ and sys_.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": out}]
    else:
        return None, "unknown", MISSING_KEY
    reason = check_conversation(msgs)
    return (None, form, reason) if reason else (msgs, form, None)


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
