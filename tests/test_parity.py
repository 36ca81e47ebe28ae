"""spawnd_client.Popen against subprocess.Popen on the same call: same exception, same
child state. install() puts spawnd under code that expects the stdlib exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import spawnd_client as sc
from conftest import Daemon
from spawnd_client import client as client_mod


def _both(daemon: Daemon):
    c = daemon.client()
    return [("stdlib", subprocess.Popen),
            ("spawnd", lambda *a, **k: sc.Popen(*a, client=c, **k))]


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - compared below
        return e
    raise AssertionError("no exception")


def test_bad_cwd(daemon: Daemon, tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such")
    errs = {name: _raised(lambda P=P: P(["true"], cwd=missing)) for name, P in _both(daemon)}
    for e in errs.values():
        assert type(e) is FileNotFoundError
        assert e.filename == missing
    errs = {name: _raised(lambda P=P: P(["true"], cwd=Path(missing)))
            for name, P in _both(daemon)}
    assert errs["spawnd"].filename == errs["stdlib"].filename


@pytest.mark.parametrize("kw", [
    {"args": ["tr\0ue"]}, {"args": ["true", "a\0b"]}, {"env": {"A": "b\0c"}},
    {"env": {"A\0": "b"}}, {"env": {"A=B": "c"}}, {"executable": "/bin/tr\0ue"},
])
def test_nul_and_bad_env_raise_value_error(daemon: Daemon, kw: dict) -> None:
    kw = {"args": ["true"], **kw}
    args = kw.pop("args")
    errs = [_raised(lambda P=P: P(args, **kw)) for _, P in _both(daemon)]
    assert [type(e) for e in errs] == [ValueError, ValueError]
    # The stdlib's wording varies by version and path ("embedded null byte", 3.13's
    # "posix_spawn: embedded null character in path"); the exception type is the contract.
    assert str(errs[0]) == str(errs[1]) or all("null" in str(e) for e in errs), errs


@pytest.mark.parametrize("kw", [{"user": 2**40}, {"group": 2**40}, {"user": 2**32},
                                {"extra_groups": [2**40]}, {"user": -5}])
def test_out_of_range_ids(daemon: Daemon, kw: dict) -> None:
    errs = [_raised(lambda P=P: P(["true"], **kw)) for _, P in _both(daemon)]
    assert type(errs[0]) is type(errs[1]), errs
    assert str(errs[0]) == str(errs[1])


def _sigign(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError


@pytest.mark.parametrize("restore", [True, False])
def test_restore_signals(daemon: Daemon, restore: bool) -> None:
    pipe_xfsz = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    seen = []
    for _, P in _both(daemon):
        p = P(["sleep", "30"], restore_signals=restore)
        try:
            seen.append(_sigign(p.pid) & pipe_xfsz)
        finally:
            p.kill()
            p.wait()
    assert seen[0] == seen[1] == (0 if restore else pipe_xfsz)


def test_close_fds_false_passes_inheritable_fds(daemon: Daemon) -> None:
    r, w = os.pipe()
    os.set_inheritable(w, True)
    hidden_r, hidden_w = os.pipe()  # not inheritable: neither child may see it
    try:
        code = (f"import os; os.write({w}, b'x'); "
                f"print(os.path.exists('/proc/self/fd/{hidden_w}'))")
        outs = []
        for _, P in _both(daemon):
            p = P([sys.executable, "-c", code], close_fds=False, stdout=subprocess.PIPE)
            outs.append(p.communicate()[0])
            assert p.returncode == 0
            assert os.read(r, 1) == b"x"
        assert outs == [b"False\n", b"False\n"]
    finally:
        for fd in (r, w, hidden_r, hidden_w):
            os.close(fd)


def test_wait_and_kill_from_many_threads(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent wait/poll/kill: every thread sees the same returncode, the pidfd is closed
    exactly once. (A slow os.close widens the window the old code raced in.)"""
    closed: list[int] = []
    real_close = os.close

    def slow_close(fd: int) -> None:
        threading.Event().wait(0.01)
        closed.append(fd)
        real_close(fd)

    for _, P in _both(daemon):
        p = P(["sleep", "30"])
        pidfd = getattr(p, "pidfd", None)
        results: list[object] = []
        barrier = threading.Barrier(8)

        def work(i: int, p=p, barrier=barrier, results=results) -> None:
            barrier.wait()
            try:
                if i % 2:
                    p.kill()
                results.append(p.wait(timeout=30))
            except BaseException as e:  # noqa: BLE001
                results.append(e)

        monkeypatch.setattr(client_mod.os, "close", slow_close)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        monkeypatch.setattr(client_mod.os, "close", real_close)
        assert results == [-signal.SIGKILL] * 8, results
        if pidfd is not None:
            assert closed.count(pidfd) == 1, closed
        closed.clear()


def test_preexec_fn_is_a_clear_error(daemon: Daemon) -> None:
    with pytest.raises(ValueError, match="preexec_fn is not supported.*Use start_new_session"):
        sc.Popen(["true"], preexec_fn=lambda: None, client=daemon.client())


def test_getoutput_getstatusoutput(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spawnd_client.client._default", daemon.client())
    for cmd in ("echo a; echo b >&2; exit 3", "printf 'x\\n\\n'"):
        assert sc.getstatusoutput(cmd) == subprocess.getstatusoutput(cmd)
        assert sc.getoutput(cmd) == subprocess.getoutput(cmd)


@pytest.mark.parametrize("restore", [True, False])
def test_asyncio_face_restore_signals_like_the_stdlib(daemon: Daemon, restore: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The asyncio face (what install() swaps in) honours restore_signals as asyncio does."""
    import asyncio

    from spawnd_client import asyncio as sa

    monkeypatch.setenv("SPAWND_SOCKET", daemon.path)
    pipe_xfsz = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))

    async def ign(create) -> int:
        p = await create("sleep", "30", restore_signals=restore)
        try:
            return _sigign(p.pid) & pipe_xfsz
        finally:
            p.kill()
            await p.wait()

    seen = [asyncio.run(ign(asyncio.create_subprocess_exec)),
            asyncio.run(ign(sa.create_subprocess_exec))]
    assert seen[0] == seen[1] == (0 if restore else pipe_xfsz)


def test_asyncio_face_close_fds_false(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from spawnd_client import asyncio as sa

    monkeypatch.setenv("SPAWND_SOCKET", daemon.path)
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        async def run(create) -> int:
            p = await create(sys.executable, "-c", f"import os; os.write({w}, b'x')",
                             close_fds=False)
            return await p.wait()

        for create in (asyncio.create_subprocess_exec, sa.create_subprocess_exec):
            assert asyncio.run(run(create)) == 0
            assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(os.geteuid() != 0, reason="a new net namespace needs root here")
def test_popen_namespaces(daemon: Daemon) -> None:
    """issue 11: Popen(..., namespaces=["net"]) like Client.spawn (a root daemon, root client)."""
    own = os.readlink("/proc/self/ns/net")
    p = sc.Popen(["readlink", "/proc/self/ns/net"], namespaces=["net"], stdout=subprocess.PIPE,
                 client=daemon.client())
    out = p.communicate(timeout=20)[0].decode().strip()
    assert p.returncode == 0 and out.startswith("net:[") and out != own


def test_a_script_sees_the_path_it_was_run_by(daemon: Daemon, tmp_path: Path) -> None:
    """With no rule about executables (the default policies), the daemon runs the path as
    subprocess does, without opening it first: a #! script reached through a symlink gets
    the symlink's path as $0 (not the checked real path), and so do its error messages."""
    script = tmp_path / "real-script"
    script.write_text('#!/bin/sh\necho "$0"\n')
    script.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(script)
    outs = {name: P([str(link)], stdout=subprocess.PIPE).communicate()[0]
            for name, P in _both(daemon)}
    assert outs["spawnd"] == outs["stdlib"] == f"{link}\n".encode()
    errs = {name: _raised(lambda P=P: P([str(tmp_path)])) for name, P in _both(daemon)}
    assert type(errs["spawnd"]) is type(errs["stdlib"]) is PermissionError
    assert errs["spawnd"].filename == errs["stdlib"].filename == str(tmp_path)
