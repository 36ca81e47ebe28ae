"""The embedded default: a private daemon for this process, started once with posix_spawn.

Like multiprocessing's forkserver, it is started on first need; unlike it, nothing forks.
The daemon holds one end of a socketpair (its lifeline): when this process exits, the
end closes, and the daemon stops and ends the children it started for us.

Autostart is a fallback for programs that configured nothing: it applies only when no
socket was configured at all (no explicit path, no ``$SPAWND_SOCKET``). A configured socket
that does not answer is an error naming it (:func:`socket_choice`).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading

from spawnd.paths import default_socket_path

from .errors import DaemonUnavailable

_lock = threading.Lock()
_path: str | None = None
_lifeline: socket.socket | None = None
_pid: int | None = None


def socket_choice(path: str | None, autostart: bool | None) -> tuple[str, bool]:
    """(socket path, may autostart) for a client given ``path``/``autostart`` arguments.

    Autostart (on unless ``autostart=False`` or ``SPAWND_AUTOSTART=0``) is allowed only
    when neither ``path`` nor ``$SPAWND_SOCKET`` names a socket: a typo there must not
    quietly bypass the system daemon and its policy. Shared by the blocking and async
    clients.
    """
    configured = path or os.environ.get("SPAWND_SOCKET") or None
    if autostart is None:
        autostart = os.environ.get("SPAWND_AUTOSTART", "1") != "0"
    return configured or default_socket_path(), bool(autostart) and configured is None


def _after_fork_in_child() -> None:
    """A forked child shares the parent's private daemon (its copy of the lifeline keeps it
    alive) but is not its parent: never waitpid it, nor start one while it answers."""
    global _lock, _pid
    _lock = threading.Lock()
    _pid = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def private_daemon() -> str:
    """The socket path of this process's private daemon, starting it if needed."""
    global _path, _lifeline, _pid
    with _lock:
        if _pid is None and _path is not None and not _answers(_path):
            _path = _lifeline = None  # inherited through fork and gone since
        if _pid is not None:
            try:
                done, _ = os.waitpid(_pid, os.WNOHANG)
            except ChildProcessError:
                done = _pid
            if done:  # it died (crash, or someone killed it): start another
                _path = _lifeline = _pid = None
        if _path is not None:
            return _path
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        sockdir = tempfile.mkdtemp(prefix="spawnd-", dir=runtime if runtime and
                                   os.path.isdir(runtime) else None)
        path = os.path.join(sockdir, "spawnd.sock")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        import spawnd

        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(spawnd.__file__)))
        argv = [sys.executable, "-m", "spawnd", "serve", "--socket", path,
                "--lifeline", "3", "--ready-fd", "3", "--log-level",
                os.environ.get("SPAWND_LOG_LEVEL", "warning")]
        env = {"PATH": os.defpath, "PYTHONPATH": pkg_root}
        try:
            pid = os.posix_spawn(sys.executable, argv, env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
            ], setsid=True)
        finally:
            theirs.close()
        ours.settimeout(30)
        try:
            ready = ours.recv(64)
        except OSError as e:
            ready = b""
            err = e
        else:
            err = None
        if not ready.startswith(b"ready"):
            ours.close()
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            raise DaemonUnavailable(0, f"the private spawnd daemon did not start ({err or 'exited'})",
                                    path)
        ours.settimeout(None)
        _path, _lifeline, _pid = path, ours, pid
        return path


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
