"""Part: CPU per spawn (daemon and client) and import times (issue 12, targets 3 and 6).

Also the floor (``bench/floor.py``): a minimal trio daemon measured in the same run, bare
and with spawnd's caller-state capture and protocol added, which isolates what a miss of
targets 1-3 is made of.

Daemon CPU: utime+stime of the daemon from ``/proc/PID/stat`` across ``n`` plain
``Client.spawn(["/bin/true"]) + wait`` (no other client is active on the bench daemon
meanwhile); client CPU: ``getrusage(RUSAGE_SELF)`` of the one-threaded runner over the
same spawns. Imports: each module imported in a fresh interpreter, timed inside it, rounds
interleaved in random order.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from typing import Any

from .common import REPO, TRUE, cpu_ticks, log, python_env, rounds_rng, run_runner, shuffled

MODULE = "bench.cost"
IMPORTS = ("subprocess", "spawnd_client", "spawnd_client.mp")
_IMPORT_SNIPPET = ("import time; t = time.perf_counter(); import {m}; "
                   "print(int((time.perf_counter() - t) * 1e9))")


def runner(cfg: dict[str, Any]) -> dict[str, Any]:
    import spawnd_client as sc

    client = sc.Client(cfg["socket"], autostart=False)
    dpid = client.ping()["pid"]
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, Any] = {"spawns": cfg["n"], "daemon_pid": dpid}
    for label, kw in (("plain", {"env": {"PATH": "/usr/bin:/bin"}}),
                      ("full_env_stdio", {"fds": {0: 0, 1: 1, 2: 2}})):
        for _ in range(50):  # warm-up
            client.spawn([TRUE], **kw).wait()
        d0 = cpu_ticks(dpid)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.perf_counter()
        for _ in range(cfg["n"]):
            c = client.spawn([TRUE], **kw)
            c.wait()
            c.close()
        w1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        d1 = cpu_ticks(dpid)
        n = cfg["n"]
        out[label] = {
            "daemon_cpu_ms": round((d1 - d0) / hz / n * 1e3, 4),
            "client_cpu_ms": round((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                                   / n * 1e3, 4),
            "wall_ms": round((w1 - w0) / n * 1e3, 4),
        }
    client.close()
    return out


def _imports(rounds: int) -> dict[str, Any]:
    """Import times as an installed user meets them: with bytecode. pip compiles what it
    installs, like the stdlib's own; a source checkout run with PYTHONDONTWRITEBYTECODE=1
    (this machine) would otherwise compile spawnd's modules in every interpreter."""
    import compileall

    for pkg in (REPO / "spawnd", REPO / "client" / "spawnd_client"):
        compileall.compile_dir(pkg, quiet=1)
    rng = rounds_rng()
    env = python_env()
    samples: dict[str, list[int]] = {m: [] for m in IMPORTS}
    for _ in range(rounds):
        for m in shuffled(IMPORTS, rng):
            p = subprocess.run([sys.executable, "-c", _IMPORT_SNIPPET.format(m=m)], env=env,
                               capture_output=True, text=True, check=True)
            samples[m].append(int(p.stdout))
    return {m: {"median_ms": round(sorted(v)[len(v) // 2] / 1e6, 2)} for m, v in samples.items()}


def run(socket_path: str, *, quick: bool) -> dict[str, Any]:
    n = 100 if quick else 1000
    log(f"  cost: daemon and client CPU over {n} spawns")
    res = run_runner(MODULE, {"socket": socket_path, "n": n}, timeout=600)
    log(f"  cost: the floor (a minimal trio daemon, bench/floor.py), {n} spawns per variant")
    try:
        from . import floor

        res["floor"] = floor.measure(n)
    except Exception as e:  # informational: never fail the part for it
        res["floor"] = {"error": f"{type(e).__name__}: {e}"}
    log(f"  cost: import times, {3 if quick else 15} rounds")
    res["imports"] = _imports(3 if quick else 15)
    return res
