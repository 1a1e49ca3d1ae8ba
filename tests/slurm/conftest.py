"""A real single-node SLURM cluster for the launcher tests (tests/slurm/cluster.sh), brought up
once per session and torn down by PID. Job helpers live in slurm_jobs.py."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.slurm.slurm_jobs import CLUSTER


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the local SLURM cluster (tests/slurm/cluster.sh)")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running cluster. Where the packages cannot be installed (no root or no
    apt-get) the SLURM tests fail rather than pass unseen: `make test-fast` leaves them out."""
    state = os.environ.get("MEGAFOX_SLURM_DIR", "/var/tmp/megafox-slurm")
    env = dict(os.environ, MEGAFOX_SLURM_DIR=state)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.fail(f"SLURM packages missing and not installable: {proc.stderr.strip()} "
                    "(run as root on Debian/Ubuntu, or `make test-fast` to leave the SLURM tests out)")
    assert proc.returncode == 0, f"cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    conf = re.search(r"^SLURM_CONF=(.+)$", proc.stdout, re.M).group(1)
    print(f"SLURM cluster up in {time.monotonic() - t0:.1f}s ({conf})")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, timeout=300)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture
def workdir(tmp_path):
    """A submit directory (the jobs' working dir) with the logs/ the stage scripts write to."""
    (tmp_path / "logs").mkdir()
    return tmp_path
