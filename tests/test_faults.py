"""Faults, hostile input and resource exhaustion against a real daemon (issue 6, cases 1-13).

Every case ends with :meth:`faultlib.Baseline.check`: the daemon still serves a brand-new
client, and its fd count, zombie count and RSS are back to where they were before the case.
Most cases share one daemon (started with short handshake/frame timeouts), so a leak in
one case would also show up in the next; cases that need a daemon under special limits
start their own.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import spawnd_client as sc
from conftest import Daemon, children_of, fd_count, proc_status, rss_kib, wait_until
from faultlib import (
    HELLO,
    PY,
    Baseline,
    Raw,
    close_fds,
    cpu_seconds,
    frame,
    frame_body,
    gone,
    inode,
    kill_quietly,
    launch,
    open_fds,
    raw_error,
    spawn_msg,
    start_time,
    stop,
    zombies,
)
from test_protocol import BAD_FIELDS, BOMBS

from spawnd import protocol as P

HANDSHAKE = 1.5  # the shared daemon's --handshake-timeout
FRAME = 1.5  # and --frame-timeout


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("faults")
    d = launch(tmp, "--handshake-timeout", str(HANDSHAKE), "--frame-timeout", str(FRAME),
               "--stop-grace", "1")
    yield d
    log = stop(d, clean_log=False)
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture
def base(shared: Daemon) -> Iterator[Baseline]:
    """The shared daemon's idle state before the case; checked again after it."""
    b = Baseline(shared)
    yield b
    Raw.close_all()  # those a failed case left open
    b.check()


def no_more_events(r: Raw, rid: int = 10**6) -> None:
    """Round-trip a ping, then make sure nothing else (no stray exit event) follows."""
    r.send_obj({"t": "ping", "id": rid})
    assert isinstance(r.reply(rid), P.Pong)
    time.sleep(0.2)
    r.send_obj({"t": "ping", "id": rid + 1})
    assert isinstance(r.reply(rid + 1), P.Pong)
    assert not r.events, list(r.events)


def reset_peak(pid: int) -> None:
    """Reset VmHWM (peak RSS) so the next reading is this case's peak."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_kib(pid: int) -> int:
    return int(proc_status(pid)["VmHWM"].split()[0])


def child_fd_report(r: Raw, rid: int, sent: list[int], targets: list[int],
                    check: list[int], tmp: Path) -> dict[int, tuple[int, int] | None]:
    """Spawn a Python child with ``sent`` fds at ``targets``; it reports (st_dev, st_ino) of
    each fd in ``check`` into a file."""
    out = tmp / f"report-{rid}.json"
    code = ("import os, json, sys\n"
            "def f(fd):\n"
            "    try:\n        s = os.fstat(fd)\n    except OSError:\n        return None\n"
            "    return [s.st_dev, s.st_ino]\n"
            "open(sys.argv[1], 'w').write(json.dumps({fd: f(int(fd)) for fd in sys.argv[2:]}))\n")
    r.send_obj(spawn_msg(rid, [PY, "-c", code, str(out), *map(str, check)], fds=targets), sent)
    ev = r.reply(rid)
    assert isinstance(ev, P.Spawned), ev
    ex = r.expect(P.Exit, rid, timeout=20)
    assert ex.returncode == 0
    got = json.loads(out.read_text())
    return {int(k): (tuple(v) if v else None) for k, v in got.items()}


# ---------------------------------------------------------------------------- case 1

@pytest.mark.parametrize("payload,words", [
    (b"\x00\x00", "middle of a frame"),
    (P.HEADER.pack(64), "middle of a frame"),
    (P.HEADER.pack(64) + b"\x82\xa1t", "middle of a frame"),
    (P.HEADER.pack(2**31), "2147483648 bytes"),
    (P.HEADER.pack(2**32 - 1), "4294967295 bytes"),
    (P.HEADER.pack(0), "frame of 0 bytes"),
], ids=["half-header", "header", "header+part", "2^31", "2^32-1", "zero"])
def test_01_frame_header_then_eof_and_huge_lengths(shared: Daemon, base: Baseline,
                                                   payload: bytes, words: str) -> None:
    r = Raw(shared.path)
    r.send(payload)
    r.sock.shutdown(socket.SHUT_WR)  # EOF right after the header
    err = r.closed_with_error()
    r.close()
    assert err.id is None and err.stage == "protocol" and words in err.message, err


@pytest.mark.parametrize("name", [
    "array header 2^32-1", "map header 2^32-1", "str header 2^32-1", "nesting 10^4",
    "nested big array headers", "fixext", "empty ext", "timestamp ext", "int map key",
    "nil map key", "invalid UTF-8", "invalid UTF-8 key", "trailing bytes", "not a map",
    "empty maps x 10^5", "tiny strings", "str over 1 MiB",
])
def test_01_msgpack_bombs(shared: Daemon, base: Baseline, name: str) -> None:
    body, words = BOMBS[name]
    reset_peak(shared.pid)
    before = rss_kib(shared.pid)
    err = raw_error(shared.path, frame_body(body))
    assert err.id is None and words in err.message, err
    grew = peak_kib(shared.pid) - before
    # Only the frame itself is buffered (a few copies); the headers are checked before
    # msgpack preallocates or builds anything (a 5 KB frame of nested array headers used to
    # take 67 MiB, a 4 MiB frame of tiny containers 300 MiB).
    limit = 4 * len(body) // 1024 + 2048
    assert grew < limit, f"peak RSS grew {grew} KiB for a {len(body)}-byte frame"


def test_01_repeated_bombs_do_not_accumulate(shared: Daemon, base: Baseline) -> None:
    """Regression: a fatal error's traceback formed a cycle holding the frame and what
    msgpack had built, so every bomb kept ~20 MiB until the cyclic GC ran."""
    body, _ = BOMBS["tiny strings"]
    for _ in range(4):
        raw_error(shared.path, frame_body(body))
    assert rss_kib(shared.pid) < base.rss + 8 * 1024


def test_01_unhashable_type_is_an_error_not_a_crash(shared: Daemon, base: Baseline) -> None:
    r = Raw(shared.path)
    r.send_obj({"t": [1, 2], "id": 3})
    err = r.reply(3)
    assert isinstance(err, P.Error) and err.field == "t"
    no_more_events(r)  # the connection survived
    r.close()


# ---------------------------------------------------------------------------- case 2

def test_02_wrong_types_in_every_field(shared: Daemon, base: Baseline) -> None:
    """All refused requests pipelined in one write: each gets its own EINVAL naming the
    field, and the frames after a refused one are still served (they used to wait for the
    next read)."""
    r = Raw(shared.path)
    cases = [(i + 1, fields, name) for i, (fields, name) in enumerate(BAD_FIELDS)
             if "id" not in fields]
    wire = b"".join(frame({**spawn_msg(rid, [b"/bin/true"]), **fields})
                    for rid, fields, _ in cases)
    wanted = {rid: name for rid, _, name in cases}
    r.send(wire + frame({"t": "ping", "id": 9999}))
    for rid, name in wanted.items():
        err = r.reply(rid)
        assert isinstance(err, P.Error), err
        assert err.errno == errno.EINVAL and err.field == name, (name, err)
        assert name.split("[")[0].split(".")[0] in err.message
    assert isinstance(r.reply(9999), P.Pong)
    assert not children_of(shared.pid)
    no_more_events(r)
    r.close()


def test_02_bad_ids_and_duplicate_keys(shared: Daemon, base: Baseline) -> None:
    r = Raw(shared.path)
    r.send_obj(spawn_msg(-1, [b"/bin/true"]))
    err = r.next()
    assert isinstance(err, P.Error) and err.id is None and err.field == "id"
    body = (b"\x84\xa1t\xa5spawn\xa2id\x07\xa4argv\x91\xa9/bin/true"
            b"\xa4argv\x91\xa9/bin/echo")
    r.send(frame_body(body))
    err = r.reply(7)
    assert isinstance(err, P.Error) and err.field == "argv" and "duplicate" in err.message
    assert err.errno == errno.EINVAL
    no_more_events(r)
    r.close()


@pytest.mark.parametrize("kwargs,field", [
    ({"argv": ["/bin/true", "a\0b"]}, "argv[1]"),
    ({"argv": ["/bin/true"], "env": {"": "x"}}, "env[0]"),
    ({"argv": ["/bin/true"], "env": {"A": "a\0"}}, "env[0]"),
    ({"argv": ["/bin/true"], "cwd": "/tmp\0x"}, "cwd"),
    ({"argv": ["/bin/true"], "executable": "/bin/\0true"}, "executable"),
    ({"argv": []}, "argv"),
    ({"argv": ["/bin/true"], "on_disconnect": "explode"}, "on_disconnect"),
    ({"argv": ["/bin/true"], "grace": -1}, "grace"),
])
def test_02_client_library_gets_einval_naming_the_field(shared: Daemon, base: Baseline,
                                                        kwargs: dict[str, Any],
                                                        field: str) -> None:
    with sc.Client(shared.path, autostart=False) as c:
        long = c.spawn(["/bin/sleep", "0.2"], env={})
        kwargs.setdefault("env", {})
        with pytest.raises(OSError) as info:
            c.spawn(**kwargs)
        assert info.value.errno == errno.EINVAL
        assert info.value.field == field  # type: ignore[attr-defined]
        assert long.wait(10) == 0  # the shared connection is fine


# ---------------------------------------------------------------------------- case 3

ARG_MAX = os.sysconf("SC_ARG_MAX")


@pytest.mark.parametrize("what", ["argv", "env", "one-string"])
def test_03_over_arg_max_is_a_synchronous_e2big(shared: Daemon, base: Baseline,
                                                 what: str) -> None:
    r = Raw(shared.path)
    chunk = b"x" * 1000
    n = ARG_MAX // 1000 + 100  # over ARG_MAX, under the 4 MiB frame limit
    if what == "argv":
        msg = spawn_msg(1, [b"/bin/true", *[chunk] * n])
    elif what == "env":
        msg = spawn_msg(1, [b"/bin/true"], env=[b"V%d=%s" % (i, chunk) for i in range(n)])
    else:
        msg = spawn_msg(1, [b"/bin/true", b"y" * (128 * 1024 + 1)])
    assert len(frame(msg)) <= P.MAX_FRAME
    r.send_obj(msg)
    err = r.reply(1)
    assert isinstance(err, P.Error) and err.errno == errno.E2BIG and err.stage == "exec", err
    assert not children_of(shared.pid)
    no_more_events(r)  # and no exit event for a child that never existed
    r.close()


def test_03_client_library_e2big_keeps_the_connection(shared: Daemon, base: Baseline) -> None:
    """Over the frame limit or a decoder limit, the client library refuses the request
    itself: sent, it would make the daemon drop the connection every thread shares."""
    with sc.Client(shared.path, autostart=False) as c:
        long = c.spawn(["/bin/sleep", "0.5"], env={})
        for argv, env in (
            (["/bin/true", "y" * (200 * 1024)], {}),  # the kernel's 128 KiB per string
            (["/bin/true", *["z" * 1000] * (ARG_MAX // 1000 + 10)], {}),  # ARG_MAX
            (["/bin/true", *["z" * 1000] * 5000], {}),  # 5 MB: over the 4 MiB frame
            (["/bin/true", "w" * (P.MAX_STR + 1)], {}),  # over the decoder's 1 MiB string
            (["/bin/true"], {f"K{i}": "v" for i in range(P.MAX_ARRAY + 1)}),
        ):
            with pytest.raises(OSError) as info:
                c.spawn(argv, env=env)
            assert info.value.errno == errno.E2BIG
        assert long.wait(10) == 0
        assert c.transport().broken is None
    assert not children_of(shared.pid)


# ---------------------------------------------------------------------------- case 4

@pytest.mark.parametrize("declared,sent", [(1, 2), (2, 1), (3, 0), (0, 2), (254, 253),
                                           (0, 250)])
def test_04_fd_count_mismatch_refused_and_closed(shared: Daemon, base: Baseline,
                                                 declared: int, sent: int) -> None:
    r = Raw(shared.path)
    fds = open_fds(sent)
    try:
        r.send_obj(spawn_msg(1, [b"/bin/true"], fds=list(range(3, 3 + declared))), fds)
    finally:
        close_fds(fds)
    err = r.reply(1)
    assert isinstance(err, P.Error) and err.field == "fds", err
    assert err.errno in (errno.EBADF, errno.EINVAL)
    no_more_events(r)
    assert wait_until(lambda: fd_count(shared.pid) == base.fds + 1)  # only our connection
    r.close()


@pytest.mark.parametrize("msg", [{"t": "ping", "id": 1},
                                 {"t": "signal", "id": 1, "pid": 1, "signal": 0},
                                 {"t": "nonsense", "id": 1}])
def test_04_fds_on_a_message_that_carries_none(shared: Daemon, base: Baseline,
                                               msg: dict[str, Any]) -> None:
    r = Raw(shared.path)
    fds = open_fds(250)
    try:
        r.send_obj(msg, fds)
    finally:
        close_fds(fds)
    err = r.reply(1)
    assert isinstance(err, P.Error), err
    no_more_events(r)
    assert wait_until(lambda: fd_count(shared.pid) == base.fds + 1)
    r.close()


@pytest.mark.parametrize("how", ["hello-with-fds", "non-map-with-fds", "unfinished-frame",
                                 "bomb-with-fds"])
def test_04_fds_on_a_dying_connection_are_closed(shared: Daemon, base: Baseline,
                                                 how: str) -> None:
    fds = open_fds(20)
    r = Raw(shared.path, hello=how != "hello-with-fds")
    try:
        if how == "hello-with-fds":
            r.send_obj(HELLO, fds)
            r.send_obj({"t": "ping", "id": 1})  # not a hello: fatal
        elif how == "non-map-with-fds":
            r.send_obj([1, 2, 3], fds)
        elif how == "bomb-with-fds":
            r.send(frame_body(b"\x91" * 5000), fds)
        else:
            r.send(frame(spawn_msg(1, [b"/bin/true"], fds=list(range(3, 23))))[:-3], fds)
    finally:
        close_fds(fds)
    if how == "unfinished-frame":
        r.sock.shutdown(socket.SHUT_WR)
    r.closed_with_error()
    r.close()


def test_04_253_fds_really_arrive(shared: Daemon, base: Baseline, tmp_path: Path) -> None:
    """The most one sendmsg can carry: all 253 reach the child, and none stays behind."""
    r = Raw(shared.path)
    fds = open_fds(253)
    targets = list(range(3, 256))
    devnull = inode(fds[0])
    try:
        report = child_fd_report(r, 1, fds, targets, [3, 128, 255, 300], tmp_path)
    finally:
        close_fds(fds)
    assert report[3] == report[128] == report[255] == devnull
    assert report[300] is None
    r.close()


def test_04_truncated_control_message(tmp_path: Path) -> None:
    """Near its fd limit the kernel installs what fits and sets MSG_CTRUNC: the daemon
    closes what it got and refuses that request alone (EMFILE, stage fds); the connection
    lives on (issue 10 case 4; it used to be dropped)."""
    d = launch(tmp_path, prefix=["prlimit", "--nofile=40:40", "--"])
    try:
        b = Baseline(d)
        free = 40 - b.fds - 1  # minus the connection itself
        r = Raw(d.path)
        fds = open_fds(free + 10)
        try:
            r.send_obj(spawn_msg(1, [b"/bin/true"], fds=list(range(3, 3 + len(fds)))), fds)
        finally:
            close_fds(fds)
        err = r.reply(1)
        assert isinstance(err, P.Error) and err.errno == errno.EMFILE, err
        assert err.stage == "fds" and "truncated" in err.message, err
        no_more_events(r)
        r.close()
        b.check()
    finally:
        stop(d)


# ---------------------------------------------------------------------------- case 5

def test_05_fd_permutations_inside_the_daemon(shared: Daemon, base: Baseline,
                                              tmp_path: Path) -> None:
    """Targets chosen to collide with the numbers the daemon receives the fds at (the
    lowest free ones): a swap, a source equal to its target, a 3-cycle, and 0-2."""
    r = Raw(shared.path)
    rid = 0
    for shape in ("swap", "same", "cycle", "stdio", "stdio-rotated"):
        rid += 1
        used = {int(x) for x in os.listdir(f"/proc/{shared.pid}/fd")}
        free = [n for n in range(3, 64) if n not in used][:3]
        files = [open(tmp_path / f"{shape}-{i}", "wb") for i in range(3)]
        mine = [f.fileno() for f in files]
        if shape == "swap":
            targets = [free[1], free[0]]
        elif shape == "same":
            targets = [free[0], free[1]]
        elif shape == "cycle":
            targets = [free[1], free[2], free[0]]
        elif shape == "stdio":
            targets = [0, 1, 2]
        else:
            targets = [2, 0, 1]
        sent = mine[:len(targets)]
        report = child_fd_report(r, rid, sent, targets, targets, tmp_path)
        for fd, target in zip(sent, targets, strict=True):
            assert report[target] == inode(fd), (shape, target, report)
        for f in files:
            f.close()
    r.close()


CLIENT_SCRIPT = r"""
import json, os, sys
import spawnd_client as sc
path, out, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
REPORT = ("import os, json, sys\n"
          "def f(fd):\n"
          "    try:\n        s = os.fstat(fd)\n    except OSError:\n        return None\n"
          "    return [s.st_dev, s.st_ino]\n"
          "open(sys.argv[1], 'w').write(json.dumps({fd: f(int(fd)) for fd in sys.argv[2:]}))\n")
def ino(fd):
    s = os.fstat(fd)
    return [s.st_dev, s.st_ino]
c = sc.Client(path, autostart=False)
res = {"sock": c.transport().sock.fileno()}
def place(name, at):
    fd = os.open(os.path.join(tmp, name), os.O_RDWR | os.O_CREAT, 0o600)
    if fd != at:
        os.dup2(fd, at)
        os.close(fd)
    return at
def run(tag, fds, check):
    rep = os.path.join(tmp, tag + ".json")
    child = c.spawn([sys.executable, "-c", REPORT, rep, *map(str, check)], env={}, fds=fds)
    assert child.wait(20) == 0
    child.close()
    res[tag] = {"got": json.load(open(rep)), "want": {str(t): ino(s) for t, s in fds.items()}}
a, b = place("a", 20), place("b", 21)
run("swap", {20: 21, 21: 20}, [20, 21])
run("same", {20: 20, 21: 21}, [20, 21])
run("stdio", {0: 21, 1: 20, 2: 20}, [0, 1, 2])
run("moved", {5: 20, 0: 21}, [0, 5])
# Popen with our own (closed) stdio and a pipe: the child must not get our socket or pidfds.
p = sc.Popen([sys.executable, "-c", REPORT, os.path.join(tmp, "popen.json"), "0", "1", "2"],
             stdout=sc.PIPE, client=c, env={})
p.communicate(timeout=20)
res["popen"] = json.load(open(os.path.join(tmp, "popen.json")))
res["devnull"] = list(ino(os.open("/dev/null", os.O_RDONLY)))
res["own_sock"] = ino(c.transport().sock.fileno())
open(out, "w").write(json.dumps(res))
"""


@pytest.mark.parametrize("stdio", ["open", "closed"])
def test_05_fd_mapping_from_the_client_library(shared: Daemon, base: Baseline, tmp_path: Path,
                                               stdio: str) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    out = tmp_path / "out.json"
    argv = [PY, str(script), shared.path, str(out), str(tmp_path)]
    if stdio == "closed":
        argv = ["sh", "-c", 'exec "$0" "$@" <&- >&- 2>&-', *argv]
    r = subprocess.run(argv, capture_output=stdio == "open", timeout=60)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["sock"] > 2  # never on 0-2, where Popen(stdin=None) would pass it on
    for tag in ("swap", "same", "stdio", "moved"):
        assert res[tag]["got"] == res[tag]["want"], (tag, res[tag])
    popen = res["popen"]
    assert popen["0"] != res["own_sock"] and popen["2"] != res["own_sock"]
    if stdio == "closed":
        assert popen["2"] == res["devnull"]  # not given: /dev/null, never a stray fd of ours


# ---------------------------------------------------------------------------- case 6

def test_06_failed_execs_are_synchronous_and_leave_no_exit(shared: Daemon, base: Baseline,
                                                           tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not executable\n")
    plain.chmod(0o644)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF-but-not-really" + bytes(100))
    junk.chmod(0o755)
    script = tmp_path / "script"
    script.write_text("#!/nonexistent/interpreter\necho hi\n")
    script.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "tool").write_text("x")
    (bindir / "tool").chmod(0o644)
    cases = [
        (spawn_msg(1, [b"/nonexistent/prog"]), errno.ENOENT),
        (spawn_msg(2, [str(plain).encode()]), errno.EACCES),
        (spawn_msg(3, [str(tmp_path).encode()]), errno.EACCES),
        (spawn_msg(4, [str(junk).encode()]), errno.ENOEXEC),
        (spawn_msg(5, [str(script).encode()]), errno.ENOENT),
        (spawn_msg(6, [b"no-such-tool-anywhere"], env=[b"PATH=/nonexistent:/usr/bin"]),
         errno.ENOENT),
        (spawn_msg(7, [b"tool"], env=[b"PATH=" + str(bindir).encode()]), errno.EACCES),
        (spawn_msg(8, [b"x"], executable=b"/nonexistent/exe"), errno.ENOENT),
        (spawn_msg(9, [b"/bin/true"], cwd=str(tmp_path / "missing").encode()), errno.ENOENT),
    ]
    r = Raw(shared.path)
    r.send(b"".join(frame(m) for m, _ in cases))
    for m, want in cases:
        err = r.reply(m["id"])
        assert isinstance(err, P.Error), (m, err)
        assert err.errno == want, (m["argv"], err)
        assert err.stage in ("exec", "cwd"), err
    assert not children_of(shared.pid)
    no_more_events(r)
    r.close()


# ---------------------------------------------------------------------------- case 7

def _take_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """Start an unrelated ``sleep`` that gets exactly ``pid`` (root: ns_last_pid)."""
    try:
        for _ in range(5):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
            p = subprocess.Popen(["sleep", "30"])
            if p.pid == pid:
                return p
            p.kill()
            p.wait()
    except OSError:
        return None
    return None


def test_07_signals_reach_only_our_own_live_children(shared: Daemon, base: Baseline) -> None:
    mine, other = Raw(shared.path), Raw(shared.path)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        mine.send_obj(spawn_msg(1, [b"/bin/sleep", b"30"]))
        pid = mine.reply(1).pid  # type: ignore[attr-defined]
        other.send_obj(spawn_msg(1, [b"/bin/sleep", b"30"]))
        theirs = other.reply(1).pid  # type: ignore[attr-defined]

        # Signals name a child by its Spawn's request id on the same connection (issue 10
        # case 6): ``pid`` here is the spawn id 1, or a number that names nothing.
        def sig(r: Raw, rid: int, child: int, s: int) -> P.Event:
            r.send_obj({"t": "signal", "id": rid, "child": 1 if child == pid else child,
                        "signal": s})
            return r.reply(rid)

        assert isinstance(sig(mine, 10, pid, 0), P.Ok)
        e = sig(mine, 11, theirs, signal.SIGKILL)  # another connection's child: not ours
        assert isinstance(e, P.Error) and e.errno == errno.ESRCH
        e = sig(mine, 12, bystander.pid, signal.SIGKILL)
        assert isinstance(e, P.Error) and e.errno == errno.ESRCH
        e = sig(mine, 13, os.getpid(), signal.SIGKILL)
        assert isinstance(e, P.Error) and e.errno == errno.ESRCH
        for bad in (-1, 65, 2**31):
            e = sig(mine, 14, pid, bad)
            assert isinstance(e, P.Error) and e.errno == errno.EINVAL and e.field == "signal"
        assert bystander.poll() is None
        assert not proc_status(theirs)["State"].startswith("Z")
        # reaped: ESRCH, and an unrelated process that now has the pid is left alone
        assert isinstance(sig(mine, 15, pid, signal.SIGKILL), P.Ok)
        assert mine.expect(P.Exit, 1).returncode == -signal.SIGKILL
        imposter = _take_pid(pid)
        try:
            e = sig(mine, 16, pid, signal.SIGKILL)
            assert isinstance(e, P.Error) and e.errno == errno.ESRCH
            if imposter is not None:
                time.sleep(0.1)
                assert imposter.poll() is None, "the daemon signalled a recycled pid"
        finally:
            if imposter is not None:
                imposter.kill()
                imposter.wait()
        other.send_obj({"t": "signal", "id": 17, "child": 1, "signal": signal.SIGTERM})
        assert isinstance(other.reply(17), P.Ok)
        assert other.expect(P.Exit, 1).returncode == -signal.SIGTERM
    finally:
        bystander.kill()
        bystander.wait()
        mine.close()
        other.close()


# ---------------------------------------------------------------------------- case 8

KILLED_MID_MESSAGE = r"""
import socket, sys, msgpack, time
path, marker, cut = sys.argv[1], sys.argv[2], int(sys.argv[3])
def frame(o):
    b = msgpack.packb(o, use_bin_type=True)
    return len(b).to_bytes(4, "big") + b
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.sendall(frame({"t": "hello", "version": 1}))
msg = frame({"t": "spawn", "id": 1, "argv": [b"/usr/bin/touch", marker.encode()], "env": []})
s.sendall(msg[:cut if cut > 0 else len(msg) + cut])
print("sent", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("cut", [2, 4, 20, -1])
def test_08_client_killed_mid_message_spawns_nothing(shared: Daemon, base: Baseline,
                                                     tmp_path: Path, cut: int) -> None:
    marker = tmp_path / "marker"
    p = subprocess.Popen([PY, "-c", KILLED_MID_MESSAGE, shared.path, str(marker), str(cut)],
                         stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"sent\n"
    with sc.Client(shared.path, autostart=False) as c:
        assert wait_until(lambda: c.ping()["connections"] == 2, 10)
        p.kill()
        p.wait()
        assert wait_until(lambda: c.ping()["connections"] == 1, 10)
    time.sleep(0.2)
    assert not marker.exists()
    assert not children_of(shared.pid)


KILLED_AFTER_SPAWN = r"""
import json, os, sys, time
import spawnd_client as sc
path, tmp = sys.argv[1], sys.argv[2]
c = sc.Client(path, autostart=False)
stubborn = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: open(sys.argv[1], 'a').write('TERM\\n'))\n"
            "open(sys.argv[1], 'a').write('ready\\n')\n"
            "while True: time.sleep(1)\n")
kids = {
    "default": c.spawn(["/bin/sleep", "60"], env={}),
    "stubborn": c.spawn([sys.executable, "-c", stubborn, tmp + "/stubborn.log"], env={},
                        grace=1.0),
    "kill": c.spawn(["/bin/sleep", "60"], env={}, on_disconnect="kill"),
    "keep": c.spawn(["/bin/sleep", "60"], env={}, on_disconnect="keep"),
}
log = tmp + "/stubborn.log"
while not (os.path.exists(log) and "ready" in open(log).read()):
    time.sleep(0.02)
print(json.dumps({k: v.pid for k, v in kids.items()}), flush=True)
time.sleep(60)
"""


def test_08_client_killed_after_spawning(shared: Daemon, base: Baseline, tmp_path: Path) -> None:
    p = subprocess.Popen([PY, "-c", KILLED_AFTER_SPAWN, shared.path, str(tmp_path)],
                         stdout=subprocess.PIPE)
    assert p.stdout is not None
    pids = json.loads(p.stdout.readline())
    started = {pid: start_time(pid) for pid in pids.values()}

    def _gone(pid: int) -> bool:
        return gone(pid, started[pid])

    p.kill()
    p.wait()
    t0 = time.monotonic()
    try:
        # terminate (default): SIGTERM at once; kill: SIGKILL at once
        assert wait_until(lambda: _gone(pids["default"]) and _gone(pids["kill"]), 5)
        # a child that ignores SIGTERM: SIGKILL after its grace (1 s), then reaped
        assert wait_until(lambda: _gone(pids["stubborn"]), 1.0 + 5)
        assert time.monotonic() - t0 >= 0.9
        assert "TERM" in (tmp_path / "stubborn.log").read_text()
        # keep: left running, still the daemon's child, reaped when it ends
        assert pids["keep"] in [q for q, s in children_of(shared.pid) if s != "Z"]
        os.kill(pids["keep"], signal.SIGKILL)
        assert wait_until(lambda: _gone(pids["keep"]), 5)
    finally:
        for pid in pids.values():
            if pid in [q for q, _ in children_of(shared.pid)]:
                kill_quietly(pid)


# ---------------------------------------------------------------------------- case 9

def _closed_within(r: Raw, limit: float) -> tuple[P.Error, float]:
    t0 = time.monotonic()
    err = r.closed_with_error(limit)
    return err, time.monotonic() - t0


def test_09_silent_and_dripping_clients_are_closed(shared: Daemon, base: Baseline) -> None:
    results: dict[str, Any] = {}

    def silent() -> None:
        r = Raw(shared.path, hello=False)
        results["silent"] = _closed_within(r, 3 * HANDSHAKE)
        r.close()

    def drip(name: str, prefix: bytes, payload: bytes, limit: float) -> None:
        r = Raw(shared.path, hello=False)
        r.send(prefix)
        t0 = time.monotonic()
        try:
            for b in payload:
                r.send(bytes([b]))
                time.sleep(0.25)
                if time.monotonic() - t0 > limit:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        results[name] = (r.closed_with_error(limit), time.monotonic() - t0)
        r.close()

    def idle() -> None:
        r = Raw(shared.path)
        time.sleep(2.5 * max(HANDSHAKE, FRAME))  # idle between frames is fine
        r.send_obj({"t": "ping", "id": 1})
        results["idle"] = r.reply(1)
        r.close()

    threads = [
        threading.Thread(target=silent),
        threading.Thread(target=drip, args=("drip-hello", b"", frame(HELLO), 3 * HANDSHAKE)),
        threading.Thread(target=drip, args=("drip-frame", frame(HELLO),
                                            frame(spawn_msg(1, [b"/bin/true"] * 20)),
                                            3 * FRAME)),
        threading.Thread(target=idle),
    ]
    for t in threads:
        t.start()
    # meanwhile, everybody else is served as usual
    served = 0
    with sc.Client(shared.path, autostart=False) as c:
        while any(t.is_alive() for t in threads[:3]):
            assert c.spawn(["/bin/true"], env={}).wait(10) == 0
            served += 1
    for t in threads:
        t.join(30)
    assert served >= 5
    err, took = results["silent"]
    assert err.errno == errno.ETIMEDOUT and "hello" in err.message and took < 3 * HANDSHAKE
    err, took = results["drip-hello"]
    assert err.errno == errno.ETIMEDOUT and "hello" in err.message and took < 3 * HANDSHAKE
    err, took = results["drip-frame"]
    assert err.errno == errno.ETIMEDOUT and "rest of a message" in err.message
    assert took < 3 * FRAME
    assert isinstance(results["idle"], P.Pong)


def test_09_client_that_never_reads_is_bounded(shared: Daemon, base: Baseline) -> None:
    """Pipelined requests whose replies are never read: the daemon stops reading that
    client once its replies back up, instead of queueing them without bound."""
    r = Raw(shared.path)
    r.sock.settimeout(0.5)
    pings = b"".join(frame({"t": "ping", "id": i}) for i in range(1000))
    sent = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 20:
            r.sock.sendall(pings)
            sent += 1000
    except TimeoutError:
        pass  # the daemon stopped reading us: backpressure
    assert time.monotonic() - t0 < 20, "the daemon kept reading a client that never reads"
    assert rss_kib(shared.pid) < base.rss + 8 * 1024
    with sc.Client(shared.path, autostart=False) as c:  # others are unaffected
        assert c.spawn(["/bin/true"], env={}).wait(10) == 0
    # now read: every request that got in is answered, in order
    r.sock.settimeout(10)
    got = 0
    r.sock.shutdown(socket.SHUT_WR)
    while True:
        ev = r.next(10)
        if ev is None:
            break
        if isinstance(ev, P.Error) and ev.id is None:  # our last ping was cut in half
            assert "middle of a frame" in ev.message or "timed out" in ev.message, ev
            continue
        assert isinstance(ev, P.Pong) and ev.id == got % 1000, (got, ev)
        got += 1
    assert 1000 < got <= sent
    r.close()


# ---------------------------------------------------------------------------- case 10

def test_10_out_of_fds_no_busy_loop(tmp_path: Path) -> None:
    d = launch(tmp_path, "--handshake-timeout", "60", prefix=["prlimit", "--nofile=64:64", "--"])
    flood: list[socket.socket] = []
    try:
        b = Baseline(d)
        c = sc.Client(d.path, autostart=False)
        waiting = c.spawn(["/bin/sleep", "2"], env={})
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(d.path)
            except BlockingIOError:
                s.close()
                break
            s.send(frame(HELLO))
            flood.append(s)
        assert wait_until(lambda: fd_count(d.pid) >= 63, 10), fd_count(d.pid)
        cpu0, t0 = cpu_seconds(d.pid), time.monotonic()
        time.sleep(2.0)
        cpu = cpu_seconds(d.pid) - cpu0
        wall = time.monotonic() - t0
        assert cpu < 0.25 * wall, f"daemon used {cpu:.2f}s CPU in {wall:.2f}s out of fds"
        # the exit stream of a connection made before the flood still flows
        assert waiting.wait(10) == 0
        # and a spawn now fails cleanly (no fd for the executable or the pidfd), or works
        try:
            c.spawn(["/bin/true"], env={}).wait(10)
        except OSError as e:
            assert e.errno == errno.EMFILE, e
        assert c.ping()["pid"] == d.pid
        for s in flood:
            s.close()
        flood.clear()
        # accept resumes once fds are free
        assert wait_until(lambda: fd_count(d.pid) <= b.fds + 1, 15), fd_count(d.pid)
        c.close()
        b.check()
        log = d.log.read_text()
        assert "refused a new connection (EMFILE)" in log  # issue 10: told, not left hanging
    finally:
        for s in flood:
            s.close()
        stop(d)


def test_10_one_fd_left_the_spawn_is_still_answered(tmp_path: Path) -> None:
    """With one free fd (besides the request's cwd fd) the child is started and its pidfd
    opened (this used to raise in the handler and drop the connection, killing the new
    child). No copy of the pidfd is needed for a reply written at once (issue 12), so the
    client gets its pidfd even here; a reply that has to wait in the queue carries a copy,
    and without a free fd for it the client gets its child without a pidfd."""
    limit = 32
    d = launch(tmp_path, "--handshake-timeout", "60",
               prefix=["prlimit", f"--nofile={limit}:{limit}", "--"])
    flood: list[socket.socket] = []
    try:
        b = Baseline(d)
        c = sc.Client(d.path, autostart=False)
        c.ping()
        while fd_count(d.pid) < limit:
            n = fd_count(d.pid)
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.path)
            s.send(frame(HELLO))
            flood.append(s)
            assert wait_until(lambda n=n: fd_count(d.pid) > n, 10)
        flood.pop().close()
        flood.pop().close()  # one for the caller's cwd fd that comes with the request
        assert wait_until(lambda: fd_count(d.pid) == limit - 2, 10)
        child = c.spawn(["/bin/sleep", "0.1"], env={})
        assert child.pidfd is not None
        assert child.wait(10) == 0
        assert c.transport().broken is None
        for s in flood:
            s.close()
        flood.clear()
        c.close()
        # The daemon sees those EOFs in its own time: the fds are free once it has.
        assert wait_until(lambda: fd_count(d.pid) <= b.fds + 1, 15), fd_count(d.pid)
        b.check()
    finally:
        for s in flood:
            s.close()
        log = stop(d)
    assert "no pidfd for child" not in log


# ---------------------------------------------------------------------------- case 11

def _policy(tmp_path: Path, limits: str = "") -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(f'version = 1\n{limits}\n[[allow]]\nusers = ["root"]\nexecutables = ["/"]\n')
    p.chmod(0o600)
    return p


def _exhaust(c: sc.Client, limit: int) -> tuple[list[sc.Child], OSError]:
    kids = []
    for _ in range(limit):
        try:
            kids.append(c.spawn(["/bin/sleep", "30"], env={}))
        except OSError as e:
            return kids, e
    raise AssertionError(f"{limit} spawns and no refusal")


def test_11_rlimit_nproc_gives_eagain_then_recovers(tmp_path: Path) -> None:
    """A real RLIMIT_NPROC: the daemon's real uid is nobody's (root is exempt) and it lacks
    CAP_SYS_RESOURCE/CAP_SYS_ADMIN; it keeps euid 0 so it can still run this Python."""
    nobody = 65534
    busy = [int(pid) for pid in os.listdir("/proc") if pid.isdigit()
            and _ruid(int(pid)) == nobody]
    limit = 4 + len(busy)
    d = launch(tmp_path, "--config", str(_policy(tmp_path)),
               prefix=["prlimit", f"--nproc={limit}:{limit}", "--", "setpriv",
                       f"--ruid={nobody}", "--bounding-set=-sys_resource,-sys_admin", "--"])
    try:
        b = Baseline(d)
        c = d.client()
        kids, err = _exhaust(c, 20)
        assert 1 <= len(kids) < limit, len(kids)
        assert err.errno == errno.EAGAIN and isinstance(err, BlockingIOError), err
        assert err.stage == "exec"  # type: ignore[attr-defined]
        assert len([k for k, s in children_of(d.pid) if s != "Z"]) == len(kids)
        kids[0].kill()
        assert kids[0].wait(10) == -signal.SIGKILL
        again = c.spawn(["/bin/sh", "-c", "exit 3"], env={})
        assert again.wait(10) == 3
        for k in kids[1:]:
            k.kill()
            assert k.wait(10) == -signal.SIGKILL
        c.close()
        b.check()
    finally:
        stop(d)


def _ruid(pid: int) -> int | None:
    try:
        return int(proc_status(pid)["Uid"].split()[0])
    except (FileNotFoundError, ProcessLookupError, KeyError):
        return None


def test_11_policy_max_children_gives_eagain_then_recovers(tmp_path: Path) -> None:
    d = launch(tmp_path, "--config", str(_policy(tmp_path, "[limits]\nmax_children = 3")))
    try:
        b = Baseline(d)
        c = d.client()
        kids, err = _exhaust(c, 10)
        assert len(kids) == 3
        assert err.errno == errno.EAGAIN and err.stage == "limit", err  # type: ignore[attr-defined]
        kids[0].kill()
        kids[0].wait(10)
        assert c.spawn(["/bin/true"], env={}).wait(10) == 0
        for k in kids[1:]:
            k.kill()
            k.wait(10)
        c.close()
        b.check()
    finally:
        stop(d)


# ---------------------------------------------------------------------------- case 12

FAULTS = r"""
import spawnd.server as _s
_dispatch = _s.ConnectionHandler._dispatch
async def _faulty_dispatch(self, ev):
    if getattr(ev, "argv", (None,))[0] == b"/fault/in-dispatch":
        raise RuntimeError("injected fault in the request handler")
    return await _dispatch(self, ev)
_s.ConnectionHandler._dispatch = _faulty_dispatch
_exited = _s.ConnectionHandler._child_exited
def _faulty_exited(self, child):
    if child.returncode == 77:
        raise RuntimeError("injected fault delivering an exit")
    return _exited(self, child)
_s.ConnectionHandler._child_exited = _faulty_exited
"""


def test_12_exception_in_a_handler_kills_only_that_connection(tmp_path: Path) -> None:
    d = launch(tmp_path, preamble=FAULTS)
    try:
        b = Baseline(d)
        bystander = d.client()
        steady = bystander.spawn(["/bin/sleep", "1"], env={})
        for where in ("dispatch", "exit"):
            victim = sc.Client(d.path, autostart=False)
            orphan = victim.spawn(["/bin/sleep", "30"], env={}, grace=1)
            with pytest.raises(ConnectionError):
                if where == "dispatch":
                    victim.spawn(["/fault/in-dispatch"], env={})
                else:
                    victim.spawn(["/bin/sh", "-c", "exit 77"], env={}).wait(10)
            with pytest.raises(ConnectionError):
                orphan.wait(10)
            # its children met their on_disconnect fate (terminate) and were reaped
            assert wait_until(lambda pid=orphan.pid: pid not in [p for p, _ in
                                                                 children_of(d.pid)], 10)
            # the client library reconnects by itself for the next request
            assert victim.spawn(["/bin/true"], env={}).wait(10) == 0
            victim.close()
        assert steady.wait(10) == 0  # another connection's exit stream was not touched
        assert bystander.ping()["pid"] == d.pid
        bystander.close()
        b.check()
    finally:
        log = stop(d, clean_log=False)
    assert "injected fault in the request handler" in log
    assert "injected fault delivering an exit" in log
    assert "delivering the exit of child" in log


# ---------------------------------------------------------------------------- case 13

def test_13_daemon_killed_while_clients_wait(tmp_path: Path) -> None:
    d = launch(tmp_path)
    c = sc.Client(d.path, autostart=False)
    kids = [c.spawn(["/bin/sleep", "30"], env={}) for _ in range(3)]
    outcomes: dict[str, BaseException | object] = {}

    def wait_child(i: int) -> None:
        try:
            outcomes[f"wait{i}"] = kids[i].wait(30)
        except BaseException as e:  # noqa: BLE001
            outcomes[f"wait{i}"] = e

    def in_flight() -> None:
        try:
            outcomes["spawn"] = c.spawn(["/bin/true"], env={})
        except BaseException as e:  # noqa: BLE001
            outcomes["spawn"] = e

    def async_waiter(ready: threading.Event) -> None:
        import trio

        async def main() -> None:
            async with sc.AsyncClient(d.path, autostart=False) as ac:
                child = await ac.spawn(["/bin/sleep", "30"], env={})
                outcomes["async-pid"] = child.pid
                ready.set()
                try:
                    outcomes["async"] = await child.wait()
                except BaseException as e:  # noqa: BLE001
                    outcomes["async"] = e

        trio.run(main)

    ready = threading.Event()
    threads = [threading.Thread(target=wait_child, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=async_waiter, args=(ready,)))
    for t in threads:
        t.start()
    assert ready.wait(10)
    os.kill(d.pid, signal.SIGSTOP)  # the next request is sent, never answered
    threads.append(threading.Thread(target=in_flight))
    threads[-1].start()
    time.sleep(0.3)
    orphans = [k.pid for k in kids] + [outcomes["async-pid"]]
    t0 = time.monotonic()
    d.proc.kill()
    d.proc.wait()
    for t in threads:
        t.join(10)
    took = time.monotonic() - t0
    try:
        assert not any(t.is_alive() for t in threads), outcomes
        assert took < 5, took
        for k in ("wait0", "wait1", "wait2", "spawn", "async"):
            assert isinstance(outcomes[k], ConnectionError), (k, outcomes[k])
        # a restarted daemon serves the same client object, which reconnects by itself
        d2 = launch(tmp_path)
        try:
            assert c.spawn(["/bin/sh", "-c", "exit 4"], env={}).wait(10) == 4
            assert c.ping()["pid"] == d2.pid
            c.close()
            Baseline(d2).check()
        finally:
            stop(d2)
    finally:
        for pid in orphans:
            kill_quietly(pid)  # the dead daemon's children: now init's


# ---------------------------------------------------------------------------- misc

def test_daemon_log_and_threads_after_the_suite(shared: Daemon) -> None:
    """Runs last in this module: the shared daemon took every case above and is fine."""
    assert shared.proc.poll() is None
    assert proc_status(shared.pid)["Threads"] == "1"
    assert not zombies(shared.pid)
    with sc.Client(shared.path, autostart=False) as c:
        assert c.spawn(["/bin/true"], env={}).wait(10) == 0
    assert stat.S_ISSOCK(os.stat(shared.path).st_mode)
    assert "Traceback" not in shared.log.read_text()


def test_queued_spawned_replies_carry_their_own_pidfd(shared: Daemon, base: Baseline) -> None:
    """issue 12: a reply written at once carries the child table's own pidfd (no copy); a
    reply that waits in the queue of a client that does not read must carry a copy, since
    the table closes its pidfd at the reap, long before this client reads. Every pidfd the
    client finally reads must be a pidfd of its own child."""
    r = Raw(shared.path)
    try:
        n = 300
        for i in range(1, n + 1):  # not read meanwhile: the daemon's send buffer fills
            r.send_obj(spawn_msg(i, [b"/bin/true"]))
        time.sleep(1.0)  # every child has exited and been reaped: the table's fds are closed
        pids: dict[int, int] = {}
        while len(pids) < n:
            ev = r.next()
            assert ev is not None, "EOF"
            if isinstance(ev, P.Spawned):
                assert ev.pidfd and len(ev.fds_received) == 1, ev
                with open(f"/proc/self/fdinfo/{ev.fds_received[0]}") as f:
                    info = dict(line.split(":", 1) for line in f.read().splitlines())
                assert "Pid" in info, info  # a pidfd (of a reaped child: -1 or its pid)
                assert int(info["Pid"]) in (ev.pid, -1), (info, ev.pid)
                pids[ev.id] = ev.pid
    finally:
        r.close()
    base.check()
