"""The errors of checkpointing, and the one-line reason a collective load or save failed.

Every checkpoint problem a user can cause or meet (a missing or corrupt file, a refused object, a
full disk) is a CheckpointError: the CLIs print it as one line naming the file, never a traceback.
torch.distributed.checkpoint wraps each rank's failure in its own exception; the helpers here find
the one that says what happened.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or not a megafox checkpoint. Names the path."""


class NoUsableCheckpoint(CheckpointError):
    """Every checkpoint a resume could start from is incomplete or corrupt (exit status 4)."""


@contextmanager
def checkpoint_errors_unwrapped():
    """Raise a CheckpointError some rank hit inside a collective load as itself (one line naming
    the file), not as the CheckpointException torch.distributed.checkpoint wraps it in."""
    try:
        yield
    except BaseException as exc:
        found = _checkpoint_error_in(exc)
        if found is None or found is exc:
            raise
        raise found from None


def _checkpoint_error_in(exc: BaseException) -> Optional[CheckpointError]:
    """A CheckpointError (a refused object, a missing file) some rank raised inside a collective
    load, which torch.distributed.checkpoint reports on every rank wrapped in its own exception."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CheckpointError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            for _, failure in sorted(failures.items()):
                inner = getattr(failure, "exc", failure)
                todo.append(inner[0] if isinstance(inner, tuple) and inner else inner)
        todo += [current.__cause__, current.__context__]
    return None


def root_cause(exc: BaseException) -> str:
    """The innermost error of a chain (torch wraps each rank's failure in CheckpointException)."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        inner = getattr(failure, "exc", failure)  # a _WrappedException, or the exception itself
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            inner = inner[0]  # megatron's async writer reports (exception, traceback frames)
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return f"{type(seen).__name__}: {seen}"
