"""Part 5: what a spawn with credentials, capabilities or rlimits costs over the plain path.

Two daemons, one per exec helper (the C ``spawnd-exec`` and the Python fallback), measured in
the same interleaved rounds; each helper's ratio "all of the above" / "plain" comes from its
own daemon (target: <= 1.5x with the C helper).

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
    "cwd": 'cwd="/tmp" only (plain path: chdir action)',
}
HELPERS = ("c", "python")


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
        "cwd": {"cwd": "/tmp"},
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
    from spawnd.exec_helper import build

    helpers = list(HELPERS)
    if not build.ensure_built():
        helpers.remove("c")
        notes.append("no C compiler: only the Python exec helper is measured")
    log(f"  privileged: {rounds} rounds of {len(kwargs)} variants x helpers {helpers}")
    daemons = {h: Daemon(workdir(), name=f"privileged-{h}", policy=_policy(uid, gid))
               for h in helpers}
    try:
        clients = {}
        for h, d in daemons.items():
            d.start("--exec-helper", h)
            clients[h] = d.client()
        env = dict(CHILD_ENV)
        clock = time.perf_counter_ns

        def one(key: str) -> int:
            h, variant = key.split(":")
            t0 = clock()
            child = clients[h].spawn([TRUE], env=env, **kwargs[variant])
            rc = child.wait()
            dt = clock() - t0
            child.close()
            if rc != 0:
                raise RuntimeError(f"/bin/true exited {rc}")
            return dt

        for h in helpers:  # probe + warm-up
            for k in kwargs:
                key = f"{h}:{k}"
                try:
                    one(key)
                    samples[key] = []
                except Exception as e:
                    errors[key] = f"{type(e).__name__}: {e}"
        keys = list(samples)
        rng = rounds_rng()
        for _ in range(rounds):
            for k in shuffled(keys, rng):
                samples[k].append(one(k))
        log_tail = "".join(d.log_text() for d in daemons.values())
    finally:
        for d in daemons.values():
            d.stop()
    by_helper = {h: {k.split(":")[1]: summarize_ns(v) for k, v in samples.items()
                     if k.startswith(h + ":")} for h in helpers}
    ratios = {h: r["all"]["median_us"] / r["plain"]["median_us"]
              for h, r in by_helper.items() if "all" in r and "plain" in r}
    for h, r in ratios.items():
        log(f"    {h} helper: all-of-the-above / plain = {r:.2f}x")
    main = helpers[0]
    samples = {k.split(":")[1]: v for k, v in samples.items() if k.startswith(main + ":")}
    notes += [f"{k}: {e}" for k, e in errors.items() if not k.startswith(main + ":")]
    errors = {k.split(":")[1]: e for k, e in errors.items() if k.startswith(main + ":")}
    results = {k: summarize_ns(v) for k, v in samples.items()}
    for k, e in errors.items():
        log(f"    {VARIANTS.get(k, k):40} unavailable: {e}")
        notes.append(f"{VARIANTS.get(k, k)}: {e}")
    for k, v in results.items():
        log(f"    {VARIANTS[k]:40} median {v['median_us'] / 1000:.2f}ms  p90 "
            f"{v['p90_us'] / 1000:.2f}ms")
    out: dict[str, Any] = {"rounds": rounds, "variants": VARIANTS, "results": results,
                           "errors": errors, "notes": notes, "helper": main,
                           "by_helper": by_helper, "ratio_all_vs_plain": ratios}
    if errors and "Traceback" in log_tail:
        out["daemon_log_tail"] = log_tail[-1500:]
    if len(results) <= 1:
        out["skipped"] = "no privileged variant works yet: " + "; ".join(
            f"{k}: {e}" for k, e in errors.items())
    return out
