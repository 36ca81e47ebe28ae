"""Part 4: multiprocessing start methods: fork, forkserver, spawn, and spawnd cold and warm.

Measured in one small runner process, every context once per round in a fresh random order:

* ``Process``: start -> target running (the target stamps ``time.perf_counter_ns()``,
  CLOCK_MONOTONIC, which is system-wide on Linux, into a file) and start -> exit (join);
* ``Pool(1)``: creation -> first ``apply`` result;
* ``ProcessPoolExecutor(1)``: creation -> first ``submit().result()``.

The forkserver and spawnd's warm pool both preload this module, so neither pays for
importing the target. A warm start means an interpreter is waiting: before each spawnd-warm
measurement the runner leaves the pool ``warm_gap`` seconds (untimed) to refill.
``spawnd_client.mp`` is built separately; without it the spawnd rows are skipped, noted.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from .common import log, rounds_rng, run_runner, shuffled, summarize_ns

MODULE = "bench.mp"

#: context key -> label
CONTEXTS: dict[str, str] = {
    "fork": "fork",
    "forkserver": "forkserver",
    "spawn": "spawn",
    "spawnd_default": "spawnd (no options)",
    "spawnd_cold": "spawnd (cold)",
    "spawnd_warm": "spawnd (warm pool)",
}
MEASURES: dict[str, str] = {
    "process_running": "Process start -> target running",
    "first_running": "first Process start of the context -> target running",
    "process_exit": "Process start -> exit",
    "pool": "Pool(1) -> first result",
    "executor": "ProcessPoolExecutor(1) -> first result",
}


def _stamp(path: str) -> None:
    """The Process target: when did it start running?"""
    t = time.perf_counter_ns()
    with open(path, "w") as f:
        f.write(str(t))


def _square(x: int) -> int:
    return x * x


def _contexts(cfg: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    ctxs: dict[str, Any] = {k: mp.get_context(k) for k in ("fork", "forkserver", "spawn")}
    ctxs["forkserver"].set_forkserver_preload([MODULE])
    try:
        from spawnd_client import mp as smp

        common = {"socket": cfg["socket"], "autostart": False}
        ctxs["spawnd_default"] = smp.get_context(**common)  # no options: what users get
        ctxs["spawnd_cold"] = smp.get_context(warm=0, **common)
        ctxs["spawnd_warm"] = smp.get_context(warm=cfg["warm"], preload=[MODULE], **common)
    except Exception as e:  # a half-built start method must not stop the others
        notes.append(f"spawnd rows skipped: spawnd_client.mp.get_context failed: {e!r}")
        for k in ("spawnd_default", "spawnd_cold", "spawnd_warm"):
            ctxs.pop(k, None)
    return ctxs


def runner(cfg: dict[str, Any]) -> dict[str, Any]:
    notes: list[str] = []
    ctxs = _contexts(cfg, notes)
    clock = time.perf_counter_ns
    tmp = tempfile.mkdtemp(prefix="spawnd-bench-mp-")
    stamp = os.path.join(tmp, "stamp")

    def process(ctx: Any) -> tuple[int, int]:
        p = ctx.Process(target=_stamp, args=(stamp,))
        t0 = clock()
        p.start()
        p.join()
        t1 = clock()
        if p.exitcode != 0:
            raise RuntimeError(f"child exited {p.exitcode}")
        p.close()
        with open(stamp) as f:
            running = int(f.read())
        os.unlink(stamp)
        return running - t0, t1 - t0

    def pool(ctx: Any) -> int:
        t0 = clock()
        with ctx.Pool(1) as pl:
            if pl.apply(_square, (7,)) != 49:
                raise RuntimeError("wrong result")
            dt = clock() - t0
            pl.terminate()
        return dt

    def executor(ctx: Any) -> int:
        t0 = clock()
        with ProcessPoolExecutor(1, mp_context=ctx) as ex:
            if ex.submit(_square, 7).result() != 49:
                raise RuntimeError("wrong result")
            dt = clock() - t0
        return dt

    def before(key: str) -> None:
        if key == "spawnd_warm":
            time.sleep(cfg["warm_gap"])

    samples: dict[str, dict[str, list[int]]] = {m: {k: [] for k in ctxs} for m in MEASURES}
    errors: dict[str, str] = {}
    keys = list(ctxs)

    def measure(key: str, fn: Callable[[], None]) -> None:
        if key in errors:
            return
        before(key)
        try:
            fn()
        except Exception as e:
            errors[key] = repr(e)
            notes.append(f"{CONTEXTS[key]}: failed: {e!r}")

    for k in keys:  # warm-up: starts the forkserver and spawnd's pool (the first start)
        measure(k, lambda k=k: samples["first_running"][k].append(process(ctxs[k])[0]))
    rng = rounds_rng()
    for _ in range(cfg["rounds"]):
        for k in shuffled(keys, rng):
            def one(k: str = k) -> None:
                running, exited = process(ctxs[k])
                samples["process_running"][k].append(running)
                samples["process_exit"][k].append(exited)
            measure(k, one)
    for _ in range(cfg["pool_rounds"]):
        for k in shuffled(keys, rng):
            measure(k, lambda k=k: samples["pool"][k].append(pool(ctxs[k])))
            measure(k, lambda k=k: samples["executor"][k].append(executor(ctxs[k])))
    os.rmdir(tmp)
    return {
        "rounds": cfg["rounds"], "pool_rounds": cfg["pool_rounds"], "warm": cfg["warm"],
        "warm_gap_s": cfg["warm_gap"], "notes": notes, "errors": errors,
        "results": {m: {k: summarize_ns(v) for k, v in per.items() if v}
                    for m, per in samples.items()},
    }


def run(socket_path: str, *, quick: bool) -> dict[str, Any]:
    rounds, pool_rounds = (5, 2) if quick else (30, 8)
    cfg = {"socket": socket_path, "rounds": rounds, "pool_rounds": pool_rounds, "warm": 2,
           "warm_gap": 0.2}
    log(f"  mp: {rounds} Process rounds, {pool_rounds} Pool/Executor rounds")
    res = run_runner(MODULE, cfg, timeout=600, extra_env={"SPAWND_SOCKET": socket_path})
    for m, per in res["results"].items():
        log(f"    {MEASURES[m]:40} " + ", ".join(
            f"{CONTEXTS[k]} {v['median_us'] / 1000:.1f}ms" for k, v in per.items()))
    for note in res["notes"]:
        log(f"    note: {note}")
    res["contexts"] = CONTEXTS
    res["measures"] = MEASURES
    return res
