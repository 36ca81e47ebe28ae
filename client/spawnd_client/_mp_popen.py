"""The parent side of the spawnd start method: a ``Popen`` that asks the daemon.

Modelled on ``multiprocessing.popen_spawn_posix``: pickle the preparation data and the
process object while "spawning" (so ``DupFd`` and ``assert_spawning`` work), start a fresh
interpreter, hand it the pickles. The differences are the point: the interpreter is started
by the daemon (this process never forks or vforks), it is not our child (so no ``waitpid``:
``sentinel`` is the child's pidfd, readable at exit, and the exact status comes from the
daemon's exit event), and the payload travels on a socket so the passed fds can go with it.
"""

from __future__ import annotations

import io
import os
import select
import signal
import socket
from collections.abc import Mapping
from multiprocessing import spawn, util
from multiprocessing.context import reduction, set_spawning_popen
from typing import TYPE_CHECKING, Any

from spawnd import fdpass

from ._mp_boot import (
    MAX_PASSED_FDS,
    PAYLOAD_FD,
    PAYLOAD_HEADER,
    PAYLOAD_MAGIC,
    TRACKER_FD,
    DupFd,
    is_open,
)

if TYPE_CHECKING:
    from .client import Child, Client
    from .mp import SpawndContext

__all__ = ["Popen", "boot_argv", "spawn_child"]

#: Returncode reported when the daemon connection died before the exit status arrived
#: (the pidfd says the process ended, but only the daemon could reap it).
LOST_STATUS = 255

# The prep data a warm process needs before its request: enough to import __main__ the
# way prepare() will. Never the authkey: argv is world-readable in /proc.
_STATIC_PREP = ("sys_path", "sys_argv", "orig_dir", "dir", "init_main_from_name",
                "init_main_from_path")


def spawn_child(client: Client, argv: list[str], fds: Mapping[int, int], *,
                cwd: str | None, on_disconnect: str, grace: float,
                warm: dict[str, Any] | None) -> Child:
    """Start one boot process: our env (``env=None``), the given fds, maybe from the pool."""
    return client.spawn(argv, fds=fds, cwd=cwd, on_disconnect=on_disconnect, grace=grace,
                        warm=warm)


def _import_roots() -> list[str]:
    """Directories the child needs on sys.path to import us, wherever we were found."""
    import spawnd

    from . import __file__ as ours

    roots = [os.path.dirname(os.path.dirname(os.path.abspath(p)))
             for p in (ours, spawnd.__file__ or "")]
    return list(dict.fromkeys(roots))


def boot_argv(ctx: SpawndContext, prep_data: Mapping[str, Any], socket_path: str) -> list[str]:
    """The child's command line. It is part of the warm pool key, so it holds only what is
    the same for every start of ``ctx``."""
    o = ctx.options
    opts: dict[str, Any] = {
        "socket": socket_path, "warm": o.warm, "idle_timeout": o.idle_timeout,
        "preload": list(o.preload), "on_disconnect": o.on_disconnect, "grace": o.grace,
    }
    if o.warm:
        opts["prep"] = {k: prep_data[k] for k in _STATIC_PREP if k in prep_data}
    # The package is put in sys.modules uninitialised (see _mp_boot.defer_package_init).
    code = (f"import sys,importlib.util as u;sys.path[:0]={_import_roots()!r};"
            "s=u.find_spec('spawnd_client');sys.modules[s.name]=u.module_from_spec(s);"
            f"from spawnd_client._mp_boot import main;main({opts!r})")
    exe = os.fsdecode(spawn.get_executable())
    return [exe, *util._args_from_interpreter_flags(), "-c", code, "--multiprocessing-fork"]


def _warm_request(warm: int | str, idle_timeout: float) -> dict[str, Any] | None:
    """The request's ``warm``: "auto" asks the daemon to size the pool from demand, capped
    at this machine's CPUs (spawnd/pool.py); an int is a fixed size; 0 is none."""
    if warm == "auto":
        from .mp import MAX_WARM

        return {"size": min(MAX_WARM, os.cpu_count() or 1), "idle_timeout": idle_timeout,
                "auto": True}
    return {"size": warm, "idle_timeout": idle_timeout} if warm else None


def _preparation_data(name: str) -> dict[str, Any]:
    """``spawn.get_preparation_data`` without its side effect: it calls
    ``get_start_method()``, which fixes the default context, so a later
    ``set_start_method()`` would raise although this program never chose one."""
    from multiprocessing import context

    default = context._default_context
    unset = default._actual_context is None
    data = spawn.get_preparation_data(name)
    if unset:
        default._actual_context = None
    return data


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _release(sock: socket.socket, child: Child) -> None:
    sock.close()
    child.close()


class Popen:
    """What ``Process._popen`` is for the spawnd method (see ``popen_fork.Popen``)."""

    method = "spawnd"
    DupFd = DupFd

    def __init__(self, process_obj: Any, ctx: SpawndContext) -> None:
        util._flush_std_streams()
        self.returncode: int | None = None
        self.finalizer: util.Finalize | None = None
        self.pid: int | None = None
        self.sentinel: int | None = None
        self._child: Child | None = None
        self._fds: list[int] = []
        self._launch(process_obj, ctx)

    def duplicate_for_child(self, fd: int) -> int:
        """Called while pickling: ``fd`` goes with the payload; the child finds it by index."""
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj: Any, ctx: SpawndContext) -> None:
        from ._mp_tracker import getfd_for

        tracker_fd = getfd_for(ctx)
        prep_data = _preparation_data(process_obj._name)
        fp = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            set_spawning_popen(None)
        if len(self._fds) > MAX_PASSED_FDS:
            raise ValueError(f"a process can be passed at most {MAX_PASSED_FDS} fds "
                             f"(pipes, connections, arenas); this one needs {len(self._fds)}")
        client = ctx.client()
        o = ctx.options
        ours, theirs = socket.socketpair()
        try:
            # Write the payload before asking for the process, as far as the socket buffer
            # takes it: a warm process then finds it waiting at the handoff and unpickles
            # while the reply is still on its way to us. The rest follows the reply.
            payload = memoryview(fp.getbuffer())
            sent = self._send_ahead(ours, payload)
            fds = {PAYLOAD_FD: theirs.fileno(), TRACKER_FD: tracker_fd}
            for std in (1, 2):
                if is_open(std):
                    fds[std] = std
            argv = boot_argv(ctx, prep_data, client.transport().path)
            warm = _warm_request(o.warm, o.idle_timeout)
            child = spawn_child(client, argv, fds, cwd=os.getcwd(),
                                on_disconnect=o.on_disconnect, grace=o.grace, warm=warm)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._child = child
        self.pid = child.pid
        self.finalizer = util.Finalize(self, _release, (ours, child))
        if child.pidfd is None:
            child.kill()
            raise OSError("spawnd sent no pidfd for the child (Linux >= 5.3 is needed)")
        self.sentinel = child.pidfd
        if sent < len(payload):
            ours.setblocking(True)
            ours.sendall(payload[sent:])

    def _send_ahead(self, sock: socket.socket, payload: memoryview) -> int:
        """Send the header (with the passed fds) and as much of ``payload`` as fits now."""
        anc = fdpass.ancillary(self._fds)
        sock.sendmsg([PAYLOAD_HEADER.pack(PAYLOAD_MAGIC, len(self._fds))], anc)  # 8 bytes
        sock.setblocking(False)
        sent = 0
        try:
            while sent < len(payload):
                sent += sock.send(payload[sent:])
        except BlockingIOError:
            pass
        return sent

    # -- the process's state
    def poll(self, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None and self._child is not None:
            if flag & os.WNOHANG and not _readable(self._child.pidfd):  # type: ignore[arg-type]
                return None
            # The pidfd is readable: the process has exited and the daemon's exit event,
            # which carries the exact status, is on its way (it reaps on the same pidfd).
            try:
                self.returncode = self._child.wait()
            except ConnectionError:
                util.info("spawnd connection lost: exit status of %s unknown", self.pid)
                self.returncode = LOST_STATUS
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            if timeout is not None:
                from multiprocessing.connection import wait

                if not wait([self.sentinel], timeout):
                    return None
            return self.poll(os.WNOHANG if timeout == 0.0 else 0)
        return self.returncode

    def _send_signal(self, sig: int) -> None:
        if self.returncode is not None or self._child is None or self._child.pidfd is None:
            return
        self._child.send_signal(sig)  # pidfd first; the daemon only if that is refused (EPERM)

    def interrupt(self) -> None:  # Process.interrupt() (3.14)
        self._send_signal(signal.SIGINT)

    def terminate(self) -> None:
        self._send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self._send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.finalizer is not None:
            self.finalizer()
