"""The process-wide switch: ``install()`` makes every process this program starts a spawnd one.

What is patched (and restored by :func:`uninstall`) is listed in ``docs/install.md``. The
rule is to patch the narrowest stdlib name that every caller goes through, so that code
which took a reference before ``install()`` (``from subprocess import Popen``) is covered:

* ``subprocess.Popen._execute_child`` — the one place every ``Popen`` (and so ``run``,
  ``call``, ``check_*``, ``getoutput``, ``os.popen``, asyncio's transports, subclasses)
  creates its child. The instance is then moved to a subclass that waits and signals
  through the daemon, so a ``Popen`` made while installed keeps working after
  ``uninstall()``.
* ``os.system``, ``os._spawnvef`` (``os.spawnv*``/``spawnl*``), ``os.waitpid`` (emulated for
  the daemon's children this process started: asyncio's child watchers use it).
* multiprocessing's default context and so ``ProcessPoolExecutor``'s; asyncio's
  ``create_subprocess_exec/shell`` (the async face, ``spawnd_client.asyncio``).
* ``forbid_fork=True``: ``os.fork``, ``os.forkpty``, ``os.posix_spawn(p)`` and
  ``_posixsubprocess.fork_exec`` raise :class:`ForkForbidden` naming the call site.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

TYPE_CHECKING = False  # not typing's: importing typing costs ~1.6 ms at every import
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["ForkForbidden", "install", "installed", "uninstall"]

#: (owner, name) -> original value, in patch order; empty when not installed.
_saved: dict[tuple[Any, str], Any] = {}
_lock = threading.RLock()
_MISSING = object()
_state: dict[str, Any] = {}


class ForkForbidden(RuntimeError):
    """A process was about to be created locally under ``install(forbid_fork=True)``."""


def installed() -> dict[str, Any] | None:
    """The options of the active ``install()``, or None."""
    return dict(_state) if _saved else None


def _patch(owner: Any, name: str, value: Any) -> None:
    key = (owner, name)
    if key not in _saved:
        _saved[key] = getattr(owner, name, _MISSING)
    setattr(owner, name, value)


def uninstall() -> None:
    """Restore every name ``install()`` replaced (idempotent). Processes already started
    through the daemon stay the daemon's and are still waited for through it."""
    with _lock:
        for (owner, name), value in reversed(list(_saved.items())):
            if value is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, value)
        _saved.clear()
        _state.clear()


def install(*, multiprocessing: bool = True, asyncio: bool = True,
            forbid_fork: bool = False) -> None:
    """Route every process this program starts through the spawnd daemon.

    Idempotent: a second call with other options first undoes the first. The daemon is the
    client library's (``$SPAWND_SOCKET``, autostart rules); nothing connects until the first
    start.
    """
    with _lock:
        opts = {"multiprocessing": multiprocessing, "asyncio": asyncio,
                "forbid_fork": forbid_fork}
        if _saved:
            if _state == opts:
                return
            uninstall()
        _install_subprocess()
        if multiprocessing:
            _install_multiprocessing()
        if asyncio:
            _install_asyncio()
        if forbid_fork:
            _install_fence()
        _state.update(opts)


# -- subprocess, os.system, os.spawn*, os.waitpid ------------------------------------------

_classes: dict[type, type] = {}


def _spawnd_class(cls: type) -> type:
    """``cls`` with the daemon's wait/poll/signal methods (cached; same name and module)."""
    sub = _classes.get(cls)
    if sub is None:
        from . import popen as _p

        sub = type(cls.__name__, (cls,), {
            "_spawnd_installed": True, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "_set_returncode": _p._spawnd_set_returncode,
            "_internal_poll": _p._spawnd_internal_poll, "_wait": _p._spawnd_wait,
            "send_signal": _p._spawnd_send_signal,
        })
        _classes[cls] = sub
    return sub


def _execute_child(self: subprocess.Popen, *args: Any, **kwargs: Any) -> None:
    from . import popen as _p

    _p._spawnd_execute_child(self, *args, **kwargs)
    if not getattr(type(self), "_spawnd_installed", False) and not isinstance(self, _p.Popen):
        self.__class__ = _spawnd_class(type(self))


def _waitstatus(rc: int) -> int:
    """A subprocess returncode as the wait status ``os.system``/``os.waitpid`` return."""
    return (rc & 0xFF) << 8 if rc >= 0 else -rc & 0x7F


def system(command: Any) -> int:
    """``os.system``: ``/bin/sh -c command`` through the daemon, with our stdio and every
    inheritable fd (what ``system(3)``'s child gets); returns the wait status."""
    sys.audit("os.system", (command,))
    from .popen import Popen

    restore = []
    if threading.current_thread() is threading.main_thread():
        import signal  # system(3) ignores these in the caller while the child runs

        for sig in (signal.SIGINT, signal.SIGQUIT):
            restore.append((sig, signal.signal(sig, signal.SIG_IGN)))
    try:
        try:
            p = Popen(["/bin/sh", "-c", command], close_fds=False)
        except OSError:
            return 127 << 8  # sh could not run: system(3)'s convention
        return _waitstatus(p.wait())
    finally:
        import signal

        for sig, old in restore:
            signal.signal(sig, old)


def _spawnvef(mode: int, file: Any, args: Any, env: Any, func: Callable[..., Any]) -> int:
    """``os.spawnv*``/``spawnl*``: the child through the daemon. ``P_NOWAIT`` returns the
    pid, which ``os.waitpid`` (patched) then waits for through the daemon."""
    from .popen import Popen

    if not isinstance(args, (tuple, list)):
        raise TypeError("argv must be a tuple or a list")
    if not args or not args[0]:
        raise ValueError("argv first element cannot be empty")
    path = os.fsdecode(file)
    if func in (os.execvp, os.execvpe):
        from shutil import which

        found = which(path, path=(env or os.environ).get("PATH", os.defpath)) \
            if os.sep not in path else path
        path = found or path
    elif os.sep not in path:
        path = os.path.join(os.curdir, path)
    p = Popen(list(args), executable=path, env=env, close_fds=False)
    if mode == os.P_NOWAIT:
        _nowait.append(p)  # keeps its Child (and pidfd) alive until waited for
        return p.pid
    return p.wait()


_nowait: list[subprocess.Popen] = []
_os_waitpid = os.waitpid


def waitpid(pid: int, options: int) -> tuple[int, int]:
    """``os.waitpid``, which also waits for a daemon child this process started by pid.

    Only a positive pid can be matched: ``waitpid(-1 | 0 | -pgid)`` sees local children only,
    since the daemon's children are not ours (see docs/install.md)."""
    from .popen import children

    child = children.get(pid) if pid > 0 else None
    if child is None:
        return _os_waitpid(pid, options)
    rc = child.wait(0 if options & os.WNOHANG else None)
    if rc is None:
        return (0, 0)
    children.pop(pid, None)
    _nowait[:] = [p for p in _nowait if p.pid != pid]
    return (pid, _waitstatus(rc))


def _install_subprocess() -> None:
    _patch(subprocess.Popen, "_execute_child", _execute_child)
    _patch(os, "system", system)
    _patch(os, "_spawnvef", _spawnvef)
    _patch(os, "waitpid", waitpid)


# -- multiprocessing and concurrent.futures ---------------------------------------------

def _install_multiprocessing() -> None:
    from multiprocessing import context

    from .mp import _registered

    ctx = _registered()
    # The default (what get_context()/Pool()/ProcessPoolExecutor() use), not the chosen
    # one: set_start_method(...) still works, and a method already chosen is kept.
    _patch(context._default_context, "_default_context", ctx)


# -- asyncio ------------------------------------------------------------------------------

def _install_asyncio() -> None:
    """asyncio's module functions go to the async face. ``loop.subprocess_exec/shell`` keep
    asyncio's own transports, whose ``Popen`` is the daemon's (patched above) and whose
    child watcher's ``os.waitpid`` is emulated."""
    import asyncio as _asyncio
    import asyncio.subprocess as _asub

    from . import asyncio as face

    for name in ("create_subprocess_exec", "create_subprocess_shell"):
        fn = getattr(face, name)
        _patch(_asyncio, name, fn)
        _patch(_asub, name, fn)


# -- the fork fence -----------------------------------------------------------------------

def _caller() -> str:
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename == __file__:
        f = f.f_back
    if f is None:
        return "<unknown>"
    return f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}()"


#: The one local process the client itself may start: its private daemon (autostart).
_ALLOWED_CALLERS = (f"{__package__}.autostart",)


def _forbidden(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_globals.get("__name__") in _ALLOWED_CALLERS:
            return original(*args, **kwargs)
        raise ForkForbidden(
            f"{name}() called from {_caller()}: this process runs under "
            "spawnd_client.install(forbid_fork=True), which forbids creating processes "
            "locally. Start it through spawnd (subprocess.Popen, os.system and "
            "multiprocessing are routed there), or drop forbid_fork.")

    refuse.__name__ = name.rpartition(".")[2]
    refuse.__qualname__ = refuse.__name__
    return refuse


def _install_fence() -> None:
    import _posixsubprocess

    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            _patch(os, name, _forbidden(f"os.{name}", getattr(os, name)))
    _patch(_posixsubprocess, "fork_exec",
           _forbidden("_posixsubprocess.fork_exec", _posixsubprocess.fork_exec))
