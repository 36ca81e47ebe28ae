"""The async client (anyio: runs on trio and asyncio alike).

One connection, one reader task owned by the client's task group: open it with
``async with AsyncClient() as client:``; leaving the block closes the connection (the
daemon then applies each child's ``on_disconnect`` policy).
"""

from __future__ import annotations

import errno
import os
import signal as _signal
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from spawnd import fdpass
from spawnd import protocol as P
from spawnd.paths import default_socket_path

from ._transport import check_frame_size, new_socket, off_stdio
from .autostart import private_daemon
from .client import StrOrBytes, spawn_request
from .errors import DaemonConnectionError, DaemonUnavailable, error_to_exception

RECV_SIZE = 256 * 1024
FD_SPACE = socket.CMSG_SPACE(8 * 4)
CLOSE_READ_TIMEOUT = 2.0  # after EPIPE, how long the daemon's last words may take to read


class AsyncChild:
    """A child started through :class:`AsyncClient`; ``returncode`` follows ``subprocess``."""

    def __init__(self, client: AsyncClient, pid: int, pidfd: int | None) -> None:
        self.client = client
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None
        self.lost: BaseException | None = None
        self._done = anyio.Event()
        self.request_id: int = -1  # the Spawn's request id (Signal names the child by it)

    def _on_exit(self, ev: P.Exit | BaseException) -> None:
        if isinstance(ev, BaseException):
            self.lost = ev
        else:
            self.returncode = ev.returncode
        self.close()
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        if self.returncode is None:
            raise DaemonConnectionError(f"exit status of {self.pid} lost: {self.lost}")
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    async def send_signal(self, sig: int) -> None:
        if self._done.is_set():
            return
        try:
            await self.client._request(P.Signal(id=self.client._next_id(), child=self.request_id,
                                                signal=int(sig)))
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
    """``async with AsyncClient(path) as c: child = await c.spawn([...])``."""

    def __init__(self, path: str | None = None, *, autostart: bool | None = None) -> None:
        self.path = path or default_socket_path()
        if autostart is None:
            autostart = os.environ.get("SPAWND_AUTOSTART", "1") != "0"
        self.autostart = autostart
        self._sock: socket.socket | None = None
        self._proto = P.Connection("client")
        self._ids = 0
        self._waiters: dict[int, tuple[anyio.Event, list[Any]]] = {}
        self._exits: dict[int, AsyncChild] = {}
        self._send_lock = anyio.Lock()
        self._hello = anyio.Event()
        self._gone = anyio.Event()  # set once the connection is dead (see _fail)
        self._broken: BaseException | None = None
        #: A connection-level error the daemon sent before closing (e.g. EPERM: our uid may
        #: not use it); every request on this connection then raises it.
        self._refusal: P.Error | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> AsyncClient:
        try:
            self._sock = await self._connect(self.path)
        except DaemonUnavailable:
            if not self.autostart:
                raise
            path = await anyio.to_thread.run_sync(private_daemon)
            self._sock = await self._connect(path)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            self._tg.start_soon(self._read_loop)
            try:
                await self._send(P.Hello(agent="spawnd_client.aio"), [])
            except (BrokenPipeError, ConnectionResetError):
                # A daemon that refuses our uid answers at accept and closes at once: the
                # reader still gets what it sent before closing, then EOF.
                with anyio.move_on_after(CLOSE_READ_TIMEOUT):
                    await self._gone.wait()
            await self._hello.wait()
        except BaseException:
            await self.aclose()  # never leave the task group open behind an exception
            raise
        if self._broken is not None:
            await self.aclose()
            if self._refusal is not None:
                raise error_to_exception(self._refusal)
            raise DaemonUnavailable(errno.EPROTO, f"handshake failed: {self._broken}", self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            tg, self._tg = self._tg, None
            await tg.__aexit__(None, None, None)
        self._fail(DaemonConnectionError("client closed the connection"))
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    async def _connect(path: str) -> socket.socket:
        sock = new_socket()
        sock.setblocking(False)
        try:
            try:
                sock.connect(path)
            except BlockingIOError:
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err)) from None
        except OSError as e:
            sock.close()
            raise DaemonUnavailable(e.errno or errno.ECONNREFUSED,
                                    f"no spawnd daemon answers at {path}: {e.strerror}",
                                    path) from None
        return sock

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def _send(self, event: P.Event, fds: list[int]) -> None:
        assert self._sock is not None
        data = memoryview(self._proto.send(event))
        check_frame_size(data)
        anc = fdpass.ancillary(fds)
        async with self._send_lock:
            while data:
                try:
                    sent = self._sock.sendmsg([data], anc)
                except BlockingIOError:
                    await anyio.wait_writable(self._sock)
                    continue
                data, anc = data[sent:], []

    async def _request(self, event: P.Event, fds: list[int] | None = None) -> Any:
        if self._broken is not None:
            raise self._lost()
        done = anyio.Event()
        box: list[Any] = []
        rid: int = event.id  # type: ignore[attr-defined]
        self._waiters[rid] = (done, box)
        try:
            try:
                await self._send(event, fds or [])
            except (BrokenPipeError, ConnectionResetError) as e:
                # Closed on us: the reader reads why (a refusal sent first), then EOF.
                with anyio.move_on_after(CLOSE_READ_TIMEOUT):
                    await self._gone.wait()
                self._fail(e)
                raise self._lost() from e
            await done.wait()
        finally:
            self._waiters.pop(rid, None)
        reply = box[0]
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, P.Error):
            raise error_to_exception(reply)
        return reply

    async def _read_loop(self) -> None:
        assert self._sock is not None
        try:
            while True:
                await anyio.wait_readable(self._sock)
                try:
                    data, anc, _, _ = self._sock.recvmsg(RECV_SIZE, FD_SPACE,
                                                         socket.MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    continue
                fds = [off_stdio(fd) for fd in fdpass.received_fds(anc)]
                self._proto.receive_data(data, fds)
                while (ev := self._proto.next_event()) is not None:
                    self._route(ev)
                if not data:
                    raise DaemonConnectionError("spawnd closed the connection")
        except (OSError, P.ProtocolError) as e:
            self._fail(e)

    def _route(self, ev: P.Event) -> None:
        if isinstance(ev, P.Hello):
            self._hello.set()
        elif isinstance(ev, P.Exit):
            child = self._exits.pop(ev.id, None)
            if child is not None:
                child._on_exit(ev)
        elif getattr(ev, "id", None) is None:
            if isinstance(ev, P.Error):  # connection-level: the daemon closes on us
                self._refusal = ev
                self._fail(error_to_exception(ev))
        else:
            waiter = self._waiters.get(ev.id)  # type: ignore[attr-defined]
            if waiter is None:
                for fd in getattr(ev, "fds_received", ()):
                    os.close(fd)
                return
            if isinstance(ev, P.Spawned):
                pidfd = ev.fds_received[0] if ev.pidfd and ev.fds_received else None
                child = AsyncChild(self, ev.pid, pidfd)
                child.request_id = ev.id  # Signal names the child by it (never a pid)
                self._exits[ev.id] = child  # before any later event: its exit may be next
                waiter[1].append(child)
            else:
                waiter[1].append(ev)
            waiter[0].set()

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        reason = self._lost()
        for done, box in self._waiters.values():
            box.append(reason)
            done.set()
        for child in self._exits.values():
            child._on_exit(reason)
        self._exits.clear()
        self._hello.set()
        self._gone.set()

    def _lost(self) -> OSError:
        """What a request on a dead connection raises: the daemon's own reason if it gave
        one (``PermissionError`` for a uid the policy does not admit), else
        :class:`DaemonConnectionError`."""
        if self._refusal is not None:
            return error_to_exception(self._refusal)
        return DaemonConnectionError(f"connection to spawnd lost: {self._broken}")

    async def spawn(self, argv: Sequence[StrOrBytes], *, env: Mapping[Any, Any] | None = None,
                    fds: Mapping[int, int] | None = None, executable: StrOrBytes | None = None,
                    cwd: StrOrBytes | None = None, **options: Any) -> AsyncChild:
        """Start a child (same keywords as :meth:`Client.spawn`); errors raise at once."""
        options.setdefault("extra_groups", None)
        options.setdefault("capabilities", ())
        options.setdefault("rlimits", None)
        req, send_fds = spawn_request(self._next_id(), argv, env=env, fds=fds,
                                      executable=executable, cwd=cwd, **options)
        return await self._request(req, send_fds)

    async def ping(self) -> dict[str, int]:
        pong = await self._request(P.Ping(id=self._next_id()))
        return {"pid": pong.pid, "children": pong.children, "connections": pong.connections}
