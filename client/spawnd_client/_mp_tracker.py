"""multiprocessing's resource tracker, started by the daemon instead of by ``vfork``.

The stdlib starts its tracker with ``util.spawnv_passfds`` (``_posixsubprocess`` with
vfork) the first time a semaphore, shared memory block or spawned child needs it: the one
process a "never fork" program would still create. We replace the module's tracker object
with a subclass whose launch goes through the daemon; everything else (the pipe protocol,
the tracker's own ``main``, probing, reentrancy guards) stays CPython's.

Lifetime: the tracker must outlive its creator to unlink what a crashed program leaked, and
it exits by itself once every holder of the pipe's write end is gone. So it is started with
``on_disconnect="keep"``: when the parent dies the daemon terminates the workers, their
ends close, and the tracker cleans up and exits (the daemon reaps it).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from multiprocessing import resource_tracker as _rt
from multiprocessing import spawn, util

TYPE_CHECKING = False  # every child imports this module: not typing (see _mp_boot)
if TYPE_CHECKING:
    from typing import Any

    from .client import Child
    from .mp import SpawndContext

__all__ = ["DaemonResourceTracker", "getfd_for", "install"]

_TRACKER_CODE = "from multiprocessing.resource_tracker import main;main(3)"
_install_lock = threading.Lock()


def _recursing(lock: Any) -> bool:
    count = getattr(lock, "_recursion_count", None)
    return count is not None and count() > 1


class DaemonResourceTracker(_rt.ResourceTracker):
    """CPython's tracker, launched through spawnd. ``_pid`` is informational: not our child."""

    def __init__(self, ctx: SpawndContext) -> None:
        super().__init__()
        self._spawnd_ctx = ctx
        self._spawnd_child: Child | None = None
        self._starting = threading.local()  # the context of the process start in progress

    def getfd_for(self, ctx: SpawndContext) -> int:
        """``getfd()`` for a process start: a tracker launched now uses that start's daemon
        (the one that will run the child) rather than the last context created."""
        self._starting.ctx = ctx
        try:
            return self.getfd()
        finally:
            self._starting.ctx = None

    def _launch(self) -> None:
        """Start the tracker (called with the lock held; 3.13.x+ call it by this name)."""
        from ._mp_popen import spawn_child

        r, w = os.pipe()
        try:
            fds = {3: r}
            try:
                fds[2] = sys.stderr.fileno()
                os.fstat(fds[2])
            except Exception:  # noqa: BLE001 - like the stdlib: no stderr, no warnings
                fds.pop(2, None)
            exe = os.fsdecode(spawn.get_executable())
            argv = [exe, *util._args_from_interpreter_flags(), "-c", _TRACKER_CODE]
            ctx = getattr(self._starting, "ctx", None) or self._spawnd_ctx
            child = spawn_child(ctx.client(), argv, fds, cwd=None, on_disconnect="keep",
                                grace=ctx.options.grace, warm=None)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._fd = w
        self._pid = child.pid
        self._spawnd_child = child
        self._exitcode = None

    if not hasattr(_rt.ResourceTracker, "_launch"):  # 3.11, 3.12, early 3.13
        def ensure_running(self) -> None:
            """Same contract as CPython's: make sure a tracker runs; relaunch a dead one."""
            with self._lock:
                if _recursing(self._lock):
                    # A finalizer (gh-109629) interrupted us. With a tracker running the
                    # caller's write is safe (atomic, < PIPE_BUF); only a launch is not.
                    if self._fd is not None:
                        return None
                    return self._reentrant_call_error()
                if self._fd is not None:
                    if self._check_alive():
                        return
                    self._teardown_dead_process()
                self._launch()

    def _teardown_dead_process(self) -> None:
        os.close(self._fd)
        self._fd = None
        self._reap(timeout=1.0)
        warnings.warn("resource_tracker: process died unexpectedly, relaunching.  Some "
                      "resources might leak.", stacklevel=2)

    def _reap(self, timeout: float | None) -> None:
        child, pid = self._spawnd_child, self._pid
        self._spawnd_child = None
        self._pid = None
        if child is not None:
            try:
                rc = child.wait(timeout)
            except Exception:  # noqa: BLE001 - the daemon is gone; so is our view of it
                rc = None
            self._exitcode = rc
            child.close()
        elif pid is not None:  # a tracker the stdlib started before we were installed
            try:
                _, status = os.waitpid(pid, 0)
                self._exitcode = os.waitstatus_to_exitcode(status)
            except (ChildProcessError, ValueError):
                self._exitcode = None

    def _stop(self, use_blocking_lock: bool = True, wait_timeout: float | None = None) -> None:
        """Close our end and wait for the tracker (tests and 3.13+'s ``__del__`` call this)."""
        if use_blocking_lock:
            with self._lock:
                self._stop_locked(wait_timeout=wait_timeout)
            return
        acquired = self._lock.acquire(blocking=False)
        try:
            self._stop_locked(wait_timeout=wait_timeout)
        finally:
            if acquired:
                self._lock.release()

    def _stop_locked(self, *args: Any, wait_timeout: float | None = None, **kw: Any) -> None:
        if _recursing(self._lock):
            return self._reentrant_call_error()
        if self._fd is None:
            return
        os.close(self._fd)  # EOF for the tracker once the children's copies are gone too
        self._fd = None
        self._reap(wait_timeout)


def install(ctx: SpawndContext) -> None:
    """Make ``ctx``'s daemon start this process's resource tracker from now on.

    Idempotent; the most recent context decides where a (re)launch goes. A tracker already
    running (started by the stdlib before, or inherited by a child) is kept.
    """
    with _install_lock:
        cur = _rt._resource_tracker
        if isinstance(cur, DaemonResourceTracker):
            cur._spawnd_ctx = ctx
            return
        new = DaemonResourceTracker(ctx)
        with cur._lock:
            new._fd, new._pid = cur._fd, cur._pid
            cur._fd = cur._pid = None
        _rt._resource_tracker = new
        _rt.ensure_running = new.ensure_running
        _rt.register = new.register
        _rt.unregister = new.unregister
        _rt.getfd = new.getfd


def getfd_for(ctx: SpawndContext) -> int:
    """The tracker fd to pass to a child ``ctx`` starts (launching the tracker if needed)."""
    tracker = _rt._resource_tracker
    if isinstance(tracker, DaemonResourceTracker):
        return tracker.getfd_for(ctx)
    return tracker.getfd()  # someone replaced it after us: theirs to launch
