"""The one CLI error contract: a known error becomes one line on stderr and its documented exit
status, never a traceback from deep inside a library; Ctrl-C becomes one line and 130.

Each command keeps its own words (the prefix, the interrupt message) and statuses; the mapping is
the same everywhere. Free of torch / megatron imports (data_prep's CLIs run through it and must
start fast).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Tuple, Type, Union

from megafox.runtime.process import EXIT_CONFIG, EXIT_INTERRUPTED

Errors = Union[Type[BaseException], Tuple[Type[BaseException], ...]]


def os_error_line(exc: OSError) -> str:
    """`FILE: reason` for an OSError that escaped (disk full, permissions), without errno noise."""
    where = f"{exc.filename}: " if exc.filename else ""
    return where + (exc.strerror or str(exc))


def run_main(fn: Callable[[Any], Optional[int]], argv: Any = None, *, errors: Errors = (),
             prefix: str = "error: ", status: int = EXIT_CONFIG, os_errors: bool = True,
             interrupted: Optional[str] = "interrupted", speak: Callable[[], bool] = lambda: True) -> int:
    """Run a CLI body `fn(argv)` (None counts as 0). An instance of `errors` -> `prefix` + its message
    on stderr and `status`; with `os_errors`, an OSError the same way, naming its file; Ctrl-C ->
    `interrupted` and 130 (the shell's convention for SIGINT; None: Ctrl-C propagates). Anything
    else propagates. `speak()` says whether this process prints (rank 0 only, in a multi-rank
    command); an empty message is not printed (a rank that leaves the reporting to rank 0)."""
    try:
        rc = fn(argv)
        return 0 if rc is None else rc
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        _say(interrupted, speak)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if errors and isinstance(exc, errors):
            message = str(exc)
        elif os_errors and isinstance(exc, OSError):
            message = os_error_line(exc)
        else:
            raise
        if message:
            _say(prefix + message, speak)
        return status


def _say(line: str, speak: Callable[[], bool]) -> None:
    if speak():
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
