"""spawnd.privileged: real credential/capability/rlimit changes through the exec helper.

Every test runs twice: with the C helper (spawnd-exec, built here if needed) and with its
Python twin (the fallback), which must behave identically.

Needs root (it creates users and changes uids). Every child started here is reaped here:
the test plays the server's part.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from spawnd import caps, privileged
from spawnd import protocol as P
from spawnd.policy import Grant, Peer, Policy
from spawnd.spawner import SpawnError, SpawnSpec

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="changes uids and capabilities, and creates test users: must run as root")

@pytest.fixture(autouse=True, params=["c", "python"])
def exec_helper(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test against one exec helper; restore the automatic choice afterwards."""
    from spawnd.exec_helper import build

    if request.param == "c" and not build.ensure_built():
        pytest.skip("no C compiler: the C exec helper cannot be built")
    privileged.configure(request.param)
    yield request.param
    privileged.configure("auto")


SYSTEM_PYTHON = "/usr/bin/python3"  # readable by other users (unlike /root/.pyenv)
CAT = b"/usr/bin/cat"
NETCAP = ("CAP_NET_BIND_SERVICE",)


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def _ensure_group(name: str, created: list[list[str]]) -> None:
    if subprocess.run(["getent", "group", name], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        created.append(["groupdel", name])


def _ensure_user(name: str, extra_group: str, created: list[list[str]]) -> Account:
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "-G", extra_group, name],
                       check=True, capture_output=True)
        created.insert(0, ["userdel", name])
    import pwd

    pw = pwd.getpwnam(name)
    groups = tuple(dict.fromkeys([pw.pw_gid, *os.getgrouplist(name, pw.pw_gid)]))
    return Account(name, pw.pw_uid, pw.pw_gid, groups)


@pytest.fixture(scope="session")
def users() -> Iterator[tuple[Account, Account]]:
    """spawnd-test-a (also in spawnd-test-g) and spawnd-test-b; removed if we made them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create users")
    created: list[list[str]] = []
    try:
        _ensure_group("spawnd-test-g", created)
        a = _ensure_user("spawnd-test-a", "spawnd-test-g", created)
        b = _ensure_user("spawnd-test-b", "spawnd-test-g", created)
        yield a, b
    finally:
        for cmd in created:  # users first, then the group
            subprocess.run(cmd, capture_output=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="spawnd-test-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_user(u: Account, caps_: tuple[str, ...] = (), **kw: object) -> Grant:
    return Grant(executable=CAT, argv=(b"cat",), env=(), uid=u.uid, gid=u.gid,
                 groups=u.groups, capabilities=caps_, **kw)  # type: ignore[arg-type]


def reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class Running:
    """A ``cat`` child proven to be past exec (it echoed a byte), for inspection in /proc."""

    def __init__(self, pid: int, stdin_w: int, stdout_r: int) -> None:
        self.pid, self.stdin_w, self.stdout_r = pid, stdin_w, stdout_r

    def proc(self, what: str) -> str:
        return Path(f"/proc/{self.pid}/{what}").read_text(errors="replace")

    def status(self) -> dict[str, str]:
        return caps.parse_status(self.proc("status"))

    def finish(self) -> int:
        os.close(self.stdin_w)
        rest = os.read(self.stdout_r, 100)
        os.close(self.stdout_r)
        assert rest == b""
        return reap(self.pid)


async def start_cat(grant: Grant, *, env: tuple[bytes, ...] = (), cwd: bytes | None = None,
                    extra_fds: tuple[tuple[int, int], ...] = ()) -> Running:
    exec_fd, _ = privileged.open_executable(CAT)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    spec = SpawnSpec(executable=CAT, argv=(b"cat",), env=env,
                     fd_map=((in_r, 0), (out_w, 1), *extra_fds), cwd=cwd, exec_fd=exec_fd)
    try:
        pid = await privileged.spawn_privileged(spec, grant)
    finally:
        for fd in (exec_fd, in_r, out_w):
            os.close(fd)
    os.write(in_w, b"x")
    assert os.read(out_r, 1) == b"x"  # cat is running: exec and its credentials are done
    return Running(pid, in_w, out_r)


async def run_to_end(grant: Grant, argv: tuple[bytes, ...], *, path: bytes | None = None,
                     env: tuple[bytes, ...] = (), cwd: bytes | None = None) -> tuple[int, bytes]:
    """Run ``argv`` (by fd) to completion; return (exit code, stdout)."""
    path = path or argv[0]
    exec_fd, _ = privileged.open_executable(path)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    spec = SpawnSpec(executable=path, argv=argv, env=env, fd_map=((out_w, 1),), cwd=cwd,
                     exec_fd=exec_fd)
    try:
        pid = await privileged.spawn_privileged(spec, grant)
    finally:
        os.close(exec_fd)
        os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        out = f.read()
    return reap(pid), out


def no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


# ---------------------------------------------------------------------------- credentials

async def test_child_has_exactly_the_granted_credentials_and_caps(
        users: tuple[Account, Account]) -> None:
    a, _ = users
    child = await start_cat(as_user(a, NETCAP), env=(b"A=1", b"B=x=y"), extra_fds=((0, 7),))
    try:
        st = child.status()
        assert st["Uid"].split() == [str(a.uid)] * 4
        assert st["Gid"].split() == [str(a.gid)] * 4
        assert sorted(map(int, st["Groups"].split())) == sorted(a.groups)
        want = caps.mask(NETCAP)
        assert caps.cap_sets(st) == caps.CapSets(want, want, want, want, want)
        assert st["NoNewPrivs"] == "0"
        assert int(st["SigIgn"], 16) == 0  # Python's SIGPIPE/SIGXFSZ ignores do not leak
        assert child.proc("environ") == "A=1\0B=x=y\0"
        # Exactly the requested fds: none of the trampoline's spec/status/exec fds.
        assert sorted(map(int, os.listdir(f"/proc/{child.pid}/fd"))) == [0, 1, 2, 7]
    finally:
        assert child.finish() == 0


async def test_no_caps_means_empty_sets_including_bounding(
        users: tuple[Account, Account]) -> None:
    _, b = users
    child = await start_cat(as_user(b))
    try:
        st = child.status()
        assert st["Uid"].split() == [str(b.uid)] * 4
        assert caps.cap_sets(st) == caps.CapSets(0, 0, 0, 0, 0)
    finally:
        assert child.finish() == 0


async def test_root_child_with_reduced_caps() -> None:
    """Same uid (root), capabilities asked for: exactly those, bounding set included."""
    g = Grant(executable=CAT, argv=(b"cat",), env=(), capabilities=NETCAP)
    child = await start_cat(g)
    try:
        st = child.status()
        assert st["Uid"].split() == ["0"] * 4
        want = caps.mask(NETCAP)
        assert caps.cap_sets(st) == caps.CapSets(want, want, want, want, want)
    finally:
        assert child.finish() == 0


async def test_grant_from_default_root_policy(users: tuple[Account, Account]) -> None:
    a, _ = users
    policy = Policy.default(0)
    grant = policy.decide(Peer(a.uid, a.gid, 1), P.Spawn(id=1, argv=(b"cat",)), CAT)
    child = await start_cat(grant)
    try:
        st = child.status()
        assert st["Uid"].split()[0] == str(a.uid) and st["Gid"].split()[0] == str(a.gid)
        assert caps.cap_sets(st).bounding == 0
    finally:
        assert child.finish() == 0


BIND = ("import socket, sys\n"
        "s = socket.socket()\n"
        "try:\n"
        "    s.bind(('127.0.0.1', int(sys.argv[1])))\n"
        "    print('bound')\n"
        "except OSError as e:\n"
        "    print(e.errno)\n")


def _free_privileged_port() -> int:
    for port in (80, *range(81, 1024)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024 on 127.0.0.1")


async def test_net_bind_service_binds_port_80(users: tuple[Account, Account]) -> None:
    a, _ = users
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    port = _free_privileged_port()
    if port >= start:
        pytest.skip(f"net.ipv4.ip_unprivileged_port_start={start}: port {port} is unprivileged")
    py = os.fsencode(SYSTEM_PYTHON)
    argv = (py, b"-I", b"-c", BIND.encode(), b"%d" % port)
    rc, out = await run_to_end(as_user(a, NETCAP), argv)
    assert (rc, out) == (0, b"bound\n")
    rc, out = await run_to_end(as_user(a), argv)
    assert (rc, out) == (0, b"%d\n" % errno.EACCES)


async def test_rlimits_and_no_new_privs(users: tuple[Account, Account]) -> None:
    a, _ = users
    g = as_user(a, rlimits={resource.RLIMIT_NOFILE: (123, 456), resource.RLIMIT_CORE: (0, 0)},
                no_new_privs=True)
    child = await start_cat(g)
    try:
        limits = child.proc("limits")
        assert [ln.split()[3:5] for ln in limits.splitlines()
                if ln.startswith("Max open files")] == [["123", "456"]]
        assert [ln.split()[4:6] for ln in limits.splitlines()
                if ln.startswith("Max core file size")] == [["0", "0"]]
        assert child.status()["NoNewPrivs"] == "1"
    finally:
        assert child.finish() == 0


async def test_umask_and_cwd_applied(users: tuple[Account, Account], shared_dir: Path) -> None:
    a, _ = users
    child = await start_cat(as_user(a, umask=0o027), cwd=os.fsencode(shared_dir))
    try:
        assert child.status()["Umask"] == "0027"
        assert os.readlink(f"/proc/{child.pid}/cwd") == str(shared_dir)
    finally:
        assert child.finish() == 0


async def test_large_argv_and_env_pass_through_the_spec_pipe(
        users: tuple[Account, Account]) -> None:
    """Far more than a pipe buffer (64 KiB): the plan is written asynchronously."""
    a, _ = users
    argv = (b"printf", b"%s", *[b"%04d" % i + b"y" * 995 for i in range(400)])
    env = tuple(b"V%d=" % i + b"z" * 500 for i in range(200))
    rc, out = await run_to_end(as_user(a), argv, path=b"/usr/bin/printf", env=env)
    assert rc == 0 and out == b"".join(argv[2:])


# ---------------------------------------------------------------------------- errors

async def expect_error(grant: Grant, stage: str, code: int, path: bytes = CAT,
                       cwd: bytes | None = None) -> SpawnError:
    exec_fd, _ = privileged.open_executable(path)
    before = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(SpawnError) as info:
            await privileged.spawn_privileged(
                SpawnSpec(executable=path, argv=(b"x",), env=(), cwd=cwd, exec_fd=exec_fd),
                grant)
    finally:
        os.close(exec_fd)
    assert (info.value.stage, info.value.errno) == (stage, code), info.value
    assert no_children_left()  # the trampoline was reaped before raising
    assert len(os.listdir("/proc/self/fd")) == before - 1  # pipes closed too
    return info.value


async def test_failed_rlimit_is_synchronous(users: tuple[Account, Account]) -> None:
    a, _ = users
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Not a privileged rlimit: applied as the user, who may not raise a hard limit.
    await expect_error(as_user(a, rlimits={resource.RLIMIT_NOFILE: (soft, hard + 1)}),
                       "rlimits", errno.EPERM)


async def test_failed_credentials_are_synchronous(users: tuple[Account, Account]) -> None:
    a, _ = users
    too_many = tuple(range(100_000, 100_000 + 70_000))  # above NGROUPS_MAX (65536)
    await expect_error(Grant(executable=CAT, argv=(b"x",), env=(), uid=a.uid, gid=a.gid,
                             groups=too_many), "groups", errno.EINVAL)


async def test_failed_capability_is_synchronous(users: tuple[Account, Account]) -> None:
    a, _ = users
    missing = sorted(set(caps.NUMBERS) - caps.own_permitted(), key=caps.number)
    missing = [c for c in missing if caps.number(c) <= caps.last_cap()]
    if not missing:
        pytest.skip("this process holds every capability: none to fail to grant")
    await expect_error(as_user(a, (missing[0],)), "capabilities", errno.EPERM)


async def test_cwd_is_checked_as_the_new_user(users: tuple[Account, Account]) -> None:
    a, _ = users
    private = tempfile.mkdtemp(prefix="spawnd-private-")  # 0700 root
    try:
        err = await expect_error(as_user(a), "cwd", errno.EACCES, cwd=os.fsencode(private))
        assert err.filename == os.fsencode(private)
    finally:
        os.rmdir(private)


async def test_exec_of_non_executable_as_user(users: tuple[Account, Account],
                                              shared_dir: Path) -> None:
    a, _ = users
    f = shared_dir / "data"
    f.write_bytes(b"\x7fELF not really")
    f.chmod(0o644)
    err = await expect_error(as_user(a), "exec", errno.EACCES, path=os.fsencode(f))
    assert err.filename == os.fsencode(f)


async def test_exec_unreachable_for_the_user_is_refused(users: tuple[Account, Account]) -> None:
    """Opened by root through a 0700 directory: the user could not reach it by path."""
    a, _ = users
    private = Path(tempfile.mkdtemp(prefix="spawnd-private-"))
    try:
        tool = private / "cat"
        shutil.copy2(CAT.decode(), tool)
        tool.chmod(0o755)
        await expect_error(as_user(a), "exec", errno.EACCES, path=os.fsencode(tool))
    finally:
        shutil.rmtree(private)


async def test_bad_fd_fails_in_stage_fds_without_leaks() -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    bad = max(map(int, before)) + 100  # closed, and never reused by our own pipes
    with pytest.raises(SpawnError) as info:
        await privileged.spawn_privileged(
            SpawnSpec(executable=CAT, argv=(b"cat",), env=(), fd_map=((bad, 3),)),
            Grant(executable=CAT, argv=(b"cat",), env=(), no_new_privs=True))
    assert info.value.stage == "fds"
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert no_children_left()


async def test_cancelled_spawn_leaves_no_child(users: tuple[Account, Account]) -> None:
    a, _ = users
    exec_fd, _ = privileged.open_executable(CAT)
    try:
        with trio.move_on_after(0):
            await privileged.spawn_privileged(
                SpawnSpec(executable=CAT, argv=(b"cat",), env=(), exec_fd=exec_fd), as_user(a))
            pytest.fail("not cancelled")
    finally:
        os.close(exec_fd)
    assert no_children_left()


async def test_wedged_trampoline_times_out_and_is_reaped(
        monkeypatch: pytest.MonkeyPatch, users: tuple[Account, Account]) -> None:
    a, _ = users

    async def wedged(*args: object) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(privileged, "STATUS_TIMEOUT", 0.05)
    monkeypatch.setattr(privileged, "_exchange", wedged)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(SpawnError) as info:
        await privileged.spawn_privileged(
            SpawnSpec(executable=CAT, argv=(b"cat",), env=()), as_user(a))
    assert (info.value.errno, info.value.stage) == (errno.ETIMEDOUT, "trampoline")
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert no_children_left()


# ---------------------------------------------------------------------------- exec by fd

async def test_swapped_path_is_refused_for_another_user(users: tuple[Account, Account],
                                                        shared_dir: Path) -> None:
    """The helper opens the path again as the target user: another file there is EACCES
    (the old trampoline ran the fd opened by root, whatever the path had become)."""
    a, _ = users
    prog = shared_dir / "prog"
    shutil.copy2("/usr/bin/echo", prog)
    fd, _ = privileged.open_executable(os.fsencode(prog))
    impostor = shared_dir / "impostor"
    shutil.copy2("/usr/bin/echo", impostor)
    os.rename(impostor, prog)  # the path now names another file
    before = len(os.listdir("/proc/self/fd"))
    spec = SpawnSpec(executable=os.fsencode(prog), argv=(b"prog", b"x"), env=(), exec_fd=fd)
    try:
        with pytest.raises(SpawnError) as info:
            await privileged.spawn_privileged(spec, as_user(a))
    finally:
        os.close(fd)
    assert (info.value.stage, info.value.errno) == ("exec", errno.EACCES)
    assert len(os.listdir("/proc/self/fd")) == before - 1
    assert no_children_left()


async def test_swapped_path_still_runs_the_checked_file(users: tuple[Account, Account],
                                                         shared_dir: Path) -> None:
    """Same uid (root), no credential switch: the checked fd is what runs."""
    prog = shared_dir / "prog"
    shutil.copy2("/usr/bin/echo", prog)
    fd, is_script = privileged.open_executable(os.fsencode(prog))
    assert not is_script
    assert privileged.real_path(fd) == os.fsencode(prog)
    impostor = shared_dir / "impostor"
    impostor.write_text("#!/bin/sh\necho swapped\n")
    impostor.chmod(0o755)
    os.rename(impostor, prog)  # the path now names another file
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    spec = SpawnSpec(executable=os.fsencode(prog), argv=(b"prog", b"original"), env=(),
                     fd_map=((out_w, 1),), exec_fd=fd)
    try:
        pid = await privileged.spawn_privileged(
            spec, Grant(executable=CAT, argv=(b"x",), env=(), no_new_privs=True))
    finally:
        os.close(fd)
        os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        assert f.read() == b"original\n"
    assert reap(pid) == 0


async def test_scripts_run_by_path(users: tuple[Account, Account], shared_dir: Path) -> None:
    a, _ = users
    script = shared_dir / "hello.sh"
    script.write_text("#!/bin/sh\necho \"hello $(id -u)\"\n")
    script.chmod(0o755)
    fd, is_script = privileged.open_executable(os.fsencode(script))
    os.close(fd)
    assert is_script
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    spec = SpawnSpec(executable=os.fsencode(script), argv=(b"hello.sh",),
                     env=(b"PATH=/usr/bin:/bin",), fd_map=((out_w, 1),), exec_fd=None)
    try:
        pid = await privileged.spawn_privileged(spec, as_user(a))
    finally:
        os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        assert f.read() == b"hello %d\n" % a.uid
    assert reap(pid) == 0


def test_open_executable_errors(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        privileged.open_executable(b"/nonexistent/prog")
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, b"/nonexistent/prog")
    with pytest.raises(OSError) as info:
        privileged.open_executable(os.fsencode(tmp_path))
    assert info.value.errno == errno.EACCES
    link = tmp_path / "link"
    link.symlink_to("/usr/bin/cat")
    fd, _ = privileged.open_executable(b"link", cwd=os.fsencode(tmp_path))
    try:
        assert privileged.real_path(fd) == os.path.realpath(b"/usr/bin/cat")
    finally:
        os.close(fd)


@pytest.mark.parametrize("which", ["_libc_core", "_libc_ctypes"])
def test_trampoline_libc_bindings(which: str) -> None:
    """Both bindings (the fast private one and its ctypes fallback) call prctl correctly."""
    from spawnd import _trampoline

    prctl, capset, *_, get_errno = getattr(_trampoline, which)()
    pr_capbset_read = 23
    assert prctl(pr_capbset_read, caps.number("CAP_CHOWN"), 0, 0, 0) == 1
    assert prctl(pr_capbset_read, 10_000, 0, 0, 0) == -1 and get_errno() == errno.EINVAL
    # capset with a bogus version: EINVAL and no change. Fresh buffers: on EINVAL the kernel
    # writes its preferred version into the header, which would mutate a bytes constant.
    with pytest.raises(OSError) as info:
        _trampoline._check(capset(bytes(8), bytes(24)), get_errno)
    assert info.value.errno == errno.EINVAL
