"""Part 3: the daemon's memory: idle, with many live children, after they exit.

A fresh daemon (nothing measured before touched it) is warmed with a few spawns, then
holds N ``sleep`` children (1,000 in the full run), which are then killed and reaped; the
cycle runs twice, so the second shows whether memory freed by the first is reused.
RSS is read from ``/proc/PID/status`` (VmRSS, and its anonymous part RssAnon, which is
where per-child bookkeeping lives). The comparison is a multiprocessing forkserver's
server process, idle and with live children of its own (fewer: each is a Python process).
"""

from __future__ import annotations

import os
import time
from typing import Any

from .common import (
    CHILD_ENV,
    SLEEP,
    TRUE,
    Daemon,
    fd_count,
    log,
    rss_kib,
    run_runner,
    workdir,
)

MODULE = "bench.memory"


def _settle(client: Any, children: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.ping()["children"] != children:
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not reach {children} children")
        time.sleep(0.02)
    time.sleep(0.3)  # let the loop go idle before reading /proc


def _cycle(d: Daemon, client: Any, n: int) -> dict[str, Any]:
    env = dict(CHILD_ENV)
    t0 = time.perf_counter()
    kids = [client.spawn([SLEEP, "3600"], env=env, want_pidfd=False) for _ in range(n)]
    spawn_s = time.perf_counter() - t0
    _settle(client, n)
    live, live_fds = rss_kib(d.pid), fd_count(d.pid)
    for k in kids:
        k.kill()
    for k in kids:
        k.wait(30)
    _settle(client, 0)
    return {"live": live, "live_fds": live_fds, "after": rss_kib(d.pid),
            "after_fds": fd_count(d.pid), "spawn_s": round(spawn_s, 2)}


def runner(cfg: dict[str, Any]) -> dict[str, Any]:
    """The comparison: a forkserver's server process (in its own runner process)."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    time.sleep(0.3)
    idle = rss_kib(pid)
    procs = [ctx.Process(target=time.sleep, args=(3600,)) for _ in range(cfg["children"])]
    for p in procs:
        p.start()
    time.sleep(0.5)
    live = rss_kib(pid)
    child = rss_kib(procs[0].pid)  # type: ignore[arg-type]
    for p in procs:
        p.kill()
    for p in procs:
        p.join()
    time.sleep(0.3)
    return {"pid": pid, "children": cfg["children"], "idle": idle, "live": live,
            "after": rss_kib(pid), "child_rss": child}


def run(*, quick: bool) -> dict[str, Any]:
    n = 200 if quick else 1000
    fs_children = 20 if quick else 100
    log(f"  memory: fresh daemon, {n} live children, two cycles")
    with Daemon(workdir(), name="memory").start() as d:
        c = d.client()
        for _ in range(5):
            child = c.spawn([TRUE], env=dict(CHILD_ENV))
            child.wait()
            child.close()
        _settle(c, 0)
        idle, idle_fds = rss_kib(d.pid), fd_count(d.pid)
        cycles = [_cycle(d, c, n) for _ in range(2)]
        daemon_pid = d.pid
    log(f"  memory: forkserver server with {fs_children} live children")
    fs = run_runner(MODULE, {"children": fs_children}, timeout=300)
    first = cycles[0]
    per_child = (first["live"]["VmRSS"] - idle["VmRSS"]) * 1024 / n
    per_child_anon = (first["live"]["RssAnon"] - idle["RssAnon"]) * 1024 / n
    fs_per_child = (fs["live"]["VmRSS"] - fs["idle"]["VmRSS"]) * 1024 / fs["children"]
    res = {
        "children": n, "daemon_pid": daemon_pid, "idle": idle, "idle_fds": idle_fds,
        "cycles": cycles,
        "per_child_bytes": round(per_child), "per_child_anon_bytes": round(per_child_anon),
        "after_minus_idle_kib": first["after"]["VmRSS"] - idle["VmRSS"],
        "after2_minus_idle_kib": cycles[1]["after"]["VmRSS"] - idle["VmRSS"],
        "forkserver": fs, "forkserver_per_child_bytes": round(fs_per_child),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
    }
    log(f"    daemon RSS idle {idle['VmRSS'] / 1024:.1f} MiB, "
        f"{n} live {first['live']['VmRSS'] / 1024:.1f} MiB, after {first['after']['VmRSS'] / 1024:.1f}"
        f" MiB; {per_child / 1024:.1f} KiB/child; forkserver idle "
        f"{fs['idle']['VmRSS'] / 1024:.1f} MiB")
    return res
