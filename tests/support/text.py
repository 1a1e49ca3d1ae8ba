"""Real text that every machine running the tests has, read offline: CPython's standard library
(the interpreter running the tests) and, where the system ships them, the common license texts."""
from __future__ import annotations

import glob
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

STDLIB = Path(sysconfig.get_paths()["stdlib"])
LICENSES = Path("/usr/share/common-licenses")


def stdlib_files(patterns: Sequence[str]) -> List[str]:
    """The standard-library files matching each glob (relative to STDLIB), sorted per pattern."""
    files = []
    for pattern in patterns:
        files += sorted(glob.glob(os.path.join(STDLIB, pattern)))
    assert files, f"no stdlib sources match {list(patterns)} under {STDLIB}"
    return files


def stdlib_texts(patterns: Sequence[str]) -> List[str]:
    """The contents of stdlib_files(patterns), one string per file."""
    out = []
    for path in stdlib_files(patterns):
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return out


def license_texts(names: Sequence[str]) -> List[str]:
    """The license texts of `names` (e.g. "GPL-2") that this system ships; missing ones are left out."""
    return [(LICENSES / name).read_text() for name in names if (LICENSES / name).is_file()]


def paragraphs(texts: Iterable[str], limit: Optional[int] = None, *, loose: bool = False) -> List[str]:
    """Blank-line separated blocks of `texts`, blocks of whitespace left out: many documents of very
    different lengths, as real corpora have. `loose`: a line holding only spaces separates blocks
    too, and each block loses its surrounding newlines. The first `limit` blocks (all by default)."""
    out = []
    for text in texts:
        if loose:
            out += [block.strip("\n") for block in re.split(r"\n\s*\n", text) if block.strip()]
        else:
            out += [block for block in text.split("\n\n") if block.strip()]
    return out[:limit]


def code_and_prose() -> List[str]:
    """Stdlib sources, license prose and module docstrings that the tests' tokenizers are not
    trained on, and a few edge cases (leading/trailing whitespace, one character, non-Latin
    scripts, emoji, ligatures)."""
    import difflib
    import textwrap

    texts = stdlib_texts(["collections/__init__.py", "difflib.py", "typing.py", "json/encoder.py"])
    texts += license_texts(["Apache-2.0", "GPL-3", "MPL-2.0"])
    texts += [difflib.__doc__, textwrap.__doc__]
    texts += ["  two leading spaces", "trailing\t \n\n", "x", "héllo wörld 1234567 日本語 😀 ß ﬁ", "\n\n\n    indented"]
    return texts
