"""A dead or hung rank under launch/local.sh (torchrun, 2 CPU ranks): the job ends on its own in
well under the process-group timeout, with the status a launcher acts on, and says which rank."""
from __future__ import annotations

import re
import time

import pytest

from megafox.runtime.process import EXIT_HUNG
from tests.training.harness import faulty_trainer, run_stage

pytestmark = pytest.mark.slow

# the step limit's floor stays high: only the heartbeat may fire here (a loaded machine's slow
# steps must not look like a hang)
WATCHDOG = ["watchdog.heartbeat_seconds=1", "watchdog.peer_timeout_seconds=10"]


def test_stopped_rank_is_named_and_the_job_exits_6(tmp_path, tiny_data):
    """rank 1 SIGSTOPped at step 5 (a hung GPU, to its peers): rank 0's watchdog names it within
    peer_timeout_seconds, dumps its stacks and exits 6; torchrun then reaps the stopped rank."""
    t0 = time.monotonic()
    rc, out = run_stage("stage1", tmp_path / "ckpt", tiny_data, overrides=WATCHDOG,
                        env=faulty_trainer("--stop-at-step", "5@1"), timeout=400)
    elapsed = time.monotonic() - t0
    assert rc == EXIT_HUNG, out[-4000:]
    assert "[test fault] rank 1: stop at step 5" in out
    assert re.search(r"megafox watchdog: no heartbeat \(limit 10s\): rank 1 \(host \S+, phase \w+, "
                     r"last reported step \d\) silent for \d+s", out), out[-4000:]
    assert re.search(r"megafox watchdog: rank 0 \(host \S+, pid \d+, phase step, last step 5\) stops the job "
                     r"with exit 6; its Python stacks:", out), out[-4000:]
    assert "in train_step" in out  # rank 0's main thread, waiting in the step's collective
    # start-up (~20-60 s here) + 10 s to notice + torchrun's 30 s SIGTERM grace for the stopped rank
    assert elapsed < 240, elapsed


def test_hung_main_thread_is_caught_by_the_step_limit(tmp_path, tiny_data):
    """rank 1's main thread blocks for good at step 5 while its process lives on (a deadlocked
    data worker): its heartbeats continue, so the step limit (derived from the measured steps,
    floor step_min_seconds) is what fires, on the hung rank itself and on its waiting peer."""
    rc, out = run_stage("stage1", tmp_path / "ckpt", tiny_data,
                        overrides=WATCHDOG + ["watchdog.step_min_seconds=8"],
                        env=faulty_trainer("--hang-at-step", "5@1"), timeout=400)
    assert rc == EXIT_HUNG, out[-4000:]
    assert re.search(r"rank \d \(host \S+\) made no progress in phase step for \d+s \(limit 8s; last step 5\): hung",
                     out), out[-4000:]
    assert "in pre_step" in out  # the hung rank's own stack shows where it hangs (the fault's wait)
