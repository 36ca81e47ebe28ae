"""Helpers for the end-to-end security tests: test users, a world-readable client library,
a root daemon with a policy file, and client programs run as another user with ``setpriv``.

The daemon runs as root with the project's interpreter; clients run as the test users with
Debian's ``/usr/bin/python3`` (the project's interpreter lives under /root, which they cannot
read) and a copy of ``spawnd_client`` plus the three ``spawnd`` modules it needs (not trio:
importing it would fail, which proves the client does not need it) and ``msgpack``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import REPO, Daemon, start_daemon

SYSTEM_PYTHON = "/usr/bin/python3"
# SPAWND_E2E_PREFIX: other names, so parallel runs on one machine do not delete each
# other's users.
_PREFIX = os.environ.get("SPAWND_E2E_PREFIX", "spawnd-e2e")
GROUP = f"{_PREFIX}-g"
USER_A = f"{_PREFIX}-a"
USER_B = f"{_PREFIX}-b"
SETPRIV = shutil.which("setpriv")
USERADD = shutil.which("useradd")

#: The only spawnd modules a client may need.
CLIENT_SPAWND_MODULES = ("__init__.py", "protocol.py", "paths.py", "fdpass.py")


def missing_prerequisite() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "end-to-end security tests create users and run a root daemon: must run as root"
    for tool in ("setpriv", "useradd", "userdel", "groupadd", "groupdel"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux / passwd)"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} (an interpreter other users can run) is missing"
    return None


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([self.gid, *os.getgrouplist(self.name, self.gid)]))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@dataclass
class Accounts:
    a: Account
    b: Account
    group: str
    gid: int


def make_accounts() -> Iterator[Accounts]:
    """Two system users in a shared group (the socket's); removed at the end if we made them."""
    created: list[list[str]] = []
    try:
        if _run(["getent", "group", GROUP]).returncode != 0:
            r = _run(["groupadd", "--system", GROUP])
            assert r.returncode == 0, r.stderr
            created.append(["groupdel", GROUP])
        accounts = []
        for name in (USER_A, USER_B):
            if _run(["id", name]).returncode != 0:
                r = _run(["useradd", "--system", "--no-create-home", "--shell",
                          "/usr/sbin/nologin", "-G", GROUP, name])
                assert r.returncode == 0, r.stderr
                created.insert(0, ["userdel", name])
            else:
                _run(["usermod", "-a", "-G", GROUP, name])
            pw = pwd.getpwnam(name)
            accounts.append(Account(name, pw.pw_uid, pw.pw_gid))
        yield Accounts(accounts[0], accounts[1], GROUP, grp.getgrnam(GROUP).gr_gid)
    finally:
        for cmd in created:  # users first, then the group
            _run(cmd)


def make_shared_dir() -> Path:
    """A root-owned 0755 directory every user can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="spawnd-e2e-", dir="/tmp"))
    d.chmod(0o755)
    return d


def install_client_library(dest: Path) -> Path:
    """Copy spawnd_client, the spawnd modules it needs and msgpack, world-readable."""
    lib = dest / "lib"
    shutil.copytree(REPO / "client" / "spawnd_client", lib / "spawnd_client",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (lib / "spawnd").mkdir()
    for name in CLIENT_SPAWND_MODULES:
        shutil.copy(REPO / "spawnd" / name, lib / "spawnd" / name)
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import msgpack"], capture_output=True)
    if probe.returncode != 0:  # pure-python fallback: no C extension for another build
        import msgpack

        src = Path(msgpack.__file__).parent
        shutil.copytree(src, lib / "msgpack",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (lib / "runner.py").write_text(RUNNER)
    for root, _dirs, files in os.walk(lib):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return lib


def write_policy(dest: Path, text: str, name: str = "policy.toml") -> Path:
    p = dest / name
    p.write_text(text)
    os.chown(p, 0, 0)
    p.chmod(0o644)
    return p


def start_root_daemon(dest: Path, policy: str | None, *, group: str = GROUP,
                      env: dict[str, str] | None = None, name: str = "spawnd.sock",
                      exec_helper: str | None = None) -> Daemon:
    """``spawnd serve`` as root on ``dest/name``, 0660 for ``group``, with ``policy`` text
    (and ``--exec-helper``: "c" or "python", when given)."""
    extra = ["--group", group]
    if exec_helper is not None:
        extra += ["--exec-helper", exec_helper]
    if policy is not None:
        extra += ["--config", str(write_policy(dest, policy, name + ".toml"))]
    return start_daemon(dest, *extra, env=daemon_env(env), name=name)


def daemon_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with this tree's packages first on the daemon's path."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "client"), *filter(None, [env.get("PYTHONPATH")])])
    return env


# The client program: runs as a test user. ``code`` (stdin) is executed with helpers and
# fills ``result``, printed as JSON. Expected failures are data: ``attempt`` turns an
# OSError into {"errno", "type", "stage", "field", "message"}.
RUNNER = r'''
import errno, json, os, sys, time
import spawnd_client as sc
from spawnd import protocol as proto

SOCK = sys.argv[1]
P = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
result = {}


def describe(e):
    return {"errno": e.errno, "name": errno.errorcode.get(e.errno or 0, ""),
            "type": type(e).__name__, "stage": getattr(e, "stage", None),
            "field": getattr(e, "field", None), "message": str(e)}


def attempt(fn, *args, **kw):
    try:
        return {"ok": fn(*args, **kw)}
    except OSError as e:
        return describe(e)


def connect():
    c = sc.Client(SOCK, autostart=False)
    c.ping()
    return c


def run(argv, client, **kw):
    """Run to completion: {"rc", "out", "err"} (text)."""
    kw.setdefault("env", {})
    r = sc.run(argv, capture_output=True, client=client, timeout=20, **kw)
    return {"rc": r.returncode, "out": r.stdout.decode(errors="replace"),
            "err": r.stderr.decode(errors="replace")}


def raw(client, event_type, **fields):
    """Send a hand-made request (what a hostile client could send), return the reply."""
    t = client.transport()
    reply = t.request(getattr(proto, event_type)(id=t.next_id(), **fields))
    return type(reply).__name__


g = {"sc": sc, "os": os, "time": time, "json": json, "SOCK": SOCK, "P": P, "result": result,
     "attempt": attempt, "describe": describe, "connect": connect, "run": run, "raw": raw}
exec(compile(sys.stdin.read(), "<client code>", "exec"), g)
print(json.dumps(result))
'''


class ClientLib:
    """Runs client code as a test user through ``setpriv``."""

    def __init__(self, lib: Path) -> None:
        self.lib = lib

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.lib),
                "MSGPACK_PUREPYTHON": "1", "SPAWND_AUTOSTART": "0", "LANG": "C.UTF-8"}

    def command(self, user: Account, sock: str, params: dict[str, Any]) -> list[str]:
        return [SETPRIV or "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                "--init-groups", "--", SYSTEM_PYTHON, "-B", str(self.lib / "runner.py"), sock,
                json.dumps(params)]

    def run(self, user: Account, sock: str, code: str, *, timeout: float = 30,
            **params: Any) -> dict[str, Any]:
        """Run ``code`` as ``user`` (``P`` holds ``params``); return its ``result``."""
        r = subprocess.run(self.command(user, sock, params), input=code, capture_output=True,
                           text=True, env=self.env(), cwd="/", timeout=timeout)
        assert r.returncode == 0, f"client as {user.name} failed:\n{r.stderr}"
        return json.loads(r.stdout.splitlines()[-1])

    def start(self, user: Account, sock: str, code: str, **params: Any) -> subprocess.Popen:
        """A client running in the background; :func:`finish` collects its result."""
        p = subprocess.Popen(self.command(user, sock, params), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=self.env(), cwd="/")
        assert p.stdin is not None
        p.stdin.write(code)
        p.stdin.close()
        p.stdin = None  # communicate() must not flush it again
        return p


def finish(p: subprocess.Popen, timeout: float = 30) -> dict[str, Any]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out.splitlines()[-1])

