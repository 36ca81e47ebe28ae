"""Helpers for the fault suite: a raw frame-speaking client, daemon launchers, leak checks."""

from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import spawnd_client
from conftest import REPO, Daemon, children_of, fd_count, rss_kib, wait_until

from spawnd import protocol as P

PY = sys.executable
RECV_FD_SPACE = socket.CMSG_SPACE(16 * 4)


def frame(obj: Any) -> bytes:
    """One frame: a 4-byte length, then ``obj`` packed (bytes stay bin, str stays str)."""
    return frame_body(msgpack.packb(obj, use_bin_type=True))


def frame_body(body: bytes) -> bytes:
    return P.HEADER.pack(len(body)) + body


HELLO = {"t": "hello", "version": 1, "agent": "faults"}


def spawn_msg(rid: int, argv: Sequence[Any], **fields: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"t": "spawn", "id": rid, "argv": list(argv), "env": []}
    m.update(fields)
    return m


class Raw:
    """A client that writes whatever bytes and fds it is told to and parses the replies.

    Every fd the daemon sends us (pidfds) is kept in ``received_fds`` and closed by
    :meth:`close`. ``Raw.live`` holds the unclosed ones, so a failed case can clean up.
    """

    live: set[Raw] = set()

    def __init__(self, path: str, *, hello: bool = True, sock: socket.socket | None = None,
                 timeout: float = 10.0) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
        self.sock = sock
        Raw.live.add(self)
        self.sock.settimeout(timeout)
        self.conn = P.Connection("client")
        self.events: deque[P.Event] = deque()
        self.received_fds: list[int] = []
        self.eof = False
        self.error: P.ProtocolError | None = None
        self.daemon_hello: P.Hello | None = None
        if hello:
            self.send_obj(HELLO)
            self.daemon_hello = self.expect(P.Hello)

    # -- sending
    def send(self, data: bytes, fds: Iterable[int] = ()) -> None:
        fds = list(fds)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        view = memoryview(data)
        sent = self.sock.sendmsg([view], anc)
        if sent < len(view):
            self.sock.sendall(view[sent:])

    def send_obj(self, obj: Any, fds: Iterable[int] = ()) -> None:
        self.send(frame(obj), fds)

    # -- receiving
    def _read(self, timeout: float) -> bool:
        """One recvmsg into the parser; False on timeout."""
        self.sock.settimeout(timeout)
        try:
            data, anc, _, _ = self.sock.recvmsg(1 << 16, RECV_FD_SPACE, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            data, anc = b"", []
        fds = []
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(blob[: len(blob) - len(blob) % a.itemsize])
                fds.extend(a)
        self.received_fds.extend(fds)
        if not data:
            self.eof = True
        try:
            self.conn.receive_data(data, fds)
            while (ev := self.conn.next_event()) is not None:
                self.events.append(ev)
        except P.ProtocolError as e:  # the daemon must never send us garbage
            self.error = e
            raise
        return True

    def next(self, timeout: float = 10.0) -> P.Event | None:
        """The next event; None at EOF. Raises TimeoutError if nothing came in ``timeout``."""
        end = time.monotonic() + timeout
        while not self.events:
            if self.eof:
                return None
            left = end - time.monotonic()
            if left <= 0 or not self._read(left):
                raise TimeoutError(f"no event within {timeout}s")
        return self.events.popleft()

    def expect(self, cls: type[P.Event], rid: int | None = None,
               timeout: float = 10.0) -> Any:
        """Skip to the next ``cls`` event (with ``id`` ``rid`` if given); fail on EOF."""
        skipped = []
        while True:
            ev = self.next(timeout)
            if ev is None:
                raise AssertionError(f"EOF while waiting for {cls.__name__} (got {skipped})")
            if isinstance(ev, cls) and (rid is None or getattr(ev, "id", None) == rid):
                return ev
            skipped.append(ev)
            if isinstance(ev, P.Error) and ev.id is None:
                raise AssertionError(f"connection-level error: {ev}")

    def reply(self, rid: int, timeout: float = 10.0) -> P.Event:
        """The reply to request ``rid`` (exit events for other ids are kept)."""
        kept = []
        try:
            while True:
                ev = self.next(timeout)
                if ev is None:
                    raise AssertionError(f"EOF while waiting for the reply to {rid}")
                if getattr(ev, "id", None) == rid and not isinstance(ev, P.Exit):
                    return ev
                if isinstance(ev, P.Error) and ev.id is None:
                    raise AssertionError(f"connection-level error: {ev}")
                kept.append(ev)
        finally:
            self.events.extendleft(reversed(kept))

    def drain_until_closed(self, timeout: float = 10.0) -> list[P.Event]:
        """Every event until the daemon closes the connection (fails if it does not)."""
        out = []
        end = time.monotonic() + timeout
        while True:
            ev = self.next(max(end - time.monotonic(), 0.001))
            if ev is None:
                return out
            out.append(ev)

    def closed_with_error(self, timeout: float = 10.0) -> P.Error:
        """The daemon sends one connection-level error and closes; return that error."""
        evs = self.drain_until_closed(timeout)
        errs = [e for e in evs if isinstance(e, P.Error)]
        assert errs, f"closed without an error: {evs}"
        return errs[-1]

    def close(self) -> None:
        for fd in self.received_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.received_fds.clear()
        self.sock.close()
        Raw.live.discard(self)

    @classmethod
    def close_all(cls) -> None:
        for r in list(cls.live):
            r.close()


def raw_error(path: str, payload: bytes, fds: Iterable[int] = (), *, hello: bool = True,
              timeout: float = 10.0) -> P.Error:
    """Send ``payload`` on a fresh connection; the daemon must answer an error and close."""
    r = Raw(path, hello=hello)
    try:
        try:
            r.send(payload, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return r.closed_with_error(timeout)
    finally:
        r.close()


# ---------------------------------------------------------------------------- daemons

def launch(tmp_path: Path, *args: str, prefix: Sequence[str] = (), preamble: str = "",
           name: str = "spawnd.sock", env: dict[str, str] | None = None,
           wait: bool = True) -> Daemon:
    """Start ``spawnd serve`` like conftest.start_daemon, optionally under a wrapper command
    (``prlimit``, ``setpriv``: they exec, so the pid stays the daemon's) and with a Python
    ``preamble`` run in the daemon before it starts (fault injection from the test side)."""
    path = str(tmp_path / name)
    log = tmp_path / (name + ".log")
    code = preamble + "\nimport sys\nfrom spawnd.cli import main\nsys.exit(main())\n"
    cmd = [*prefix, PY, "-c", code, "serve", "--socket", path, "--log-level", "debug", *args]
    e = env if env is not None else os.environ.copy()
    e["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), str(REPO / "client"), e.get("PYTHONPATH", "")) if p)
    with open(log, "wb") as errf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=errf, env=e, cwd=str(tmp_path))
    d = Daemon(path, proc, log)
    if wait:
        wait_up(d)
    return d


def wait_up(d: Daemon, timeout: float = 15.0) -> None:
    def up() -> bool:
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited: {d.log.read_text()}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(d.path)
            return True
        except OSError:
            return False
        finally:
            s.close()

    assert wait_until(up, timeout), d.log.read_text()


def stop(d: Daemon, *, clean_log: bool = True) -> str:
    for c in d.clients:
        c.close()
    rc = d.stop()
    log = d.log.read_text()
    assert rc == 0, log
    if clean_log:
        assert "Traceback" not in log, log
    return log


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def gone(pid: int, started: int | None) -> bool:
    """The process that started at ``started`` was reaped (pids wrap: compare start times;
    a zombie still has its entry)."""
    return start_time(pid) != started


def zombies(pid: int) -> list[int]:
    return [p for p, s in children_of(pid) if s == "Z"]


class Baseline:
    """The daemon's idle state, and the check every case ends with.

    ``check()``: a brand-new client is served (spawn, exit status, ping), no children and no
    zombies remain, the fd count is back to the baseline and RSS grew at most ``rss_slack``.
    """

    def __init__(self, d: Daemon, rss_slack_kib: int = 6 * 1024) -> None:
        self.d = d
        self.rss_slack_kib = rss_slack_kib
        self.fds = self.warm_up() - 1  # without the probe's own connection
        self.rss = rss_kib(d.pid)

    def warm_up(self) -> int:
        """Touch the common paths once so lazily allocated memory is in the baseline; wait
        until the probe is the only connection and no child is left; return the fd count."""
        with spawnd_client.Client(self.d.path, autostart=False) as c:
            for _ in range(3):
                assert c.spawn(["/bin/true"], env={}).wait(10) == 0
                c.ping()
            try:
                c.spawn(["/nonexistent/x"], env={})
            except FileNotFoundError:
                pass
            assert wait_until(lambda: c.ping()["connections"] == 1, 15), c.ping()
            self.settle()
            return fd_count(self.d.pid)

    def settle(self) -> None:
        assert wait_until(lambda: not children_of(self.d.pid), 15), children_of(self.d.pid)

    def serves(self) -> None:
        with spawnd_client.Client(self.d.path, autostart=False) as c:
            child = c.spawn(["/bin/sh", "-c", "exit 7"], env={})
            assert child.wait(10) == 7
            child.close()
            info = c.ping()
            assert info["pid"] == self.d.pid

    def check(self, *, serves: bool = True) -> None:
        assert self.d.proc.poll() is None, f"daemon died: {self.d.log.read_text()[-3000:]}"
        if serves:
            self.serves()
        self.settle()
        assert not zombies(self.d.pid)
        ok = wait_until(lambda: fd_count(self.d.pid) <= self.fds, 10)
        assert ok, ("fd leak", fd_count(self.d.pid), self.fds,
                    sorted(os.listdir(f"/proc/{self.d.pid}/fd"), key=int))
        rss = rss_kib(self.d.pid)
        assert rss <= self.rss + self.rss_slack_kib, ("RSS grew", self.rss, rss)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def open_fds(n: int) -> list[int]:
    """``n`` fresh fds (read ends of pipes plus /dev/null) for sending; caller closes."""
    out = []
    for _ in range(n):
        out.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    return out


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)
