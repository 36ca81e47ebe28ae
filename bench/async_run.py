"""``python -m bench.async_run [--n 1000] [--rounds 5] [--json FILE]``: the async faces.

N concurrent short ``run_process`` calls (``/bin/true``, stdout and stderr captured, one
task each, all started at once) on one event loop, timed from the first start to the last
exit: spawnd's faces against the library each mirrors, on the same loop kind:

* asyncio: ``spawnd_client.aio.run_process`` vs ``anyio.run_process``, and
  ``spawnd_client.asyncio.create_subprocess_exec`` + ``communicate`` vs the stdlib's;
* trio: ``spawnd_client.aio.run_process`` vs ``anyio.run_process`` and ``trio.run_process``.

Rounds are interleaved in a shuffled order; the median of each is reported with the
ratio spawnd / local (below 1: spawnd is faster). Target: every ratio <= 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anyio

from . import common

CMD = [common.TRUE]
ENV = common.CHILD_ENV


# ---------------------------------------------------------------- one call of each kind

async def spawnd_anyio() -> None:
    from spawnd_client import aio

    await aio.run_process(CMD, env=ENV)


async def local_anyio() -> None:
    await anyio.run_process(CMD, env=ENV)


async def spawnd_asyncio() -> None:
    from spawnd_client import asyncio as sa

    p = await sa.create_subprocess_exec(*CMD, env=ENV, stdout=sa.PIPE, stderr=sa.PIPE)
    await p.communicate()
    assert p.returncode == 0


async def local_asyncio() -> None:
    p = await asyncio.create_subprocess_exec(*CMD, env=ENV, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)
    await p.communicate()
    assert p.returncode == 0


async def local_trio() -> None:
    import trio

    await trio.run_process(CMD, env=ENV, capture_stdout=True, capture_stderr=True)


VARIANTS: dict[str, tuple[str, Callable[[], Awaitable[None]]]] = {
    "asyncio: spawnd aio.run_process": ("asyncio", spawnd_anyio),
    "asyncio: anyio.run_process": ("asyncio", local_anyio),
    "asyncio: spawnd create_subprocess_exec": ("asyncio", spawnd_asyncio),
    "asyncio: asyncio.create_subprocess_exec": ("asyncio", local_asyncio),
    "trio: spawnd aio.run_process": ("trio", spawnd_anyio),
    "trio: anyio.run_process": ("trio", local_anyio),
    "trio: trio.run_process": ("trio", local_trio),
}
PAIRS = [("asyncio: spawnd aio.run_process", "asyncio: anyio.run_process"),
         ("asyncio: spawnd create_subprocess_exec", "asyncio: asyncio.create_subprocess_exec"),
         ("trio: spawnd aio.run_process", "trio: anyio.run_process"),
         ("trio: spawnd aio.run_process", "trio: trio.run_process")]


def measure(name: str, n: int) -> float:
    """Seconds for ``n`` concurrent calls on a fresh loop (its connection opened first)."""
    backend, one = VARIANTS[name]

    async def main() -> float:
        await one()  # warm: the shared connection, the imports, the child watcher
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
        return time.perf_counter() - t0

    return anyio.run(main, backend=backend)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.async_run", description=__doc__)
    p.add_argument("--n", type=int, default=1000, help="concurrent calls per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 16384) if hard != resource.RLIM_INFINITY else 16384
    if soft < want:  # n children in flight: up to 5 fds each here, pidfds in the daemon
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    load = common.background_load()
    rng = common.rounds_rng()
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    with common.Daemon(common.workdir()).start() as d:
        os.environ["SPAWND_SOCKET"] = d.path
        os.environ["SPAWND_AUTOSTART"] = "0"
        for r in range(args.rounds):
            for name in common.shuffled(list(VARIANTS), rng):
                times[name].append(measure(name, args.n))
            common.log(f"round {r + 1}/{args.rounds} done")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.n} concurrent short run_process calls, median of {args.rounds} rounds "
          f"(background load before start: {load:.2f} busy CPUs of {os.cpu_count()})")
    for name, t in med.items():
        print(f"  {name:42s} {t * 1000:8.1f} ms  ({args.n / t:7.0f} /s)")
    ratios: dict[str, float] = {}
    print("ratio spawnd / local (target <= 1):")
    for ours, local in PAIRS:
        ratios[f"{ours} / {local}"] = r = med[ours] / med[local]
        print(f"  {ours:42s} / {local:42s} {r:5.2f}  {'ok' if r <= 1 else 'SLOWER'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "rounds": args.rounds, "load": load, "times_s": times,
                       "median_s": med, "ratios": ratios, "python": sys.version}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
