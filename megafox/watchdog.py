"""The per-rank progress watchdog: a hung rank is detected in seconds and named, a dead one too.

Every rank runs one daemon thread. It checks two things every `watchdog.heartbeat_seconds`:

  - progress: the rank's current phase (startup, step, save, eval; set by the training loop
    with `phase(...)`) must not last longer than its limit (`watchdog.*_seconds`). The step limit
    defaults to max(step_min_seconds, step_factor x the median of the steps measured so far),
    so it follows the real step time without a number per model and cluster.
  - liveness: each rank writes a heartbeat (a counter, its host, phase and step) to the
    rendezvous store over a connection of its own; rank 0 reads all of them. A rank whose
    counter has not moved for `peer_timeout_seconds` is dead, stopped (SIGSTOP, a hung driver
    call holding the GIL) or on a lost node; a rank that cannot reach the store for that long has
    lost rank 0. Counters, not clocks: hosts' clocks need not agree.

When either fires, the rank that saw it writes the reason to the store's abort key (every other
rank's thread picks it up at its next heartbeat), prints one line naming the rank, host, phase
and last step, dumps all its threads' Python stacks (faulthandler) to stderr — the job log —
and exits EXIT_HUNG (6) with os._exit: the main thread may be stuck inside a collective that no
exception can interrupt. The launchers treat 6 as retryable (docs/resilience.md).

On gloo a dead peer already fails the next collective at once; on NCCL it would only show when
the collective times out (parallel.distributed_timeout_minutes): the heartbeat is what ends the
job in seconds there, and what names a rank that is alive but stuck.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional

from torch.distributed import TCPStore

from megafox.config import WatchdogConfig
from megafox.parallel.process_groups import dist_env_from_environ
from megafox.runtime.process import EXIT_HUNG

PHASES = ("startup", "step", "save", "eval")
_KEY = "megafox/watchdog/"
# step limits are derived from this many recent steps (the first steps include warm-up)
_STEP_WINDOW = 50

_current: Optional["Watchdog"] = None


def current() -> Optional["Watchdog"]:
    return _current


@contextlib.contextmanager
def phase(name: str):
    """Run the block under phase `name`'s limit (a no-op without a watchdog); the previous phase
    resumes, with a fresh clock, when the block ends."""
    dog = _current
    if dog is None:
        yield
        return
    previous = dog.enter(name)
    try:
        yield
    finally:
        dog.enter(previous)
        dog.pause_step_clock()


def _exit_file_status(status: int) -> None:
    """The launchers' exit file (megafox.train._report_status): the watchdog writes it from
    whichever rank fires, since rank 0 may be the hung one."""
    path = os.environ.get("MEGAFOX_EXIT_FILE")
    if path:
        try:
            with open(path, "w") as f:
                f.write(f"{status}\n")
        except OSError:
            pass


def start_watchdog(config) -> Optional["Watchdog"]:
    """The trainer's watchdog (None when `watchdog.enabled` is false), started in phase startup;
    rank and world size as megafox.parallel will see them."""
    if not config.watchdog.enabled:
        return None
    env = dist_env_from_environ()
    return Watchdog(config.watchdog, env.rank, env.world_size).start()


class Watchdog:
    def __init__(self, config: WatchdogConfig, rank: int, world_size: int, host: Optional[str] = None,
                 on_fire: Optional[Callable[[str], None]] = None, out=None):
        self.config = config
        self.rank, self.world_size = rank, world_size
        # SLURM's node name where there is one (what sinfo/scontrol and ExcNodeList use)
        self.host = host or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.out = out if out is not None else sys.stderr
        self.on_fire = on_fire or self._exit
        self._phase, self._since, self.step = "startup", time.monotonic(), 0
        self._step_started: Optional[float] = None
        self.step_times: List[float] = []
        self._store = None
        self._beats = 0
        self._peers: Dict[int, dict] = {}  # rank -> last heartbeat seen, with our clock at its change
        self._last_exchange = self._connected_at = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.fired: Optional[str] = None

    # ------------------------------------------------------------------ the training loop's side
    def start(self) -> "Watchdog":
        global _current
        _current = self
        self._thread = threading.Thread(target=self._run, name="megafox-watchdog", daemon=True)
        self._thread.start()
        return self

    def connect(self, host: str, port: int, timeout_s: float) -> None:
        """Heartbeats through the rendezvous store (after the process group is up), on a client
        connection of the watchdog's own with a short timeout, so a store that stops answering
        (rank 0 stopped or gone) blocks this thread for seconds, never the training."""
        self._store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                               wait_for_workers=False)
        self._last_exchange = self._connected_at = time.monotonic()
        # the first beat now, not a heartbeat later: a rank that dies within its first interval
        # must already be known to rank 0
        self._store.set(f"{_KEY}hb/{self.rank}", json.dumps(self._beat()))

    def enter(self, name: str) -> str:
        assert name in PHASES, name
        with self._lock:
            previous, self._phase, self._since = self._phase, name, time.monotonic()
        return previous

    def step_begins(self, iteration: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self._step_started is not None and self._phase == "step":
                self.step_times = (self.step_times + [now - self._step_started])[-_STEP_WINDOW:]
            self._step_started, self.step = now, iteration
            self._phase, self._since = "step", now

    def pause_step_clock(self) -> None:
        """A save or evaluation ran between steps: don't count it into the next step's time."""
        self._step_started = None

    def stop(self) -> None:
        """A clean end: tell rank 0 this rank is gone on purpose, then stop the thread."""
        global _current
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.heartbeat_seconds + 5)
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.set(f"{_KEY}hb/{self.rank}", json.dumps(self._beat(exited=True)))
        if _current is self:
            _current = None

    # ------------------------------------------------------------------------------ the checks
    def limit(self, name: str) -> float:
        c = self.config
        if name == "step":
            if c.step_seconds is not None:
                return c.step_seconds
            median = statistics.median(self.step_times) if self.step_times else 0.0
            return max(c.step_min_seconds, c.step_factor * median)
        return {"startup": c.startup_seconds, "save": c.save_seconds, "eval": c.eval_seconds}[name]

    def _beat(self, exited: bool = False) -> dict:
        return {"n": self._beats, "host": self.host, "phase": "exited" if exited else self._phase,
                "step": self.step, "pid": os.getpid()}

    def check_progress(self, now: float) -> Optional[str]:
        with self._lock:
            name, since, step = self._phase, self._since, self.step
        limit = self.limit(name)
        if now - since > limit:
            return (f"rank {self.rank} (host {self.host}) made no progress in phase {name} for "
                    f"{now - since:.0f}s (limit {limit:.0f}s; last step {step}): hung")
        return None

    def exchange(self, now: float) -> Optional[str]:
        """One heartbeat round trip; the reason to stop, if any."""
        store = self._store
        if store is None:
            return None
        try:
            self._beats += 1
            store.set(f"{_KEY}hb/{self.rank}", json.dumps(self._beat()))
            if store.check([f"{_KEY}abort"]):
                return store.get(f"{_KEY}abort").decode()
            if self.rank == 0:
                keys = [f"{_KEY}hb/{r}" for r in range(self.world_size)]
                present = [k for k in keys if store.check([k])] if len(self._peers) < self.world_size else keys
                for key, raw in zip(present, store.multi_get(present) if present else []):
                    r, beat = int(key.rsplit("/", 1)[1]), json.loads(raw)
                    seen = self._peers.get(r)
                    if seen is None or seen["n"] != beat["n"] or seen["phase"] != beat["phase"]:
                        self._peers[r] = dict(beat, seen_at=now)
            self._last_exchange = now
        except Exception as exc:  # a timeout or a refused connection: rank 0's store is unreachable
            if now - self._last_exchange > self.config.peer_timeout_seconds:
                return (f"rank {self.rank} (host {self.host}) lost contact with the rendezvous store on rank 0 "
                        f"for {now - self._last_exchange:.0f}s (limit {self.config.peer_timeout_seconds:.0f}s; "
                        f"{type(exc).__name__}): rank 0 is dead, stopped or its node is lost")
            return None
        if self.rank == 0:
            return self._silent_peers(now)
        return None

    def _silent_peers(self, now: float) -> Optional[str]:
        limit = self.config.peer_timeout_seconds
        silent = [(r, b) for r, b in sorted(self._peers.items())
                  if r != self.rank and b["phase"] != "exited" and now - b["seen_at"] > limit]
        if now - self._connected_at > limit:  # ranks that never reported at all
            silent += [(r, {"host": "?", "phase": "never reported", "step": 0, "seen_at": self._connected_at})
                       for r in range(self.world_size) if r not in self._peers and r != self.rank]
        if not silent:
            return None
        named = "; ".join(f"rank {r} (host {b['host']}, phase {b['phase']}, last reported step {b['step']}) "
                          f"silent for {now - b['seen_at']:.0f}s" for r, b in silent)
        return f"no heartbeat (limit {limit:.0f}s): {named}: dead, stopped or its node is lost"

    def abort_reason(self) -> Optional[str]:
        """Why another rank's watchdog stopped the job, if one did: a peer's collective that failed
        because that rank exited is the watchdog's doing, not a failure of its own."""
        if self._store is None:
            return None
        try:
            if self._store.check([f"{_KEY}abort"]):
                return self._store.get(f"{_KEY}abort").decode()
        except Exception:
            pass
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.config.heartbeat_seconds):
            now = time.monotonic()
            reason = self.exchange(now) or self.check_progress(now)
            if reason and not self._stop.is_set():
                self.fire(reason)
                return

    # ------------------------------------------------------------------------------- stopping
    def fire(self, reason: str) -> None:
        self.fired = reason
        if self._store is not None:
            with contextlib.suppress(Exception):
                if not self._store.check([f"{_KEY}abort"]):
                    self._store.set(f"{_KEY}abort", reason)
        print(f"megafox watchdog: {reason}", file=self.out, flush=True)
        print(f"megafox watchdog: rank {self.rank} (host {self.host}, pid {os.getpid()}, phase {self._phase}, "
              f"last step {self.step}) stops the job with exit {EXIT_HUNG}; its Python stacks:",
              file=self.out, flush=True)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=self.out, all_threads=True)
        self.on_fire(reason)

    def _exit(self, reason: str) -> None:
        _exit_file_status(EXIT_HUNG)
        if self.rank == 0 and self._store is not None and self.world_size > 1:
            # rank 0 hosts the store: keep it up until every live rank has read the abort at its
            # next heartbeat (and dumped its stacks), rather than leave them to notice it is gone
            time.sleep(2 * self.config.heartbeat_seconds + 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_HUNG)
