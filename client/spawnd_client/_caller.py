"""The caller's process state, captured per spawn so the child starts as ``subprocess`` would.

A forked child inherits its parent's cwd, umask, resource limits, nice value and CPU
affinity; a spawnd child is the daemon's child, so the client sends them with each request,
like it sends the environment. Capturing is cheap (a few µs; the whole client budget per
spawn is 0.1 ms):

- the cwd as an ``O_PATH|O_DIRECTORY`` fd (sent with SCM_RIGHTS): a directory renamed or
  unreachable by name still works, exactly as a forked child's cwd would;
- the umask from ``/proc/self/status`` (``Umask:``): ``os.umask`` can only read it by changing
  it, for every thread, while it is read. The file is kept open and re-read with ``pread``;
  it is reopened in a forked child (an fd opened before a fork still shows the parent);
- every ``RLIMIT_*`` (``getrlimit``: 16 calls cost about what one read of
  ``/proc/self/limits`` does, 6.0 vs 5.1 µs here, without parsing the kernel's text);
- the calling thread's nice value and CPU affinity (both per thread on Linux, as a fork
  from this thread would copy them).
"""

from __future__ import annotations

import os
import resource
import threading

from ._transport import off_stdio

__all__ = ["CallerState", "caller_state", "RLIMIT_NAMES"]

#: Wire names (as in ``rlimits=``) of the limits a child inherits; numbers are Linux's.
RLIMIT_NAMES: tuple[tuple[str, int], ...] = tuple(
    (name, num) for name, num in (
        ("CPU", resource.RLIMIT_CPU), ("FSIZE", resource.RLIMIT_FSIZE),
        ("DATA", resource.RLIMIT_DATA), ("STACK", resource.RLIMIT_STACK),
        ("CORE", resource.RLIMIT_CORE), ("RSS", resource.RLIMIT_RSS),
        ("NPROC", resource.RLIMIT_NPROC), ("NOFILE", resource.RLIMIT_NOFILE),
        ("MEMLOCK", resource.RLIMIT_MEMLOCK), ("AS", resource.RLIMIT_AS),
        ("LOCKS", getattr(resource, "RLIMIT_LOCKS", 10)),
        ("SIGPENDING", resource.RLIMIT_SIGPENDING), ("MSGQUEUE", resource.RLIMIT_MSGQUEUE),
        ("NICE", resource.RLIMIT_NICE), ("RTPRIO", resource.RLIMIT_RTPRIO),
        ("RTTIME", resource.RLIMIT_RTTIME),
    ))

_INF = resource.RLIM_INFINITY
_NAMES = tuple(name for name, _ in RLIMIT_NAMES)
_NUMBERS = tuple(num for _, num in RLIMIT_NAMES)
_getrlimit = resource.getrlimit
_getpid = os.getpid
_pread = os.pread
_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class CallerState:
    """What a forked child would inherit. ``cwd_fd`` is ours to close (:meth:`close`)."""

    __slots__ = ("cwd_fd", "umask", "rlimit_values", "nice", "affinity")

    def __init__(self, cwd_fd: int | None, umask: int | None,
                 rlimit_values: tuple[tuple[int, int], ...], nice: int | None,
                 affinity: tuple[int, ...] | None) -> None:
        self.cwd_fd = cwd_fd
        self.umask = umask
        #: (soft, hard) per :data:`RLIMIT_NAMES` entry, -1 = unlimited: a tuple, so a request
        #: cache compares it in C (the ``limits`` dict is built only for a new request)
        self.rlimit_values = rlimit_values
        self.nice = nice
        self.affinity = affinity

    @property
    def limits(self) -> dict[str, tuple[int, int]]:
        return dict(zip(_NAMES, self.rlimit_values, strict=True))

    def key(self) -> tuple[object, ...]:
        """Everything a request takes from this state, for comparing two requests."""
        return (self.rlimit_values, self.nice, self.affinity, self.umask,
                self.cwd_fd is not None)

    def close(self) -> None:
        fd, self.cwd_fd = self.cwd_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> CallerState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_fields(self) -> dict[str, object]:
        """Keyword arguments for :class:`spawnd.protocol.Spawn` (the fd is sent separately)."""
        return {"cwd_fd": self.cwd_fd is not None, "limits": self.limits, "nice": self.nice,
                "affinity": self.affinity}


class _StatusFile:
    """``/proc/<our pid>/status``, opened once per process and re-read with ``pread``."""

    def __init__(self) -> None:
        self.fd = -1
        self.pid = -1
        self.lock = threading.Lock()

    def read(self, pid: int, size: int) -> bytes:
        if self.pid != pid:  # first use, or a forked child holding the parent's file
            with self.lock:
                if self.pid != pid:
                    if self.fd >= 0:
                        try:
                            os.close(self.fd)
                        except OSError:
                            pass
                    self.fd = off_stdio(os.open(f"/proc/{pid}/status",
                                                os.O_RDONLY | os.O_CLOEXEC))
                    self.pid = pid
        return _pread(self.fd, size, 0)

    def after_fork(self) -> None:
        # The child's copy of the fd still reads the parent's file: forget it (closed on
        # the next use, whose pid check reopens; a lock held at fork is replaced, not used).
        self.lock = threading.Lock()

    def umask(self, pid: int | None = None) -> int | None:
        # The kernel renders the whole file per read anyway; "Umask:" is its second line,
        # after "Name:" (at most 64 bytes escaped): the first 256 bytes hold it.
        pid = _getpid() if pid is None else pid
        data = self.read(pid, 256)
        i = data.find(b"\nUmask:")
        if i < 0 or data.find(b"\n", i + 7) < 0:
            data = self.read(pid, 4096)
            i = data.find(b"\nUmask:")
            if i < 0:  # Linux < 4.7: leave the umask to the daemon (and the explicit umask=)
                return None
        return int(data[i + 7:data.index(b"\n", i + 7)], 8)


def _getrlimits() -> tuple[tuple[int, int], ...]:
    if _INF == -1:  # Python's RLIM_INFINITY on Linux: getrlimit's tuples are the wire form
        return tuple(map(_getrlimit, _NUMBERS))
    return tuple((-1 if soft == _INF else soft, -1 if hard == _INF else hard)
                 for soft, hard in map(_getrlimit, _NUMBERS))


_status = _StatusFile()
os.register_at_fork(after_in_child=_status.after_fork)


def caller_state(*, cwd: bool = True) -> CallerState:
    """Capture the calling thread's process state for one spawn request.

    The caller owns the returned cwd fd: close it (``with caller_state() as s:``) once the
    request carrying it has been sent. ``cwd=False`` skips the directory fd.
    """
    pid = _getpid()
    values = _getrlimits()
    try:
        nice: int | None = os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        nice = None
    try:
        affinity: tuple[int, ...] | None = tuple(sorted(os.sched_getaffinity(0)))
    except OSError:
        affinity = None
    try:
        umask = _status.umask(pid)
    except OSError:
        umask = None
    fd = off_stdio(os.open(".", _O_DIR)) if cwd else None  # see off_stdio
    return CallerState(fd, umask, values, nice, affinity)
