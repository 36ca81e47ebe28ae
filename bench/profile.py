"""``python -m bench --profile``: where a spawnd spawn's time goes (daemon and client).

1. Latency decomposition, in one small runner, rounds in random order: local ``os.posix_spawn``,
   a ``ping`` round trip (IPC + both event loops, no process), ``Client.spawn`` without
   and with a pidfd, ``Popen`` (which also passes stdio), and the CPU time the daemon and
   the client burn per spawn (``/proc/PID/stat``, ``getrusage``); then the same ping back
   to back and after 2 ms and 50 ms asleep: what waking an idle daemon costs.
2. py-spy (when installed: ``pip install py-spy``) samples the un-instrumented daemon and a
   load-generating client (1 and 8 threads) at 1 kHz without pausing them; the report
   gives the share of the daemon's busy samples in each part of the hot path and the top
   functions by own time.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

from .common import (
    CHILD_ENV,
    REPO,
    TRUE,
    Daemon,
    cpu_ticks,
    log,
    python_env,
    rounds_rng,
    run_runner,
    shuffled,
    summarize_ns,
    workdir,
)

MODULE = "bench.profile"

#: Hot-path parts of the daemon: label -> (file suffix, function names) matched anywhere in
#: a sampled stack (inclusive time).
DAEMON_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "request dispatch total (ConnectionHandler._spawn)": ("spawnd/server.py", ("_spawn",)),
    "  posix_spawn via ctypes (incl. vfork wait for the child's exec)":
        ("spawnd/spawner.py", ("spawn",)),
    "  PATH lookup (resolve_executable)": ("spawnd/spawner.py", ("resolve_executable",)),
    "  policy.decide": ("spawnd/policy.py", ("decide",)),
    "  child table add (pidfd_open, watcher task)": ("spawnd/children.py", ("add",)),
    "exit: pidfd wake, waitid, forget, Exit event (ChildTable._watch)":
        ("spawnd/children.py", ("_watch",)),
    "socket reads (_recv)": ("spawnd/server.py", ("_recv",)),
    "socket writes (_writer)": ("spawnd/server.py", ("_writer",)),
    "protocol encode/decode (spawnd/protocol.py)": ("spawnd/protocol.py", ()),
    "msgpack": ("msgpack", ()),
}
CLIENT_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Client.spawn (request build, send, reply)": ("spawnd_client/client.py", ("spawn",)),
    "  spawn_request (encode env/argv)": ("spawnd_client/client.py", ("spawn_request",)),
    "  protocol encode/decode": ("spawnd/protocol.py", ()),
    "Child.wait (until the Exit event)": ("spawnd_client/client.py", ("wait",)),
    "transport reads (_read_once)": ("spawnd_client/_transport.py", ("_read_once",)),
    "threading Condition/lock": ("threading.py", ()),
}


# ---------------------------------------------------------------------------- runner side

def runner(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg["mode"] == "load":
        return _load(cfg)
    return _decompose(cfg)


def _load(cfg: dict[str, Any]) -> dict[str, Any]:
    """Spawn /bin/true through the daemon from ``threads`` threads for ``seconds``."""
    import spawnd_client as sc

    client = sc.Client(cfg["socket"], autostart=False)
    client.ping()
    env = dict(CHILD_ENV)
    stop = time.monotonic() + cfg["seconds"]
    counts = [0] * cfg["threads"]

    def work(i: int) -> None:
        while time.monotonic() < stop:
            child = client.spawn([TRUE], env=env)
            child.wait()
            child.close()
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(cfg["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"spawns": sum(counts), "seconds": cfg["seconds"]}


def _decompose(cfg: dict[str, Any]) -> dict[str, Any]:
    import spawnd_client as sc

    client = sc.Client(cfg["socket"], autostart=False)
    env = dict(CHILD_ENV)
    clock = time.perf_counter_ns
    dpid = client.ping()["pid"]

    def posix_spawn() -> None:
        os.waitpid(os.posix_spawn(TRUE, [TRUE], env), 0)

    def spawn_nopidfd() -> None:
        client.spawn([TRUE], env=env, want_pidfd=False).wait()

    def spawn_pidfd() -> None:
        child = client.spawn([TRUE], env=env)
        child.wait()
        child.close()

    def spawn_stdio() -> None:
        child = client.spawn([TRUE], env=env, fds={0: 0, 1: 1, 2: 2})
        child.wait()
        child.close()

    def popen() -> None:
        sc.Popen([TRUE], env=env, client=client).wait()

    fns = {"posix_spawn": posix_spawn, "ping": client.ping, "spawn_nopidfd": spawn_nopidfd,
           "spawn_pidfd": spawn_pidfd, "spawn_stdio": spawn_stdio, "popen": popen}
    samples: dict[str, list[int]] = {k: [] for k in [*fns, "ping_hot", "ping_idle",
                                                      "ping_idle50"]}
    for f in fns.values():
        f()
    rng = rounds_rng()
    for _ in range(cfg["rounds"]):
        for k in shuffled(list(fns), rng):
            t0 = clock()
            fns[k]()
            samples[k].append(clock() - t0)
    # The same ping back to back (both processes stay on CPU) and after 2 ms asleep (the
    # CPUs may idle between requests): the cost of waking a sleeping process, twice.
    for _ in range(cfg["rounds"]):
        t0 = clock()
        client.ping()
        samples["ping_hot"].append(clock() - t0)
    for key, gap, n in (("ping_idle", 0.002, cfg["rounds"]),
                        ("ping_idle50", 0.05, max(cfg["rounds"] // 4, 10))):
        for _ in range(n):
            time.sleep(gap)
            t0 = clock()
            client.ping()
            samples[key].append(clock() - t0)
    # CPU per spawn: daemon from /proc, client from getrusage, over sequential spawns
    hz = os.sysconf("SC_CLK_TCK")
    n = cfg["cpu_spawns"]
    cpu: dict[str, Any] = {}
    for k in ("posix_spawn", "spawn_pidfd", "popen", "ping"):
        d0, c0 = cpu_ticks(dpid), resource.getrusage(resource.RUSAGE_SELF)
        t0 = clock()
        for _ in range(n):
            fns[k]()
        wall = clock() - t0
        d1, c1 = cpu_ticks(dpid), resource.getrusage(resource.RUSAGE_SELF)
        cpu[k] = {
            "wall_us": round(wall / n / 1e3, 1),
            "daemon_cpu_us": round((d1 - d0) / hz / n * 1e6, 1),
            "client_cpu_us": round((c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
                                   / n * 1e6, 1),
        }
    client.close()
    return {"latency": {k: summarize_ns(v, keep=False) for k, v in samples.items()},
            "cpu_per_op": cpu, "cpu_spawns": n}


# ---------------------------------------------------------------------------- py-spy

def _parse_raw(path: str) -> tuple[int, list[tuple[list[str], int]]]:
    stacks = []
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            stacks.append((stack.split(";"), n))
            total += n
    return total, stacks


def _frame_matches(frame: str, file_part: str, funcs: tuple[str, ...]) -> bool:
    # "func (path/file.py:LINE)" or "func (file.py:LINE)"
    name, _, where = frame.partition(" (")
    return file_part in where and (not funcs or name.split(".")[-1] in funcs)


def _aggregate(path: str, parts: dict[str, tuple[str, tuple[str, ...]]],
               top: int = 12) -> dict[str, Any]:
    total, stacks = _parse_raw(path)
    inclusive: dict[str, float] = {}
    for label, (file_part, funcs) in parts.items():
        hit = sum(n for frames, n in stacks
                  if any(_frame_matches(fr, file_part, funcs) for fr in frames))
        inclusive[label] = round(100 * hit / total, 1) if total else 0.0
    leaf: Counter[str] = Counter()
    for frames, n in stacks:
        leaf[frames[-1].replace(str(REPO) + "/", "")] += n
    return {"busy_samples": total, "inclusive_pct": inclusive,
            "top_self_pct": [(f, round(100 * n / total, 1)) for f, n in leaf.most_common(top)]}


def _pyspy(pyspy: str, socket_path: str, daemon_pid: int, threads: int, seconds: float,
           rate: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="spawnd-bench-spy-")
    cfg = {"mode": "load", "socket": socket_path, "threads": threads, "seconds": seconds + 1.0}
    out = os.path.join(tmp, "load.json")
    load = subprocess.Popen([sys.executable, "-m", "bench", "--runner", MODULE,
                             json.dumps(cfg), out], env=python_env(), cwd=str(REPO))
    time.sleep(0.5)
    spies = {}
    for who, pid in (("daemon", daemon_pid), ("client", load.pid)):
        raw = os.path.join(tmp, f"{who}.txt")
        spies[who] = (raw, subprocess.Popen(
            [pyspy, "record", "--pid", str(pid), "--rate", str(rate), "--duration",
             str(int(seconds)), "--nonblocking", "--format", "raw", "-o", raw],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    res: dict[str, Any] = {"threads": threads, "seconds": int(seconds), "rate_hz": rate}
    for who, (raw, proc) in spies.items():
        _, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0 or not os.path.exists(raw):
            res[who] = {"error": err.decode(errors="replace")[-500:]}
            continue
        res[who] = _aggregate(raw, DAEMON_PARTS if who == "daemon" else CLIENT_PARTS)
        # busy share of one CPU: samples / (rate * seconds)
        res[who]["busy_pct_of_one_cpu"] = round(
            100 * res[who]["busy_samples"] / (rate * int(seconds)), 1)
    load.wait(timeout=seconds + 60)
    try:
        with open(out) as f:
            done = json.load(f)
        res["spawns_per_s"] = round(done["spawns"] / done["seconds"], 1)
    except (OSError, ValueError):
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------- orchestration

def run(*, quick: bool) -> dict[str, Any]:
    rounds, cpu_spawns, seconds = (20, 100, 2.0) if quick else (200, 1000, 6.0)
    out: dict[str, Any] = {}
    with Daemon(workdir(), name="profile").start() as d:
        log(f"  profile: latency decomposition, {rounds} rounds")
        out["decomposition"] = run_runner(MODULE, {"mode": "decompose", "socket": d.path,
                                                   "rounds": rounds,
                                                   "cpu_spawns": cpu_spawns}, timeout=600)
        pyspy = shutil.which("py-spy")
        if pyspy is None:
            out["pyspy"] = {"skipped": "py-spy not installed (pip install py-spy)"}
            log("  profile: NOTE: py-spy not installed, sampling skipped")
        else:
            out["pyspy"] = {}
            for threads in (1, 8):
                log(f"  profile: py-spy on daemon and client, {threads} client threads, "
                    f"{seconds:.0f}s")
                out["pyspy"][f"threads_{threads}"] = _pyspy(pyspy, d.path, d.pid, threads,
                                                            seconds, 1000)
    return out


def text(res: dict[str, Any]) -> str:
    from .report import table

    if "error" in res:
        return f"profile: ERROR {res['error']}"
    dec = res["decomposition"]
    lat = dec["latency"]
    labels = {"posix_spawn": "os.posix_spawn+wait, local", "ping": "ping round trip",
              "ping_hot": "ping, back to back", "ping_idle": "ping after 2 ms asleep",
              "ping_idle50": "ping after 50 ms asleep",
              "spawn_nopidfd": "Client.spawn, want_pidfd=False",
              "spawn_pidfd": "Client.spawn (pidfd passed back)",
              "spawn_stdio": "Client.spawn + stdio fds 0-2 passed",
              "popen": "spawnd Popen (stdio passed)"}
    base = lat["posix_spawn"]["median_us"]
    rows = [[labels[k], f"{v['median_us']:.0f}", f"{v['p90_us']:.0f}",
             f"{v['median_us'] - base:+.0f}"] for k, v in lat.items()]
    blocks = [table(["operation", "median us", "p90 us", "vs local"], rows,
                    "Profile: latency decomposition (small process, sequential)")]
    rows = [[labels.get(k, k), v["wall_us"], v["daemon_cpu_us"], v["client_cpu_us"]]
            for k, v in dec["cpu_per_op"].items()]
    blocks.append(table(["operation", "wall us", "daemon CPU us", "client CPU us"], rows,
                        f"CPU per operation (over {dec['cpu_spawns']} sequential operations)"))
    spy = res.get("pyspy", {})
    if "skipped" in spy:
        blocks.append(f"py-spy: {spy['skipped']}")
    for r in spy.values():
        if not isinstance(r, dict) or "threads" not in r:
            continue
        for who in ("daemon", "client"):
            a = r.get(who, {})
            if "error" in a:
                blocks.append(f"py-spy {who}: {a['error']}")
                continue
            rows = [[k, f"{v:.1f}"] for k, v in a["inclusive_pct"].items()]
            rows += [[f"self: {f}", f"{p:.1f}"] for f, p in a["top_self_pct"][:8]]
            blocks.append(table(
                ["where (share of busy samples)", "%"], rows,
                f"py-spy, {who}, {r['threads']} client thread(s), "
                f"{r.get('spawns_per_s', '?')} spawns/s: busy {a['busy_pct_of_one_cpu']}% of "
                f"one CPU"))
    return "\n\n".join(blocks)
