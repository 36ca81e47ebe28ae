"""Part 1: spawn-to-exit latency of /bin/true against the parent's size and threads.

Figure 1 of "A fork() in the road" (Baumann et al., HotOS 2019), extended with spawnd.
Each parent configuration (touched memory x idle threads) is its own runner process: it
maps and touches the memory (4 KiB pages: transparent huge pages are turned off for the
mapping, as for most heaps), starts the threads, then measures every method in rounds,
each round in a fresh random order so drift (and the after-effects of one method) hits
every method alike.

A sidecar process, started by the runner before it grows, times ``os.posix_spawn`` from a
small process on request, interleaved with the others: the reference the target compares
against, measured at the same moments as everything else.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .common import (
    CHILD_ENV,
    TRUE,
    log,
    rounds_rng,
    rss_kib,
    run_runner,
    shuffled,
    summarize_ns,
)

#: Plotted methods, in legend order: key -> label.
METHODS: dict[str, str] = {
    "fork_exec": "os.fork()+exec",
    "posix_spawn": "os.posix_spawn",
    "subprocess": "subprocess.Popen",
    "mp_fork": "mp fork Process",
    "mp_forkserver": "mp forkserver Process",
    "mp_spawn": "mp spawn Process",
    "spawnd_popen": "spawnd Popen",
    "spawnd_client": "spawnd Client.spawn",
}
#: References measured alongside (not plotted as parent-size lines).
REFERENCES: dict[str, str] = {
    "posix_spawn_small": "os.posix_spawn from a small process (sidecar)",
    "spawnd_ping": "spawnd ping round trip (no spawn)",
    # issue 12: the caller's full environment, stdio passed (what a user's call sends)
    "posix_spawn_env": "os.posix_spawn+waitpid, full environment",
    "spawnd_client_env": "spawnd Client.spawn, full environment, fds 0-2",
    "subprocess_env": "subprocess.Popen(argv).wait() (defaults)",
    "spawnd_popen_env": "spawnd Popen(argv).wait() (defaults)",
    # isolating target 1's miss, in the same rounds: the minimal trio daemon of
    # bench/floor.py (spawnd's own request: full env, caller state, protocol) and a plain
    # Unix-socket round trip between two blocking processes (two wake-ups, nothing else)
    "floor_spawn_env": "minimal trio daemon (bench/floor.py) spawn+wait, full env",
    "floor_spawn_bare": "minimal trio daemon, bare: a 16-byte request, no protocol",
    "unix_pingpong": "plain Unix-socket round trip to an echo process",
}

FULL_SIZES = [0, 256, 1024, 4096]
QUICK_SIZES = [0, 256]
THREADS = [0, 64]
MODULE = "bench.latency"  # not __name__: that is "__main__" in a runner


def _mp_noop() -> None:
    """The multiprocessing target: nothing, so start->exit is all process creation."""


# ---------------------------------------------------------------------------- sidecar

def sidecar() -> None:
    """``python -m bench --sidecar``: one timed posix_spawn+wait per input line."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    env = dict(CHILD_ENV)
    while inp.readline():
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(TRUE, [TRUE], env)
        os.waitpid(pid, 0)
        out.write(b"%d\n" % (time.perf_counter_ns() - t0))
        out.flush()


# ---------------------------------------------------------------------------- the runner

def _grow(mib: int) -> mmap.mmap | None:
    """Map ``mib`` MiB and touch every 4 KiB page, so fork has page tables to copy."""
    if not mib:
        return None
    n = mib << 20
    mem = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mem.madvise(mmap.MADV_NOHUGEPAGE)
    page = mmap.PAGESIZE
    mem[::page] = b"\x01" * (n // page)
    return mem


_ECHO = ("import socket, sys\ns = socket.socket(fileno=int(sys.argv[1]))\n"
         "while (d := s.recv(64)):\n    s.sendall(d)\n")


def _methods(client: Any, sidecar_proc: subprocess.Popen[bytes], floors: dict[str, Any],
             echo: Any) -> dict[str, Callable[[], int]]:
    """Each returns the elapsed ns of one spawn-to-exit (or one reference measurement)."""
    import multiprocessing as mp

    import spawnd_client as sc

    env = dict(CHILD_ENV)
    argv = [TRUE]
    clock = time.perf_counter_ns
    ctx_fork = mp.get_context("fork")
    ctx_fs = mp.get_context("forkserver")
    ctx_fs.set_forkserver_preload([MODULE])
    ctx_spawn = mp.get_context("spawn")

    def fork_exec() -> int:
        t0 = clock()
        pid = os.fork()
        if pid == 0:
            try:
                os.execve(TRUE, argv, env)
            finally:
                os._exit(127)
        os.waitpid(pid, 0)
        return clock() - t0

    def posix_spawn() -> int:
        t0 = clock()
        pid = os.posix_spawn(TRUE, argv, env)
        os.waitpid(pid, 0)
        return clock() - t0

    def popen() -> int:
        t0 = clock()
        subprocess.Popen(argv, env=env).wait()
        return clock() - t0

    def mp_process(ctx: Any) -> Callable[[], int]:
        def run() -> int:
            p = ctx.Process(target=_mp_noop)
            t0 = clock()
            p.start()
            p.join()
            dt = clock() - t0
            if p.exitcode != 0:
                raise RuntimeError(f"{ctx.get_start_method()} child exited {p.exitcode}")
            p.close()
            return dt
        return run

    def spawnd_popen() -> int:
        t0 = clock()
        sc.Popen(argv, env=env, client=client).wait()
        return clock() - t0

    def spawnd_client() -> int:
        t0 = clock()
        child = client.spawn(argv, env=env)
        child.wait()
        dt = clock() - t0
        child.close()
        return dt

    def small() -> int:
        assert sidecar_proc.stdin is not None and sidecar_proc.stdout is not None
        sidecar_proc.stdin.write(b"1\n")
        sidecar_proc.stdin.flush()
        return int(sidecar_proc.stdout.readline())

    def ping() -> int:
        t0 = clock()
        client.ping()
        return clock() - t0

    full_env = dict(os.environ)
    stdio = {0: 0, 1: 1, 2: 2}

    def posix_spawn_env() -> int:
        t0 = clock()
        pid = os.posix_spawn(TRUE, argv, full_env)
        os.waitpid(pid, 0)
        return clock() - t0

    def spawnd_client_env() -> int:
        t0 = clock()
        child = client.spawn(argv, fds=stdio)  # env None: the caller's environment
        child.wait()
        dt = clock() - t0
        child.close()
        return dt

    def popen_env() -> int:
        t0 = clock()
        subprocess.Popen(argv).wait()
        return clock() - t0

    def spawnd_popen_env() -> int:
        t0 = clock()
        sc.Popen(argv, client=client).wait()
        return clock() - t0

    def floor_spawn(v: str) -> Callable[[], int]:
        def run() -> int:
            t0 = clock()
            floors[v].one()
            return clock() - t0
        return run

    def unix_pingpong() -> int:
        t0 = clock()
        echo.sendall(b"x")
        echo.recv(1)
        return clock() - t0

    return {
        "floor_spawn_env": floor_spawn("proto"), "floor_spawn_bare": floor_spawn("bare"),
        "unix_pingpong": unix_pingpong,
        "posix_spawn_env": posix_spawn_env, "spawnd_client_env": spawnd_client_env,
        "subprocess_env": popen_env, "spawnd_popen_env": spawnd_popen_env,
        "fork_exec": fork_exec, "posix_spawn": posix_spawn, "subprocess": popen,
        "mp_fork": mp_process(ctx_fork), "mp_forkserver": mp_process(ctx_fs),
        "mp_spawn": mp_process(ctx_spawn), "spawnd_popen": spawnd_popen,
        "spawnd_client": spawnd_client, "posix_spawn_small": small, "spawnd_ping": ping,
    }


def runner(cfg: dict[str, Any]) -> dict[str, Any]:
    import spawnd_client as sc

    from .floor import FloorClient

    side = subprocess.Popen([sys.executable, "-m", "bench", "--sidecar"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    floors = {v: FloorClient(v) for v in ("proto", "bare")}  # small: started before growing
    mine, theirs = socket.socketpair()
    echo_proc = subprocess.Popen([sys.executable, "-c", _ECHO, str(theirs.fileno())],
                                 pass_fds=[theirs.fileno()])
    theirs.close()
    client = sc.Client(cfg["socket"], autostart=False)
    client.ping()
    t0 = time.monotonic()
    mem = _grow(cfg["mem_mib"])
    grow_s = time.monotonic() - t0
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(cfg["threads"])]
    for t in threads:
        t.start()
    fns = _methods(client, side, floors, mine)
    keys = [k for k in cfg.get("methods") or list(METHODS) + list(REFERENCES) if k in fns]
    samples: dict[str, list[int]] = {k: [] for k in keys}
    for k in keys:  # warm-up: starts the forkserver, connects, fills caches
        fns[k]()
    rng = rounds_rng()
    t0 = time.monotonic()
    for _ in range(cfg["rounds"]):
        for k in shuffled(keys, rng):
            samples[k].append(fns[k]())
    measure_s = time.monotonic() - t0
    rss = rss_kib(os.getpid())
    nthreads = threading.active_count() - 1
    stop.set()
    side.stdin.close()  # type: ignore[union-attr]
    side.wait()
    for fc in floors.values():
        fc.close()
    mine.close()
    echo_proc.wait()
    client.close()
    del mem
    return {
        "mem_mib": cfg["mem_mib"], "threads": nthreads, "rss_kib": rss,
        "grow_s": round(grow_s, 2), "measure_s": round(measure_s, 2), "rounds": cfg["rounds"],
        "methods": {k: summarize_ns(v) for k, v in samples.items()},
    }


# ---------------------------------------------------------------------------- orchestration

def run(socket_path: str, *, quick: bool) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    rounds = 10 if quick else 50
    configs = []
    for threads in THREADS:
        for mib in sizes:
            log(f"  latency: parent {mib} MiB touched, {threads} threads, {rounds} rounds")
            res = run_runner(MODULE, {"socket": socket_path, "mem_mib": mib,
                                        "threads": threads, "rounds": rounds},
                             timeout=900)
            log(f"    rss {res['rss_kib']['VmRSS'] // 1024} MiB, grew in {res['grow_s']}s, "
                f"measured in {res['measure_s']}s: " + ", ".join(
                    f"{k} {v['median_us'] / 1000:.2f}ms" for k, v in res["methods"].items()))
            configs.append(res)
    return {"methods": METHODS, "references": REFERENCES, "sizes_mib": sizes,
            "threads": THREADS, "rounds": rounds, "configs": configs}

