"""spawnd_client.install(): a whole stdlib program through the daemon, the fork fence,
uninstall(), and the ``python -m spawnd_client run`` / SPAWND_INSTALL entry points."""

from __future__ import annotations

import _posixsubprocess
import asyncio
import multiprocessing
import multiprocessing.context
import os
import subprocess
import sys
from pathlib import Path

import pytest
import spawnd_client
from conftest import Daemon, children_of

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "tests" / "data" / "stdlib_program.py"
inst = sys.modules["spawnd_client.install"]

#: Every (owner, name) install(forbid_fork=True) replaces.
PATCHED = [(subprocess.Popen, "_execute_child"), (os, "system"), (os, "_spawnvef"),
           (os, "waitpid"), (multiprocessing.context._default_context, "_default_context"),
           (os, "fork"), (os, "forkpty"), (os, "posix_spawn"), (os, "posix_spawnp"),
           (_posixsubprocess, "fork_exec")]


def _env(daemon: Daemon) -> dict[str, str]:
    return {**os.environ, "SPAWND_SOCKET": daemon.path, "SPAWND_AUTOSTART": "0",
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'client'}"}


@pytest.fixture
def installed(daemon: Daemon, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPAWND_SOCKET", daemon.path)
    monkeypatch.setattr("spawnd_client.client._default", daemon.client())
    # A fresh program's state: no start method fixed yet (an earlier test in this process
    # may have fixed it, e.g. by calling get_start_method() without allow_none).
    monkeypatch.setattr(multiprocessing.context._default_context, "_actual_context", None)
    yield daemon
    spawnd_client.uninstall()


def test_stdlib_program_same_results_and_no_fork(daemon: Daemon, tmp_path: Path) -> None:
    """The same stdlib-only program, plain and under ``python -m spawnd_client run``: same
    output; under strace the latter's processes make thread clones only."""
    if not os.path.exists("/usr/bin/strace"):
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    env = _env(daemon)
    plain = subprocess.run([PY, str(PROGRAM)], env=env, capture_output=True, timeout=120,
                           cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    trace = tmp_path / "trace"
    ours = subprocess.run(["strace", "-f", "-qq", "-e", "trace=fork,vfork,clone,clone3", "-o",
                           str(trace), PY, "-m", "spawnd_client", "run", str(PROGRAM)],
                          env=env, capture_output=True, timeout=180, cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == plain.stdout
    assert b"True" in ours.stdout  # the program saw a start method it knows
    calls = [ln for ln in trace.read_text().splitlines()
             if any(f" {c}(" in ln or ln.split(None, 1)[-1].startswith(c + "(")
                    for c in ("fork", "vfork", "clone", "clone3"))]
    assert len(calls) >= 3, "strace saw too few clones: the check would be vacuous"
    offenders = [ln for ln in calls if "CLONE_THREAD" not in ln]
    assert not offenders, offenders


def test_run_module_and_forbid_fork(daemon: Daemon, tmp_path: Path) -> None:
    """``run -m module`` works; ``--forbid-fork`` turns a stray os.fork() into the error."""
    (tmp_path / "stray.py").write_text(
        "import os, subprocess, sys\n"
        "print(subprocess.run(['echo', *sys.argv[1:]], capture_output=True).stdout)\n"
        "os.fork()\n")
    env = {**_env(daemon), "PYTHONPATH": f"{tmp_path}{os.pathsep}{_env(daemon)['PYTHONPATH']}"}
    r = subprocess.run([PY, "-m", "spawnd_client", "run", "--forbid-fork", "-m", "stray", "a"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == "b'a\\n'\n"
    assert "spawnd_client.install.ForkForbidden: os.fork() called from " in r.stderr
    assert "stray.py:3 in <module>()" in r.stderr


def test_spawnd_install_env_hook(daemon: Daemon, tmp_path: Path) -> None:
    """The .pth line installs only when SPAWND_INSTALL=1 (here run as site would run it)."""
    line = (REPO / "client" / "spawnd_install.pth").read_text()
    code = (f"exec({line!r})\nimport subprocess, sys\n"
            "print(subprocess.Popen._execute_child.__module__, 'spawnd_client' in sys.modules)")
    for value, want in (("1", "spawnd_client.install True"), ("0", "subprocess False")):
        r = subprocess.run([PY, "-c", code], env={**_env(daemon), "SPAWND_INSTALL": value},
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == want, r.stderr


def test_uninstall_restores_every_name(installed: Daemon) -> None:
    before = [getattr(o, n) for o, n in PATCHED]
    spawnd_client.install(forbid_fork=True)
    spawnd_client.install(forbid_fork=True)  # idempotent
    assert inst.installed() == {"multiprocessing": True, "asyncio": True, "forbid_fork": True}
    assert all(getattr(o, n) is not b for (o, n), b in zip(PATCHED, before, strict=True))
    assert multiprocessing.get_start_method(allow_none=True) in (None, "spawnd")
    spawnd_client.uninstall()
    spawnd_client.uninstall()
    assert [getattr(o, n) for o, n in PATCHED] == before
    assert inst.installed() is None


def test_early_import_of_popen_is_covered(installed: Daemon) -> None:
    """``from subprocess import Popen`` taken before install() starts through the daemon,
    and a Popen made while installed is still waited for through it after uninstall()."""
    from subprocess import Popen as EarlyPopen

    spawnd_client.install()
    p = EarlyPopen(["sh", "-c", "sleep 0.5; exit 3"])
    assert p.pid in [pid for pid, _ in children_of(installed.pid)]
    assert isinstance(p, subprocess.Popen)
    spawnd_client.uninstall()
    assert p.wait() == 3
    q = EarlyPopen(["true"])  # after uninstall: a local child again
    assert q.pid not in [pid for pid, _ in children_of(installed.pid)]
    assert q.wait() == 0


def test_os_system_and_waitpid(installed: Daemon) -> None:
    spawnd_client.install()
    assert os.system("exit 3") == 3 << 8
    assert os.system("kill -TERM $$") == 15
    pid = os.spawnlp(os.P_NOWAIT, "sh", "sh", "-c", "sleep 0.5; exit 4")
    assert pid in [p for p, _ in children_of(installed.pid)]
    assert os.waitpid(pid, 0) == (pid, 4 << 8)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, 0)  # reaped, as the stdlib says after a waitpid


def test_fence_names_the_call_site(installed: Daemon) -> None:
    spawnd_client.install(forbid_fork=True)
    for call in (os.fork, lambda: os.posix_spawn("/bin/true", ["true"], {}),
                 lambda: os.forkpty()):
        with pytest.raises(inst.ForkForbidden, match=r"test_install\.py:\d+ in "):
            call()
    assert subprocess.run(["true"]).returncode == 0  # the daemon's way still works


def test_asyncio_subprocess(installed: Daemon) -> None:
    """asyncio.create_subprocess_exec (the async face) under install."""
    spawnd_client.install()

    async def main() -> tuple[bytes, int, int]:
        p = await asyncio.create_subprocess_exec("sh", "-c", "echo $PPID; exit 5",
                                                 stdout=asyncio.subprocess.PIPE)
        out, _ = await p.communicate()
        return out, p.returncode, p.pid

    out, rc, pid = asyncio.run(main())
    assert rc == 5
    assert int(out) == installed.pid  # the daemon is its parent


def test_preexec_fn_refused_clearly(installed: Daemon) -> None:
    spawnd_client.install()
    with pytest.raises(ValueError, match="preexec_fn is not supported.*posix_spawn"):
        subprocess.Popen(["true"], preexec_fn=lambda: None)
