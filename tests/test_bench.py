"""Smoke test of the benchmark suite: ``python -m bench --quick`` runs every part end to end.

It asserts nothing about speed (shared CI machines drift), only that the run exits 0 and
writes the JSON with every section present: measured, or skipped with a reason (a part
whose module is not built yet), never errored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("latency", "throughput", "memory", "mp", "cost", "privileged")


def test_quick_benchmark_runs_every_part(tmp_path: Path) -> None:
    env = os.environ.copy()
    env.pop("SPAWND_SOCKET", None)
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                       cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["quick"] is True
    for section in SECTIONS:
        assert section in results, section
        assert "error" not in results[section], (section, results[section]["error"])
    lat = results["latency"]
    assert {c["mem_mib"] for c in lat["configs"]} == {0, 256}
    assert {c["threads"] for c in lat["configs"]} == {0, 64}
    for c in lat["configs"]:
        assert set(lat["methods"]) <= set(c["methods"]), c["methods"].keys()
    assert {"spawnd_t1", "spawnd_t8", "spawnd_t32", "py_w32"} <= set(
        results["throughput"]["methods"])
    assert results["memory"]["cycles"][0]["live_fds"] > results["memory"]["idle_fds"]
    assert {"fork", "forkserver", "spawn"} <= set(results["mp"]["results"]["process_running"])
    assert "results" in results["privileged"] or "skipped" in results["privileged"]
    assert results["targets"] and all(t["status"] in ("PASS", "MISS", "SKIP")
                                      for t in results["targets"])
    assert "plot" in results
    if not str(results["plot"]).startswith("skipped"):
        assert Path(results["plot"]).stat().st_size > 10_000
    assert "Targets from issue 7" in p.stdout
    assert "Targets from issue 12" in p.stdout
    assert results["targets12"] and all(t["status"] in ("PASS", "MISS", "SKIP")
                                        for t in results["targets12"])
