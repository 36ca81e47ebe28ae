"""The pure protocol module on its own: frames, limits, hostile input, fd attribution.

No sockets and no processes: fds are plain numbers here. The property tests feed random,
mutated and well-formed streams to both roles and check two things: ``Connection`` only
ever returns events or raises ``ProtocolError``, and every fd handed in comes out exactly
once (in an event, in a refused request's ``fds``, or from ``take_unclaimed_fds``).
"""

from __future__ import annotations

import errno
import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spawnd import protocol as P


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return P.HEADER.pack(len(body)) + body


def body_frame(body: bytes) -> bytes:
    return P.HEADER.pack(len(body)) + body


HELLO = {"t": "hello", "version": 1, "agent": "t"}


def server(*frames: bytes, fds: tuple[int, ...] = ()) -> P.Connection:
    """A server-side connection that has seen a hello (and optionally more bytes)."""
    c = P.Connection("server")
    c.receive_data(frame(HELLO))
    assert isinstance(c.next_event(), P.Hello)
    if frames:
        c.receive_data(b"".join(frames), fds)
    return c


def spawn(rid: int = 1, **fields: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"t": "spawn", "id": rid, "argv": [b"/bin/true"], "env": []}
    m.update(fields)
    return m


def refused(c: P.Connection) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        c.next_event()
    return info.value


# ---------------------------------------------------------------------------- round trips

EVENTS_CLIENT = [
    P.Hello(agent="x"),
    P.Spawn(id=1, argv=(b"a", b"\xff"), env=(b"A=1",), executable=b"/bin/x", fds=(0, 5),
            cwd=b"/", start_new_session=True, process_group=0, on_disconnect="keep", grace=1.5,
            want_pidfd=False, user=1, group=2, extra_groups=(3, 4), umask=0o22,
            capabilities=("CAP_KILL",), rlimits={"NOFILE": (1, 2)}, no_new_privs=True),
    P.Signal(id=2, child=3, signal=9),
    P.Ping(id=3),
]
EVENTS_SERVER = [
    P.Hello(agent="spawnd", pid=7),
    P.Spawned(id=1, pid=2, pidfd=True),
    P.Ok(id=2),
    P.Pong(id=3, pid=1, children=2, connections=3),
    P.Error(id=None, errno=errno.ENOENT, stage="exec", message="m", name="ENOENT",
            field="argv", filename="/x"),
    P.Exit(id=4, pid=5, returncode=-9),
]


@pytest.mark.parametrize("role,events", [("server", EVENTS_CLIENT), ("client", EVENTS_SERVER)])
def test_round_trip_whole_and_byte_by_byte(role: str, events: list[P.Event]) -> None:
    sender = P.Connection("client" if role == "server" else "server")
    wire = b"".join(sender.send(e) for e in events)
    fds_for = {1: (10, 11)} if role == "server" else {1: (12,)}
    for step in (len(wire), 1, 7):
        c = P.Connection(role)
        got = []
        offsets = list(itertools.accumulate(len(sender.send(e)) for e in events))
        pos = 0
        while pos < len(wire):
            end = min(pos + step, len(wire))
            if pos < offsets[1] < end:
                end = offsets[1]  # the kernel ends a read after the bytes that carried fds
            # fds ride with the chunk holding the last byte of the frame that declares them
            fds: tuple[int, ...] = ()
            if pos < offsets[1] <= end:
                fds = fds_for[1]
            c.receive_data(wire[pos:end], fds)
            while (ev := c.next_event()) is not None:
                got.append(ev)
            pos = end
        assert [type(e) for e in got] == [type(e) for e in events]
        assert got[1].fds_received == fds_for[1]  # type: ignore[attr-defined]
        for a, b in zip(got, events, strict=True):
            assert a.to_wire() == b.to_wire()


# ---------------------------------------------------------------------------- case 1: framing

def test_header_then_eof_is_fatal() -> None:
    for partial in (b"\x00\x00", P.HEADER.pack(100), P.HEADER.pack(100) + b"\x80"):
        c = server(partial)
        assert c.next_event() is None and c.in_frame
        c.receive_data(b"")
        e = refused(c)
        assert e.fatal and "middle of a frame" in e.message


@pytest.mark.parametrize("size", [0, P.MAX_FRAME + 1, 2**31, 2**32 - 1])
def test_declared_length_out_of_bounds(size: int) -> None:
    c = server(P.HEADER.pack(size))
    e = refused(c)
    assert e.fatal and e.errno == errno.EMSGSIZE and str(size) in e.message
    with pytest.raises(P.ProtocolError):  # dead for good
        c.next_event()
    with pytest.raises(P.ProtocolError):
        c.receive_data(frame({"t": "ping", "id": 1}))


A32 = b"\xdd"  # array 32 header
M32 = b"\xdf"  # map 32 header

BOMBS = {
    "array header 2^32-1": (A32 + b"\xff\xff\xff\xff", "declares 4294967295 entries"),
    "map header 2^32-1": (M32 + b"\xff\xff\xff\xff", "declares 4294967295 entries"),
    "array over the limit": (A32 + struct.pack(">I", P.MAX_ARRAY + 1) + b"\xc0" * (P.MAX_ARRAY + 1),
                             "max_array_len"),
    "map over the limit": (b"\xde" + struct.pack(">H", 65) + b"".join(
        msgpack.packb(f"k{i}") + b"\xc0" for i in range(65)), "max_map_len"),
    "str header 2^32-1": (b"\xdb\xff\xff\xff\xff", "incomplete"),
    "bin header 2^32-1": (b"\xc6\xff\xff\xff\xff", "incomplete"),
    "str over 1 MiB": (b"\xdb" + struct.pack(">I", P.MAX_STR + 1) + b"x" * (P.MAX_STR + 1),
                       "max_str_len"),
    "bin over 1 MiB": (b"\xc6" + struct.pack(">I", P.MAX_STR + 1) + b"x" * (P.MAX_STR + 1),
                       "max_bin_len"),
    "nesting 10^4": (b"\x91" * 10_000, "too complex"),
    "nesting 10^4 in a map": (b"\x81\xa1t" + b"\x91" * 10_000 + b"\xc0", "too complex"),
    "nested big array headers": ((A32 + struct.pack(">I", P.MAX_ARRAY)) * 1000, "declares"),
    "nested small array headers": ((A32 + struct.pack(">I", 1000)) * 1000, "declares"),
    "fixext": (b"\xd4\x05\x00", "ext"),
    "empty ext": (b"\xc7\x00\x05", "ext types are not allowed"),
    "timestamp ext": (b"\xd6\xff\x00\x00\x00\x00", "ext"),
    "int map key": (b"\x81\x01\x02", "not allowed for map key"),
    "nil map key": (b"\x81\xc0\x02", "not allowed for map key"),
    "invalid UTF-8": (b"\x81\xa1t\xa2\xc3\x28", "not valid UTF-8"),
    "invalid UTF-8 key": (b"\x81\xa2\xff\xfe\x01", "not valid UTF-8"),
    "trailing bytes": (msgpack.packb({"t": "ping", "id": 1}) + b"\xc0", "bytes left"),
    "reserved byte 0xc1": (b"\xc1", "undecodable"),
    "not a map": (msgpack.packb([1, 2, 3]), "must be a map"),
    "empty maps x 10^5": (A32 + struct.pack(">I", 100_000) + b"\x80" * 100_000, "too complex"),
    "tiny strings": (A32 + struct.pack(">I", 40) + (A32 + struct.pack(">I", P.MAX_ARRAY)
                                                     + b"\xa2ab" * P.MAX_ARRAY) * 3,
                     "too complex"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_msgpack_bombs_are_fatal_and_named(name: str) -> None:
    body, words = BOMBS[name]
    c = server(body_frame(body), fds=(40, 41))
    e = refused(c)
    assert e.fatal, e
    assert words in e.message, e.message
    assert len(e.message) < 300
    assert not hasattr(e, "fds")  # fatal: the fds stay queued, handed out exactly once
    assert sorted(c.take_unclaimed_fds()) == [40, 41]


def test_budget_allows_the_biggest_real_requests() -> None:
    """A request at every array limit at once still decodes."""
    m = spawn(argv=[b"a"] * P.MAX_ARRAY, env=[b"K%d=v" % i for i in range(P.MAX_ARRAY)],
              extra_groups=list(range(65536)), rlimits={k: [1, 2] for k in ("NOFILE", "CORE")},
              capabilities=["CAP_KILL"], fds=[])
    c = server(frame(m))
    ev = c.next_event()
    assert isinstance(ev, P.Spawn) and len(ev.argv) == P.MAX_ARRAY


def test_error_messages_are_bounded() -> None:
    c = server(frame({"t": "x" * 100_000, "id": 1}))
    e = refused(c)
    assert not e.fatal and e.field == "t" and len(e.message) < 200
    c = server(frame(spawn(env=[b"A" * 500_000 + b"=1", b"A" * 500_000 + b"=2"])))
    e = refused(c)
    assert e.field == "env[1]" and len(e.message) < 300


def test_unhashable_type_field_is_a_protocol_error() -> None:
    for t in ([1], {"a": 1}, 1, None, b"spawn", True):
        c = server(frame({"t": t, "id": 5}), frame({"t": "ping", "id": 6}))
        e = refused(c)
        assert not e.fatal and e.field == "t" and e.request_id == 5
        assert isinstance(c.next_event(), P.Ping)  # the stream goes on


# ---------------------------------------------------------------------------- case 2: fields

BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"argv": "ls"}, "argv"),
    ({"argv": []}, "argv"),
    ({"argv": [1]}, "argv[0]"),
    ({"argv": [b"a", None]}, "argv[1]"),
    ({"argv": [b"/bin/true", b"a\0b"]}, "argv[1]"),
    ({"argv": ["a\0"]}, "argv[0]"),
    ({"env": "A=1"}, "env"),
    ({"env": [1]}, "env[0]"),
    ({"env": [b"A=1", 2]}, "env[1]"),
    ({"env": [b"NOEQUALS"]}, "env[0]"),
    ({"env": [b"=value"]}, "env[0]"),
    ({"env": [b"A=1", b"B=2", b"A=3"]}, "env[2]"),
    ({"env": [b"A=\0"]}, "env[0]"),
    ({"executable": 1}, "executable"),
    ({"executable": b"/bin/\0true"}, "executable"),
    ({"cwd": 1}, "cwd"),
    ({"cwd": b"/tmp\0"}, "cwd"),
    ({"fds": 3}, "fds"),
    ({"fds": ["3"]}, "fds[0]"),
    ({"fds": [-1]}, "fds[0]"),
    ({"fds": [True]}, "fds[0]"),
    ({"fds": [3.0]}, "fds[0]"),
    ({"fds": [2**40]}, "fds[0]"),
    ({"fds": [3, 3]}, "fds"),
    ({"fds": list(range(254))}, "fds"),
    ({"start_new_session": 1}, "start_new_session"),
    ({"process_group": "0"}, "process_group"),
    ({"process_group": -1}, "process_group"),
    ({"on_disconnect": "explode"}, "on_disconnect"),
    ({"on_disconnect": ["keep"]}, "on_disconnect"),
    ({"grace": "5"}, "grace"),
    ({"grace": -1}, "grace"),
    ({"grace": float("nan")}, "grace"),
    ({"grace": True}, "grace"),
    ({"want_pidfd": "yes"}, "want_pidfd"),
    ({"user": "root"}, "user"),
    ({"user": -1}, "user"),
    ({"group": 2**32}, "group"),
    ({"extra_groups": 5}, "extra_groups"),
    ({"extra_groups": ["wheel"]}, "extra_groups[0]"),
    ({"umask": 0o1000}, "umask"),
    ({"umask": "022"}, "umask"),
    ({"capabilities": "CAP_KILL"}, "capabilities"),
    ({"capabilities": [1]}, "capabilities[0]"),
    ({"rlimits": [1, 2]}, "rlimits"),
    ({"rlimits": {"NOFILE": 5}}, "rlimits.NOFILE"),
    ({"rlimits": {"NOFILE": [1, 2, 3]}}, "rlimits.NOFILE"),
    ({"rlimits": {"NOFILE": ["1", 2]}}, "rlimits.NOFILE"),
    ({"no_new_privs": 0}, "no_new_privs"),
    ({"id": -1}, "id"),
    ({"id": "1"}, "id"),
]


@pytest.mark.parametrize("fields,name", BAD_FIELDS, ids=[f"{n}-{i}" for i, (_, n) in
                                                         enumerate(BAD_FIELDS)])
def test_bad_spawn_fields_are_refused_naming_the_field(fields: dict[str, Any], name: str) -> None:
    c = server(frame(spawn(**fields)), frame({"t": "ping", "id": 99}))
    e = refused(c)
    assert not e.fatal
    assert e.errno == errno.EINVAL
    assert e.field == name, (e.field, e.message)
    assert name.split("[")[0].split(".")[0] in e.message
    assert e.request_id == (None if name == "id" else 1)
    assert isinstance(c.next_event(), P.Ping)  # only that request was refused


@pytest.mark.parametrize("msg,name", [
    ({"t": "signal", "id": 1, "child": "1", "signal": 9}, "child"),
    ({"t": "signal", "id": 1, "child": 1, "signal": True}, "signal"),
    ({"t": "signal", "id": 1, "child": 1}, None),
    ({"t": "ping"}, "id"),
    ({"t": "ping", "id": None}, "id"),
    ({"t": "ping", "id": 2**63}, "id"),
    ({"t": "exit", "id": 1, "pid": 1, "returncode": 0}, "t"),  # a server message
])
def test_other_messages_wrong_types(msg: dict[str, Any], name: str | None) -> None:
    c = server(frame(msg))
    e = refused(c)
    assert not e.fatal and e.errno == errno.EINVAL
    if name is not None:
        assert e.field == name, e


def test_duplicate_map_keys_are_refused() -> None:
    # msgpack itself would silently keep the last "argv"
    body = (b"\x84\xa1t\xa5spawn\xa2id\x07\xa4argv\x91\xa9/bin/true"
            b"\xa4argv\x91\xa7/bin/rm")
    c = server(body_frame(body), frame({"t": "ping", "id": 8}))
    e = refused(c)
    assert not e.fatal and e.field == "argv" and e.request_id == 7
    assert "duplicate" in e.message
    assert isinstance(c.next_event(), P.Ping)
    nested = frame(spawn(rlimits={"NOFILE": [1, 2]}))
    nested = nested.replace(b"\x81\xa6NOFILE\x92\x01\x02",
                            b"\x82\xa6NOFILE\x92\x01\x02\xa6NOFILE\x92\x03\x04")
    c = server(body_frame(nested[4:]))
    e = refused(c)
    assert not e.fatal and "NOFILE" in e.message


def test_first_message_must_be_hello_and_version_checked() -> None:
    c = P.Connection("server")
    c.receive_data(frame({"t": "ping", "id": 1}))
    assert refused(c).fatal
    c = P.Connection("server")
    c.receive_data(frame({"t": "hello", "version": 2}))
    e = refused(c)
    assert e.fatal and e.errno == errno.EPROTONOSUPPORT
    c = server(frame(HELLO))
    e = refused(c)
    assert not e.fatal and "twice" in e.message


# ---------------------------------------------------------------------------- fds

def test_fds_belong_to_the_frame_holding_the_chunks_last_byte() -> None:
    ping = frame({"t": "ping", "id": 1})
    sp = frame(spawn(2, fds=[3, 4]))
    c = server(ping + sp, fds=(50, 51))
    assert isinstance(c.next_event(), P.Ping)
    ev = c.next_event()
    assert isinstance(ev, P.Spawn) and ev.fds_received == (50, 51)
    # A frame split over two reads: the fds came with the first part.
    c = server(sp[:10], fds=(52, 53))
    assert c.next_event() is None
    c.receive_data(sp[10:])
    ev = c.next_event()
    assert isinstance(ev, P.Spawn) and ev.fds_received == (52, 53)


@pytest.mark.parametrize("declared,sent", [(0, 1), (1, 2), (2, 1), (3, 0), (0, 250), (253, 252)])
def test_fd_count_mismatch_refuses_and_returns_the_fds(declared: int, sent: int) -> None:
    fds = tuple(range(100, 100 + sent))
    c = server(frame(spawn(fds=list(range(3, 3 + declared)))), fds=fds)
    e = refused(c)
    assert not e.fatal and e.errno == errno.EBADF and e.field == "fds"
    assert e.fds == fds  # type: ignore[attr-defined]
    assert c.take_unclaimed_fds() == []


def test_too_many_declared_fds_refused_with_all_received() -> None:
    fds = tuple(range(200, 453))  # 253: the most one sendmsg can carry
    c = server(frame(spawn(fds=list(range(3, 257)))), fds=fds)
    e = refused(c)
    assert e.field == "fds" and e.fds == fds  # type: ignore[attr-defined]


@pytest.mark.parametrize("msg", [{"t": "ping", "id": 1},
                                 {"t": "signal", "id": 1, "child": 1, "signal": 0},
                                 {"t": "bogus", "id": 1}])
def test_fds_on_a_message_that_carries_none(msg: dict[str, Any]) -> None:
    c = server(frame(msg), fds=(7, 8))
    e = refused(c)
    assert not e.fatal and e.fds == (7, 8)  # type: ignore[attr-defined]
    assert e.errno in (errno.EBADF, errno.EINVAL)


def test_fds_on_hello_and_before_hello() -> None:
    c = P.Connection("server")
    c.receive_data(frame(HELLO), (5,))
    e = refused(c)
    assert e.fds == (5,)  # type: ignore[attr-defined]


def test_fatal_parse_error_hands_fds_out_once() -> None:
    """Regression: a fatal error used to give its fds both in e.fds and in the unclaimed
    list, so the daemon closed them twice (the second close could hit a reused number)."""
    c = server(frame([1, 2]), fds=(60, 61))
    e = refused(c)
    assert e.fatal and not hasattr(e, "fds")
    assert c.take_unclaimed_fds() == [60, 61]


def test_fds_left_in_an_unfinished_frame_are_unclaimed() -> None:
    c = server(frame(spawn(fds=[3]))[:-1], fds=(70,))
    assert c.next_event() is None
    c.receive_data(b"")
    assert refused(c).fatal
    assert c.take_unclaimed_fds() == [70]


def test_pending_fds_are_bounded() -> None:
    c = server()
    big = frame(spawn(argv=[b"x" * 100_000]))
    fed = []
    with pytest.raises(P.ProtocolError) as info:
        for i in range(len(big)):
            fds = tuple(range(1000 + i * 253, 1000 + (i + 1) * 253))
            fed.extend(fds)
            c.receive_data(big[i:i + 1], fds)
    assert info.value.fatal and info.value.errno == errno.EMFILE
    assert sorted(c.take_unclaimed_fds()) == fed


# ---------------------------------------------------------------------------- properties

class Fds:
    """Fake fd numbers, each handed out once."""

    def __init__(self) -> None:
        self.next = 1000
        self.given: list[int] = []

    def take(self, n: int) -> tuple[int, ...]:
        out = tuple(range(self.next, self.next + n))
        self.next += n
        self.given.extend(out)
        return out


def drive(role: str, chunks: list[tuple[bytes, int]], eof: bool) -> list[P.Event]:
    """Feed ``chunks`` (bytes, number of fds) and check the two invariants."""
    conn = P.Connection(role)
    fds = Fds()
    out: list[int] = []
    events: list[P.Event] = []
    allowed = P.CLIENT_EVENTS if role == "server" else P.SERVER_EVENTS
    feed = [(d, fds.take(n)) for d, n in chunks]
    if eof:
        feed.append((b"", ()))
    for data, these in feed:
        try:
            conn.receive_data(data, these)
        except P.ProtocolError as e:
            assert e.fatal
            assert not hasattr(e, "fds")
            continue
        while True:
            try:
                ev = conn.next_event()
            except P.ProtocolError as e:
                out.extend(getattr(e, "fds", ()))
                if e.fatal:
                    assert not hasattr(e, "fds")
                    break
                continue
            if ev is None:
                break
            assert isinstance(ev, P.Event) and type(ev) in allowed.values()
            out.extend(getattr(ev, "fds_received", ()))
            events.append(ev)
    out.extend(conn.take_unclaimed_fds())
    assert sorted(out) == sorted(fds.given), "an fd was lost or handed out twice"
    return events


def chunked(data: bytes, cuts: list[int], fd_counts: list[int]) -> list[tuple[bytes, int]]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    parts = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    return [(p, fd_counts[i % len(fd_counts)] if fd_counts else 0) for i, p in enumerate(parts)]


binaries = st.binary(max_size=12)
names = st.sampled_from(["hello", "spawn", "signal", "ping", "spawned", "ok", "pong", "error",
                         "exit", "x"])
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
           | st.text(max_size=8) | binaries)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)
FIELD_NAMES = sorted({f for cls in (*P.CLIENT_EVENTS.values(), *P.SERVER_EVENTS.values())
                      for f in cls.__dataclass_fields__} - {"fds_received"})
messages = st.fixed_dictionaries({"t": names}, optional={
    f: values | st.integers(0, 10) | st.lists(binaries, max_size=3) for f in FIELD_NAMES})


def valid_client_frames() -> st.SearchStrategy[tuple[bytes, int]]:
    ids = st.integers(0, 2**63 - 1)
    sp = st.builds(lambda rid, argv, env, n: (P.Connection("client").send(P.Spawn(
        id=rid, argv=tuple(argv), env=tuple(b"K%d=%s" % (i, v) for i, v in enumerate(env)),
        fds=tuple(range(3, 3 + n)))), n),
        ids, st.lists(binaries.filter(lambda b: b"\0" not in b), min_size=1, max_size=4),
        st.lists(st.binary(max_size=5).filter(lambda b: b"\0" not in b), max_size=4),
        st.integers(0, 4))
    simple = st.one_of(
        st.builds(lambda rid: (P.Connection("client").send(P.Ping(id=rid)), 0), ids),
        st.builds(lambda rid, pid, sig: (P.Connection("client").send(
            P.Signal(id=rid, child=pid, signal=sig)), 0), ids, st.integers(0, 2**31),
            st.integers(0, 64)))
    return sp | simple


def valid_server_frames() -> st.SearchStrategy[tuple[bytes, int]]:
    ids = st.integers(0, 2**63 - 1)
    snd = P.Connection("server").send
    return st.one_of(
        st.builds(lambda rid, pid, n: (snd(P.Spawned(id=rid, pid=pid, pidfd=bool(n))), n),
                  ids, st.integers(1, 2**22), st.integers(0, 1)),
        st.builds(lambda rid: (snd(P.Ok(id=rid)), 0), ids),
        st.builds(lambda rid, rc: (snd(P.Exit(id=rid, pid=1, returncode=rc)), 0), ids,
                  st.integers(-64, 255)),
        st.builds(lambda rid, e: (snd(P.Error(id=rid, errno=e, message="m")), 0),
                  st.none() | ids, st.integers(1, 133)),
    )


PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(role=st.sampled_from(["server", "client"]), data=st.binary(max_size=300),
       cuts=st.lists(st.integers(0, 300), max_size=6),
       fd_counts=st.lists(st.integers(0, 3), max_size=4), eof=st.booleans())
def test_random_bytes(role: str, data: bytes, cuts: list[int], fd_counts: list[int],
                      eof: bool) -> None:
    drive(role, chunked(data, cuts, fd_counts), eof)


@PROPERTY
@given(role=st.sampled_from(["server", "client"]), msgs=st.lists(messages, max_size=4),
       fd_counts=st.lists(st.integers(0, 2), max_size=4), hello_first=st.booleans())
def test_random_messages(role: str, msgs: list[dict[str, Any]], fd_counts: list[int],
                         hello_first: bool) -> None:
    frames = [frame(m) for m in msgs]
    if hello_first:
        frames.insert(0, frame({"t": "hello", "version": 1}))
    chunks = [(f, fd_counts[i % len(fd_counts)] if fd_counts else 0)
              for i, f in enumerate(frames)]
    drive(role, chunks, eof=True)


@st.composite
def mutated_stream(draw: st.DrawFn) -> tuple[str, list[tuple[bytes, int]], bool]:
    role = draw(st.sampled_from(["server", "client"]))
    gen = valid_client_frames() if role == "server" else valid_server_frames()
    hello = P.Connection("client").send(P.Hello(agent="p", pid=1))
    frames = [(hello, 0), *draw(st.lists(gen, min_size=1, max_size=5))]
    wire = bytearray(b"".join(f for f, _ in frames))
    # fds ride with each frame's last byte, as the kernel delivers them
    ends = list(itertools.accumulate(len(f) for f, _ in frames))
    counts = {end: n for end, (_, n) in zip(ends, frames, strict=True)}
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "dup"]))
        if not wire:
            break
        i = draw(st.integers(0, len(wire) - 1))
        if op == "flip":
            wire[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del wire[i:i + draw(st.integers(1, 8))]
        elif op == "insert":
            wire[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del wire[i:]
        else:
            wire[i:i] = wire[i:i + draw(st.integers(1, 16))]
    data = bytes(wire)
    cut_at = sorted({e for e in ends if e <= len(data)} | {len(data)}
                    | set(draw(st.lists(st.integers(0, max(len(data), 1)), max_size=4))))
    chunks, prev = [], 0
    for c in cut_at:
        if c > prev:
            chunks.append((data[prev:c], counts.get(c, draw(st.integers(0, 1)))))
            prev = c
    return role, chunks, draw(st.booleans())


@PROPERTY
@given(case=mutated_stream())
def test_mutated_valid_streams(case: tuple[str, list[tuple[bytes, int]], bool]) -> None:
    role, chunks, eof = case
    drive(role, chunks, eof)


@PROPERTY
@given(frames=st.lists(valid_client_frames(), min_size=1, max_size=6))
def test_valid_streams_yield_every_event(frames: list[tuple[bytes, int]]) -> None:
    hello = (P.Connection("client").send(P.Hello(agent="p")), 0)
    events = drive("server", [hello, *frames], eof=True)
    assert len(events) == len(frames) + 1
    for ev, (_, n) in zip(events[1:], frames, strict=True):
        assert len(getattr(ev, "fds_received", ())) == n


# ---------------------------------------------------------------------------- seen spawns
# A Spawn frame equal to one parsed before apart from its id is not decoded again
# (issue 12): every answer must still be exactly what the parser would give.

def _spawn_frame(rid: int, **fields: Any) -> bytes:
    return P.Connection("client").send(P.Spawn(id=rid, argv=(b"/bin/true",), **fields))


def test_a_seen_spawn_gets_its_own_id_and_fds() -> None:
    env = tuple(b"V%d=%d" % (i, i) for i in range(40))
    c = server(_spawn_frame(7, env=env, fds=(0, 1), cwd_fd=True), fds=(30, 31, 32))
    first = c.next_event()
    for rid in (8, 300, 70_000, 2**40):  # every msgpack int width
        c.receive_data(_spawn_frame(rid, env=env, fds=(0, 1), cwd_fd=True), (40, 41, 42))
        ev = c.next_event()
        assert isinstance(ev, P.Spawn) and ev.id == rid and ev.fds_received == (40, 41, 42)
        assert ev.env == first.env and ev.cwd_dir_fd == 42 and ev.child_fds == (40, 41)
    # one byte of the environment differs: parsed afresh, not the seen one
    c.receive_data(_spawn_frame(9, env=env[:-1] + (b"V39=40",), fds=(0, 1), cwd_fd=True),
                   (50, 51, 52))
    assert c.next_event().env[-1] == b"V39=40"


def test_a_seen_spawn_with_the_wrong_fds_is_refused_as_by_the_parser() -> None:
    c = server(_spawn_frame(1, fds=(0, 1)), fds=(30, 31))
    c.next_event()
    c.receive_data(_spawn_frame(2, fds=(0, 1)), (40,))
    e = refused(c)
    assert not e.fatal and e.request_id == 2 and e.errno == errno.EBADF
    assert e.fds == (40,)  # type: ignore[attr-defined]
    assert isinstance(c.next_event(), type(None))


def test_a_seen_spawn_before_hello_is_still_fatal() -> None:
    server(_spawn_frame(1)).next_event()  # seen on another connection
    c = P.Connection("server")
    c.receive_data(_spawn_frame(2))
    e = refused(c)
    assert e.fatal and "hello" in e.message


def test_a_seen_spawn_with_an_id_out_of_range_is_refused() -> None:
    c = server(_spawn_frame(1))
    c.next_event()
    body = _spawn_frame(1)[P.HEADER.size:]
    at = body.index(b"\xa2id") + 3
    bad = body[:at] + b"\xcf" + (2**64 - 1).to_bytes(8, "big") + body[at + 1:]
    c.receive_data(body_frame(bad))
    e = refused(c)
    assert e.field == "id"


def test_a_seen_spawn_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    unpack = P.Connection._unpack
    monkeypatch.setattr(P.Connection, "_unpack",
                        staticmethod(lambda body: calls.append(1) or unpack(body)))
    c = server(_spawn_frame(1, env=(b"A=1",)))
    c.next_event()
    calls.clear()
    c.receive_data(_spawn_frame(2, env=(b"A=1",)))
    assert c.next_event().id == 2
    assert not calls
