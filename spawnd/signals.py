"""The daemon's own signals: which are caught, what each means, and from whom it counts.

A child reaches its parent with ``os.kill(os.getppid(), sig)`` (a common readiness
protocol), and every signal whose default action terminates, dumps core or stops would end
or freeze a daemon that serves every client at once. So the daemon blocks all of them in
its only thread and reads them from a ``signalfd`` in the trio loop: each record carries
the sender's pid (``ssi_pid``), so SIGTERM/SIGINT (stop) and SIGHUP (reload) are honoured
only from a process that is not one of the daemon's own children; the rest is logged
(rate-limited) and ignored.

Left alone, deliberately:

* SIGKILL, SIGSTOP: cannot be caught or blocked.
* SIGCHLD, SIGURG, SIGWINCH, SIGCONT: their default is to do nothing. SIGCHLD must stay
  SIG_DFL (not ignored: the kernel would auto-reap and the pidfds could not be waited on)
  and unblocked (blocked, every exit would queue a record nobody needs).
* SIGPIPE, SIGXFSZ: the interpreter ignores them at start-up, so nobody can end the daemon
  with them, and blocking them would only queue what an ignore discards.

Children never see any of this: ``spawner`` starts each with every signal at SIG_DFL and an
empty mask (``POSIX_SPAWN_SETSIGDEF`` + ``POSIX_SPAWN_SETSIGMASK``).

The policy part (:func:`blocked_signals`, :func:`decide`, :class:`LogLimiter`,
:func:`parse_records`) is pure; :class:`SignalFD` is the one piece that touches the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "HONOURED",
    "SIGINFO",
    "SignalFD",
    "SigInfo",
    "LogLimiter",
    "blocked_signals",
    "decide",
    "parse_records",
]

# Signals the daemon acts on, when they come from outside (not from its own children).
HONOURED: dict[int, str] = {signal.SIGTERM: "stop", signal.SIGINT: "stop",
                            signal.SIGHUP: "reload"}

# Default action "ignore" (or cannot be caught): never blocked.
_LEFT_ALONE = frozenset({signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGURG,
                         signal.SIGWINCH, signal.SIGCONT,
                         # ignored by the interpreter itself (see the module docstring)
                         signal.SIGPIPE, signal.SIGXFSZ})

# struct signalfd_siginfo (<linux/signalfd.h>): 128 bytes; the first fields are
# u32 ssi_signo, s32 ssi_errno, s32 ssi_code, u32 ssi_pid, u32 ssi_uid.
SIGINFO = struct.Struct("=IiiII")
SIGINFO_SIZE = 128


def blocked_signals() -> tuple[int, ...]:
    """Every signal whose default action would end or stop the daemon.

    That is 1..NSIG-1 without those left alone, *including* 32 and 33 (glibc's internal
    SIGCANCEL/SIGSETXID: a child can send them too, and their default action terminates).
    """
    return tuple(s for s in range(1, signal.NSIG) if s not in _LEFT_ALONE)


@dataclass(frozen=True, slots=True)
class SigInfo:
    signo: int
    code: int
    pid: int
    uid: int

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signo).name
        except ValueError:
            rtmin = int(signal.SIGRTMIN)
            return f"SIGRTMIN+{self.signo - rtmin}" if self.signo >= rtmin else f"signal {self.signo}"


def parse_records(data: bytes) -> list[SigInfo]:
    """Whole ``signalfd_siginfo`` records in ``data`` (the kernel never splits one)."""
    out = []
    for off in range(0, len(data) - SIGINFO_SIZE + 1, SIGINFO_SIZE):
        signo, _err, code, pid, uid = SIGINFO.unpack_from(data, off)
        out.append(SigInfo(signo=signo, code=code, pid=pid, uid=uid))
    return out


def decide(info: SigInfo, from_child: bool) -> str:
    """What to do with one signal: "stop", "reload", "ignore-child" or "ignore".

    Pure. ``from_child`` says whether the sender is (or just was) a process the daemon
    started: a child's SIGTERM to its parent is a bug or a protocol of its own, never an
    order to stop serving every other client.
    """
    action = HONOURED.get(info.signo)
    if action is None:
        return "ignore"
    return "ignore-child" if from_child else action


class LogLimiter:
    """At most one log line per key per ``interval`` seconds; counts what it swallowed.

    A child in a loop of ``kill(getppid(), SIGUSR1)`` must not fill the journal.
    """

    def __init__(self, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}

    def allow(self, key: object) -> int | None:
        """None: stay quiet; else log now, and this many earlier ones were suppressed."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        if len(self._last) > 1024:  # keys are (signal, kind): bounded anyway; belt and braces
            self._last.clear()
        self._last[key] = now
        return self._suppressed.pop(key, 0)


# ---------------------------------------------------------------------------- the kernel side

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.signalfd.restype = ctypes.c_int
# rt_sigprocmask by number: glibc's sigprocmask silently drops 32 and 33 from the mask.
_SYS_RT_SIGPROCMASK = {"x86_64": 14, "aarch64": 135, "riscv64": 135}.get(platform.machine())
_SIG_BLOCK, _SIG_SETMASK = 0, 2
_SFD_NONBLOCK = os.O_NONBLOCK
_SFD_CLOEXEC = os.O_CLOEXEC
_KSIGSET = ctypes.c_uint64  # the kernel's sigset_t is _NSIG (64) bits on Linux


def _mask_of(signals: tuple[int, ...]) -> int:
    m = 0
    for s in signals:
        m |= 1 << (s - 1)
    return m


def _sigprocmask(how: int, mask: int) -> int:
    """Change this thread's mask; returns the old one (kernel layout)."""
    new, old = _KSIGSET(mask), _KSIGSET(0)
    if _SYS_RT_SIGPROCMASK is None:  # unknown arch: glibc's (without 32/33)
        sigs = {s for s in range(1, 65) if mask >> (s - 1) & 1} - {32, 33}
        prev = signal.pthread_sigmask(signal.SIG_BLOCK if how == _SIG_BLOCK else
                                      signal.SIG_SETMASK, sigs)
        return _mask_of(tuple(int(s) for s in prev))
    if _libc.syscall(_SYS_RT_SIGPROCMASK, how, ctypes.byref(new), ctypes.byref(old),
                     ctypes.sizeof(_KSIGSET)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return old.value


def block_early() -> None:
    """Block the daemon's signals now, before its socket exists: a client (or systemd) that
    signals the moment the socket answers must meet the signalfd, not a default action.
    The SignalFD made later reads whatever arrived meanwhile (signals stay pending)."""
    _sigprocmask(_SIG_BLOCK, _mask_of(blocked_signals()))


class SignalFD:
    """Block ``signals`` in this (the daemon's only) thread and read them from a signalfd.

    Must be created in the thread that runs the loop, before anything could send a signal
    that matters (``Server.run`` does it before READY=1). :meth:`close` drains what is still
    pending (so unblocking cannot deliver a queued SIGTERM with its default action) and
    restores the previous mask.
    """

    def __init__(self, signals: tuple[int, ...] | None = None) -> None:
        self.signals = blocked_signals() if signals is None else signals
        mask = _mask_of(self.signals)
        self._old_mask = _sigprocmask(_SIG_BLOCK, mask)
        buf = _KSIGSET(mask)
        fd = _libc.signalfd(-1, ctypes.byref(buf), _SFD_NONBLOCK | _SFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            _sigprocmask(_SIG_SETMASK, self._old_mask)
            raise OSError(e, f"signalfd: {os.strerror(e)}")
        self.fd = fd

    def read(self) -> list[SigInfo]:
        """Every record pending now ([] if none)."""
        out: list[SigInfo] = []
        while True:
            try:
                data = os.read(self.fd, SIGINFO_SIZE * 16)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not data:
                return out
            out.extend(parse_records(data))

    def close(self) -> list[SigInfo]:
        """Stop: returns what was still pending, then restores the old mask."""
        if self.fd < 0:
            return []
        left = self.read()
        os.close(self.fd)
        self.fd = -1
        _sigprocmask(_SIG_SETMASK, self._old_mask)
        return left


def sender_is_descendant(pid: int, me: int | None = None, max_depth: int = 32) -> bool:
    """Whether ``pid``'s parent chain reaches ``me`` (live processes and unreaped zombies).

    Catches what the daemon spawned outside its child table (warm-pool processes, a
    trampoline not yet registered) and a child's own children that still hang below it.
    """
    me = os.getpid() if me is None else me
    for _ in range(max_depth):
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        if ppid == me:
            return True
        pid = ppid
    return False
