"""A controlling terminal for a daemon-started child: ``spawnd run --pty`` (issue 11, part 4).

On main a spawnd child had no controlling terminal: ``/dev/tty`` was ENXIO, so password
prompts, pagers and ``read </dev/tty`` broke. Now the client opens a pty, the child gets
the slave as fds 0-2 and as its controlling terminal, and the client relays.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, Daemon

from spawnd import protocol as P

PROMPT = "read -p 'name? ' n </dev/tty; echo hi $n"


def _env(daemon: Daemon) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "client")])
    env["SPAWND_SOCKET"] = daemon.path
    env["SPAWND_AUTOSTART"] = "0"
    return env


def _run_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "spawnd", "run", *args]


def _poll(fn, what: str, timeout: float = 20.0) -> str:
    end = time.monotonic() + timeout
    while True:
        out = fn()
        if what in out:
            return out
        if time.monotonic() > end:
            raise AssertionError(f"{what!r} did not appear within {timeout}s:\n{out}")
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_interactive_prompt_under_tmux(daemon: Daemon, tmp_path: Path) -> None:
    """The issue's check: a prompt read from /dev/tty, answered by typing, in a real terminal."""
    session = f"spawnd-pty-{uuid.uuid4().hex[:8]}"
    env = _env(daemon)
    inner = " ".join(shlex.quote(a) for a in _run_cmd("--", "sh", "-c", PROMPT))
    shell = (f"env PYTHONPATH={shlex.quote(env['PYTHONPATH'])} "
             f"SPAWND_SOCKET={shlex.quote(daemon.path)} SPAWND_AUTOSTART=0 {inner}; "
             "echo rc=$?; sleep 60")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "20",
                    shell], check=True, env=env)
    try:
        def pane() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True).stdout

        _poll(pane, "name?")  # (tmux drops trailing blanks)
        subprocess.run(["tmux", "send-keys", "-t", session, "bob", "Enter"], check=True)
        out = _poll(pane, "rc=")
        assert "hi bob" in out and "rc=0" in out, out
        assert "No such device" not in out, out  # ENXIO: no controlling terminal
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.skipif(shutil.which("script") is None, reason="script (util-linux) is missing")
def test_automatic_pty_under_script(daemon: Daemon) -> None:
    """stdin and stdout are terminals (script's pty): --pty is the default."""
    inner = " ".join(shlex.quote(a) for a in _run_cmd(
        "--", "sh", "-c", PROMPT + "; test -t 0 && test -t 1 && echo ttys; exit 3"))
    r = subprocess.run(["script", "-q", "-e", "-c", inner, "/dev/null"], input="bob\n",
                       capture_output=True, text=True, env=_env(daemon), timeout=60)
    assert "hi bob" in r.stdout and "ttys" in r.stdout, (r.stdout, r.stderr)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)


def test_explicit_pty_without_a_terminal(daemon: Daemon) -> None:
    """--pty with piped stdio: the child still gets a terminal; our input ends as EOF."""
    r = subprocess.run(_run_cmd("--pty", "--", "sh", "-c", PROMPT + "; read m; echo eof=$?"),
                       input="bob\n", capture_output=True, text=True, env=_env(daemon),
                       timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "hi bob" in r.stdout and "eof=1" in r.stdout, r.stdout


def test_signal_to_the_relay_reaches_the_child(daemon: Daemon) -> None:
    p = subprocess.Popen(_run_cmd("--pty", "--", "sh", "-c", "echo up; exec sleep 60"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=_env(daemon))
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "up"
        p.terminate()
        assert p.wait(30) == 128 + 15
    finally:
        p.kill()
        p.wait()


def test_no_pty_when_not_asked_and_not_a_terminal(daemon: Daemon) -> None:
    """Piped stdio, no --pty: as before, the child has no controlling terminal."""
    r = subprocess.run(_run_cmd("--", "sh", "-c", "if (: </dev/tty) 2>/dev/null; then echo tty; else echo none; fi"),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env=_env(daemon), timeout=60)
    assert r.stdout.strip() == "none", (r.stdout, r.stderr)


def test_ctty_must_be_one_of_the_childs_fds() -> None:
    srv = P.Connection("server")
    cli = P.Connection("client")
    srv.receive_data(cli.send(P.Hello()) + cli.send(P.Spawn(id=1, argv=(b"x",), fds=(0,),
                                                            ctty=5)), (9,))
    srv.next_event()
    with pytest.raises(P.ProtocolError) as e:
        srv.next_event()
    assert e.value.field == "ctty"
