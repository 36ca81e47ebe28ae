"""Part 5: what a spawn with credentials, capabilities or rlimits costs over the plain path.

A daemon of its own runs with a policy that grants the benchmark's uid what the variants
ask for (as root: run as ``nobody``, ``CAP_NET_BIND_SERVICE``, NOFILE). Every variant is a
``Client.spawn`` of /bin/true then wait, once per round in a fresh random order. A variant the
daemon refuses or cannot do yet is reported with its error instead of a time.
The privileged path (``spawnd/privileged.py``) is built separately: without it the part is
skipped with a note.
"""

from __future__ import annotations

import os
import pwd
import time
from typing import Any

from .common import (
    CHILD_ENV,
    TRUE,
    Daemon,
    log,
    rounds_rng,
    shuffled,
    summarize_ns,
    workdir,
)

#: key -> label
VARIANTS: dict[str, str] = {
    "plain": "plain (no trampoline)",
    "user": "user=nobody, group=its gid",
    "capabilities": 'capabilities=["CAP_NET_BIND_SERVICE"]',
    "rlimits": 'rlimits={"NOFILE": (256, 256)}',
    "no_new_privs": "no_new_privs=True",
    "all": "all of the above",
}


def _nobody() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _policy(uid: int, gid: int) -> str:
    me = pwd.getpwuid(os.geteuid()).pw_name
    return f"""version = 1
[[allow]]
name = "bench"
users = ["{me}"]
executables = ["/"]
run_as_uids = [{uid}]
run_as_gids = [{gid}]
capabilities = ["CAP_NET_BIND_SERVICE"]
rlimits = ["NOFILE"]
"""


def _kwargs(uid: int, gid: int) -> dict[str, dict[str, Any]]:
    caps = {"capabilities": ["CAP_NET_BIND_SERVICE"]}
    lim = {"rlimits": {"NOFILE": (256, 256)}}
    return {
        "plain": {}, "user": {"user": uid, "group": gid}, "capabilities": caps,
        "rlimits": lim, "no_new_privs": {"no_new_privs": True},
        "all": {"user": uid, "group": gid, **caps, **lim, "no_new_privs": True},
    }


def run(*, quick: bool) -> dict[str, Any]:
    rounds = 5 if quick else 30
    uid, gid = _nobody()
    notes: list[str] = []
    if os.geteuid() != 0:
        notes.append("not root: the user and capability variants need a root daemon")
    kwargs = _kwargs(uid, gid)
    errors: dict[str, str] = {}
    samples: dict[str, list[int]] = {}
    log(f"  privileged: {rounds} rounds of {len(kwargs)} variants")
    with Daemon(workdir(), name="privileged", policy=_policy(uid, gid)).start() as d:
        c = d.client()
        env = dict(CHILD_ENV)
        clock = time.perf_counter_ns

        def one(key: str) -> int:
            t0 = clock()
            child = c.spawn([TRUE], env=env, **kwargs[key])
            rc = child.wait()
            dt = clock() - t0
            child.close()
            if rc != 0:
                raise RuntimeError(f"/bin/true exited {rc}")
            return dt

        for k in kwargs:  # probe + warm-up
            try:
                one(k)
                samples[k] = []
            except Exception as e:
                errors[k] = f"{type(e).__name__}: {e}"
        keys = list(samples)
        rng = rounds_rng()
        for _ in range(rounds):
            for k in shuffled(keys, rng):
                samples[k].append(one(k))
        log_tail = d.log_text()
    results = {k: summarize_ns(v) for k, v in samples.items()}
    for k, e in errors.items():
        log(f"    {VARIANTS[k]:40} unavailable: {e}")
        notes.append(f"{VARIANTS[k]}: {e}")
    for k, v in results.items():
        log(f"    {VARIANTS[k]:40} median {v['median_us'] / 1000:.2f}ms  p90 "
            f"{v['p90_us'] / 1000:.2f}ms")
    out: dict[str, Any] = {"rounds": rounds, "variants": VARIANTS, "results": results,
                           "errors": errors, "notes": notes}
    if errors and "Traceback" in log_tail:
        out["daemon_log_tail"] = log_tail[-1500:]
    if len(results) <= 1:
        out["skipped"] = "no privileged variant works yet: " + "; ".join(
            f"{k}: {e}" for k, e in errors.items())
    return out
