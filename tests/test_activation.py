"""Tests for spawnd.activation, spawnd.log and the systemd unit files; no daemon needed.

Socket activation is exercised in child processes so the test runner's own fds 3/4 are
never touched: the child moves the sockets it was given onto fds 3, 4, ... (without
FD_CLOEXEC, as systemd passes them) and reports what listen_sockets() made of them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spawnd.activation import (
    ActivationError,
    Notifier,
    listen_sockets,
    secure_socket_path,
    socket_path,
)
from spawnd.log import setup_logging

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"

CHILD = r"""
import fcntl, json, os, sys
from spawnd.activation import ActivationError, listen_sockets

cfg = json.loads(sys.argv[1])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in cfg["fds"]]
for fd in cfg["fds"]:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # inheritable, like systemd's fds
    os.close(fd)
os.environ.update(cfg["env"])
if cfg["pid"] == "self":
    os.environ["LISTEN_PID"] = str(os.getpid())
elif cfg["pid"] is not None:
    os.environ["LISTEN_PID"] = cfg["pid"]

def cloexec(fd):
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    except OSError:
        return None  # closed

out = {}
try:
    socks = listen_sockets(unset=cfg["unset"])
    out["socks"] = [[n, s.fileno(), s.getsockname()] for n, s in socks]
except ActivationError as exc:
    out["error"] = str(exc)
out["env"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
out["cloexec"] = [cloexec(3 + i) for i in range(len(high))]
print(json.dumps(out))
"""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_activated(socks: list[socket.socket | int], env: dict[str, str], *,
                  pid: str | None = "self", unset: bool = True) -> dict:
    """Run CHILD with `socks` on fds 3, 4, ... and the LISTEN_* variables in `env`."""
    fds = [s if isinstance(s, int) else s.fileno() for s in socks]
    cfg = {"fds": fds, "env": env, "pid": pid, "unset": unset}
    proc = subprocess.run([sys.executable, "-S", "-c", CHILD, json.dumps(cfg)],
                          pass_fds=fds, env=_child_env(), capture_output=True, text=True,
                          timeout=20, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory: AF_UNIX paths must fit in 108 bytes, pytest's tmp_path may not."""
    with tempfile.TemporaryDirectory(prefix="spawnd-t") as d:
        yield Path(d)


def unix_listener(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


# --- listen_sockets -----------------------------------------------------------------------


def test_two_named_sockets_adopted_cloexec_and_env_unset(sockdir: Path) -> None:
    with unix_listener(sockdir / "a") as a, unix_listener(sockdir / "b") as b:
        out = run_activated([a, b], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "ctl:other"})
    assert out["socks"] == [["ctl", 3, str(sockdir / "a")], ["other", 4, str(sockdir / "b")]]
    assert out["cloexec"] == [True, True]
    assert out["env"] == []


def test_names_default_to_unknown_and_unset_false_keeps_env(sockdir: Path) -> None:
    with unix_listener(sockdir / "a") as a:
        out = run_activated([a], {"LISTEN_FDS": "1"}, unset=False)
    assert out["socks"] == [["unknown", 3, str(sockdir / "a")]]
    assert out["env"] == ["LISTEN_FDS", "LISTEN_PID"]


def test_wrong_listen_pid_returns_nothing_and_leaves_fds_alone(sockdir: Path) -> None:
    with unix_listener(sockdir / "a") as a:
        out = run_activated([a], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}, pid="1")
    assert out["socks"] == []
    assert out["env"] == []  # still unset: children must not see them
    assert out["cloexec"] == [False]  # not ours: untouched, not closed


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("udp", r"fd 3 \('unknown'\) is AF_INET/SOCK_DGRAM"),
        ("unix_dgram", r"fd 3 .*AF_UNIX/SOCK_DGRAM"),
        ("not_listening", r"fd 3 .*not listening"),
        ("abstract", r"fd 3 .*is abstract .*refused"),
    ],
)
def test_unusable_socket_raises_and_closes_it(sockdir: Path, kind: str, expected: str) -> None:
    if kind == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
    elif kind == "unix_dgram":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sockdir / "d"))
    elif kind == "not_listening":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(sockdir / "n"))
    else:
        sock = unix_listener(f"\0spawnd-test-{os.getpid()}-{time.monotonic_ns()}")
    with sock:
        out = run_activated([sock], {"LISTEN_FDS": "1"})
    assert re.search(expected, out["error"]), out["error"]
    assert out["cloexec"] == [None]  # wrapped, so closed before raising
    assert out["env"] == []


def test_non_socket_fd_is_named_and_left_open(sockdir: Path) -> None:
    r, w = os.pipe()
    try:
        with unix_listener(sockdir / "a") as a:
            out = run_activated([a, r], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "ctl:bad"})
    finally:
        os.close(r)
        os.close(w)
    assert "fd 4 ('bad') is a pipe/FIFO, not a socket" in out["error"]
    assert out["cloexec"] == [None, True]  # fd 3 (wrapped) closed; fd 4 only made CLOEXEC


def test_missing_fd_and_name_mismatch(sockdir: Path) -> None:
    with unix_listener(sockdir / "a") as a:
        missing = run_activated([a], {"LISTEN_FDS": "2"})
        mismatch = run_activated([a], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"})
    assert "fd 4 from LISTEN_FDS=2 is not open" in missing["error"]
    assert "LISTEN_FDNAMES has 2 names for LISTEN_FDS=1" in mismatch["error"]


def test_in_process_env_handling_without_fds() -> None:
    assert listen_sockets({}) == []
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert listen_sockets(env) == [] and env == {}
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "three"}
    with pytest.raises(ActivationError, match="LISTEN_FDS='three' is not a number"):
        listen_sockets(env)
    assert env == {}
    with pytest.raises(ActivationError, match="LISTEN_PID"):
        listen_sockets({"LISTEN_PID": "me", "LISTEN_FDS": "1"})


def test_socket_path_refuses_unnamed() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(ActivationError, match="unnamed"):
            socket_path(s)


def test_real_systemd_socket_activate(sockdir: Path) -> None:
    """End to end with systemd's own tool: env, fd 3, and an accepted connection."""
    exe = shutil.which("systemd-socket-activate")
    if exe is None:
        pytest.skip("systemd-socket-activate not installed (Debian package 'systemd')")
    path = sockdir / "act.sock"
    script = (
        "import json, os\n"
        "from spawnd.activation import listen_sockets\n"
        "socks = listen_sockets()\n"
        "conn, _ = socks[0][1].accept()\n"
        "env = sorted(k for k in os.environ if k.startswith('LISTEN_'))\n"
        "conn.sendall(json.dumps([[n, s.fileno()] for n, s in socks] + [env]).encode())\n"
    )
    proc = subprocess.Popen([exe, "-l", str(path), "--fdname=ctl", sys.executable, "-S", "-c",
                             script], env=_child_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while not path.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no socket"
            time.sleep(0.005)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(path))
            reply = b"".join(iter(lambda: c.recv(4096), b""))
        assert json.loads(reply) == [["ctl", 3], []]
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


# --- secure_socket_path -------------------------------------------------------------------


def test_secure_socket_path_modes(sockdir: Path) -> None:
    path = sockdir / "s"
    with unix_listener(path):
        os.chmod(path, 0o777)
        secure_socket_path(str(path), group=None)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        if os.geteuid() == 0:
            gid = 4242
        elif os.getgroups():
            gid = os.getgroups()[-1]
        else:
            pytest.skip("no group to chown to")
        secure_socket_path(str(path), group=gid)
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)


def test_secure_socket_path_refuses_symlink_and_files(sockdir: Path) -> None:
    target = sockdir / "real"
    with unix_listener(target):
        os.chmod(target, 0o777)
        (sockdir / "link").symlink_to(target)
        with pytest.raises(ActivationError, match="not a socket"):
            secure_socket_path(str(sockdir / "link"), group=None)
        assert stat.S_IMODE(target.stat().st_mode) == 0o777  # the link was not followed
    (sockdir / "file").write_text("")
    with pytest.raises(ActivationError, match="not a socket"):
        secure_socket_path(str(sockdir / "file"), group=None)


# --- Notifier -----------------------------------------------------------------------------


def dgram_listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.mark.parametrize("form", ["path", "abstract"])
def test_notifier_sends_messages(sockdir: Path, form: str) -> None:
    if form == "path":
        address = bind = str(sockdir / "notify")
    else:
        address = f"@spawnd-test-{os.getpid()}-{time.monotonic_ns()}"
        bind = "\0" + address[1:]
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
    with dgram_listener(bind) as srv, Notifier.from_environ(env) as n:
        assert env == {"OTHER": "kept"}
        assert n.enabled and n.watchdog_interval == 15.0

        def sent(ok: bool) -> str:
            assert ok
            return srv.recv(4096).decode()

        assert sent(n.ready()) == "READY=1"
        assert sent(n.ready("serving")) == "READY=1\nSTATUS=serving"
        assert sent(n.status("line1\nline2")) == "STATUS=line1 line2"  # no injection
        assert sent(n.stopping()) == "STOPPING=1"
        assert sent(n.watchdog()) == "WATCHDOG=1"
        assert sent(n.notify("EXTEND_TIMEOUT_USEC=5000000")) == "EXTEND_TIMEOUT_USEC=5000000"
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, second = sent(n.reloading()).split("\n")
        assert first == "RELOADING=1"
        usec = int(second.removeprefix("MONOTONIC_USEC="))
        assert 0 <= usec - now < 5_000_000
        with pytest.raises(ValueError, match="field name"):
            n.notify(**{"BAD\nKEY": 1})


def test_notifier_watchdog_rules() -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                               "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None  # inherited from someone else
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "oops"}
                                 ).watchdog_interval is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000"}
                                 ).watchdog_interval == 0.5
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1"}
    Notifier.from_environ(env, unset=False)
    assert env == {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1"}


def test_notifier_pops_real_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier.from_environ()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    out = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    assert "NOTIFY_SOCKET" not in out  # gone at the libc level too, for spawned children
    assert n.enabled


def test_notifier_without_listener_does_not_raise(sockdir: Path) -> None:
    with Notifier(str(sockdir / "missing")) as n:
        assert n.ready() is False  # ENOENT
    stale = sockdir / "stale"
    dgram_listener(str(stale)).close()  # file stays, nobody listens: ECONNREFUSED
    with Notifier(str(stale)) as n:
        assert n.ready() is False
        assert n.stopping() is False


def test_notifier_full_queue_never_blocks(sockdir: Path) -> None:
    with dgram_listener(str(sockdir / "full")), Notifier(str(sockdir / "full")) as n:
        start = time.monotonic()
        results = [n.status("x" * 1000) for _ in range(3000)]
        assert time.monotonic() - start < 2
    assert results[0] is True and results[-1] is False  # EAGAIN swallowed


def test_notifier_disabled_is_noop() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready() is False and n.watchdog() is False
    assert n._sock is None  # no socket was even created
    n.close()
    assert not Notifier("vsock:2:1234").enabled  # unsupported transport: off, not a crash


# --- log ----------------------------------------------------------------------------------


@pytest.fixture
def spawnd_logger() -> Iterator[logging.Logger]:
    """Restore the "spawnd" logger: other tests must not write to our closed streams."""
    logger = logging.getLogger("spawnd")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_log_journal_prefix(tmp_path: Path, spawnd_logger: logging.Logger) -> None:
    with open(tmp_path / "j.log", "w+") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        log = setup_logging("DEBUG", stream=f, environ=env)
        assert log is spawnd_logger
        log.debug("d")
        logging.getLogger("spawnd.activation").info("child %s", "logger")
        log.warning("w")
        log.error("e")
        log.critical("c")
        f.seek(0)
        assert f.read() == "<7>d\n<6>child logger\n<4>w\n<3>e\n<2>c\n"


def test_log_plain_when_not_journal(tmp_path: Path, spawnd_logger: logging.Logger) -> None:
    other = os.stat(tmp_path)  # a JOURNAL_STREAM that is not our stream
    buf = io.StringIO()
    log = setup_logging("info", stream=buf,
                        environ={"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"})
    log.debug("hidden")
    log.info("hello\nworld")
    log.warning("careful")
    assert buf.getvalue() == (f"spawnd[{os.getpid()}]: INFO hello\\nworld\n"
                              f"spawnd[{os.getpid()}]: WARNING careful\n")


def test_log_idempotent_and_exceptions_one_line(spawnd_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(stream=first, environ={})
    log = setup_logging("warning", stream=second, environ={})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    log.info("filtered")
    assert first.getvalue() == ""
    lines = second.getvalue().splitlines()
    assert len(lines) == 1 and "ERROR failed\\nTraceback" in lines[0]
    assert lines[0].endswith("RuntimeError: boom")


@pytest.mark.parametrize("level", ["trace", "critical", "", "warn"])
def test_log_bad_level(level: str, spawnd_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="invalid log level"):
        setup_logging(level, stream=io.StringIO(), environ={})


# --- unit files ---------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, str]:
    """Key=value lines of a unit file, comments ignored (last assignment wins)."""
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_unit_file_settings() -> None:
    sock = unit_settings(SYSTEMD_DIR / "spawnd.socket")
    assert sock["ListenStream"] == "/run/spawnd/spawnd.sock"
    assert (sock["SocketMode"], sock["SocketGroup"], sock["RemoveOnStop"]) == (
        "0660", "spawnd", "yes")
    svc = unit_settings(SYSTEMD_DIR / "spawnd.service")
    assert (svc["Type"], svc["NotifyAccess"], svc["KillMode"]) == ("notify", "main", "mixed")
    assert svc["RuntimeDirectoryPreserve"] == "yes"
    assert "CAP_SYS_ADMIN" not in svc["CapabilityBoundingSet"]
    user_sock = unit_settings(SYSTEMD_DIR / "user" / "spawnd.socket")
    assert (user_sock["ListenStream"], user_sock["SocketMode"]) == (
        "%t/spawnd/spawnd.sock", "0600")
    user_svc = unit_settings(SYSTEMD_DIR / "user" / "spawnd.service")
    # user managers cannot apply these: the service would fail with 218/CAPABILITIES
    assert not {"CapabilityBoundingSet", "AmbientCapabilities"} & user_svc.keys()


def verify_units(src: Path, dest: Path, *, user: bool, extra: str = "") -> list[str]:
    """systemd-analyze verify copies of the units; return problems mentioning them.

    ExecStart is pointed at an existing binary (verify checks it is executable). Unknown
    keys are only warnings (exit status 0), so stderr lines naming our units count too;
    lines about unrelated host units loaded as dependencies do not.
    """
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    dest.mkdir()
    for name in ("spawnd.socket", "spawnd.service"):
        text = (src / name).read_text()
        if name.endswith(".service"):
            text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m spawnd", text,
                          flags=re.M) + extra
        (dest / name).write_text(text)
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="warning")
    if user:  # the user manager needs a runtime dir to resolve %t; no systemd PID 1 needed
        (dest / "xdg").mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(dest / "xdg")
    cmd = [exe, *(["--user"] if user else []), "verify", "--man=no",
           str(dest / "spawnd.socket"), str(dest / "spawnd.service")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30,
                          check=False)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "spawnd." in ln]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}: {proc.stderr.strip()}")
    return problems


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_units_verify(tmp_path: Path, user: bool) -> None:
    src = SYSTEMD_DIR / "user" if user else SYSTEMD_DIR
    assert verify_units(src, tmp_path / "ok", user=user) == []
    # the check is not vacuous: a typo is reported
    bad = verify_units(src, tmp_path / "bad", user=user, extra="KilMode=mixed\n")
    assert any("KilMode" in line for line in bad), bad
