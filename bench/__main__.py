"""``python -m bench [--quick] [--out DIR] [--parts ...] [--profile] [--docs]``.

Starts one spawnd daemon of its own on a temporary socket (parts 3 and 5 start their own,
fresh ones), runs every part, prints the tables, the ratios and the targets, and writes
``results.json`` and ``latency.png`` to ``--out`` (default ``bench/results/``).

Internal entry points (used by the parts): ``--runner MODULE CONFIG OUT`` and ``--sidecar``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PARTS = ("latency", "throughput", "memory", "mp", "cost", "privileged")


def _raise_nofile() -> None:
    """1,000 live children mean 1,000 pidfds in the daemon (which inherits this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> int:
    from . import common, report

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke mode: 0 and 256 MiB parents, few iterations (< 2 min)")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="output directory")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--profile", action="store_true",
                   help="also profile the daemon and client hot path (cProfile, py-spy)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each part, wait up to this long for the machine to be idle "
                   "(< 0.25 busy CPUs over a second)")
    p.add_argument("--docs", action="store_true",
                   help="copy the PNG and JSON to docs/bench.png, docs/bench-results.json and "
                   "embed the tables in docs/benchmarks.md (between its results markers)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    for part in parts:
        if part not in PARTS:
            p.error(f"unknown part {part!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    _raise_nofile()

    load = _wait_quiet(args.wait_quiet)
    started = time.time()
    results: dict[str, Any] = {"meta": {
        "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": common.machine_info(), "parts": parts,
        "background_busy_cpus_at_start": load, "loadavg_at_start": os.getloadavg()}}
    failed: list[str] = []
    daemon = common.Daemon(common.workdir(), name="bench")
    if {"latency", "throughput", "mp", "cost"} & set(parts):
        daemon.start()
        results["meta"]["daemon_pid"] = daemon.pid
        common.log(f"bench daemon {daemon.pid} on {daemon.path}")
    try:
        for i, part in enumerate(parts):
            common.log(f"[{part}]")
            before = load if i == 0 else _wait_quiet(args.wait_quiet)
            t0 = time.monotonic()
            try:
                results[part] = _run_part(part, daemon.path, args.quick)
            except Exception as e:
                traceback.print_exc()
                results[part] = {"error": f"{type(e).__name__}: {e}"}
                failed.append(part)
            results[part]["elapsed_s"] = round(time.monotonic() - t0, 1)
            results[part]["background_busy_cpus_before"] = before
        if args.profile:
            from . import profile

            common.log("[profile]")
            try:
                results["profile"] = profile.run(quick=args.quick)
            except Exception as e:
                traceback.print_exc()
                results["profile"] = {"error": f"{type(e).__name__}: {e}"}
                failed.append("profile")
    finally:
        daemon.stop()

    results["targets"] = report.targets(results)
    results["targets12"] = report.targets12(results)
    png = args.out / "latency.png"
    if "latency" in results and "configs" in results["latency"]:
        drawn = report.plot(results["latency"], png)
        results["plot"] = drawn or "skipped: matplotlib is not installed (pip install '.[bench]')"
    results["meta"]["elapsed_s"] = round(time.time() - started, 1)
    results["meta"]["background_busy_cpus_at_end"] = common.background_load()
    out_json = args.out / "results.json"
    out_json.write_text(json.dumps(results, indent=1) + "\n")

    print(_text(results))
    print(f"\nJSON: {out_json}")
    if isinstance(results.get("plot"), str):
        print(f"plot: {results['plot']}")
    print(f"total {results['meta']['elapsed_s']:.0f} s")
    if args.docs:
        docs = common.REPO / "docs"
        shutil.copyfile(out_json, docs / "bench-results.json")
        if png.exists():
            shutil.copyfile(png, docs / "bench.png")
        print(f"copied to {docs}/bench-results.json and bench.png")
        if report.embed(docs / "benchmarks.md", results):
            print(f"results embedded in {docs}/benchmarks.md")
    if failed:
        print(f"FAILED parts: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _wait_quiet(patience: float) -> float:
    """Busy CPUs (others' work) now; with ``patience``, wait up to that long for quiet."""
    from . import common

    load = common.background_load()
    deadline = time.monotonic() + patience
    while load >= 0.25 and time.monotonic() < deadline:
        common.log(f"machine busy ({load} CPUs in use by others): waiting")
        time.sleep(4)
        load = common.background_load()
    if load >= 0.25:
        common.log(f"WARNING: {load} CPUs are busy with other work: absolute times will be "
                   "inflated (ratios less so)")
    return load


def _run_part(part: str, socket_path: str, quick: bool) -> dict[str, Any]:
    if part == "latency":
        from . import latency

        return latency.run(socket_path, quick=quick)
    if part == "throughput":
        from . import throughput

        return throughput.run(socket_path, quick=quick)
    if part == "memory":
        from . import memory

        return memory.run(quick=quick)
    if part == "mp":
        from . import mp

        return mp.run(socket_path, quick=quick)
    if part == "cost":
        from . import cost

        return cost.run(socket_path, quick=quick)
    from . import privileged

    return privileged.run(quick=quick)


def _text(results: dict[str, Any]) -> str:
    from . import report

    blocks = []
    m = results["meta"]["machine"]
    blocks.append(f"spawnd benchmarks ({'quick' if results['meta']['quick'] else 'full'} run): "
                  f"Python {m.get('python')}, Linux {m.get('kernel')}, {m.get('cpus')} CPUs "
                  f"({m.get('cpu')}), {m.get('libc')}; busy CPUs before/after the run "
                  f"(others' work): {results['meta']['background_busy_cpus_at_start']}"
                  f"/{results['meta'].get('background_busy_cpus_at_end')}; before each part: "
                  + ", ".join(f"{p} {results[p].get('background_busy_cpus_before')}"
                              for p in results["meta"]["parts"] if p in results))
    render = {"latency": report.latency_tables, "throughput": report.throughput_table,
              "memory": report.memory_table, "mp": report.mp_table,
              "privileged": report.privileged_table}
    for part, fn in render.items():
        res = results.get(part)
        if res is None:
            continue
        if "error" in res:
            blocks.append(f"{part}: ERROR {res['error']}")
        elif "skipped" in res and part != "privileged":
            blocks.append(f"{part}: skipped: {res['skipped']}")
        else:
            blocks.append(fn(res))
    if "profile" in results:
        from . import profile

        blocks.append(profile.text(results["profile"]))
    blocks.append(report.targets_table(results["targets"]))
    blocks.append(report.targets_table(results["targets12"], issue=12))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--runner"]:
        from bench.common import runner_main

        sys.exit(runner_main(sys.argv[2:]))
    if sys.argv[1:] == ["--sidecar"]:
        from bench.latency import sidecar

        sidecar()
        sys.exit(0)
    sys.exit(main())
