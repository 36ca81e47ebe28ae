"""spawnd as a systemd service, end to end: real daemons, real sockets, real signals.

systemd is not PID 1 here, so its side is played by ``systemd-socket-activate`` (systemd's
own activation tool: it binds the socket and execs the daemon on the first connection, in
place, with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES) and, where that tool cannot do what the
service manager does (start the daemon *again* after an idle exit, or set WATCHDOG_PID), by
a tiny launcher that passes fds and variables exactly as sd_listen_fds(3) and
sd_watchdog_enabled(3) describe. A datagram listener in the test plays NOTIFY_SOCKET.
Unit-file checks and ``systemd-analyze verify`` live in test_activation.py.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import spawnd_client
from conftest import children_of, wait_until

SSA = shutil.which("systemd-socket-activate")
needs_ssa = pytest.mark.skipif(SSA is None, reason="systemd-socket-activate not installed "
                               "(Debian package 'systemd')")
SLEEP = shutil.which("sleep") or "/bin/sleep"
SH = shutil.which("sh") or "/bin/sh"

# What the service manager does between fork and exec, for what systemd-socket-activate
# cannot do: put the listening socket (if any) on fd 3 with LISTEN_* naming this very pid,
# and set WATCHDOG_PID to this pid when asked ("self"). Then exec the daemon in place.
LAUNCHER = r"""
import os, sys
fd = int(sys.argv[1])
if fd >= 0:
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="spawnd")
if os.environ.get("WATCHDOG_PID") == "self":
    os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "spawnd", *sys.argv[2:]])
"""

SYSTEMD_VARS = ("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM", "INVOCATION_ID")
REPO = Path(__file__).resolve().parent.parent
PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def base_env(**extra: str) -> dict[str, str]:
    """Our environment without any systemd state the test runner itself may have."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SYSTEMD_VARS)}
    env["PYTHONPATH"] = PYTHONPATH  # the daemon under test is this tree's
    env.update(extra)
    return env


@pytest.fixture
def sdir() -> Iterator[Path]:
    """A short directory: AF_UNIX paths must fit in 108 bytes, pytest's tmp_path may not."""
    with tempfile.TemporaryDirectory(prefix="spawnd-sd") as d:
        yield Path(d)


class Procs:
    """Every process a test starts; whatever is still running at the end is killed + reaped."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.files: list = []

    def start(self, argv: list[str], *, log: Path, env: dict[str, str],
              pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        out = open(log, "ab")
        self.files.append(out)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=out, env=env, pass_fds=pass_fds)
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        """After a failure: the daemon's children first (init reaps them), then the daemon."""
        for p in self.procs:
            if p.poll() is None:
                for pid, _ in children_of(p.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.kill()
            p.wait()
        for f in self.files:
            f.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    ps = Procs()
    yield ps
    ps.cleanup()


def ssa(procs: Procs, listen: str | list[str], serve_args: list[str], *, log: Path,
        fdnames: str = "spawnd", ssa_args: tuple[str, ...] = (),
        setenv: dict[str, str] | None = None) -> subprocess.Popen:
    """``systemd-socket-activate -l LISTEN --fdname=spawnd ... python -m spawnd serve ...``.

    The tool passes the daemon only PATH, HOME, TERM, USER, LISTEN_* and ``setenv`` (-E).
    """
    assert SSA is not None
    setenv = {"PYTHONPATH": PYTHONPATH, **(setenv or {})}
    listens = [listen] if isinstance(listen, str) else listen
    argv = [SSA, *(f"--listen={a}" for a in listens), f"--fdname={fdnames}", *ssa_args,
            *(f"-E{k}={v}" for k, v in setenv.items()),
            sys.executable, "-m", "spawnd", "serve", *serve_args]
    return procs.start(argv, log=log, env=base_env())


def launch(procs: Procs, serve_args: list[str], *, log: Path, env: dict[str, str],
           listen_fd: int = -1) -> subprocess.Popen:
    """Start ``spawnd serve`` as the service manager would (see LAUNCHER); same pid."""
    return procs.start([sys.executable, "-S", "-c", LAUNCHER, str(listen_fd), "serve",
                        *serve_args], log=log, env=env,
                       pass_fds=(listen_fd,) if listen_fd >= 0 else ())


def wait_activator(proc: subprocess.Popen, log: Path, sockets: int = 1) -> None:
    """systemd-socket-activate listens on all its sockets (a connection starts the daemon).

    It says so once per socket after listen(2); the file alone appears at bind(2), before.
    """
    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        return log.read_text().count("Listening on ") == sockets

    assert wait_until(up, 10), log.read_text()


def wait_listening(path: Path, proc: subprocess.Popen, log: Path) -> None:
    """A daemon with its own socket accepts connections (it binds, then listens)."""
    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(path)) == 0

    assert wait_until(up, 15), log.read_text()


def wait_log(log: Path, text: str, timeout: float = 10) -> str:
    assert wait_until(lambda: text in log.read_text(), timeout), log.read_text()
    return log.read_text()


def exit_status(proc: subprocess.Popen, log: Path, timeout: float = 10) -> int:
    """The daemon's exit status; fails with its log if it is still running after timeout."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout}s:\n{log.read_text()}") from None


def stop(proc: subprocess.Popen, log: Path, sig: int = signal.SIGTERM) -> str:
    """Signal the daemon, expect a clean exit 0 without tracebacks; return its log."""
    proc.send_signal(sig)
    rc = exit_status(proc, log, 15)
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text, text
    return text


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: records (time, sender pid, fields)."""

    def __init__(self, address: str) -> None:
        self.address = address  # NOTIFY_SOCKET syntax: "/path" or "@abstract"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # sender pid, like PID 1
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, int, dict[str, str]]] = []

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return False
        pid = -1
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", blob[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append((time.monotonic(), pid, fields))
        return True

    def wait_for(self, key: str, value: str | None = None, *, after: int = 0,
                 timeout: float = 10) -> int:
        """Index of the first message from ``after`` on that has KEY(=value)."""
        deadline = time.monotonic() + timeout
        i = after
        while True:
            while i < len(self.messages):
                fields = self.messages[i][2]
                if key in fields and (value is None or fields[key] == value):
                    return i
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} after {after}: {self.messages}")
            self._receive(left)

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._receive(left)

    def with_key(self, key: str) -> list[tuple[float, int, dict[str, str]]]:
        return [m for m in self.messages if key in m[2]]

    def close(self) -> None:
        self.sock.close()


def read_hello(path: Path) -> bytes:
    """Connect and read the daemon's first frame (its hello), as a raw client would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(str(path))  # must not fail: the socket was announced ready
        head = c.recv(4)
        assert len(head) == 4, head
        return c.recv(struct.unpack(">I", head)[0])


def write_policy(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)  # atomic, like an editor or config management


ROOT_USR_BIN = """\
version = 1
[[allow]]
name = "root, /usr/bin"
uids = [0]
executables = ["/usr/bin/"]
"""
ROOT_TRUE_ONLY = """\
version = 1
[[allow]]
name = "root, true only"
uids = [0]
executables = ["/usr/bin/true"]
"""
INVALID = """\
version = 1
[[allow]]
name = "typo"
uids = [0]
executables = ["/usr/bin/"]
max_childern = 3
"""


# --- 1. socket activation ----------------------------------------------------------------


@needs_ssa
@pytest.mark.parametrize("group", [None, 1])
def test_activated_daemon_serves_and_children_see_nothing_of_it(
        sdir: Path, procs: Procs, group: int | None) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    notify = NotifyListener(str(sdir / "notify"))
    extra = ["--group", str(group)] if group is not None else []
    d = ssa(procs, str(path), ["--log-level", "debug", *extra], log=log,
            setenv={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "60000000"})
    wait_activator(d, log)
    os.chmod(path, 0o666)  # systemd's default SocketMode=: the daemon must narrow it
    try:
        with spawnd_client.Client(str(path), autostart=False) as c:
            info = c.ping()  # the first connection starts the daemon, in place (same pid)
            assert info["pid"] == d.pid and info["connections"] == 1
            # Ready once serving, announced by the main pid (NotifyAccess=main).
            i = notify.wait_for("READY", "1")
            assert notify.messages[i][1] == d.pid
            # The daemon set the mode itself.
            st = path.stat()
            assert st.st_mode & 0o7777 == (0o600 if group is None else 0o660)
            if group is not None:
                assert st.st_gid == group
            # The activated fd is close-on-exec in the daemon...
            flags = Path(f"/proc/{d.pid}/fdinfo/3").read_text().split("flags:")[1].split()[0]
            assert int(flags, 8) & os.O_CLOEXEC
            assert os.readlink(f"/proc/{d.pid}/fd/3").startswith("socket:")
            # ...and the child has exactly what the client asked for: env and 0-2.
            child = c.spawn([SLEEP, "30"], env={"ONLY": "this"})
            environ = Path(f"/proc/{child.pid}/environ")
            # posix_spawn returns once exec has begun; the kernel publishes the new env a
            # moment later (after close-on-exec), so wait for it before looking.
            assert wait_until(environ.read_bytes)
            assert environ.read_bytes() == b"ONLY=this\0"
            # The dynamic loader briefly opens libraries at fd 3 while the child starts:
            # wait for it to settle (a leaked fd never goes away, so this still fails).
            fds = f"/proc/{child.pid}/fd"
            wait_until(lambda: sorted(os.listdir(fds)) == ["0", "1", "2"])
            assert sorted(os.listdir(fds)) == ["0", "1", "2"]
            child.kill()
            assert child.wait(10) == -signal.SIGKILL
        text = stop(d, log)
    finally:
        notify.close()
    assert "socket-activated: spawnd=" + str(path) in text
    # Activation does not own the socket file: the daemon leaves it to systemd.
    assert path.exists()


@needs_ssa
def test_activation_with_two_named_sockets(sdir: Path, procs: Procs) -> None:
    """A user socket and an admin socket in one unit (FileDescriptorName=): both served."""
    user, admin, log = sdir / "user.sock", sdir / "admin.sock", sdir / "log"
    d = ssa(procs, [str(user), str(admin)], [], log=log, fdnames="spawnd:admin")
    wait_activator(d, log, sockets=2)
    with spawnd_client.Client(str(admin), autostart=False) as a:  # either one activates
        assert a.ping()["pid"] == d.pid
        with spawnd_client.Client(str(user), autostart=False) as u:
            assert u.ping() == {"pid": d.pid, "children": 0, "connections": 2}
    assert user.stat().st_mode & 0o777 == admin.stat().st_mode & 0o777 == 0o600
    text = stop(d, log)
    assert f"socket-activated: spawnd={user}, admin={admin}" in text


# --- 2. the wrong kind of fd ----------------------------------------------------------------


@needs_ssa
@pytest.mark.parametrize("kind", ["datagram", "seqpacket", "tcp", "abstract", "accept"])
def test_activation_refuses_a_socket_that_is_not_a_listening_unix_stream(
        sdir: Path, procs: Procs, kind: str) -> None:
    log = sdir / "log"
    path = sdir / "s"
    listen, opts = str(path), ()
    expected = {
        "datagram": "is AF_UNIX/SOCK_DGRAM, expected AF_UNIX/SOCK_STREAM",
        "seqpacket": "is AF_UNIX/SOCK_SEQPACKET, expected AF_UNIX/SOCK_STREAM",
        "tcp": "is AF_INET/SOCK_STREAM, expected AF_UNIX/SOCK_STREAM",
        "abstract": "is abstract",
        "accept": "not listening (Accept=yes is not supported)",
    }[kind]
    if kind == "datagram":
        opts = ("--datagram",)
    elif kind == "seqpacket":
        opts = ("--seqpacket",)
    elif kind == "tcp":
        port = free_tcp_port()
        listen = f"127.0.0.1:{port}"
    elif kind == "abstract":
        listen = f"@spawnd-test-{os.getpid()}-{time.monotonic_ns()}"
    elif kind == "accept":
        opts = ("--accept",)
    d = ssa(procs, listen, [], log=log, ssa_args=opts)
    wait_activator(d, log)

    # Something arrives: systemd-socket-activate starts the daemon with that fd.
    if kind == "tcp":
        trigger = socket.create_connection(("127.0.0.1", port), timeout=5)
    elif kind == "datagram":
        trigger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        trigger.sendto(b"x", str(path))
    else:
        trigger = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET if kind == "seqpacket"
                                else socket.SOCK_STREAM)
        trigger.settimeout(5)
        trigger.connect("\0" + listen[1:] if kind == "abstract" else listen)
    with trigger:
        if kind == "accept":
            # One daemon per connection, handed the connected socket: refused, closed.
            assert trigger.recv(100) == b""
            text = wait_log(log, expected)
        else:
            rc = exit_status(d, log, 15)
            text = log.read_text()
            assert rc != 0, text
    assert expected in text, text
    assert "Traceback" not in text, text
    assert "ready" not in text, text


# --- 3. sd_notify ----------------------------------------------------------------------------


def test_notify_ready_watchdog_status_stopping(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    notify = NotifyListener(str(sdir / "notify"))
    env = base_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000", WATCHDOG_PID="self")
    d = launch(procs, ["--socket", str(path)], log=log, env=env)
    try:
        ready = notify.wait_for("READY", "1", timeout=15)
        # A reload the moment READY=1 arrives (systemctl start; systemctl reload) must find
        # SIGHUP handled: its default action would end the daemon "cleanly", not restarted.
        d.send_signal(signal.SIGHUP)
        # The socket exists and the daemon answers.
        assert read_hello(path)
        wait_log(log, "SIGHUP: no policy file to reload")
        assert {pid for _, pid, _ in notify.messages} == {d.pid}  # NotifyAccess=main

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.2 s, from the event loop.
        t_ready = notify.messages[ready][0]
        notify.drain(t_ready + 1.3 - time.monotonic())
        assert d.poll() is None, log.read_text()
        beats = [t for t, _, _ in notify.with_key("WATCHDOG") if t_ready <= t <= t_ready + 1.2]
        assert 4 <= len(beats) <= 8, beats
        gaps = sorted(b - a for a, b in zip(beats, beats[1:], strict=False))
        assert 0.15 <= gaps[len(gaps) // 2] <= 0.3, gaps
        assert gaps[-1] < 0.4, gaps  # never late enough for systemd to kill us

        # STATUS= follows the children count.
        with spawnd_client.Client(str(path), autostart=False) as c:
            mark = len(notify.messages)
            child = c.spawn([SLEEP, "30"], env={})
            i = notify.wait_for("STATUS", "1 children, 1 connections", after=mark)
            child.kill()
            assert child.wait(10) == -signal.SIGKILL
            notify.wait_for("STATUS", "0 children, 1 connections", after=i + 1)

        mark = len(notify.messages)
        stop(d, log)
        notify.drain(0.05)
        after = [f for _, _, f in notify.messages[mark:]]
        assert {"STOPPING": "1"} in after, after
        assert all("READY" not in f for f in after), after
    finally:
        notify.close()


def test_notify_abstract_address_and_foreign_watchdog_pid(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    notify = NotifyListener(f"@spawnd-test-{os.getpid()}-{time.monotonic_ns()}")
    # WATCHDOG_PID names another process: the variables were inherited, not meant for us.
    env = base_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    d = launch(procs, ["--socket", str(path)], log=log, env=env)
    try:
        notify.wait_for("READY", "1", timeout=15)
        assert read_hello(path)
        notify.drain(0.5)
        assert notify.with_key("WATCHDOG") == []
        mark = len(notify.messages)
        stop(d, log)
        notify.wait_for("STOPPING", "1", after=mark, timeout=1)
    finally:
        notify.close()


# --- 4. idle exit ----------------------------------------------------------------------------


class SocketUnit:
    """spawnd.socket + spawnd.service (Accept=no), as PID 1 runs them.

    Owns the listening socket for good; whenever it is readable and no daemon runs, starts
    one with it on fd 3. Connections made while no daemon runs wait in the backlog.
    """

    def __init__(self, procs: Procs, path: Path, serve_args: list[str], log: Path) -> None:
        self.procs, self.serve_args, self.log = procs, serve_args, log
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(str(path))
        self.lsock.listen(16)
        self.started: list[subprocess.Popen] = []
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._quit.is_set():
            if not select.select([self.lsock], [], [], 0.02)[0]:
                continue
            p = launch(self.procs, self.serve_args, log=self.log, env=base_env(),
                       listen_fd=self.lsock.fileno())
            self.started.append(p)
            while p.poll() is None and not self._quit.wait(0.02):
                pass

    def close(self) -> None:
        self._quit.set()
        self._thread.join(10)
        self.lsock.close()


def test_idle_exit_only_when_idle_and_restart_on_next_connection(
        sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    unit = SocketUnit(procs, path, ["--idle-exit", "1", "--log-level", "debug"], log)
    try:
        with spawnd_client.Client(str(path), autostart=False) as c:
            first = c.ping()["pid"]
            [d1] = unit.started
            assert d1.pid == first
            time.sleep(1.4)  # a connected client, even a silent one, keeps it alive
            assert d1.poll() is None, log.read_text()
            # A child that outlives its client's connection keeps it alive too.
            child = c.spawn([SLEEP, "1.2"], env={}, on_disconnect="keep")
        time.sleep(0.9)
        assert d1.poll() is None, log.read_text()
        # The child exits at ~1.2 s: idle from then on, exit ~1 s later, status 0.
        assert exit_status(d1, log, 5) == 0
        assert "idle for 1s: exiting" in log.read_text()
        assert not Path(f"/proc/{child.pid}").exists()
        assert path.exists()  # the socket is the service manager's, not the daemon's

        # The next connection starts a fresh daemon on the same socket.
        with spawnd_client.Client(str(path), autostart=False) as c2:
            second = c2.ping()["pid"]
            assert second != first and [p.pid for p in unit.started] == [first, second]
            proc = c2.spawn(["/usr/bin/true"], env={})
            assert proc.wait(10) == 0
        stop(unit.started[-1], log)
    finally:
        unit.close()


@needs_ssa
def test_idle_exit_under_systemd_socket_activate(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    d = ssa(procs, str(path), ["--idle-exit", "1"], log=log)
    wait_activator(d, log)
    with spawnd_client.Client(str(path), autostart=False) as c:
        assert c.ping()["pid"] == d.pid
    closed = time.monotonic()
    assert exit_status(d, log) == 0
    assert 0.9 <= time.monotonic() - closed < 5
    # systemd-socket-activate exec'd the daemon (Accept=no), so nothing listens any more:
    # unlike PID 1 it cannot start the daemon again (see test_idle_exit_only_when_idle...).
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(path))


# --- 5. SIGHUP reload ----------------------------------------------------------------------


def test_check_config_exit_status(sdir: Path) -> None:
    good, bad = sdir / "good.toml", sdir / "bad.toml"
    write_policy(good, ROOT_USR_BIN)
    write_policy(bad, INVALID)
    run = [sys.executable, "-m", "spawnd", "check-config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, env=base_env(),
                        check=False)
    assert ok.returncode == 0, ok.stderr
    ko = subprocess.run([*run, str(bad)], capture_output=True, text=True, env=base_env(),
                        check=False)
    assert ko.returncode == 1
    assert str(bad) in ko.stderr and "max_childern" in ko.stderr, ko.stderr


def test_sighup_reloads_policy_keeps_connections_and_rejects_bad_files(
        sdir: Path, procs: Procs) -> None:
    path, log, policy = sdir / "spawnd.sock", sdir / "log", sdir / "policy.toml"
    write_policy(policy, ROOT_USR_BIN)
    d = launch(procs, ["--socket", str(path), "--config", str(policy)], log=log, env=base_env())
    wait_listening(path, d, log)

    def reload(marker: str, count: int) -> None:
        d.send_signal(signal.SIGHUP)
        assert wait_until(lambda: log.read_text().count(marker) == count), log.read_text()

    with spawnd_client.Client(str(path), autostart=False) as c:
        assert c.spawn([SLEEP, "0"], env={}).wait(10) == 0
        long = c.spawn([SLEEP, "30"], env={})
        transport = c.transport()

        write_policy(policy, ROOT_TRUE_ONLY)
        reload("policy reloaded", 1)
        with pytest.raises(PermissionError):
            c.spawn([SLEEP, "0"], env={})
        assert c.spawn(["/usr/bin/true"], env={}).wait(10) == 0

        write_policy(policy, INVALID)
        reload("policy reload failed", 1)
        assert "max_childern" in log.read_text()
        assert d.poll() is None
        with pytest.raises(PermissionError):  # the previous policy is still in force
            c.spawn([SLEEP, "0"], env={})
        assert c.spawn(["/usr/bin/true"], env={}).wait(10) == 0

        write_policy(policy, ROOT_USR_BIN)
        reload("policy reloaded", 2)
        assert c.spawn([SLEEP, "0"], env={}).wait(10) == 0

        # One connection throughout, and the child started before the reloads still ours.
        assert c.transport() is transport and transport.broken is None
        assert long.poll() is None
        long.terminate()
        assert long.wait(10) == -signal.SIGTERM
    stop(d, log)


# --- 6. stopping with live children ----------------------------------------------------------

STUBBORN = "trap '' TERM; echo ready; exec sleep 30"  # SIG_IGN survives exec


def start_children(c: spawnd_client.Client) -> tuple[spawnd_client.Child, spawnd_client.Child]:
    """A normal child and one that ignores SIGTERM (once it has said so)."""
    normal = c.spawn([SLEEP, "30"], env={})
    r, w = os.pipe()
    try:
        stubborn = c.spawn([SH, "-c", STUBBORN], env={"PATH": "/usr/bin:/bin"}, fds={1: w})
        os.close(w)
        with os.fdopen(r, "rb") as f:
            assert f.readline() == b"ready\n"
    except BaseException:
        os.close(w)
        raise
    return normal, stubborn


def test_sigterm_terminates_then_kills_stubborn_children(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    d = launch(procs, ["--socket", str(path), "--stop-grace", "1"], log=log, env=base_env())
    wait_listening(path, d, log)
    with spawnd_client.Client(str(path), autostart=False) as c:
        normal, stubborn = start_children(c)
        t0 = time.monotonic()
        d.send_signal(signal.SIGTERM)
        assert normal.wait(10) == -signal.SIGTERM
        # Within the grace period: still running, and no new connection is accepted.
        assert stubborn.poll() is None
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
            s.connect(str(path))
        assert stubborn.wait(10) == -signal.SIGKILL
        assert time.monotonic() - t0 >= 0.95
        assert exit_status(d, log) == 0
    text = log.read_text()
    assert "stopping: 2 children (terminate)" in text
    assert f"child {stubborn.pid} ignored SIGTERM" in text
    assert "Traceback" not in text, text
    for child in (normal, stubborn):  # reaped by the daemon, not left to init
        assert not Path(f"/proc/{child.pid}").exists()
    assert not path.exists()  # its own socket (not activated): removed


def test_sigterm_with_on_stop_kill(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    d = launch(procs, ["--socket", str(path), "--on-stop", "kill", "--stop-grace", "10"],
               log=log, env=base_env())
    wait_listening(path, d, log)
    with spawnd_client.Client(str(path), autostart=False) as c:
        normal, stubborn = start_children(c)
        t0 = time.monotonic()
        d.send_signal(signal.SIGTERM)
        assert normal.wait(10) == -signal.SIGKILL
        assert stubborn.wait(10) == -signal.SIGKILL
        assert exit_status(d, log) == 0
        assert time.monotonic() - t0 < 5  # no grace period
    assert "stopping: 2 children (kill)" in log.read_text()


def test_sigterm_with_on_stop_wait(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    d = launch(procs, ["--socket", str(path), "--on-stop", "wait", "--stop-grace", "0.1"],
               log=log, env=base_env())
    wait_listening(path, d, log)
    with spawnd_client.Client(str(path), autostart=False) as c:
        child = c.spawn([SLEEP, "1"], env={})
        d.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert d.poll() is None and child.poll() is None  # waits, well past stop-grace
        assert child.wait(10) == 0  # it ran to completion and its exit reached us
        assert exit_status(d, log) == 0
    assert "stopping: 1 children (wait)" in log.read_text()


# --- 7. journald logging ---------------------------------------------------------------------


def journal_env(log: Path, **extra: str) -> dict[str, str]:
    """JOURNAL_STREAM naming the file the daemon's stderr will be (the log, append mode)."""
    log.touch()
    st = log.stat()
    return base_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", **extra)


def lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line]


def test_journal_stream_gets_priority_prefixes(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    d = launch(procs, ["--socket", str(path), "--log-level", "debug"], log=log,
               env=journal_env(log))
    wait_listening(path, d, log)
    with spawnd_client.Client(str(path), autostart=False) as c:
        assert c.spawn([SLEEP, "0"], env={}).wait(10) == 0
    stop(d, log)
    got = lines(log)
    assert f"<6>spawnd {d.pid} ready" in got, got
    assert any(line.startswith("<7>uid 0 spawned ") for line in got), got
    assert all(line[0] == "<" and line[1] in "01234567" and line[2] == ">" for line in got), got


def test_log_level_warning_suppresses_info(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    # An unusable NOTIFY_SOCKET is a warning at start-up; everything else is info/debug.
    d = launch(procs, ["--socket", str(path), "--log-level", "warning"], log=log,
               env=journal_env(log, NOTIFY_SOCKET="relative/path"))
    wait_listening(path, d, log)
    with spawnd_client.Client(str(path), autostart=False) as c:
        assert c.spawn([SLEEP, "0"], env={}).wait(10) == 0
    stop(d, log)
    got = lines(log)
    assert "<4>NOTIFY_SOCKET='relative/path': unsupported address, notifications off" in got, got
    assert all(line[:3] in ("<0>", "<1>", "<2>", "<3>", "<4>") for line in got), got


def test_plain_log_when_stderr_is_not_the_journal_stream(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "spawnd.sock", sdir / "log"
    other = sdir / "other"
    d = launch(procs, ["--socket", str(path)], log=log, env=journal_env(other))
    wait_listening(path, d, log)
    with spawnd_client.Client(str(path), autostart=False) as c:
        c.ping()
    stop(d, log)
    got = lines(log)
    assert f"spawnd[{d.pid}]: INFO spawnd {d.pid} ready" in got, got
    assert not any(line.startswith("<") for line in got), got


@needs_ssa
def test_start_up_refusal_is_an_error_in_the_journal(sdir: Path, procs: Procs) -> None:
    path, log = sdir / "s", sdir / "log"
    d = ssa(procs, str(path), [], log=log, ssa_args=("--datagram",),
            setenv={"JOURNAL_STREAM": journal_env(log)["JOURNAL_STREAM"]})
    wait_activator(d, log)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", str(path))
    assert exit_status(d, log, 15) != 0
    refusal = [line for line in lines(log) if "SOCK_DGRAM" in line]
    assert len(refusal) == 1 and refusal[0].startswith("<3>"), lines(log)

