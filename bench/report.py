"""Tables, ratios, the issue's targets (PASS/MISS, informational) and the plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import ratio

# ---------------------------------------------------------------------------- text tables


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r]
                                            for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ms(us: float | None, digits: int = 2) -> str:
    return "-" if us is None else f"{us / 1000:.{digits}f}"


def x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def size_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"


# ---------------------------------------------------------------------------- lookups

def _config(lat: dict[str, Any], mib: int, threads: int) -> dict[str, Any] | None:
    for c in lat.get("configs", []):
        if c["mem_mib"] == mib and c["threads"] == threads:
            return c
    return None


def _median(cfg: dict[str, Any] | None, key: str) -> float | None:
    if cfg is None or key not in cfg["methods"]:
        return None
    return cfg["methods"][key]["median_us"]


# ---------------------------------------------------------------------------- per part

def latency_tables(lat: dict[str, Any]) -> str:
    out = []
    sizes = lat["sizes_mib"]
    for threads in lat["threads"]:
        rows = []
        for key, label in {**lat["methods"], **lat["references"]}.items():
            row: list[Any] = [label]
            for mib in sizes:
                c = _config(lat, mib, threads)
                if c is None or key not in c["methods"]:
                    row.append("-")
                    continue
                m = c["methods"][key]
                rel = ratio(m["median_us"], _median(c, "posix_spawn_small"))
                row.append(f"{ms(m['median_us'])} / {ms(m['p90_us'])}  {x(rel)}")
            rows.append(row)
        out.append(table(
            ["method"] + [size_label(s) for s in sizes], rows,
            f"Spawn-to-exit of /bin/true, parent with {threads} idle threads: median / p90 ms"
            f"  (Nx = median / os.posix_spawn from a small process, measured alongside)"))
    return "\n\n".join(out)


def throughput_table(tp: dict[str, Any]) -> str:
    m = tp["methods"]
    best_py = max((m[k]["best_per_s"] for k in m if k.startswith("py_")), default=None)
    best_c = max((m[k]["best_per_s"] for k in m if k.startswith("c_")), default=None)
    rows = [[tp["labels"][k], f"{v['best_per_s']:.0f}", f"{v['median_per_s']:.0f}",
             x(ratio(v["best_per_s"], best_py)), x(ratio(v["best_per_s"], best_c)),
             f"{v['cpu']['machine_busy_cpus']:.2f}", f"{v['cpu']['machine_cpu_us']:.0f}",
             f"{v['cpu']['daemon_cpu_us']:.0f}", f"{v['cpu']['runner_cpu_us']:.0f}"]
            for k, v in m.items()]
    return table(["method", "best/s", "median/s", "vs best py loop", "vs best C loop",
                  "busy CPUs", "CPU us/spawn", "daemon", "client"], rows,
                 f"Throughput, /bin/true, {tp['count']} spawns per measurement, {tp['rounds']} "
                 "rounds (best round; its CPU: whole machine, daemon, client/loop process)")


def memory_table(mem: dict[str, Any]) -> str:
    n = mem["children"]
    idle = mem["idle"]
    rows = [["daemon idle (fresh, after 5 spawns)", f"{idle['VmRSS'] / 1024:.1f}",
             f"{idle['RssAnon'] / 1024:.1f}", mem["idle_fds"]]]
    for i, c in enumerate(mem["cycles"], 1):
        rows.append([f"cycle {i}: {n} live children", f"{c['live']['VmRSS'] / 1024:.1f}",
                     f"{c['live']['RssAnon'] / 1024:.1f}", c["live_fds"]])
        rows.append([f"cycle {i}: after they exit", f"{c['after']['VmRSS'] / 1024:.1f}",
                     f"{c['after']['RssAnon'] / 1024:.1f}", c["after_fds"]])
    fs = mem["forkserver"]
    rows.append(["forkserver server idle", f"{fs['idle']['VmRSS'] / 1024:.1f}",
                 f"{fs['idle']['RssAnon'] / 1024:.1f}", ""])
    rows.append([f"forkserver server, {fs['children']} live children",
                 f"{fs['live']['VmRSS'] / 1024:.1f}", f"{fs['live']['RssAnon'] / 1024:.1f}", ""])
    rows.append(["one forkserver child (Python, sleeping)",
                 f"{fs['child_rss']['VmRSS'] / 1024:.1f}",
                 f"{fs['child_rss']['RssAnon'] / 1024:.1f}", ""])
    t = table(["process", "VmRSS MiB", "RssAnon MiB", "fds"], rows, "Memory")
    return (f"{t}\nper live child: daemon {mem['per_child_bytes'] / 1024:.2f} KiB "
            f"(anon {mem['per_child_anon_bytes'] / 1024:.2f} KiB), forkserver server "
            f"{mem['forkserver_per_child_bytes'] / 1024:.2f} KiB; daemon idle / forkserver idle"
            f" = {x(ratio(idle['VmRSS'], fs['idle']['VmRSS']))}")


def mp_table(res: dict[str, Any]) -> str:
    ctxs = res["contexts"]
    present = [k for k in ctxs if any(k in per for per in res["results"].values())]
    rows = []
    for m, label in res["measures"].items():
        per = res["results"].get(m, {})
        fs = per.get("forkserver", {}).get("median_us")
        rows.append([label] + [
            f"{ms(per[k]['median_us'])} {x(ratio(per[k]['median_us'], fs))}" if k in per else "-"
            for k in present])
    t = table(["measure (median ms, Nx = / forkserver)"] + [ctxs[k] for k in present], rows,
              "multiprocessing")
    notes = "".join(f"\nnote: {n}" for n in res.get("notes", []))
    return t + notes


def privileged_table(res: dict[str, Any]) -> str:
    if "results" not in res:
        return f"Privileged path: skipped: {res.get('skipped')}"
    plain = res["results"].get("plain", {}).get("median_us")
    rows = [[res["variants"][k], ms(v["median_us"]), ms(v["p90_us"]),
             x(ratio(v["median_us"], plain))] for k, v in res["results"].items()]
    rows += [[res["variants"][k], "unavailable", "", e[:70]] for k, e in res["errors"].items()]
    return table(["variant", "median ms", "p90 ms", "vs plain"], rows,
                 "Privileged path (Client.spawn /bin/true + wait)")


# ---------------------------------------------------------------------------- targets

def _target(name: str, value: float | None, op: str, limit: float, unit: str = "",
            detail: str = "", skip: str | None = None) -> dict[str, Any]:
    if skip is not None or value is None:
        status = "SKIP"
    elif op == "<=":
        status = "PASS" if value <= limit else "MISS"
    else:
        status = "PASS" if value >= limit else "MISS"
    return {"target": name, "value": value, "op": op, "limit": limit, "unit": unit,
            "status": status, "detail": skip or detail}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    lat = results.get("latency") or {}
    if lat.get("configs"):
        big = max(lat["sizes_mib"])
        threads = max(lat["threads"])
        c = _config(lat, big, threads)
        small = _config(lat, 0, 0)
        where = f"{size_label(big)}, {threads} threads"
        ref = _median(c, "posix_spawn_small")
        ref_0 = _median(small, "posix_spawn")
        for key, label in (("spawnd_client", "Client.spawn"), ("spawnd_popen", "Popen")):
            sd = _median(c, key)
            out.append(_target(
                f"latency from {where}: spawnd {label} / os.posix_spawn from a small process",
                ratio(sd, ref), "<=", 1.3, "x",
                f"{ms(sd)} ms vs {ms(ref)} ms measured alongside (vs the 0 MiB/0-thread "
                f"runner's os.posix_spawn {ms(ref_0)} ms: {x(ratio(sd, ref_0))})"))
        for key, label in (("spawnd_client", "Client.spawn"), ("spawnd_popen", "Popen")):
            fe, sd = _median(c, "fork_exec"), _median(c, key)
            out.append(_target(f"latency from {where}: fork+exec / spawnd {label}",
                               ratio(fe, sd), ">=", 10, "x", f"{ms(fe)} ms vs {ms(sd)} ms"))
    else:
        out.append(_target("latency targets", None, "<=", 1.3, skip="latency not measured"))
    tp = results.get("throughput") or {}
    if tp.get("methods"):
        m = tp["methods"]
        py = {k: v["best_per_s"] for k, v in m.items() if k.startswith("py_")}
        best = max(py, key=py.__getitem__)
        s8 = m["spawnd_t8"]["best_per_s"]
        out.append(_target("throughput: spawnd 8 client threads / best os.posix_spawn loop",
                           ratio(s8, py[best]), ">=", 0.70, "x",
                           f"{s8:.0f}/s vs {py[best]:.0f}/s ({tp['labels'][best]}); vs 8 in "
                           f"flight: {x(ratio(s8, py.get('py_w8')))}"))
    mem = results.get("memory") or {}
    if mem.get("idle"):
        idle = mem["idle"]["VmRSS"]
        out.append(_target("memory: daemon idle RSS", round(idle / 1024, 1), "<=", 30, "MiB"))
        out.append(_target(f"memory: per live child ({mem['children']} children)",
                           round(mem["per_child_bytes"] / 1024, 2), "<=", 8, "KiB"))
        d1 = mem["after_minus_idle_kib"]
        out.append(_target("memory: after the children exit, distance from idle (first cycle)",
                           round(abs(d1) / 1024, 2), "<=", 2, "MiB",
                           f"{d1 / 1024:+.2f} MiB; second cycle ends "
                           f"{mem['after2_minus_idle_kib'] / 1024:+.2f} MiB from idle"))
    mpres = results.get("mp") or {}
    per = (mpres.get("results") or {}).get("process_running", {})
    if "spawnd_warm" in per and "forkserver" in per:
        w, f = per["spawnd_warm"]["median_us"], per["forkserver"]["median_us"]
        out.append(_target("multiprocessing: spawnd warm start / forkserver (start->running)",
                           ratio(w, f), "<=", 0.5, "x", f"{ms(w)} ms vs {ms(f)} ms"))
    else:
        why = "; ".join(mpres.get("notes", [])) or mpres.get("error") or "not measured"
        out.append(_target("multiprocessing: spawnd warm start / forkserver", None, "<=", 0.5,
                           "x", skip=why))
    return out


def targets12(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's targets 1-7, each from ratios measured in the same interleaved rounds."""
    out: list[dict[str, Any]] = []
    lat = results.get("latency") or {}
    if lat.get("configs"):
        big_cfg = _config(lat, max(lat["sizes_mib"]), max(lat["threads"]))
        small_cfg = _config(lat, 0, 0)
        for where, c in (("small process", small_cfg),
                         (f"{size_label(max(lat['sizes_mib']))}, {max(lat['threads'])}-thread "
                          "parent", big_cfg)):
            sd, ps = _median(c, "spawnd_client_env"), _median(c, "posix_spawn_env")
            fl, fb = _median(c, "floor_spawn_env"), _median(c, "floor_spawn_bare")
            pp, ping = _median(c, "unix_pingpong"), _median(c, "spawnd_ping")
            iso = ("" if fl is None else
                   f"; same rounds: minimal trio daemon {ms(fl)} ms ({ratio(fl, ps)}x), bare "
                   f"{ms(fb)} ms ({ratio(fb, ps)}x); round trips: spawnd ping {ms(ping, 3)} "
                   f"ms, plain Unix socket {ms(pp, 3)} ms")
            out.append(_target(f"1. Client.spawn+wait, full env, fds 0-2 / os.posix_spawn+"
                               f"waitpid (same env), {where}", ratio(sd, ps), "<=", 1.3, "x",
                               f"{ms(sd)} ms vs {ms(ps)} ms{iso}"))
        for where, c in (("small process", small_cfg),
                         (f"{size_label(max(lat['sizes_mib']))}, {max(lat['threads'])}-thread "
                          "parent", big_cfg)):
            sd, sp = _median(c, "spawnd_popen_env"), _median(c, "subprocess_env")
            out.append(_target(f"2. spawnd Popen(argv).wait() / subprocess.Popen(argv).wait(), "
                               f"{where}", ratio(sd, sp), "<=", 1.15, "x",
                               f"{ms(sd)} ms vs {ms(sp)} ms"))
    else:
        out.append(_target("1./2. latency", None, "<=", 1.3, skip="latency not measured"))
    cost = results.get("cost") or {}
    if "plain" in cost:
        pl, fe = cost["plain"], cost["full_env_stdio"]
        fl = cost.get("floor") or {}

        def floor(key: str) -> str:
            """The same figure of the minimal trio daemon (bench/floor.py), same run."""
            if "bare" not in fl:
                return ""
            got = [f"{label} {fl[v][key]} ms" for v, label in
                   (("bare", "bare"), ("caller", "+ caller state"),
                    ("proto", "+ spawnd protocol, full env")) if v in fl]
            return "; floor (minimal trio daemon, same run): " + ", ".join(got)

        out.append(_target(f"3. daemon CPU per plain spawn ({cost['spawns']} spawns)",
                           pl["daemon_cpu_ms"], "<=", 0.2, " ms",
                           f"full env + fds 0-2: {fe['daemon_cpu_ms']} ms"
                           + floor("daemon_cpu_ms")))
        out.append(_target(f"3. client CPU per Client.spawn ({cost['spawns']} spawns)",
                           pl["client_cpu_ms"], "<=", 0.1, " ms",
                           f"full env + fds 0-2: {fe['client_cpu_ms']} ms"
                           + floor("client_cpu_ms")))
        if "bare" in fl:
            out.append(_target("   (floor) minimal trio daemon spawn+wait, full env / local "
                               "os.posix_spawn+waitpid, same process, same run",
                               ratio(fl["bare"]["wall_ms"], fl.get("local_posix_spawn_ms")),
                               "<=", 1.3, "x", floor("wall_ms").removeprefix("; ")))
    else:
        out.append(_target("3. CPU per spawn", None, "<=", 0.2, " ms", skip="not measured"))
    tp = results.get("throughput") or {}
    if tp.get("methods"):
        m = tp["methods"]
        ref = m.get("py_w1") or {}
        py1 = ref.get("best_per_s")
        s8 = m["spawnd_t8"]["best_per_s"]
        out.append(_target("4. throughput, 8 client threads / one-process os.posix_spawn loop",
                           ratio(s8, py1), ">=", 0.7, "x",
                           f"{s8:.0f}/s vs {py1 or 0:.0f}/s (1 in flight); vs the best loop: "
                           + x(ratio(s8, max(v["best_per_s"] for k, v in m.items()
                                             if k.startswith("py_"))))))
    mpres = (results.get("mp") or {}).get("results") or {}
    per = mpres.get("process_running", {})
    if "spawnd_default" in per and "forkserver" in per:
        d, f = per["spawnd_default"]["median_us"], per["forkserver"]["median_us"]
        out.append(_target("5. mp with no options, start->target running / forkserver",
                           ratio(d, f), "<=", 0.5, "x", f"{ms(d)} ms vs {ms(f)} ms"))
        if "fork" in per:
            fk = per["fork"]["median_us"]
            out.append(_target("5. (moonshot) mp with no options / fork", ratio(d, fk), "<=",
                               1.0, "x", f"{ms(d)} ms vs {ms(fk)} ms"))
        first = mpres.get("first_running", {})
        if "spawnd_default" in first and "spawnd_cold" in per:
            fd, cold = first["spawnd_default"]["median_us"], per["spawnd_cold"]["median_us"]
            out.append(_target("5. first start with no options / a cold start", ratio(fd, cold),
                               "<=", 1.0, "x", f"{ms(fd)} ms vs {ms(cold)} ms (one sample)"))
    else:
        out.append(_target("5. mp with no options", None, "<=", 0.5, "x", skip="not measured"))
    imp = cost.get("imports") or {}
    if "subprocess" in imp:
        base = imp["subprocess"]["median_ms"]
        for mod in ("spawnd_client", "spawnd_client.mp"):
            v = imp.get(mod, {}).get("median_ms")
            out.append(_target(f"6. import {mod} / import subprocess (fresh interpreters)",
                               ratio(v, base), "<=", 2.0, "x", f"{v} ms vs {base} ms"))
    mem = results.get("memory") or {}
    if mem.get("idle"):
        out.append(_target("7. daemon idle RSS", round(mem["idle"]["VmRSS"] / 1024, 1), "<=", 30,
                           " MiB"))
        out.append(_target(f"7. per live child ({mem['children']} children)",
                           round(mem["per_child_bytes"] / 1024, 2), "<=", 2, " KiB"))
        d1 = mem["after_minus_idle_kib"]
        out.append(_target("7. after the children exit, distance from idle",
                           round(abs(d1) / 1024, 2), "<=", 2, " MiB", f"{d1 / 1024:+.2f} MiB"))
    return out


def targets_table(ts: list[dict[str, Any]], issue: int = 7) -> str:
    lines = [f"Targets from issue {issue} (informational: a MISS never fails the run)"]
    for t in ts:
        value = "-" if t["value"] is None else f"{t['value']}{t['unit']}"
        lines.append(f"  {t['status']:4}  {t['target']}: {value} (goal {t['op']} "
                     f"{t['limit']}{t['unit']})")
        if t["detail"]:
            lines.append(f"        {t['detail']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot

def plot(lat: dict[str, Any], path: Path) -> str | None:
    """Latency against parent size, one line per method; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = lat["sizes_mib"]
    xs = list(range(len(sizes)))
    fig, axes = plt.subplots(1, len(lat["threads"]), figsize=(13, 6.5), sharey=True)
    if len(lat["threads"]) == 1:
        axes = [axes]
    lines = {**lat["methods"], "posix_spawn_small": "os.posix_spawn from a small process"}
    styles = {"spawnd_popen": dict(lw=2.6), "spawnd_client": dict(lw=2.6),
              "posix_spawn_small": dict(ls=":", color="black")}
    handles = []
    for ax, threads in zip(axes, lat["threads"], strict=True):
        for i, (key, label) in enumerate(lines.items()):
            med, up = [], []
            for mib in sizes:
                c = _config(lat, mib, threads)
                m = None if c is None else c["methods"].get(key)
                med.append(float("nan") if m is None else m["median_us"] / 1000)
                up.append(0.0 if m is None else max(m["p90_us"] - m["median_us"], 0) / 1000)
            # a small sideways offset per method keeps the p90 whiskers apart
            xo = [v + (i - len(lines) / 2) * 0.012 * max(len(xs) - 1, 1) for v in xs]
            h = ax.errorbar(xo, med, yerr=[[0.0] * len(up), up], marker="o", ms=5,
                            capsize=2, elinewidth=0.8, label=label, **styles.get(key, {}))
            if ax is axes[0]:
                handles.append(h)
        ax.set_yscale("log")
        ax.set_xticks(xs, [size_label(s) for s in sizes])
        ax.set_xlabel("parent's touched memory (4 KiB pages)")
        ax.set_title(f"{threads} idle threads in the parent")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("spawn-to-exit of /bin/true, ms (median; whisker to p90)")
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle("Process creation vs parent size (after Baumann et al., \"A fork() in the "
                 "road\", Fig. 1) — spawnd alongside")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------- markdown

def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join("" if c is None else str(c).replace("|", "\\|") for c in r) + " |"
            for r in rows]
    return "\n".join(out)


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown (docs/benchmarks.md embeds this between its markers)."""
    meta = results["meta"]
    m = meta["machine"]
    parts = [f"Measured {meta['started']} ({'quick' if meta['quick'] else 'full'} run, "
             f"{meta['elapsed_s']:.0f} s): Python {m.get('python')}, Linux {m.get('kernel')}, "
             f"{m.get('cpus')} CPUs ({m.get('cpu')}), {m.get('libc')}, "
             f"{(m.get('mem_total_kib') or 0) / 2**20:.0f} GiB RAM, THP `{m.get('transparent_hugepage')}`;"
             f" CPUs busy with other work before/after: "
             f"{meta.get('background_busy_cpus_at_start')}/"
             f"{meta.get('background_busy_cpus_at_end')}; before each part: "
             + ", ".join(f"{p} {results[p].get('background_busy_cpus_before')}"
                         for p in meta["parts"] if p in results) + "."]
    parts.append("### Targets\n\n" + md_table(
        ["", "target", "measured", "goal", "detail"],
        [[f"**{t['status']}**", t["target"],
          "-" if t["value"] is None else f"{t['value']}{t['unit']}",
          f"{t['op']} {t['limit']}{t['unit']}", t["detail"]] for t in results["targets"]]))
    parts.append("### Targets of issue 12\n\n" + md_table(
        ["", "target", "measured", "goal", "detail"],
        [[f"**{t['status']}**", t["target"],
          "-" if t["value"] is None else f"{t['value']}{t['unit']}",
          f"{t['op']} {t['limit']}{t['unit']}", t["detail"]]
         for t in results.get("targets12", [])]))
    lat = results.get("latency", {})
    if "configs" in lat:
        for threads in lat["threads"]:
            rows = []
            for key, label in {**lat["methods"], **lat["references"]}.items():
                row: list[Any] = [label]
                for mib in lat["sizes_mib"]:
                    c = _config(lat, mib, threads)
                    if c is None or key not in c["methods"]:
                        row.append("-")
                        continue
                    v = c["methods"][key]
                    rel = ratio(v["median_us"], _median(c, "posix_spawn_small"))
                    row.append(f"{ms(v['median_us'])} / {ms(v['p90_us'])} ({x(rel)})")
                rows.append(row)
            parts.append(
                f"### 1. Spawn-to-exit latency, parent with {threads} idle threads\n\n"
                "median / p90 in ms (Nx = median / `os.posix_spawn` from a small process, "
                "measured alongside in the same rounds)\n\n"
                + md_table(["method"] + [size_label(s) for s in lat["sizes_mib"]], rows))
    tp = results.get("throughput", {})
    if "methods" in tp:
        mm = tp["methods"]
        best_py = max(v["best_per_s"] for k, v in mm.items() if k.startswith("py_"))
        best_c = max((v["best_per_s"] for k, v in mm.items() if k.startswith("c_")),
                     default=None)
        rows = [[tp["labels"][k], f"{v['best_per_s']:.0f}", f"{v['median_per_s']:.0f}",
                 x(ratio(v["best_per_s"], best_py)), x(ratio(v["best_per_s"], best_c)),
                 v["cpu"].get("machine_busy_cpus"), f"{v['cpu'].get('machine_cpu_us', 0):.0f}",
                 f"{v['cpu'].get('daemon_cpu_us', 0):.0f}",
                 f"{v['cpu'].get('runner_cpu_us', 0):.0f}"] for k, v in mm.items()]
        parts.append(f"### 2. Throughput (/bin/true, {tp['count']} spawns a measurement, "
                     f"best of {tp['rounds']} rounds; CPU figures from that round)\n\n"
                     + md_table(
                         ["method", "best spawns/s", "median", "vs best py loop",
                          "vs best C loop", "busy CPUs", "machine CPU us/spawn",
                          "daemon CPU us/spawn", "client CPU us/spawn"], rows))
    mem = results.get("memory", {})
    if "idle" in mem:
        parts.append("### 3. Memory\n\n```\n" + memory_table(mem) + "\n```")
    mpres = results.get("mp", {})
    if "results" in mpres:
        parts.append("### 4. multiprocessing\n\n```\n" + mp_table(mpres) + "\n```")
    pr = results.get("privileged", {})
    parts.append("### 5. Privileged path\n\n```\n" + privileged_table(pr) + "\n```")
    if "profile" in results and "error" not in results["profile"]:
        from .profile import text

        parts.append("### Profile\n\n```\n" + text(results["profile"]) + "\n```")
    return "\n\n".join(parts) + "\n"


def embed(doc: Path, results: dict[str, Any]) -> bool:
    """Replace the text between the results markers of ``doc``; False if it has none."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = doc.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{markdown(results)}{end}{tail}")
    return True
