"""The blocking, thread-safe client: ``Client.spawn`` returns a :class:`Child` handle."""

from __future__ import annotations

import errno
import os
import signal as _signal
import threading
import weakref
from _thread import RLock as _RLock  # threading.RLock's own, without its wrapper
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from spawnd import protocol as P

from ._caller import CallerState, caller_state
from ._transport import SpawnFrame, Transport
from .autostart import private_daemon, socket_choice
from .errors import DaemonConnectionError, DaemonUnavailable, RequestNotSent

StrOrBytes = str | bytes | os.PathLike


def _b(v: StrOrBytes) -> bytes:
    return os.fsencode(v)


def encode_env(env: Mapping[Any, Any] | None) -> list[bytes]:
    """``None`` means the caller's own environment, sent explicitly (the daemon adds nothing)."""
    if env is None or env is os.environ:
        # os.environ keeps its entries encoded already (CPython's _Environ._data): joining
        # those is ~10x cheaper than decoding and re-encoding every variable per spawn.
        data = getattr(os.environ, "_data", None)
        if isinstance(data, dict):
            return [k + b"=" + v for k, v in data.items()]
        env = os.environ
    return [_b(k) + b"=" + _b(v) for k, v in env.items()]


def spawn_request(rid: int, argv: Sequence[StrOrBytes], *, env: Mapping[Any, Any] | None,
                  fds: Mapping[int, int] | None, executable: StrOrBytes | None,
                  cwd: StrOrBytes | None, extra_groups: Iterable[int] | None,
                  capabilities: Iterable[str], rlimits: Mapping[str, tuple[int, int]] | None,
                  caller: CallerState | None = None, **flags: Any) -> tuple[SpawnFrame, list[int]]:
    """The encoded request and the fds to send with it, shared by the blocking and async clients.

    What the daemon would refuse for the whole connection fails here, alone, before
    anything is sent: more fds than one ``sendmsg`` may carry (``E2BIG``), over-long
    strings. A closed fd is not looked for (no ``fstat`` per fd): ``sendmsg`` refuses it
    with ``EBADF`` before any byte leaves, and the transport hands that to the caller.

    A request equal to the previous one in everything but its id (same argv, environment,
    fd numbers, options and caller state: the common loop) reuses its encoded bytes with
    the new id; the comparison is exact (values and their types), see :func:`_request_key`.
    """
    global _last_request
    items = sorted(fds.items()) if fds else []
    room = P.MAX_FDS - (caller is not None and caller.cwd_fd is not None)  # our cwd goes too
    if len(items) > room:
        raise OSError(errno.E2BIG, f"{len(items)} fds for one child; spawnd passes at most "
                      f"{room} (SCM_MAX_FD per message, stdio included, less one for the "
                      "caller's cwd)")
    send = [fd for _, fd in items]
    if caller is not None and caller.cwd_fd is not None:
        send.append(caller.cwd_fd)  # issue 11: the request's cwd_fd flag names it
    argv_b = tuple(map(_b, argv))
    if env is None or env is os.environ:
        data = getattr(os.environ, "_data", None)  # bytes -> bytes (see encode_env)
        env_key: Any = data if isinstance(data, dict) else None
        env_list = None
    else:
        env_list = encode_env(env)
        env_key = env_list
    key = _request_key(argv_b, items, executable, cwd, extra_groups, capabilities, rlimits,
                       caller, flags)
    last = _last_request
    if last is not None and key == last[0] and env_key == last[1]:
        return last[2].with_id(rid), send  # validated when it was built: the same content
    if env_list is None:
        if type(env_key) is dict:
            # One snapshot (a C-level copy, atomic for other threads) is both what this
            # request sends and what the next one is compared with.
            env_key = dict(env_key)
            env_list = [k + b"=" + v for k, v in env_key.items()]
        else:
            env_list = encode_env(env)
    if caller is not None:  # inherit the caller's state (issue 11): see _caller.py
        flags = _with_caller(flags, caller)
    req = P.Spawn(
        id=rid, argv=argv_b, env=tuple(env_list),
        executable=None if executable is None else _b(executable),
        fds=tuple(k for k, _ in items), cwd=None if cwd is None else _b(cwd),
        extra_groups=None if extra_groups is None else tuple(extra_groups),
        capabilities=tuple(capabilities), rlimits=None if rlimits is None else dict(rlimits),
        **flags)
    # What the daemon's decoder refuses would cost the whole shared connection: fail alone.
    for strings in (req.argv, req.env):
        if len(strings) > P.MAX_ARRAY or max(map(len, strings), default=0) > P.MAX_STR:
            raise OSError(errno.E2BIG, f"argument list too long for spawnd (at most "
                          f"{P.MAX_ARRAY} strings of at most {P.MAX_STR} bytes)")
    for path in (req.executable, req.cwd):
        if path is not None and len(path) > P.MAX_STR:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
    frame = SpawnFrame.encode(req)
    if env_key is not None and frame.patchable and _cacheable(key):
        _last_request = (key, env_key, frame)
    return frame, send


#: (key, environment, frame) of the last cacheable request built in this process: one
#: immutable tuple, replaced whole, so threads need no lock to read or swap it.
_last_request: tuple[tuple[Any, ...], Any, SpawnFrame] | None = None
#: Types whose equal values always encode to equal bytes (floats: see _request_key).
_EXACT = frozenset({bool, int, float, str, bytes, type(None)})
_EMPTY_OK = frozenset({tuple, list, dict, frozenset, set})


def _request_key(argv_b: tuple[bytes, ...], items: list[tuple[int, int]], executable: Any,
                 cwd: Any, extra_groups: Any, capabilities: Any, rlimits: Any,
                 caller: CallerState | None, flags: dict[str, Any]) -> tuple[Any, ...]:
    """What the request's bytes (but its id) depend on, with each value's type.

    ``==`` alone would confuse values that encode differently (``1``/``True``/``1.0``);
    with the types equal too, a key equal to one that :func:`_cacheable` admitted encodes
    to the very same bytes.
    """
    flat = (executable, cwd, extra_groups, capabilities, rlimits, *[k for k, _ in items],
            *flags.values())
    return (argv_b, tuple(flags), flat, tuple(map(type, flat)),
            None if caller is None else caller.key())


def _cacheable(key: tuple[Any, ...]) -> bool:
    """Every value a plain scalar or an empty container (equal to an empty one means
    empty), no float that equals another encoding (``0.0 == -0.0``) or nothing (NaN)."""
    for v, t in zip(key[2], key[3], strict=True):
        if t not in _EXACT:
            if t in _EMPTY_OK and not v:
                continue
            return False
        if t is float and (v == 0 or v != v):
            return False
    return True


def _with_caller(flags: dict[str, Any], caller: CallerState) -> dict[str, Any]:
    """Add the captured state; an explicit ``umask=`` wins. (The cwd fd is sent last.)"""
    flags = {**flags, **caller.request_fields()}
    if flags.get("umask") is None:
        flags["umask"] = caller.umask
    return flags


def pidfd_signal(pidfd: int | None, sig: int) -> bool:
    """Signal a child through our own pidfd: no round trip, never a recycled pid.

    True when the kernel took care of it (delivered, or the child is already gone:
    ``ESRCH``, which ``subprocess`` ignores too); False when the daemon must be asked:
    no pidfd, or ``EPERM`` (a child running as another uid). Safe in a signal handler and
    in any thread. Shared by the blocking and async clients.
    """
    if pidfd is None:
        return False
    try:
        _signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return True


def signal_request(rid: int, spawn_id: int, sig: int) -> P.Signal:
    """The Signal message naming the child by the id of the Spawn that started it."""
    return P.Signal(id=rid, child=spawn_id, signal=int(sig))


class Child:
    """A process the daemon started for us. ``returncode`` follows ``subprocess``.

    ``pidfd`` (when the kernel allows) becomes readable when the child exits, so
    ``select``/``multiprocessing.connection.wait`` work on it; it is closed by :meth:`close`.
    In a process forked after the child was started, the child stays the parent's:
    ``wait``/``poll`` raise :class:`DaemonConnectionError` saying so, signals do nothing.
    """

    def __init__(self, client: Client, transport: Transport, pid: int, pidfd: int | None,
                 args: Any = None, request_id: int = 0) -> None:
        self.client = client
        self.transport = transport
        self.pid = pid
        self.pidfd = pidfd
        self.args = args
        self.request_id = request_id  # the Spawn's id: how the daemon names this child
        self.returncode: int | None = None
        self.lost: BaseException | None = None
        self._done = False
        # Guards pidfd against close() in another thread (a reused fd number would signal
        # some other process); re-entrant so a signal handler interrupting close() in this
        # thread sees either the open fd or None.
        self._fd_lock = _RLock()

    def _on_exit(self, ev: P.Exit | BaseException) -> None:
        """Runs in whichever thread routes the event, with the transport's lock held."""
        if isinstance(ev, BaseException):
            self.lost = ev
        else:
            self.returncode = ev.returncode
        self._done = True

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None on timeout. Raises if the daemon connection died."""
        if not self._done and not self.transport.wait_for(lambda: self._done, timeout):
            return None
        if self.returncode is None:
            assert self.lost is not None
            raise DaemonConnectionError(f"exit status of {self.pid} lost: {self.lost}") \
                from None
        return self.returncode

    def poll(self) -> int | None:
        return self.wait(0)

    def send_signal(self, sig: int) -> None:
        """Signal through our pidfd; only if the kernel refuses (another uid), the daemon.

        Works from a signal handler and from any thread at any time: the pidfd route needs
        no connection, and a daemon request made while this thread is inside its own read
        is sent without waiting for the reply.
        """
        if self._done:
            return
        with self._fd_lock:
            if pidfd_signal(self.pidfd, sig):
                return
        t = self.transport
        try:
            t.request(signal_request(t.next_id(), self.request_id, sig), reply=False)
        except ProcessLookupError:
            pass  # it exited meanwhile, like subprocess

    def terminate(self) -> None:
        self.send_signal(_signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(_signal.SIGKILL)

    def fileno(self) -> int:
        if self.pidfd is None:
            raise ValueError("no pidfd for this child")
        return self.pidfd

    def close(self) -> None:
        with self._fd_lock:
            fd, self.pidfd = self.pidfd, None
            if fd is not None:
                os.close(fd)

    def __del__(self) -> None:
        fd = self.pidfd
        if fd is not None:
            self.pidfd = None
            os.close(fd)


class Client:
    """A thread-safe handle to one daemon; reconnects by itself after the daemon restarts.

    ``path`` defaults to ``$SPAWND_SOCKET`` or the per-user/system default. Autostart
    applies only when no socket was configured at all (neither ``path`` nor
    ``$SPAWND_SOCKET``): then, when nothing answers at the default path and ``autostart``
    is true (default; ``SPAWND_AUTOSTART=0`` turns it off), a private daemon is started once
    for this process, with ``posix_spawn``. A configured socket that does not answer is a
    :class:`DaemonUnavailable` naming it, never a silent private daemon (which would bypass
    the system daemon and its policy).

    A request the daemon never received (the connection was found dead before it left) is
    resent once on a new connection; children of a daemon that went away report
    :class:`DaemonConnectionError`. After ``os.fork()`` the child process starts with a
    fresh connection of its own (the parent's is closed in it, not shut down).
    """

    def __init__(self, path: str | None = None, *, autostart: bool | None = None) -> None:
        self.path, self.autostart = socket_choice(path, autostart)
        self._lock = threading.Lock()
        self._transport: Transport | None = None
        _clients.add(self)

    def transport(self) -> Transport:
        """The live connection, (re)connecting if there is none or it broke."""
        t = self._transport
        if t is not None and t.broken is None:
            return t
        with self._lock:
            t = self._transport
            if t is not None and t.broken is None:
                return t
            if t is not None:
                t.close()
            self._transport = t = self._connect()
            return t

    def _connect(self) -> Transport:
        try:
            return Transport(self.path)
        except DaemonUnavailable:
            if not self.autostart:
                raise
        return Transport(private_daemon())

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        t, self._transport = self._transport, None
        if t is not None:
            t.abandon(f"this process (pid {os.getpid()}) was forked from the one that owns "
                      "this spawnd connection: its children and statuses stay the parent's")

    def spawn(self, argv: Sequence[StrOrBytes], *, env: Mapping[Any, Any] | None = None,
              fds: Mapping[int, int] | None = None, executable: StrOrBytes | None = None,
              cwd: StrOrBytes | None = None, start_new_session: bool = False,
              process_group: int | None = None, on_disconnect: str = P.DEFAULT_ON_DISCONNECT,
              grace: float = P.DEFAULT_GRACE, want_pidfd: bool = True,
              user: int | None = None, group: int | None = None,
              extra_groups: Iterable[int] | None = None, umask: int | None = None,
              capabilities: Iterable[str] = (), rlimits: Mapping[str, tuple[int, int]] | None = None,
              no_new_privs: bool = False, warm: Mapping[str, Any] | None = None,
              args: Any = None, namespaces: Iterable[str] = (),
              ctty: int | None = None, restore_signals: bool = True) -> Child:
        """Start a child; raises ``FileNotFoundError`` etc. at once if it cannot run.

        ``fds`` maps the child's fd numbers to our fds (sent with SCM_RIGHTS); the child
        gets those and nothing else (0-2 not given are ``/dev/null``). ``env`` None sends
        our own environment. ``warm`` (``{"size": n, "idle_timeout": s}``) lets the daemon
        serve this request from pre-started identical processes; the program must follow
        the warm handoff contract (see docs/multiprocessing.md). The child inherits our cwd
        (``cwd=`` is relative to it), umask, rlimits, nice value and CPU affinity, as with
        ``subprocess``. ``ctty`` names one of the child's fds as its controlling terminal.
        """
        t = self.transport()
        caller = caller_state()  # issue 11: what a forked child inherits; closed when sent
        try:
            req, send_fds = spawn_request(
                t.next_id(), argv, env=env, fds=fds, executable=executable, cwd=cwd,
                start_new_session=start_new_session, process_group=process_group,
                on_disconnect=on_disconnect, grace=grace, want_pidfd=want_pidfd, user=user,
                group=group, extra_groups=extra_groups, umask=umask, capabilities=capabilities,
                rlimits=rlimits, no_new_privs=no_new_privs,
                warm=None if warm is None else dict(warm), caller=caller, ctty=ctty,
                namespaces=tuple(namespaces),  # new namespaces (issue 11)
                restore_signals=restore_signals)  # subprocess's flag (SIGPIPE/SIGXFSZ)
            label = args if args is not None else argv
            try:
                return self._spawn_on(t, req, send_fds, label)
            except RequestNotSent:
                t = self.transport()  # the daemon never saw it: once more, on a new connection
                return self._spawn_on(t, req.with_id(t.next_id()), send_fds, label)
        finally:
            caller.close()

    def _spawn_on(self, t: Transport, req: SpawnFrame, send_fds: list[int], label: Any) -> Child:
        rid = req.id

        def adopt(ev: P.Spawned) -> Child:
            pidfd = ev.fds_received[0] if ev.pidfd and ev.fds_received else None
            child = Child(self, t, ev.pid, pidfd, label, rid)
            t.exit_handlers[rid] = child._on_exit
            return child

        return t.request(req, send_fds, on_spawned=adopt)

    def ping(self) -> dict[str, int]:
        t = self.transport()
        try:
            pong = t.request(P.Ping(id=t.next_id()))
        except RequestNotSent:
            t = self.transport()
            pong = t.request(P.Ping(id=t.next_id()))
        return {"pid": pong.pid, "children": pong.children, "connections": pong.connections}

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Client | None = None
_default_lock = threading.Lock()
#: Every live Client, so a forked child can let go of each one's connection.
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for c in list(_clients):
        c._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def default_client() -> Client:
    """The process-wide client the ``subprocess``-style functions use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Client()
    return _default
