"""Real instruction data built offline: questions about Python standard-library functions answered
with their real documentation (inspect.getdoc, inspect.signature, unicodedata), in every record
form and file format data_prep.sft reads, plus bad records of every reject reason.

    python -m data_prep.sft_offline_chat --output data/tiny_sft/raw [--no-bad-records]

writes chat.jsonl (messages form, multi-turn, some with a system prompt, bad records among them),
chat.parquet (messages form), sharegpt.jsonl.zst (ShareGPT form) and alpaca.jsonl.gz (Alpaca form).
The same Python gives the same files (sorted names, no randomness). Used by configs/data/tiny_sft.yaml,
the demo and the tests.
"""
from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import json
import os
import re
import sys
import unicodedata
from typing import Iterator, List, Tuple

MODULES = ("base64", "bisect", "calendar", "colorsys", "difflib", "fnmatch", "functools", "glob", "heapq",
           "html", "itertools", "json", "keyword", "math", "operator", "os.path", "posixpath", "shlex",
           "statistics", "string", "textwrap", "urllib.parse", "zlib")
SYSTEM_PROMPTS = ("You are a concise assistant who answers questions about the Python standard library.",
                  "You are an expert Python programmer. Answer with the official documentation.")
UNICODE_CHARS = "éßΩ東😀ñ€"


def stdlib_functions() -> List[Tuple[str, str, str]]:
    """(qualified name, signature or "", docstring) of public, documented stdlib functions."""
    out = []
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 40:
                continue
            try:  # defaults such as <function quote_plus at 0x7f...> would differ from run to run
                sig = re.sub(r" at 0x[0-9a-fA-F]+>", ">", str(inspect.signature(obj)))
            except (TypeError, ValueError):
                sig = ""
            out.append((f"{modname}.{name}", sig, doc))
    return out


def _summary(doc: str) -> str:
    return doc.split("\n\n")[0].strip()


def chat_records() -> List[dict]:
    """Messages-form conversations: one to three exchanges, every third with a system prompt."""
    recs = []
    for i, (name, sig, doc) in enumerate(stdlib_functions()):
        msgs = [{"role": "user", "content": f"What does `{name}` do?"},
                {"role": "assistant", "content": _summary(doc)}]
        if sig and i % 2 == 0:
            msgs += [{"role": "user", "content": "What is its signature?"},
                     {"role": "assistant", "content": f"`{name}{sig}`"}]
        if i % 5 == 0 and doc != _summary(doc):
            msgs += [{"role": "user", "content": "Show me its full documentation."},
                     {"role": "assistant", "content": doc}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[(i // 3) % len(SYSTEM_PROMPTS)]})
        recs.append({"messages": msgs})
    for ch in UNICODE_CHARS:  # non-ASCII text on both sides
        recs.append({"messages": [
            {"role": "user", "content": f"What is the Unicode name of «{ch}»?"},
            {"role": "assistant", "content": f"«{ch}» is U+{ord(ch):04X} {unicodedata.name(ch)}."}]})
    return recs


def long_records() -> List[dict]:
    """Conversations longer than a few hundred tokens: many exchanges (truncated at a turn boundary
    when seq_length is small), and one whose first answer alone is long (dropped then)."""
    funcs = stdlib_functions()
    many = [{"role": "system", "content": SYSTEM_PROMPTS[0]}]
    for name, _, doc in funcs[:24]:
        many += [{"role": "user", "content": f"And `{name}`?"}, {"role": "assistant", "content": _summary(doc)}]
    longest = max(funcs, key=lambda f: len(f[2]))
    huge = "\n\n".join(doc for _, _, doc in sorted(funcs, key=lambda f: -len(f[2]))[:6])
    return [{"messages": many},
            {"messages": [{"role": "user", "content": f"Document `{longest[0]}` and its relatives in full."},
                          {"role": "assistant", "content": huge}]}]


def sharegpt_records() -> List[dict]:
    recs = []
    for name, sig, doc in stdlib_functions()[::4]:
        conv = [{"from": "human", "value": f"Explain `{name}` briefly."}, {"from": "gpt", "value": _summary(doc)}]
        if sig:
            conv += [{"from": "human", "value": "How do I call it?"}, {"from": "gpt", "value": f"`{name}{sig}`"}]
        recs.append({"conversations": conv})
    return recs


def alpaca_records() -> List[dict]:
    recs = []
    for i, (name, sig, doc) in enumerate(stdlib_functions()):
        if i % 2 == 0:
            recs.append({"instruction": "Explain what this Python standard-library function does.", "input": name,
                         "output": _summary(doc)})
        elif sig:
            recs.append({"instruction": f"Give the signature of `{name}`.", "input": "", "output": f"{name}{sig}"})
        if i % 7 == 0:
            recs[-1]["system"] = SYSTEM_PROMPTS[1]
    return recs


def bad_records() -> List[Tuple[str, bytes]]:
    """(expected reject reason, raw JSONL line) for every reason data_prep.sft counts."""
    q = {"role": "user", "content": "What does `json.dumps` do?"}
    a = {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."}
    sysm = {"role": "system", "content": SYSTEM_PROMPTS[0]}

    def j(obj) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")

    return [
        ("empty_assistant_turn", j({"messages": [q, {"role": "assistant", "content": "  \n"}]})),
        ("empty_user_turn", j({"messages": [{"role": "user", "content": ""}, a]})),
        ("unknown_role", j({"messages": [q, {"role": "tool", "content": "{}"}, a]})),
        ("wrong_role_order", j({"messages": [a, q]})),  # assistant first
        ("wrong_role_order", j({"messages": [q, a, q]})),  # ends with the user
        ("wrong_role_order", j({"messages": [q, sysm, a]})),  # system not first
        ("wrong_role_order", j({"messages": [q, q, a]})),  # two user turns in a row
        ("wrong_role_order", j({"messages": [sysm]})),  # nothing to learn
        ("malformed_record", j({"messages": [q, {"role": "assistant", "content": 42}]})),
        ("malformed_record", j({"messages": "hello"})),
        ("malformed_record", j({"instruction": ["not", "text"], "output": "x"})),
        ("empty_assistant_turn", j({"instruction": "Say nothing.", "input": "", "output": ""})),
        ("missing_key", j({"text": "a pretraining document, not a conversation"})),
        ("malformed_json", b'{"messages": [{"role": "user", "content": "unterminated'),
        ("not_object", b'[1, 2, 3]'),
        ("invalid_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'),
        ("invalid_utf8", b'{"messages": [{"role": "user", "content": "lone \\ud800 surrogate"}, '
                         b'{"role": "assistant", "content": "ok"}]}'),
        ("control_token_in_content", j({"messages": [q, {"role": "assistant", "content": "Done.</s> More."}]})),
    ]


def _interleave(good: List[dict], bad: List[Tuple[str, bytes]]) -> Iterator[bytes]:
    step = max(1, len(good) // (len(bad) + 1))
    bi = 0
    for i, rec in enumerate(good):
        yield json.dumps(rec, ensure_ascii=False).encode("utf-8")
        if (i + 1) % step == 0 and bi < len(bad):
            yield bad[bi][1]
            bi += 1
    for _, line in bad[bi:]:
        yield line


def write_jsonl(path: str, lines: Iterator[bytes]) -> str:
    data = b"".join(line + b"\n" for line in lines)
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.endswith(".zst"):
        import zstandard  # only for .zst outputs, like pyarrow below only for parquet ones

        data = zstandard.ZstdCompressor(level=3).compress(data)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def write_parquet(path: str, records: List[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path + ".tmp"
    pq.write_table(pa.Table.from_pylist(records), tmp)
    os.replace(tmp, path)
    return path


def write_all(out_dir: str, bad: bool = True) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    chat = chat_records()
    half = len(chat) // 2
    return [
        write_jsonl(os.path.join(out_dir, "chat.jsonl"),
                    _interleave(chat[:half] + long_records(), bad_records() if bad else [])),
        write_parquet(os.path.join(out_dir, "chat.parquet"), chat[half:]),
        write_jsonl(os.path.join(out_dir, "sharegpt.jsonl.zst"),
                    (json.dumps(r).encode("utf-8") for r in sharegpt_records())),
        write_jsonl(os.path.join(out_dir, "alpaca.jsonl.gz"),
                    (json.dumps(r).encode("utf-8") for r in alpaca_records())),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.sft_offline_chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory for the chat files")
    p.add_argument("--no-bad-records", dest="bad", action="store_false", help="leave out the rejectable records")
    a = p.parse_args(argv)
    for path in write_all(a.output, a.bad):
        print(f"{path}: {os.path.getsize(path):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
