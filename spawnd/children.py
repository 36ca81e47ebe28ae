"""The table of live children: one reaper over one epoll of pidfds, timers, exit fan-out.

Every child the daemon starts is added here the moment ``posix_spawn`` returns and stays
until it has been reaped, whatever happens to the connection that asked for it. A child is
watched through its pidfd, reaped with ``waitid(P_PIDFD)`` so a recycled pid can never be
confused with it, and its exit is handed to its owner if it still has one.

Why one reaper and not a task per child: a trio task plus its pidfd registration cost about
2 KiB and tens of microseconds of scheduling per child. Here every pidfd sits in one
``select.epoll`` set and a single task waits for that one fd to become readable, then reaps
whatever is ready without blocking. The same task services one heap of timers (the SIGKILL
after a ``terminate`` grace, re-checks of children that cannot be reaped yet), so a live
child costs a :class:`Child` record and an fd, nothing else.

Reaping never blocks the loop. A pidfd can be readable while ``waitid`` finds nothing: a
child traced by another process (strace, gdb, a crash reporter's ``PTRACE_SEIZE``) becomes
a zombie only its tracer can wait for. Such a child leaves the epoll set (level-triggered, it
would spin) and is re-checked with ``WNOHANG`` on a backoff timer until the tracer lets go.
"""

from __future__ import annotations

import ctypes
import gc
import heapq
import logging
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

log = logging.getLogger("spawnd")

ExitCallback = Callable[["Child"], None]

TRIM_AFTER = 256  # children alive at once before an empty table gives memory back
RECHECK_FIRST = 0.01  # a readable pidfd that waitid cannot reap: first re-check after this
RECHECK_MAX = 1.0  # ... doubling up to this (a tracer can hold a zombie for hours)
UNREAPABLE_BOUND = 3.0  # shutdown: how long to wait for children only a tracer can reap
_TIMER_KILL = 0
_TIMER_RECHECK = 1


@dataclass(eq=False, slots=True)
class Child:
    pid: int
    pidfd: int  # -1 once reaped (or abandoned at shutdown)
    uid: int  # the peer uid it is counted against (per-uid limits)
    request_id: int
    on_disconnect: str
    grace: float
    on_exit: ExitCallback | None  # None once the owner is gone
    owner: object | None
    returncode: int | None = None
    kill_at: float | None = None  # pending SIGKILL (terminate's grace) at this trio time
    recheck: float = 0.0  # > 0: exited but not waitable (traced); current backoff


def returncode_of(info: os.waitid_result) -> int:
    """``subprocess``'s convention: the exit status, or minus the signal that killed it."""
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status


def _give_back_memory() -> None:
    """After a burst of children, return freed heap to the OS so idle RSS comes back.

    Freed per-child objects (records, dict slots) stay in glibc's heap otherwise; the
    daemon is long-lived and its idle memory is the user's.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class ChildTable:
    """Owns every child's pidfd, the epoll set and the reaper task (in the given nursery).

    ``on_change`` is called after every reap (idle exit, status); it must not block.
    """

    def __init__(self, nursery: trio.Nursery, on_change: Callable[[], None] = lambda: None) -> None:
        self._on_change = on_change
        self._by_pid: dict[int, Child] = {}
        self._by_fd: dict[int, Child] = {}  # pidfds in the epoll set
        self._unreapable: dict[int, Child] = {}  # exited, but only a tracer can wait for them
        self._peak = 0  # most children alive at once since the table was last empty
        self._per_uid: dict[int, int] = {}
        self._changed = trio.lowlevel.ParkingLot()  # wait_until's, woken after every reap
        self._epoll = select.epoll()
        self._timers: list[tuple[float, int, int, Child]] = []  # (when, seq, kind, child)
        self._seq = 0
        self._wait_scope: trio.CancelScope | None = None  # the timer task's, while it sleeps
        self._timer_added = trio.Event()
        nursery.start_soon(self._reaper)
        nursery.start_soon(self._timer_task)
        # (monotonic time, pid) of the last reaps: a child may signal the daemon and exit
        # before the signal is read; spawnd/signals.py must still know it was a child.
        self.recently_reaped: deque[tuple[float, int]] = deque(maxlen=4096)

    def __len__(self) -> int:
        return len(self._by_pid)

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._by_pid.values()))

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
        try:
            self._epoll.register(pidfd, select.EPOLLIN)
        except OSError:
            os.close(pidfd)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        child = Child(pid, pidfd, uid, request_id, on_disconnect, grace, on_exit, owner)
        self._by_pid[pid] = child
        self._by_fd[pidfd] = child
        n = len(self._by_pid)
        if n > self._peak:
            self._peak = n
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        return child

    # -- the reaper: one task for every child
    async def _reaper(self) -> None:
        # No cancel scope per wait: entering and leaving one costs more than the reap.
        epfd = self._epoll.fileno()
        try:
            while True:
                await trio.lowlevel.wait_readable(epfd)
                self._reap_ready()
        finally:
            self._abandon_all()
            trio.lowlevel.notify_closing(epfd)
            self._epoll.close()

    async def _timer_task(self) -> None:
        """Sleeps until the earliest timer (a kill after a grace, a re-check); rarely runs."""
        while True:
            if not self._timers:
                self._timer_added = trio.Event()
                await self._timer_added.wait()
            with trio.CancelScope(deadline=self._timers[0][0]) as scope:
                self._wait_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._wait_scope = None
            self._run_timers()

    def _reap_ready(self) -> None:
        by_fd = self._by_fd
        for fd, _ in self._epoll.poll(0):
            child = by_fd.get(fd)
            if child is not None:
                self._try_reap(child)

    def _try_reap(self, child: Child) -> bool:
        """``waitid(WNOHANG)``: reap and deliver, or park an exited-but-traced child."""
        try:
            info = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:  # reaped behind our back: nothing to deliver
            log.error("child %d was already reaped: its status is lost", child.pid)
            self._forget(child)
            self._lost(child)
            return True
        if info is None or info.si_pid == 0:
            if not child.recheck:
                # Readable but not waitable: a tracer holds the zombie. Out of the epoll
                # set (level-triggered, it would spin); re-check on a backoff timer.
                log.info("child %d exited but cannot be reaped yet (traced?): re-checking",
                         child.pid)
                self._epoll.unregister(child.pidfd)
                del self._by_fd[child.pidfd]
                self._unreapable[child.pid] = child
                child.recheck = RECHECK_FIRST
                self._wake_waiters()  # stop_all counts these apart
            else:
                child.recheck = min(child.recheck * 2, RECHECK_MAX)
            self._add_timer(trio.current_time() + child.recheck, _TIMER_RECHECK, child)
            return False
        child.returncode = returncode_of(info)
        # The exit goes out first (its owner's client is waiting for it); the bookkeeping
        # after. Nothing else runs in between: the table is consistent by the next await.
        self._deliver(child)
        self._forget(child)
        return True

    def _deliver(self, child: Child) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("child %d exited with %d", child.pid, child.returncode)
        if child.on_exit is not None:
            try:
                child.on_exit(child)
            except Exception:  # one owner's bug must not end the root nursery (the daemon)
                log.exception("delivering the exit of child %d failed", child.pid)
                self._lost(child)

    @staticmethod
    def _lost(child: Child) -> None:
        abort = getattr(child.owner, "abort", None)
        if child.on_exit is not None and abort is not None:
            abort()  # its client must not wait forever for a lost status

    def _forget(self, child: Child) -> None:
        del self._by_pid[child.pid]
        if child.recheck:
            del self._unreapable[child.pid]
        else:
            del self._by_fd[child.pidfd]
            self._epoll.unregister(child.pidfd)  # explicitly: a client may hold a dup of it
        self.recently_reaped.append((time.monotonic(), child.pid))
        n = self._per_uid[child.uid] - 1
        if n:
            self._per_uid[child.uid] = n
        else:
            del self._per_uid[child.uid]
        child.kill_at = None
        os.close(child.pidfd)
        child.pidfd = -1
        self._wake_waiters()
        self._on_change()
        if not self._by_pid and self._peak >= TRIM_AFTER:
            self._peak = 0
            _give_back_memory()

    def _wake_waiters(self) -> None:
        if self._changed:
            self._changed.unpark_all()

    def _abandon_all(self) -> None:
        """The reaper is ending (daemon exit): reap what can be, never block, close the rest."""
        for child in list(self._by_pid.values()):
            try:
                info = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOHANG)
            except OSError:
                info = None
            if info is not None:
                child.returncode = returncode_of(info)
                self._forget(child)
                self._deliver(child)
                continue
            log.warning("abandoning child %d at exit: it cannot be reaped now", child.pid)
            try:
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            except OSError:
                pass
            self._forget(child)

    # -- timers: one heap, serviced by the reaper task
    def _add_timer(self, when: float, kind: int, child: Child) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, kind, child))
        scope = self._wait_scope
        if scope is not None and when < scope.deadline:
            scope.deadline = when
        self._timer_added.set()

    def _run_timers(self) -> None:
        now = trio.current_time()
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, child = heapq.heappop(timers)
            if child.pidfd < 0:
                continue  # reaped meanwhile
            if kind == _TIMER_KILL:
                if child.kill_at == when:
                    child.kill_at = None
                    log.warning("child %d ignored SIGTERM: SIGKILL after its grace",
                                child.pid)
                    self._send(child, signal.SIGKILL)
            elif child.recheck:
                self._try_reap(child)

    # -- lifetimes
    def signal(self, child: Child, sig: int) -> None:
        """Signal through the pidfd: it can never hit a recycled pid."""
        signal.pidfd_send_signal(child.pidfd, sig)

    def _send(self, child: Child, sig: int) -> None:
        try:
            self.signal(child, sig)
        except OSError:
            pass

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
        if how != "kill" and child.kill_at is None:
            child.kill_at = trio.current_time() + grace
            self._add_timer(child.kill_at, _TIMER_KILL, child)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Sleep until ``predicate()`` holds, re-checking after every reap."""
        while not predicate():
            await self._changed.park()

    async def stop_all(self, how: str, grace: float) -> None:
        """Daemon shutdown: end every child (``wait`` lets them run) and wait for all reaps.

        Children that have exited but that only a tracer can reap are waited for at most
        :data:`UNREAPABLE_BOUND` seconds once nothing else is left, then abandoned (logged):
        a debugger attached to one job must not keep the daemon from stopping.
        """
        if how != "wait":
            for child in list(self._by_pid.values()):
                self.end(child, how, grace)
        await self.wait_until(lambda: len(self._by_pid) == len(self._unreapable))
        if self._by_pid:
            with trio.move_on_after(UNREAPABLE_BOUND):
                await self.wait_until(lambda: not self._by_pid)
        for child in list(self._unreapable.values()):
            log.warning("child %d has exited but its tracer has not let it be reaped: "
                        "stopping without its status", child.pid)
            self._forget(child)
