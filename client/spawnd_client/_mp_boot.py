"""The child side of the spawnd start method: what runs first in the new interpreter.

The daemon starts ``python -c "...; from spawnd_client._mp_boot import main; main({...})"``.
``main`` registers the "spawnd" start method *before* ``spawn.prepare()`` calls
``set_start_method(...)`` (which would fail on an unknown name), then runs CPython's own
spawn bootstrap (``spawn._main``), so a spawnd child behaves like a ``spawn`` child.

Fixed fd layout, so every start of one context looks the same to the daemon's warm pool:

* 1, 2: the parent's stdout/stderr (0 is ``/dev/null``; ``_bootstrap`` closes stdin anyway);
* 3 (``PAYLOAD_FD``): a stream socket to the parent. It first carries a small header with
  the fds the pickled objects refer to (``Popen.duplicate_for_child``: pipes, connections,
  heap arenas) as SCM_RIGHTS, then the pickled preparation data and process object — what
  ``popen_spawn_posix`` writes to a pipe. Pickles refer to passed fds by index
  (:class:`DupFd`), like forkserver's, because their numbers here are not the parent's.
  Its EOF is the child's parent sentinel, as the pipe's is for ``spawn``.
* 4 (``TRACKER_FD``): the write end of the resource tracker's pipe.

In a warm-pool process (``SPAWND_WARM_FD`` set by the daemon, see ``spawnd/pool.py``),
those numbers hold ``/dev/null`` placeholders while the process imports its preload list
(the parent's ``__main__`` as ``__mp_main__`` included, like forkserver's preload). It then
waits on the control socket for the handoff, moves the fds into place and carries on
exactly like a cold child.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import struct
import sys
import types

# What runs before the target is kept to what the stdlib ``spawn`` child imports anyway
# (socket, array, struct come with multiprocessing.reduction): no typing, no collections.abc,
# not even the ``spawnd`` package (see ``_received_fds``). tests/test_mp_boot.py checks it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any, NoReturn

PAYLOAD_FD = 3
TRACKER_FD = 4
WARM_FD_ENV = "SPAWND_WARM_FD"
#: Handoff from the daemon (mirrors spawnd/pool.py): magic, n, then n int32 target fds.
HANDOFF_MAGIC = b"SPWH"
HANDOFF_HEADER = struct.Struct("<4sI")
READY = b"R"  # to the daemon: imports done, waiting for a handoff
TOOK = b"A"  # to the daemon: the handoff's fds are in place
#: First bytes on PAYLOAD_FD from the parent: magic and how many fds come with them.
PAYLOAD_MAGIC = b"SPMP"
PAYLOAD_HEADER = struct.Struct("<4sI")
MAX_PASSED_FDS = 253  # SCM_MAX_FD: what one sendmsg can carry

#: Imported by every warm process whatever its preload list: what unpickling a Pool or
#: ProcessPoolExecutor worker needs anyway, so a warm start does not pay for it.
ALWAYS_PRELOAD = (
    "multiprocessing.spawn", "multiprocessing.connection", "multiprocessing.queues",
    "multiprocessing.synchronize", "multiprocessing.pool", "concurrent.futures.process",
)

_inherited: list[int] = []


class DupFd:
    """An fd that travelled with the payload, pickled as its index among them."""

    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:
        return _inherited[self.index]


class _DeferredInit(types.ModuleType):
    """The ``spawnd_client`` package before its ``__init__`` has run (see below)."""

    def __getattr__(self, name: str) -> Any:
        self.__class__ = types.ModuleType
        self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]
        return getattr(self, name)


def defer_package_init() -> None:
    """Let a child import our submodules without running ``spawnd_client/__init__.py``.

    The package's ``__init__`` imports the whole client (protocol, msgpack, subprocess):
    ~15-20 ms that a child only needs if it starts processes itself. The ``-c`` bootstrap
    puts the package in ``sys.modules`` uninitialised; this makes its first attribute
    access (``spawnd_client.Client``, ``from spawnd_client import x``) run ``__init__``,
    so nothing can tell the difference. Our own modules import submodules directly
    (``from .mp import x``, never ``from . import mp``) to keep it deferred.
    """
    pkg = sys.modules.get(__package__ or "")
    if (pkg is not None and type(pkg) is types.ModuleType and "Client" not in vars(pkg)
            and pkg.__spec__ is not None and pkg.__spec__.loader is not None):
        pkg.__class__ = _DeferredInit


def main(options: dict[str, Any]) -> NoReturn:
    """Entry point of every spawnd child (the daemon runs it with ``-c``)."""
    defer_package_init()
    from .mp import _setup_child

    _setup_child(options)
    ctl = os.environ.pop(WARM_FD_ENV, None)
    if ctl is not None:
        sock = socket.socket(fileno=int(ctl))
        prep = options.get("prep")
        if prep is not None:
            _preload(prep, options.get("preload", ()), lambda: _pending(sock))
        _await_handoff(sock)
    _inherited[:] = _receive_fds(PAYLOAD_FD)
    from multiprocessing import resource_tracker, spawn

    if is_open(TRACKER_FD):
        resource_tracker._resource_tracker._fd = TRACKER_FD
    parent_sentinel = os.dup(PAYLOAD_FD)
    sys.exit(spawn._main(PAYLOAD_FD, parent_sentinel))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _pending(sock: socket.socket) -> bool:
    """A request (or EOF) is already waiting: stop preloading, go and serve it."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(0))


def _preload(prep: Mapping[str, Any], modules: Iterable[str],
             pending: Callable[[], bool] = lambda: False) -> None:
    """Import what a child of this parent will need, as ``prepare()`` would, ahead of time.

    Errors are swallowed: ``prepare()`` repeats the main-module import after the handoff,
    where a failure reaches the real stderr and exit status as it would with ``spawn``.
    Stops as soon as ``pending()``: a process handed a request while it boots (or started
    for one) then costs what a cold start costs, not the imports its target may not need.
    """
    from multiprocessing import process, spawn

    if pending():
        return
    if "sys_path" in prep:
        sys.path[:] = prep["sys_path"]
    if "sys_argv" in prep:
        sys.argv[:] = prep["sys_argv"]
    if "orig_dir" in prep:
        process.ORIGINAL_DIR = prep["orig_dir"]
    modules = list(modules)
    if "__main__" in modules:  # first: prepare() needs it anyway, the rest only may
        current = process.current_process()
        current._inheriting = True  # type: ignore[attr-defined]  # main must not start processes
        try:
            if prep.get("init_main_from_name"):
                spawn._fixup_main_from_name(prep["init_main_from_name"])
            elif prep.get("init_main_from_path"):
                spawn._fixup_main_from_path(prep["init_main_from_path"])
        except BaseException:  # noqa: BLE001 - reported by prepare() after the handoff
            pass
        finally:
            del current._inheriting  # type: ignore[attr-defined]
    for name in (*ALWAYS_PRELOAD, *modules):
        if name != "__main__" and not pending():
            _try_import(name)


def _try_import(name: str) -> None:
    try:
        __import__(name)
    except Exception:  # noqa: BLE001 - like forkserver: a preload is only a hint
        pass


def _received_fds(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """``spawnd.fdpass.received_fds``, repeated here so a child never imports ``spawnd``."""
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(blob[: len(blob) - len(blob) % a.itemsize])
            fds.extend(a)
    return fds


def _recv_handoff(sock: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
    return sock.recvmsg(HANDOFF_HEADER.size + 4 * MAX_PASSED_FDS,
                        socket.CMSG_SPACE(4 * MAX_PASSED_FDS), socket.MSG_CMSG_CLOEXEC)


def _await_handoff(sock: socket.socket) -> None:
    """Block until the daemon hands this process a request's fds; install them.

    Says READY before it blocks (unless a request is already there) and TOOK once the fds
    are in place: until then the daemon can still give the request to another process."""
    try:
        if not _pending(sock):
            sock.send(READY)
        try:
            msg, anc, flags, _ = _recv_handoff(sock)
        except ConnectionResetError:
            # The daemon closed its end with something of ours unread (our READY):
            # the kernel reports that once, ahead of the handoff still queued for us.
            msg, anc, flags, _ = _recv_handoff(sock)
    except OSError:  # the daemon is gone
        msg = b""
    if not msg:  # retired by the daemon (idle timeout, shutdown) before any request
        os._exit(0)
    fds = _received_fds(anc)
    magic, n = HANDOFF_HEADER.unpack_from(msg)
    targets = struct.unpack_from(f"<{n}i", msg, HANDOFF_HEADER.size)
    if magic != HANDOFF_MAGIC or len(fds) != n or flags & socket.MSG_CTRUNC:
        os._exit(70)  # EX_SOFTWARE: a daemon speaking another handoff; nothing is in place
    for stream in (sys.stdout, sys.stderr):  # preload output must not reach the new files
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001
            pass
    for fd, target in zip(fds, targets, strict=True):
        os.dup2(fd, target)
    for fd in fds:
        if fd not in targets:
            os.close(fd)
    try:
        sock.send(TOOK)
    except OSError:
        pass  # the daemon is gone; the request's fds are in place all the same
    sock.close()
    # The interpreter chose block buffering when fd 1 was /dev/null; a cold start onto a
    # terminal would have line buffering.
    if sys.stdout is not None and os.isatty(1) and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def _receive_fds(fd: int) -> list[int]:
    """Read the payload header and the fds passed with it, leaving the pickles unread."""
    sock = socket.socket(fileno=fd)
    try:
        header = b""
        fds: list[int] = []
        while len(header) < PAYLOAD_HEADER.size:
            msg, anc, flags, _ = sock.recvmsg(PAYLOAD_HEADER.size - len(header),
                                              socket.CMSG_SPACE(4 * MAX_PASSED_FDS),
                                              socket.MSG_CMSG_CLOEXEC)
            fds.extend(_received_fds(anc))
            if flags & socket.MSG_CTRUNC:
                raise OSError(errno.EMFILE, "fds passed by the parent were lost (MSG_CTRUNC)")
            if not msg:
                raise EOFError("the parent closed the connection before sending the process")
            header += msg
    finally:
        sock.detach()
    magic, n = PAYLOAD_HEADER.unpack(header)
    if magic != PAYLOAD_MAGIC or n != len(fds):
        raise RuntimeError(f"bad spawnd payload header {header!r} with {len(fds)} fds")
    return fds
