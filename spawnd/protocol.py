"""The spawnd wire protocol: bytes in, events out, no I/O (in the spirit of h11).

Both the daemon and the client use this module. A stream carries frames: a 4-byte
big-endian length, then one msgpack map. File descriptors travel beside the bytes
(SCM_RIGHTS); the transport tells :meth:`Connection.receive_data` which fds arrived
with which bytes, and every fd is attributed to the frame holding the last byte of the
read it came with. Nothing here opens, closes or waits on anything: fds are only numbers.

See ``docs/protocol.md`` for the message reference.
"""

from __future__ import annotations

import copy
import errno as _errno
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from itertools import chain
from typing import Any, ClassVar

import msgpack

VERSION = 1

# Limits, with the reason beside each: the daemon must never allocate more than a
# bounded amount per connection, whatever a peer sends.
MAX_FRAME = 4 * 1024 * 1024  # > Linux's default ARG_MAX (2 MiB) so E2BIG comes from exec, not us
MAX_STR = 1024 * 1024  # a single argv/env string; the kernel's own limit is 128 KiB (E2BIG)
MAX_ARRAY = 1 << 17  # argv/env entries; ARG_MAX cannot hold more 8-byte pointers anyway
MAX_MAP = 64  # a message has a handful of fields; rlimits has < 20 keys
MAX_FDS = 253  # SCM_MAX_FD is 253 per sendmsg on Linux; one spawn's fds travel in one sendmsg
MAX_PENDING_FDS = 1024  # fds received but not yet claimed by a complete frame
MAX_FD_TARGET = 1 << 20  # a child's fd numbers; fs.nr_open's default ceiling
# Warm pools (multiprocessing, spawnd/pool.py): an idle interpreter costs ~10-20 MB, so a
# request may ask for a few; the daemon caps the total again (``spawnd serve --pool-max``).
MAX_WARM_SIZE = 16
MAX_WARM_IDLE = 3600.0  # seconds an unused pool may live; longer is memory nobody uses
DEFAULT_WARM_IDLE = 60.0
MAX_CONTAINERS = 64  # arrays + maps in one message; a spawn has < 30 (rlimits has the most)
MAX_ITEMS = 2 * MAX_ARRAY + 65536 + 1024  # entries in all: argv, env, extra_groups, the rest

HEADER = struct.Struct(">I")

STAGE_PROTOCOL = "protocol"
STAGE_POLICY = "policy"
STAGE_LIMIT = "limit"
STAGE_FDS = "fds"
STAGE_CWD = "cwd"
STAGE_EXEC = "exec"

#: Namespaces a Spawn may ask for (``namespaces``): clone(2)'s CLONE_NEW* names.
NAMESPACES = ("user", "net", "ipc", "uts", "mount")

DISCONNECT_POLICIES = ("terminate", "kill", "keep")
DEFAULT_ON_DISCONNECT = "terminate"
DEFAULT_GRACE = 5.0


class ProtocolError(Exception):
    """The peer broke the protocol. ``field`` names the offending field when there is one.

    ``fatal`` means the byte stream can no longer be trusted and the connection must close;
    otherwise only the one request is refused.
    """

    def __init__(self, message: str, *, field: str | None = None, request_id: int | None = None,
                 fatal: bool = False, errno: int = _errno.EINVAL,
                 stage: str = STAGE_PROTOCOL) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage  # what the refusal's Error says failed (STAGE_FDS: lost fds)
        self.field = field
        self.request_id = request_id
        self.fatal = fatal
        self.errno = errno


# ---------------------------------------------------------------------------- events

@dataclass(frozen=True, slots=True)
class Event:
    """Base class: every message on the wire is one event. ``T`` is its wire type."""

    T: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.T}
        for name in _wire_names(type(self)):
            v = getattr(self, name)
            if v is not None:
                d[name] = list(v) if type(v) is tuple else v
        return d


_WIRE_NAMES: dict[type, tuple[str, ...]] = {}
_FIELD_SETS: dict[type, frozenset[str]] = {}


def _wire_names(cls: type) -> tuple[str, ...]:
    """The wire fields of an event class, computed once (``fields()`` per send cost µs)."""
    names = _WIRE_NAMES.get(cls)
    if names is None:
        names = _WIRE_NAMES[cls] = tuple(f.name for f in fields(cls) if f.name != "fds_received")
    return names


_SPAWN_DEFAULTS: list[tuple[str, Any]] = []


def _spawn_defaults() -> list[tuple[str, Any]]:
    """Spawn's wire fields with their default (None for required ones, which are never
    None): a request leaves defaults out (absent means the default to every daemon), so
    both sides encode, check and decode less per spawn."""
    if not _SPAWN_DEFAULTS:
        _SPAWN_DEFAULTS.extend((f.name, None if f.default is MISSING else f.default)
                               for f in fields(Spawn) if f.name != "fds_received")
    return _SPAWN_DEFAULTS


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """First message each way: protocol version and who is talking."""

    T: ClassVar[str] = "hello"
    version: int = VERSION
    agent: str = ""
    pid: int | None = None  # the daemon's pid, in the daemon's hello


@dataclass(frozen=True, slots=True)
class Spawn(Event):
    """Start a child. ``fds`` are the child's fd numbers, in the order the fds were sent."""

    T: ClassVar[str] = "spawn"
    id: int
    argv: tuple[bytes, ...]
    env: tuple[bytes, ...] = ()
    executable: bytes | None = None
    fds: tuple[int, ...] = ()
    cwd: bytes | None = None
    start_new_session: bool = False
    process_group: int | None = None
    on_disconnect: str = DEFAULT_ON_DISCONNECT
    grace: float = DEFAULT_GRACE
    want_pidfd: bool = True
    user: int | None = None
    group: int | None = None
    extra_groups: tuple[int, ...] | None = None
    umask: int | None = None
    capabilities: tuple[str, ...] = ()
    rlimits: dict[str, tuple[int, int]] | None = None
    no_new_privs: bool = False
    # Serve from a warm pool (multiprocessing): {"size": int, "idle_timeout": float}, and
    # "auto": True to size it from observed demand with size as the cap (spawnd/pool.py).
    warm: dict[str, Any] | None = None
    # subprocess's restore_signals: False leaves SIGPIPE/SIGXFSZ ignored in the child.
    restore_signals: bool = True
    # The caller's own process state, inherited like subprocess (issue 11). The client sends
    # it by default; absent fields keep the daemon's state (for a same-uid peer).
    cwd_fd: bool = False  # the LAST fd sent is the caller's cwd (an O_PATH directory)
    limits: dict[str, tuple[int, int]] | None = None  # the caller's rlimits, -1 = unlimited
    nice: int | None = None  # the calling thread's nice value
    affinity: tuple[int, ...] | None = None  # the calling thread's CPUs
    ctty: int | None = None  # a child fd number (one of ``fds``): its controlling terminal
    # New namespaces for the child (issue 11), a subset of NAMESPACES; policy decides.
    namespaces: tuple[str, ...] = ()
    # Only set by the receiving side: the fds that actually came with this frame.
    fds_received: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.T}
        for name, dv in _spawn_defaults():
            v = getattr(self, name)
            if v is None or v is dv or (type(v) is type(dv) and v == dv):
                continue  # None and defaults are what an absent field means
            d[name] = list(v) if type(v) is tuple else v
        if self.rlimits is not None:
            d["rlimits"] = {k: list(v) for k, v in self.rlimits.items()}
        if self.limits is not None:
            d["limits"] = {k: list(v) for k, v in self.limits.items()}
        if not self.cwd_fd:
            d.pop("cwd_fd", None)
        return d

    @property
    def child_fds(self) -> tuple[int, ...]:
        """The received fds that become the child's (``fds`` names their numbers)."""
        return self.fds_received[:len(self.fds)]

    @property
    def cwd_dir_fd(self) -> int | None:
        """The received fd of the caller's cwd, when ``cwd_fd`` says one was sent."""
        return self.fds_received[-1] if self.cwd_fd and self.fds_received else None


@dataclass(frozen=True, slots=True)
class Signal(Event):
    """Send ``signal`` to a child this connection started.

    ``child`` is the request id of the :class:`Spawn` that started it, on this connection:
    never a bare pid, which may belong to another process by the time it is read. A child
    that has been reaped is ESRCH, as ``kill`` would say.
    """

    T: ClassVar[str] = "signal"
    id: int
    child: int
    signal: int


@dataclass(frozen=True, slots=True)
class Ping(Event):
    """Liveness and a little introspection (the reply is :class:`Pong`)."""

    T: ClassVar[str] = "ping"
    id: int


@dataclass(frozen=True, slots=True)
class Spawned(Event):
    """Reply to :class:`Spawn`: the child exists. A pidfd follows as an fd when ``pidfd``."""

    T: ClassVar[str] = "spawned"
    id: int
    pid: int
    pidfd: bool = False
    fds_received: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Ok(Event):
    """Reply to a request that has nothing else to say (e.g. :class:`Signal`)."""

    T: ClassVar[str] = "ok"
    id: int


@dataclass(frozen=True, slots=True)
class Pong(Event):
    T: ClassVar[str] = "pong"
    id: int
    pid: int = 0
    children: int = 0
    connections: int = 0
    exec_helper: str = ""  # which exec helper the daemon uses ("c (path)" / "python (path)")


@dataclass(frozen=True, slots=True)
class Error(Event):
    """A refused request (``id`` set) or a connection-level error (``id`` None).

    Errors are data: an errno and the stage that failed, so clients raise the same
    ``OSError`` subclass ``subprocess`` would, without parsing text.
    """

    T: ClassVar[str] = "error"
    id: int | None = None
    errno: int = _errno.EINVAL
    stage: str = STAGE_PROTOCOL
    message: str = ""
    name: str = ""
    field: str | None = None
    filename: str | None = None


@dataclass(frozen=True, slots=True)
class Exit(Event):
    """A child ended. ``returncode`` follows ``subprocess``: negative for a signal."""

    T: ClassVar[str] = "exit"
    id: int
    pid: int
    returncode: int


# Who may send what: a daemon only accepts CLIENT_EVENTS and vice versa.
CLIENT_EVENTS: dict[str, type[Event]] = {c.T: c for c in (Hello, Spawn, Signal, Ping)}
SERVER_EVENTS: dict[str, type[Event]] = {c.T: c for c in (Hello, Spawned, Ok, Pong, Error, Exit)}


def error_for(exc: OSError | ProtocolError, request_id: int | None, stage: str,
              filename: Any = None) -> Error:
    """Turn an exception into an :class:`Error` reply."""
    num = exc.errno or _errno.EINVAL
    msg = exc.message if isinstance(exc, ProtocolError) else (exc.strerror or str(exc))
    fname = filename if filename is not None else getattr(exc, "filename", None)
    if isinstance(fname, bytes):
        fname = fname.decode("utf-8", "surrogateescape")
    return Error(id=request_id, errno=num, stage=stage, message=msg,
                 name=_errno.errorcode.get(num, ""), field=getattr(exc, "field", None),
                 filename=None if fname is None else str(fname))


# ---------------------------------------------------------------------------- validation

def _want(cond: bool, message: str, name: str, rid: int | None) -> None:
    if not cond:
        raise ProtocolError(f"{name}: {message}", field=name, request_id=rid)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v: Any, name: str, rid: int | None) -> bytes:
    """argv/env/paths may be str (UTF-8) or bin; NUL bytes would truncate them in C."""
    if isinstance(v, str):
        v = v.encode("utf-8", "surrogateescape")
    _want(isinstance(v, bytes), "must be a string", name, rid)
    _want(b"\0" not in v, "contains a NUL byte", name, rid)
    return v


_BYTES_ONLY = frozenset({bytes})


def _texts(items: list[Any], name: str, rid: int | None) -> tuple[bytes, ...]:
    """Validate a list of strings; the fast path does one pass, the slow one names the culprit."""
    if set(map(type, items)) <= _BYTES_ONLY:  # C-level passes: this runs per env entry
        out = tuple(items)
    else:
        out = tuple(v.encode("utf-8", "surrogateescape") if type(v) is str else v for v in items)
        if not set(map(type, out)) <= _BYTES_ONLY:
            out = ()
    if (out or not items) and b"\0" not in b"".join(out):
        return out
    return tuple(_text(v, f"{name}[{i}]", rid) for i, v in enumerate(items))


def _opt_int(m: Mapping[str, Any], key: str, rid: int | None, lo: int = 0,
             hi: int = 2**32 - 1) -> int | None:
    v = m.get(key)
    if v is None:
        return None
    _want(_is_int(v) and lo <= v <= hi, f"must be an integer in [{lo}, {hi}]", key, rid)
    return v


def _bool(m: Mapping[str, Any], key: str, rid: int | None, default: bool) -> bool:
    v = m.get(key, default)
    _want(isinstance(v, bool), "must be a boolean", key, rid)
    return v


def _list(m: Mapping[str, Any], key: str, rid: int | None) -> list[Any]:
    v = m.get(key, [])
    _want(isinstance(v, list), "must be an array", key, rid)
    return v


_ENV_OK: dict[tuple[bytes, ...], None] = {}
_ENV_OK_SIZE = 16
_ENV_OK_BYTES = 32 * 1024


def _env(items: list[Any], rid: int) -> tuple[bytes, ...]:
    """``env``: strings without NUL, each KEY=VALUE with a non-empty KEY, no KEY twice.

    A client sends the same environment with every spawn: an env validated before (equal
    content, compared in C) is not checked again. The answer depends on the content alone.
    """
    key = tuple(items)
    try:
        if key in _ENV_OK:
            return key
    except TypeError:  # unhashable entries: the checks below refuse them
        pass
    env = _texts(items, "env", rid)
    try:  # one pass; any doubt falls to the loop below, which names the culprit
        keys = {e[:e.index(b"=")] for e in env}  # (2x faster than dict(map(split)))
    except ValueError:  # an entry without "="
        keys = set()
    if len(keys) != len(env) or b"" in keys:
        seen: set[bytes] = set()
        for i, b in enumerate(env):
            k, eq, _ = b.partition(b"=")
            _want(bool(eq) and bool(k), "must be KEY=VALUE with a non-empty KEY",
                  f"env[{i}]", rid)
            _want(k not in seen, f"duplicate variable {_short(k.decode('utf-8', 'replace'))}",
                  f"env[{i}]", rid)
            seen.add(k)
    if sum(map(len, env)) <= _ENV_OK_BYTES:  # bounded: at most 16 x 32 KiB kept
        if len(_ENV_OK) >= _ENV_OK_SIZE:
            _ENV_OK.clear()
        _ENV_OK[env] = None
    return env


def _parse_spawn(m: Mapping[str, Any], rid: int, fds: tuple[int, ...]) -> Spawn:
    argv_raw = m.get("argv")
    _want(isinstance(argv_raw, list), "must be an array of strings", "argv", rid)
    _want(len(argv_raw) > 0, "must not be empty (argv[0] is the program name)", "argv", rid)
    argv = _texts(argv_raw, "argv", rid)
    env = _env(_list(m, "env", rid), rid)
    targets = _list(m, "fds", rid)
    if len(targets) > MAX_FDS:  # (messages are formatted only on failure: hot path)
        _want(False, f"at most {MAX_FDS} fds", "fds", rid)
    if not all(type(t) is int and 0 <= t < MAX_FD_TARGET for t in targets):
        for i, t in enumerate(targets):
            _want(_is_int(t) and 0 <= t < MAX_FD_TARGET, "must be an fd number", f"fds[{i}]",
                  rid)
    _want(len(set(targets)) == len(targets), "target fd numbers must be distinct", "fds", rid)
    cwd_fd = _bool(m, "cwd_fd", rid, False)  # (issue 11) one more fd: the caller's cwd
    if len(targets) + cwd_fd != len(fds):
        raise ProtocolError(f"fds: request declares {len(targets) + cwd_fd} fds but {len(fds)} "
                            "arrived with it", field="fds", request_id=rid, errno=_errno.EBADF)
    executable = m.get("executable")
    cwd = m.get("cwd")
    on_disc = m.get("on_disconnect", DEFAULT_ON_DISCONNECT)
    if on_disc not in DISCONNECT_POLICIES:
        _want(False, f"must be one of {DISCONNECT_POLICIES}", "on_disconnect", rid)
    grace = m.get("grace", DEFAULT_GRACE)
    _want(isinstance(grace, (int, float)) and not isinstance(grace, bool) and 0 <= grace <= 3600,
          "must be a number of seconds in [0, 3600]", "grace", rid)
    extra = m.get("extra_groups")
    if extra is not None:
        _want(isinstance(extra, list) and len(extra) <= 65536, "must be an array of gids",
              "extra_groups", rid)
        for i, g in enumerate(extra):
            _want(_is_int(g) and 0 <= g < 2**32 - 1, "must be a gid", f"extra_groups[{i}]", rid)
        extra = tuple(extra)
    caps = _list(m, "capabilities", rid) if "capabilities" in m else ()
    for i, c in enumerate(caps):
        _want(isinstance(c, str) and c.isascii() and 0 < len(c) < 64, "must be a capability name",
              f"capabilities[{i}]", rid)
    rl = m.get("rlimits")
    rlimits: dict[str, tuple[int, int]] | None = None
    if rl is not None:
        _want(isinstance(rl, dict), "must be a map of name to [soft, hard]", "rlimits", rid)
        rlimits = {}
        for k, v in rl.items():
            _want(isinstance(k, str) and len(k) < 32, "keys must be names", "rlimits", rid)
            _want(isinstance(v, list) and len(v) == 2 and all(_is_int(x) and -1 <= x < 2**64
                                                              for x in v),
                  "must be [soft, hard] with -1 for unlimited", f"rlimits.{k}", rid)
            rlimits[k] = (v[0], v[1])
    pg = m.get("process_group")
    if pg is not None:
        _want(_is_int(pg) and 0 <= pg < 2**31, "must be a process group id (0: new group)",
              "process_group", rid)
    warm = m.get("warm")
    if warm is not None:  # warm pool request (multiprocessing): both keys optional
        _want(isinstance(warm, dict) and set(warm) <= {"size", "idle_timeout", "auto"},
              "must be a map with only size, idle_timeout and auto", "warm", rid)
        auto = warm.get("auto", False)  # size from observed demand, up to size (pool.py)
        _want(isinstance(auto, bool), "must be a boolean", "warm.auto", rid)
        size = warm.get("size", 1)
        _want(_is_int(size) and 0 <= size <= MAX_WARM_SIZE,
              f"must be an integer in [0, {MAX_WARM_SIZE}]", "warm.size", rid)
        idle = warm.get("idle_timeout", DEFAULT_WARM_IDLE)
        _want(isinstance(idle, (int, float)) and not isinstance(idle, bool)
              and 0 < idle <= MAX_WARM_IDLE, f"must be a number of seconds in (0, {MAX_WARM_IDLE:g}]",
              "warm.idle_timeout", rid)
        warm = {"size": size, "idle_timeout": float(idle), **({"auto": True} if auto else {})}
    namespaces = _parse_namespaces(m, rid) if "namespaces" in m else ()
    return Spawn(
        id=rid, argv=argv, env=tuple(env),
        executable=None if executable is None else _text(executable, "executable", rid),
        fds=tuple(targets),
        cwd=None if cwd is None else _text(cwd, "cwd", rid),
        start_new_session="start_new_session" in m and _bool(m, "start_new_session", rid, False),
        process_group=pg,
        on_disconnect=on_disc, grace=float(grace),
        want_pidfd="want_pidfd" not in m or _bool(m, "want_pidfd", rid, True),
        user=_opt_int(m, "user", rid, hi=2**32 - 2) if "user" in m else None,
        group=_opt_int(m, "group", rid, hi=2**32 - 2) if "group" in m else None,
        extra_groups=extra, umask=_opt_int(m, "umask", rid, hi=0o777),
        capabilities=tuple(caps), rlimits=rlimits,
        no_new_privs="no_new_privs" in m and _bool(m, "no_new_privs", rid, False),
        warm=warm,
        restore_signals="restore_signals" not in m or _bool(m, "restore_signals", rid, True),
        cwd_fd=cwd_fd, **_parse_inherited(m, rid, targets),
        namespaces=namespaces,
        fds_received=fds,
    )


# Inherited caller state (issue 11): validated here, applied (and for another uid, capped at
# what the kernel says the peer really has) by the daemon.
MAX_CPUS = 8192  # CPU numbers; the kernel's CONFIG_NR_CPUS ceiling
NICE_MIN, NICE_MAX = -20, 19


def _parse_inherited(m: Mapping[str, Any], rid: int, targets: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lim = m.get("limits")
    if lim is not None:
        _want(isinstance(lim, dict), "must be a map of name to [soft, hard]", "limits", rid)
        fast = _limits_fast(lim)
        if fast is not None:
            out["limits"] = fast
            lim = None  # validated: skip the per-entry loop below (it names the culprit)
    if lim is not None:
        limits: dict[str, tuple[int, int]] = {}
        for k, v in lim.items():
            _want(isinstance(k, str) and 0 < len(k) < 32, "keys must be names", "limits", rid)
            _want(isinstance(v, list) and len(v) == 2 and all(_is_int(x) and -1 <= x < 2**64
                                                              for x in v),
                  "must be [soft, hard] with -1 for unlimited", f"limits.{k}", rid)
            limits[k] = (v[0], v[1])
        out["limits"] = limits
    nice = m.get("nice")
    if nice is not None:
        _want(_is_int(nice) and NICE_MIN <= nice <= NICE_MAX,
              f"must be an integer in [{NICE_MIN}, {NICE_MAX}]", "nice", rid)
        out["nice"] = nice
    aff = m.get("affinity")
    if aff is not None:
        _want(isinstance(aff, list) and 0 < len(aff) <= MAX_CPUS
              and set(map(type, aff)) <= _INT_ONLY and min(aff) >= 0 and max(aff) < MAX_CPUS,
              f"must be a non-empty array of CPU numbers below {MAX_CPUS}", "affinity", rid)
        out["affinity"] = tuple(aff)
    ctty = m.get("ctty")
    if ctty is not None:
        _want(_is_int(ctty) and ctty in targets, "must be one of the child's fd numbers (fds)",
              "ctty", rid)
        out["ctty"] = ctty
    return out


_INT_ONLY = frozenset({int})
_LIST_ONLY = frozenset({list})
_STR_ONLY = frozenset({str})


def _limits_fast(lim: dict[Any, Any]) -> dict[str, tuple[int, int]] | None:
    """``limits`` checked in C-level passes (16 entries per spawn); None: let the per-entry
    loop find and name what is wrong. Same rules: names of 1..31 chars, [soft, hard] ints
    (not bools) in [-1, 2**64)."""
    if not lim:
        return {}
    vals = list(lim.values())
    # The same 16 limits come with every spawn: a map seen before (exact types, equal
    # values) gets its validated copy back; building the key is cheaper than checking.
    try:
        flat = tuple(chain.from_iterable(vals))
        key = (tuple(lim), flat, tuple(map(len, vals)))
        hit = _LIMITS_OK.get(key)
    except TypeError:  # not lists of hashables: the checks below refuse them
        hit = None
    if hit is not None and set(map(type, flat)) <= _INT_ONLY and set(map(type, vals)) <= _LIST_ONLY:
        return hit
    if (set(map(type, lim)) <= _STR_ONLY and set(map(type, vals)) <= _LIST_ONLY
            and set(map(len, vals)) == {2} and 0 < min(map(len, lim)) and max(map(len, lim)) < 32):
        flat = tuple(chain.from_iterable(vals))
        if set(map(type, flat)) <= _INT_ONLY and min(flat) >= -1 and max(flat) < 2**64:
            out = dict(zip(lim, map(tuple, vals), strict=True))
            if len(_LIMITS_OK) >= 16:
                _LIMITS_OK.clear()
            _LIMITS_OK[(tuple(lim), flat, tuple(map(len, vals)))] = out
            return out
    return None


#: Validated ``limits`` maps by (names, flattened values, value lengths); see _limits_fast.
_LIMITS_OK: dict[tuple[Any, ...], dict[str, tuple[int, int]]] = {}


def _parse_namespaces(m: Mapping[str, Any], rid: int) -> tuple[str, ...]:
    """``namespaces``: distinct names from NAMESPACES (issue 11)."""
    ns = _list(m, "namespaces", rid)
    for i, name in enumerate(ns):
        _want(isinstance(name, str) and name in NAMESPACES,
              f"must be one of {', '.join(NAMESPACES)}", f"namespaces[{i}]", rid)
    _want(len(set(ns)) == len(ns), "names a namespace twice", "namespaces", rid)
    return tuple(ns)


def _parse(m: Any, fds: tuple[int, ...], allowed: Mapping[str, type[Event]]) -> Event:
    if not isinstance(m, dict):
        raise ProtocolError("a message must be a map", fatal=True)
    t = m.get("t")
    if not isinstance(t, str) or t not in allowed:  # (an unhashable t must not raise TypeError)
        raise ProtocolError(f"unknown message type {_short(t)}", field="t", request_id=_rid(m))
    cls = allowed[t]
    rid = _rid(m)
    if cls is not Hello and cls is not Error:
        _want(rid is not None, "must be a non-negative integer", "id", None)
    if cls is Spawn:
        return _parse_spawn(m, rid, fds)  # type: ignore[arg-type]
    if fds and cls is not Spawned:
        raise ProtocolError(f"fds arrived with a {t!r} message, which carries none",
                            field="fds", request_id=rid, errno=_errno.EBADF)
    kwargs: dict[str, Any] = {name: m[name] for name in _wire_names(cls) if name in m}
    names = _FIELD_SETS.get(cls)
    if names is None:
        names = _FIELD_SETS[cls] = frozenset(f.name for f in fields(cls))
    if "fds_received" in names:
        kwargs["fds_received"] = fds
    try:
        ev = cls(**kwargs)
    except TypeError as e:
        raise ProtocolError(f"{t}: {e}", request_id=rid) from None
    _check_types(ev, rid)
    return ev


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,), "agent": (str,), "pid": (int,), "signal": (int,), "pidfd": (bool,),
    "child": (int,),
    "children": (int,), "connections": (int,), "returncode": (int,), "errno": (int,),
    "stage": (str,), "message": (str,), "name": (str,), "field": (str,), "filename": (str,),
}


# ---------------------------------------------------------------------------- status
# ``spawnd status``: the daemon's state as the asking uid may see it (spawnd/status.py).

@dataclass(frozen=True, slots=True)
class Status(Event):
    """Ask what the daemon is doing (the reply is :class:`StatusReply`)."""

    T: ClassVar[str] = "status"
    id: int


@dataclass(frozen=True, slots=True)
class StatusReply(Event):
    """``report`` is JSON text: its nesting would exceed a message's container limits."""

    T: ClassVar[str] = "status_reply"
    id: int
    report: str = "{}"


CLIENT_EVENTS[Status.T] = Status
SERVER_EVENTS[StatusReply.T] = StatusReply
_SIMPLE_TYPES["report"] = (str,)


def _check_types(ev: Event, rid: int | None) -> None:
    for name in _wire_names(type(ev)):
        want = _SIMPLE_TYPES.get(name)
        if want is not None:
            v = getattr(ev, name)
            if v is not None:
                ok = isinstance(v, want) and not (want == (int,) and isinstance(v, bool))
                _want(ok, f"must be {want[0].__name__}", name, rid)


def _rid(m: Mapping[str, Any]) -> int | None:
    v = m.get("id")
    return v if _is_int(v) and 0 <= v < 2**63 else None


# ---------------------------------------------------------------------------- connection

class Connection:
    """One side of a spawnd conversation: feed bytes (and fds), pull events, send events.

    ``role`` is ``"server"`` (accepts client messages) or ``"client"``. After a fatal
    :class:`ProtocolError` the connection is dead: every later call raises again, and
    :meth:`take_unclaimed_fds` hands back fds no event claimed, for the caller to close.
    """

    def __init__(self, role: str) -> None:
        if role not in ("server", "client"):
            raise ValueError("role must be 'server' or 'client'")
        self.role = role
        self._allowed = CLIENT_EVENTS if role == "server" else SERVER_EVENTS
        self._buf = bytearray()
        self._consumed = 0  # stream offset of self._buf[0]
        self._fds: deque[tuple[int, int]] = deque()  # (stream offset, fd)
        # Stream offsets of reads whose control message was truncated (MSG_CTRUNC): the
        # frame holding that offset lost fds and is refused alone (EMFILE, STAGE_FDS).
        self._lost: deque[int] = deque()
        self._events: deque[Event] = deque()
        self._dead: ProtocolError | None = None
        self.their_hello: Hello | None = None
        self.eof = False

    @property
    def in_frame(self) -> bool:
        """Part of a frame has arrived and the rest has not (timeouts care about this)."""
        return bool(self._buf)

    # -- receiving
    def receive_data(self, data: bytes, fds: Iterable[int] = (), *,
                     truncated: bool = False) -> None:
        """Feed bytes read from the peer and the fds that came with them (b"" = EOF).

        ``truncated``: the read's control message was cut short (``MSG_CTRUNC``: the
        receiver was at its fd limit) and some of its fds were lost. On the server side the
        frame they came with is then refused alone (EMFILE, stage ``fds``), its surviving
        fds handed back on the error; the connection goes on.
        """
        # The kernel ends a read right after the message that carried fds, and that message
        # is one whole frame (one sendmsg), so fds belong to the frame holding the chunk's
        # LAST byte; earlier frames in the same chunk came without fds.
        offset = self._consumed + len(self._buf) + max(len(data) - 1, 0)
        for fd in fds:
            self._fds.append((offset, fd))
        if truncated and data:
            self._lost.append(offset)
        if self._dead is not None:
            raise copy.copy(self._dead)  # a fresh traceback each time
        if not data:
            self.eof = True
            return
        if (self.role == "client" and not self._buf and len(self._fds) <= 1
                and not self._lost and self.their_hello is not None):
            ev = _spawn_reply(data, tuple(fd for _, fd in self._fds))
            if ev is not None:  # exactly one whole reply frame: no buffering, no general parse
                self._fds.clear()
                self._consumed += len(data)
                self._events.append(ev)
                return
        if len(self._fds) > MAX_PENDING_FDS:
            self._die(ProtocolError(f"more than {MAX_PENDING_FDS} fds are waiting for frames",
                                    errno=_errno.EMFILE, field="fds", fatal=True))
        self._buf += data

    def next_event(self) -> Event | None:
        """Return the next complete event, or None if more data is needed.

        Raises :class:`ProtocolError`: fatal ones end the connection; others refuse only
        one request, and the caller may go on reading.
        """
        if self._dead is not None:
            raise copy.copy(self._dead)  # a fresh traceback each time
        if self._events:
            return self._events.popleft()
        while True:
            if len(self._buf) < HEADER.size:
                if self.eof and (self._buf or self._fds):
                    self._die(ProtocolError("connection closed in the middle of a frame",
                                            fatal=True))
                return None
            (size,) = HEADER.unpack_from(self._buf)
            if size == 0 or size > MAX_FRAME:
                self._die(ProtocolError(f"frame of {size} bytes (limit {MAX_FRAME})",
                                        errno=_errno.EMSGSIZE, fatal=True))
            end = HEADER.size + size
            if len(self._buf) < end:
                if self.eof:
                    self._die(ProtocolError("connection closed in the middle of a frame",
                                            fatal=True))
                return None
            body = bytes(self._buf[HEADER.size:end])
            start = self._consumed
            del self._buf[:end]
            self._consumed += end
            fds = self._claim_fds(start, self._consumed)
            lost = self._claim_lost(self._consumed)
            if not lost and self.their_hello is not None and self.role == "server":
                seen = _SEEN_SPAWNS.lookup(body, fds)
                if seen is not None:
                    return seen
            try:
                msg, dup = self._unpack(body)
            except ProtocolError as e:
                self._fds.extendleft((start, fd) for fd in reversed(fds))
                self._die(e)
            if lost and self.role == "server":
                e = ProtocolError(
                    f"fds: the daemon is at its fd limit: {len(fds)} of this request's fds "
                    "arrived, the rest were lost (control message truncated)",
                    field="fds", request_id=_rid(msg) if isinstance(msg, dict) else None,
                    errno=_errno.EMFILE, stage=STAGE_FDS)
                if self.their_hello is None:
                    self._fds.extendleft((start, fd) for fd in reversed(fds))
                    self._die(e)
                e.fds = fds  # type: ignore[attr-defined]  # the caller closes them
                raise e
            try:
                if dup is not None and isinstance(msg, dict):  # msgpack itself keeps the last
                    raise ProtocolError(f"duplicate map key {_short(dup)}", request_id=_rid(msg),
                                        field=dup if isinstance(dup, str) else None)
                ev = _parse(msg, fds, self._allowed)
            except ProtocolError as e:
                if e.fatal:  # the fds go back to the queue: take_unclaimed_fds hands them out
                    self._fds.extendleft((start, fd) for fd in reversed(fds))
                    self._die(e)
                # The frame is consumed; its fds are the caller's to close (and only theirs:
                # never both here and in take_unclaimed_fds, or they would be closed twice).
                e.fds = fds  # type: ignore[attr-defined]
                raise
            if type(ev) is Spawn and self.their_hello is not None:
                _SEEN_SPAWNS.remember(body, ev)
            if self.their_hello is None:
                if not isinstance(ev, Hello):
                    e = ProtocolError("the first message must be hello", field="t", fatal=True)
                    self._fds.extendleft((start, fd) for fd in reversed(fds))
                    self._die(e)
                if ev.version != VERSION:  # type: ignore[union-attr]
                    self._die(ProtocolError(f"unsupported protocol version {ev.version}; "  # type: ignore[union-attr]
                                            f"this side speaks {VERSION}", field="version",
                                            errno=_errno.EPROTONOSUPPORT, fatal=True))
                self.their_hello = ev  # type: ignore[assignment]
            elif isinstance(ev, Hello):
                raise ProtocolError("hello sent twice", field="t")
            return ev

    def _claim_lost(self, end: int) -> bool:
        """Whether a truncated read ended inside the frame ending at ``end``."""
        lost = False
        while self._lost and self._lost[0] < end:
            self._lost.popleft()
            lost = True
        return lost

    def _claim_fds(self, start: int, end: int) -> tuple[int, ...]:
        # fds attributed to this frame (or, stray, to none before it): the parser checks the
        # count against the request, so a stray fd makes that request fail, not leak.
        got = []
        while self._fds and self._fds[0][0] < end:
            got.append(self._fds.popleft()[1])
        return tuple(got)

    @staticmethod
    def _unpack(body: bytes) -> tuple[Any, Any]:
        """The message, and the first duplicated map key in it (or None)."""
        _precheck(body)
        dups = _Duplicates()
        try:
            msg = msgpack.unpackb(
                body, raw=False, strict_map_key=True, use_list=True,
                max_str_len=MAX_STR, max_bin_len=MAX_STR,
                max_array_len=min(MAX_ARRAY, len(body)),  # each entry takes >= 1 byte
                max_map_len=MAX_MAP, max_ext_len=0,
                ext_hook=_refuse_ext, object_pairs_hook=dups.hook,
            )
        except ProtocolError:
            raise
        except msgpack.StackError:
            raise ProtocolError("undecodable message: nested deeper than msgpack's limit "
                                "(StackError)", fatal=True) from None
        except msgpack.ExtraData:
            raise ProtocolError("undecodable message: bytes left after the msgpack object "
                                "(ExtraData)", fatal=True) from None
        except UnicodeDecodeError as e:
            raise ProtocolError(f"undecodable message: a str is not valid UTF-8 ({e.reason} at "
                                f"byte {e.start}); send raw bytes as bin", fatal=True) from None
        except (ValueError, TypeError) as e:
            _precheck(body, quick=False)  # a header that lies about its size: say so
            kind = type(e).__name__
            raise ProtocolError(f"undecodable message ({kind}: {e})", fatal=True) from None
        except Exception as e:  # msgpack raises a few odd types on hostile input
            raise ProtocolError(f"undecodable message ({type(e).__name__})", fatal=True) from None
        return msg, dups.key

    def _die(self, e: ProtocolError) -> None:
        e.fatal = True
        # Keep a copy: e's traceback will hold the frames' locals (the frame body, what msgpack
        # had built) and self, a cycle that only the cyclic GC would free, maybe much later.
        self._dead = copy.copy(e)
        self._buf.clear()
        try:
            raise e
        finally:
            del e  # else this frame (in e's traceback) and e would form a cycle

    def take_unclaimed_fds(self) -> list[int]:
        """Fds that arrived but belong to no event; the caller must close them."""
        fds = [fd for _, fd in self._fds]
        self._fds.clear()
        return fds

    # -- sending
    def send(self, event: Event) -> bytes:
        """Bytes to write for ``event`` (send its fds in the same sendmsg as these bytes)."""
        body = msgpack.packb(event.to_wire(), use_bin_type=True)
        return HEADER.pack(len(body)) + body


_SPAWNED_KEYS = ("t", "id", "pid", "pidfd")
_EXIT_KEYS = ("t", "id", "pid", "returncode")


def _spawn_reply(data: bytes, fds: tuple[int, ...]) -> Spawned | Exit | None:
    """The two replies of every spawn, decoded without the general parser; None: not one.

    Only a read that is exactly one whole frame holding a ``spawned`` or ``exit`` map in
    the daemon's own layout (those keys, that order, exact types, nothing nested) is taken;
    anything else, odd or wrong, goes to the general parser, which decodes or refuses it
    as always. (The client decodes two of these per spawn: this is half its parse cost.)
    """
    if not 16 <= len(data) <= 64 or data[4:7] != b"\x84\xa1t":  # fixmap of 4, "t" first
        return None
    if HEADER.unpack_from(data)[0] != len(data) - HEADER.size:
        return None
    try:
        m = msgpack.unpackb(memoryview(data)[HEADER.size:], raw=False, strict_map_key=True,
                            max_str_len=16, max_bin_len=0, max_array_len=0, max_map_len=4,
                            max_ext_len=0)
    except Exception:  # noqa: BLE001 - not ours to judge: the general parser says why
        return None
    keys = tuple(m) if type(m) is dict else ()
    if keys == _SPAWNED_KEYS:
        rid, pid, pidfd = m["id"], m["pid"], m["pidfd"]
        if (m["t"] == "spawned" and type(rid) is int and 0 <= rid < 2**63
                and type(pid) is int and type(pidfd) is bool):
            return Spawned(id=rid, pid=pid, pidfd=pidfd, fds_received=fds)
    elif keys == _EXIT_KEYS and not fds:
        rid, pid, rc = m["id"], m["pid"], m["returncode"]
        if (m["t"] == "exit" and type(rid) is int and 0 <= rid < 2**63
                and type(pid) is int and type(rc) is int):
            return Exit(id=rid, pid=pid, returncode=rc)
    return None


# A Spawn frame as ``Connection.send`` writes it: after the map header, fixstr "t", fixstr
# "spawn", fixstr "id", then the id (a msgpack uint), then the other fields.
_SPAWN_HEAD = b"\xa1t\xa5spawn\xa2id"
_UINT_SIZE = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}  # uint8..uint64, type byte included


def split_spawn_id(body: bytes) -> tuple[bytes, int, bytes] | None:
    """(everything before the id, the id, everything after it) of a Spawn frame body in
    that layout; None for any other. Both sides use it: the daemon to recognise a frame
    seen before, the client to re-send one with another id."""
    if not body:
        return None
    b0 = body[0]
    at = 1 if 0x80 <= b0 <= 0x8F else 3 if b0 == 0xDE else 0  # fixmap, map16
    if not at or not body.startswith(_SPAWN_HEAD, at):
        return None
    at += len(_SPAWN_HEAD)
    if at >= len(body):
        return None
    t = body[at]
    if t < 0x80:
        size, rid = 1, t
    else:
        size = _UINT_SIZE.get(t, 0)
        if not size:
            return None
        rid = int.from_bytes(body[at + 1:at + size], "big")
        if rid >= 2**63:
            return None
    return body[:at], rid, body[at + size:]


class _SpawnCache:
    """Spawn frames seen before, by their bytes apart from the id: parsed once, not again.

    A client sends the same request (argv, environment, limits, fds) over and over with
    only the id changing; decoding and validating it is most of a spawn's protocol cost.
    Only a frame shaped as our client writes it (``t`` then ``id`` first) is looked up,
    and only one that parsed cleanly is kept, so a hit is exactly what the parser would
    return: equal bytes mean an equal message. The fds that came with it are checked
    again (their count is part of the request's validity); anything else goes to the
    parser. Bounded: at most ``SIZE`` frames of at most ``MAX_BYTES`` each.
    """

    SIZE = 16
    MAX_BYTES = 32 * 1024

    def __init__(self) -> None:
        # frame without its id -> the fields of the Spawn it parsed to, less id and fds
        self._seen: dict[bytes, dict[str, Any]] = {}

    def _split(self, body: bytes) -> tuple[bytes, int] | None:
        """(the frame without its id, the id), or None for any other shape."""
        if len(body) > self.MAX_BYTES:
            return None
        parts = split_spawn_id(body)
        return None if parts is None else (parts[0] + parts[2], parts[1])

    def lookup(self, body: bytes, fds: tuple[int, ...]) -> Spawn | None:
        split = self._split(body)
        if split is None:
            return None
        fields_ = self._seen.get(split[0])
        if fields_ is None or len(fields_["fds"]) + fields_["cwd_fd"] != len(fds):
            return None  # (a wrong fd count: the parser says what is wrong)
        return Spawn(id=split[1], fds_received=fds, **fields_)

    def remember(self, body: bytes, ev: Spawn) -> None:
        split = self._split(body)
        if split is None:
            return
        if len(self._seen) >= self.SIZE:
            self._seen.clear()
        self._seen[split[0]] = {name: getattr(ev, name) for name in _spawn_fields()}


def _spawn_fields() -> tuple[str, ...]:
    return tuple(n for n in _wire_names(Spawn) if n != "id")


_SEEN_SPAWNS = _SpawnCache()


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack ext types are not allowed", fatal=True)


def _short(v: Any, limit: int = 80) -> str:
    """repr for error messages: a peer's 1 MiB string must not become a 1 MiB log line."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + f"...({len(r)} chars)"


class _Duplicates:
    """msgpack's object_pairs_hook: build the dict, remembering the first repeated key."""

    __slots__ = ("key",)

    def __init__(self) -> None:
        self.key: Any = None

    def hook(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        d = dict(pairs)
        if len(d) != len(pairs) and self.key is None:
            seen = set()
            for k, _ in pairs:
                if k in seen:
                    self.key = k
                    break
                seen.add(k)
        return d


# msgpack type bytes of a fixed size (nil, bools, ints, floats) and that size.
_FIXED_SIZE = {b: 1 for b in (*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3)}
_FIXED_SIZE.update({0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3,
                    0xD2: 5, 0xD3: 9})
_U16 = struct.Struct(">H").unpack_from
# Frames up to this size whose bytes hold few possible container headers skip the walk.
_QUICK_BYTES = 8 * 1024
_NOT_CONTAINER = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))
_U32 = struct.Struct(">I").unpack_from


def _precheck(body: bytes, quick: bool = True) -> None:
    """Walk the msgpack headers, building nothing, before msgpack builds anything.

    msgpack preallocates each array at its header: a 5 KB frame of nested headers each
    declaring 131072 entries would allocate up to 1 GiB. Here every declared entry must
    have a byte left to come in, and arrays/maps and their entries are counted (a 4 MiB
    frame of empty maps would be 4 million dicts). Anything else wrong is left to msgpack.
    """
    n = len(body)
    if quick and n <= _QUICK_BYTES and len(body.translate(None, _NOT_CONTAINER)) <= MAX_CONTAINERS:
        # Counting every byte that could be an array/map header (in C) bounds the real
        # headers: with max_array_len <= n (see _unpack), msgpack builds at most
        # MAX_CONTAINERS x n entries here (4 MiB at most), and n objects.
        return
    i = 0
    pending = 1  # objects still to come
    containers = items = 0
    fixed = _FIXED_SIZE
    try:
        while pending:
            b = body[i]
            pending -= 1
            if b == 0xC4:  # bin8: argv and env entries come in runs, skip them in a tight loop
                i += 2 + body[i + 1]
                while pending and body[i] == 0xC4:
                    i += 2 + body[i + 1]
                    pending -= 1
                continue
            if 0xA0 <= b <= 0xBF:  # fixstr (the common cases first)
                i += 1 + (b & 0x1F)
                continue
            if b < 0x80 or b >= 0xE0:  # fixints (limits, ids)
                i += 1
                continue
            if 0x80 <= b <= 0x9F:  # fixmap, fixarray (limits values are [soft, hard])
                kind, count, i = ("map" if b < 0x90 else "array"), b & 0x0F, i + 1
            elif b == 0xD9:  # str8
                i += 2 + body[i + 1]
                continue
            elif (size := fixed.get(b)) is not None:
                i += size
                continue
            elif b == 0xDA or b == 0xC5:
                i += 3 + _U16(body, i + 1)[0]
                continue
            elif b == 0xDB or b == 0xC6:
                i += 5 + _U32(body, i + 1)[0]
                continue
            elif b == 0xDC:
                kind, count, i = "array", _U16(body, i + 1)[0], i + 3
            elif b == 0xDD:
                kind, count, i = "array", _U32(body, i + 1)[0], i + 5
            elif b == 0xDE:
                kind, count, i = "map", _U16(body, i + 1)[0], i + 3
            elif b == 0xDF:
                kind, count, i = "map", _U32(body, i + 1)[0], i + 5
            else:
                return  # ext types, 0xc1: msgpack refuses them in its own words
            containers += 1
            items += count
            pending += 2 * count if kind == "map" else count
            if pending > n - i:
                raise ProtocolError(f"undecodable message: an {kind} header declares {count} "
                                    f"entries with only {max(n - i, 0)} bytes left",
                                    errno=_errno.EMSGSIZE, fatal=True)
            if containers > MAX_CONTAINERS or items > MAX_ITEMS:
                raise ProtocolError(f"message too complex: more than {MAX_CONTAINERS} arrays "
                                    f"and maps or {MAX_ITEMS} entries in all",
                                    errno=_errno.EMSGSIZE, fatal=True)
    except (IndexError, struct.error):
        return  # truncated: msgpack says so
