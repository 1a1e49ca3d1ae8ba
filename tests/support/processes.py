"""Running the project's commands as a user does (`python -m MODULE`, scripts, torchrun, shell
scripts) from the repository root in an environment of their own, output captured, and checking
how a command that must fail ends."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from megafox.runtime.dist import free_port  # noqa: F401  (re-exported for the tests: one definition)

REPO = Path(__file__).resolve().parents[2]
# set by torchrun in a multi-rank test body; a command started from there is not one of its ranks
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def ctrl_c_reaches_it() -> None:
    """preexec_fn for a command a test will Ctrl-C: SIGINT back to its default, as a terminal starts
    a program. A test runner started in the background of a shell script ignores SIGINT, every
    child inherits that, and a shell script can never trap a signal it was started ignoring."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def clean_env(**extra) -> Dict[str, str]:
    """This process's environment for a command: the repository importable, one OpenMP thread,
    no tokenizers parallelism, no torchrun rank variables; `extra` on top (values made strings)."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_command(command: Sequence, *, env: Dict[str, str] = None, cwd=REPO, timeout: float = 600,
                check: bool = False, **popen) -> subprocess.CompletedProcess:
    """Run `command` (items made strings) with text output captured; env defaults to clean_env().
    `check`: a non-zero exit fails the test with the command's output."""
    command = [str(c) for c in command]
    proc = subprocess.run(command, env=clean_env() if env is None else env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited with {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def python_command(*args) -> List[str]:
    """`python ARGS` with this interpreter (for a process the test starts and controls itself)."""
    return [sys.executable, *map(str, args)]


def run_python(*args, **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` (a script, `-m MODULE ...`, `-c CODE`); keyword arguments as run_command's."""
    return run_command(python_command(*args), **kwargs)


def run_module(module: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS`, as a user types it; keyword arguments as run_command's."""
    return run_python("-m", module, *args, **kwargs)


def torchrun(nproc: int, *args, **kwargs) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node NPROC ARGS` on this host with a free rendezvous port."""
    return run_module("torch.distributed.run", "--nproc-per-node", nproc, "--master-addr", "127.0.0.1",
                      "--master-port", free_port(), *args, **kwargs)


_ERROR_LINE = re.compile(r"^(?:[\w.-]+(?: [\w.-]+)*: )?error: ")  # "error: ...", "megafox eval: error: ..."


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed as bad input must: exit status 2, no traceback, exactly one error line
    on stderr, holding every needle. Returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if _ERROR_LINE.match(line)]
    assert len(lines) == 1, proc.stderr[-4000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
