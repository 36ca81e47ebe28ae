"""Part 2: spawns per second of /bin/true through one daemon, against tight local loops.

* spawnd with 1, 8 and 32 client threads sharing one ``Client`` (as the README advises),
  and 8 threads with a connection each (is the shared connection the limit?);
* a tight ``os.posix_spawn`` loop in one Python process, 1, 8 and 32 children in flight:
  what a single-threaded Python process such as the daemon can do at best;
* the same loop in C (``spawn_loop.c``, compiled at run time with ``cc`` when there is
  one): the machine's limit.

Every method runs once per round, each round in a fresh random order. The table gives the
best round (noise from other work only ever slows a round down; every method had the same
chances) and the median.
All of it runs in one small runner process.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from .common import (
    CHILD_ENV,
    REPO,
    TRUE,
    cpu_ticks,
    log,
    percentile,
    rounds_rng,
    run_runner,
    shuffled,
    system_ticks,
)

MODULE = "bench.throughput"
C_SOURCE = REPO / "bench" / "spawn_loop.c"

#: key -> label
METHODS: dict[str, str] = {
    "spawnd_t1": "spawnd, 1 client thread",
    "spawnd_t8": "spawnd, 8 client threads",
    "spawnd_t32": "spawnd, 32 client threads",
    "spawnd_t8_conns": "spawnd, 8 threads, 8 connections",
    "py_w1": "os.posix_spawn loop, 1 in flight",
    "py_w8": "os.posix_spawn loop, 8 in flight",
    "py_w32": "os.posix_spawn loop, 32 in flight",
    "c_w1": "C posix_spawn loop, 1 in flight",
    "c_w8": "C posix_spawn loop, 8 in flight",
    "c_w32": "C posix_spawn loop, 32 in flight",
}


def compile_c(outdir: str) -> tuple[str | None, str | None]:
    """(binary, None) or (None, why not)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler (cc) on PATH"
    exe = os.path.join(outdir, "spawn_loop")
    p = subprocess.run([cc, "-O2", "-o", exe, str(C_SOURCE)], capture_output=True, text=True)
    if p.returncode != 0:
        return None, f"{cc} failed: {p.stderr.strip()[-500:]}"
    return exe, None


def _spawnd(clients: list[Any], nthreads: int, n: int) -> float:
    """n spawn+wait through ``nthreads`` threads (thread i uses clients[i % len])."""
    argv, env = [TRUE], dict(CHILD_ENV)
    left = [n]
    lock = threading.Lock()
    go = threading.Barrier(nthreads + 1)
    errors: list[BaseException] = []

    def work(client: Any) -> None:
        go.wait()
        try:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                child = client.spawn(argv, env=env)
                child.wait()
                child.close()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(clients[i % len(clients)],))
               for i in range(nthreads)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return n / dt


def _py_loop(n: int, window: int) -> float:
    env = dict(CHILD_ENV)
    argv = [TRUE]
    started = done = inflight = 0
    t0 = time.perf_counter()
    while done < n:
        while inflight < window and started < n:
            os.posix_spawn(TRUE, argv, env)
            started += 1
            inflight += 1
        _, status = os.waitpid(-1, 0)
        if status:
            raise RuntimeError(f"/bin/true failed: status {status}")
        done += 1
        inflight -= 1
    return n / (time.perf_counter() - t0)


def _c_loop(exe: str, n: int, window: int) -> float:
    out = subprocess.run([exe, str(n), str(window)], capture_output=True, text=True, check=True)
    return n / (int(out.stdout) / 1e9)


class _Cpu:
    """CPU used while one measurement runs: the daemon, this process, the whole machine."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.hz = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> _Cpu:
        self.d0 = cpu_ticks(self.daemon_pid)
        self.s0 = system_ticks()
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)
        self.c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        d1, s1 = cpu_ticks(self.daemon_pid), system_ticks()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)

        def used(a: resource.struct_rusage, b: resource.struct_rusage) -> float:
            return (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)

        busy, total = s1[0] - self.s0[0], s1[1] - self.s0[1]
        self.result = {
            "daemon_cpu_s": (d1 - self.d0) / self.hz, "runner_cpu_s": used(self.r0, r1),
            # reaped children of this runner: our own /bin/true children, or the C loop
            "children_cpu_s": used(self.c0, c1),
            "machine_busy_cpus": round((os.cpu_count() or 1) * busy / total, 2) if total else None,
            "wall_s": wall,
        }


def _per_spawn(cpu: dict[str, Any], n: int) -> dict[str, Any]:
    return {"machine_busy_cpus": cpu["machine_busy_cpus"],
            "daemon_cpu_us": round(cpu["daemon_cpu_s"] / n * 1e6, 1),
            "runner_cpu_us": round(cpu["runner_cpu_s"] / n * 1e6, 1),
            "machine_cpu_us": round((cpu["machine_busy_cpus"] or 0) * cpu["wall_s"] / n * 1e6,
                                    1)}


def runner(cfg: dict[str, Any]) -> dict[str, Any]:
    import spawnd_client as sc

    n = cfg["count"]
    shared = sc.Client(cfg["socket"], autostart=False)
    own = [sc.Client(cfg["socket"], autostart=False) for _ in range(8)]
    for c in [shared, *own]:
        c.ping()
    daemon_pid = shared.ping()["pid"]
    notes = []
    fns: dict[str, Callable[[int], float]] = {
        "spawnd_t1": lambda k: _spawnd([shared], 1, k),
        "spawnd_t8": lambda k: _spawnd([shared], 8, k),
        "spawnd_t32": lambda k: _spawnd([shared], 32, k),
        "spawnd_t8_conns": lambda k: _spawnd(own, 8, k),
        "py_w1": lambda k: _py_loop(k, 1),
        "py_w8": lambda k: _py_loop(k, 8),
        "py_w32": lambda k: _py_loop(k, 32),
    }
    with tempfile.TemporaryDirectory(prefix="spawnd-bench-c-") as tmp:
        exe, why = compile_c(tmp)
        if exe is None:
            notes.append(f"C loop skipped: {why}")
        else:
            fns["c_w1"] = lambda k: _c_loop(exe, k, 1)
            fns["c_w8"] = lambda k: _c_loop(exe, k, 8)
            fns["c_w32"] = lambda k: _c_loop(exe, k, 32)
        keys = list(fns)
        for k in keys:  # warm-up: a tenth of the work
            fns[k](max(n // 10, 10))
        rates: dict[str, list[float]] = {k: [] for k in keys}
        cpu: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        rng = rounds_rng()
        for _ in range(cfg["rounds"]):
            for k in shuffled(keys, rng):
                with _Cpu(daemon_pid) as meter:
                    rates[k].append(fns[k](n))
                cpu[k].append(_per_spawn(meter.result, n))
    for c in [shared, *own]:
        c.close()
    return {
        "count": n, "rounds": cfg["rounds"], "notes": notes,
        "methods": {k: {"best_per_s": round(max(v), 1),
                        "median_per_s": round(percentile(sorted(v), 0.5), 1),
                        "rates_per_s": [round(x, 1) for x in v],
                        "cpu": cpu[k][v.index(max(v))],  # of the best round
                        "cpu_median": _median_cpu(cpu[k])} for k, v in rates.items()},
    }


def _median_cpu(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field median over rounds."""
    return {f: percentile(sorted(r[f] for r in rows), 0.5) for f in rows[0]} if rows else {}


def run(socket_path: str, *, quick: bool) -> dict[str, Any]:
    count, rounds = (200, 1) if quick else (1000, 7)
    log(f"  throughput: {count} spawns per measurement, {rounds} rounds")
    res = run_runner(MODULE, {"socket": socket_path, "count": count, "rounds": rounds},
                     timeout=900)
    for k, v in res["methods"].items():
        c = v["cpu"]
        log(f"    {METHODS[k]:34} best {v['best_per_s']:5.0f}/s, median {v['median_per_s']:5.0f}/s;"
            f" machine busy "
            f"{c['machine_busy_cpus']:.2f} CPUs, {c['machine_cpu_us']:.0f} us CPU/spawn "
            f"(daemon {c['daemon_cpu_us']:.0f}, runner {c['runner_cpu_us']:.0f})")
    for note in res["notes"]:
        log(f"    note: {note}")
    res["labels"] = {k: v for k, v in METHODS.items() if k in res["methods"]}
    return res

