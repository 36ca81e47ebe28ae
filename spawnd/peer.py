"""What a child inherits from its caller, and the most a caller may pass on (issue 11).

The client sends its cwd, umask, rlimits, nice value and CPU affinity with each spawn, as a
fork would copy them. A request is only a claim: a peer of *another uid* (at a root daemon)
could claim ``NPROC unlimited`` and ``nice -20``. For such a peer the daemon reads the
peer's real limits and nice value from the kernel (``SO_PEERPIDFD``, then ``/proc/PID``,
then the pidfd is checked to still name that pid) and the child gets at most those
(:func:`decide`); going beyond needs a policy grant, the same ``rlimits = [...]`` list that
allows a raise through ``rlimits=`` (``NICE`` there also allows a lower nice value).

Only differences from the daemon's own state reach the :class:`~spawnd.spawner.SpawnSpec`:
a child whose caller has the daemon's limits stays on the plain posix_spawn path.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from .policy import RLIMITS

__all__ = ["Inherited", "KernelState", "decide", "own_state", "peer_state", "state_from_proc"]

SO_PEERPIDFD = 77  # Linux >= 6.5; Python 3.11 has no constant
INF = resource.RLIM_INFINITY

#: rlimit number -> wire name (policy's table), in number order as /proc/PID/limits lists them.
NAMES: Mapping[int, str] = {num: name for name, num in sorted(RLIMITS.items(),
                                                              key=lambda item: item[1])}
NUMBERS: Mapping[str, int] = {v: k for k, v in NAMES.items()}


@dataclass(frozen=True, slots=True)
class KernelState:
    """A process's limits ({RLIMIT_*: (soft, hard)}, RLIM_INFINITY for unlimited) and nice."""

    limits: Mapping[int, tuple[int, int]]
    nice: int
    affinity: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Inherited:
    """The SpawnSpec fields: only what differs from the daemon's own state."""

    rlimits: tuple[tuple[int, int, int], ...] = ()
    nice: int | None = None
    affinity: tuple[int, ...] | None = None


class PeerGone(OSError):
    """The peer process exited (or cannot be named): its real limits cannot be read."""


# ---------------------------------------------------------------------------- pure

def wire_limits(limits: Mapping[str, tuple[int, int]] | None) -> dict[int, tuple[int, int]]:
    """Request ``limits`` -> {RLIMIT_*: (soft, hard)}; unknown names are ignored (a newer
    client may know more limits than this daemon: it cannot apply them either way)."""
    out: dict[int, tuple[int, int]] = {}
    for name, (soft, hard) in (limits or {}).items():
        num = NUMBERS.get(name)
        if num is not None:
            out[num] = (_limit(soft), _limit(hard))
    return out


def _lo(a: int, b: int) -> int:
    """The smaller limit (RLIM_INFINITY, -1 in Python, is the largest)."""
    if a == INF:
        return b
    if b == INF:
        return a
    return a if a <= b else b


def _limit(v: int) -> int:
    return INF if v == -1 or v >= 2**63 - 1 else v


def decide(requested: Mapping[int, tuple[int, int]], requested_nice: int | None,
           requested_affinity: tuple[int, ...] | None, own: KernelState,
           ceiling: KernelState | None, granted: frozenset[int] = frozenset(), *,
           fill: bool = True) -> Inherited:
    """The child's state: the request, capped at ``ceiling`` (the peer's real state, for a peer
    of another uid; None = trust the request), except limits listed in ``granted`` (policy);
    ``RLIMIT_NICE`` in ``granted`` lifts the nice cap. A higher nice value is less priority,
    so "at most" means "at least as nice". Returns only what differs from ``own``.

    Without a request (an old client), a capped peer's child gets the ceiling itself when
    ``fill``: never the daemon's own limits, which a root daemon's usually exceed.
    """
    want = dict(requested)
    nice = requested_nice
    if ceiling is not None:
        for num, (csoft, chard) in ceiling.limits.items():
            if num not in want:
                if fill:
                    want[num] = (csoft, chard)
            elif num not in granted:
                soft, hard = want[num]
                want[num] = (_lo(soft, csoft), _lo(hard, chard))
        if nice is None:
            nice = ceiling.nice if fill else None
        elif resource.RLIMIT_NICE not in granted:
            nice = max(nice, ceiling.nice)
    rlimits = tuple((num, soft, hard) for num, (soft, hard) in sorted(want.items())
                    if own.limits.get(num) != (soft, hard))
    return Inherited(
        rlimits=rlimits,
        nice=None if nice is None or nice == own.nice else nice,
        affinity=(None if requested_affinity is None or requested_affinity == own.affinity
                  else requested_affinity))


def meet(a: KernelState | None, b: KernelState) -> KernelState:
    """The stricter of two ceilings: lower limits, higher (nicer) nice value."""
    if a is None:
        return b
    return KernelState(
        limits={n: (_lo(s, b.limits[n][0]), _lo(h, b.limits[n][1])) if n in b.limits else (s, h)
                for n, (s, h) in a.limits.items()},
        nice=max(a.nice, b.nice))


def daemon_ceiling(own: KernelState) -> KernelState:
    """The most an unprivileged daemon can give: its hard limits (a soft limit may rise to
    them), and no lower nice value than its own or than its RLIMIT_NICE allows."""
    nice_soft = own.limits.get(resource.RLIMIT_NICE, (0, 0))[0]
    floor = -20 if nice_soft == INF else max(-20, min(19, 20 - nice_soft))
    return KernelState(limits={n: (h, h) for n, (_, h) in own.limits.items()},
                       nice=min(own.nice, floor))


def parse_limits(text: str) -> dict[int, tuple[int, int]]:
    """``/proc/PID/limits``: a header, then one row per limit in RLIMIT_* order, with the soft
    and hard values in fixed-width columns (``%-25s %-20s %-20s``, fs/proc/base.c)."""
    out: dict[int, tuple[int, int]] = {}
    for num, line in enumerate(text.splitlines()[1:]):
        soft, hard = line[26:47].strip(), line[47:68].strip()
        if num not in NAMES or not soft or not hard:
            break
        out[num] = (INF if soft == "unlimited" else int(soft),
                    INF if hard == "unlimited" else int(hard))
    if len(out) != len(NAMES):
        raise ValueError("unexpected /proc/PID/limits format")
    return out


def parse_nice(stat: str) -> int:
    """``/proc/PID/stat`` field 19 (nice); the comm in parentheses may hold spaces."""
    return int(stat[stat.rindex(")") + 2:].split()[16])


# ---------------------------------------------------------------------------- the kernel

_own: KernelState | None = None


def own_state() -> KernelState:
    """The daemon's own state, read once: the daemon never changes it for good (the spawner
    only lowers a soft limit around one posix_spawn, and restores it)."""
    global _own
    if _own is None:
        _own = KernelState(
            limits={num: resource.getrlimit(num) for num in NAMES},
            nice=os.getpriority(os.PRIO_PROCESS, 0),
            affinity=tuple(sorted(os.sched_getaffinity(0))))
    return _own


def _fdinfo_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                return int(line[4:])
    raise PeerGone(errno.ESRCH, "not a pidfd")


def state_from_proc(pidfd: int) -> KernelState:
    """Read the limits and nice value of the process ``pidfd`` names, race-free: the pid is
    taken from the pidfd, and after reading ``/proc/PID`` the pidfd must still name it (a pid
    can only be reused once its process is gone, which the pidfd then shows as -1)."""
    pid = _fdinfo_pid(pidfd)
    if pid <= 0:
        raise PeerGone(errno.ESRCH, "the peer process has exited")
    try:
        with open(f"/proc/{pid}/limits") as f:
            limits = parse_limits(f.read())
        with open(f"/proc/{pid}/stat") as f:
            nice = parse_nice(f.read())
    except (OSError, ValueError, IndexError) as e:
        raise PeerGone(errno.ESRCH, f"cannot read the peer's limits: {e}") from None
    if _fdinfo_pid(pidfd) != pid:
        raise PeerGone(errno.ESRCH, "the peer process exited while its limits were read")
    return KernelState(limits=limits, nice=nice)


def peer_state(sock: socket.socket, fallback_pid: int) -> KernelState:
    """The connected peer's real limits and nice (as it is now; the process as of connect).

    Without SO_PEERPIDFD (Linux < 6.5) the SO_PEERCRED pid is opened as a pidfd instead,
    which a pid reused since connect() could fool.
    """
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        try:
            pidfd = os.pidfd_open(fallback_pid)
        except OSError:
            raise PeerGone(errno.ESRCH, "the peer process has exited") from None
    try:
        return state_from_proc(pidfd)
    finally:
        os.close(pidfd)
