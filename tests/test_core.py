"""The core promise, end to end: a real daemon, real children, real fds."""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import spawnd_client as sc
from conftest import Daemon, children_of, fd_count, proc_status, start_daemon, wait_until

PY = sys.executable


def test_run_capture_and_exit_code(client: sc.Client) -> None:
    r = sc.run(["sh", "-c", "echo out; echo err >&2; exit 3"], capture_output=True,
               client=client)
    assert isinstance(r, subprocess.CompletedProcess)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


def test_death_by_signal_is_negative(client: sc.Client) -> None:
    assert sc.call(["sh", "-c", "kill -9 $$"], client=client) == -signal.SIGKILL
    p = sc.Popen(["sleep", "30"], client=client)
    p.terminate()
    assert p.wait(5) == -signal.SIGTERM


def test_env_exactly_as_given(client: sc.Client) -> None:
    out = sc.check_output(["/usr/bin/env"], env={"A": "1", "B": "x y"}, client=client)
    assert out == b"A=1\nB=x y\n"


def test_env_none_is_the_clients_own(client: sc.Client, monkeypatch) -> None:
    monkeypatch.setenv("SPAWND_TEST_MARK", "only-in-the-client")
    out = sc.check_output(["/usr/bin/env", "-0"], client=client)
    got = dict(e.split("=", 1) for e in out.decode().split("\0") if e)
    assert got == dict(os.environ)


def test_child_fd_table_holds_only_what_was_granted(client: sc.Client) -> None:
    # sh lists its own fd table; `ls` runs in a child of sh that has the same table.
    out = sc.check_output(["sh", "-c", "ls /proc/$$/fd"], client=client, stdin=sc.DEVNULL)
    assert sorted(map(int, out.split())) == [0, 1, 2]


def test_pass_fds(client: sc.Client) -> None:
    r, w = os.pipe()
    granted = w
    try:
        p = sc.Popen(["sh", "-c", f"echo granted >/proc/self/fd/{w}; ls /proc/$$/fd"], pass_fds=[w],
                     stdout=sc.PIPE, client=client)
        out, _ = p.communicate(timeout=10)
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"granted\n"
        assert sorted(map(int, out.split())) == sorted({0, 1, 2, granted})
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def test_stdin_pipe_and_text_mode(client: sc.Client) -> None:
    r = sc.run(["cat"], input="héllo\n", text=True, capture_output=True, client=client)
    assert r.stdout == "héllo\n"
    p = sc.Popen(["sh", "-c", "cat; echo done >&2"], stdin=sc.PIPE, stdout=sc.PIPE,
                 stderr=sc.STDOUT, client=client)
    out, err = p.communicate(b"abc\n", timeout=10)
    assert (out, err, p.returncode) == (b"abc\ndone\n", None, 0)


def test_stdio_none_is_the_clients_own(client: sc.Client, tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    code = ("import spawnd_client as sc, sys; "
            f"sys.exit(sc.call(['sh', '-c', 'echo to-inherited-stdout'], client=sc.Client({client.path!r})))")
    with open(target, "wb") as f:
        subprocess.run([PY, "-c", code], stdout=f, check=True)
    assert target.read_bytes() == b"to-inherited-stdout\n"


@pytest.mark.parametrize("argv,exc", [
    (["/nonexistent/prog"], FileNotFoundError),
    (["no-such-program-anywhere"], FileNotFoundError),
    (["/etc/passwd"], PermissionError),
    (["/tmp"], PermissionError),
])
def test_errors_are_synchronous(client: sc.Client, argv, exc) -> None:
    with pytest.raises(exc) as info:
        sc.Popen(argv, client=client)
    assert info.value.filename == argv[0]
    assert info.value.stage == "exec"


def test_enoexec_and_missing_interpreter(client: sc.Client, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF-not-really")
    junk.chmod(0o755)
    with pytest.raises(OSError) as info:
        sc.Popen([str(junk)], client=client)
    assert info.value.errno == 8  # ENOEXEC
    script = tmp_path / "script"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    with pytest.raises(FileNotFoundError):
        sc.Popen([str(script)], client=client)


def test_bad_cwd_is_synchronous_with_stage(client: sc.Client, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        sc.Popen(["true"], cwd=str(tmp_path / "missing"), client=client)
    assert info.value.stage == "cwd"
    assert info.value.filename == str(tmp_path / "missing")
    assert sc.check_output(["pwd"], cwd=str(tmp_path), client=client).strip() == \
        str(tmp_path).encode()


def test_e2big(client: sc.Client) -> None:
    with pytest.raises(OSError) as info:
        sc.Popen(["true", "x" * 200_000], client=client)
    assert info.value.errno == 7  # E2BIG


def test_preexec_fn_refused() -> None:
    with pytest.raises(ValueError, match="posix_spawn"):
        sc.Popen(["true"], preexec_fn=lambda: None)


def test_check_output_and_check_call_raise_like_stdlib(client: sc.Client) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        sc.check_output(["sh", "-c", "echo partial; exit 4"], client=client)
    assert (info.value.returncode, info.value.output) == (4, b"partial\n")
    with pytest.raises(subprocess.CalledProcessError):
        sc.check_call(["false"], client=client)
    assert sc.check_call(["true"], client=client) == 0


def test_wait_and_communicate_timeouts(client: sc.Client) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        sc.run(["sleep", "30"], timeout=0.2, client=client)
    with sc.Popen(["sleep", "30"], stdout=sc.PIPE, client=client) as p:
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=0.1)
        with pytest.raises(subprocess.TimeoutExpired):
            p.communicate(timeout=0.1)
        assert p.poll() is None
        p.kill()
    assert p.returncode == -signal.SIGKILL


def test_pidfd_is_handed_to_the_client(client: sc.Client) -> None:
    child = client.spawn(["sleep", "0.2"])
    assert child.pidfd is not None
    r, _, _ = select.select([child.pidfd], [], [], 0)
    assert not r
    r, _, _ = select.select([child.pidfd], [], [], 10)
    assert r
    assert child.wait(10) == 0
    child.close()


def test_session_and_process_group(client: sc.Client) -> None:
    p = sc.Popen(["sleep", "5"], start_new_session=True, client=client)
    assert os.getsid(p.pid) == p.pid
    p.kill()
    p.wait()
    p = sc.Popen(["sleep", "5"], process_group=0, client=client)
    assert os.getpgid(p.pid) == p.pid
    p.kill()
    p.wait()


def test_child_signal_dispositions_are_default(client: sc.Client) -> None:
    p = sc.Popen(["sleep", "5"], client=client)
    st = proc_status(p.pid)
    assert int(st["SigIgn"], 16) == 0 and int(st["SigBlk"], 16) == 0
    p.kill()
    p.wait()


def test_32_threads_share_one_client(daemon: Daemon) -> None:
    client = daemon.client()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(8):
                code = (n + i) % 7
                assert sc.call(["sh", "-c", f"exit {code}"], client=client) == code
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert proc_status(daemon.pid)["Threads"] == "1"


def test_no_zombie_and_no_fd_leak(daemon: Daemon) -> None:
    client = daemon.client()
    client.ping()
    baseline = fd_count(daemon.pid)
    for i in range(30):
        sc.run(["sh", "-c", f"exit {i % 3}"], capture_output=True, client=client)
    for argv in (["/nonexistent"], ["/etc/passwd"]):
        with pytest.raises(OSError):
            sc.Popen(argv, client=client)
    daemon.settle(baseline)
    assert [s for _, s in children_of(daemon.pid) if s == "Z"] == []


def test_daemon_stays_single_threaded_and_small(daemon: Daemon) -> None:
    st = proc_status(daemon.pid)
    assert st["Threads"] == "1"


def test_socket_is_private(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.path).st_mode)
    assert mode == 0o600
    assert stat.S_ISSOCK(os.stat(daemon.path).st_mode)


def test_signal_errors(client: sc.Client, daemon: Daemon) -> None:
    """Signals name a child by its spawn request id on the same connection (issue 10.6)."""
    other = daemon.client()
    child = other.spawn(["sleep", "30"])
    t = client.transport()
    from spawnd import protocol as P

    with pytest.raises(ProcessLookupError):  # another connection's id space: nothing here
        t.request(P.Signal(id=t.next_id(), child=child.request_id, signal=signal.SIGTERM))
    with pytest.raises(ProcessLookupError):
        t.request(P.Signal(id=t.next_id(), child=10**6, signal=signal.SIGTERM))
    child.kill()
    assert child.wait(10) == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        other.transport().request(P.Signal(id=t.next_id(), child=child.request_id, signal=0))


def _alive(pid: int) -> bool:
    try:
        st = proc_status(pid)["State"]
    except FileNotFoundError:
        return False
    return not st.startswith("Z")


@pytest.mark.parametrize("policy,expect_alive", [("terminate", False), ("kill", False),
                                                  ("keep", True)])
def test_children_when_the_connection_closes(daemon: Daemon, policy: str,
                                             expect_alive: bool) -> None:
    client = sc.Client(daemon.path, autostart=False)
    child = client.spawn(["sleep", "30"], on_disconnect=policy, grace=1)
    pid = child.pid
    client.close()
    if expect_alive:
        time.sleep(0.3)
        assert _alive(pid)
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: pid not in [p for p, _ in children_of(daemon.pid)], 10)


def test_terminate_policy_escalates_to_sigkill(daemon: Daemon) -> None:
    client = sc.Client(daemon.path, autostart=False)
    child = client.spawn(["sh", "-c", "trap '' TERM; sleep 30"], grace=0.5)
    pid = child.pid
    time.sleep(0.2)  # let sh install its trap
    client.close()
    t0 = time.monotonic()
    assert wait_until(lambda: pid not in [p for p, _ in children_of(daemon.pid)], 10)
    assert time.monotonic() - t0 >= 0.4


def test_sigterm_stops_daemon_and_reports_children(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, "--stop-grace", "1")
    client = sc.Client(d.path, autostart=False)
    child = client.spawn(["sleep", "30"])
    d.proc.send_signal(signal.SIGTERM)
    assert child.wait(10) == -signal.SIGTERM
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.path)
    client.close()


def test_garbage_gets_an_error_and_others_are_served(daemon: Daemon) -> None:
    from spawnd import protocol as P

    good = daemon.client()
    for payload in (b"\xff" * 64, P.HEADER.pack(2**31) + b"x", P.HEADER.pack(3) + b"\xc1\xc1\xc1"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.path)
        s.sendall(payload)
        s.settimeout(5)
        conn = P.Connection("client")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        conn.receive_data(data)
        hello = conn.next_event()
        assert isinstance(hello, P.Hello)
        err = conn.next_event()
        assert isinstance(err, P.Error) and err.stage == "protocol", err
        assert sc.call(["true"], client=good) == 0


def test_client_never_creates_a_process(daemon: Daemon, tmp_path: Path) -> None:
    """Under strace, every clone the client makes is a thread (CLONE_THREAD)."""
    if not os.path.exists("/usr/bin/strace"):
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    script = tmp_path / "c.py"
    script.write_text(f"""
import threading, spawnd_client as sc
c = sc.Client({daemon.path!r}, autostart=False)
def work():
    for _ in range(5):
        assert sc.run(["sh", "-c", "echo hi"], capture_output=True, client=c).stdout == b"hi\\n"
ts = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
""")
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=fork,vfork,clone,clone3", "-o",
                    str(trace), PY, str(script)], check=True, env={**os.environ})
    calls = [ln for ln in trace.read_text().splitlines()
             if any(f" {c}(" in ln or ln.split(None, 1)[-1].startswith(c + "(")
                    for c in ("fork", "vfork", "clone", "clone3"))]
    assert calls, "strace saw no clone at all: the check would be vacuous"
    offenders = [ln for ln in calls if "CLONE_THREAD" not in ln]
    assert not offenders, offenders


def test_autostart_private_daemon(tmp_path: Path) -> None:
    """Autostart applies only when no socket is configured at all (issue 15, point 2)."""
    env = {k: v for k, v in os.environ.items() if k != "SPAWND_SOCKET"}
    env.update(SPAWND_AUTOSTART="1", XDG_RUNTIME_DIR=str(tmp_path))
    default = subprocess.run([PY, "-c", "from spawnd.paths import default_socket_path as d; "
                              "print(d())"], env=env, capture_output=True, text=True,
                             check=True).stdout.strip()
    if os.path.exists(default):
        pytest.skip(f"a daemon may listen at the default path {default}")
    code = ("import spawnd_client as sc, os; c = sc.default_client(); "
            "print(sc.check_output(['echo', 'ok']).decode().strip(), c.ping()['pid'], "
            "c.transport().path)")
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    word, pid, path = out.stdout.split()
    assert word == "ok"
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10)
    assert not os.path.exists(path)
    env["SPAWND_AUTOSTART"] = "0"
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert default in out.stderr and "DaemonUnavailable" in out.stderr


def test_spawnd_run_cli(daemon: Daemon) -> None:
    r = subprocess.run([PY, "-m", "spawnd", "run", "--socket", daemon.path, "--", "sh", "-c",
                        "echo via-daemon; exit 7"], capture_output=True, timeout=30)
    assert (r.returncode, r.stdout) == (7, b"via-daemon\n")
    r = subprocess.run([PY, "-m", "spawnd", "run", "--socket", daemon.path, "--",
                        "/nonexistent"], capture_output=True, timeout=30)
    assert r.returncode == 127 and b"No such file" in r.stderr


def test_daemon_restart_client_reconnects(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    client = sc.Client(d.path, autostart=False)
    child = client.spawn(["sleep", "30"], on_disconnect="kill")
    d.proc.kill()
    d.proc.wait()
    with pytest.raises(ConnectionError):
        child.wait(10)
    os.kill(child.pid, signal.SIGKILL)
    os.unlink(d.path)
    d2 = start_daemon(tmp_path)
    assert sc.call(["true"], client=client) == 0
    client.close()
    assert d2.stop() == 0


async def test_async_client_on_trio(daemon: Daemon) -> None:
    async with sc.AsyncClient(daemon.path, autostart=False) as c:
        child = await c.spawn(["sh", "-c", "exit 5"])
        assert await child.wait() == 5
        with pytest.raises(FileNotFoundError):
            await c.spawn(["/nonexistent"])
        slow = await c.spawn(["sleep", "30"])
        await slow.terminate()
        assert await slow.wait() == -signal.SIGTERM


def test_async_client_on_asyncio(daemon: Daemon) -> None:
    import asyncio

    async def main() -> int:
        async with sc.AsyncClient(daemon.path, autostart=False) as c:
            child = await c.spawn(["sh", "-c", "exit 6"])
            return await child.wait()

    assert asyncio.run(main()) == 6


def test_client_does_not_import_trio() -> None:
    code = ("import sys, spawnd_client as sc; sc.Client; sc.Popen; "
            "print('trio' in sys.modules, 'anyio' in sys.modules)")
    out = subprocess.check_output([PY, "-c", code], text=True)
    assert out.split() == ["False", "False"]
