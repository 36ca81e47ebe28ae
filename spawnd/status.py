"""``spawnd status``: what the daemon is doing, as the asking uid may see it (pure, no I/O).

The server keeps one :class:`Stats` (counters and, per live child, when it started and its
``argv[0]``, in a side map keyed by pid so the child table stays as it is) and answers a
``Status`` request with :func:`build_report`. Root sees everything; any other uid sees its
own connections, children, warm pools and counters only, so one user learns nothing about
another's processes.
"""

from __future__ import annotations

import errno as _errno
import os
import time
from typing import Any

#: Children listed in one report (the reply must fit one frame's string limit); the
#: counts are always complete.
MAX_LISTED = 2000


def version() -> str:
    """The installed distribution's version; in a bare checkout, pyproject.toml's."""
    from importlib import metadata  # here: ~6 ms and ~1 MiB the daemon never needs otherwise
    from pathlib import Path

    try:
        return metadata.version("spawnd")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


class Stats:
    """Counters per peer uid and start facts per live child; updated by the server."""

    def __init__(self) -> None:
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.spawns: dict[int, int] = {}
        self.refusals: dict[int, dict[str, int]] = {}  # uid -> errno name -> count
        self._facts: dict[int, tuple[object, float, bytes | str, bool]] = {}  # pid -> (child, t, argv0, warm)

    def note_spawn(self, table: Any, child: Any, argv0: bytes | str, warm: bool = False) -> None:
        """A child was added to the table for ``child.uid``."""
        self.spawns[child.uid] = self.spawns.get(child.uid, 0) + 1
        if len(self._facts) > 2 * len(table) + 64:  # drop facts of reaped children
            self._facts = {pid: f for pid, f in self._facts.items() if table.get(pid) is f[0]}
        self._facts[child.pid] = (child, time.monotonic(), argv0, warm)  # decoded when shown

    def note_error(self, uid: int, errno: int) -> None:
        """A request from ``uid`` was answered with an error."""
        name = _errno.errorcode.get(errno, str(errno))
        per = self.refusals.setdefault(uid, {})
        per[name] = per.get(name, 0) + 1

    def facts(self, table: Any, child: Any) -> tuple[float | None, str | None, bool]:
        f = self._facts.get(child.pid)
        if f is None or f[0] is not child:
            return None, None, False
        name = f[2].decode(errors="replace") if isinstance(f[2], bytes) else f[2]
        return time.monotonic() - f[1], name, f[3]


def _pools(server: Any, uid: int | None) -> list[dict[str, Any]]:
    out = []
    for key, entry in list(server.pool._entries.items()):
        owner = key[0]  # pool.Key starts with the uid
        if uid is not None and owner != uid:
            continue
        argv = [a.decode(errors="replace") for a in entry.spec.argv[:3]]
        out.append({"uid": owner, "argv": argv, "size": entry.size, "idle": len(entry.idle)})
    return out


def build_report(server: Any, stats: Stats, asker: Any, asking_conn: object) -> dict[str, Any]:
    """The status as ``asker`` (a Peer) may see it; ``asking_conn`` is left out of the counts."""
    from . import privileged  # here: `spawnd status` runs from the client library without it

    root = asker.uid == 0
    only = None if root else asker.uid
    table = server.children
    now = time.monotonic()
    conns = [c for c in list(server.connections) if c is not asking_conn]
    visible = [c for c in conns if root or (c.peer is not None and c.peer.uid == asker.uid)]
    visible.append(asking_conn)  # listed (its children too), flagged, never counted
    by_owner: dict[int, list[dict[str, Any]]] = {id(c): [] for c in visible}
    detached: list[dict[str, Any]] = []
    children = [ch for ch in table if root or ch.uid == asker.uid]
    listed = 0
    warm_busy: dict[int, int] = {}
    for ch in children:
        age, argv0, warm = stats.facts(table, ch)
        if warm:
            warm_busy[ch.uid] = warm_busy.get(ch.uid, 0) + 1
        if listed >= MAX_LISTED:
            continue
        listed += 1
        item = {"pid": ch.pid, "uid": ch.uid, "age": None if age is None else round(age, 3),
                "argv0": argv0, "on_disconnect": ch.on_disconnect}
        bucket = by_owner.get(id(ch.owner)) if ch.owner is not None else None
        if bucket is not None:
            bucket.append(item)
        elif ch.owner is None or root or ch.uid == asker.uid:
            detached.append(item)
    clients = []
    for c in visible:
        peer = c.peer
        clients.append({"pid": None if peer is None else peer.pid,
                        "uid": None if peer is None else peer.uid,
                        "this": c is asking_conn, "children": by_owner[id(c)]})
    uids = set(stats.spawns) | set(stats.refusals) if root else {asker.uid}
    live_per_uid: dict[int, int] = {}
    for ch in table:
        live_per_uid[ch.uid] = live_per_uid.get(ch.uid, 0) + 1
    counters = {}
    for u in sorted(uids):
        spawns = stats.spawns.get(u, 0)
        counters[str(u)] = {"spawns": spawns, "exits": max(spawns - live_per_uid.get(u, 0), 0),
                            "refusals": dict(sorted(stats.refusals.get(u, {}).items()))}
    total = {"spawns": sum(c["spawns"] for c in counters.values()),
             "exits": sum(c["exits"] for c in counters.values()), "refusals": {}}
    for c in counters.values():
        for name, n in c["refusals"].items():
            total["refusals"][name] = total["refusals"].get(name, 0) + n
    return {
        "pid": os.getpid(),
        "version": version(),
        "uptime": round(now - stats.started, 3),
        "started": stats.started_wall,
        "exec_helper": privileged.helper().describe(),  # what posix_spawn cannot do
        "scope": "all" if root else f"uid {asker.uid}",
        "connections": len(visible) - 1,
        "children": len(children),
        "listed": listed,
        "clients": clients,
        "detached": detached,
        "pools": _pools(server, only),
        "pool_idle": server.pool.idle_count if root else sum(
            p["idle"] for p in _pools(server, only)),
        "warm_busy": sum(warm_busy.values()),
        "counters": counters,
        "total": total,
    }


def format_report(r: dict[str, Any]) -> str:
    """The human form of a report, for ``spawnd status``."""
    lines = [f"spawnd {r.get('version')} pid {r.get('pid')}, up {_age(r.get('uptime'))}"
             f" (showing {r.get('scope')})",
             f"exec helper: {r.get('exec_helper') or 'none (posix_spawn only)'}",
             f"connections: {r.get('connections')} besides this one; "
             f"children: {r.get('children')}"]
    for c in r.get("clients", []):
        if c.get("this") and not c["children"]:
            continue
        this = " (this one)" if c.get("this") else ""
        lines.append(f"  client pid {c['pid']} uid {c['uid']}{this}: "
                     f"{len(c['children'])} children")
        lines += ["    " + _child(ch) for ch in c["children"]]
    if r.get("detached"):
        lines.append(f"  without a client: {len(r['detached'])} children")
        lines += ["    " + _child(ch) for ch in r["detached"]]
    pools = r.get("pools", [])
    lines.append(f"warm pools: {len(pools)}, {r.get('pool_idle', 0)} idle, "
                 f"{r.get('warm_busy', 0)} busy")
    for p in pools:
        lines.append(f"  uid {p['uid']} {' '.join(p['argv'])}: {p['idle']}/{p['size']} idle")
    t = r.get("total", {})
    refused = ", ".join(f"{k} {v}" for k, v in t.get("refusals", {}).items()) or "none"
    lines.append(f"spawns: {t.get('spawns', 0)}, exits: {t.get('exits', 0)}, "
                 f"refusals: {refused}")
    return "\n".join(lines)


def _child(ch: dict[str, Any]) -> str:
    return (f"pid {ch['pid']} uid {ch['uid']} age {_age(ch['age'])} "
            f"{ch['argv0'] or '?'} (on_disconnect={ch['on_disconnect']})")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
