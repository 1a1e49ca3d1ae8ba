"""megafox.runtime: the one CLI error contract, and rank helpers that need no torch."""
from __future__ import annotations

import errno

import pytest

from megafox.runtime.cli import run_main
from tests.support.processes import clean_env, run_python


class BadInput(Exception):
    pass


def _raise(exc):
    def body(argv):
        raise exc
    return body


def test_a_known_error_is_one_line_and_its_status(capsys):
    assert run_main(_raise(BadInput("plan.yaml: stages[1].name: missing")), errors=BadInput) == 2
    assert capsys.readouterr().err == "error: plan.yaml: stages[1].name: missing\n"
    assert run_main(_raise(BadInput("x")), errors=(KeyError, BadInput), prefix="megafox: error: ", status=5) == 5
    assert capsys.readouterr().err == "megafox: error: x\n"


def test_an_os_error_names_the_file_without_errno_noise(capsys):
    exc = OSError(errno.ENOSPC, "No space left on device", "/data/out.bin")
    assert run_main(_raise(exc)) == 2
    assert capsys.readouterr().err == "error: /data/out.bin: No space left on device\n"
    with pytest.raises(OSError):  # a command that does not promise this lets it through
        run_main(_raise(exc), os_errors=False)


def test_ctrl_c_is_130_and_one_line_or_propagates(capsys):
    assert run_main(_raise(KeyboardInterrupt()), interrupted="interrupted; rerun to continue") == 130
    assert capsys.readouterr().err == "interrupted; rerun to continue\n"
    with pytest.raises(KeyboardInterrupt):
        run_main(_raise(KeyboardInterrupt()), interrupted=None)


def test_other_errors_propagate_and_quiet_ranks_print_nothing(capsys):
    with pytest.raises(ZeroDivisionError):
        run_main(lambda argv: 1 / 0, errors=BadInput)
    assert run_main(_raise(BadInput("x")), errors=BadInput, speak=lambda: False) == 2
    assert run_main(_raise(BadInput("")), errors=BadInput) == 2  # a rank that leaves the words to rank 0
    assert capsys.readouterr().err == ""
    assert run_main(lambda argv: None) == 0 and run_main(lambda argv: 3) == 3


def test_rank_helpers_before_torch_distributed_starts():
    """Before torch.distributed starts, rank() is the launcher's (torchrun's RANK, srun's
    SLURM_PROCID) and is_rank0() holds on every process; neither loads torch."""
    code = ("import sys; from megafox.runtime import dist; "
            "print(dist.rank(), dist.is_rank0(), dist.world_size(), 'torch' in sys.modules)")
    assert run_python("-c", code, env=clean_env(RANK=3), check=True).stdout.split() == ["3", "True", "1", "False"]
    assert run_python("-c", code, env=clean_env(SLURM_PROCID=2), check=True).stdout.split() == ["2", "True", "1", "False"]
