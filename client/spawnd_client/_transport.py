"""One blocking connection to the daemon, shared safely by many threads.

Requests carry ids. There is no reader thread: whichever waiting thread finds nobody
reading becomes the reader (leader/follower), routes what arrives (replies to their
requests, exit events to their children) and wakes the others. A reply thus reaches the
thread that wants it without a thread hand-off in the common case, which is most of a
spawn's round trip on a busy machine. Sends are serialised by a lock so a frame and its
fds always travel in one ``sendmsg``. The client never creates a process of its own.

Re-entrancy: a signal handler runs in the main thread between two bytecodes, possibly in
the middle of that thread's own read or send. A request made from there (a forwarded
signal the kernel refused to deliver directly) is sent without waiting for its reply
(:meth:`Transport.request` with ``reply=False``; the reply is dropped when it arrives),
or queued behind the interrupted send; it never waits on a read the thread itself is in.

Fork: :meth:`Transport.abandon` is what a forked child does with the parent's connection:
close its own copy of the fd (never ``shutdown()``, which would end the parent's too) and
fail what it had inherited, so its next request connects afresh.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from msgpack import packb as _packb

from spawnd import fdpass
from spawnd import protocol as P

from .errors import (
    DaemonConnectionError,
    DaemonUnavailable,
    RequestNotSent,
    error_to_exception,
)

RECV_SIZE = 256 * 1024
FD_SPACE = socket.CMSG_SPACE(8 * 4)  # the daemon sends at most one pidfd per message
CLOSE_READ_TIMEOUT = 2.0  # after EPIPE, how long the daemon's last words may take to read
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_WIRE = P.HEADER.size + P.MAX_FRAME  # see check_frame_size
#: sendmsg errors that mean the connection is gone (nothing of this message was sent).
_DEAD = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED)


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


def check_peer(sock: socket.socket, path: str) -> None:
    """The listener must run as our own uid or as root, or it gets nothing from us.

    Anyone who binds the path first (a shared directory, a restart window) would otherwise
    receive our environment and stdio and could forge our children's output and status.
    """
    pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _CRED.size))
    me = os.geteuid()
    if uid not in (me, 0):
        raise PermissionError(errno.EPERM, f"the listener at {path} runs as uid {uid} (pid "
                              f"{pid}), neither our uid {me} nor root: not trusting it as "
                              "spawnd", path)


def check_frame_size(data: bytes) -> None:
    """A request over the daemon's frame limit fails here, alone, like exec would (E2BIG)."""
    if len(data) > P.HEADER.size + P.MAX_FRAME:
        raise OSError(errno.E2BIG, f"request of {len(data)} bytes is over spawnd's limit of "
                      f"{P.MAX_FRAME} bytes per message")


def feed(proto: P.Connection, data: bytes, anc: Any, route: Callable[[P.Event], Any]
         ) -> BaseException | None:
    """Hand one ``recvmsg`` (bytes and fds) to the protocol and route every whole event.
    Returns what the connection must fail with (a protocol error, or EOF), else None.
    Shared by the blocking transport and the async connection."""
    fds = [fd if fd > 2 else off_stdio(fd) for fd in fdpass.received_fds(anc)] if anc else []
    try:
        proto.receive_data(data, fds)
        while (ev := proto.next_event()) is not None:
            route(ev)
    except P.ProtocolError as e:
        return e
    if not data:
        return DaemonConnectionError("spawnd closed the connection")
    return None


class SpawnFrame:
    """A Spawn request already encoded: what :func:`~spawnd_client.client.spawn_request`
    returns, so that a request equal to the previous one but for its id reuses its bytes.

    The frame is exactly what ``Connection.send`` makes of the Spawn (``t``, then ``id``,
    then the rest, msgpack's own encoding); only the id and the length header differ.
    Reading a field (``req.argv``) or :attr:`spawn` gives the :class:`~spawnd.protocol.Spawn`
    itself, built only then.
    """

    __slots__ = ("id", "frame", "_head", "_rest", "_base", "_spawn")

    def __init__(self, rid: int, head: bytes, rest: bytes, base: P.Spawn) -> None:
        rid_bytes = _packb(rid) if head else b""  # no head: rest is the whole body
        self.id = rid
        self._head = head  # map header, "t": "spawn", "id" (protocol.split_spawn_id)
        self._rest = rest  # every field after the id
        self._base = base  # the Spawn these bytes encode, but maybe with another id
        self._spawn: P.Spawn | None = base if base.id == rid else None
        self.frame = (P.HEADER.pack(len(head) + len(rid_bytes) + len(rest)) + head
                      + rid_bytes + rest)

    @classmethod
    def encode(cls, req: P.Spawn) -> SpawnFrame:
        body = _packb(req.to_wire(), use_bin_type=True)  # what Connection.send packs
        parts = P.split_spawn_id(body)
        if parts is not None and parts[1] == req.id:
            return cls(req.id, parts[0], parts[2], req)
        # Another layout (not t, then id): sent as encoded, re-encoded for another id.
        return cls(req.id, b"", body, req)

    @property
    def patchable(self) -> bool:
        """Whether :meth:`with_id` reuses these bytes (else it encodes afresh)."""
        return bool(self._head)

    def with_id(self, rid: int) -> SpawnFrame:
        if not self._head:
            return SpawnFrame.encode(replace(self._base, id=rid))
        return SpawnFrame(rid, self._head, self._rest, self._base)

    @property
    def spawn(self) -> P.Spawn:
        """The request as an event (for reading it; the frame is what is sent)."""
        if self._spawn is None:
            self._spawn = replace(self._base, id=self.id)
        return self._spawn

    def to_wire(self) -> dict[str, Any]:
        return self.spawn.to_wire()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # an unset slot (copy, pickle): never recurse via .spawn
            raise AttributeError(name)
        return getattr(self.spawn, name)


def frame_of(event: P.Event | SpawnFrame, proto: P.Connection) -> bytes:
    """The bytes to send for ``event`` (a pre-encoded Spawn, or any event)."""
    if type(event) is SpawnFrame:
        return event.frame
    return proto.send(event)  # type: ignore[arg-type]


class _Waiter:
    __slots__ = ("done", "reply", "on_spawned")

    def __init__(self, on_spawned: Callable[[P.Spawned], Any] | None) -> None:
        self.done = False
        self.reply: Any = None
        self.on_spawned = on_spawned


class _MidFrame(Exception):
    """A send failed after part of the frame left: the stream is unusable."""


class Transport:
    """A connected, peer-checked, hello-checked socket; any waiting thread may read it."""

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
        try:
            check_peer(self.sock, path)
        except BaseException:
            self.sock.close()
            raise
        self.proto = P.Connection("client")
        # RLocks only so a thread can tell that it holds one itself (a signal handler that
        # interrupted it); nothing acquires them recursively.
        self._send_lock = threading.RLock()
        self._deferred: list[tuple[bytes, Any]] = []  # sends queued by a re-entrant caller
        self._ids = itertools.count(1)
        # _lock guards everything below; a thread holds it except while blocked reading.
        self._lock = threading.RLock()
        self._reader: int | None = None  # thread ident of the reader, while it reads
        self._followers: dict[threading.Condition, Callable[[], bool]] = {}
        # One receive buffer, reused by whichever thread reads (there is one at a time):
        # recvmsg(256 KiB) would allocate (mmap) and fault in a fresh one on every read.
        self._buf = bytearray(RECV_SIZE)
        self._waiters: dict[int, _Waiter] = {}
        self.broken: BaseException | None = None
        self.daemon_pid: int | None = None
        self.exit_handlers: dict[int, Callable[[P.Exit | BaseException], None]] = {}
        #: A connection-level error the daemon sent before closing (e.g. EPERM: our uid
        #: may not use it); it is what every request on this connection then raises.
        self.refusal: P.Error | None = None
        try:
            self._send_bytes(self.proto.send(P.Hello(agent="spawnd_client")), [])
            sent = True
        except OSError:
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

    def reentrant(self) -> bool:
        """True when this thread is inside its own read or send on this connection (a
        signal handler that interrupted it): it must not wait for a reply here."""
        return (self._reader == threading.get_ident() or self._lock._is_owned()  # type: ignore[attr-defined]
                or self._send_lock._is_owned())  # type: ignore[attr-defined]

    def _send_bytes(self, data: bytes, fds: list[int]) -> None:
        """One frame and its fds in one ``sendmsg``.

        Raises the ``OSError`` of the first ``sendmsg`` as is (nothing was sent: a closed fd
        is the caller's ``EBADF``, the stream is intact) and :class:`_MidFrame` if the rest
        of a partly sent frame failed.
        """
        anc = fdpass.ancillary(fds)
        lock = self._send_lock
        if lock._is_owned():  # type: ignore[attr-defined]
            self._deferred.append((data, anc))  # the interrupted send flushes it
            return
        with lock:
            self._send_locked(data, anc)
            if self._deferred:
                self._flush_deferred()
        if self._deferred:  # queued by a handler between our flush and the release
            with lock:
                self._flush_deferred()

    def _send_locked(self, data: bytes, anc: Any) -> None:
        sent = self.sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
        if sent < len(data):
            try:
                self.sock.sendall(memoryview(data)[sent:], socket.MSG_NOSIGNAL)
            except OSError as e:
                raise _MidFrame(e) from e

    def _flush_deferred(self) -> None:
        while self._deferred:
            data, anc = self._deferred.pop(0)
            try:
                self._send_locked(data, anc)
            except (OSError, _MidFrame):
                pass  # fire-and-forget; a dead connection shows at the next read

    def request(self, event: P.Event | SpawnFrame, fds: list[int] | None = None, *,
                on_spawned: Callable[[P.Spawned], Any] | None = None,
                timeout: float | None = None, reply: bool = True) -> Any:
        """Send ``event`` and block until its reply; raise the reply's error as an exception.

        ``on_spawned`` runs while the reply is routed, before any later event is read, so a
        child's exit handler is in place before its exit event can arrive.
        ``reply=False`` may send without waiting (and returns None) when waiting would
        deadlock: the calling thread is itself inside a read or send of this connection.
        Raises :class:`RequestNotSent` when the connection was found dead before anything
        of the request left (the caller may resend it on a new connection).
        """
        rid: int = event.id  # type: ignore[attr-defined]
        data = frame_of(event, self.proto)
        if len(data) > _MAX_WIRE:
            check_frame_size(data)  # the daemon would drop the whole connection for it
        if self.reentrant():
            if reply:
                raise RuntimeError("a spawnd request that needs its reply cannot be made from "
                                   "a signal handler that interrupted this thread's own "
                                   "request or wait")
            if self.broken is not None:
                raise self._not_sent()
            try:
                self._send_bytes(data, fds or [])
            except _MidFrame as e:
                raise DaemonConnectionError(f"connection to spawnd lost: {e}") from None
            except OSError as e:
                if e.errno in _DEAD:
                    raise self._not_sent(e) from e
                raise
            return None
        w = _Waiter(on_spawned)
        with self._lock:
            if self.broken is not None:
                raise self._not_sent()
            self._waiters[rid] = w
        try:
            self._send_bytes(data, fds or [])
        except (OSError, _MidFrame) as e:
            dead = isinstance(e, _MidFrame) or e.errno in _DEAD
            if dead and not isinstance(e, _MidFrame):
                # Closed on us: read why (a refusal the daemon sent first), up to its EOF.
                self.wait_for(lambda: self.broken is not None, CLOSE_READ_TIMEOUT)
            with self._lock:
                self._waiters.pop(rid, None)
                if not dead:  # nothing was sent: the caller's error, the stream is intact
                    raise
                self._fail(e)
                lost = self._lost() if isinstance(e, _MidFrame) else self._not_sent(e)
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
        A thread inside its own read (a signal handler) gets ``done()`` as it stands for
        ``timeout=0`` and a ``RuntimeError`` otherwise: it would wait for itself.
        """
        if self.reentrant():
            if done() or timeout == 0:
                return done()
            raise RuntimeError("cannot wait on the spawnd connection from a signal handler "
                               "that interrupted this thread's own wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        me: threading.Condition | None = None
        with self._lock:
            try:
                while not done():
                    remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                    if self.broken is not None and self._reader is None:
                        return done()
                    if self._reader is None:
                        self._reader = threading.get_ident()
                        try:
                            self._read_once(remaining)
                        finally:
                            self._reader = None
                            if self._followers:  # (alone: no closure, no call)
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
                if self._reader is None and self._followers:  # leaving: someone still
                    self._wake(lambda d: not d(), first_only=True)  # waiting must read next

    def _wake(self, which: Callable[[Callable[[], bool]], bool], first_only: bool = False) -> None:
        """Notify followers whose predicate satisfies ``which`` (lock held)."""
        for cond, done in self._followers.items():
            if which(done):
                cond.notify()
                if first_only:
                    return

    def _read_once(self, timeout: float | None) -> None:
        """Called with the lock held and ``_reader`` set; drops the lock while blocked."""
        self._lock.release()
        try:
            if timeout is None:  # block in recvmsg itself: one syscall, not select + recv
                n, anc, _, _ = self.sock.recvmsg_into([self._buf], FD_SPACE,
                                                      socket.MSG_CMSG_CLOEXEC)
            else:
                if not select.select([self.sock], [], [], timeout)[0]:
                    return
                n, anc, _, _ = self.sock.recvmsg_into(
                    [self._buf], FD_SPACE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
            data = bytes(memoryview(self._buf)[:n]) if n else b""
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
        end = feed(self.proto, data, anc, self._route)
        if end is not None:
            self._fail(end)

    def _route(self, ev: P.Event) -> None:
        if isinstance(ev, P.Exit):
            handler = self.exit_handlers.pop(ev.id, None)
            if handler is not None:
                handler(ev)
            return
        if isinstance(ev, P.Hello):
            self.daemon_pid = ev.pid
            return
        rid = getattr(ev, "id", None)
        if rid is None:  # a connection-level error: the daemon will close on us
            if isinstance(ev, P.Error):
                self.refusal = ev
                self._fail(error_to_exception(ev))  # pending requests get the reason too
            return
        w = self._waiters.pop(rid, None)
        if w is None:  # nobody waits (a reply=False request, or one that timed out)
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
        self._fail_all(self._lost())
        self._wake(lambda d: True)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fail_all(self, reason: BaseException) -> None:
        for w in self._waiters.values():
            w.reply = reason
            w.done = True
        self._waiters.clear()
        handlers = list(self.exit_handlers.values())
        self.exit_handlers.clear()
        for h in handlers:
            h(reason)

    def _lost(self) -> OSError:
        """What a request on a dead connection raises: the daemon's own reason if it gave
        one (``PermissionError`` for a uid the policy does not admit), else
        :class:`DaemonConnectionError`."""
        if self.refusal is not None:
            return error_to_exception(self.refusal)
        return DaemonConnectionError(f"connection to spawnd lost: {self.broken}")

    def _not_sent(self, cause: BaseException | None = None) -> OSError:
        """A request that never left: the refusal if the daemon gave one, else resendable."""
        if self.refusal is not None:
            return error_to_exception(self.refusal)
        return RequestNotSent(f"connection to spawnd lost before the request was sent: "
                              f"{cause or self.broken}")

    def abandon(self, why: str) -> None:
        """In a forked child: let go of the parent's connection without touching it.

        Only our copy of the fd is closed (no ``shutdown()``: that would end the parent's
        connection as well); what we inherited fails with ``why``, since its replies and
        exit events go to the parent. Called single-threaded, right after ``fork()``: the
        locks may have been held by parent threads that do not exist here, so they are new.
        """
        self._lock = threading.RLock()
        self._send_lock = threading.RLock()
        self._deferred = []
        self._followers = {}
        self._reader = None
        exc = DaemonConnectionError(why)
        if self.broken is None:
            self.broken = exc
        self._fail_all(exc)
        fds = self.proto.take_unclaimed_fds()
        self.sock.close()
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._fail(DaemonConnectionError("client closed the connection"))
            fds = self.proto.take_unclaimed_fds()
        self.sock.close()
        for fd in fds:
            os.close(fd)
