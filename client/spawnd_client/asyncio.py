"""The asyncio face: ``create_subprocess_exec`` / ``create_subprocess_shell`` through spawnd.

The returned object *is* an ``asyncio.subprocess.Process`` (a subclass): ``communicate``,
``wait``, stdin/stdout/stderr are the stdlib's own code over the stdlib's
``StreamWriter``/``StreamReader`` (with ``limit``), on real pipes connected with
``loop.connect_read_pipe``/``connect_write_pipe``. Only the transport underneath differs:
no child watcher, the exit status comes from the daemon's exit event, and signals go to
the child's pidfd. ``asyncio.wait_for`` timeouts and task cancellation behave as with the
stdlib (a timed-out ``communicate`` leaves the child running; ``kill()`` it).
"""

from __future__ import annotations

# This module is spawnd_client.asyncio: imports are absolute, so this is the stdlib's.
import asyncio
import asyncio.streams
import asyncio.subprocess
import os
import signal as _signal
from typing import Any

from . import aio
from .aio import AsyncChild, AsyncClient

PIPE = asyncio.subprocess.PIPE
STDOUT = asyncio.subprocess.STDOUT
DEVNULL = asyncio.subprocess.DEVNULL

__all__ = ["DEVNULL", "PIPE", "STDOUT", "Process", "create_subprocess_exec",
           "create_subprocess_shell"]

_DEFAULT_LIMIT = asyncio.streams._DEFAULT_LIMIT  # 64 KiB, the stdlib's own default
_PREEXEC_REFUSED = (
    "preexec_fn is not supported: the daemon starts the child with posix_spawn, so no Python "
    "code can run in it before exec. Use start_new_session, process_group, umask, user, "
    "group, rlimits or capabilities instead, or exec through a wrapper program."
)


class _Transport(asyncio.SubprocessTransport):
    """What ``asyncio.subprocess.Process`` talks to, over a spawnd child and its pipes."""

    def __init__(self, child: AsyncChild) -> None:
        super().__init__()
        self._child = child
        self._pipes: dict[int, asyncio.BaseTransport] = {}
        self._closed = False

    def get_pid(self) -> int:
        return self._child.pid

    def get_returncode(self) -> int | None:
        return self._child.returncode

    def get_pipe_transport(self, fd: int) -> Any:
        return self._pipes.get(fd)

    async def _wait(self) -> int:
        return await self._child.wait()

    def send_signal(self, signal: int) -> None:
        if self._closed:
            raise ProcessLookupError()  # as the stdlib's closed transport does
        self._child.signal_nowait(signal)

    def terminate(self) -> None:
        self.send_signal(_signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(_signal.SIGKILL)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the pipes; a child still running is killed (the stdlib does the same)."""
        if self._closed:
            return
        self._closed = True
        for pipe in self._pipes.values():
            pipe.close()
        if self._child.returncode is None:
            self._child.signal_nowait(_signal.SIGKILL)


class _Streams:
    """Stands where the stdlib's SubprocessStreamProtocol does: it holds the streams."""

    def __init__(self) -> None:
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None


class Process(asyncio.subprocess.Process):
    """``asyncio.subprocess.Process`` whose child spawnd started; ``pidfd`` is extra."""

    @property
    def pidfd(self) -> int | None:
        return self._transport._child.pidfd  # type: ignore[attr-defined]


async def _connect(child: AsyncChild, ours: list[int | None], limit: int) -> Process:
    loop = asyncio.get_running_loop()
    transport = _Transport(child)
    streams = _Streams()
    opened: list[Any] = []
    try:
        for target, fd in enumerate(ours):
            if fd is None:
                continue
            pipe = open(fd, "wb" if target == 0 else "rb", buffering=0)  # noqa: SIM115
            ours[target] = None  # the file object owns it now
            opened.append(pipe)
            if target == 0:
                t, proto = await loop.connect_write_pipe(
                    lambda: asyncio.streams.FlowControlMixin(loop=loop), pipe)
                streams.stdin = asyncio.StreamWriter(t, proto, None, loop)
            else:
                reader = asyncio.StreamReader(limit=limit, loop=loop)
                t, _ = await loop.connect_read_pipe(
                    lambda r=reader: asyncio.StreamReaderProtocol(r, loop=loop), pipe)
                if target == 1:
                    streams.stdout = reader
                else:
                    streams.stderr = reader
            transport._pipes[target] = t
    except BaseException:
        for t in transport._pipes.values():
            t.close()
        for pipe in opened:
            pipe.close()
        for fd in ours:
            if fd is not None:
                os.close(fd)
        child.signal_nowait(_signal.SIGKILL)  # nobody will own it
        raise
    return Process(transport, streams, loop)


def _check(kwds: dict[str, Any]) -> None:
    """The stdlib's own refusals (``loop.subprocess_exec``), and ours."""
    if kwds.pop("universal_newlines", False):
        raise ValueError("universal_newlines must be False")
    if kwds.pop("bufsize", 0) != 0:
        raise ValueError("bufsize must be 0")
    if kwds.pop("text", None):
        raise ValueError("text must be False")
    if kwds.pop("encoding", None) is not None:
        raise ValueError("encoding must be None")
    if kwds.pop("errors", None) is not None:
        raise ValueError("errors must be None")
    if kwds.pop("preexec_fn", None) is not None:
        raise ValueError(_PREEXEC_REFUSED)
    kwds.pop("startupinfo", None)
    kwds.pop("creationflags", None)


async def _create(args: list[Any], stdin: Any, stdout: Any, stderr: Any, limit: int,
                  client: AsyncClient | None, kwds: dict[str, Any]) -> Process:
    _check(kwds)
    asyncio.get_running_loop()  # the asyncio face needs asyncio: say so before any child
    child, ours = await aio.start_child(args, stdin=stdin, stdout=stdout, stderr=stderr,
                                        client=client, **kwds)
    return await _connect(child, ours, limit)


async def create_subprocess_exec(program: Any, *args: Any, stdin: Any = None, stdout: Any = None,
                                 stderr: Any = None, limit: int = _DEFAULT_LIMIT,
                                 client: AsyncClient | None = None, **kwds: Any) -> Process:
    """``asyncio.create_subprocess_exec`` through spawnd; errors (``FileNotFoundError``...)
    raise here, as the stdlib raises them. Extra keywords as the blocking client:
    ``on_disconnect``, ``grace``, ``capabilities``, ``rlimits``, ``no_new_privs``,
    ``process_group``; ``client`` picks a connection (default: this loop's shared one)."""
    if kwds.get("shell"):
        raise ValueError("shell must be False")
    kwds.pop("shell", None)
    return await _create([program, *args], stdin, stdout, stderr, limit, client, kwds)


async def create_subprocess_shell(cmd: str | bytes, stdin: Any = None, stdout: Any = None,
                                  stderr: Any = None, limit: int = _DEFAULT_LIMIT,
                                  client: AsyncClient | None = None, **kwds: Any) -> Process:
    """``asyncio.create_subprocess_shell`` through spawnd (``/bin/sh -c cmd``)."""
    if not isinstance(cmd, (bytes, str)):
        raise ValueError("cmd must be a string")
    if kwds.pop("shell", True) is not True:
        raise ValueError("shell must be True")
    args: list[Any] = ["/bin/sh", "-c", cmd]
    if kwds.get("executable") is not None:
        args[0] = kwds["executable"]
    return await _create(args, stdin, stdout, stderr, limit, client, kwds)
