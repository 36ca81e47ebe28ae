"""Listeners, one task per connection, dispatch, and a designed shutdown.

Task tree (every task has one owner)::

    Server.run                      the root nursery
    ├── accept loop per listener    stops first on shutdown
    ├── ChildTable reaper           one task: every pidfd in one epoll set, and the timers
    ├── connection tasks            ConnectionHandler.run: a reader and a writer
    └── signals / watchdog / status / lifeline / idle-exit helpers
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import fdpass, inherit, privileged, signals, spawner
from . import protocol as P
from .activation import Notifier
from .children import Child, ChildTable
from .policy import Grant, Peer, Policy, Refused
from .pool import DEFAULT_POOL_MAX, WarmPool  # multiprocessing warm pools
from .status import Stats, build_report  # spawnd status

log = logging.getLogger("spawnd")

HANDSHAKE_TIMEOUT = 5.0  # a connection must say hello within this
FRAME_TIMEOUT = 10.0  # once a frame has started, it must complete within this (drip feeders)
RECV_SIZE = 256 * 1024
FD_SPACE = socket.CMSG_SPACE(P.MAX_FDS * 4)
ACCEPT_BACKOFF = 0.1  # out of fds: retry accept this often instead of spinning
FLUSH_TIMEOUT = 2.0  # at shutdown, how long queued exit events may take to reach clients
MAX_BACKLOG = 256  # replies queued for a client that does not read them: stop reading it
RECENT_CHILD = 10.0  # a signal from a pid reaped this recently still came from a child


@dataclass
class Options:
    on_stop: str = "terminate"  # what daemon shutdown does to children: terminate | kill | wait
    stop_grace: float = 5.0
    idle_exit: float | None = None
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    frame_timeout: float = FRAME_TIMEOUT
    pool_max: int = DEFAULT_POOL_MAX  # idle warm interpreters, all users (spawnd/pool.py)


# socket's MSG_* are enum.IntFlag members: combining and testing them per call costs µs.
_DONTWAIT = int(socket.MSG_DONTWAIT)
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return Peer(uid=uid, gid=gid, pid=pid)


def _close_all(fds: tuple[int, ...] | list[int]) -> None:
    # A request's fds arrive in one message and usually get consecutive numbers: then one
    # close_range(2) does what a close(2) per fd would.
    if len(fds) > 1 and max(fds) - min(fds) == len(fds) - 1 and len(set(fds)) == len(fds):
        os.closerange(min(fds), max(fds) + 1)
        return
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _nofile_soft() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_nofile_limit() -> tuple[int, int]:
    """Raise our soft RLIMIT_NOFILE to the hard limit (every client's fds and children's
    pidfds are ours to hold); return the limits we started with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("raised the open-files limit (RLIMIT_NOFILE) from %d to %d", soft, hard)
        except (OSError, ValueError) as e:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, e)
    return soft, hard


class RateLimiter:
    """Token bucket per uid: a spawn rate from policy, refilled continuously."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}

    def allow(self, uid: int, rate: float, burst: int) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(uid, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[uid] = (tokens, now)
            return False
        self._buckets[uid] = (tokens - 1, now)
        return True


class Server:
    """The daemon: owns listeners, connections, children and the policy in force."""

    def __init__(self, listeners: list[socket.socket], policy: Policy, *,
                 notifier: Notifier | None = None, options: Options | None = None,
                 reload_policy: Callable[[], Policy] | None = None,
                 lifeline: int | None = None) -> None:
        self.listeners = listeners
        self.policy = policy
        self.notifier = notifier or Notifier.from_environ({})
        self.options = options or Options()
        self.reload_policy = reload_policy
        self.lifeline = lifeline
        self.connections: set[ConnectionHandler] = set()
        self.rate = RateLimiter()
        self.starting: dict[int, int] = {}  # per uid: spawns between the limit check and add
        self.children: ChildTable
        self.pool: WarmPool  # created in run(), like the ChildTable
        self.stats = Stats()  # spawnd status: counters, child start facts
        self._stopping = trio.Event()
        self._activity = trio.lowlevel.ParkingLot()
        # Accept at the fd limit: this fd is given up to accept one connection and tell it
        # why it cannot be served (EMFILE, stage "limit"), instead of leaving it hanging.
        self._spare: int | None = None
        self._accept_scopes: list[trio.CancelScope] = []
        self._trio_listeners: list[trio.socket.SocketType] = []
        self._log_limit = signals.LogLimiter()
        # RLIMIT_NOFILE (soft, hard) before raise_nofile_limit(): what children get unless
        # the request says otherwise (a select() loop in a child must not see 500000).
        self.child_nofile: tuple[int, int] | None = None

    def stop(self) -> None:
        self._stopping.set()

    def poke(self) -> None:
        """Something happened (connection opened/closed, child reaped): idle-exit re-checks.

        A parking lot, not an Event replaced each time: a poke nobody waits for (every
        spawn's) costs a length check."""
        if self._activity:
            self._activity.unpark_all()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as root:
            # Signals first and for the whole run (shutdown included): a child's SIGUSR1 or
            # a second SIGTERM while children are being stopped must not kill us. In place
            # before READY=1: `systemctl reload` right after start must not kill us either.
            await root.start(self._signals)
            self.children = ChildTable(root, on_change=self.poke)
            self.pool = WarmPool(root, self.options.pool_max)  # refills run under the root
            self._spare = _open_spare()
            async with trio.open_nursery() as conns:
                async with trio.open_nursery() as helpers:
                    for sock in self.listeners:
                        tsock = trio.socket.from_stdlib_socket(sock)
                        self._trio_listeners.append(tsock)
                        helpers.start_soon(self._accept_loop, tsock, sock, conns)
                    if self.notifier.watchdog_interval:
                        helpers.start_soon(self._watchdog)
                    if self.notifier.enabled:
                        helpers.start_soon(self._status)
                    if self.lifeline is not None:
                        helpers.start_soon(self._watch_lifeline)
                    if self.options.idle_exit:
                        helpers.start_soon(self._idle_exit, self.options.idle_exit)
                    self.notifier.ready()
                    log.info("spawnd %d ready", os.getpid())
                    task_status.started()
                    await self._stopping.wait()
                    helpers.cancel_scope.cancel()
                self.pool.stop()  # kill idle warm interpreters; their watchers reap them
                # Accepting has stopped. Children first, so their exits reach clients.
                self.notifier.stopping()
                log.info("stopping: %d children (%s)", len(self.children), self.options.on_stop)
                for sock in self.listeners:
                    sock.close()
                await self.children.stop_all(self.options.on_stop, self.options.stop_grace)
                for conn in list(self.connections):
                    conn.close_soon()
                with trio.move_on_after(FLUSH_TIMEOUT):  # a client that never reads
                    while self.connections:
                        await self._activity.park()
                conns.cancel_scope.cancel()
            root.cancel_scope.cancel()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        log.info("stopped")

    # -- helpers under the root
    async def _accept_loop(self, lsock: trio.socket.SocketType, raw: socket.socket,
                           conns: trio.Nursery) -> None:
        with trio.CancelScope() as scope:
            self._accept_scopes.append(scope)
            while True:
                try:
                    sock, _ = await lsock.accept()
                except trio.ClosedResourceError:  # closed by _stop_accepting
                    return
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        try:
                            await self._at_fd_limit(raw, conns)
                        except trio.ClosedResourceError:
                            return
                        continue
                    if e.errno in (errno.ENOBUFS, errno.ENOMEM):
                        if self._log_limit.allow(("accept", e.errno)) is not None:
                            log.warning("accept: %s; retrying in %.1fs", e.strerror,
                                        ACCEPT_BACKOFF)
                        await trio.sleep(ACCEPT_BACKOFF)
                        continue
                    if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue
                    raise
                conns.start_soon(ConnectionHandler(self, sock).run)

    async def _at_fd_limit(self, raw: socket.socket, conns: trio.Nursery) -> None:
        """accept4 fails EMFILE as soon as the fd table is full, before it even looks for a
        pending client: wait for one (no spin), take it if an fd came free meanwhile, else
        refuse it with the spare fd (no client is left hanging)."""
        await trio.lowlevel.wait_readable(raw)
        try:
            conn, _ = raw.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                return  # the accept loop sees it again and decides
            if not self._refuse_at_limit(raw):
                if self._log_limit.allow(("accept", e.errno)) is not None:
                    log.warning("accept: %s and no spare fd; retrying in %.1fs", e.strerror,
                                ACCEPT_BACKOFF)
                await trio.sleep(ACCEPT_BACKOFF)
            return
        conns.start_soon(ConnectionHandler(self, trio.socket.from_stdlib_socket(conn)).run)

    def _refuse_at_limit(self, raw: socket.socket) -> bool:
        """Out of fds: give up the spare, accept one client, tell it why, close it.

        Synchronous (no checkpoint between freeing the spare and using it, so no other task
        can take that fd). Returns False when there is no spare to give (the caller backs
        off instead of spinning).
        """
        if self._spare is None:
            self._spare = _open_spare()
            if self._spare is None:
                return False
        os.close(self._spare)
        self._spare = None
        try:
            conn, _ = raw.accept()
        except (BlockingIOError, InterruptedError):
            conn = None  # the pending client went away meanwhile
        except OSError as e:
            log.warning("accept at the fd limit: %s", e.strerror)
            conn = None
        if conn is not None:
            with conn:
                proto = P.Connection("server")
                limit = _nofile_soft()
                msg = (f"spawnd (pid {os.getpid()}) is at its limit of {limit} open files "
                       "(RLIMIT_NOFILE) and cannot take a new connection now; retry later")
                data = (proto.send(P.Hello(agent="spawnd", pid=os.getpid()))
                        + proto.send(P.Error(id=None, errno=errno.EMFILE, name="EMFILE",
                                             stage=P.STAGE_LIMIT, message=msg)))
                try:
                    conn.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                except OSError:
                    pass
            n = self._log_limit.allow("accept-limit")
            if n is not None:
                log.warning("out of fds: refused a new connection (EMFILE)%s",
                            f"; {n} more since the last message" if n else "")
        self._spare = _open_spare()
        return True

    async def _signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        """Read the daemon's signals from a signalfd (see spawnd/signals.py for the policy)."""
        sfd = signals.SignalFD()
        try:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(sfd.fd)
                for info in sfd.read():
                    self._on_signal(info)
        finally:
            trio.lowlevel.notify_closing(sfd.fd)
            for info in sfd.close():
                log.info("at exit, %s from pid %d was still pending", info.name, info.pid)

    def _on_signal(self, info: signals.SigInfo) -> None:
        from_child = self._sent_by_child(info.pid)
        action = signals.decide(info, from_child)
        if action == "stop":
            log.info("received %s from pid %d (uid %d)", info.name, info.pid, info.uid)
            self.stop()
        elif action == "reload":
            self.reload()
        else:
            n = self._log_limit.allow((info.signo, action))
            if n is not None:
                log.warning("ignored %s from pid %d (uid %d)%s%s", info.name, info.pid, info.uid,
                            ": a child of the daemon" if from_child else "",
                            f"; {n} more since the last message" if n else "")

    def _sent_by_child(self, pid: int) -> bool:
        """Whether ``pid`` is something this daemon spawned (or just reaped)."""
        if pid <= 0 or pid == os.getpid():  # the kernel, or ourselves
            return False
        # Not set yet when a signal pending at start-up is read before run() creates the table
        # (tests/test_infra.py::test_sigterm_the_moment_the_socket_answers_is_a_clean_stop).
        children = getattr(self, "children", None)
        if children is not None:
            if children.get(pid) is not None:
                return True
            now = time.monotonic()
            for when, reaped in reversed(children.recently_reaped):
                if now - when > RECENT_CHILD:
                    break
                if reaped == pid:
                    return True
        # warm-pool processes, trampolines not yet registered, a child's own children
        return signals.sender_is_descendant(pid)

    def reload(self) -> None:
        """SIGHUP: swap in a freshly validated policy; keep the old one if the new is bad."""
        if self.reload_policy is None:
            log.info("SIGHUP: no policy file to reload")
            return
        self.notifier.reloading()
        try:
            self.policy = self.reload_policy()
            log.info("policy reloaded")
        except Exception as e:  # any error in the new file keeps the old policy
            log.error("policy reload failed, keeping the old policy: %s", e)
        self.notifier.ready()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _status(self) -> None:
        last = None
        while True:
            text = f"{len(self.children)} children, {len(self.connections)} connections"
            if text != last:
                self.notifier.status(text)
                last = text
            await trio.sleep(1.0)

    async def _watch_lifeline(self) -> None:
        """A private daemon serves the client that started it and holds the other end.

        When that end closes, the daemon takes no new connection (its socket is closed and
        unlinked), lets the client's remaining connections close (their children meet their
        ``on_disconnect`` fate), lingers while ``keep`` children still run, then exits.
        """
        assert self.lifeline is not None
        os.set_blocking(self.lifeline, False)
        while True:
            await trio.lowlevel.wait_readable(self.lifeline)
            try:
                if not os.read(self.lifeline, 4096):
                    break
            except BlockingIOError:
                continue
            except OSError:
                break
        log.info("the client that started this private daemon is gone")
        self._stop_accepting()
        said = False
        while self.connections or len(self.children):
            if not self.connections and not said:
                said = True
                log.info("lingering until the keep children have exited (%d children left)",
                         len(self.children))
            await self._activity.park()
        self.stop()

    def _stop_accepting(self) -> None:
        for scope in self._accept_scopes:
            scope.cancel()
        for tsock in self._trio_listeners:
            try:
                path = tsock.getsockname()
            except OSError:
                path = None
            tsock.close()
            if isinstance(path, str) and path.startswith("/"):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    async def _idle_exit(self, seconds: float) -> None:
        """Exit after ``seconds`` with no connection and no child (every reap pokes us)."""
        while True:
            if not self.connections and not len(self.children):
                with trio.move_on_after(seconds):
                    await self._activity.park()
                    continue
                if not self.connections and not len(self.children):
                    log.info("idle for %.0fs: exiting", seconds)
                    self.stop()
                    return
            else:
                await self._activity.park()


class ConnectionHandler:
    """One client: read frames, dispatch requests, write replies and exit events.

    Any exception here ends this connection only (logged); the server goes on.
    """

    def __init__(self, server: Server, sock: trio.socket.SocketType) -> None:
        self.server = server
        self.sock = sock
        self.proto = P.Connection("server")
        self.peer: Peer | None = None
        self.outbox_send, self.outbox = trio.open_memory_channel[tuple[bytes, list[int]]](
            float("inf"))
        self.scope = trio.CancelScope()
        self._requests: trio.Nursery | None = None  # set by run(): see _dispatch
        # A second handle on the same fd, for synchronous non-blocking sends: made and
        # detached (never closed: trio's socket owns the fd) by run().
        self._raw: socket.socket | None = None
        self._writing = False  # the writer task is between taking a frame and finishing it
        self._queued = 0  # frames in the outbox (statistics() builds an object per call)
        self._drained = trio.Event()  # set by the writer each time it has sent something
        # This connection's live children by the id of the Spawn that started them: Signal
        # names a child this way, never by pid. Removed when the child is reaped.
        self.kids: dict[int, Child] = {}

    def close_soon(self) -> None:
        """Flush what is queued, then close (used at daemon shutdown)."""
        self.outbox_send.close()

    def abort(self) -> None:
        """Close now: something this connection relies on failed (e.g. an exit was lost)."""
        self.scope.cancel()

    def send(self, event: P.Event, fds: list[int] | None = None) -> None:
        """Queue ``event``; never blocks, so a slow reader cannot stall the reaper.

        The queue is bounded by the client's live children (one exit each) plus
        ``MAX_BACKLOG`` replies: beyond that the reader waits for the writer.
        """
        if type(event) is P.Error and event.id is not None and self.peer is not None:
            self.server.stats.note_error(self.peer.uid, event.errno)  # spawnd status
        data = self.proto.send(event)
        fds = fds or []
        if self._raw is not None and not self._writing and not self._queued:
            # Fast path: nothing queued, so write now instead of waking the writer task
            # (a reply costs one syscall, not a task switch). What does not fit is queued.
            data, fds = self._send_now(data, fds)
            if not data:
                return
        self._queue(data, fds)

    def _queue(self, data: bytes, fds: list[int]) -> None:
        try:
            self.outbox_send.send_nowait((data, fds))
            self._queued += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            _close_all(fds)

    def _send_now(self, data: bytes, fds: list[int], *, ours: bool = True
                  ) -> tuple[bytes, list[int]]:
        """Non-blocking write; returns what is left to queue (fds go with the first byte).
        ``ours``: the fds are closed once they went (else they stay the caller's)."""
        anc = fdpass.ancillary(fds)
        assert self._raw is not None
        try:
            sent = self._raw.sendmsg([data], anc, _DONTWAIT)
        except BlockingIOError:
            return data, fds
        except OSError:  # the peer is gone: the reader sees EOF and ends the connection
            sent = len(data)
        if ours:
            _close_all(fds)
        return data[sent:], []

    def _send_pidfd(self, rid: int, child: Child) -> None:
        """The Spawned reply with the child's pidfd: the table's own fd when the reply is
        written at once (the usual case: no dup, no close); else a copy goes in the queue,
        since the reaper may close the table's before the writer sends it."""
        if self._raw is not None and not self._writing and not self._queued:
            data = self.proto.send(P.Spawned(id=rid, pid=child.pid, pidfd=True))
            rest, _ = self._send_now(data, [child.pidfd], ours=False)
            if len(rest) < len(data):  # the fd went with the first byte
                if rest:
                    self._queue(rest, [])
                return
        fds = []
        try:
            fds = [os.dup(child.pidfd)]
        except OSError as e:  # out of fds: the child exists; the client gets no pidfd
            log.warning("no pidfd for child %d: %s", child.pid, e.strerror)
        self.send(P.Spawned(id=rid, pid=child.pid, pidfd=bool(fds)), fds)

    async def run(self) -> None:
        self._raw = socket.socket(fileno=self.sock.fileno())
        self.server.connections.add(self)
        self.server.poke()
        try:
            with self.scope:
                self.peer = peer_of(self.sock)
                async with trio.open_nursery() as n:
                    self._requests = n  # warm starts that wait for a booting process
                    n.start_soon(self._writer)
                    await self._reader()
                    self.outbox_send.close()
        except Exception:
            log.exception("connection from %s failed", self.peer)
        finally:
            self.server.connections.discard(self)
            self.server.children.orphan(self)
            for _, fds in self._drain():
                _close_all(fds)
            _close_all(self.proto.take_unclaimed_fds())
            self._raw.detach()
            self._raw = None
            self.sock.close()
            self.server.poke()

    def _drain(self) -> list[tuple[bytes, list[int]]]:
        out = []
        while True:
            try:
                out.append(self.outbox.receive_nowait())
                self._queued -= 1
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return out

    async def _writer(self) -> None:
        try:
            async for data, fds in self.outbox:
                self._queued -= 1
                self._writing = True
                try:
                    anc = fdpass.ancillary(fds)
                    view = memoryview(data)
                    sent = await self.sock.sendmsg([view], anc)
                    while sent < len(view):
                        sent += await self.sock.send(view[sent:])
                finally:
                    self._writing = False
                    _close_all(fds)  # our copies (e.g. dup'd pidfds) are done once sent
                self._drained.set()
        except (BrokenPipeError, ConnectionResetError):
            pass
        # The outbox was closed (reader done, or shutdown) and flushed, or the peer is gone.
        self.scope.cancel()

    async def _recv(self) -> tuple[bytes, list[int], bool]:
        # Non-blocking on the raw handle, waiting for readability only when nothing is there:
        # trio's sock.recvmsg also yields once more after every successful read (a pass
        # through the run loop and an epoll_wait per request). We still yield when we did
        # not wait, so a client that never stops sending cannot starve the others.
        raw = self._raw
        assert raw is not None
        waited = False
        while True:
            try:
                data, anc, flags, _ = raw.recvmsg(RECV_SIZE, FD_SPACE, _RECV_FLAGS)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                waited = True
            except ConnectionResetError:  # closed with our replies unread: just a disconnect
                return b"", [], False
        if not waited:  # shielded: a cancel now would lose what was just read (and its fds)
            await trio.lowlevel.cancel_shielded_checkpoint()
        fds = fdpass.received_fds(anc)
        if flags & _CTRUNC:
            # At our fd limit the kernel installs what fits and drops the rest: only the
            # request these fds came with is refused (EMFILE, stage "fds"), by the parser.
            n = self.server._log_limit.allow("ctrunc")
            if n is not None:
                log.warning("control message truncated: %d fds arrived, the rest were lost "
                            "(out of fds?)%s", len(fds),
                            f"; {n} more since the last message" if n else "")
        return data, fds, bool(flags & _CTRUNC)

    async def _reader(self) -> None:
        assert self.peer is not None
        hello = P.Hello(agent="spawnd", pid=os.getpid())
        if not self.server.policy.may_connect(self.peer):
            log.warning("refused connection from uid %d", self.peer.uid)
            self.send(hello)
            self.send(P.Error(id=None, errno=errno.EPERM, name="EPERM", stage=P.STAGE_POLICY,
                              message=f"uid {self.peer.uid} may not use this daemon"))
            return
        self.send(hello)
        opts = self.server.options
        deadline: float | None = trio.current_time() + opts.handshake_timeout
        while True:
            while self._queued >= MAX_BACKLOG:
                self._drained = trio.Event()  # a client that sends but never reads: wait
                await self._drained.wait()
            try:
                if deadline is None:
                    data, fds, truncated = await self._recv()
                else:
                    with trio.fail_at(deadline):
                        data, fds, truncated = await self._recv()
                self.proto.receive_data(data, fds, truncated=truncated)
                while True:
                    try:
                        ev = self.proto.next_event()
                    except P.ProtocolError as e:
                        if e.fatal:
                            raise
                        self._refuse(e)  # one request refused: the frames after it still count
                        continue
                    if ev is None:
                        break
                    handed_off = False
                    try:
                        handed_off = await self._dispatch(ev)
                    finally:  # whatever happened in the handler, the request's fds are done
                        if not handed_off:  # (else the task it started owns them)
                            _close_all(getattr(ev, "fds_received", ()))
            except trio.TooSlowError:
                what = "hello" if self.proto.their_hello is None else "the rest of a message"
                self.send(P.Error(id=None, errno=errno.ETIMEDOUT, name="ETIMEDOUT",
                                  stage=P.STAGE_PROTOCOL, message=f"timed out waiting for {what}"))
                return
            except P.ProtocolError as e:
                self._refuse(e)
                if e.fatal:
                    return
                continue
            if not data:
                return
            # Handshake pending, or a partial frame buffered: the peer must finish in time.
            if self.proto.their_hello is None:
                continue  # keep the handshake deadline
            if self.proto.in_frame:
                if deadline is None:
                    deadline = trio.current_time() + opts.frame_timeout
            else:
                deadline = None

    def _refuse(self, e: P.ProtocolError) -> None:
        assert self.peer is not None
        _close_all(getattr(e, "fds", ()))
        log.info("protocol error from uid %d: %s", self.peer.uid, e.message)
        self.send(P.error_for(e, e.request_id, e.stage))

    # -- requests
    async def _dispatch(self, ev: P.Event) -> bool:
        """Handle one request; True when a task it started now owns the request's fds."""
        if isinstance(ev, P.Spawn) and ev.warm is not None and self._requests is not None:
            # A warm start may wait for a pooled process that is still booting
            # (spawnd/pool.py): not on the reader, so the connection's next requests go on.
            self._requests.start_soon(self._dispatch_warm, ev)
            return True
        if isinstance(ev, P.Spawn):
            await self._spawn(ev)
        elif isinstance(ev, P.Signal):
            self._signal(ev)
        elif isinstance(ev, P.Status):  # spawnd status (spawnd/status.py)
            report = build_report(self.server, self.server.stats, self.peer, self)
            self.send(P.StatusReply(id=ev.id, report=json.dumps(report)))
        elif isinstance(ev, P.Ping):
            self.send(P.Pong(id=ev.id, pid=os.getpid(), children=len(self.server.children),
                             connections=len(self.server.connections),
                             exec_helper=privileged.helper().describe()))
        return False

    async def _dispatch_warm(self, req: P.Spawn) -> None:
        try:
            await self._spawn(req)
        finally:
            _close_all(req.fds_received)

    async def _spawn(self, req: P.Spawn) -> None:
        assert self.peer is not None
        server = self.server
        policy = server.policy
        try:
            limit = policy.max_children(self.peer)
            live = server.children.count_for(self.peer.uid) + server.starting.get(self.peer.uid, 0)
            if limit is not None and live >= limit:
                raise Refused(errno.EAGAIN, f"uid {self.peer.uid} already has {limit} live "
                              "children (policy max_children)", "argv")
            rate = policy.spawn_rate(self.peer)
            if rate is not None and not server.rate.allow(self.peer.uid, *rate):
                raise Refused(errno.EAGAIN, f"uid {self.peer.uid} exceeds its spawn rate "
                              f"({rate[0]:g}/s)", "argv")
        except Refused as e:
            log.info("refused spawn for uid %d: %s", self.peer.uid, e.message)
            self.send(P.Error(id=req.id, errno=e.errno, name=errno.errorcode.get(e.errno, ""),
                              stage=P.STAGE_LIMIT, message=e.message, field=e.field))
            return
        if req.id in self.kids:  # Signal and Exit name children by this id: keep it unique
            self.send(P.Error(id=req.id, errno=errno.EEXIST, name="EEXIST", field="id",
                              stage=P.STAGE_PROTOCOL,
                              message=f"request id {req.id} already names a live child"))
            return
        uid = self.peer.uid
        server.starting[uid] = server.starting.get(uid, 0) + 1  # privileged starts await
        try:
            pid = await self._start(req)
        except Refused as e:
            log.info("policy refused spawn for uid %d: %s", self.peer.uid, e.message)
            self.send(P.Error(id=req.id, errno=e.errno, name=errno.errorcode.get(e.errno, ""),
                              stage=P.STAGE_POLICY, message=e.message, field=e.field))
            return
        except spawner.SpawnError as e:
            self.send(P.error_for(e, req.id, e.stage))
            return
        except OSError as e:  # resolving or opening the executable
            self.send(P.error_for(e, req.id, P.STAGE_EXEC))
            return
        finally:
            server.starting[uid] -= 1
            if not server.starting[uid]:
                del server.starting[uid]
        try:
            child = server.children.add(pid, uid=self.peer.uid, request_id=req.id,
                                        on_disconnect=req.on_disconnect, grace=req.grace,
                                        owner=self, on_exit=self._child_exited)
        except OSError as e:
            self.send(P.error_for(e, req.id, P.STAGE_FDS))
            return
        self.kids[req.id] = child
        server.stats.note_spawn(server.children, child, req.argv[0], req.warm is not None)
        log.debug("uid %d spawned %d: %r", self.peer.uid, pid, req.argv[0])
        if req.want_pidfd:
            self._send_pidfd(req.id, child)
        else:
            self.send(P.Spawned(id=req.id, pid=pid, pidfd=False))
        server.poke()

    async def _start(self, req: P.Spawn) -> int:
        """Resolve the executable, ask policy, then create the process.

        When some rule looks at which file runs, the file is opened once, policy checks the
        opened file and it is run by fd (``/proc/<daemon>/fd/N``), so a path swapped after
        the check cannot be run in its place; ``#!`` scripts run by their checked real path
        (the interpreter re-opens them by name; policy may forbid scripts). When no rule
        does (the default policies), a plain spawn runs the path as ``subprocess`` would,
        without opening it first.
        """
        assert self.peer is not None
        name = req.executable if req.executable is not None else req.argv[0]
        # (PATH is looked for only when it is used: a scan of the whole env per spawn)
        path_env = (None if b"/" in name
                    else next((e[5:] for e in req.env if e.startswith(b"PATH=")), None))
        cwd = inherit.caller_cwd(req)  # issue 11: relative names resolve in the caller's cwd
        try:
            resolved = spawner.resolve_executable(name, path_env, cwd)
        except spawner.SpawnError:
            inherit.check_cwd(req)
            raise
        policy = self.server.policy
        if policy.path_agnostic and req.warm is None:
            grant = policy.decide(self.peer, req, None)
            spec = self._spec(req, grant, resolved, None)
            if not privileged.needs_helper(spec, grant):
                return spawner.spawn(spec)
        try:
            exec_fd, is_script = privileged.open_executable(resolved, cwd)
        except OSError:
            inherit.check_cwd(req)
            raise
        try:
            real = privileged.real_path(exec_fd)
            grant = policy.decide(self.peer, req, real, is_script=is_script)
            spec = self._spec(req, grant, real if is_script else resolved,
                              None if is_script else exec_fd)
            helper = privileged.needs_helper(spec, grant)
            if req.warm is not None and not helper:
                # multiprocessing warm pool (spawnd/pool.py): an idle equivalent process, or a
                # fresh one, gets the request's fds by handoff; the caller registers the pid.
                spec = inherit.pool_spec(spec)  # issue 11: pools key on, and refill in, a cwd path
                return await self.server.pool.take(self.peer.uid, self.peer.gid, spec, grant,
                                                   req.warm)
            if helper:
                return await privileged.spawn_privileged(spec, grant)
            return spawner.spawn(spec)
        finally:
            os.close(exec_fd)

    def _spec(self, req: P.Spawn, grant: Grant, executable: bytes,
              exec_fd: int | None) -> spawner.SpawnSpec:
        assert self.peer is not None
        inherited = inherit.spec_fields(self.server.policy, self.peer, self.sock, req, grant)
        # the daemon pre-raised its NOFILE limit; the child gets the original
        inherited["rlimits"] = inherit.with_child_nofile(inherited["rlimits"],  # type: ignore[arg-type]
                                                         self.server.child_nofile)
        return spawner.SpawnSpec(
            executable=executable, argv=grant.argv, env=grant.env,
            fd_map=tuple(zip(req.child_fds, req.fds, strict=True)), cwd=req.cwd,
            setsid=req.start_new_session, umask=grant.umask,
            # default: a process group of its own, so `kill 0` in a child cannot reach
            # the daemon or other clients' children (subprocess's flags still apply)
            pgroup=0 if req.process_group is None and not req.start_new_session
            else req.process_group,
            exec_fd=exec_fd, restore_signals=req.restore_signals, **inherited)

    def _child_exited(self, child: Child) -> None:
        assert child.returncode is not None
        if self.kids.get(child.request_id) is child:
            del self.kids[child.request_id]
        self.send(P.Exit(id=child.request_id, pid=child.pid, returncode=child.returncode))

    def _signal(self, req: P.Signal) -> None:
        """Signal a child of this connection, named by its spawn request id (never a pid)."""
        child = self.kids.get(req.child)
        if not 0 <= req.signal < signal.NSIG:
            self.send(P.Error(id=req.id, errno=errno.EINVAL, name="EINVAL", field="signal",
                              stage=P.STAGE_PROTOCOL, message=f"no signal {req.signal}"))
        elif child is None or child.pidfd < 0:
            self.send(P.Error(id=req.id, errno=errno.ESRCH, name="ESRCH", stage=P.STAGE_POLICY,
                              field="child", message=f"no live child started by request "
                              f"{req.child} on this connection"))
        else:
            try:
                self.server.children.signal(child, req.signal)
            except OSError as e:
                self.send(P.error_for(e, req.id, P.STAGE_POLICY))
                return
            self.send(P.Ok(id=req.id))
