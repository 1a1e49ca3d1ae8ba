"""The per-rank watchdog (megafox/watchdog.py) and the rendezvous time limit (megafox/parallel/process_groups.py),
in-process against a real c10d TCPStore; the multi-rank runs are in test_resilience_local.py
(torchrun) and tests/slurm/test_slurm_multinode.py."""
from __future__ import annotations

import io
import json
import statistics
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from megafox.config import ConfigError, WatchdogConfig, load_train_config
from megafox.parallel.process_groups import DistEnv, RendezvousFailed, rendezvous_store
from megafox.runtime.process import EXIT_RENDEZVOUS
from megafox.training.timers import PhaseTimers, phase
from megafox import watchdog
from megafox.watchdog import Watchdog
from tests.support.processes import REPO, clean_env, free_port, run_module

TINY = REPO / "configs" / "train" / "tiny.yaml"


def dog(rank=0, world=1, fired=None, **limits):
    config = WatchdogConfig(**limits).validate()
    return Watchdog(config, rank, world, host=f"h{rank}", on_fire=(fired.append if fired is not None else None),
                    out=io.StringIO())


def test_step_limit_is_the_larger_of_the_floor_and_ten_median_steps():
    w = dog(step_min_seconds=300, step_factor=10)
    assert w.limit("step") == 300  # nothing measured yet
    w.step_times = [40.0, 50.0, 45.0, 500.0]  # one outlier: the median ignores it
    assert w.limit("step") == 10 * statistics.median([40.0, 50.0, 45.0, 500.0])
    assert dog(step_seconds=7).limit("step") == 7
    limits = dog(startup_seconds=11, save_seconds=12, eval_seconds=13)
    assert (limits.limit("startup"), limits.limit("save"), limits.limit("eval")) == (11, 12, 13)


def test_progress_names_rank_host_phase_and_step():
    w = dog(rank=3, save_seconds=5)
    w.step_begins(41)
    t0 = time.monotonic()
    assert w.check_progress(t0 + 100) is None  # the step floor is 300 s
    with _entered(w, "save"):
        assert w.check_progress(t0 + 4) is None
        reason = w.check_progress(t0 + 6.5)
    assert reason is not None
    for part in ("rank 3", "host h3", "phase save", "last step 41", "limit 5s"):
        assert part in reason, reason


class _entered:
    def __init__(self, w, name):
        self.w, self.name = w, name

    def __enter__(self):
        self.previous = self.w.enter(self.name)

    def __exit__(self, *exc):
        self.w.enter(self.previous)


def test_step_times_exclude_saves_and_evaluations():
    w = dog().start()
    try:
        w.step_begins(1)
        time.sleep(0.05)
        w.step_begins(2)
        assert len(w.step_times) == 1 and w.step_times[0] >= 0.05

        with watchdog.phase("eval"):
            assert w._phase == "eval"
            time.sleep(0.2)
        assert w._phase == "step"
        w.step_begins(3)  # the evaluation between steps 2 and 3 is not a step time
        assert len(w.step_times) == 1
    finally:
        w.stop()


def test_one_phase_times_the_block_and_holds_it_to_the_watchdog_limit():
    """training.timers.phase(trainer, name, watch=...) drives both: the timers' exclusive seconds
    under `name` and the watchdog's phase `watch` (the step clock paused, as for watchdog.phase)."""
    class Trainer:
        timers = PhaseTimers()

    w = dog().start()
    try:
        w.step_begins(1)
        with phase(Trainer, "validation", watch="eval"):
            assert w._phase == "eval"
            time.sleep(0.05)
        assert w._phase == "step"
        w.step_begins(2)
        assert w.step_times == []  # the validation between steps 1 and 2 is not a step time
        with phase(object(), "eval", watch="save"):  # a stand-in trainer without timers: the watchdog still sees it
            assert w._phase == "save"
    finally:
        w.stop()
    assert Trainer.timers.take()["validation"] >= 0.05


def test_heartbeats_name_a_silent_peer_and_every_rank_gets_the_abort(tmp_path):
    """Three ranks on one real TCPStore; rank 2 stops beating (as a SIGSTOPped or dead process):
    rank 0 names it, and rank 1 stops on the abort key rank 0 wrote."""
    port = free_port()
    server = TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    fired = {r: [] for r in range(3)}
    dogs = [dog(r, 3, fired[r], heartbeat_seconds=0.2, peer_timeout_seconds=1.5) for r in range(3)]
    for w in dogs:
        w.connect("127.0.0.1", port, 1.0)
        w.step = 17
    t = time.monotonic()
    for k in range(4):  # everyone beats for a while
        for w in dogs:
            assert w.exchange(t + k * 0.2) is None
    assert json.loads(server.get("megafox/watchdog/hb/2"))["host"] == "h2"
    reason = None
    for k in range(4, 30):  # rank 2 is silent from now on
        now = t + k * 0.2
        assert dogs[1].exchange(now) is None
        reason = dogs[0].exchange(now)
        if reason:
            break
    assert reason and "rank 2 (host h2, phase startup, last reported step 17)" in reason, reason
    assert (k - 4) * 0.2 >= 1.5  # not before the limit
    with open(tmp_path / "log", "w+") as log:  # faulthandler writes to a file descriptor
        dogs[0].out = log
        dogs[0].fire(reason)
        log.seek(0)
        text = log.read()
    assert fired[0] == [reason]
    assert "rank 0 (host h0" in text and "Python stacks" in text and "most recent call first" in text, text
    assert "test_heartbeats_name_a_silent_peer" in text  # this thread's own stack is in the dump
    assert dogs[1].exchange(t + 10) == reason  # the abort reaches the other live rank at its next beat
    # a rank that ended cleanly is not a silent peer
    quiet = [dog(r, 2, None, heartbeat_seconds=0.2, peer_timeout_seconds=1.0) for r in range(2)]
    port2 = free_port()
    server2 = TCPStore("127.0.0.1", port2, 1, is_master=True, wait_for_workers=False)
    for w in quiet:
        w.connect("127.0.0.1", port2, 1.0)
        w.exchange(t)
    quiet[1].stop()
    assert quiet[0].exchange(t + 0.2) is None and quiet[0].exchange(t + 5) is None
    del server, server2


def test_lost_store_is_reported_by_a_non_zero_rank():
    port = free_port()
    server = TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    w = dog(1, 2, [], heartbeat_seconds=0.2, peer_timeout_seconds=1.0)
    w.connect("127.0.0.1", port, 0.5)
    t = time.monotonic()
    assert w.exchange(t) is None
    del server  # rank 0 and its store are gone
    time.sleep(0.2)
    assert w.exchange(t + 0.5) is None  # within the limit: maybe a blip
    reason = w.exchange(t + 2)
    assert reason and "lost contact with the rendezvous store on rank 0" in reason and "rank 1 (host h1)" in reason


def test_rendezvous_that_never_completes_is_one_line():
    env = DistEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=str(free_port()))
    t0 = time.monotonic()
    with pytest.raises(RendezvousFailed) as info:
        rendezvous_store(env, 2.0, timedelta(minutes=1))
    assert time.monotonic() - t0 < 30
    message = str(info.value)
    assert "\n" not in message and "rank 1 of 2" in message and "rendezvous_timeout_seconds" in message
    assert f"127.0.0.1:{env.master_port}" in message


@pytest.mark.slow
def test_trainer_exits_7_when_rank_0_never_comes(tmp_path):
    """megafox-train as rank 1 of 2 with nobody at MASTER_ADDR: exit 7, one line, no traceback."""
    env = clean_env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
                    MEGAFOX_OVERRIDES=f"checkpoint.dir={tmp_path / 'ckpt'} parallel.rendezvous_timeout_seconds=3")
    proc = run_module("megafox.train", "--config", TINY, "--stage", "stage1", env=env, timeout=180)
    assert proc.returncode == EXIT_RENDEZVOUS, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "megafox-train: error:" in line]
    assert len(errors) == 1 and "did not complete within 3s" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, field", [
    ("watchdog.step_min_seconds=0", "watchdog.step_min_seconds"),
    ("watchdog.peer_timeout_seconds=1", "watchdog.peer_timeout_seconds"),
    ("watchdog.step_seconds=-1", "watchdog.step_seconds"),
    ("parallel.distributed_timeout_minutes=0", "parallel.distributed_timeout_minutes"),
])
def test_bad_limits_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_train_config(TINY, [override])


def test_defaults_keep_existing_configs_working():
    config = load_train_config(TINY)
    assert config.watchdog.enabled and config.watchdog.step_seconds is None
    assert config.parallel.distributed_timeout_minutes == 30


def test_a_rank_that_never_reported_is_named_too():
    """A rank that died before its first heartbeat has no key in the store: rank 0 names it once
    the peer limit has passed since it connected."""
    port = free_port()
    server = TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    w = dog(0, 2, [], heartbeat_seconds=0.2, peer_timeout_seconds=1.0)
    w.connect("127.0.0.1", port, 1.0)
    t = time.monotonic()
    assert w.exchange(t) is None
    reason = w.exchange(t + 2)
    assert reason and "rank 1 (host ?, phase never reported" in reason, reason
    del server
