"""bench/gpu_check.sh's exit status: a failing numerics test fails the GPU session's check (it used to
print pytest's status and exit 0), a passing one does not. Run on CPU with STEPS=numerics and
NUMERICS_TESTS pointed at a test file of the test's own."""
import sys

import pytest

from tests.support.processes import REPO, clean_env, run_command


@pytest.mark.parametrize("outcome", ["fails", "passes"])
def test_gpu_check_exits_1_when_a_numerics_test_fails(tmp_path, outcome):
    tests = tmp_path / "test_numerics_stand_in.py"
    tests.write_text(f"def test_numerics():\n    assert {outcome == 'passes'}\n")
    env = clean_env(PYTHON=sys.executable, OUT=tmp_path / "out", STEPS="numerics", NUMERICS_TESTS=tests)
    proc = run_command(["bash", REPO / "bench" / "gpu_check.sh"], env=env, timeout=240)
    last = proc.stdout.strip().splitlines()[-1]
    if outcome == "fails":
        assert proc.returncode == 1 and "numerics exit 1" in proc.stdout, proc.stdout[-3000:]
        assert last == "FAILED: numerics (exit 1)", proc.stdout[-3000:]
    else:
        assert proc.returncode == 0 and "numerics exit 0" in proc.stdout and last == "all steps passed", proc.stdout
    assert (tmp_path / "out" / "check.log").read_text().strip().splitlines()[-1] == last
