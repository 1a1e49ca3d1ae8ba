"""Files written whole or not at all, and their digests: the one copy every package uses.

Free of torch / megatron imports (data_prep imports it and must start fast).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # after a crash the new name holds the whole new file, not an empty one
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:  # name the file the user asked for, not the temporary
        unlink_quiet(tmp)
        raise OSError(e.errno, e.strerror, path) from None
    except BaseException:
        unlink_quiet(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
