"""Writing a tool's output so that a failure destroys nothing.

Every tool builds its whole result in a temporary sibling of the output (`<output>.tmp-<pid>`,
same filesystem, so the final step is a rename) and puts it in place only once it is complete:

* an export directory (`megafox-to-hf`) is swapped with the old one in one atomic
  `renameat2(RENAME_EXCHANGE)` (two renames where the kernel or filesystem lacks it), so at every
  moment `output` is either the old complete export or the new one; files of the old directory
  that the new export does not write (a README, a tokenizer from an earlier export) are kept;
* a checkpoint (`megafox-from-hf`, `megafox-ckpt reshard`) moves its `iter_N` directory into the
  output root and only then points `latest` at it (atomically, as the trainer does).

A failure at any point before that removes the temporary directory and leaves the output as it was.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from checkpoints_tools.common import ToolError
from megafox.checkpoint.layout import describe_checkpoint, holds_checkpoint, iteration_dir, write_latest


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_directory(new: Path, target: Path) -> None:
    """Put directory `new` at `target`; an existing `target` is removed only after the switch."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # the old directory, now at the temporary name
        return
    aside = target.with_name(f"{target.name}.old-{os.getpid()}")
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same filesystem: no second copy of the bytes
    except OSError:
        shutil.copy2(src, dst)


class _Staged:
    def __init__(self, output: Path):
        self.output = Path(output).resolve()
        self.path = self.output.with_name(f"{self.output.name}.tmp-{os.getpid()}")
        self.published = False

    def __enter__(self) -> "_Staged":
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # left by an earlier process with our pid
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def __exit__(self, *exc) -> bool:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


class StagedExport(_Staged):
    """`with StagedExport(out) as staged:` write into `staged.path`, then `staged.publish()`.
    Without publish (an error, a failed --verify) the output stays as it was."""

    def publish(self, keep_old: Callable[[str], bool] = lambda name: True) -> None:
        """Swap the new export in. Entries of the old directory that the new one lacks are
        carried over when `keep_old(name)` (e.g. everything but stale weight files)."""
        if self.output.is_dir():
            for old in self.output.iterdir():
                new = self.path / old.name
                if new.exists() or new.is_symlink() or not keep_old(old.name):
                    continue
                if old.is_dir() and not old.is_symlink():
                    shutil.copytree(old, new, symlinks=True, copy_function=_link_or_copy)
                elif old.is_symlink():
                    os.symlink(os.readlink(old), new)
                else:
                    _link_or_copy(str(old), str(new))
        elif self.output.exists():
            raise ToolError(f"{self.output}: exists and is not a directory")
        replace_directory(self.path, self.output)
        self.published = True


class StagedCheckpoint(_Staged):
    """A checkpoint root written at `staged.path`; `publish(iteration)` moves that iteration into
    the output root, then points `latest` at it. Without publish nothing of the output changes."""

    def publish(self, iteration: int) -> Path:
        if not self.output.exists():
            os.rename(self.path, self.output)  # `latest` included
        else:
            if not self.output.is_dir():
                raise ToolError(f"{self.output}: exists and is not a directory")
            replace_directory(iteration_dir(self.path, iteration), iteration_dir(self.output, iteration))
            write_latest(self.output, iteration)
            shutil.rmtree(self.path)
        self.published = True
        return iteration_dir(self.output, iteration)


def refuse_checkpoint_output(output: Path, allowed: bool, flag: Optional[str], action: str) -> None:
    """One line when `output` already holds a checkpoint and the user did not pass `flag`."""
    if allowed or not holds_checkpoint(output):
        return
    hint = f" (pass {flag} to {action} anyway)" if flag else ""
    raise ToolError(f"--output {output}: already holds {describe_checkpoint(output)}; refusing to write "
                    f"into it{hint}")
