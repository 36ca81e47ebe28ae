"""The blocking client under stress a real program puts on it (issue 10, client cases 5-10;
issue 15 point 2; issue 12's lazy imports).

Each test runs a real daemon and real children. Programs whose behaviour depends on process
state (signal handlers, fork) run as separate interpreters with bounded timeouts, so a
regression is a failed assertion or a timeout, never a hung test session.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import spawnd_client as sc
from conftest import REPO, Daemon, children_of, start_daemon, wait_until
from secutil import SETPRIV, Accounts, make_shared_dir

from spawnd import protocol as P

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'client'}",
       "SPAWND_AUTOSTART": "0"}


def run_script(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", textwrap.dedent(code), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- case 7: signals

def test_07_timeout_of_spawnd_run_exits_promptly(daemon: Daemon) -> None:
    """``timeout`` SIGTERMs ``spawnd run``, whose handler forwards it while the main thread
    reads the connection: the old code waited for its own reply forever."""
    r = subprocess.run(["timeout", "2", PY, "-m", "spawnd", "run", "--socket", daemon.path,
                        "--", "sleep", "30"], env=ENV, capture_output=True, timeout=30)
    assert r.returncode == 124, r.stderr  # timeout's "it timed out": the command did end
    assert b"Traceback" not in r.stderr, r.stderr
    assert wait_until(lambda: not children_of(daemon.pid))


HANDLER_DURING_WAIT = """
import os, signal, sys, threading, spawnd_client as sc
c = sc.Client(sys.argv[1], autostart=False)
p = sc.Popen(["sleep", "30"], client=c)
signal.signal(signal.SIGTERM, lambda *a: p.terminate())
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
print(p.wait())
"""


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_07_sigterm_handler_terminates_child_during_wait(daemon: Daemon, attempt: int) -> None:
    r = run_script(HANDLER_DURING_WAIT, daemon.path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(-signal.SIGTERM)]


def test_07_daemon_route_from_a_handler_does_not_wait_for_itself(daemon: Daemon) -> None:
    """No pidfd (the route an EPERM from the kernel takes): the handler's Signal request
    goes to the daemon while the same thread is inside its read; it must be sent without
    waiting for its reply, and the reply dropped when it arrives."""
    code = """
    import os, signal, sys, threading, spawnd_client as sc
    c = sc.Client(sys.argv[1], autostart=False)
    ch = c.spawn(["sleep", "30"], want_pidfd=False)
    assert ch.pidfd is None
    signal.signal(signal.SIGUSR1, lambda *a: ch.terminate())
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    rc = ch.wait()
    print(rc, c.spawn(["true"]).wait(), c.ping()["children"])  # connection still in step
    """
    r = run_script(code, daemon.path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(-signal.SIGTERM), "0", "0"]


def test_07_signal_goes_through_the_pidfd_not_the_daemon(daemon: Daemon,
                                                         client: sc.Client) -> None:
    """With the daemon stopped (SIGSTOP), kill() still returns at once and the child dies:
    no round trip. The old code waited for the daemon's reply."""
    ch = client.spawn(["sleep", "30"])
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        t = threading.Thread(target=ch.kill)
        t.start()
        t.join(10)
        assert not t.is_alive(), "kill() waited for a stopped daemon"
        assert wait_until(lambda: _state(ch.pid) in ("Z", None))
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert ch.wait(10) == -signal.SIGKILL


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def test_07_kernel_refusal_falls_back_to_the_daemon(client: sc.Client,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """EPERM from pidfd_send_signal (a child of another uid) asks the daemon instead."""
    from spawnd_client import client as C

    calls: list[int] = []

    def refuse(fd: int, sig: int, *a: object) -> None:
        calls.append(sig)
        raise PermissionError(errno.EPERM, "Operation not permitted")

    ch = client.spawn(["sleep", "30"])
    monkeypatch.setattr(C._signal, "pidfd_send_signal", refuse)
    ch.terminate()
    assert calls == [signal.SIGTERM]
    assert ch.wait(10) == -signal.SIGTERM
    assert client.ping()["children"] == 0  # the daemon's reply was routed, nothing left over


STORM = """
import signal, sys, threading, spawnd_client as sc
c = sc.Client(sys.argv[1], autostart=False)
cur = None
stop = False
def handler(*a):
    if cur is not None:
        cur.terminate()
def background():  # keeps another thread reading, so the main thread is often a follower
    while not stop:
        assert c.spawn(["true"], env={"PATH": "/bin:/usr/bin"}).wait(30) == 0
threads = [threading.Thread(target=background) for _ in range(int(sys.argv[2]))]
for t in threads:
    t.start()
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)  # lands in sends, reads and routing
codes = set()
for i in range(200):
    env = {"PATH": "/bin:/usr/bin", "BIG": "y" * (i * 997 % 120000)}
    cur = c.spawn(["sleep", "30"], want_pidfd=i % 2 == 0, env=env)
    codes.add(cur.wait(30))
signal.setitimer(signal.ITIMER_REAL, 0)
stop = True
for t in threads:
    t.join(30)
print(sorted(codes), c.ping()["children"])
"""


@pytest.mark.parametrize("threads", [0, 4])
def test_07_signal_storm_from_a_handler_keeps_the_connection_in_step(daemon: Daemon,
                                                                     threads: int) -> None:
    """A handler firing every millisecond signals the current child, half of them through
    the daemon (no pidfd): requests from inside our own sends, reads and follower waits
    must neither deadlock nor interleave frames."""
    r = run_script(STORM, daemon.path, str(threads), timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"[{-signal.SIGTERM}]", "0"], (r.stdout, r.stderr)


def test_07_signals_from_other_threads_while_32_threads_wait(client: sc.Client) -> None:
    children = [client.spawn(["sleep", "30"]) for _ in range(32)]
    codes: list[int | None] = [None] * 32

    def wait(i: int) -> None:
        codes[i] = children[i].wait(30)

    waiters = [threading.Thread(target=wait, args=(i,)) for i in range(32)]
    for t in waiters:
        t.start()
    killers = [threading.Thread(target=ch.kill) for ch in children]
    for t in killers:
        t.start()
    for t in killers + waiters:
        t.join(60)
    assert codes == [-signal.SIGKILL] * 32


def test_07_signal_after_exit_is_a_no_op(client: sc.Client) -> None:
    ch = client.spawn(["true"])
    assert ch.wait(10) == 0
    ch.kill()  # like subprocess: nothing happens, nothing raised
    ch.close()
    ch.terminate()


# ---------------------------------------------------------------- case 8: fork

FORK = """
import os, signal, sys, threading, spawnd_client as sc
from spawnd_client import DaemonConnectionError
c = sc.Client(sys.argv[1], autostart=False)
os.environ["SPAWND_SOCKET"] = sys.argv[1]
assert sc.call(["true"]) == 0           # the default client has a connection too
mine = c.spawn(["sh", "-c", "sleep 0.5; exit 3"])
waiter_rc = []
t = threading.Thread(target=lambda: waiter_rc.append(c.spawn(["sh", "-c", "sleep 0.7; exit 4"]).wait(30)))
t.start()                               # a parent thread is inside a wait at fork time
pid = os.fork()
if pid == 0:
    try:
        kid = c.spawn(["sh", "-c", "exit 5"])
        assert kid.wait(20) == 5, "child's own child"
        assert sc.call(["sh", "-c", "exit 6"]) == 6, "child's default client"
        try:
            mine.wait(5)
        except DaemonConnectionError as e:
            assert "forked" in str(e), e
        else:
            raise AssertionError("the parent's child must not be waitable in the fork")
        mine.kill()                     # a parent's child: nothing happens
        c.close()                       # must not shut down the parent's connection
        sc.default_client().close()
        os._exit(0)
    except BaseException as e:
        print("child:", repr(e), file=sys.stderr, flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
t.join(30)
print(os.waitstatus_to_exitcode(status), mine.wait(20), waiter_rc, c.spawn(["true"]).wait(20),
      sc.call(["sh", "-c", "exit 7"]))
"""


@pytest.mark.parametrize("attempt", [1, 2])
def test_08_fork_after_use_gives_the_child_its_own_connection(daemon: Daemon,
                                                               attempt: int) -> None:
    r = run_script(FORK, daemon.path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "3", "[4]", "0", "7"], (r.stdout, r.stderr)
    assert wait_until(lambda: not children_of(daemon.pid))


FORK_AUTOSTART = """
import os, spawnd_client as sc
assert sc.call(["true"]) == 0
path = sc.default_client().transport().path
pid = os.fork()
if pid == 0:
    ok = sc.call(["sh", "-c", "exit 5"]) == 5 and sc.default_client().transport().path == path
    sc.default_client().close()  # its own connection only: the parent's stays up
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), sc.call(["sh", "-c", "exit 6"]))
"""


def test_08_fork_shares_the_private_daemon(tmp_path: Path) -> None:
    """The forked child is not the private daemon's parent: it uses the same daemon (its
    copy of the lifeline keeps it alive) over a connection of its own."""
    env = {k: v for k, v in ENV.items() if k != "SPAWND_SOCKET"}
    env.update(SPAWND_AUTOSTART="1", XDG_RUNTIME_DIR=str(tmp_path))
    if os.geteuid() == 0 and os.path.exists("/run/spawnd/spawnd.sock"):
        pytest.skip("a system daemon may listen at the default path")
    r = subprocess.run([PY, "-c", FORK_AUTOSTART], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "6"], (r.stdout, r.stderr)


# ---------------------------------------------------------------- case 9: restart

def test_09_next_request_after_a_restart_succeeds(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    c = sc.Client(d.path, autostart=False)
    try:
        assert c.spawn(["true"]).wait(10) == 0
        old = c.spawn(["sleep", "30"])
        d.proc.kill()  # dies with everything it knew: the status of `old` is really lost
        d.proc.wait(10)
        os.kill(old.pid, signal.SIGKILL)
        if os.path.exists(d.path):
            os.unlink(d.path)
        d2 = start_daemon(tmp_path)
        # No read happened since: the old connection is found dead only at this send.
        ch = c.spawn(["sh", "-c", "exit 9"])
        assert ch.wait(10) == 9
        with pytest.raises(sc.DaemonConnectionError):
            old.wait(10)
        # A clean stop and start: ping (no child involved) resends the same way.
        d2.stop()
        d3 = start_daemon(tmp_path)
        assert c.ping()["pid"] == d3.pid
        assert c.spawn(["true"]).wait(10) == 0
    finally:
        c.close()
    d3.stop_cleanly()


def test_09_no_daemon_after_restart_window_is_daemon_unavailable(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    c = sc.Client(d.path, autostart=False)
    c.ping()
    d.stop()
    with pytest.raises(sc.DaemonUnavailable) as info:
        c.ping()
    assert d.path in str(info.value)
    c.close()


# ---------------------------------------------------------------- case 10: who answers

FAKE_LISTENER = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(8)
print("ready", flush=True)
got = b""
s.settimeout(20)
try:
    conn, _ = s.accept()
    conn.settimeout(1)
    try:
        got = conn.recv(65536)
    except OSError:
        pass
finally:
    print(len(got), flush=True)
"""




def test_10_listener_of_another_uid_is_refused(accounts: Accounts) -> None:
    shared = make_shared_dir()  # pytest's tmp_path is 0700: the other uid could not bind
    d = shared / "run"
    d.mkdir()
    os.chown(d, accounts.a.uid, accounts.a.gid)
    path = str(d / "spawnd.sock")
    fake = subprocess.Popen(
        [SETPRIV or "setpriv", f"--reuid={accounts.a.uid}", f"--regid={accounts.a.gid}",
         "--clear-groups", "--", "/usr/bin/python3", "-c", FAKE_LISTENER, path],
        stdout=subprocess.PIPE, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    try:
        assert fake.stdout is not None
        assert fake.stdout.readline().strip() == "ready"
        with pytest.raises(PermissionError) as info:
            sc.Client(path, autostart=False).ping()
        msg = str(info.value)
        assert path in msg and f"uid {accounts.a.uid}" in msg, msg
        assert fake.stdout.readline().strip() == "0"  # it was sent nothing, not even hello
    finally:
        fake.kill()
        fake.wait(10)
        shutil.rmtree(shared, ignore_errors=True)


def test_10_own_uid_listener_is_trusted(daemon: Daemon) -> None:
    with sc.Client(daemon.path, autostart=False) as c:
        assert c.ping()["pid"] == daemon.pid


# ---------------------------------------------------------------- case 5: fd counts

def test_05_too_many_fds_refused_locally_and_the_connection_lives(client: sc.Client) -> None:
    long = client.spawn(["sh", "-c", "sleep 0.5; exit 4"])
    t = client.transport()
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(251)]
    try:
        with pytest.raises(OSError) as info:
            sc.Popen(["true"], pass_fds=fds, client=client)  # 251 + stdio > MAX_FDS
        assert info.value.errno == errno.E2BIG
        with pytest.raises(OSError) as info:
            client.spawn(["true"], fds={i: fds[i % len(fds)] for i in range(P.MAX_FDS + 1)})
        assert info.value.errno == errno.E2BIG
        # At the limit itself it is still served (one of the 253 carries our cwd, issue 11).
        with pytest.raises(OSError) as info:
            client.spawn(["true"], fds={i: fds[i % len(fds)] for i in range(P.MAX_FDS)})
        assert info.value.errno == errno.E2BIG
        ok = client.spawn(["true"], fds={i: fds[i % len(fds)] for i in range(P.MAX_FDS - 1)})
        assert ok.wait(10) == 0
    finally:
        for fd in fds:
            os.close(fd)
    assert long.wait(10) == 4
    assert client.transport() is t and t.broken is None


def test_05_closed_fd_is_the_callers_ebadf_and_the_stream_is_intact(client: sc.Client) -> None:
    """No fstat per fd: sendmsg itself refuses a closed fd before any byte leaves."""
    long = client.spawn(["sh", "-c", "sleep 0.3; exit 2"])
    t = client.transport()
    r = 1000  # closed (a just-closed low number would be reused by the request's cwd fd)
    with pytest.raises(OSError):
        os.fstat(r)
    with pytest.raises(OSError) as info:
        client.spawn(["true"], fds={0: r})
    assert info.value.errno == errno.EBADF
    assert client.spawn(["true"], fds={0: 0, 1: 1, 2: 2}).wait(10) == 0
    assert long.wait(10) == 2
    assert client.transport() is t and t.broken is None


# ---------------------------------------------------------------- issue 15.2: autostart rule

@pytest.mark.parametrize("how", ["env", "argument"])
def test_configured_socket_that_does_not_answer_never_autostarts(tmp_path: Path,
                                                                 how: str) -> None:
    typo = str(tmp_path / "typo.sock")
    env = {**ENV, "SPAWND_AUTOSTART": "1", "XDG_RUNTIME_DIR": str(tmp_path)}
    env.pop("SPAWND_SOCKET", None)
    if how == "env":
        env["SPAWND_SOCKET"] = typo
        code = "import spawnd_client as sc; sc.call(['true'])"
    else:
        code = f"import spawnd_client as sc; sc.Client({typo!r}).ping()"
    r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "DaemonUnavailable" in r.stderr and typo in r.stderr, r.stderr
    assert not list(tmp_path.glob("spawnd-*")), "a private daemon was started"


def test_cli_run_with_a_wrong_socket_is_an_error(tmp_path: Path) -> None:
    typo = str(tmp_path / "typo.sock")
    env = {**ENV, "SPAWND_AUTOSTART": "1", "XDG_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run([PY, "-m", "spawnd", "run", "--socket", typo, "--", "true"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and typo in r.stderr, r.stderr
    assert not list(tmp_path.glob("spawnd-*")), "a private daemon was started"


# ---------------------------------------------------------------- issue 12: lazy imports

HEAVY = ("msgpack", "spawnd.protocol", "dataclasses", "anyio", "trio", "multiprocessing",
         "socket")


def test_import_spawnd_client_loads_nothing_heavy() -> None:
    code = ("import sys, json, spawnd_client; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    r = run_script(code)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    # and first use still finds everything
    r = run_script("import spawnd_client as sc; print(sc.Popen.__name__, sc.Client.__name__, "
                   "sc.DaemonUnavailable.__name__, sc.run.__name__, 'mp' in dir(sc))")
    assert r.stdout.split() == ["Popen", "Client", "DaemonUnavailable", "run", "True"], r.stderr


def test_import_spawnd_client_mp_loads_no_async_or_protocol() -> None:
    code = ("import sys, json, spawnd_client.mp; "
            "print(json.dumps([m for m in ('anyio', 'trio', 'msgpack', 'spawnd.protocol') "
            "if m in sys.modules]))")
    r = run_script(code)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []

