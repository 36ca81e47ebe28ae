"""The client's per-spawn shortcuts (issue 12) never send stale bytes.

``spawn_request`` reuses the previous request's encoded frame when only the id differs;
the reply path decodes ``spawned``/``exit`` without the general parser. Each test here
changes one thing between two spawns (or feeds one odd frame) and checks that the child,
or the decoded event, sees exactly what an uncached client would have sent.
"""

from __future__ import annotations

import os
import resource
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import spawnd_client as sc
from conftest import Daemon
from spawnd_client import client as C
from spawnd_client._caller import caller_state
from spawnd_client._transport import SpawnFrame, feed

from spawnd import protocol as P


def _out(client: sc.Client, argv: list[str], **kw: Any) -> bytes:
    r = sc.run(argv, capture_output=True, client=client, **kw)
    assert r.returncode == 0, r
    return r.stdout


def _out_in_forked_child(c: sc.Client, change: Any, argv: list[str]) -> bytes:
    """In a forked child of this process: ``change()`` its own state, then run ``argv``
    through the parent's client; its output comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(r)
            change()
            os.write(w, sc.run(argv, capture_output=True, client=c).stdout)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return got


# ---------------------------------------------------------------- the child sees the change

def test_environ_change_between_spawns(client: sc.Client,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPERF_VAR", "one")
    assert _out(client, ["sh", "-c", "echo $CPERF_VAR"]) == b"one\n"
    assert _out(client, ["sh", "-c", "echo $CPERF_VAR"]) == b"one\n"  # served from the cache
    os.environ["CPERF_VAR"] = "two"  # same keys, new value
    assert _out(client, ["sh", "-c", "echo $CPERF_VAR"]) == b"two\n"
    del os.environ["CPERF_VAR"]
    assert _out(client, ["sh", "-c", "echo ${CPERF_VAR-unset}"]) == b"unset\n"


def test_explicit_env_change_between_spawns(client: sc.Client) -> None:
    env = {"PATH": os.environ["PATH"], "V": "a"}
    assert _out(client, ["sh", "-c", "echo $V"], env=env) == b"a\n"
    env["V"] = "b"  # the same dict object, mutated
    assert _out(client, ["sh", "-c", "echo $V"], env=env) == b"b\n"


def test_cwd_change_between_spawns(client: sc.Client, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert _out(client, ["pwd"]) == f"{tmp_path / 'a'}\n".encode()
    assert _out(client, ["pwd"]) == f"{tmp_path / 'a'}\n".encode()
    os.chdir(tmp_path / "b")
    assert _out(client, ["pwd"]) == f"{tmp_path / 'b'}\n".encode()


def test_umask_change_between_spawns(client: sc.Client) -> None:
    old = os.umask(0o022)
    try:
        assert _out(client, ["sh", "-c", "umask"]) == b"0022\n"
        assert _out(client, ["sh", "-c", "umask"]) == b"0022\n"
        os.umask(0o077)
        assert _out(client, ["sh", "-c", "umask"]) == b"0077\n"
        assert _out(client, ["sh", "-c", "umask"], umask=0o027) == b"0027\n"  # explicit wins
        assert _out(client, ["sh", "-c", "umask"]) == b"0077\n"
    finally:
        os.umask(old)


def test_rlimit_change_between_spawns(client: sc.Client) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 200) - 7
    try:
        before = _out(client, ["sh", "-c", "ulimit -n"])
        assert before == _out(client, ["sh", "-c", "ulimit -n"])
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        assert _out(client, ["sh", "-c", "ulimit -n"]) == f"{low}\n".encode()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _out(client, ["sh", "-c", "ulimit -n"]) == before


def test_forked_child_reports_its_own_umask(daemon: Daemon) -> None:
    """The status file kept open for the umask is the parent's in a forked child."""
    old = os.umask(0o022)
    try:
        c = sc.Client(daemon.path, autostart=False)
        assert _out(c, ["sh", "-c", "umask"]) == b"0022\n"  # opens /proc/<pid>/status
        got = _out_in_forked_child(c, lambda: os.umask(0o077), ["sh", "-c", "umask"])
        assert got == b"0077\n"  # the child's own, not the parent's
        assert _out(c, ["sh", "-c", "umask"]) == b"0022\n"  # and the parent's is still its own
        c.close()
    finally:
        os.umask(old)


def test_many_spawns_cross_id_encodings(client: sc.Client) -> None:
    """Ids cross msgpack's int sizes (fixint, uint8, uint16) on one connection."""
    t = client.transport()
    for rid in (120, 250, 65530):
        while t.next_id() < rid:
            pass
        for _ in range(10):
            ch = client.spawn(["/bin/true"], fds={0: 0, 1: 1, 2: 2})
            assert ch.wait() == 0
            ch.close()
    assert client.spawn(["sh", "-c", "exit 3"]).wait() == 3


# ---------------------------------------------------------------- the bytes, exactly

def _request(**over: Any) -> SpawnFrame:
    kw: dict[str, Any] = {"env": None, "fds": {0: 0, 1: 1, 2: 2}, "executable": None,
                          "cwd": None, "extra_groups": None, "capabilities": (),
                          "rlimits": None, "start_new_session": False, "grace": 5.0}
    kw.update(over)
    argv = kw.pop("argv", ["/bin/true"])
    with caller_state() as st:
        frame, _ = C.spawn_request(7, argv, caller=st, **kw)
    return frame


def _uncached(**over: Any) -> bytes:
    C._last_request = None
    try:
        return _request(**over).frame
    finally:
        C._last_request = None


def _check(first: dict[str, Any], second: dict[str, Any], cached: bool = True) -> None:
    """After a request built from ``first`` (twice: cached), one built from ``second``
    must be byte for byte what an uncached client sends for it."""
    C._last_request = None
    a = _request(**first)
    b = _request(**first)
    assert (b._base is a._base) == cached  # the second came from the cache (or not)
    got = _request(**second).frame
    assert got == _uncached(**second)


@pytest.mark.parametrize("first, second, cached", [
    ({}, {"argv": ["/bin/false"]}, True),
    ({}, {"fds": {0: 0, 1: 1}}, True),
    ({}, {"fds": {0: 0, 1: 1, 5: 2}}, True),
    ({}, {"cwd": "/tmp"}, True),
    ({}, {"executable": "/bin/sh"}, True),
    ({"start_new_session": False}, {"start_new_session": 0}, True),
    ({"start_new_session": 1}, {"start_new_session": True}, True),
    ({"grace": 5.0}, {"grace": 5}, True),
    ({"grace": 0.0}, {"grace": -0.0}, False),
    ({}, {"umask": 0o077}, True),
    ({}, {"env": {"A": "1"}}, True),
    ({"env": {"A": "1"}}, {"env": {"A": "2"}}, True),
    ({"env": {"A": "1"}}, {"env": {b"A": b"1", "B": "2"}}, True),
    ({}, {"extra_groups": [1]}, True),
    ({"extra_groups": [1]}, {"extra_groups": [True]}, False),
    ({"capabilities": ()}, {"capabilities": []}, True),
    ({}, {"rlimits": {"NOFILE": (10, 10)}}, True),
    ({"rlimits": {"NOFILE": (10, 10)}}, {"rlimits": {"NOFILE": (10, True)}}, False),
])
def test_reused_bytes_equal_a_fresh_encoding(first: dict[str, Any], second: dict[str, Any],
                                             cached: bool) -> None:
    _check(first, second, cached)


def test_environ_mutation_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPERF_X", "1")
    _check({}, {})
    before = _request().frame
    os.environ["CPERF_X"] = "2"
    after = _request().frame
    assert after != before and after == _uncached()


def test_caller_state_change_is_seen() -> None:
    C._last_request = None
    a = _request().frame
    assert _request().frame == a  # the cache answered
    old = os.umask(0o077 if os.umask(0o022) != 0o077 else 0o022)
    try:
        assert _request().frame == _uncached() != a
    finally:
        os.umask(old)


@pytest.mark.parametrize("rid", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63 - 1])
def test_id_patch_is_msgpacks_own_encoding(rid: int) -> None:
    with caller_state() as st:
        frame, _ = C.spawn_request(1, ["x"], env=None, fds={1: 1}, executable=None, cwd=None,
                                   extra_groups=None, capabilities=(), rlimits=None, caller=st)
    spawn = frame.spawn
    want = P.Connection("client").send(replace(spawn, id=rid))
    got = frame.with_id(rid)
    assert got.frame == want
    assert got.id == rid and got.spawn == replace(spawn, id=rid) and got.argv == (b"x",)
    body = want[P.HEADER.size:]
    assert list(msgpack.unpackb(body))[:2] == ["t", "id"]  # the daemon's cache relies on it


def test_validation_holds_on_every_request() -> None:
    C._last_request = None
    _request()
    with pytest.raises(OSError) as e:
        _request(argv=["x" * (P.MAX_STR + 1)])
    assert e.value.errno == 7  # E2BIG
    with pytest.raises(OSError) as e:
        _request(cwd="c" * (P.MAX_STR + 1))
    assert e.value.errno == 36  # ENAMETOOLONG
    with pytest.raises(OSError) as e:
        _request(fds={i: 0 for i in range(P.MAX_FDS)})  # one more than room (cwd fd)
    assert e.value.errno == 7


# ---------------------------------------------------------------- the reply fast path

def _server_frames(*events: P.Event) -> bytes:
    s = P.Connection("server")
    return b"".join(s.send(ev) for ev in events)


def _client() -> P.Connection:
    c = P.Connection("client")
    c.receive_data(_server_frames(P.Hello(pid=1)))
    assert isinstance(c.next_event(), P.Hello)
    return c


@pytest.mark.parametrize("ev", [
    P.Spawned(id=5, pid=123, pidfd=True, fds_received=(9,)),
    P.Spawned(id=2**40, pid=2**31 - 1, pidfd=False),
    P.Exit(id=5, pid=123, returncode=-signal.SIGKILL),
    P.Exit(id=300, pid=70000, returncode=255),
])
def test_fast_reply_decodes_what_the_parser_does(ev: P.Event) -> None:
    fds = list(getattr(ev, "fds_received", ()))
    data = _server_frames(ev)
    assert P._spawn_reply(data, tuple(fds)) == ev
    slow = _client()
    slow.receive_data(data, fds)
    assert slow.next_event() == ev


@pytest.mark.parametrize("body", [
    {"t": "spawned", "id": 5, "pid": 123, "pidfd": 1},  # not a bool
    {"t": "spawned", "id": -1, "pid": 123, "pidfd": True},  # bad id
    {"t": "spawned", "id": 5, "pid": True, "pidfd": True},  # bool pid
    {"t": "exit", "id": 5, "pid": 123, "returncode": 1.0},
    {"t": "exit", "id": 5, "pid": 123, "returncode": [1]},
    {"t": "exit", "id": 5, "pid": 123, "xreturncode": 1},
    {"t": "ok", "id": 5, "pid": 123, "returncode": 1},
])
def test_odd_replies_go_to_the_general_parser(body: dict[str, Any]) -> None:
    raw = msgpack.packb(body, use_bin_type=True)
    data = P.HEADER.pack(len(raw)) + raw
    assert P._spawn_reply(data, ()) is None
    got: list[P.Event] = []
    c = _client()
    end = feed(c, data, None, got.append)
    # what the client gets is the general parser's verdict: the event, or its refusal
    ref = _client()
    try:
        ref.receive_data(data, [])
        want: Any = ref.next_event()
    except P.ProtocolError as e:
        want = type(e)
    assert (type(end) if end is not None else got[0] if got else None) == want


def test_exit_with_fds_and_partial_frames_take_the_general_path() -> None:
    data = _server_frames(P.Exit(id=1, pid=2, returncode=0))
    assert P._spawn_reply(data, (99,)) is None  # an exit never carries fds: the parser refuses it
    assert P._spawn_reply(data[:-1], ()) is None  # a partial frame
    two = data + _server_frames(P.Exit(id=2, pid=3, returncode=1))
    assert P._spawn_reply(two, ()) is None  # two frames in one read
    c = _client()
    got: list[P.Event] = []
    assert feed(c, data[:5], None, got.append) is None and got == []
    assert c.in_frame
    assert feed(c, data[5:] + two, None, got.append) is None  # rest of the first, then two
    assert [ev.id for ev in got] == [1, 1, 2]  # type: ignore[attr-defined]


def test_forked_child_reads_its_own_limits(daemon: Daemon) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    c = sc.Client(daemon.path, autostart=False)
    assert _out(c, ["sh", "-c", "ulimit -n"]) == f"{soft}\n".encode()  # opens the file
    got = _out_in_forked_child(
        c, lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 11, hard)),
        ["sh", "-c", "ulimit -n"])
    assert got == f"{soft - 11}\n".encode()  # the child's own
    assert _out(c, ["sh", "-c", "ulimit -n"]) == f"{soft}\n".encode()
    c.close()


def test_a_layout_without_t_then_id_is_never_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should Spawn.to_wire ever put other keys first, frames are encoded afresh."""
    orig = P.Spawn.to_wire

    def shuffled(self: P.Spawn) -> dict[str, Any]:
        d = orig(self)
        return {"argv": d.pop("argv"), **d}

    monkeypatch.setattr(P.Spawn, "to_wire", shuffled)
    C._last_request = None
    a = _request()
    assert not a.patchable and C._last_request is None
    b = a.with_id(300)
    assert b.frame == P.HEADER.pack(len(b.frame) - 4) + msgpack.packb(
        shuffled(replace(a.spawn, id=300)), use_bin_type=True)
    assert b.id == 300 and b.spawn.id == 300


def test_environ_snapshot_is_what_was_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached environment is the one encoded, not the live dict."""
    monkeypatch.setenv("CPERF_S", "1")
    C._last_request = None
    a = _request()
    assert C._last_request is not None
    assert C._last_request[1] is not os.environ._data  # type: ignore[attr-defined]
    assert b"CPERF_S=1" in a.spawn.env
    os.environ["CPERF_S"] = "2"
    assert b"CPERF_S=2" in _request().spawn.env


def test_the_quick_replies_are_what_the_connection_returns() -> None:
    """The quick decode sits inside Connection (client role): fds, order and offsets are
    exactly the general path's, with a partial frame or stray bytes before it or not."""
    spawned = P.Spawned(id=5, pid=123, pidfd=True, fds_received=(9,))
    exit_ = P.Exit(id=5, pid=123, returncode=0)
    c = _client()
    c.receive_data(_server_frames(spawned), [9])
    c.receive_data(_server_frames(exit_), [])
    assert [c.next_event(), c.next_event(), c.next_event()] == [spawned, exit_, None]
    data = _server_frames(exit_)
    c.receive_data(data[:3], [])  # a frame in pieces: the general path, then quick again
    c.receive_data(data[3:], [])
    c.receive_data(data, [])
    assert [c.next_event(), c.next_event(), c.next_event()] == [exit_, exit_, None]
