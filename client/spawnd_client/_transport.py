"""One blocking connection to the daemon, shared safely by many threads.

Requests carry ids; a single reader thread routes replies to the thread that waits for
them and exit events to the child they belong to. Sends are serialised by a lock so a
frame and its fds always travel in one ``sendmsg``. The reader is a thread (not a process):
the client never creates a process of its own.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from spawnd import protocol as P

from .errors import DaemonConnectionError, DaemonUnavailable, error_to_exception

RECV_SIZE = 256 * 1024
FD_SPACE = socket.CMSG_SPACE(8 * 4)  # the daemon sends at most one pidfd per message


class _Waiter:
    __slots__ = ("event", "reply", "on_spawned")

    def __init__(self, on_spawned: Callable[[P.Spawned], Any] | None) -> None:
        self.event = threading.Event()
        self.reply: Any = None
        self.on_spawned = on_spawned


class Transport:
    """A connected, hello-checked socket plus its reader thread."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self.sock.settimeout(None)
        except OSError as e:
            self.sock.close()
            raise DaemonUnavailable(e.errno or errno.ECONNREFUSED,
                                    f"no spawnd daemon answers at {path}: {e.strerror}",
                                    path) from None
        self.proto = P.Connection("client")
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._lock = threading.Lock()  # guards _waiters and broken
        self.broken: BaseException | None = None
        self.daemon_pid: int | None = None
        self.exit_handlers: dict[int, Callable[[P.Exit], None]] = {}
        self._hello = threading.Event()
        self._send_raw(P.Hello(agent="spawnd_client"), [])
        self._reader = threading.Thread(target=self._read_loop, name="spawnd-client-reader",
                                        daemon=True)
        self._reader.start()
        if not self._hello.wait(timeout) or self.broken is not None:
            self.close()
            raise DaemonUnavailable(errno.ETIMEDOUT if self.broken is None else errno.EPROTO,
                                    f"spawnd at {path} did not complete the handshake: "
                                    f"{self.broken or 'timed out'}", path)

    # -- sending
    def next_id(self) -> int:
        return next(self._ids)

    def _send_raw(self, event: P.Event, fds: list[int]) -> None:
        data = self.proto.send(event)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with self._send_lock:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])

    def request(self, event: P.Event, fds: list[int] | None = None, *,
                on_spawned: Callable[[P.Spawned], Any] | None = None,
                timeout: float | None = None) -> Any:
        """Send ``event`` and block until its reply; raise the reply's error as an exception.

        ``on_spawned`` runs in the reader thread before any later event is read, so a
        child's exit handler is in place before its exit event can arrive.
        """
        rid: int = event.id  # type: ignore[attr-defined]
        w = _Waiter(on_spawned)
        with self._lock:
            if self.broken is not None:
                raise DaemonConnectionError(f"connection to spawnd lost: {self.broken}")
            self._waiters[rid] = w
        try:
            self._send_raw(event, fds or [])
        except OSError as e:
            with self._lock:
                self._waiters.pop(rid, None)
            self._fail(e)
            raise DaemonConnectionError(f"connection to spawnd lost: {e}") from e
        if not w.event.wait(timeout):
            with self._lock:
                self._waiters.pop(rid, None)
            raise TimeoutError(f"spawnd did not answer request {rid} within {timeout}s")
        if isinstance(w.reply, BaseException):
            raise w.reply
        if isinstance(w.reply, P.Error):
            raise error_to_exception(w.reply)
        return w.reply

    # -- receiving
    def _read_loop(self) -> None:
        try:
            while True:
                data, anc, flags, _ = self.sock.recvmsg(RECV_SIZE, FD_SPACE,
                                                        socket.MSG_CMSG_CLOEXEC)
                fds: list[int] = []
                for level, kind, blob in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        a = array.array("i")
                        a.frombytes(blob[: len(blob) - len(blob) % a.itemsize])
                        fds.extend(a)
                self.proto.receive_data(data, fds)
                while (ev := self.proto.next_event()) is not None:
                    self._route(ev)
                if not data:
                    raise DaemonConnectionError("spawnd closed the connection")
        except BaseException as e:  # noqa: BLE001 - every failure ends this connection
            self._fail(e)

    def _route(self, ev: P.Event) -> None:
        if isinstance(ev, P.Hello):
            self.daemon_pid = ev.pid
            self._hello.set()
            return
        if isinstance(ev, P.Exit):
            handler = self.exit_handlers.pop(ev.id, None)
            if handler is not None:
                handler(ev)
            return
        rid = getattr(ev, "id", None)
        if rid is None:  # a connection-level error: the daemon will close on us
            if isinstance(ev, P.Error):
                self.broken = error_to_exception(ev)
            return
        with self._lock:
            w = self._waiters.pop(rid, None)
        if w is None:
            for fd in getattr(ev, "fds_received", ()):
                os.close(fd)
            return
        if isinstance(ev, P.Spawned) and w.on_spawned is not None:
            try:
                w.reply = w.on_spawned(ev)
            except BaseException as e:  # noqa: BLE001 - hand it to the waiting thread
                w.reply = e
        else:
            w.reply = ev
        w.event.set()

    def _fail(self, exc: BaseException) -> None:
        """The connection is gone: wake every waiter and every child with the reason."""
        with self._lock:
            if self.broken is None:
                self.broken = exc
            waiters = list(self._waiters.values())
            self._waiters.clear()
            handlers = list(self.exit_handlers.values())
            self.exit_handlers.clear()
        reason = DaemonConnectionError(f"connection to spawnd lost: {self.broken}")
        for w in waiters:
            w.reply = reason
            w.event.set()
        for h in handlers:
            h(reason)  # type: ignore[arg-type]
        self._hello.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._fail(DaemonConnectionError("client closed the connection"))
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)
        self.sock.close()
        for fd in self.proto.take_unclaimed_fds():
            os.close(fd)
