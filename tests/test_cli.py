"""The ``spawnd`` command line, through the real entry point (issue 15, points 3-5, 7).

Every ordinary mistake must give a non-zero exit and exactly one line on stderr naming what
is at fault, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import secutil
from conftest import REPO, Daemon, start_daemon, wait_until

from spawnd import cli
from spawnd.status import version

# The console script pip installed beside this interpreter; else the module (same main()).
_SCRIPT = Path(sys.executable).parent / "spawnd"
SPAWND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "spawnd"]


def spawnd(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
           **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, SPAWND_AUTOSTART="0", PYTHONPATH=f"{REPO}:{REPO / 'client'}")
    e.update(env or {})
    return subprocess.run([*SPAWND, *args], capture_output=True, text=True, env=e,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# -- point 3: ordinary mistakes
def test_ping_without_daemon(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    r = spawnd("ping", "--socket", sock)
    one_line_error(r, sock)
    assert r.returncode == 1


def test_run_without_daemon_blames_the_daemon_not_the_command(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    r = spawnd("run", "--", "true", env={"SPAWND_SOCKET": sock})
    line = one_line_error(r, sock)
    assert "true:" not in line
    assert r.returncode == 125


@pytest.mark.parametrize("args, words", [
    (["--log-level", "bogus"], ["--log-level", "bogus"]),
    (["--pool-max", "-1"], ["--pool-max", "-1"]),
    (["--pool-max", "many"], ["--pool-max", "many"]),
    (["--stop-grace", "-3"], ["--stop-grace"]),
    (["--idle-exit", "nan"], ["--idle-exit"]),
    (["--handshake-timeout", "0"], ["--handshake-timeout"]),
    (["--group", "no-such-group-xyz"], ["--group", "no-such-group-xyz"]),
    (["--socket", "@abstract"], ["--socket"]),
    (["--socket", "/tmp/" + "x" * 200], ["--socket"]),
])
def test_bad_serve_options_are_usage_errors(args: list[str], words: list[str]) -> None:
    r = spawnd("serve", *args)
    one_line_error(r, "spawnd serve: error:", *words)
    assert r.returncode == 2


def test_unknown_command_is_one_line() -> None:
    r = spawnd("frobnicate")
    one_line_error(r, "frobnicate")
    assert r.returncode == 2


def test_serve_socket_in_proc_names_the_path() -> None:
    r = spawnd("serve", "--socket", "/proc/x.sock")
    one_line_error(r, "/proc/x.sock")


def test_serve_socket_under_missing_directory_creates_nothing(tmp_path: Path) -> None:
    sock = tmp_path / "missing" / "deeper" / "s.sock"
    r = spawnd("serve", "--socket", str(sock))
    one_line_error(r, str(sock), "does not exist")
    assert not (tmp_path / "missing").exists()


def _world_readable_tree(dest: Path) -> Path:
    """spawnd and the daemon's dependencies, readable by any user (ours may be under /root)."""
    import attr
    import idna
    import outcome
    import sniffio
    import sortedcontainers
    import trio

    lib = secutil.install_client_library(dest)  # spawnd_client, msgpack, a few spawnd modules
    shutil.rmtree(lib / "spawnd")
    shutil.copytree(REPO / "spawnd", lib / "spawnd", ignore=shutil.ignore_patterns("__pycache__"))
    for mod in (trio, outcome, sniffio, sortedcontainers, idna, attr):
        src = Path(mod.__file__).parent
        shutil.copytree(src, lib / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    attrs = Path(attr.__file__).parent.parent / "attrs"
    if attrs.is_dir():
        shutil.copytree(attrs, lib / "attrs", ignore=shutil.ignore_patterns("__pycache__"))
    for root, _dirs, files in os.walk(lib):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return lib




def test_serve_as_user_without_xdg_runtime_dir(accounts: secutil.Accounts) -> None:
    user = accounts.a
    assert not os.path.exists(f"/run/user/{user.uid}")
    d = secutil.make_shared_dir()
    try:
        lib = _world_readable_tree(d)
        r = subprocess.run(
            [secutil.SETPRIV, f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
             "--", secutil.SYSTEM_PYTHON, "-B", "-m", "spawnd", "serve"],
            capture_output=True, text=True, timeout=30, cwd="/",
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib), "MSGPACK_PUREPYTHON": "1",
                 "LANG": "C.UTF-8"})
    finally:
        shutil.rmtree(d)
    line = one_line_error(r, f"/run/user/{user.uid}", "XDG_RUNTIME_DIR")
    assert "--socket" in line


# -- point 4: version and help
def test_version() -> None:
    r = spawnd("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"spawnd {version()}"
    assert r.stdout.strip().split()[-1][0].isdigit()


def test_the_daemon_does_not_import_importlib_metadata() -> None:
    """Idle RSS (issue 12): the version is looked up only when asked for."""
    code = ("import sys; from spawnd import cli, server; cli.build_parser(); "
            "print('importlib.metadata' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.stdout.strip() == "False", r


def _parsers() -> list:
    import argparse

    top = cli.build_parser()
    out = [top]
    for a in top._actions:
        if isinstance(a, argparse._SubParsersAction):
            out += list(a.choices.values())
    return out


def test_every_option_has_help() -> None:
    import argparse

    missing = []
    for p in _parsers():
        for a in p._actions:
            if a.help == argparse.SUPPRESS or isinstance(a, argparse._SubParsersAction):
                continue
            if not a.help:
                missing.append(f"{p.prog} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


@pytest.mark.parametrize("cmd", ["", "serve", "run", "ping", "status", "check-config"])
def test_help_has_no_markup(cmd: str) -> None:
    r = spawnd(*([cmd] if cmd else []), "--help")
    assert r.returncode == 0, r.stderr
    assert "`" not in r.stdout and "**" not in r.stdout and ":class:" not in r.stdout, r.stdout
    assert "usage: spawnd" in r.stdout


# -- point 7: check-config
def test_example_policy_passes_its_own_check() -> None:
    r = spawnd("check-config", str(REPO / "examples" / "policy.toml"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # no warning either: it admits root, the daemon's uid
    assert r.stdout.strip().endswith(": OK")


def test_empty_policy_warns_it_admits_nobody(tmp_path: Path) -> None:
    p = tmp_path / "empty.toml"
    p.write_text("version = 1\n")
    r = spawnd("check-config", str(p))
    assert r.returncode == 0
    assert "admits uid 0" in r.stderr and "refuse every client" in r.stderr, r.stderr
    assert "warning" in r.stdout


def test_policy_not_admitting_the_daemon_uid_warns(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text('[[allow]]\nuids = [4242]\nexecutables = ["/usr/bin/"]\n')
    r = spawnd("check-config", str(p))
    assert r.returncode == 0
    assert "no rule admits uid 0" in r.stderr, r.stderr
    assert "refuse every client" not in r.stderr, r.stderr
    r = spawnd("check-config", "--daemon-uid", "4242", str(p))
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_policy_whose_groups_are_empty_admits_nobody(tmp_path: Path) -> None:
    import grp
    import pwd

    # a group with no members and nobody's primary group

    primaries = {pw.pw_gid for pw in pwd.getpwall()}
    empty = next((g.gr_name for g in grp.getgrall()
                  if not g.gr_mem and g.gr_gid not in primaries), None)
    if empty is None:
        pytest.skip("every group has a member here")
    p = tmp_path / "p.toml"
    p.write_text(f'[[allow]]\ngroups = ["{empty}"]\nexecutables = ["/usr/bin/"]\n')
    r = spawnd("check-config", str(p))
    assert r.returncode == 0
    assert "no existing user is selected" in r.stderr, r.stderr


# -- point 5: status
def status(daemon: Daemon, *extra: str) -> dict:
    r = spawnd("status", "--json", "--socket", daemon.path, *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_as_root(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        c = d.client()
        child = c.spawn(["sleep", "60"], on_disconnect="keep")
        try:
            c.spawn(["/no/such/program"])
        except FileNotFoundError:
            pass
        r = status(d)
        assert r["pid"] == d.pid
        assert r["version"] == version()
        assert r["uptime"] > 0 and "exec_helper" in r
        assert r["connections"] == 1  # our client; not the status request's own
        mine = [cl for cl in r["clients"] if not cl["this"]]
        assert len(mine) == 1 and mine[0]["pid"] == os.getpid() and mine[0]["uid"] == 0
        (ch,) = mine[0]["children"]
        assert ch["pid"] == child.pid and ch["argv0"] == "sleep"
        assert ch["on_disconnect"] == "keep" and ch["uid"] == 0 and ch["age"] >= 0
        assert r["total"]["spawns"] == 1 and r["total"]["exits"] == 0
        assert r["total"]["refusals"] == {"ENOENT": 1}
        text = spawnd("status", "--socket", d.path)
        assert text.returncode == 0 and "sleep" in text.stdout and "ENOENT 1" in text.stdout
        child.send_signal(9)
        child.wait(timeout=10)
        assert wait_until(lambda: status(d)["total"]["exits"] == 1)
        assert status(d)["children"] == 0
    finally:
        d.stop_cleanly()


STATUS_AS_USER = r'''
import json, subprocess, sys
c = connect()
child = c.spawn(["/bin/sleep", "60"])
r = subprocess.run([sys.executable, "-m", "spawnd", "status", "--json", "--socket", SOCK],
                   capture_output=True, text=True)
result["rc"] = r.returncode
result["err"] = r.stderr
result["report"] = json.loads(r.stdout) if r.returncode == 0 else None
result["child"] = child.pid
child.send_signal(9)
child.wait(timeout=10)
'''


def test_status_as_another_user_sees_only_its_own(accounts: secutil.Accounts) -> None:
    d_dir = secutil.make_shared_dir()
    d = secutil.start_root_daemon(d_dir, None, group=accounts.group)
    try:
        os.chmod(d.path, 0o666)  # default root policy: every uid as itself
        lib = secutil.install_client_library(d_dir)
        shutil.copy(REPO / "spawnd" / "status.py", lib / "spawnd" / "status.py")
        shutil.copy(REPO / "spawnd" / "cli.py", lib / "spawnd" / "cli.py")
        shutil.copy(REPO / "spawnd" / "__main__.py", lib / "spawnd" / "__main__.py")
        for f in ("status.py", "cli.py", "__main__.py"):
            os.chmod(lib / "spawnd" / f, 0o644)
        rootc = d.client()
        root_child = rootc.spawn(["sleep", "60"])
        b = secutil.ClientLib(lib).start(accounts.b, d.path, "c = connect()\n"
                                         "ch = c.spawn(['/bin/sleep', '60'])\n"
                                         "time.sleep(30)\n")
        try:
            assert wait_until(lambda: status(d)["children"] == 2, 20)
            res = secutil.ClientLib(lib).run(accounts.a, d.path, STATUS_AS_USER)
        finally:
            b.kill()
            b.wait()
        assert res["rc"] == 0, res["err"]
        rep = res["report"]
        assert rep["scope"] == f"uid {accounts.a.uid}"
        assert rep["children"] == 1
        listed = [ch for cl in rep["clients"] for ch in cl["children"]] + rep["detached"]
        assert [ch["pid"] for ch in listed] == [res["child"]]
        assert {cl["uid"] for cl in rep["clients"]} == {accounts.a.uid}
        assert set(rep["counters"]) == {str(accounts.a.uid)}
        assert rep["connections"] == 1  # its own other connection, not b's or root's
        # root sees all three uids' children at that time (b's may be gone by now)
        full = status(d)
        assert root_child.pid in [ch["pid"] for cl in full["clients"] for ch in cl["children"]]
        assert str(accounts.a.uid) in full["counters"] and str(accounts.b.uid) in full["counters"]
        root_child.send_signal(9)
        root_child.wait(timeout=10)
    finally:
        d.stop_cleanly()
        shutil.rmtree(d_dir, ignore_errors=True)


def test_status_without_daemon(tmp_path: Path) -> None:
    r = spawnd("status", "--socket", str(tmp_path / "no.sock"))
    one_line_error(r, str(tmp_path / "no.sock"))


def test_status_lists_every_child(tmp_path: Path) -> None:
    """Several children of one client: all listed under it, counted once."""
    d = start_daemon(tmp_path)
    try:
        c = d.client()
        kids = [c.spawn(["sleep", "60"]) for _ in range(20)]
        r = status(d)
        assert r["children"] == 20 and r["listed"] == 20
        (cl,) = [cl for cl in r["clients"] if not cl["this"]]
        assert sorted(ch["pid"] for ch in cl["children"]) == sorted(k.pid for k in kids)
        for k in kids:
            k.send_signal(9)
            k.wait(timeout=10)
    finally:
        d.stop_cleanly()
