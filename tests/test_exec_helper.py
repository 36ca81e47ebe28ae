"""The exec helper (spawnd-exec and its Python twin): namespaces, the controlling terminal,
each stage's own failure, the plain-path rule, the confused-deputy fix, root's user=.

Every helper test runs against both helpers. Needs root (creates users, changes uids).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import spawnd_client as sc
from conftest import Daemon
from secutil import (
    Accounts,
    ClientLib,
    missing_prerequisite,
    start_root_daemon,
)

from spawnd import caps, privileged, spawner
from spawnd.exec_helper import build
from spawnd.policy import Grant
from spawnd.spawner import SpawnError, SpawnSpec

pytestmark = pytest.mark.skipif(missing_prerequisite() is not None,
                                reason=missing_prerequisite() or "")

REPO = Path(__file__).resolve().parent.parent
SH = b"/bin/sh"


@pytest.fixture(params=["c", "python"])
def helper(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "c" and not build.ensure_built():
        pytest.skip("no C compiler")
    privileged.configure(request.param)
    yield request.param
    privileged.configure("auto")


@pytest.fixture
def daemons(accounts: Accounts, shared: Path, helper: str) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []
    counter = iter(range(1000))

    def start(policy: str | None) -> Daemon:
        d = start_root_daemon(shared, policy, name=f"x{os.getpid()}-{next(counter)}.sock",
                              exec_helper=helper)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop_cleanly()


def reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


async def sh(script: str, grant: Grant | None = None, **spec_kw: Any) -> tuple[int, str]:
    """Run ``sh -c script`` through the helper; return (exit code, stdout)."""
    grant = grant or Grant(executable=SH, argv=(), env=())
    exec_fd, _ = privileged.open_executable(SH)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    fd_map = spec_kw.pop("fd_map", ((out_w, 1),))
    spec = SpawnSpec(executable=SH, argv=(b"sh", b"-c", script.encode()),
                     env=(b"PATH=/usr/sbin:/usr/bin:/bin",), fd_map=fd_map, exec_fd=exec_fd,
                     **spec_kw)
    try:
        pid = await privileged.spawn_privileged(spec, grant)
    finally:
        os.close(exec_fd)
        os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        out = f.read().decode()
    return reap(pid), out


# ---------------------------------------------------------------------------- namespaces

@pytest.mark.parametrize("ns,proc", [("net", "net"), ("ipc", "ipc"), ("uts", "uts"),
                                     ("mount", "mnt"), ("user", "user")])
async def test_each_namespace_is_really_new(helper: str, ns: str, proc: str) -> None:
    rc, out = await sh(f"readlink /proc/self/ns/{proc}", namespaces=(ns,))
    assert rc == 0
    assert out.strip() and out.strip() != os.readlink(f"/proc/self/ns/{proc}")


async def test_new_net_namespace_has_only_lo(helper: str) -> None:
    rc, out = await sh("cat /proc/self/net/dev; command -v ip >/dev/null && ip -o link",
                       namespaces=("net",))
    assert rc == 0
    devices = {ln.split(":")[0].strip() for ln in out.splitlines()[2:] if ":" in ln
               and "|" not in ln and not ln[0].isdigit()}
    assert devices == {"lo"}, out
    if shutil.which("ip"):
        links = [ln for ln in out.splitlines() if ln[:1].isdigit()]
        assert len(links) == 1 and ": lo:" in links[0], out


async def test_new_mount_namespace_has_private_propagation(helper: str) -> None:
    rc, out = await sh("grep ' / / ' /proc/self/mountinfo", namespaces=("mount",))
    assert rc == 0 and out and "shared:" not in out, out


async def test_unprivileged_user_namespace_as_a_real_other_user(
        helper: str, accounts: Accounts) -> None:
    """The user namespace is made after the switch to the target user: the kernel's
    unprivileged rules apply, and the map is root inside -> that user outside."""
    a = accounts.a
    grant = Grant(executable=SH, argv=(), env=(), uid=a.uid, gid=a.gid, groups=(a.gid,))
    rc, out = await sh("id -u; cat /proc/self/uid_map /proc/self/gid_map /proc/self/setgroups;"
                       " readlink /proc/self/ns/net", grant, namespaces=("user", "net"))
    assert rc == 0, out
    lines = out.split("\n")
    assert lines[0] == "0"
    assert lines[1].split() == ["0", str(a.uid), "1"]
    assert lines[2].split() == ["0", str(a.gid), "1"]
    assert lines[3] == "deny"
    assert lines[4] != os.readlink("/proc/self/ns/net")


NS_POLICY = """
[[allow]]
users = ["{a}"]
executables = ["/usr/bin/", "/bin/"]
namespaces = ["net"]
"""

NS_CLIENT = """
c = connect()
def ns_run(name):
    r, w = os.pipe()
    try:
        child = c.spawn(['/usr/bin/readlink', '/proc/self/ns/' + name], fds={1: w}, env={},
                        namespaces=[name])
    finally:
        os.close(w)
    out = os.read(r, 200).decode()
    os.close(r)
    return {'rc': child.wait(), 'out': out}
result['net'] = attempt(ns_run, 'net')
result['uts'] = attempt(ns_run, 'uts')
from spawnd import protocol as proto
t = c.transport()
result['helper'] = t.request(proto.Ping(id=t.next_id())).exec_helper
"""


def test_namespace_grants_of_a_root_daemon(accounts: Accounts, clients: ClientLib,
                                           daemons: Callable[..., Daemon], helper: str) -> None:
    """Granted: a new net namespace for a user. Not granted: EPERM at once (stage policy)."""
    d = daemons(NS_POLICY.format(a=accounts.a.name))
    r = clients.run(accounts.a, d.path, NS_CLIENT)
    assert r["net"]["ok"]["rc"] == 0
    assert r["net"]["ok"]["out"].strip() != os.readlink("/proc/self/ns/net")
    assert (r["uts"]["errno"], r["uts"]["stage"], r["uts"]["field"]) == (
        errno.EPERM, "policy", "namespaces[0]"), r["uts"]
    assert r["helper"].startswith(helper + " ("), r["helper"]
    assert f"exec helper: {helper}" in d.log.read_text()


# ---------------------------------------------------------------------------- ctty

async def test_controlling_terminal(helper: str) -> None:
    master, slave = os.openpty()
    try:
        spec_fds = ((slave, 0), (slave, 1), (slave, 2))
        rc, _ = await sh("echo tty-ok >/dev/tty || exit 3; read -r p c s pp pg sid tty tpg r"
                         " </proc/$$/stat; [ $sid -eq $$ ] && [ $tpg -eq $$ ] || exit 4",
                         fd_map=spec_fds, ctty=0)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the slave side is closed everywhere
                break
            if not chunk:
                break
            out += chunk
        assert rc == 0, out
        assert b"tty-ok" in out
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


async def test_without_ctty_dev_tty_is_enxio(helper: str) -> None:
    rc, out = await sh("{ true </dev/tty; } 2>/dev/null && echo opened || echo refused",
                       setsid=True, grant=Grant(executable=SH, argv=(), env=(),
                                                no_new_privs=True))
    assert (rc, out) == (0, "refused\n")


# ---------------------------------------------------------------------------- each stage

async def expect(stage: str, code: int, grant: Grant | None = None, path: bytes = SH,
                 **spec_kw: Any) -> None:
    grant = grant or Grant(executable=path, argv=(), env=(), no_new_privs=True)
    exec_fd, _ = privileged.open_executable(path)
    before = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(SpawnError) as info:
            await privileged.spawn_privileged(
                SpawnSpec(executable=path, argv=(b"x",), env=(), exec_fd=exec_fd, **spec_kw),
                grant)
    finally:
        os.close(exec_fd)
    assert (info.value.stage, info.value.errno) == (stage, code), info.value
    assert no_children_left()
    assert len(os.listdir("/proc/self/fd")) == before - 1


async def test_stage_failures_as_root(helper: str, accounts: Accounts, tmp_path: Path) -> None:
    a = accounts.a
    user = Grant(executable=SH, argv=(), env=(), uid=a.uid, gid=a.gid, groups=(a.gid,))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    await expect("rlimits", errno.EINVAL, rlimits=((resource.RLIMIT_NOFILE, 10, 5),))
    await expect("affinity", errno.EINVAL, affinity=(1000,))
    await expect("groups", errno.EINVAL, Grant(executable=SH, argv=(), env=(), uid=a.uid,
                                               gid=a.gid, groups=tuple(range(70_000))))
    await expect("cwd", errno.ENOENT, user, cwd=b"/nonexistent")
    r, w = os.pipe()
    try:
        await expect("ctty", errno.ENOTTY, fd_map=((r, 0),), ctty=0)
    finally:
        os.close(r)
        os.close(w)
    data = tmp_path / "data"
    data.write_bytes(b"not a program")
    data.chmod(0o644)
    await expect("exec", errno.EACCES, path=os.fsencode(data))
    # As the user, after the switch: the kernel allows only what the child may do.
    await expect("rlimits", errno.EPERM, Grant(
        executable=SH, argv=(), env=(), uid=a.uid, gid=a.gid, groups=(a.gid,),
        rlimits={resource.RLIMIT_NOFILE: (soft, hard + 1)}))


# Stages the daemon's privilege makes succeed fail in a daemon without it: run the same
# spawns in a root process whose capabilities are gone (bounding set empty) or locked.
LIMITED = """
import json, os, sys, trio
from spawnd import privileged
from spawnd.policy import Grant
from spawnd.spawner import SpawnError, SpawnSpec
privileged.configure(sys.argv[1])
SH = b"/bin/sh"
cases = json.loads(sys.argv[2])
async def main():
    out = {}
    for name, (spec_kw, grant_kw) in cases.items():
        spec_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in spec_kw.items()}
        grant_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in grant_kw.items()}
        fd, _ = privileged.open_executable(SH)
        try:
            pid = await privileged.spawn_privileged(
                SpawnSpec(executable=SH, argv=(b"sh", b"-c", b"exit 0"), env=(), exec_fd=fd,
                          **spec_kw), Grant(executable=SH, argv=(), env=(), **grant_kw))
            os.waitpid(pid, 0)
            out[name] = "ran"
        except SpawnError as e:
            out[name] = [e.stage, e.errno]
        finally:
            os.close(fd)
    print(json.dumps(out))
trio.run(main)
"""


def run_limited(helper: str, setpriv: list[str], cases: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'client'}")
    r = subprocess.run(["setpriv", *setpriv, "--", sys.executable, "-c", LIMITED, helper,
                        json.dumps(cases)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_stage_failures_without_privilege(helper: str, accounts: Accounts) -> None:
    if helper == "c" and not build.ensure_built():
        pytest.skip("no C compiler")
    a = accounts.a
    out = run_limited(helper, ["--bounding-set=-all", "--inh-caps=-all"], {
        "nice": [{"nice": -5}, {"no_new_privs": True}],
        "namespaces": [{"namespaces": ["net"]}, {}],
        "groups": [{}, {"groups": [1, 2]}],
        "gid": [{}, {"gid": a.gid}],
        "uid": [{}, {"uid": a.uid}],
        "capabilities": [{}, {"capabilities": ["CAP_NET_BIND_SERVICE"]}],
    })
    assert out == {"nice": ["nice", errno.EACCES], "namespaces": ["namespaces", errno.EPERM],
                   "groups": ["groups", errno.EPERM], "gid": ["gid", errno.EPERM],
                   "uid": ["uid", errno.EPERM],
                   "capabilities": ["capabilities", errno.EPERM]}, out
    out = run_limited(helper, ["--securebits=+keep_caps_locked"], {
        "keep_caps": [{}, {"uid": a.uid, "gid": a.gid, "groups": [a.gid],
                           "capabilities": ["CAP_NET_BIND_SERVICE"]}]})
    assert out == {"keep_caps": ["keep_caps", errno.EPERM]}, out


# ---------------------------------------------------------------------------- plain path

def test_plain_path_unless_posix_spawn_cannot(helper: str) -> None:
    base = SpawnSpec(executable=SH, argv=(b"sh",), env=())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    me = os.getpriority(os.PRIO_PROCESS, 0)
    plain = [base, SpawnSpec(executable=SH, argv=(), env=(), cwd_fd=0, umask=0o77),
             SpawnSpec(executable=SH, argv=(), env=(),
                       rlimits=((resource.RLIMIT_NOFILE, soft // 2, hard),)),
             SpawnSpec(executable=SH, argv=(), env=(), affinity=(0,), nice=me)]
    helped = [SpawnSpec(executable=SH, argv=(), env=(), nice=me + 1),
              SpawnSpec(executable=SH, argv=(), env=(),
                        rlimits=((resource.RLIMIT_NOFILE, soft, hard - 1),)),
              SpawnSpec(executable=SH, argv=(), env=(),
                        rlimits=((resource.RLIMIT_CPU, 10, resource.RLIM_INFINITY),)),
              SpawnSpec(executable=SH, argv=(), env=(), namespaces=("net",)),
              SpawnSpec(executable=SH, argv=(), env=(), ctty=0)]
    assert [privileged.needs_helper(s) for s in plain] == [False] * 4
    assert [privileged.needs_helper(s) for s in helped] == [True] * 5
    assert privileged.needs_helper(base, Grant(executable=SH, argv=(), env=(), uid=1))


def test_soft_limit_and_affinity_on_the_plain_path() -> None:
    """The daemon borrows the child's soft limit and affinity for one posix_spawn."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cpus = os.sched_getaffinity(0)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    pid = spawner.spawn(SpawnSpec(
        executable=SH, argv=(b"sh", b"-c", b"ulimit -n; grep Cpus_allowed_list /proc/self/status"),
        env=(), fd_map=((out_w, 1),), rlimits=((resource.RLIMIT_NOFILE, 77, hard),),
        affinity=(min(cpus),)))
    os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        out = f.read().decode().split("\n")
    assert reap(pid) == 0
    assert out[0] == "77" and out[1].split()[-1] == str(min(cpus))
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    assert os.sched_getaffinity(0) == cpus


# ---------------------------------------------------------------------------- deputy

RACE = """
import os
c = connect()
out = []
for i in range(P['n']):
    link = P['link'] + str(i)
    os.symlink(P['target'] + str(i), link)
    r = attempt(run, [link], c)
    out.append(r['ok']['out'] if 'ok' in r else r.get('name'))
result['outcomes'] = out
"""


def test_symlink_into_a_private_directory_is_refused_every_time(
        accounts: Accounts, clients: ClientLib, daemons: Callable[..., Daemon],
        shared: Path) -> None:
    """A user asks a root daemon to run its symlink to a binary inside a 0700 directory it
    cannot traverse; the link disappears the moment the daemon has opened the file. The
    old trampoline saw ENOENT on its by-name check and ran the fd root had opened; the
    helper opens the path itself as the user: EACCES, every time."""
    a = accounts.a
    private = Path(tempfile.mkdtemp(prefix="spawnd-private-"))  # 0700 root
    secret = private / "secret"
    shutil.copy2("/usr/bin/echo", secret)
    secret.chmod(0o755)
    for i in range(40):  # one name per run: the remover knows which run it sees
        os.link(secret, f"{secret}{i}")
    userdir = shared / f"race-{os.getpid()}"
    userdir.mkdir()
    os.chown(userdir, a.uid, a.gid)
    link = userdir / "link"
    d = daemons(None)
    stop = threading.Event()
    removed = [0]

    def remover() -> None:
        # Remove the link as soon as the daemon holds the private file open.
        fd_dir = f"/proc/{d.pid}/fd"
        while not stop.is_set():
            try:
                names = os.listdir(fd_dir)
            except OSError:
                continue
            for n in names:
                try:
                    target = os.readlink(f"{fd_dir}/{n}")
                    if target.startswith(str(secret)):
                        os.unlink(f"{link}{target[len(str(secret)):]}")
                        removed[0] += 1
                except OSError:
                    pass

    t = threading.Thread(target=remover, daemon=True)
    t.start()
    try:
        outcomes = clients.run(a, d.path, RACE, n=40, link=str(link), target=str(secret),
                               timeout=120)["outcomes"]
    finally:
        stop.set()
        t.join()
        shutil.rmtree(private)
        shutil.rmtree(userdir)
    assert outcomes == ["EACCES"] * 40, (outcomes, removed)


# ---------------------------------------------------------------------------- root's user=

def test_root_client_may_run_as_another_user_by_default(
        accounts: Accounts, clients: ClientLib, daemons: Callable[..., Daemon]) -> None:
    d = daemons(None)
    nobody = 65534
    root = sc.Client(d.path, autostart=False)
    d.clients.append(root)
    r = sc.run(["/usr/bin/id", "-u"], user="nobody", capture_output=True, client=root,
               env={})
    assert r.returncode == 0
    assert r.stdout.split()[0] == b"%d" % nobody
    # Its bounding set is empty: root asked for another user, not for capabilities.
    st = sc.run(["/usr/bin/cat", "/proc/self/status"], user=nobody, capture_output=True,
                client=root, env={}).stdout.decode()
    assert caps.cap_sets(caps.parse_status(st)).bounding == 0
    refused = clients.run(accounts.a, d.path,
                          "result['r'] = attempt(run, ['/usr/bin/id'], connect(), user=P['b'])",
                          b=accounts.b.uid)["r"]
    assert (refused["errno"], refused["stage"], refused["field"]) == (
        errno.EPERM, "policy", "user"), refused


# ---------------------------------------------------------------------------- pure parts

def test_protocol_namespaces_field() -> None:
    from spawnd import protocol as P

    ok = P._parse_spawn({"t": "spawn", "id": 1, "argv": ["x"], "namespaces": ["net", "user"]},
                        1, ())
    assert ok.namespaces == ("net", "user")
    assert P._parse_spawn({"t": "spawn", "id": 1, "argv": ["x"]}, 1, ()).namespaces == ()
    for bad, fld in ((["pid"], "namespaces[0]"), (["net", "net"], "namespaces"),
                     ("net", "namespaces")):
        with pytest.raises(P.ProtocolError) as info:
            P._parse_spawn({"t": "spawn", "id": 1, "argv": ["x"], "namespaces": bad}, 1, ())
        assert info.value.field == fld, info.value


def test_policy_namespace_grants_and_root_default() -> None:
    from spawnd import protocol as P
    from spawnd.policy import DaemonIdentity, Peer, Policy, PolicyFileError, Refused

    root = DaemonIdentity(uid=0, gid=0, groups=(0,), permitted=frozenset(caps.NUMBERS))
    p = Policy.from_text('[[allow]]\nuids = [1000]\nexecutables = ["/"]\n'
                         'namespaces = ["net"]\n', identity=root, resolve_paths=False)
    peer = Peer(uid=1000, gid=1000, pid=1)
    g = p.decide(peer, P.Spawn(id=1, argv=(b"x",), namespaces=("net",)), b"/bin/x")
    assert g.namespaces == ("net",) and privileged.needs_helper(
        SpawnSpec(executable=b"/bin/x", argv=(), env=()), g)
    with pytest.raises(Refused) as info:
        p.decide(peer, P.Spawn(id=1, argv=(b"x",), namespaces=("net", "uts")), b"/bin/x")
    assert (info.value.errno, info.value.field) == (errno.EPERM, "namespaces[1]")
    with pytest.raises(PolicyFileError):
        Policy.from_text('[[allow]]\nuids = [1]\nnamespaces = ["pid"]\n', identity=root)
    d = Policy.default(0, identity=root)
    g = d.decide(Peer(0, 0, 1), P.Spawn(id=1, argv=(b"id",), user=65534), b"/usr/bin/id")
    assert g.uid == 65534 and g.capabilities == ()
    with pytest.raises(Refused) as info:
        d.decide(peer, P.Spawn(id=1, argv=(b"id",), user=65534), b"/usr/bin/id")
    assert (info.value.errno, info.value.field) == (errno.EPERM, "user")
    with pytest.raises(Refused):
        d.decide(peer, P.Spawn(id=1, argv=(b"id",), namespaces=("net",)), b"/usr/bin/id")
    own = Policy.default(1000, identity=DaemonIdentity(uid=1000, gid=1000))
    assert own.decide(peer, P.Spawn(id=1, argv=(b"x",), namespaces=("user", "net")),
                      b"/bin/x").namespaces == ("user", "net")


# ---------------------------------------------------------------------------- inherited

async def test_inherited_state_applied_by_the_helper(helper: str, accounts: Accounts,
                                                     shared: Path) -> None:
    """cwd_fd (+ a relative cwd), rlimits, nice, affinity and umask reach the child, with
    the cwd entered as the target user."""
    a = accounts.a
    sub = shared / f"cwd-{os.getpid()}" / "sub"
    sub.mkdir(parents=True)
    dfd = os.open(sub.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    cpu = min(os.sched_getaffinity(0))
    grant = Grant(executable=SH, argv=(), env=(), uid=a.uid, gid=a.gid, groups=(a.gid,),
                  umask=0o027)
    try:
        rc, out = await sh("pwd; ulimit -n; ulimit -Hn; grep -E '^(Umask|Cpus_allowed_list)'"
                           " /proc/self/status; cut -d' ' -f19 /proc/self/stat", grant,
                           cwd_fd=dfd, cwd=b"sub",
                           rlimits=((resource.RLIMIT_NOFILE, 100, 200),), nice=7,
                           affinity=(cpu,))
    finally:
        os.close(dfd)
        shutil.rmtree(sub.parent)
    assert rc == 0, out
    lines = out.split("\n")
    assert lines[0] == str(sub)
    assert lines[1:3] == ["100", "200"]
    assert lines[3].split() == ["Umask:", "0027"]
    assert lines[4].split()[-1] == str(cpu)
    assert lines[5] == "7"


def test_plain_spawn_refuses_what_only_the_helper_can_do() -> None:
    for kw in ({"namespaces": ("net",)}, {"ctty": 0},
               {"nice": os.getpriority(os.PRIO_PROCESS, 0) + 1}):
        with pytest.raises(SpawnError) as info:
            spawner.spawn(SpawnSpec(executable=SH, argv=(b"sh",), env=(), **kw))
        assert info.value.errno == errno.EINVAL
    assert no_children_left()


@pytest.mark.parametrize("spec", [b"Zbogus\0", b"Abin\0", b"Ax\0PSname\0Cname\0",
                                  b"Ax\0n1x\0Pname\0", b"no terminator"])
def test_malformed_spec_is_stage_spec(helper: str, spec: bytes) -> None:
    """Both helpers refuse a spec they do not understand the same way: "spec <EINVAL>"."""
    h = privileged.helper()
    spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    os.write(spec_w, spec)
    os.close(spec_w)
    pid = spawner.spawn(SpawnSpec(
        executable=h.executable, argv=(*h.argv_prefix, b"3", b"4", b"%d" % len(spec)),
        env=(), fd_map=((spec_r, 3), (status_w, 4))))
    os.close(spec_r)
    os.close(status_w)
    with os.fdopen(status_r, "rb") as f:
        assert f.read() == b"spec %d" % errno.EINVAL
    assert reap(pid) == 127


async def test_unlimited_rlimits_pass_through(helper: str) -> None:
    inf = resource.RLIM_INFINITY
    rc, out = await sh("ulimit -c; ulimit -Hc", rlimits=((resource.RLIMIT_CORE, inf, inf),))
    assert (rc, out) == (0, "unlimited\nunlimited\n")


def test_untrusted_c_helper_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spawnd import exec_helper

    if not build.ensure_built():
        pytest.skip("no C compiler")
    copy = tmp_path / "spawnd-exec"
    shutil.copy2(exec_helper.BINARY, copy)
    tmp_path.chmod(0o755)
    monkeypatch.setenv("SPAWND_EXEC_HELPER", str(copy))
    assert exec_helper.choose("auto").kind == "c"
    copy.chmod(0o777)  # writable by others: a root daemon must not exec it
    assert exec_helper.choose("auto").kind == "python"
    with pytest.raises(FileNotFoundError):
        exec_helper.choose("c")
    copy.chmod(0o755)
    tmp_path.chmod(0o777)
    assert exec_helper.choose("auto").kind == "python"
