"""The async faces' engine, and the anyio/trio face: ``open_process`` / ``run_process``.

One connection per event loop, shared by every task on it and multiplexed by request id
(like the blocking client's transport). Nothing here starts a task per request or a
thread: on asyncio the socket is read from a ``loop.add_reader`` callback, on trio by one
system task; pipes are real pipes we create and pass to the daemon as fds, read and
written through the loop's own readiness. trio is imported only when we run on trio.

Signals go to the child's pidfd (``pidfd_send_signal``: no round trip, never a recycled
pid); only when that is refused (``EPERM``, e.g. a child running as another user) or
there is no pidfd do we ask the daemon, naming the child by its spawn request id.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import pwd
import signal as _signal
import socket
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from io import BytesIO
from subprocess import DEVNULL, PIPE, STDOUT, CalledProcessError, CompletedProcess
from typing import IO, Any

import anyio
import anyio.abc
import anyio.lowlevel

from spawnd import fdpass
from spawnd import protocol as P
from spawnd.paths import default_socket_path

from ._caller import caller_state
from ._mp_boot import is_open
from ._transport import FD_SPACE, RECV_SIZE, check_frame_size, feed, frame_of, new_socket
from .autostart import private_daemon
from .client import StrOrBytes, pidfd_signal, signal_request, spawn_request
from .errors import DaemonConnectionError, DaemonUnavailable, error_to_exception

__all__ = [
    "DEVNULL", "PIPE", "STDOUT", "AsyncChild", "AsyncClient", "CalledProcessError",
    "CompletedProcess", "Process", "default_client", "open_process", "run_process",
]

CONNECT_TIMEOUT = 10.0


# ---------------------------------------------------------------- the event loop, either kind

class _AsyncioLoop:
    """Readiness by callbacks on the running asyncio loop: no task, no thread."""

    name = "asyncio"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def event(self) -> Any:
        return asyncio.Event()

    def watch(self, conn: _Connection) -> None:
        self.loop.add_reader(conn.fd, conn._on_readable)

    def want_writable(self, conn: _Connection) -> None:
        def ready() -> None:
            self.loop.remove_writer(conn.fd)
            conn._writing = False
            conn._flush()

        self.loop.add_writer(conn.fd, ready)

    def unwatch(self, conn: _Connection) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(conn.fd)
            self.loop.remove_writer(conn.fd)

    async def sleep(self, s: float) -> None:
        await asyncio.sleep(s)

    async def in_thread(self, fn: Callable[[], Any]) -> Any:
        return await self.loop.run_in_executor(None, fn)


class _TrioLoop:
    """One system task reads the socket (trio has no readiness callbacks)."""

    name = "trio"

    def __init__(self, trio: Any) -> None:
        self.trio = trio

    def event(self) -> Any:
        return self.trio.Event()

    def watch(self, conn: _Connection) -> None:
        self.trio.lowlevel.spawn_system_task(self._read, conn, name="spawnd-reader")

    async def _read(self, conn: _Connection) -> None:
        try:
            while conn.sock is not None:
                await self.trio.lowlevel.wait_readable(conn.sock)
                conn._on_readable()
        except self.trio.ClosedResourceError:
            pass
        except Exception as e:  # noqa: BLE001 - a system task must never raise
            conn._fail(e)
        finally:
            conn.close()  # also when the run ends (system tasks are cancelled then)

    def want_writable(self, conn: _Connection) -> None:
        async def flush() -> None:
            try:
                await self.trio.lowlevel.wait_writable(conn.sock)
            except (self.trio.ClosedResourceError, self.trio.Cancelled):
                return
            conn._writing = False
            conn._flush()

        self.trio.lowlevel.spawn_system_task(flush, name="spawnd-flush")

    def unwatch(self, conn: _Connection) -> None:
        if conn.sock is not None:
            self.trio.lowlevel.notify_closing(conn.sock)

    async def sleep(self, s: float) -> None:
        await self.trio.sleep(s)

    async def in_thread(self, fn: Callable[[], Any]) -> Any:
        return await self.trio.to_thread.run_sync(fn)


_STATE = "_spawnd_client_state"
_asyncio_loops: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_trio_runvar: Any = None


def _current() -> tuple[_AsyncioLoop | _TrioLoop, dict[str, Any]]:
    """The running loop's plumbing and its per-loop state (where its shared connection lives)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        state = getattr(loop, _STATE, None) or _asyncio_loops.get(loop)
        if state is None:
            state = {"loop": _AsyncioLoop(loop)}
            try:
                setattr(loop, _STATE, state)  # dies with the loop
            except AttributeError:  # a loop without __dict__: kept for the process
                _asyncio_loops[loop] = state
        return state["loop"], state
    trio = sys.modules.get("trio")  # not imported: we cannot be running on it
    if trio is not None:
        global _trio_runvar
        if _trio_runvar is None:
            _trio_runvar = trio.lowlevel.RunVar("spawnd_client", default=None)
        try:
            state = _trio_runvar.get()
        except RuntimeError:
            state = None
        else:
            if state is None:
                state = {"loop": _TrioLoop(trio)}
                _trio_runvar.set(state)
        if state is not None:
            return state["loop"], state
    raise RuntimeError("spawnd_client async faces need a running asyncio or trio event loop")


# ---------------------------------------------------------------- the connection

class _Reply:
    __slots__ = ("event", "value", "done")

    def __init__(self, event: Any) -> None:
        self.event = event
        self.value: Any = None
        self.done = False

    def deliver(self, value: Any) -> None:
        if not self.done:
            self.value, self.done = value, True
            self.event.set()


class _Out:
    """A frame waiting to be sent; its fds go with its first byte."""

    __slots__ = ("data", "anc", "started")

    def __init__(self, data: bytes, fds: Sequence[int]) -> None:
        self.data = memoryview(data)
        self.anc = fdpass.ancillary(list(fds))
        self.started = False


class _Connection:
    """A non-blocking socket to the daemon, driven by the loop's readiness."""

    def __init__(self, path: str, loop: _AsyncioLoop | _TrioLoop, sock: socket.socket) -> None:
        self.path = path
        self.loop = loop
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.proto = P.Connection("client")
        self._ids = 0
        self._waiters: dict[int, Callable[[Any], None]] = {}
        self._exits: dict[int, AsyncChild] = {}
        self._out: deque[_Out] = deque()
        self._writing = False
        self.broken: BaseException | None = None
        self.refusal: P.Error | None = None
        self.daemon_pid: int | None = None
        self._hello = loop.event()

    @classmethod
    async def open(cls, path: str, autostart: bool) -> _Connection:
        loop, _ = _current()
        try:
            sock = await cls._connect(loop, path)
        except DaemonUnavailable:
            if not autostart:
                raise
            path = await loop.in_thread(private_daemon)
            sock = await cls._connect(loop, path)
        self = cls(path, loop, sock)
        loop.watch(self)
        try:
            self._push(P.Hello(agent="spawnd_client.aio"), ())
            await self._hello.wait()
        except BaseException:
            self.close()
            raise
        if self.broken is not None:
            self.close()
            if self.refusal is not None:
                raise error_to_exception(self.refusal)
            raise DaemonUnavailable(errno.EPROTO, f"handshake failed: {self.broken}", path)
        return self

    @staticmethod
    async def _connect(loop: _AsyncioLoop | _TrioLoop, path: str) -> socket.socket:
        sock = new_socket()
        sock.setblocking(False)
        waited = 0.0
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:  # a full listen backlog: AF_UNIX says EAGAIN, try again
                if waited >= CONNECT_TIMEOUT:
                    err: OSError = TimeoutError(errno.ETIMEDOUT, "connect timed out")
                else:
                    await loop.sleep(0.005)
                    waited += 0.005
                    continue
            except OSError as e:
                err = e
            sock.close()
            raise DaemonUnavailable(err.errno or errno.ECONNREFUSED,
                                    f"no spawnd daemon answers at {path}: {err.strerror}", path)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # -- sending: one ordered queue, flushed as the socket allows (sync callers may post too)
    def _push(self, event: P.Event, fds: Sequence[int]) -> _Out:
        if self.broken is not None:
            raise self._lost()
        data = frame_of(event, self.proto)
        check_frame_size(data)
        item = _Out(data, fds)
        self._out.append(item)
        if not self._writing:
            self._flush()
        return item

    def _flush(self) -> None:
        while self._out and self.sock is not None:
            item = self._out[0]
            try:
                sent = self.sock.sendmsg([item.data], item.anc)
            except BlockingIOError:
                self._writing = True
                self.loop.want_writable(self)
                return
            except OSError as e:
                # Closed on us: what the daemon said first (a refusal) is already ours to read.
                self._out.clear()
                self._on_readable(drain=True)
                self._fail(e)
                return
            item.started, item.anc = True, []
            item.data = item.data[sent:]
            if not item.data:
                self._out.popleft()

    def post(self, event: P.Event) -> None:
        """Send without waiting; the reply is dropped (errors are the caller's to ignore)."""
        rid: int = event.id  # type: ignore[attr-defined]
        self._waiters[rid] = lambda _ev: None
        self._push(event, ())

    async def request(self, event: P.Event, fds: Sequence[int] = ()) -> Any:
        """Send ``event`` and wait for its reply; the caller may close ``fds`` afterwards.

        Cancelled before its frame left: it is withdrawn. After: a child it starts is killed
        as soon as it is reported (nobody would own it).
        """
        rid: int = event.id  # type: ignore[attr-defined]
        reply = _Reply(self.loop.event())
        self._waiters[rid] = reply.deliver
        try:
            item = self._push(event, fds)
        except BaseException:
            self._waiters.pop(rid, None)
            raise
        try:
            await reply.event.wait()
        except BaseException:
            self._waiters.pop(rid, None)
            if not item.started and item in self._out:
                self._out.remove(item)
            elif isinstance(reply.value, AsyncChild):
                reply.value._abandon()
            raise
        value = reply.value
        if isinstance(value, BaseException):
            raise value
        if isinstance(value, P.Error):
            raise error_to_exception(value)
        return value

    # -- receiving
    def _on_readable(self, drain: bool = False) -> None:
        while self.sock is not None:
            try:
                data, anc, _, _ = self.sock.recvmsg(RECV_SIZE, FD_SPACE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if not drain:
                    self._fail(e)
                return
            end = feed(self.proto, data, anc, self._route)
            if end is not None:
                self._fail(end)
                return
            if not drain and len(data) < RECV_SIZE:
                return

    def _route(self, ev: P.Event) -> None:
        if isinstance(ev, P.Exit):
            child = self._exits.pop(ev.id, None)
            if child is not None:
                child._on_exit(ev)
            return
        if isinstance(ev, P.Hello):
            self.daemon_pid = ev.pid
            self._hello.set()
            return
        rid = getattr(ev, "id", None)
        if rid is None:
            if isinstance(ev, P.Error):  # connection-level: the daemon closes on us
                self.refusal = ev
                self._fail(error_to_exception(ev))
            return
        deliver = self._waiters.pop(rid, None)
        if isinstance(ev, P.Spawned):
            pidfd = ev.fds_received[0] if ev.pidfd and ev.fds_received else None
            child = AsyncChild(self, rid, ev.pid, pidfd)
            self._exits[rid] = child  # before any later event: its exit may be next
            if deliver is None:  # its requester was cancelled meanwhile
                child._abandon()
            else:
                deliver(child)
            return
        if deliver is None:
            for fd in getattr(ev, "fds_received", ()):
                os.close(fd)
            return
        deliver(ev)

    def _fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        reason = self._lost()
        waiters, self._waiters = self._waiters, {}
        for deliver in waiters.values():
            deliver(reason)
        exits, self._exits = self._exits, {}
        for child in exits.values():
            child._on_exit(reason)
        self._out.clear()
        self._hello.set()
        self.close()

    def _lost(self) -> OSError:
        if self.refusal is not None:
            return error_to_exception(self.refusal)
        return DaemonConnectionError(f"connection to spawnd lost: {self.broken}")

    def close(self) -> None:
        if self.broken is None:
            self._fail(DaemonConnectionError("client closed the connection"))
            return
        if self.sock is None:
            return
        self.loop.unwatch(self)
        sock, self.sock = self.sock, None
        sock.close()
        for fd in self.proto.take_unclaimed_fds():
            os.close(fd)


async def _shared_connection() -> _Connection:
    """This event loop's connection, (re)opened on first use or after it broke."""
    loop, state = _current()
    while True:
        conn = state.get("conn")
        if conn is not None and conn.broken is None:
            return conn
        opening = state.get("opening")
        if opening is None:
            break
        await opening.wait()  # then: the opener's connection, or (it failed) our own try
    state["opening"] = ev = loop.event()
    try:
        autostart = os.environ.get("SPAWND_AUTOSTART", "1") != "0"
        conn = await _Connection.open(default_socket_path(), autostart)
        if isinstance(loop, _AsyncioLoop):
            # asyncio has no "loop closing" hook, but asyncio.run (and anyio.run) close
            # every async generator of the loop before closing it: one closes our socket.
            closer = _closer(conn)
            await closer.asend(None)
            state["closer"] = closer
        state["conn"] = conn
        return conn
    finally:
        state.pop("opening", None)
        ev.set()


async def _closer(conn: _Connection) -> Any:
    try:
        yield
    finally:
        conn.close()


# ---------------------------------------------------------------- children

class AsyncChild:
    """A child the daemon started for this event loop's connection; ``returncode`` follows
    ``subprocess`` (negative: killed by that signal)."""

    def __init__(self, conn: _Connection, rid: int, pid: int, pidfd: int | None) -> None:
        self.client = conn
        self.rid = rid
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None
        self.lost: BaseException | None = None
        self._done = conn.loop.event()

    def _on_exit(self, ev: P.Exit | BaseException) -> None:
        if isinstance(ev, BaseException):
            self.lost = ev
        else:
            self.returncode = ev.returncode
        self.close()
        self._done.set()

    def _abandon(self) -> None:
        """Nobody owns it any more (its starter was cancelled): kill it; the exit cleans up."""
        self.signal_nowait(_signal.SIGKILL)

    async def wait(self) -> int:
        await self._done.wait()
        if self.returncode is None:
            raise DaemonConnectionError(f"exit status of {self.pid} lost: {self.lost}")
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def _via_pidfd(self, sig: int) -> bool:
        """True if the signal went (or the child is gone already); False: ask the daemon."""
        if self.returncode is not None or self.lost is not None:
            return True
        return pidfd_signal(self.pidfd, sig)

    def signal_nowait(self, sig: int) -> None:
        """Signal now (sync): pidfd, else a daemon request whose reply is not awaited."""
        if not self._via_pidfd(int(sig)) and self.client.broken is None:
            conn = self.client
            conn.post(signal_request(conn.next_id(), self.rid, sig))

    async def send_signal(self, sig: int) -> None:
        if self._via_pidfd(int(sig)):
            return
        conn = self.client
        try:
            await conn.request(signal_request(conn.next_id(), self.rid, sig))
        except ProcessLookupError:
            pass

    async def terminate(self) -> None:
        await self.send_signal(_signal.SIGTERM)

    async def kill(self) -> None:
        await self.send_signal(_signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class AsyncClient:
    """An explicit connection of its own: ``async with AsyncClient(path) as c:``.

    Without one, the async faces share one connection per event loop
    (:func:`default_client`). Leaving the block closes it: the daemon then applies each
    child's ``on_disconnect``.
    """

    def __init__(self, path: str | None = None, *, autostart: bool | None = None) -> None:
        self.path = path or default_socket_path()
        if autostart is None:
            autostart = os.environ.get("SPAWND_AUTOSTART", "1") != "0"
        self.autostart = autostart
        self._conn: _Connection | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connection()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connection(self) -> _Connection:
        if self._conn is None:
            self._conn = await _Connection.open(self.path, self.autostart)
        return self._conn

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
        await anyio.lowlevel.checkpoint()

    async def spawn(self, argv: Sequence[StrOrBytes], **options: Any) -> AsyncChild:
        """Start a child (same keywords as :meth:`Client.spawn`); errors raise at once."""
        return await _spawn(await self.connection(), argv, **options)

    async def ping(self) -> dict[str, int]:
        conn = await self.connection()
        pong = await conn.request(P.Ping(id=conn.next_id()))
        return {"pid": pong.pid, "children": pong.children, "connections": pong.connections}


class _Shared(AsyncClient):
    async def connection(self) -> _Connection:
        return await _shared_connection()

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()


async def default_client() -> AsyncClient:
    """The running event loop's shared connection, as an :class:`AsyncClient`."""
    client = _Shared()
    await client.connection()
    return client


async def _spawn(conn: _Connection, argv: Sequence[StrOrBytes], *,
                 env: Mapping[Any, Any] | None = None, fds: Mapping[int, int] | None = None,
                 executable: StrOrBytes | None = None, cwd: StrOrBytes | None = None,
                 **options: Any) -> AsyncChild:
    options.setdefault("extra_groups", None)
    options.setdefault("capabilities", ())
    options.setdefault("rlimits", None)
    with caller_state() as caller:  # the child inherits our cwd, umask, limits (issue 11)
        req, send_fds = spawn_request(conn.next_id(), argv, env=env, fds=fds,
                                      executable=executable, cwd=cwd, caller=caller, **options)
        return await conn.request(req, send_fds)


# ---------------------------------------------------------------- stdio and the spawn itself

def _uid(user: str | int | None) -> int | None:
    if user is None or isinstance(user, int):
        return user
    return pwd.getpwnam(user).pw_uid


def _gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    return grp.getgrnam(group).gr_gid


def _fileno(what: Any) -> int:
    return what if isinstance(what, int) else what.fileno()


async def start_child(args: Sequence[StrOrBytes], *, stdin: Any, stdout: Any, stderr: Any,
                      client: AsyncClient | None = None, executable: StrOrBytes | None = None,
                      cwd: StrOrBytes | None = None, env: Mapping[Any, Any] | None = None,
                      pass_fds: Iterable[int] = (), start_new_session: bool = False,
                      process_group: int | None = None, user: str | int | None = None,
                      group: str | int | None = None,
                      extra_groups: Iterable[str | int] | None = None, umask: int = -1,
                      on_disconnect: str = P.DEFAULT_ON_DISCONNECT,
                      grace: float = P.DEFAULT_GRACE, capabilities: Iterable[str] = (),
                      rlimits: Mapping[str, tuple[int, int]] | None = None,
                      no_new_privs: bool = False, namespaces: Iterable[str] = (),
                      restore_signals: bool = True, close_fds: bool = True,
                      ) -> tuple[AsyncChild, list[int | None]]:
    """Start ``args`` with stdio planned like ``subprocess`` (PIPE, DEVNULL, STDOUT, fd,
    file, None = ours); returns the child and our ends of its pipes (0, 1, 2, or None).

    Both faces use this. Errors raise here, as the stdlib raises them: ``FileNotFoundError``
    naming the program (or the cwd) as passed."""
    conn = await (client.connection() if client is not None else _shared_connection())
    with ExitStack() as theirs, ExitStack() as on_fail:
        ours: list[int | None] = [None, None, None]
        fds: dict[int, int] = {}

        def pipe(target: int) -> None:
            r, w = os.pipe2(os.O_CLOEXEC)
            mine, child_end = (w, r) if target == 0 else (r, w)
            on_fail.callback(os.close, mine)
            theirs.callback(os.close, child_end)
            ours[target], fds[target] = mine, child_end

        for target, how in ((0, stdin), (1, stdout), (2, stderr)):
            if how == PIPE:
                pipe(target)
            elif how == DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                theirs.callback(os.close, fd)
                fds[target] = fd
            elif how == STDOUT and target == 2:
                if 1 in fds:
                    fds[2] = fds[1]
                elif is_open(1):
                    fds[2] = 1
            elif how is None:
                if is_open(target):
                    fds[target] = target  # our own stdio, passed explicitly
            else:
                fds[target] = _fileno(how)
        if not close_fds:  # what the stdlib's child would inherit, as spawnd's Popen does
            from .popen import inheritable_fds

            for fd in inheritable_fds():
                if fd not in ours:
                    fds.setdefault(fd, fd)
        for fd in pass_fds:
            if fd > 2:
                fds[fd] = fd
        program = executable if executable is not None else args[0]
        try:
            child = await _spawn(
                conn, args, env=env, fds=fds, executable=executable, cwd=cwd,
                start_new_session=start_new_session, process_group=process_group,
                user=_uid(user), group=_gid(group),
                extra_groups=None if extra_groups is None else [_gid(g) for g in extra_groups],
                umask=None if umask < 0 else umask, on_disconnect=on_disconnect, grace=grace,
                capabilities=tuple(capabilities), rlimits=rlimits, no_new_privs=no_new_privs,
                namespaces=tuple(namespaces), restore_signals=restore_signals)
        except OSError as e:
            if getattr(e, "stage", None) == P.STAGE_EXEC and e.filename is not None:
                e.filename = program  # subprocess names what the caller passed
            raise
        on_fail.pop_all()
        return child, ours


def _argv(command: Any) -> list[Any]:
    if isinstance(command, (str, bytes)):
        return ["/bin/sh", "-c", command]
    return list(command)


# ---------------------------------------------------------------- the anyio face

class _PipeEnd:
    """Our end of a child's pipe: non-blocking, waited on with the loop's readiness."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            anyio.notify_closing(fd)
            os.close(fd)
        await anyio.lowlevel.checkpoint()


class _ReceivePipe(_PipeEnd, anyio.abc.ByteReceiveStream):
    """Our read end of a child's stdout or stderr pipe."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                waited = True
                continue
            except OSError as e:
                raise anyio.BrokenResourceError from e
            if not waited:
                await anyio.lowlevel.cancel_shielded_checkpoint()
            if not data:
                raise anyio.EndOfStream
            return data


class _SendPipe(_PipeEnd, anyio.abc.ByteSendStream):
    """Our write end of a child's stdin pipe."""

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(item).cast("B")
        waited = False
        while view:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                await anyio.wait_writable(self._fd)
                waited = True
            except (BrokenPipeError, ConnectionResetError) as e:
                raise anyio.BrokenResourceError from e
        if not waited:
            await anyio.lowlevel.cancel_shielded_checkpoint()


class Process(anyio.abc.Process):
    """Like the process ``anyio.open_process`` returns; ``async with`` closes the streams
    and waits (killing the child if that wait is cancelled), as anyio does."""

    def __init__(self, child: AsyncChild, ours: list[int | None], args: Any) -> None:
        self._child = child
        self.args = args
        self._stdin = None if ours[0] is None else _SendPipe(ours[0])
        self._stdout = None if ours[1] is None else _ReceivePipe(ours[1])
        self._stderr = None if ours[2] is None else _ReceivePipe(ours[2])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} returncode={self.returncode}>"

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for stream in (self._stdin, self._stdout, self._stderr):
                if stream is not None:
                    await stream.aclose()
        try:
            await self.wait()
        except BaseException:
            self.kill()
            with anyio.CancelScope(shield=True):
                await self.wait()
            raise

    async def wait(self) -> int:
        return await self._child.wait()

    def send_signal(self, signal: int) -> None:
        self._child.signal_nowait(signal)

    def terminate(self) -> None:
        self.send_signal(_signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(_signal.SIGKILL)

    @property
    def pid(self) -> int:
        return self._child.pid

    @property
    def pidfd(self) -> int | None:
        return self._child.pidfd

    @property
    def returncode(self) -> int | None:
        return self._child.returncode

    @property
    def stdin(self) -> anyio.abc.ByteSendStream | None:
        return self._stdin

    @property
    def stdout(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stdout

    @property
    def stderr(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stderr


async def open_process(command: StrOrBytes | Sequence[StrOrBytes], *,
                       stdin: int | IO[Any] | None = PIPE, stdout: int | IO[Any] | None = PIPE,
                       stderr: int | IO[Any] | None = PIPE, cwd: StrOrBytes | None = None,
                       env: Mapping[str, str] | None = None, start_new_session: bool = False,
                       pass_fds: Sequence[int] = (), user: str | int | None = None,
                       group: str | int | None = None,
                       extra_groups: Iterable[str | int] | None = None, umask: int = -1,
                       client: AsyncClient | None = None, **grants: Any) -> Process:
    """``anyio.open_process`` through spawnd: a string runs through ``/bin/sh -c``.

    Extra keywords as the blocking client: ``executable``, ``process_group``,
    ``on_disconnect``, ``grace``, ``capabilities``, ``rlimits``, ``no_new_privs``,
    ``namespaces``, and subprocess's ``restore_signals``/``close_fds``;
    ``client`` picks a connection (default: this event loop's shared one)."""
    grants.pop("startupinfo", None)
    grants.pop("creationflags", None)
    child, ours = await start_child(
        _argv(command), stdin=stdin, stdout=stdout, stderr=stderr, client=client, cwd=cwd,
        env=env, pass_fds=pass_fds, start_new_session=start_new_session, user=user,
        group=group, extra_groups=extra_groups, umask=umask, **grants)
    return Process(child, ours, command)


async def run_process(command: StrOrBytes | Sequence[StrOrBytes], *, input: bytes | None = None,
                      stdin: int | IO[Any] | None = None, stdout: int | IO[Any] | None = PIPE,
                      stderr: int | IO[Any] | None = PIPE, check: bool = True,
                      deliver_cancel: Callable[[Process], Any] | None = None,
                      task_status: anyio.abc.TaskStatus[Process] = anyio.TASK_STATUS_IGNORED,
                      **kwargs: Any) -> CompletedProcess[bytes]:
    """``anyio.run_process`` through spawnd; raises ``CalledProcessError`` (with stdout and
    stderr) when ``check`` and the exit status is not 0.

    Cancelled, the child is killed and reaped before this returns (anyio's semantics), or,
    given trio's ``deliver_cancel(process)``, that is awaited instead (shielded) while we
    wait for the exit. ``task_status`` reports the :class:`Process` to
    ``nursery.start`` / ``TaskGroup.start``, as ``trio.run_process`` does."""
    if stdin is not None and input is not None:
        raise ValueError("only one of stdin and input is allowed")
    process = await open_process(command, stdin=PIPE if input else stdin, stdout=stdout,
                                 stderr=stderr, **kwargs)
    contents: list[bytes | None] = [None, None]

    async def drain(stream: anyio.abc.ByteReceiveStream, index: int) -> None:
        buffer = BytesIO()
        async for chunk in stream:
            buffer.write(chunk)
        contents[index] = buffer.getvalue()

    try:
        async with anyio.create_task_group() as tg:
            if process.stdout:
                tg.start_soon(drain, process.stdout, 0)
            if process.stderr:
                tg.start_soon(drain, process.stderr, 1)
            task_status.started(process)
            if process.stdin and input:
                await process.stdin.send(input)
                await process.stdin.aclose()
            await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()
            if process.returncode is None:
                await _deliver_cancel(process, deliver_cancel)
        raise
    await process.aclose()
    output, errors = contents
    rc = process.returncode
    assert rc is not None
    if check and rc != 0:
        raise CalledProcessError(rc, command, output, errors)
    return CompletedProcess(command, rc, output, errors)


async def _deliver_cancel(process: Process, deliver_cancel: Callable[[Process], Any] | None
                          ) -> None:
    """Called shielded: end the child (kill, or the caller's way) and wait for its exit."""
    if deliver_cancel is None:
        process.kill()
        await process.wait()
        return

    async with anyio.create_task_group() as tg:
        async def deliver() -> None:
            try:
                await deliver_cancel(process)
            except BaseException:
                process.kill()
                raise

        tg.start_soon(deliver)
        await process.wait()
        tg.cancel_scope.cancel()

