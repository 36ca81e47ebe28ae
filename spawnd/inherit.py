"""What a child inherits from its caller (issue 11): a Spawn request -> SpawnSpec fields.

The client sends its cwd (as an fd), umask, limits, nice value and affinity with every
request, as a forked child would inherit them. Here the daemon turns them into SpawnSpec
fields, keeping only what differs from its own state (so the plain posix_spawn path stays
the default), capping a peer of another uid at what the kernel says it really has
(spawnd/peer.py), and never giving more than the daemon itself can.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import stat

import trio

from . import caps, peer, spawner
from . import protocol as P
from .policy import Grant, Peer, Policy, Refused


def with_child_nofile(have: tuple[tuple[int, int, int], ...], limits: tuple[int, int] | None
                       ) -> tuple[tuple[int, int, int], ...]:
    """Give the child the daemon's original NOFILE limit, unless the request set one.

    The daemon raised its own soft limit at start; a request without the caller's limits
    (an old or minimal client) must not hand that to its child. (Applied to the rlimits
    before the SpawnSpec is built: a dataclasses.replace per spawn cost 3 µs.)
    """
    if limits is None or any(r == resource.RLIMIT_NOFILE for r, _, _ in have):
        return have
    return (*have, (resource.RLIMIT_NOFILE, *limits))


_DAEMON_UID = os.geteuid()
_DAEMON_CAPS = caps.own_permitted()
_own_state: tuple[peer.KernelState, peer.KernelState | None] | None = None


def _daemon_state() -> tuple[peer.KernelState, peer.KernelState | None]:
    """The daemon's own limits/nice/affinity (read once: only start-up changes them, before
    the first spawn), and the most it can give a child: without CAP_SYS_RESOURCE it cannot
    raise a hard limit, without CAP_SYS_NICE it cannot lower nice below RLIMIT_NICE's floor
    (root in a container often lacks them). None: no ceiling of its own. Both are computed
    once, not per spawn."""
    global _own_state
    if _own_state is None:
        own = peer.own_state()
        limits_ok = "CAP_SYS_RESOURCE" in _DAEMON_CAPS
        nice_ok = "CAP_SYS_NICE" in _DAEMON_CAPS
        if limits_ok and nice_ok:
            _own_state = own, None
        else:
            most = peer.daemon_ceiling(own)
            _own_state = own, peer.KernelState(limits={} if limits_ok else most.limits,
                                               nice=-20 if nice_ok else most.nice)
    return _own_state


def caller_cwd(req: P.Spawn) -> bytes | None:
    """Where the caller's relative names point: its cwd fd (as /proc/self/fd/N), joined with
    ``cwd=`` (itself relative to the caller's cwd, as with subprocess)."""
    fd = req.cwd_dir_fd
    if fd is None:
        return req.cwd
    # (Not checked to be a directory here: the child's fchdir fails with ENOTDIR, which
    # spawner reports as stage "cwd", and so does check_cwd when resolving fails first.)
    base = b"/proc/self/fd/%d" % fd
    return base if req.cwd is None else os.path.join(base, req.cwd)


def check_cwd(req: P.Spawn) -> None:
    """After a failure to find the executable: a caller's cwd fd that is not a directory is
    the real cause (stage "cwd", as the child's fchdir would have said)."""
    fd = req.cwd_dir_fd
    if fd is not None and not stat.S_ISDIR(os.fstat(fd).st_mode):
        raise spawner.SpawnError(errno.ENOTDIR, spawner.STAGE_CWD, req.cwd or b".")


#: Same-uid peers' decided state by (limits items, nice, affinity): pure given the daemon's
#: own state, which never changes after start-up (see _daemon_state).
_INHERIT_CACHE: dict[tuple[object, ...], peer.Inherited] = {}
_INHERIT_CACHE_SIZE = 256


def spec_fields(policy: Policy, who: Peer, sock: trio.socket.SocketType, req: P.Spawn,
                   grant: Grant) -> dict[str, object]:
    """SpawnSpec keyword arguments: the caller's cwd fd, and its limits, nice and affinity
    where they differ from the daemon's. A peer of another uid passes on at most its real
    limits and nice value, read from the kernel, unless ``policy`` grants more."""
    own, most = _daemon_state()
    ceiling: peer.KernelState | None = None
    granted: frozenset[int] = frozenset()
    key = None
    if who.uid == _DAEMON_UID:
        # The same request state always gives the same answer for a same-uid peer (no kernel
        # ceiling, no grants): look it up instead of re-deciding 16 limits per spawn.
        lim = req.limits
        key = (None if lim is None else tuple(lim.items()), req.nice, req.affinity)
        got = _INHERIT_CACHE.get(key)
        if got is not None:
            return {"cwd_fd": req.cwd_dir_fd, "rlimits": got.rlimits, "nice": got.nice,
                    "affinity": got.affinity, "ctty": req.ctty}
    else:
        try:
            ceiling = peer.peer_state(sock, who.pid)  # type: ignore[arg-type]
        except peer.PeerGone as e:
            raise Refused(e.errno or errno.ESRCH, str(e.strerror or e)) from None
        granted = policy.inherit_grants(who, grant)
    fill = ceiling is not None  # a capped peer's child never gets the daemon's own limits
    if most is not None:  # the kernel would refuse more than the daemon can give
        ceiling = peer.meet(ceiling, most)
    got = peer.decide(peer.wire_limits(req.limits), req.nice, req.affinity, own, ceiling,
                      granted, fill=fill)
    if key is not None:
        if len(_INHERIT_CACHE) >= _INHERIT_CACHE_SIZE:
            _INHERIT_CACHE.clear()  # a client cycling through states: start over
        _INHERIT_CACHE[key] = got
    return {"cwd_fd": req.cwd_dir_fd, "rlimits": got.rlimits, "nice": got.nice,
            "affinity": got.affinity, "ctty": req.ctty}


def pool_spec(spec: spawner.SpawnSpec) -> spawner.SpawnSpec:
    """A warm pool keys on ``cwd`` and refills later, after this request's fds are closed: give
    it the caller's cwd as a path (a directory renamed meanwhile is not followed there)."""
    if spec.cwd_fd is None:
        return spec
    where = os.readlink(b"/proc/self/fd/%d" % spec.cwd_fd)
    return dataclasses.replace(spec, cwd_fd=None,
                               cwd=where if spec.cwd is None else os.path.join(where, spec.cwd))
