"""Soak (issue 6, case 14): many client threads, short children with random exit codes and
signals, random disconnects. Every status must reach the right caller exactly once; no
zombie, no fd and no memory may be left behind.

``test_soak_short`` (8 threads x 40 spawns) runs by default; the full one (20 x 500) runs
with ``-m soak``. Both print their figures.
"""

from __future__ import annotations

import os
import random
import select
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import spawnd_client as sc
from conftest import children_of, fd_count, rss_kib, wait_until
from faultlib import Baseline, gone, launch, start_time, stop, zombies
from spawnd_client._transport import Transport

from spawnd import protocol as P

SIGNALS = [signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE]


class Ledger:
    """Counts every Spawned and Exit event each transport routes (wraps Transport._route)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spawned: dict[tuple[int, int], int] = {}
        self.exits: Counter[tuple[int, int]] = Counter()
        self.exit_pid: dict[tuple[int, int], int] = {}
        self.transports: dict[int, Transport] = {}  # kept alive: their id()s stay unique
        self.orig = Transport._route

    def route(self, t: Transport, ev: P.Event) -> None:
        key = (id(t), getattr(ev, "id", -1))
        with self.lock:
            self.transports[id(t)] = t
            if isinstance(ev, P.Spawned):
                self.spawned[key] = ev.pid
            elif isinstance(ev, P.Exit):
                self.exits[key] += 1
                self.exit_pid[key] = ev.pid
        self.orig(t, ev)


def run_soak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_threads: int, per_thread: int,
             seed: int) -> dict[str, Any]:
    ledger = Ledger()
    monkeypatch.setattr(Transport, "_route", lambda t, ev: ledger.route(t, ev))
    d = launch(tmp_path, "--log-level", "info", "--stop-grace", "1")
    stats: dict[str, Any] = {}
    try:
        base = Baseline(d)
        shared = [sc.Client(d.path, autostart=False) for _ in range(2)]
        errors: list[str] = []
        abandoned: list[tuple[int, int | None]] = []  # children of dropped connections
        done = Counter[str]()
        peak = [rss_kib(d.pid)]
        stop_monitor = threading.Event()

        def monitor() -> None:
            while not stop_monitor.wait(0.1):
                try:
                    peak[0] = max(peak[0], rss_kib(d.pid))
                except (FileNotFoundError, ProcessLookupError):
                    return

        def worker(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            own = k >= n_threads // 2
            client = sc.Client(d.path, autostart=False) if own else shared[k % 2]
            try:
                for _ in range(per_thread):
                    roll = rng.random()
                    if own and roll < 0.02:  # drop our connection between requests
                        client.close()
                        client = sc.Client(d.path, autostart=False)
                        done["reconnect"] += 1
                    if roll < 0.03:  # a connection dropped with children still running
                        with sc.Client(d.path, autostart=False) as temp:
                            for how in ("terminate", "kill"):
                                c = temp.spawn(["/bin/sleep", "30"], env={}, grace=0.5,
                                               on_disconnect=how)
                                abandoned.append((c.pid, start_time(c.pid)))
                                c.close()
                        done["abandon"] += 1
                        continue
                    op = rng.random()
                    if op < 0.5:
                        code = rng.randrange(256)
                        child = client.spawn(["/bin/sh", "-c", f"exit {code}"], env={})
                        want = code
                    elif op < 0.7:
                        sig = rng.choice(SIGNALS)
                        child = client.spawn(["/bin/sh", "-c", f"kill -{int(sig)} $$"], env={})
                        want = -sig
                    elif op < 0.9:
                        sig = rng.choice(SIGNALS)
                        child = client.spawn(["/bin/sleep", "30"], env={})
                        child.send_signal(sig)
                        want = -sig
                    else:
                        child = client.spawn(["/bin/true"], env={})
                        assert child.pidfd is not None
                        if not select.select([child.pidfd], [], [], 10)[0]:
                            errors.append(f"pidfd of {child.pid} never readable")
                        want = 0
                    got = child.wait(30)
                    child.close()
                    if got != want:
                        errors.append(f"thread {k}: child {child.pid} got {got}, want {want}")
                    done["spawn"] += 1
            except BaseException as e:  # noqa: BLE001
                errors.append(f"thread {k}: {type(e).__name__}: {e}")
            finally:
                if own:
                    client.close()

        mon = threading.Thread(target=monitor, daemon=True)
        mon.start()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - t0
        stop_monitor.set()
        mon.join()
        for c in shared:
            c.close()
        assert not any(t.is_alive() for t in threads), "a worker hung"
        assert not errors, errors[:10]

        # every child of a dropped connection met its fate and was reaped
        assert wait_until(lambda: not children_of(d.pid), 20), children_of(d.pid)
        assert all(gone(pid, started) for pid, started in abandoned)
        assert not zombies(d.pid)
        # exactly once, to the right caller: one exit per spawned child on live connections
        # (a dropped connection may have lost some: never more than one either)
        dup = {k: n for k, n in ledger.exits.items() if n > 1}
        assert not dup, dup
        wrong = {k: (ledger.spawned.get(k), pid) for k, pid in ledger.exit_pid.items()
                 if ledger.spawned.get(k) != pid}
        assert not wrong, wrong
        delivered = sum(ledger.exits.values())
        assert delivered >= done["spawn"], (delivered, done)
        fds_after = fd_count(d.pid)
        base.check()
        rss_end = rss_kib(d.pid)
        stats = {
            "threads": n_threads, "spawns per thread": per_thread, "seed": seed,
            "spawns": done["spawn"], "abandoned connections": done["abandon"],
            "reconnects": done["reconnect"], "exit events": delivered,
            "seconds": round(elapsed, 2),
            "throughput (spawn+wait/s)": round(done["spawn"] / elapsed, 1),
            "fds before": base.fds, "fds after": fds_after,
            "rss before KiB": base.rss, "rss after KiB": rss_end, "peak rss KiB": peak[0],
        }
        assert rss_end <= base.rss + 8 * 1024, stats
    finally:
        stop(d)
    return stats


def _report(capsys: pytest.CaptureFixture[str], stats: dict[str, Any]) -> None:
    with capsys.disabled():
        print("\nsoak: " + ", ".join(f"{k}={v}" for k, v in stats.items()))


def test_soak_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    _report(capsys, run_soak(tmp_path, monkeypatch, 8, 40, seed=1))


@pytest.mark.soak
def test_soak_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("SPAWND_SOAK_SEED", "6"))
    _report(capsys, run_soak(tmp_path, monkeypatch, 20, 500, seed=seed))
