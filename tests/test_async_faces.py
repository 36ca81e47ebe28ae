"""The async faces: anyio/trio ``open_process``/``run_process`` and asyncio
``create_subprocess_exec``, on trio and asyncio, against a real daemon.

The anyio face runs on both backends through ``anyio.run`` inside plain test functions
(``BACKENDS``), so pytest-trio's ``trio_mode`` and the asyncio loop never meet; the
asyncio face runs under ``asyncio.run``. Each run is a fresh event loop, hence a fresh
shared connection, found through ``$SPAWND_SOCKET``.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.streams.text
import pytest
import trio
from conftest import Daemon, children_of, fd_count, wait_until
from spawnd_client import aio
from spawnd_client import asyncio as sa

from spawnd import protocol as P

PY = sys.executable
BACKENDS = ["trio", "asyncio"]
MB10 = 10 * 1024 * 1024


@pytest.fixture(autouse=True)
def _socket(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SPAWND_SOCKET", daemon.path)
    yield


def run(backend: str, fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args, backend=backend)


def my_fds() -> set[str]:
    # Garbage of earlier tests (a Child in a traceback cycle holds its pidfd) must not be
    # collected between two snapshots: collect it before each one.
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def blob(n: int) -> bytes:
    return hashlib.sha256(b"seed").digest() * (n // 32)


# ---------------------------------------------------------------- pipes and data

@pytest.mark.parametrize("backend", BACKENDS)
def test_anyio_pipes_both_ways_10mb(backend: str) -> None:
    data = blob(MB10)

    async def main() -> tuple[bytes, int]:
        got = bytearray()
        async with await aio.open_process(["cat"]) as p:
            assert isinstance(p, anyio.abc.Process)

            async def feed() -> None:
                await p.stdin.send(data)
                await p.stdin.aclose()

            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                async for chunk in p.stdout:
                    got.extend(chunk)
            rc = await p.wait()
        return bytes(got), rc

    got, rc = run(backend, main)
    assert rc == 0 and len(got) == MB10 and got == data


def test_asyncio_pipes_both_ways_10mb_and_communicate() -> None:
    data = blob(MB10)

    async def main() -> tuple[bytes, bytes, int, bool]:
        p = await sa.create_subprocess_exec("sh", "-c", "cat; echo done >&2",
                                            stdin=sa.PIPE, stdout=sa.PIPE, stderr=sa.PIPE)
        out, err = await p.communicate(data)
        return out, err, p.returncode, isinstance(p, asyncio.subprocess.Process)

    out, err, rc, is_stdlib = asyncio.run(main())
    assert is_stdlib and rc == 0 and err == b"done\n" and out == data


@pytest.mark.parametrize("backend", BACKENDS)
def test_anyio_run_process_input_and_check_error(backend: str) -> None:
    async def main() -> Any:
        ok = await aio.run_process(["cat"], input=b"abc")
        with pytest.raises(subprocess.CalledProcessError) as info:
            await aio.run_process("echo out; echo err >&2; exit 3")
        return ok, info.value

    ok, e = run(backend, main)
    assert ok.returncode == 0 and ok.stdout == b"abc" and ok.stderr == b""
    assert e.returncode == 3 and e.stdout == b"out\n" and e.stderr == b"err\n"
    assert e.cmd == "echo out; echo err >&2; exit 3"


@pytest.mark.parametrize("backend", BACKENDS)
def test_children_inherit_the_callers_cwd_and_umask(backend: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Like subprocess: the async faces send the caller's state too (issue 11)."""
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o027)
    try:
        async def main() -> Any:
            a = await aio.run_process("pwd; umask")
            p = await sa.create_subprocess_shell("pwd; umask", stdout=sa.PIPE) \
                if backend == "asyncio" else None
            return a, (await p.communicate())[0] if p is not None else None

        a, b = run(backend, main)
    finally:
        os.umask(old)
    assert a.stdout.decode().split() == [str(tmp_path), "0027"]
    if b is not None:
        assert b.decode().split() == [str(tmp_path), "0027"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_round_trips(backend: str) -> None:
    text = "héllo wörld ✓ 日本語\n" * 5000  # multi-byte characters split across chunks

    async def anyio_side() -> str:
        async with await aio.open_process(["cat"]) as p:
            send = anyio.streams.text.TextSendStream(p.stdin)
            recv = anyio.streams.text.TextReceiveStream(p.stdout)
            parts: list[str] = []

            async def feed() -> None:
                await send.send(text)
                await send.aclose()

            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                async for part in recv:
                    parts.append(part)
        return "".join(parts)

    assert run(backend, anyio_side) == text

    async def asyncio_side() -> list[str]:
        p = await sa.create_subprocess_exec("cat", stdin=sa.PIPE, stdout=sa.PIPE)
        p.stdin.write(text.encode())
        p.stdin.close()
        lines = []
        while line := await p.stdout.readline():
            lines.append(line.decode())
        await p.wait()
        return lines

    if backend == "asyncio":
        assert "".join(asyncio.run(asyncio_side())) == text


def test_asyncio_limit_is_the_readers() -> None:
    async def main() -> None:
        p = await sa.create_subprocess_exec("sh", "-c", "head -c 300 /dev/zero; echo",
                                            stdout=sa.PIPE, limit=100)
        with pytest.raises(ValueError, match="limit"):
            await p.stdout.readline()
        await p.wait()

    asyncio.run(main())


# ---------------------------------------------------------------- timeouts, cancellation

@pytest.mark.parametrize("backend", BACKENDS)
def test_fail_after_kills_and_reaps_the_child(backend: str, daemon: Daemon) -> None:
    async def main() -> aio.Process:
        got: list[aio.Process] = []
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.5):
                async with anyio.create_task_group() as tg:
                    got.append(await tg.start(partial(aio.run_process, ["sleep", "30"])))
        return got[0]

    p = run(backend, main)
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(f"/proc/{p.pid}")  # reaped before run_process returned
    assert not children_of(daemon.pid)


def test_asyncio_wait_for_timeout_then_kill() -> None:
    async def main() -> tuple[int | None, int]:
        p = await sa.create_subprocess_exec("sleep", "30", stdout=sa.PIPE)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(p.communicate(), 0.3)
        still = p.returncode  # the stdlib leaves it running: the caller decides
        p.kill()
        return still, await p.wait()

    assert asyncio.run(main()) == (None, -signal.SIGKILL)


def test_asyncio_wait_for_around_run_process_kills() -> None:
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aio.run_process(["sleep", "30"]), 0.3)

    asyncio.run(main())


async def _settled(daemon: Daemon, daemon_fds: int, mine: set[str]) -> None:
    """Poll (the loop keeps running: exit events still arrive) until the daemon has no
    children and both processes are back to their fd tables."""
    def done() -> bool:
        return (not children_of(daemon.pid) and fd_count(daemon.pid) <= daemon_fds
                and my_fds() == mine)

    with anyio.move_on_after(20):
        while not done():
            await anyio.sleep(0.02)
    assert not children_of(daemon.pid), children_of(daemon.pid)
    assert fd_count(daemon.pid) <= daemon_fds, os.listdir(f"/proc/{daemon.pid}/fd")
    assert my_fds() == mine, (my_fds() - mine, mine - my_fds())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelled_run_process_leaves_no_zombie_and_no_fd(backend: str, daemon: Daemon) -> None:
    async def main() -> list[int]:
        await aio.run_process(["true"])  # the shared connection now exists
        mine, daemon_fds = my_fds(), fd_count(daemon.pid)
        pids: list[int] = []
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                p = await tg.start(partial(aio.run_process, ["sh", "-c", "cat; sleep 30"],
                                           input=b"x"))
                pids.append(p.pid)
            tg.cancel_scope.cancel()
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}")
        await _settled(daemon, daemon_fds, mine)
        return pids

    assert len(run(backend, main)) == 20


def test_asyncio_cancelled_while_spawning_leaves_nothing(daemon: Daemon) -> None:
    """Cancel create_subprocess_exec at every await it makes: before the request left,
    after (the child then is killed as soon as it is reported), after the pipes connect."""
    async def main() -> int:
        await (await sa.create_subprocess_exec("true")).wait()
        mine, daemon_fds = my_fds(), fd_count(daemon.pid)
        cancelled = 0
        for k in range(12):
            task = asyncio.ensure_future(sa.create_subprocess_exec(
                "sleep", "30", stdin=sa.PIPE, stdout=sa.PIPE, stderr=sa.PIPE))
            for _ in range(k):
                await asyncio.sleep(0)
            task.cancel()
            try:
                p = await task
            except asyncio.CancelledError:
                cancelled += 1
                continue
            p.kill()
            await p.communicate()
        # abandoned children are killed and reaped: their exit events close the pidfds
        await _settled(daemon, daemon_fds, mine)
        return cancelled

    assert asyncio.run(main()) >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_200_concurrent_run_process_share_one_connection(backend: str) -> None:
    async def main() -> tuple[dict[int, bytes], int]:
        out: dict[int, bytes] = {}

        async def one(i: int) -> None:
            out[i] = (await aio.run_process(["echo", str(i)])).stdout

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        return out, (await (await aio.default_client()).ping())["connections"]

    out, connections = run(backend, main)
    assert out == {i: f"{i}\n".encode() for i in range(200)}
    assert connections == 1


def test_asyncio_face_concurrency_on_one_connection() -> None:
    async def main() -> tuple[list[bytes], int]:
        async def one(i: int) -> bytes:
            p = await sa.create_subprocess_exec("echo", str(i), stdout=sa.PIPE)
            return (await p.communicate())[0]

        outs = await asyncio.gather(*(one(i) for i in range(200)))
        await aio.run_process(["true"])  # the anyio face on the same loop: same connection
        return list(outs), (await (await aio.default_client()).ping())["connections"]

    outs, connections = asyncio.run(main())
    assert outs == [f"{i}\n".encode() for i in range(200)] and connections == 1


# ---------------------------------------------------------------- synchronous errors

def _oserror(e: OSError) -> tuple[type, int, Any]:
    return type(e), e.errno, e.filename


def _stdlib_error(cmd: list[str], cwd: str | None) -> tuple[type, int, Any]:
    async def main() -> OSError:
        try:
            await asyncio.create_subprocess_exec(*cmd, cwd=cwd)
        except OSError as e:
            return e
        raise AssertionError("stdlib did not raise")

    return _oserror(asyncio.run(main()))


CASES = [(["/nonexistent/prog"], None, errno.ENOENT), (["no-such-prog-xyz"], None, errno.ENOENT),
         (["/etc/passwd"], None, errno.EACCES), (["true"], "/nonexistent-dir", errno.ENOENT)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("cmd", "cwd", "num"), CASES)
def test_sync_errors_like_the_stdlib(backend: str, cmd: list[str], cwd: str | None,
                                     num: int) -> None:
    expected = _stdlib_error(cmd, cwd)
    assert expected[1] == num

    async def anyio_side() -> OSError:
        with pytest.raises(OSError) as info:
            await aio.run_process(cmd, cwd=cwd)
        return info.value

    assert _oserror(run(backend, anyio_side)) == expected

    async def asyncio_side() -> OSError:
        with pytest.raises(OSError) as info:
            await sa.create_subprocess_exec(*cmd, cwd=cwd, stdout=sa.PIPE)
        return info.value

    if backend == "asyncio":
        assert _oserror(asyncio.run(asyncio_side())) == expected


def test_asyncio_refusals_are_the_stdlibs() -> None:
    async def main() -> None:
        for kw, msg in (({"text": True}, "text must be False"),
                        ({"bufsize": 1}, "bufsize must be 0"),
                        ({"universal_newlines": True}, "universal_newlines must be False"),
                        ({"encoding": "utf-8"}, "encoding must be None")):
            with pytest.raises(ValueError, match=msg):
                await asyncio.create_subprocess_exec("true", **kw)
            with pytest.raises(ValueError, match=msg):
                await sa.create_subprocess_exec("true", **kw)
        with pytest.raises(ValueError, match="preexec_fn"):
            await sa.create_subprocess_exec("true", preexec_fn=lambda: None)

    asyncio.run(main())


# ---------------------------------------------------------------- signals

@pytest.mark.parametrize("backend", BACKENDS)
def test_signals_go_by_pidfd_without_a_round_trip(backend: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> int:
        p = await aio.open_process(["sleep", "30"])
        assert p.pidfd is not None
        conn = p._child.client

        def no_daemon(*a: Any) -> None:
            raise AssertionError("asked the daemon although the pidfd could signal")

        monkeypatch.setattr(conn, "post", no_daemon)
        monkeypatch.setattr(conn, "request", no_daemon)
        p.terminate()
        rc = await p.wait()
        p.terminate()  # after the exit: a no-op, like subprocess
        await p.aclose()
        return rc

    assert run(backend, main) == -signal.SIGTERM


@pytest.mark.parametrize("backend", BACKENDS)
def test_eperm_on_pidfd_falls_back_to_the_daemon(backend: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit test of the fallback: the pidfd refuses (as for a child of another uid) and the
    Signal request names the child by its spawn request id."""
    def refuse(fd: int, sig: int, *a: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(aio._signal, "pidfd_send_signal", refuse)
    sent: list[P.Event] = []

    async def main() -> int:
        p = await aio.open_process(["sleep", "30"], stdin=None, stdout=None, stderr=None)
        conn = p._child.client
        real_push = conn._push

        def spy(event: P.Event, fds: Any) -> Any:
            sent.append(event)
            return real_push(event, fds)

        monkeypatch.setattr(conn, "_push", spy)
        p.kill()
        return await p.wait(), p._child.rid

    rc, rid = run(backend, main)
    (ev,) = sent
    assert isinstance(ev, P.Signal) and ev.signal == signal.SIGKILL
    assert ev.child == rid
    assert rc == -signal.SIGKILL


def test_asyncio_signals_and_returncode() -> None:
    async def main() -> tuple[int, int | None]:
        p = await sa.create_subprocess_exec("sleep", "30")
        p.send_signal(signal.SIGUSR1)
        rc = await p.wait()
        p.kill()  # exited: nothing happens, as with the stdlib
        return rc, p.returncode

    assert asyncio.run(main()) == (-signal.SIGUSR1, -signal.SIGUSR1)


# ---------------------------------------------------------------- trio extras

async def test_trio_nursery_start_and_deliver_cancel() -> None:
    delivered: list[int] = []

    async def deliver_cancel(p: aio.Process) -> None:
        delivered.append(p.pid)
        p.terminate()

    async with trio.open_nursery() as nursery:
        p = await nursery.start(partial(aio.run_process, ["sleep", "30"],
                                        deliver_cancel=deliver_cancel))
        assert p.returncode is None
        nursery.cancel_scope.cancel()
    assert delivered == [p.pid] and p.returncode == -signal.SIGTERM


async def test_explicit_client_and_open_process_kwargs(daemon: Daemon, tmp_path: Path) -> None:
    async with aio.AsyncClient(daemon.path, autostart=False) as c:
        r = await aio.run_process(["sh", "-c", "pwd; echo $X; umask"], cwd=str(tmp_path),
                                  env={"X": "y", "PATH": os.environ["PATH"]}, umask=0o27,
                                  client=c)
        assert r.stdout.decode().split() == [str(tmp_path), "y", "0027"]
        r = await aio.run_process("echo both >&2", stderr=aio.STDOUT, client=c)
        assert r.stdout == b"both\n" and r.stderr is None


# ---------------------------------------------------------------- the client's process tree

SCRIPT = """
import asyncio, sys, threading, anyio, trio
from spawnd_client import aio
from spawnd_client import asyncio as sa
STDLIB = sys.argv[1] == "stdlib"
print("ready", flush=True)
sys.stdin.readline()  # strace attaches here: importing trio runs ldconfig (trio's own)
threading.Thread(target=lambda: None).start()  # one clone strace must see (not vacuous)

async def anyio_face():
    for _ in range(3):
        if STDLIB:
            assert (await anyio.run_process(["echo", "hi"])).stdout == b"hi\\n"
        else:
            assert (await aio.run_process(["echo", "hi"])).stdout == b"hi\\n"

async def asyncio_face():
    make = asyncio.create_subprocess_exec if STDLIB else sa.create_subprocess_exec
    for _ in range(3):
        p = await make("echo", "hi", stdout=asyncio.subprocess.PIPE)
        assert (await p.communicate())[0] == b"hi\\n"

anyio.run(anyio_face, backend="trio")
anyio.run(anyio_face, backend="asyncio")
asyncio.run(asyncio_face())
"""


def _traced(pid: int) -> bool:
    tids = os.listdir(f"/proc/{pid}/task")
    return all(proc_status_tid(pid, t).get("TracerPid", "0") != "0" for t in tids)


def proc_status_tid(pid: int, tid: str) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def test_client_never_forks_on_either_backend(tmp_path: Path) -> None:
    """strace -f attached once the imports are done (``import trio`` itself runs
    ``ldconfig -p`` through subprocess, in trio's thread cache: not ours to judge)."""
    if not os.path.exists("/usr/bin/strace"):
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    script = tmp_path / "c.py"
    script.write_text(SCRIPT)

    def offenders(mode: str) -> list[str]:
        trace = tmp_path / f"trace-{mode}"
        prog = subprocess.Popen([PY, str(script), mode], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env={**os.environ})
        assert prog.stdout is not None and prog.stdin is not None
        try:
            assert prog.stdout.readline() == b"ready\n"
            tracer = subprocess.Popen(["strace", "-f", "-qq", "-e",
                                       "trace=fork,vfork,clone,clone3", "-o", str(trace),
                                       "-p", str(prog.pid)])
            assert wait_until(lambda: _traced(prog.pid), 20)
            prog.stdin.write(b"go\n")
            prog.stdin.close()
            assert prog.wait(120) == 0
            assert tracer.wait(30) == 0
        finally:
            if prog.poll() is None:
                prog.kill()
                prog.wait()
        calls = [ln for ln in trace.read_text().splitlines()
                 if any(f" {c}(" in ln or ln.split(None, 1)[-1].startswith(c + "(")
                        for c in ("fork", "vfork", "clone", "clone3"))]
        assert calls, "strace saw no clone at all: the check would be vacuous"
        return [ln for ln in calls if "CLONE_THREAD" not in ln]

    assert not offenders("spawnd")
    assert offenders("stdlib")  # the same program on the stdlib's path does create processes


def test_asyncio_face_does_not_import_trio() -> None:
    code = ("import sys, asyncio, anyio\n"
            "from spawnd_client import asyncio as sa, aio\n"
            "async def main():\n"
            "    await (await sa.create_subprocess_exec('true')).wait()\n"
            "    await aio.run_process(['true'])\n"
            "asyncio.run(main()); anyio.run(main, backend='asyncio')\n"
            "print('trio' in sys.modules)")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]
