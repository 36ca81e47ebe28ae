"""Unit tests of spawnd.spawner with real processes (no daemon).

Every child is reaped; failure tests also check that no child is left at all, since
glibc's vfork-style posix_spawn must report the error and reap the child itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import resource
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spawnd.spawner import (
    STAGE_CWD,
    STAGE_EXEC,
    STAGE_FDS,
    SpawnError,
    SpawnSpec,
    resolve_executable,
    spawn,
)

SH = b"/bin/sh"
PY = os.fsencode(sys.executable)
PATH_ENV = [b"PATH=/usr/bin:/bin"]


# --- helpers ---------------------------------------------------------------------------


def reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def run(executable: bytes, argv: list[bytes], env=(), fd_map=(), **kw) -> tuple[int, bytes]:
    """Spawn with stdout on a pipe; return (exit code, stdout)."""
    r, w = os.pipe()
    try:
        pid = spawn(SpawnSpec(executable, argv, list(env), [(w, 1), *fd_map], **kw))
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        out = read_all(r)
    finally:
        os.close(r)
    return reap(pid), out


def py(code: str, **kw) -> tuple[int, bytes]:
    return run(PY, [PY, b"-I", b"-S", b"-c", code.encode()], **kw)


def proc_status(**kw) -> dict[str, str]:
    code, out = run(b"/bin/cat", [b"cat", b"/proc/self/status"], **kw)
    assert code == 0
    return dict(line.split(":\t", 1) for line in out.decode().splitlines())


def assert_no_child() -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))  # includes the listing's own fd, same each time


@contextmanager
def paused(fd_map=(), **kw) -> Iterator[int]:
    """A shell child blocked in `read` (after saying "ready") so /proc/<pid> is stable."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    try:
        pid = spawn(
            SpawnSpec(
                SH,
                [b"sh", b"-c", b"echo ready; read x"],
                [],
                [(r_in, 0), (w_out, 1), *fd_map],
                **kw,
            )
        )
    except BaseException:
        os.close(w_in)
        os.close(r_out)
        raise
    finally:
        os.close(r_in)
        os.close(w_out)
    try:
        assert os.read(r_out, 64) == b"ready\n"
        yield pid
    finally:
        os.close(w_in)  # EOF ends `read`
        os.close(r_out)
        reap(pid)


@contextmanager
def fd_at(number: int, fd: int) -> Iterator[int]:
    """Temporarily put fd's file at `number` in this process, restoring what was there."""
    try:
        saved = fcntl.fcntl(number, fcntl.F_DUPFD_CLOEXEC, 100)
        inheritable = os.get_inheritable(number)
    except OSError:
        saved = None
    os.dup2(fd, number, inheritable=False)
    try:
        yield number
    finally:
        if saved is None:
            os.close(number)
        else:
            os.dup2(saved, number, inheritable=inheritable)
            os.close(saved)


def make_file(path: Path, content: bytes, mode: int) -> bytes:
    path.write_bytes(content)
    path.chmod(mode)
    return os.fsencode(path)


def ino_of(fd: int) -> int:
    return os.fstat(fd).st_ino


# --- basics ----------------------------------------------------------------------------


def test_exit_code_comes_back():
    pid = spawn(SpawnSpec(SH, [b"sh", b"-c", b"exit 7"], []))
    assert reap(pid) == 7


def test_argv_exact_including_argv0(tmp_path):
    odd = tmp_path / os.fsdecode(b"a b\xff")
    odd.write_bytes(b"")
    argv = [b"\xffmy cat", b"/proc/self/cmdline", os.fsencode(odd), b"/dev/null"]
    code, out = run(b"/bin/cat", argv)
    assert code == 0
    assert out == b"".join(a + b"\0" for a in argv)


@pytest.mark.parametrize(
    "env", [[], [b"A=1", b"B=x y\xff", b"EMPTY=", b"A=second", b"LD_X=\n"]], ids=["empty", "odd"]
)
def test_env_exact(env):
    code, out = run(b"/usr/bin/env", [b"env", b"-0"], env)
    assert code == 0
    assert out == b"".join(e + b"\0" for e in env)


# --- file descriptors ------------------------------------------------------------------


def test_child_fd_table_is_exactly_stdio_plus_targets(tmp_path):
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
    # Inheritable daemon fds, one below the top target and one above: both must vanish.
    low = fcntl.fcntl(fd, fcntl.F_DUPFD, 30)
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 70)
    assert low < 60 < high
    try:
        with paused([(fd, 5), (fd, 60)]) as pid:
            assert {int(n) for n in os.listdir(f"/proc/{pid}/fd")} == {0, 1, 2, 5, 60}
            assert os.stat(f"/proc/{pid}/fd/60").st_ino == ino_of(fd)
            assert os.readlink(f"/proc/{pid}/fd/2") == "/dev/null"
        with paused() as pid:
            assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2"]
    finally:
        for n in (fd, low, high):
            os.close(n)


def test_swap_3_and_4(tmp_path):
    a = os.open(tmp_path / "a", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
    b = os.open(tmp_path / "b", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
    ino_a, ino_b = ino_of(a), ino_of(b)
    try:
        with fd_at(3, a), fd_at(4, b):
            before = open_fds()
            code, out = py(
                "import os; print(os.fstat(3).st_ino, os.fstat(4).st_ino)",
                fd_map=[(3, 4), (4, 3)],
            )
            assert open_fds() == before  # the temporary dups were closed
            assert (ino_of(3), ino_of(4)) == (ino_a, ino_b)  # daemon side untouched
    finally:
        os.close(a)
        os.close(b)
    assert code == 0
    assert out.split() == [str(ino_b).encode(), str(ino_a).encode()]


def test_source_equal_target_and_one_source_two_targets(tmp_path):
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
    try:
        code, out = py(
            f"import os; print(os.fstat({fd}).st_ino, os.fstat({fd + 20}).st_ino)",
            fd_map=[(fd, fd), (fd, fd + 20)],
        )
        assert not os.get_inheritable(fd)
        ino = ino_of(fd)
    finally:
        os.close(fd)
    assert code == 0
    assert out.split() == [str(ino).encode()] * 2


def test_targets_0_1_2_replaced(tmp_path):
    fd_in = os.open(make_file(tmp_path / "in", b"hello\n", 0o644), os.O_RDONLY | os.O_CLOEXEC)
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    try:
        pid = spawn(
            SpawnSpec(
                SH,
                [b"sh", b"-c", b'read x; echo "out:$x"; echo err >&2'],
                [],
                [(fd_in, 0), (w_out, 1), (w_err, 2)],
            )
        )
    finally:
        for n in (fd_in, w_out, w_err):
            os.close(n)
    out, err = read_all(r_out), read_all(r_err)
    os.close(r_out)
    os.close(r_err)
    assert reap(pid) == 0
    assert (out, err) == (b"out:hello\n", b"err\n")


def test_unmapped_stdio_is_dev_null():
    code = (
        "import os, sys; d = os.stat('/dev/null');"
        "sys.exit(0 if all(os.path.samestat(os.fstat(i), d) for i in (0, 1, 2)) else 1)"
    )
    pid = spawn(SpawnSpec(PY, [PY, b"-I", b"-S", b"-c", code.encode()], []))
    assert reap(pid) == 0


@pytest.mark.parametrize(
    "case, expected",
    [
        ("negative target", errno.EBADF),
        ("huge target", errno.EBADF),
        ("target over rlimit", errno.EBADF),
        ("negative source", errno.EBADF),
        ("closed source", errno.EBADF),
        ("duplicate target", errno.EINVAL),
    ],
)
def test_bad_fd_map_fails_without_child(tmp_path, case, expected):
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
    closed = os.dup(fd)
    os.close(closed)
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fd_map = {
        "negative target": [(fd, -1)],
        "huge target": [(fd, 1_000_001)],
        "target over rlimit": [(fd, 3), (fd, soft_limit)],
        "negative source": [(-1, 3)],
        "closed source": [(closed, 3)],
        "duplicate target": [(fd, 3), (fd, 3)],
    }[case]
    before = open_fds()
    try:
        with pytest.raises(SpawnError) as info:
            spawn(SpawnSpec(b"/bin/true", [b"true"], [], fd_map))
        assert open_fds() == before  # no temporary dup left behind
    finally:
        os.close(fd)
    assert (info.value.errno, info.value.stage) == (expected, STAGE_FDS)
    assert_no_child()


# --- exec failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing", errno.ENOENT),
        ("not executable", errno.EACCES),
        ("directory", errno.EACCES),
        ("garbage header", errno.ENOEXEC),
        ("missing interpreter", errno.ENOENT),
    ],
)
def test_exec_errors_are_synchronous(tmp_path, kind, expected):
    path = tmp_path / "prog"
    if kind == "not executable":
        make_file(path, b"#!/bin/sh\n", 0o644)
    elif kind == "directory":
        path.mkdir()
    elif kind == "garbage header":
        make_file(path, b"\x00\x01\x02 not a program\n", 0o755)
    elif kind == "missing interpreter":
        make_file(path, b"#!/nonexistent/interpreter\n", 0o755)
    executable = os.fsencode(path)
    with pytest.raises(SpawnError) as info:
        spawn(SpawnSpec(executable, [b"prog"], []))
    err = info.value
    assert (err.errno, err.stage, err.filename) == (expected, STAGE_EXEC, executable)
    assert_no_child()


@pytest.mark.parametrize("shape", ["one huge arg", "huge total"])
def test_e2big(shape):
    if shape == "one huge arg":
        argv = [b"true", b"x" * 200_000]  # MAX_ARG_STRLEN is 128 KiB
        env = []
    else:
        argv = [b"true"]
        env = [b"V%d=%s" % (i, b"x" * 120_000) for i in range(70)]  # 8.4 MB > any ARG_MAX
    with pytest.raises(SpawnError) as info:
        spawn(SpawnSpec(b"/bin/true", argv, env))
    assert (info.value.errno, info.value.stage, info.value.filename) == (
        errno.E2BIG,
        STAGE_EXEC,
        b"/bin/true",
    )
    assert_no_child()


# --- cwd -------------------------------------------------------------------------------


def test_cwd_applies_to_child_and_relative_executable(tmp_path):
    make_file(tmp_path / "prog", b'#!/bin/sh\necho "rel:$(pwd)"\n', 0o755)
    code, out = run(b"./prog", [b"prog"], PATH_ENV, cwd=os.fsencode(tmp_path))
    assert code == 0
    assert out == b"rel:%s\n" % os.fsencode(tmp_path.resolve())


@pytest.mark.parametrize("kind, expected", [("missing", errno.ENOENT), ("file", errno.ENOTDIR)])
def test_bad_cwd_reports_cwd_stage(tmp_path, kind, expected):
    cwd = tmp_path / "cwd"
    if kind == "file":
        cwd.write_bytes(b"")
    with pytest.raises(SpawnError) as info:
        spawn(SpawnSpec(b"/bin/true", [b"true"], [], cwd=os.fsencode(cwd)))
    err = info.value
    assert (err.errno, err.stage, err.filename) == (expected, STAGE_CWD, os.fsencode(cwd))
    assert_no_child()


def test_good_cwd_with_missing_executable_reports_exec_stage(tmp_path):
    with pytest.raises(SpawnError) as info:
        spawn(SpawnSpec(b"./nope", [b"nope"], [], cwd=os.fsencode(tmp_path)))
    assert (info.value.errno, info.value.stage, info.value.filename) == (
        errno.ENOENT,
        STAGE_EXEC,
        b"./nope",
    )
    assert_no_child()


# --- sessions, groups, signals, umask -----------------------------------------------------


def test_setsid():
    with paused(setsid=True) as pid:
        assert os.getsid(pid) == pid
        assert os.getpgid(pid) == pid


def test_setsid_with_pgroup_zero_is_just_setsid():
    with paused(setsid=True, pgroup=0) as pid:
        assert os.getsid(pid) == pid == os.getpgid(pid)


def test_setsid_cannot_join_a_group():
    with pytest.raises(SpawnError) as info:
        spawn(SpawnSpec(b"/bin/true", [b"true"], [], setsid=True, pgroup=os.getpgid(0)))
    assert info.value.errno == errno.EPERM
    assert_no_child()


def test_pgroup_new_and_join():
    with paused(pgroup=0) as leader:
        assert os.getpgid(leader) == leader
        assert os.getsid(leader) == os.getsid(0)
        with paused(pgroup=leader) as member:
            assert os.getpgid(member) == leader
    with paused() as pid:
        assert os.getpgid(pid) == os.getpgid(0)


def test_signals_default_and_unblocked_in_child():
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    old_handler = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        mine = proc_status()  # also a spawned child; compare with our own status below
        with open("/proc/self/status") as f:
            me = dict(line.split(":\t", 1) for line in f.read().splitlines())
    finally:
        signal.signal(signal.SIGUSR2, old_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    assert int(me["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1))  # Python ignores SIGPIPE
    assert int(me["SigBlk"], 16) & (1 << (signal.SIGUSR1 - 1))
    assert int(mine["SigIgn"], 16) == 0
    assert int(mine["SigBlk"], 16) == 0


def test_umask_applied_and_restored():
    previous = os.umask(0o002)
    try:
        assert proc_status(umask=0o027)["Umask"] == "0027"
        assert os.umask(0o002) == 0o002
        assert proc_status()["Umask"] == "0002"  # None: inherit the daemon's
    finally:
        os.umask(previous)


# --- exec_fd ---------------------------------------------------------------------------


def test_exec_fd_runs_the_opened_file_after_a_swap(tmp_path):
    prog = tmp_path / "prog"
    shutil.copy("/bin/true", prog)
    fd = os.open(prog, os.O_PATH | os.O_CLOEXEC)
    try:
        shutil.copy("/bin/false", tmp_path / "other")
        os.rename(tmp_path / "other", prog)
        spec = SpawnSpec(os.fsencode(prog), [b"prog"], [])
        assert reap(spawn(spec)) == 1  # the path now names /bin/false
        assert reap(spawn(SpawnSpec(spec.executable, spec.argv, [], exec_fd=fd))) == 0
    finally:
        os.close(fd)


def test_exec_fd_script_interpreter_can_open_it(tmp_path):
    script = make_file(tmp_path / "script", b"#!/bin/sh\necho script:$0\n", 0o755)
    fd = os.open(script, os.O_PATH | os.O_CLOEXEC)
    try:  # fd stays open until the child has exited (run reads to EOF and reaps)
        code, out = run(script, [b"script"], exec_fd=fd)
    finally:
        os.close(fd)
    assert code == 0
    assert out == b"script:/proc/%d/fd/%d\n" % (os.getpid(), fd)


def test_exec_fd_errors_name_the_executable(tmp_path):
    data = make_file(tmp_path / "data", b"#!/bin/sh\n", 0o644)
    fd = os.open(data, os.O_PATH | os.O_CLOEXEC)
    try:
        with pytest.raises(SpawnError) as info:
            spawn(SpawnSpec(data, [b"data"], [], exec_fd=fd))
    finally:
        os.close(fd)
    assert (info.value.errno, info.value.stage, info.value.filename) == (
        errno.EACCES,
        STAGE_EXEC,
        data,
    )
    with pytest.raises(SpawnError) as info:
        spawn(SpawnSpec(data, [b"data"], [], exec_fd=fd))  # now closed
    assert (info.value.errno, info.value.stage) == (errno.EBADF, STAGE_FDS)
    assert_no_child()


# --- resolve_executable ----------------------------------------------------------------


@pytest.fixture
def path_dirs(tmp_path):
    for d in ("noexec", "isdir", "good", "empty"):
        (tmp_path / d).mkdir()
    make_file(tmp_path / "noexec" / "prog", b"#!/bin/sh\n", 0o644)
    (tmp_path / "isdir" / "prog").mkdir()
    make_file(tmp_path / "good" / "prog", b"#!/bin/sh\nexit 5\n", 0o755)
    return tmp_path


def test_resolve_skips_non_executables(path_dirs):
    path = b":".join(os.fsencode(path_dirs / d) for d in ("empty", "noexec", "isdir", "good"))
    assert resolve_executable(b"prog", path, None) == os.fsencode(path_dirs / "good" / "prog")


def test_resolve_name_with_slash_is_used_as_is():
    assert resolve_executable(b"./whatever/x", b"/bin", None) == b"./whatever/x"
    assert resolve_executable(b"/no/such", None, None) == b"/no/such"


def test_resolve_default_path():
    found = resolve_executable(b"sh", None, None)
    assert found in (b"/bin/sh", b"/usr/bin/sh")


def test_resolve_relative_dirs_are_relative_to_cwd(path_dirs):
    cwd = os.fsencode(path_dirs)
    assert resolve_executable(b"prog", b"noexec:good", cwd) == b"good/prog"
    code, _ = run(b"good/prog", [b"prog"], cwd=cwd)
    assert code == 5
    assert resolve_executable(b"prog", b"", os.fsencode(path_dirs / "good")) == b"prog"


@pytest.mark.parametrize(
    "dirs, expected",
    [(("empty",), errno.ENOENT), (("empty", "noexec", "isdir"), errno.EACCES)],
)
def test_resolve_errors_like_execvpe(path_dirs, dirs, expected):
    path = b":".join(os.fsencode(path_dirs / d) for d in dirs)
    with pytest.raises(SpawnError) as info:
        resolve_executable(b"prog", path, None)
    assert (info.value.errno, info.value.stage, info.value.filename) == (
        expected,
        STAGE_EXEC,
        b"prog",
    )
    with pytest.raises(SpawnError) as info:
        resolve_executable(b"", path, None)
    assert info.value.errno == errno.ENOENT


# --- SpawnError ------------------------------------------------------------------------


def test_spawn_error_shape():
    err = SpawnError(errno.ENOENT, STAGE_EXEC, b"foo")
    assert isinstance(err, OSError)
    assert (err.errno, err.strerror, err.filename, err.stage) == (
        errno.ENOENT,
        os.strerror(errno.ENOENT),
        b"foo",
        STAGE_EXEC,
    )
    assert str(err) == "[Errno 2] No such file or directory: 'foo' (stage: exec)"
    assert str(SpawnError(errno.EBADF, STAGE_FDS)) == "[Errno 9] Bad file descriptor (stage: fds)"
    back = pickle.loads(pickle.dumps(err))
    assert (back.errno, back.stage, back.filename) == (errno.ENOENT, STAGE_EXEC, b"foo")


def test_kept_glibc_structures_follow_every_change(tmp_path):
    """issue 12: attributes, file actions and argv/env arrays are built once per distinct
    value and kept; alternating requests must each get exactly their own."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    env_a, env_b = (b"V=a",), (b"V=b",)
    script = b'echo "$V $(pwd) $(cut -d" " -f5 /proc/$$/stat) $$"'
    for _ in range(2):
        for env, cwd, pgroup in ((env_a, a, 0), (env_b, b, None), (env_a, b, None)):
            code, out = run(SH, [b"sh", b"-c", script], env, cwd=os.fsencode(cwd),
                            pgroup=pgroup)
            v, where, pgid, pid = out.decode().split()
            assert code == 0 and v == env[0][2:].decode() and where == str(cwd)
            assert (pgid == pid) == (pgroup == 0)  # a new group only when asked
    r, w = os.pipe()
    try:
        for target in (1, 5, 1):  # the same source fd, another target: other actions
            pid = spawn(SpawnSpec(SH, [b"sh", b"-c", b"echo hi >&%d" % target], [],
                                  [(w, target)]))
            assert reap(pid) == 0
        os.close(w)
        w = -1
        assert read_all(r) == b"hi\n" * 3
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_long_cwd_is_not_kept(tmp_path):
    """What the kept file actions hold is bounded: a cwd path over 4 KiB is used once and its
    actions destroyed (such a path fails the child's chdir anyway: ENAMETOOLONG)."""
    from spawnd import spawner

    before = dict(spawner._ACTIONS)
    long_cwd = b"/".join([b"x" * 200] * 30)
    with pytest.raises(SpawnError) as info:
        spawn(SpawnSpec(b"/bin/true", [b"true"], [], cwd=long_cwd))
    assert info.value.errno == errno.ENAMETOOLONG and info.value.stage == STAGE_CWD
    assert all(key[-1] != long_cwd for key in spawner._ACTIONS)
    assert {k: v for k, v in spawner._ACTIONS.items() if k in before} == before
    assert_no_child()


def test_a_large_environment_is_not_kept():
    """The kept argv/envp arrays hold their strings alive: only small ones are kept."""
    from spawnd import spawner

    big = tuple(b"V%d=" % i + b"x" * 1000 for i in range(40))  # 40 KiB
    small = (b"A=1",)
    for env in (big, small):
        assert reap(spawn(SpawnSpec(b"/bin/true", (b"true",), env))) == 0
    kept = [strings for strings, _ in spawner._ENVP._arrays.values()]
    assert any(s is small for s in kept)
    assert not any(s is big for s in kept)
