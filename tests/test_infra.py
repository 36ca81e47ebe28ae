"""Issue 10, daemon side: nothing a child or a client does may take the daemon down or cost
another client its children (cases 1, 2, 4, 6, 10 (serve), 11).

Every daemon here runs in a session of its own: on the old code a child's ``kill 0`` or a
signal to the daemon's group would otherwise reach pytest itself.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import spawnd_client as sc
from conftest import REPO, Daemon, children_of, fd_count, proc_status, wait_until
from faultlib import PY, Baseline, Raw, close_fds, cpu_seconds, open_fds, spawn_msg, stop

from spawnd import protocol as P


def _env() -> dict[str, str]:
    e = os.environ.copy()
    e["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), str(REPO / "client"), e.get("PYTHONPATH", "")) if p)
    return e


def own_session_daemon(tmp: Path, *args: str, prefix: tuple[str, ...] = (),
                       name: str = "spawnd.sock", pass_fds: tuple[int, ...] = (),
                       wait: bool = True) -> Daemon:
    """``spawnd serve`` in a new session (so nothing aimed at its group can reach pytest)."""
    path = str(tmp / name)
    log = tmp / (name + ".log")
    with open(log, "wb") as errf:
        proc = subprocess.Popen(
            [*prefix, PY, "-m", "spawnd", "serve", "--socket", path, "--log-level", "debug",
             *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
            env=_env(), start_new_session=True, pass_fds=pass_fds)
    d = Daemon(path, proc, log)
    if wait:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited: {log.read_text()}")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
                return True
            except OSError:
                return False
            finally:
                probe.close()
        assert wait_until(up, 15), log.read_text()
        with sc.Client(path, autostart=False) as c:  # listening, signals in place
            c.ping()
    return d


def alive(pid: int) -> bool:
    try:
        return not proc_status(pid)["State"].startswith(("Z", "X"))
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture
def d(tmp_path: Path) -> Iterator[Daemon]:
    daemon = own_session_daemon(tmp_path, "--stop-grace", "1")
    yield daemon
    if daemon.proc.poll() is None:
        stop(daemon)


# ---------------------------------------------------------------------------- case 1: signals

FATAL = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
         signal.SIGIO, signal.SIGXCPU, signal.SIGPWR, signal.SIGSYS, signal.SIGTRAP,
         signal.SIGSTKFLT, signal.SIGQUIT, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS,
         signal.SIGFPE, signal.SIGILL, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
         32, 33, *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
         # honoured from outside, ignored from a child:
         signal.SIGTERM, signal.SIGINT, signal.SIGHUP]

SIGNAL_PARENT = """
import os, sys, time
for s in map(int, sys.argv[1:]):
    os.kill(os.getppid(), s)
    time.sleep(0.005)
"""


def test_policy_blocks_every_fatal_or_stopping_signal() -> None:
    from spawnd import signals as S  # (here, so the other cases also run against old code)

    blocked = set(S.blocked_signals())
    assert set(FATAL) <= blocked
    for s in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ,
              signal.SIGWINCH, signal.SIGURG, signal.SIGCONT):
        assert s not in blocked
    child, outsider = S.SigInfo(15, 0, 42, 0), S.SigInfo(15, 0, 1, 0)
    assert S.decide(child, from_child=True) == "ignore-child"
    assert S.decide(outsider, from_child=False) == "stop"
    assert S.decide(S.SigInfo(1, 0, 1, 0), from_child=False) == "reload"
    assert S.decide(S.SigInfo(10, 0, 1, 0), from_child=False) == "ignore"
    t = [0.0]
    lim = S.LogLimiter(10, clock=lambda: t[0])
    assert lim.allow("k") == 0 and lim.allow("k") is None and lim.allow("k") is None
    t[0] = 11
    assert lim.allow("k") == 2


def test_a_child_signalling_its_parent_is_ignored(d: Daemon) -> None:
    """Every fatal/stopping signal, and TERM/INT/HUP, from a child: the daemon lives on,
    is not stopped, keeps its other children and serves a new client (old code: died at
    the first SIGUSR1)."""
    b = Baseline(d)
    with sc.Client(d.path, autostart=False) as c:
        bystander = c.spawn(["/bin/sleep", "60"], env={})
        sender = c.spawn([PY, "-c", SIGNAL_PARENT, *map(str, FATAL)], env={})
        assert sender.wait(30) == 0
        assert d.proc.poll() is None, d.log.read_text()[-3000:]
        assert proc_status(d.pid)["State"][0] in "SR", proc_status(d.pid)["State"]
        assert alive(bystander.pid) and c.ping()["pid"] == d.pid
        # a child that signals and exits at once (its reap may come before the signal is
        # read), and a grandchild (/bin/kill under sh): still children
        for _ in range(10):
            q = c.spawn([PY, "-c", "import os; os.kill(os.getppid(), 15)"], env={})
            assert q.wait(10) == 0
        # a grandchild that is still alive when the daemon reads its signal
        g = c.spawn(["/bin/sh", "-c", f"/bin/sh -c 'kill -TERM {d.pid}; exec sleep 30'; :"],
                    env={})

        def grandchild_sleeps() -> bool:
            return any(Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
                       for p, _ in children_of(g.pid))
        assert wait_until(grandchild_sleeps, 10)
        c.ping()  # the signal was queued before these: its record has been read by now
        c.ping()
        os.killpg(g.pid, signal.SIGKILL)
        assert g.wait(10) == -signal.SIGKILL
        assert d.proc.poll() is None and alive(bystander.pid)
        bystander.kill()
        assert bystander.wait(10) == -signal.SIGKILL
    b.check()
    log = d.log.read_text()
    assert "ignored SIGUSR1 from pid" in log and "a child of the daemon" in log
    assert "ignored SIGTERM from pid" in log
    assert stop(d)  # an outside SIGTERM still stops it, cleanly


def test_outside_signals_keep_their_meaning(d: Daemon) -> None:
    """From outside: USR1 is logged and ignored, HUP reloads (no policy file: says so),
    TERM stops. Repeated ignored signals are rate-limited in the log."""
    for _ in range(20):
        os.kill(d.pid, signal.SIGUSR1)
    os.kill(d.pid, signal.SIGHUP)
    assert wait_until(lambda: "SIGHUP: no policy file" in d.log.read_text(), 10)
    assert d.proc.poll() is None
    log = d.log.read_text()
    assert 1 <= log.count("ignored SIGUSR1") < 20, log
    os.kill(d.pid, signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert f"received SIGTERM from pid {os.getpid()}" in d.log.read_text()


def test_children_start_with_default_dispositions_and_an_empty_mask(d: Daemon,
                                                                    tmp_path: Path) -> None:
    """The daemon blocks most signals; its children must not inherit that (nor ignores)."""
    out = tmp_path / "status"
    with open(out, "wb") as f, sc.Client(d.path, autostart=False) as c:
        assert c.spawn(["/bin/cat", "/proc/self/status"], env={}, fds={1: f.fileno()}).wait(10) == 0
    st = dict(line.split(":\t", 1) for line in out.read_text().splitlines() if ":\t" in line)
    assert int(st["SigBlk"], 16) == 0, st["SigBlk"]
    assert int(st["SigIgn"], 16) == 0, st["SigIgn"]
    assert int(st["SigCgt"], 16) == 0, st["SigCgt"]
    daemon_blk = int(proc_status(d.pid)["SigBlk"], 16)
    for s in FATAL:
        assert daemon_blk >> (s - 1) & 1, s


# ---------------------------------------------------------------------------- case 2: groups

def test_kill_0_in_a_child_reaches_only_its_own_group(d: Daemon) -> None:
    """``trap 'kill 0' EXIT`` in one client's script must not stop the daemon or another
    client's jobs (old code: the daemon got SIGTERM and stopped; every job with it)."""
    b = Baseline(d)
    with sc.Client(d.path, autostart=False) as other, sc.Client(d.path, autostart=False) as c:
        job = other.spawn(["/bin/sleep", "60"], env={})
        assert os.getpgid(job.pid) == job.pid  # a group of its own by default
        script = c.spawn(["/bin/sh", "-c", "trap 'kill 0' EXIT; sleep 0.1"], env={})
        assert script.wait(10) == -signal.SIGTERM
        plain = c.spawn(["/bin/sh", "-c", "kill 0"], env={})
        assert plain.wait(10) == -signal.SIGTERM
        assert d.proc.poll() is None and alive(job.pid)
        # subprocess's own flags still work
        s = c.spawn(["/bin/sleep", "60"], env={}, start_new_session=True)
        assert os.getsid(s.pid) == s.pid
        g = c.spawn(["/bin/sleep", "60"], env={}, process_group=job.pid)
        assert os.getpgid(g.pid) == job.pid
        for k in (s, g, job):
            k.kill()
            assert k.wait(10) == -signal.SIGKILL
    b.check()


# ---------------------------------------------------------------------------- case 4: fd limit

def _limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def _set_nofile(pid: int, soft: int, hard: int) -> None:
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True)


def test_daemon_raises_its_soft_nofile_to_the_hard_limit(tmp_path: Path) -> None:
    d = own_session_daemon(tmp_path, prefix=("prlimit", "--nofile=1024:4096", "--"))
    try:
        assert _limits(d.pid) == (4096, 4096)
        assert "raised the open-files limit (RLIMIT_NOFILE) from 1024 to 4096" in d.log.read_text()
    finally:
        stop(d)


def test_at_the_fd_limit_one_request_fails_alone(tmp_path: Path) -> None:
    """A request whose fds are lost (MSG_CTRUNC) fails alone with EMFILE (stage fds); the
    client's 49 running children live on (old code: connection dropped, 49 of 49 got
    SIGTERM). A new connection at the limit is told so at once (EMFILE, stage limit), with
    no spinning; once the pressure is gone everything works again."""
    d = own_session_daemon(tmp_path, "--handshake-timeout", "60", "--stop-grace", "1")
    flood: list[Raw] = []
    try:
        b = Baseline(d)
        orig = _limits(d.pid)
        c = sc.Client(d.path, autostart=False)
        kids = [c.spawn(["/bin/sleep", "120"], env={}) for _ in range(49)]
        assert wait_until(lambda: fd_count(d.pid) >= b.fds + 49, 10)
        count = fd_count(d.pid)
        top = max(map(int, os.listdir(f"/proc/{d.pid}/fd")))
        limit = max(count + 2, top + 1)
        free = limit - count
        _set_nofile(d.pid, limit, orig[1])  # soft only: raising a hard limit needs CAP_SYS_RESOURCE
        extra = open_fds(free + 3)
        try:
            with pytest.raises(OSError) as ei:
                c.spawn(["/bin/true"], env={}, fds={3 + i: fd for i, fd in enumerate(extra)})
        finally:
            close_fds(extra)
        assert ei.value.errno == errno.EMFILE and ei.value.stage == "fds", ei.value
        assert c.transport().broken is None
        assert c.ping()["pid"] == d.pid
        assert all(alive(k.pid) for k in kids)
        # the arrived fds were closed again; fill the table with connections
        assert wait_until(lambda: fd_count(d.pid) <= count, 10), (fd_count(d.pid), count)
        while fd_count(d.pid) < limit:
            flood.append(Raw(d.path))  # its hello answered: the daemon holds its fd
        for _ in range(3):  # at the limit: told at once, each time (the spare comes back)
            r = Raw(d.path, hello=False, timeout=5)
            err = r.closed_with_error(timeout=5)
            r.close()
            assert err.errno == errno.EMFILE and err.stage == "limit", err
            assert "open files" in err.message
        with pytest.raises(OSError) as ei:
            sc.Client(d.path, autostart=False).ping()
        assert ei.value.errno == errno.EMFILE
        cpu0, t0 = cpu_seconds(d.pid), time.monotonic()
        time.sleep(1.0)
        assert cpu_seconds(d.pid) - cpu0 < 0.25 * (time.monotonic() - t0)
        assert all(alive(k.pid) for k in kids)
        # pressure gone: all works again, fds included
        for r in flood:
            r.close()
        flood.clear()
        _set_nofile(d.pid, *orig)
        with open(os.devnull, "rb") as f:
            assert c.spawn(["/bin/true"], env={}, fds={3: f.fileno()}).wait(10) == 0
        for k in kids:
            k.kill()
        assert all(k.wait(10) == -signal.SIGKILL for k in kids)
        c.close()
        b.check()
    finally:
        for r in flood:
            r.close()
        log = stop(d)
    assert "control message truncated" in log
    assert "refused a new connection (EMFILE)" in log


# ---------------------------------------------------------------------------- case 6: by id

def test_signals_name_children_by_spawn_id(d: Daemon) -> None:
    """Signal carries the Spawn's request id, scoped to the connection; a reaped child is
    ESRCH; ids are released at reap (no leak: the id can be used again)."""
    b = Baseline(d)
    mine, other = Raw(d.path), Raw(d.path)
    try:
        mine.send_obj(spawn_msg(1, [b"/bin/sleep", b"60"]))
        mine_pid = mine.reply(1).pid
        other.send_obj(spawn_msg(1, [b"/bin/sleep", b"60"]))
        other_pid = other.reply(1).pid

        def sig(r: Raw, rid: int, child: int, s: int) -> P.Event:
            r.send_obj({"t": "signal", "id": rid, "child": child, "signal": s})
            return r.reply(rid)

        assert isinstance(sig(mine, 10, 1, 0), P.Ok)
        e = sig(mine, 11, 2, signal.SIGKILL)
        assert isinstance(e, P.Error) and e.errno == errno.ESRCH and e.field == "child"
        mine.send_obj(spawn_msg(1, [b"/bin/true"]))  # id still names a live child
        e = mine.reply(1)
        assert isinstance(e, P.Error) and e.errno == errno.EEXIST
        assert isinstance(sig(mine, 12, 1, signal.SIGKILL), P.Ok)
        assert mine.expect(P.Exit, 1).returncode == -signal.SIGKILL
        assert alive(other_pid) and not alive(mine_pid)
        e = sig(mine, 13, 1, signal.SIGKILL)  # reaped: ESRCH, whoever has that pid now
        assert isinstance(e, P.Error) and e.errno == errno.ESRCH
        # a bare pid is not part of the protocol any more
        mine.send_obj({"t": "signal", "id": 14, "pid": other_pid, "signal": 9})
        e = mine.reply(14)
        assert isinstance(e, P.Error) and e.errno == errno.EINVAL
        # the id was released at reap: it may start a new child
        mine.send_obj(spawn_msg(1, [b"/bin/true"]))
        assert isinstance(mine.reply(1), P.Spawned)
        assert mine.expect(P.Exit, 1).returncode == 0
        assert isinstance(sig(other, 15, 1, signal.SIGTERM), P.Ok)
        assert other.expect(P.Exit, 1).returncode == -signal.SIGTERM
    finally:
        mine.close()
        other.close()
    b.check()


# ---------------------------------------------------------------------------- case 10: serve

def test_serve_on_a_path_held_by_our_own_daemon(d: Daemon) -> None:
    r = subprocess.run([PY, "-m", "spawnd", "serve", "--socket", d.path], env=_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "already listening" in lines[0] and f"(pid {d.pid})" in lines[0], lines
    assert d.proc.poll() is None and os.path.exists(d.path)


SQUATTER = """
import socket, sys, os, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666); s.listen(8)
print("up", flush=True)
time.sleep(60)
"""


def test_serve_on_a_path_held_by_another_uid_names_it() -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv")
    tmp = Path(tempfile.mkdtemp(prefix="spawnd-squat-", dir="/tmp"))
    tmp.chmod(0o777)
    path = str(tmp / "spawnd.sock")
    # Debian's python when there is one: uid 65534 cannot reach an interpreter under /root.
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    squat = subprocess.Popen([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                              py, "-I", "-c", SQUATTER, path],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert squat.stdout is not None and squat.stdout.readline() == "up\n"
        r = subprocess.run([PY, "-m", "spawnd", "serve", "--socket", path], env=_env(),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "uid 65534" in lines[0] and path in lines[0], lines
        assert os.path.exists(path)  # not deleted
    finally:
        squat.kill()
        squat.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- case 11: keep

def test_private_daemon_lingers_for_keep_children(tmp_path: Path) -> None:
    """A private daemon (``--lifeline``) whose client has gone: its ``terminate`` children
    are ended, its ``keep`` child runs on, the socket is gone (no new work), and the daemon
    exits once the keep child has exited, not before (old code: stopped at once and
    terminated the keep child)."""
    ours, theirs = socket.socketpair()
    os.set_inheritable(theirs.fileno(), True)
    fd = theirs.fileno()
    d = own_session_daemon(tmp_path, "--lifeline", str(fd), "--ready-fd", str(fd),
                           pass_fds=(fd,), wait=False)
    theirs.close()
    try:
        ours.settimeout(15)
        assert ours.recv(16).startswith(b"ready"), d.log.read_text()
        marker = tmp_path / "kept-done"
        c = sc.Client(d.path, autostart=False)
        kept = c.spawn(["/bin/sh", "-c", f"sleep 2; : > {marker}"], env={},
                       on_disconnect="keep")
        doomed = c.spawn(["/bin/sleep", "60"], env={}, grace=1)
        c.close()
        ours.close()  # the program that started the daemon exits
        assert wait_until(lambda: not alive(doomed.pid), 10)
        assert wait_until(lambda: not os.path.exists(d.path), 10), "still accepting"
        assert d.proc.poll() is None and alive(kept.pid)
        assert d.proc.wait(30) == 0
        assert marker.exists(), "the keep child did not finish"
        log = d.log.read_text()
        assert "Traceback" not in log, log
        assert "lingering until the keep children have exited" in log
    finally:
        ours.close()
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_sigterm_the_moment_the_socket_answers_is_a_clean_stop(tmp_path: Path) -> None:
    """The signals are blocked before the listener exists: a SIGTERM sent as soon as a
    connect succeeds stops the daemon cleanly (it used to die of the default action)."""
    for i in range(10):
        path = str(tmp_path / f"early{i}.sock")
        proc = subprocess.Popen([sys.executable, "-m", "spawnd", "serve", "--socket", path],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:  # no sleep: signal the very moment the socket accepts a connection
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
            finally:
                s.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
