"""The table of live children: pidfd watching, reaping exactly once, exit fan-out, lifetimes.

Every child the daemon starts is added here the moment ``posix_spawn`` returns and stays
until it has been reaped, whatever happens to the connection that asked for it. A child is
watched through its pidfd in the trio loop (no SIGCHLD handler, no thread), reaped with
``waitid(P_PIDFD)`` so a recycled pid can never be confused with it, and its exit is handed
to its owner if it still has one.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

log = logging.getLogger("spawnd")

ExitCallback = Callable[["Child"], None]


@dataclass(eq=False, slots=True)
class Child:
    pid: int
    pidfd: int
    uid: int  # the peer uid it is counted against (per-uid limits)
    request_id: int
    on_disconnect: str
    grace: float
    on_exit: ExitCallback | None  # None once the owner is gone
    owner: object | None
    returncode: int | None = None
    cancel_kill: trio.CancelScope | None = field(default=None)


def returncode_of(info: os.waitid_result) -> int:
    """``subprocess``'s convention: the exit status, or minus the signal that killed it."""
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status


TRIM_AFTER = 256  # children alive at once before an empty table gives memory back


def _give_back_memory() -> None:
    """After a burst of children, return freed heap to the OS so idle RSS comes back.

    Freed per-child objects (tasks, cancel scopes, pidfd registrations) stay in glibc's
    heap otherwise; the daemon is long-lived and its idle memory is the user's.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class ChildTable:
    """Owns every child's pidfd and watcher task; lives in the server's nursery."""

    def __init__(self, nursery: trio.Nursery, on_change: Callable[[], None] = lambda: None) -> None:
        self._nursery = nursery
        self._on_change = on_change  # told after every reap (idle exit, status)
        self._by_pid: dict[int, Child] = {}
        self._peak = 0  # most children alive at once since the table was last empty
        self._per_uid: dict[int, int] = {}
        self._changed = trio.Event()
        # (monotonic time, pid) of the last reaps: a child may signal the daemon and exit
        # before the signal is read; spawnd/signals.py must still know it was a child.
        self.recently_reaped: deque[tuple[float, int]] = deque(maxlen=4096)

    def __len__(self) -> int:
        return len(self._by_pid)

    def count_for(self, uid: int) -> int:
        return self._per_uid.get(uid, 0)

    def get(self, pid: int) -> Child | None:
        return self._by_pid.get(pid)

    def add(self, pid: int, *, uid: int, request_id: int, on_disconnect: str, grace: float,
            owner: object, on_exit: ExitCallback) -> Child:
        """Adopt a just-spawned child. Must be called before the next checkpoint.

        The pid cannot be recycled before we reap it, so ``pidfd_open`` right after
        ``posix_spawn`` is race-free. If it fails (no fds left), the child is killed and
        reaped at once and the error is raised: a child nobody can watch must not exist.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        child = Child(pid=pid, pidfd=pidfd, uid=uid, request_id=request_id,
                      on_disconnect=on_disconnect, grace=grace, on_exit=on_exit, owner=owner)
        self._by_pid[pid] = child
        self._peak = max(self._peak, len(self._by_pid))
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        self._nursery.start_soon(self._watch, child)
        return child

    async def _watch(self, child: Child) -> None:
        try:
            await trio.lowlevel.wait_readable(child.pidfd)
        finally:
            # Reap even if cancelled (shutdown): the child has exited or is about to be
            # SIGKILLed by shutdown(); a blocking waitid here is bounded.
            info = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOHANG)
            if info is None:  # cancelled while alive: shutdown already signalled it
                os.kill(child.pid, signal.SIGKILL)
                info = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
            child.returncode = returncode_of(info)
            self._forget(child)
        log.debug("child %d exited with %d", child.pid, child.returncode)
        if child.on_exit is not None:
            try:
                child.on_exit(child)
            except Exception:  # one owner's bug must not end the root nursery (the daemon)
                log.exception("delivering the exit of child %d failed", child.pid)
                abort = getattr(child.owner, "abort", None)
                if abort is not None:  # its client must not wait forever for a lost status
                    abort()

    def _forget(self, child: Child) -> None:
        del self._by_pid[child.pid]
        self.recently_reaped.append((time.monotonic(), child.pid))
        n = self._per_uid[child.uid] - 1
        if n:
            self._per_uid[child.uid] = n
        else:
            del self._per_uid[child.uid]
        if child.cancel_kill is not None:
            child.cancel_kill.cancel()
        trio.lowlevel.notify_closing(child.pidfd)
        os.close(child.pidfd)
        child.pidfd = -1
        self._changed.set()
        self._changed = trio.Event()
        self._on_change()
        if not self._by_pid and self._peak >= TRIM_AFTER:
            self._peak = 0
            _give_back_memory()

    def signal(self, child: Child, sig: int) -> None:
        """Signal through the pidfd: it can never hit a recycled pid."""
        signal.pidfd_send_signal(child.pidfd, sig)

    def orphan(self, owner: object) -> None:
        """The owner's connection closed: apply each child's ``on_disconnect`` policy."""
        for child in [c for c in self._by_pid.values() if c.owner is owner]:
            child.owner = None
            child.on_exit = None
            if child.on_disconnect == "keep":
                log.info("child %d keeps running after its client left", child.pid)
                continue
            self.end(child, child.on_disconnect, child.grace)

    def end(self, child: Child, how: str, grace: float) -> None:
        """``terminate``: SIGTERM, then SIGKILL after ``grace``; ``kill``: SIGKILL now."""
        try:
            self.signal(child, signal.SIGKILL if how == "kill" else signal.SIGTERM)
        except ProcessLookupError:
            return
        if how != "kill" and child.cancel_kill is None:
            self._nursery.start_soon(self._kill_later, child, grace)

    async def _kill_later(self, child: Child, grace: float) -> None:
        with trio.CancelScope() as scope:
            child.cancel_kill = scope
            await trio.sleep(grace)
            if child.pidfd >= 0:
                log.warning("child %d ignored SIGTERM for %.1fs: SIGKILL", child.pid, grace)
                self.signal(child, signal.SIGKILL)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Sleep until ``predicate()`` holds, re-checking after every reap."""
        while not predicate():
            await self._changed.wait()

    async def stop_all(self, how: str, grace: float) -> None:
        """Daemon shutdown: end every child (``wait`` lets them run) and wait for all reaps."""
        if how != "wait":
            for child in list(self._by_pid.values()):
                self.end(child, how, grace)
        await self.wait_until(lambda: not self._by_pid)
