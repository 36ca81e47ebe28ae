"""Least privilege, end to end: a root daemon with a policy file, clients running as other
users (``setpriv``), and the children they get, inspected through ``/proc``.

The trampoline itself is unit-tested in ``test_privileged.py``; here every request goes
through the real socket, ``SO_PEERCRED``, the policy and the server, exactly as a user's
program would send it.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import spawnd_client as sc
from conftest import Daemon, children_of, wait_until
from secutil import (
    Accounts,
    ClientLib,
    daemon_env,
    finish,
    missing_prerequisite,
    start_root_daemon,
    write_policy,
)

from spawnd import caps

pytestmark = pytest.mark.skipif(missing_prerequisite() is not None,
                                reason=missing_prerequisite() or "")

NET = "CAP_NET_BIND_SERVICE"
NET_MASK = caps.mask([NET])  # 0x400
CAT = "/usr/bin/cat"
PY3 = "/usr/bin/python3"

# A child that tries to bind a privileged port and says how it went.
BIND = ("import errno, socket, sys\n"
        "s = socket.socket()\n"
        "try:\n"
        "    s.bind(('127.0.0.1', int(sys.argv[1])))\n"
        "    print('bound')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["c", "python"])
def exec_helper(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs against the C exec helper and its Python fallback."""
    from spawnd.exec_helper import build

    if request.param == "c" and not build.ensure_built():
        pytest.skip("no C compiler: the C exec helper cannot be built")
    return request.param


@pytest.fixture
def daemons(accounts: Accounts, shared: Path,
            exec_helper: str) -> Iterator[Callable[..., Daemon]]:
    """Start root daemons (``start(policy_text_or_None, env=...)``) on sockets 0660 for the
    test users' group; each must stop cleanly, without a traceback in its log."""
    started: list[Daemon] = []
    counter = iter(range(1000))

    def start(policy: str | None, **kw: Any) -> Daemon:
        kw.setdefault("exec_helper", exec_helper)
        d = start_root_daemon(shared, policy, name=f"d{os.getpid()}-{next(counter)}.sock",
                              **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop_cleanly()


def status(text: str) -> dict[str, str]:
    return caps.parse_status(text)


def ids(line: str) -> list[int]:
    return [int(x) for x in line.split()]


def assert_refused(r: dict[str, Any], code: int, stage: str, field: str | None) -> None:
    assert r.get("errno") == code, r
    assert r["stage"] == stage, r
    if field is not None:
        assert r["field"] == field, r
    if code == errno.EPERM:
        assert r["type"] == "PermissionError", r


def users_rule(*names: str, **extra: Any) -> str:
    """One [[allow]] table for ``names``; ``extra`` values are TOML literals."""
    lines = ["[[allow]]", f"users = [{', '.join(repr(n) for n in names)}]"]
    extra.setdefault("executables", '["/usr/bin/"]')
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def toml_list(*items: str) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


# ---------------------------------------------------------------------------- 1. connect

def test_unlisted_uid_cannot_connect(accounts: Accounts, clients: ClientLib,
                                     daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    d = daemons(users_rule(a.name, name='"a only"'))
    st = os.stat(d.path)
    # The filesystem is the first gate (0660, the shared group); the policy the second.
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, accounts.gid)

    listed = clients.run(a, d.path, "result['ping'] = attempt(lambda: connect().ping())\n"
                                    "result['id'] = run(['/usr/bin/id', '-u'], connect())")
    assert "ok" in listed["ping"], listed
    assert listed["id"] == {"rc": 0, "out": f"{a.uid}\n", "err": ""}

    code = ("result['connect'] = attempt(connect)\n"
            "c = sc.Client(SOCK, autostart=False)\n"
            "result['run'] = attempt(lambda: sc.run(['/usr/bin/true'], client=c) and None)\n"
            "result['again'] = attempt(lambda: c.spawn(['/usr/bin/true']) and None)\n"
            # The refusal races the handshake (the daemon answers at accept and closes):
            # whichever side gets there first, the client must say EPERM, every time.
            "many = [attempt(lambda: sc.Client(SOCK, autostart=False).ping())['name']\n"
            "        for _ in range(50)]\n"
            "result['many'] = sorted(set(many))\n")
    refused = clients.run(b, d.path, code)
    assert refused["many"] == ["EPERM"], refused
    for what in ("connect", "run", "again"):  # at connect, and on every later try
        assert_refused(refused[what], errno.EPERM, "policy", None)
        assert f"uid {b.uid} may not use this daemon" in refused[what]["message"]


async def test_refused_uid_gets_eperm_from_both_clients(accounts: Accounts,
                                                        daemons: Callable[..., Daemon]) -> None:
    """Root is not listed either: the blocking and the async client both raise
    PermissionError, whichever of handshake and refusal wins the race, every time."""
    d = daemons(users_rule(accounts.a.name))
    for _ in range(20):
        with pytest.raises(PermissionError, match="uid 0 may not use this daemon") as info:
            sc.Client(d.path, autostart=False).ping()
        assert info.value.stage == "policy"  # type: ignore[attr-defined]
        with pytest.raises(PermissionError, match="uid 0 may not use this daemon"):
            async with sc.AsyncClient(d.path, autostart=False) as c:
                await c.spawn(["/usr/bin/true"])


# ---------------------------------------------------------------------------- 2. users

RUN_AS = """
c = connect()
result['status'] = run(['/usr/bin/cat', '/proc/self/status'], c, user=P['uid'])
for key, kw in P['refused'].items():
    result[key] = attempt(lambda: sc.run(['/usr/bin/true'], client=c, env={}, **kw) and None)
# pkexec's CVE-2021-4034: an empty argv, here with a uid change, never reaches exec.
result['empty_argv'] = attempt(raw, c, 'Spawn', argv=(), env=(), executable=b'/usr/bin/true',
                               user=P['uid'])
"""


def test_cannot_run_as_another_user_without_a_rule(accounts: Accounts, clients: ClientLib,
                                                  daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    d = daemons(users_rule(a.name, b.name))
    r = clients.run(a, d.path, RUN_AS, uid=a.uid, refused={
        "as_b": {"user": b.uid}, "as_root": {"user": 0},
        "root_group": {"group": 0}, "root_extra": {"extra_groups": [a.gid, 0]},
        "b_group": {"group": b.gid}})
    assert ids(status(r["status"]["out"])["Uid"]) == [a.uid] * 4  # as itself: fine
    assert_refused(r["as_b"], errno.EPERM, "policy", "user")
    assert f"may not run a child as uid {b.uid}" in r["as_b"]["message"]
    assert_refused(r["as_root"], errno.EPERM, "policy", "user")
    assert_refused(r["root_group"], errno.EPERM, "policy", "group")
    assert_refused(r["root_extra"], errno.EPERM, "policy", "extra_groups[1]")
    assert_refused(r["b_group"], errno.EPERM, "policy", "group")
    assert_refused(r["empty_argv"], errno.EINVAL, "protocol", "argv")


def test_run_as_rule_lets_a_run_as_b_and_the_child_really_is_b(
        accounts: Accounts, clients: ClientLib, daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    d = daemons(users_rule(a.name, run_as_users=toml_list(b.name)))
    r = clients.run(a, d.path, RUN_AS, uid=b.uid, refused={"as_root": {"user": 0}})
    st = status(r["status"]["out"])
    assert ids(st["Uid"]) == [b.uid] * 4
    assert ids(st["Gid"]) == [b.gid] * 4
    assert sorted(ids(st["Groups"])) == sorted(b.groups)  # b's own, neither a's nor root's
    assert caps.cap_sets(st) == caps.CapSets(0, 0, 0, 0, 0)
    assert_refused(r["as_root"], errno.EPERM, "policy", "user")


def test_no_policy_file_runs_each_client_as_itself(accounts: Accounts, clients: ClientLib,
                                                   daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    d = daemons(None)
    r = clients.run(a, d.path, RUN_AS, uid=None, refused={
        "as_root": {"user": 0}, "as_b": {"user": b.uid}, "caps": {"capabilities": [NET]}})
    st = status(r["status"]["out"])
    assert ids(st["Uid"]) == [a.uid] * 4  # never root
    assert ids(st["Gid"]) == [a.gid] * 4
    assert sorted(ids(st["Groups"])) == sorted(a.groups)
    assert caps.cap_sets(st) == caps.CapSets(0, 0, 0, 0, 0)
    assert_refused(r["as_root"], errno.EPERM, "policy", "user")
    assert_refused(r["as_b"], errno.EPERM, "policy", "user")
    assert_refused(r["caps"], errno.EPERM, "policy", "capabilities[0]")


# ---------------------------------------------------------------------------- 3. capabilities

def privileged_port() -> int:
    """A port below ip_unprivileged_port_start that nothing uses on 127.0.0.1 (80 first)."""
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        start = 1024
    for port in [80, *range(81, min(start, 1024))]:
        if port >= start:
            break
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    pytest.skip(f"no free port below ip_unprivileged_port_start={start}: "
                "every user may bind low ports here")


CAPS = """
c = connect()
for key, kw in P['runs'].items():
    argv = kw.pop('argv')
    result[key] = attempt(run, argv, c, **kw)
"""


def test_net_bind_service_granted_exactly(accounts: Accounts, clients: ClientLib,
                                          daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    port = privileged_port()
    d = daemons(users_rule(a.name, capabilities=toml_list(NET),
                           run_as_users=toml_list(b.name)))
    bind = [PY3, "-c", BIND, str(port)]
    status_argv = [CAT, "/proc/self/status"]
    r = clients.run(a, d.path, CAPS, runs={
        "bind_cap": {"argv": bind, "capabilities": [NET]},
        "bind_cap_b": {"argv": bind, "capabilities": [NET], "user": b.uid},
        "bind_nocap": {"argv": bind},
        "status_cap": {"argv": status_argv, "capabilities": ["net_bind_service"]},
        "status_nocap": {"argv": status_argv},
        "not_granted": {"argv": status_argv, "capabilities": [NET, "CAP_SYS_ADMIN"]},
        "unknown": {"argv": status_argv, "capabilities": ["CAP_FLY"]},
    })
    assert r["bind_cap"]["ok"] == {"rc": 0, "out": "bound\n", "err": ""}, r
    assert r["bind_cap_b"]["ok"] == {"rc": 0, "out": "bound\n", "err": ""}, r
    assert r["bind_nocap"]["ok"] == {"rc": 0, "out": "EACCES\n", "err": ""}, r
    st = status(r["status_cap"]["ok"]["out"])
    assert ids(st["Uid"]) == [a.uid] * 4
    assert {k: st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), f"{NET_MASK:016x}")
    st = status(r["status_nocap"]["ok"]["out"])
    assert caps.cap_sets(st) == caps.CapSets(0, 0, 0, 0, 0)
    assert_refused(r["not_granted"], errno.EPERM, "policy", "capabilities[1]")
    assert_refused(r["unknown"], errno.EINVAL, "policy", "capabilities[0]")


# ---------------------------------------------------------------------------- 4. environment

def test_dangerous_env_refused_when_the_child_gains_privilege(
        accounts: Accounts, clients: ClientLib, daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    d = daemons(users_rule(a.name, capabilities=toml_list(NET), run_as_users=toml_list(b.name)))
    cases: dict[str, dict[str, Any]] = {}
    for name in ("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "GCONV_PATH", "GLIBC_TUNABLES",
                 "NOTIFY_SOCKET", "LISTEN_FDS", "PYTHONPATH", "BASH_ENV"):
        env = {"PATH": "/usr/bin", "LANG": "C", name: "/tmp/evil"}
        cases[f"{name}/user"] = {"argv": ["/usr/bin/env"], "env": env, "user": b.uid}
        cases[f"{name}/caps"] = {"argv": ["/usr/bin/env"], "env": env, "capabilities": [NET]}
    # Not elevated (a as itself, no capabilities): a could set these itself.
    cases["plain"] = {"argv": ["/usr/bin/env"], "env": {"LD_LIBRARY_PATH": "/nonexistent"}}
    r = clients.run(a, d.path, CAPS, runs=cases)
    for key, got in r.items():
        if key == "plain":
            assert got["ok"] == {"rc": 0, "out": "LD_LIBRARY_PATH=/nonexistent\n", "err": ""}
            continue
        assert_refused(got, errno.EPERM, "policy", "env[2]")
        assert key.split("/")[0] in got["message"], got


# ---------------------------------------------------------------------------- 5. rlimits

def test_rlimits_applied(accounts: Accounts, clients: ClientLib,
                         daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    d = daemons(users_rule(a.name, run_as_users=toml_list(b.name)))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # the daemon inherits ours
    limits = [CAT, "/proc/self/limits"]
    r = clients.run(a, d.path, CAPS, runs={
        "a": {"argv": limits, "rlimits": {"NOFILE": [64, 64], "CORE": [0, 0]}},
        "b": {"argv": limits, "rlimits": {"RLIMIT_NOFILE": [32, 48]}, "user": b.uid},
        "raise": {"argv": limits, "rlimits": {"NOFILE": [64, hard + 1]}},
        "bad": {"argv": limits, "rlimits": {"NOFILE": [65, 64]}},
        "unknown": {"argv": limits, "rlimits": {"WINGS": [1, 1]}},
    })

    def limit(out: str, what: str) -> list[str]:
        line = next(ln for ln in out.splitlines() if ln.startswith(what))
        return line[len(what):].split()[:2]

    assert limit(r["a"]["ok"]["out"], "Max open files") == ["64", "64"]
    assert limit(r["a"]["ok"]["out"], "Max core file size") == ["0", "0"]
    assert limit(r["b"]["ok"]["out"], "Max open files") == ["32", "48"]
    # Beyond the hard limit, as the child's user: refused synchronously, by the kernel.
    assert_refused(r["raise"], errno.EPERM, "rlimits", None)
    assert_refused(r["bad"], errno.EINVAL, "policy", "rlimits.NOFILE")
    assert_refused(r["unknown"], errno.EINVAL, "policy", "rlimits.WINGS")


# ---------------------------------------------------------------------------- 6. max_children

LIMITED = """
import threading
conns = [connect() for _ in range(3)]
out = [None] * 3

def start(i):
    # Three connections at once, through the trampoline (rlimits): spawns in flight count.
    out[i] = attempt(lambda: conns[i].spawn(['/usr/bin/sleep', '60'], env={},
                                            rlimits={'NOFILE': (64, 64)},
                                            on_disconnect='keep').pid)

threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
result['first'] = out
"""


def test_max_children_per_uid(accounts: Accounts, clients: ClientLib,
                              daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    d = daemons(users_rule(a.name, max_children=2) + users_rule(b.name, max_children=2))
    first = clients.run(a, d.path, LIMITED)["first"]
    pids = [x["ok"] for x in first if "ok" in x]
    refused = [x for x in first if "ok" not in x]
    assert len(pids) == 2 and len(refused) == 1, first
    assert_refused(refused[0], errno.EAGAIN, "limit", None)
    assert "max_children" in refused[0]["message"]
    try:
        # The children outlived their client (on_disconnect="keep"): the limit is per uid,
        # not per connection, so a new connection of a's is refused too; b is not a.
        again = "c = connect()\nresult['r'] = attempt(run, ['/usr/bin/true'], c)\n"
        assert_refused(clients.run(a, d.path, again)["r"], errno.EAGAIN, "limit", None)
        assert clients.run(b, d.path, again)["r"]["ok"]["rc"] == 0
        # Nor may b signal a's children (orphaned or not, they are not b's to touch): a signal
        # names a child by the spawn request that started it on the sender's own connection,
        # so a's children cannot even be named by b (ids 1-3 were a's spawns).
        kill = ("c = connect()\n"
                "result['r'] = [attempt(raw, c, 'Signal', child=i, signal=9)"
                " for i in (1, 2, 3)]\n")
        for r in clients.run(b, d.path, kill)["r"]:
            assert_refused(r, errno.ESRCH, "policy", "child")
        assert pids[0] in dict(children_of(d.pid))
        # One exits: a may spawn again (one at a time: the other sleep is still live).
        os.kill(pids[0], signal.SIGKILL)
        assert wait_until(lambda: pids[0] not in dict(children_of(d.pid)))
        assert clients.run(a, d.path, again)["r"]["ok"]["rc"] == 0
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        d.settle()


# ---------------------------------------------------------------------------- 7. executables

EXEC = """
c = connect()
for key, kw in P['runs'].items():
    argv = kw.pop('argv')
    result[key] = attempt(run, argv, c, **kw)
"""


@pytest.fixture
def exec_tree(shared: Path) -> Iterator[Path]:
    """allowed/{prog (a copy of echo), link-out -> /usr/bin/id, script.sh}, outside/..."""
    root = shared / f"exec-{os.getpid()}"
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir(parents=True)
    outside.mkdir()
    for p in (root, allowed, outside):
        p.chmod(0o755)
    shutil.copy2("/usr/bin/echo", allowed / "prog")
    (allowed / "link-out").symlink_to("/usr/bin/id")
    (allowed / "script.sh").write_text("#!/bin/sh\necho script\n")
    (allowed / "script.sh").chmod(0o755)
    shutil.copy2("/usr/bin/id", outside / "id")
    (outside / "link-in").symlink_to(allowed / "prog")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_executables_are_checked_where_they_really_are(
        accounts: Accounts, clients: ClientLib, daemons: Callable[..., Daemon],
        exec_tree: Path) -> None:
    a, b = accounts.a, accounts.b
    allowed, outside = exec_tree / "allowed", exec_tree / "outside"
    d = daemons(users_rule(a.name, executables=toml_list(f"{allowed}/"),
                           run_as_users=toml_list(b.name), allow_scripts="false"))
    r = clients.run(a, d.path, EXEC, runs={
        "prog": {"argv": [str(allowed / "prog"), "hi"]},
        "prog_b": {"argv": [str(allowed / "prog"), "hi"], "user": b.uid},
        "by_path": {"argv": ["prog", "hi"], "env": {"PATH": str(allowed)}},
        "link_in": {"argv": [str(outside / "link-in"), "in"]},
        "link_out": {"argv": [str(allowed / "link-out")]},
        "link_out_b": {"argv": [str(allowed / "link-out")], "user": b.uid},
        "dotdot": {"argv": [f"{allowed}/../outside/id"]},
        "outside": {"argv": ["/usr/bin/id"]},
        "script": {"argv": [str(allowed / "script.sh")]},
    })
    for key, word in (("prog", "hi"), ("prog_b", "hi"), ("by_path", "hi"), ("link_in", "in")):
        assert r[key]["ok"] == {"rc": 0, "out": f"{word}\n", "err": ""}, (key, r[key])
    real_id = os.path.realpath("/usr/bin/id")
    for key in ("link_out", "link_out_b", "outside"):  # checked where the symlink points
        assert_refused(r[key], errno.EPERM, "policy", "argv[0]")
        assert repr(real_id) in r[key]["message"], r[key]
    assert_refused(r["dotdot"], errno.EPERM, "policy", "argv[0]")
    assert repr(str(outside / "id")) in r["dotdot"]["message"]
    assert_refused(r["script"], errno.EPERM, "policy", "argv[0]")
    assert "script" in r["script"]["message"]


SWAP = """
c = connect()
out = []
for i in range(P['n']):
    kw = {'user': P['b']} if i % 2 else {}  # plain-credential and run-as paths alike
    r = attempt(run, [P['prog'], 'original'], c, **kw)
    out.append(r['ok']['out'] if 'ok' in r else r.get('name'))
result['outcomes'] = out
"""


def test_executable_swapped_around_the_check_never_runs(
        accounts: Accounts, clients: ClientLib, daemons: Callable[..., Daemon],
        exec_tree: Path) -> None:
    """While a's client runs allowed/prog over and over, root keeps swapping that path
    between the real program and a symlink to a program outside the allowed directory.
    Each spawn must either run the checked file or be refused: never the other program.

    Whether a swap lands between a given check and exec is up to the scheduler, so this
    test cannot prove the window is closed on every run; the deterministic proof that the
    checked fd is what runs is ``test_privileged.test_swapped_path_still_runs_the_checked_file``
    (and the plain path executes ``/proc/<daemon>/fd/N``, see ``spawner.spawn``).
    """
    a, b = accounts.a, accounts.b
    allowed = exec_tree / "allowed"
    prog = allowed / "prog"
    d = daemons(users_rule(a.name, executables=toml_list(f"{allowed}/"),
                           run_as_users=toml_list(b.name)))
    real = allowed / ".real"
    os.link(prog, real)
    stop = threading.Event()

    def swapper() -> None:
        flip = False
        while not stop.is_set():
            tmp = allowed / ".tmp"
            if flip:
                os.link(real, tmp)
            else:
                tmp.symlink_to("/usr/bin/id")
            os.replace(tmp, prog)
            flip = not flip
            stop.wait(0.0005)

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    try:
        outcomes = clients.run(a, d.path, SWAP, n=40, prog=str(prog), b=b.uid)["outcomes"]
    finally:
        stop.set()
        t.join()
    # EPERM: the policy saw the symlink to id; EACCES: the exec helper, opening the path again
    # as the target user, found another file than the one checked.
    assert set(outcomes) <= {"original\n", "EPERM", "EACCES"}, outcomes


# ---------------------------------------------------------------------------- 8. daemon env

def test_child_env_never_comes_from_the_daemon(accounts: Accounts, clients: ClientLib,
                                               daemons: Callable[..., Daemon]) -> None:
    a = accounts.a
    env = dict(os.environ, SPAWND_DAEMON_SECRET="1", LD_PRELOAD="", TZ="daemon")
    d = daemons(users_rule(a.name, capabilities=toml_list(NET))
                + '[[allow]]\nuids = [0]\nexecutables = ["/usr/bin/"]\n', env=env)
    environ = [CAT, "/proc/self/environ"]
    r = clients.run(a, d.path, CAPS, runs={
        "empty": {"argv": environ, "env": {}},
        "caps": {"argv": environ, "env": {}, "capabilities": [NET]},
        "given": {"argv": environ, "env": {"X": "1"}},
        "own": {"argv": environ, "env": None},  # the client's environment, sent explicitly
    })
    assert r["empty"]["ok"]["out"] == ""
    assert r["caps"]["ok"]["out"] == ""
    assert r["given"]["ok"]["out"] == "X=1\0"
    own = dict(e.split("=", 1) for e in r["own"]["ok"]["out"].split("\0") if e)
    assert own == clients.env()
    # The plain posix_spawn path (a root client asking for nothing) too.
    root_client = sc.Client(d.path, autostart=False)
    d.clients.append(root_client)
    assert sc.check_output(environ, env={}, client=root_client) == b""


# ---------------------------------------------------------------------------- 9. fd table

LIST_FDS = ["/bin/sh", "-c", "ls /proc/$$/fd"]

FDS = """
c = connect()
r, w = os.pipe()
os.dup2(w, 9)
out = {}
for key, kw in P['runs'].items():
    out[key] = attempt(run, P['argv'], c, pass_fds=[9] if kw.pop('fd', False) else [], **kw)
result.update(out)
"""


def start_activated_daemon(shared: Path, policy: Path, group: str) -> Daemon:
    """``spawnd serve`` socket-activated: its listening socket arrives as an inheritable fd 3
    (as systemd passes it), the one a child would most likely inherit by mistake."""
    path = str(shared / f"act-{os.getpid()}.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    log = shared / f"act-{os.getpid()}.log"
    env = daemon_env(dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="spawnd",
                          FD=str(lsock.fileno())))
    # The wrapper puts the socket on fd 3 and names its own pid (exec keeps it) LISTEN_PID.
    wrapper = ("import os, sys\n"
               "fd = int(os.environ.pop('FD'))\n"
               "os.dup2(fd, 3)\n"
               "os.close(fd)\n"
               "os.environ['LISTEN_PID'] = str(os.getpid())\n"
               "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, "-m", "spawnd", "serve",
         "--group", group, "--config", str(policy), "--log-level", "debug"],
        pass_fds=[lsock.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"), env=env)
    lsock.close()
    d = Daemon(path, proc, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        return "ready" in log.read_text()

    assert wait_until(up, 15), log.read_text()
    return d


def test_child_fd_table_is_exactly_what_was_granted(
        accounts: Accounts, clients: ClientLib, shared: Path) -> None:
    a, b = accounts.a, accounts.b
    policy = write_policy(shared, users_rule(a.name, b.name, capabilities=toml_list(NET),
                                             run_as_users=toml_list(b.name))
                          + "[[allow]]\nuids = [0]\nexecutables = [\"/\"]\n", "fds.toml")
    d = start_activated_daemon(shared, policy, accounts.group)
    busy: list[subprocess.Popen] = []
    flag = shared / f"fds-{os.getpid()}.done"
    try:
        assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o660
        # Several other clients connected, some with live children (pidfds in the daemon).
        hold = ("c1 = connect(); c2 = connect()\n"
                "kids = [c1.spawn(['/usr/bin/sleep', '30'], env={}) for _ in range(2)]\n"
                "while not os.path.exists(P['flag']):\n"
                "    time.sleep(0.02)\n")
        for _ in range(3):
            busy.append(clients.start(b, d.path, hold, flag=str(flag)))
        roots = [d.client() for _ in range(3)]
        for c in roots:
            c.ping()
        assert wait_until(lambda: len(children_of(d.pid)) >= 6), children_of(d.pid)
        assert roots[0].ping()["connections"] >= 3 * 2 + 3
        assert "socket-activated" in d.log.read_text()
        assert stat.S_ISSOCK(os.stat(f"/proc/{d.pid}/fd/3").st_mode)  # the listener, fd 3

        r = clients.run(a, d.path, FDS, argv=LIST_FDS, runs={
            "as_a": {}, "as_a_fd": {"fd": True},
            "as_b_caps": {"user": b.uid, "capabilities": [NET], "fd": True},
            "rlimits": {"rlimits": {"NOFILE": [64, 64]}, "fd": True}})
        for key, got in r.items():
            want = [0, 1, 2, 9] if key != "as_a" else [0, 1, 2]
            assert sorted(map(int, got["ok"]["out"].split())) == want, (key, got)
        # The plain posix_spawn path (root asking for nothing), with the same crowd.
        out = sc.check_output(LIST_FDS, client=roots[0], stdin=sc.DEVNULL)
        assert sorted(map(int, out.split())) == [0, 1, 2]
    finally:
        flag.touch()
        for p in busy:
            finish(p)
        d.stop_cleanly()


# ---------------------------------------------------------------------------- 10. logs

def test_refusals_are_logged_with_the_peer_uid(accounts: Accounts, clients: ClientLib,
                                               daemons: Callable[..., Daemon]) -> None:
    a, b = accounts.a, accounts.b
    d = daemons(users_rule(a.name, max_children=0))
    clients.run(b, d.path, "result['r'] = attempt(connect)\n")
    clients.run(a, d.path, "c = connect()\n"
                           "result['r'] = attempt(run, ['/usr/bin/true'], c)\n")
    d2 = daemons(users_rule(a.name))
    r = clients.run(a, d2.path, "c = connect()\n"
                                "result['r'] = attempt(run, ['/usr/bin/true'], c, user=0)\n")
    assert_refused(r["r"], errno.EPERM, "policy", "user")
    log = d.stop_cleanly()
    assert f"refused connection from uid {b.uid}" in log, log
    assert f"refused spawn for uid {a.uid}: uid {a.uid} already has 0 live children" in log, log
    log2 = d2.stop_cleanly()
    assert f"policy refused spawn for uid {a.uid}: uid {a.uid} may not run a child as uid 0" \
        in log2, log2
