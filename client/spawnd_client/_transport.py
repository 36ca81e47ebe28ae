"""One blocking connection to the daemon, shared safely by many threads.

Requests carry ids. There is no reader thread: whichever waiting thread finds nobody
reading becomes the reader (leader/follower), routes what arrives (replies to their
requests, exit events to their children) and wakes the others. A reply thus reaches the
thread that wants it without a thread hand-off in the common case, which is most of a
spawn's round trip on a busy machine. Sends are serialised by a lock so a frame and its
fds always travel in one ``sendmsg``. The client never creates a process of its own.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from spawnd import fdpass
from spawnd import protocol as P

from .errors import DaemonConnectionError, DaemonUnavailable, error_to_exception

RECV_SIZE = 256 * 1024
FD_SPACE = socket.CMSG_SPACE(8 * 4)  # the daemon sends at most one pidfd per message
CLOSE_READ_TIMEOUT = 2.0  # after EPIPE, how long the daemon's last words may take to read


def off_stdio(fd: int) -> int:
    """Move one of our own fds (the socket, a received pidfd) above 2.

    In a process whose stdio is closed they would land on 0-2, and ``Popen(stdin=None)``,
    which passes our fd 0 as the child's stdin, would hand a child our daemon connection.
    """
    if fd > 2:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    if sock.fileno() <= 2:
        fd = off_stdio(sock.detach())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
    return sock


def check_frame_size(data: bytes) -> None:
    """A request over the daemon's frame limit fails here, alone, like exec would (E2BIG)."""
    if len(data) > P.HEADER.size + P.MAX_FRAME:
        raise OSError(errno.E2BIG, f"request of {len(data)} bytes is over spawnd's limit of "
                      f"{P.MAX_FRAME} bytes per message")


class _Waiter:
    __slots__ = ("done", "reply", "on_spawned")

    def __init__(self, on_spawned: Callable[[P.Spawned], Any] | None) -> None:
        self.done = False
        self.reply: Any = None
        self.on_spawned = on_spawned


class Transport:
    """A connected, hello-checked socket plus its reader thread."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = new_socket()
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
        # _lock guards everything below; a thread holds it except while blocked reading.
        self._lock = threading.Lock()
        self._reading = False
        self._followers: dict[threading.Condition, Callable[[], bool]] = {}
        self._waiters: dict[int, _Waiter] = {}
        self.broken: BaseException | None = None
        self.daemon_pid: int | None = None
        self.exit_handlers: dict[int, Callable[[P.Exit | BaseException], None]] = {}
        #: A connection-level error the daemon sent before closing (e.g. EPERM: our uid
        #: may not use it); it is what every request on this connection then raises.
        self.refusal: P.Error | None = None
        try:
            self._send_raw(P.Hello(agent="spawnd_client"), [])
            sent = True
        except (BrokenPipeError, ConnectionResetError):
            # A daemon that refuses our uid answers at accept and closes at once: what it
            # sent before closing, then EOF, is still ours to read.
            sent = False
        if not self.wait_for(lambda: (sent and self.daemon_pid is not None)
                             or self.broken is not None, timeout) or self.broken is not None:
            self.close()
            if self.refusal is not None:
                raise error_to_exception(self.refusal)
            raise DaemonUnavailable(errno.ETIMEDOUT if self.broken is None else errno.EPROTO,
                                    f"spawnd at {path} did not complete the handshake: "
                                    f"{self.broken or 'timed out'}", path)

    # -- sending
    def next_id(self) -> int:
        return next(self._ids)

    def _send_raw(self, event: P.Event, fds: list[int]) -> None:
        self._send_bytes(self.proto.send(event), fds)

    def _send_bytes(self, data: bytes, fds: list[int]) -> None:
        anc = fdpass.ancillary(fds)
        with self._send_lock:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])

    def request(self, event: P.Event, fds: list[int] | None = None, *,
                on_spawned: Callable[[P.Spawned], Any] | None = None,
                timeout: float | None = None) -> Any:
        """Send ``event`` and block until its reply; raise the reply's error as an exception.

        ``on_spawned`` runs while the reply is routed, before any later event is read, so a
        child's exit handler is in place before its exit event can arrive.
        """
        rid: int = event.id  # type: ignore[attr-defined]
        data = self.proto.send(event)
        check_frame_size(data)  # the daemon would drop the whole connection for it
        w = _Waiter(on_spawned)
        with self._lock:
            if self.broken is not None:
                raise self._lost()
            self._waiters[rid] = w
        try:
            self._send_bytes(data, fds or [])
        except OSError as e:
            if isinstance(e, (BrokenPipeError, ConnectionResetError)):
                # Closed on us: read why (a refusal the daemon sent first), up to its EOF.
                self.wait_for(lambda: self.broken is not None, CLOSE_READ_TIMEOUT)
            with self._lock:
                self._waiters.pop(rid, None)
                self._fail(e)
                lost = self._lost()
            raise lost from e
        if not self.wait_for(lambda: w.done, timeout):
            with self._lock:
                self._waiters.pop(rid, None)
            raise TimeoutError(f"spawnd did not answer request {rid} within {timeout}s")
        if isinstance(w.reply, BaseException):
            raise w.reply
        if isinstance(w.reply, P.Error):
            raise error_to_exception(w.reply)
        return w.reply

    # -- receiving
    def wait_for(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until ``done()`` (checked under the lock), reading the socket if nobody is.

        Returns False on timeout. ``timeout=0`` drains what has already arrived. Followers
        sleep on their own condition: a read wakes only those whose wait it ended, and a
        leaving reader hands the socket to one waiting thread (no thundering herd).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        me: threading.Condition | None = None
        with self._lock:
            try:
                while not done():
                    remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                    if self.broken is not None and not self._reading:
                        return done()
                    if not self._reading:
                        self._reading = True
                        try:
                            self._read_once(remaining)
                        finally:
                            self._reading = False
                            self._wake(lambda d: d())
                    elif remaining == 0:
                        return done()
                    else:
                        if me is None:
                            me = threading.Condition(self._lock)
                            self._followers[me] = done
                        me.wait(remaining)
                    if deadline is not None and time.monotonic() >= deadline:
                        return done()
                return True
            finally:
                if me is not None:
                    del self._followers[me]
                if not self._reading:  # leaving: someone still waiting must read next
                    self._wake(lambda d: not d(), first_only=True)

    def _wake(self, which: Callable[[Callable[[], bool]], bool], first_only: bool = False) -> None:
        """Notify followers whose predicate satisfies ``which`` (lock held)."""
        for cond, done in self._followers.items():
            if which(done):
                cond.notify()
                if first_only:
                    return

    def _read_once(self, timeout: float | None) -> None:
        """Called with the lock held and ``_reading`` set; drops the lock while blocked."""
        self._lock.release()
        try:
            if not select.select([self.sock], [], [], timeout)[0]:
                return
            data, anc, _, _ = self.sock.recvmsg(RECV_SIZE, FD_SPACE,
                                                socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            error: OSError | None = e
        else:
            error = None
        finally:
            self._lock.acquire()
        if error is not None:
            self._fail(error)
            return
        fds = [off_stdio(fd) for fd in fdpass.received_fds(anc)]
        try:
            self.proto.receive_data(data, fds)
            while (ev := self.proto.next_event()) is not None:
                self._route(ev)
        except P.ProtocolError as e:
            self._fail(e)
            return
        if not data:
            self._fail(DaemonConnectionError("spawnd closed the connection"))

    def _route(self, ev: P.Event) -> None:
        if isinstance(ev, P.Hello):
            self.daemon_pid = ev.pid
            return
        if isinstance(ev, P.Exit):
            handler = self.exit_handlers.pop(ev.id, None)
            if handler is not None:
                handler(ev)
            return
        rid = getattr(ev, "id", None)
        if rid is None:  # a connection-level error: the daemon will close on us
            if isinstance(ev, P.Error):
                self.refusal = ev
                self._fail(error_to_exception(ev))  # pending requests get the reason too
            return
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
        w.done = True

    def _fail(self, exc: BaseException) -> None:
        """Called with the lock held: the connection is gone; fail every waiter and child."""
        if self.broken is None:
            self.broken = exc
        reason = self._lost()
        for w in self._waiters.values():
            w.reply = reason
            w.done = True
        self._waiters.clear()
        handlers = list(self.exit_handlers.values())
        self.exit_handlers.clear()
        for h in handlers:
            h(reason)
        self._wake(lambda d: True)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _lost(self) -> OSError:
        """What a request on a dead connection raises: the daemon's own reason if it gave
        one (``PermissionError`` for a uid the policy does not admit), else
        :class:`DaemonConnectionError`."""
        if self.refusal is not None:
            return error_to_exception(self.refusal)
        return DaemonConnectionError(f"connection to spawnd lost: {self.broken}")

    def close(self) -> None:
        with self._lock:
            self._fail(DaemonConnectionError("client closed the connection"))
            fds = self.proto.take_unclaimed_fds()
        self.sock.close()
        for fd in fds:
            os.close(fd)
