"""systemd integration without libsystemd: socket activation, socket permissions, sd_notify.

Pure stdlib and synchronous on purpose: the server calls these once at start-up (or, for
`Notifier`, with non-blocking sends), and keeping trio out makes them testable in isolation.

Everything systemd hands us through the environment (LISTEN_*, NOTIFY_SOCKET, WATCHDOG_*) is
removed from it by default, because spawnd's children must never inherit the daemon's
activation state: a child that saw LISTEN_FDS could adopt fds it was never meant to have, and
one that saw NOTIFY_SOCKET could send READY=1/STOPPING=1 on the daemon's behalf.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import stat
import time
from collections.abc import MutableMapping
from types import TracebackType

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "Notifier",
    "listen_sockets",
    "secure_socket_path",
    "socket_path",
]

logger = logging.getLogger(__name__)

#: First fd passed by systemd (sd_listen_fds(3)); 0-2 are stdio.
SD_LISTEN_FDS_START = 3

# Far more than any sane .socket unit; bounds the loop if LISTEN_FDS is garbage.
_MAX_LISTEN_FDS = 1024

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


class ActivationError(Exception):
    """The sockets or environment systemd gave us are unusable; the daemon should not start."""


def _describe_fd(fd: int) -> str:
    """Human description of a non-socket fd for error messages ("a pipe", "not open")."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"not usable ({os.strerror(exc.errno or 0)})"
    kinds = [
        (stat.S_ISFIFO, "a pipe/FIFO"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ]
    return next((text for test, text in kinds if test(mode)), f"not a socket (mode {mode:o})")


def _enum_name(enum_type: type, value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return str(value)


def _path_problem(address: str | bytes) -> str | None:
    """Why an AF_UNIX address is not a filesystem path, or None if it is one."""
    if isinstance(address, bytes):  # CPython returns bytes only for abstract names
        return f"is abstract ({address!r})"
    if not address:
        return "is unnamed"
    if address.startswith("\0"):
        return f"is abstract ({address!r})"
    return None


def socket_path(sock: socket.socket) -> str:
    """Return the filesystem path an AF_UNIX socket is bound to.

    Refuses abstract and unnamed sockets: abstract names have no file permissions, so any
    local user (in the same network namespace) could connect, and our access control rests
    on the socket file's mode and group.
    """
    address = sock.getsockname()
    problem = _path_problem(address)
    if problem is not None:
        raise ActivationError(f"socket fd {sock.fileno()} {problem}: refused, bind it to a "
                              "filesystem path (ListenStream=/run/...)")
    return address


def _check_listener(sock: socket.socket, fd: int, name: str) -> None:
    """Raise ActivationError unless `sock` is a listening, path-bound AF_UNIX stream socket."""
    sotype = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    if sock.family != socket.AF_UNIX or sotype != socket.SOCK_STREAM:
        raise ActivationError(
            f"fd {fd} ({name!r}) is {_enum_name(socket.AddressFamily, sock.family)}/"
            f"{_enum_name(socket.SocketKind, sotype)}, expected AF_UNIX/SOCK_STREAM "
            "(use ListenStream= with an absolute path)")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(f"fd {fd} ({name!r}) is an AF_UNIX stream socket that is not "
                              "listening (Accept=yes is not supported)")
    problem = _path_problem(sock.getsockname())
    if problem is not None:
        raise ActivationError(f"fd {fd} ({name!r}) {problem}: refused, a socket without a "
                              "path has no file permissions (use ListenStream=/run/...)")


def listen_sockets(
    environ: MutableMapping[str, str] = os.environ, *, unset: bool = True
) -> list[tuple[str, socket.socket]]:
    """Adopt the listening sockets systemd passed us, like sd_listen_fds_with_names(3).

    Returns ``[(name, socket), ...]`` in fd order (names default to "unknown"), or ``[]`` when
    not socket-activated or when LISTEN_PID names another process (the variables were
    inherited, so the fds are not ours). Every passed fd gets FD_CLOEXEC before anything else
    so none can leak into a spawned child, and LISTEN_* are removed from `environ` whatever
    the outcome when `unset` is true.

    Raises ActivationError if the environment is malformed or a passed fd is not a listening
    AF_UNIX stream socket bound to a path; the sockets wrapped so far are closed first, and
    fds that could not be wrapped are left alone (they are close-on-exec already).
    """
    pid_s = environ.get("LISTEN_PID")
    fds_s = environ.get("LISTEN_FDS")
    names_s = environ.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(key, None)

    if pid_s is None or fds_s is None:
        return []
    try:
        pid = int(pid_s)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={pid_s!r} is not a pid") from None
    if pid != os.getpid():
        logger.debug("LISTEN_PID=%d is not us (%d): ignoring LISTEN_FDS", pid, os.getpid())
        return []
    try:
        count = int(fds_s)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={fds_s!r} is not a number") from None
    if not 0 <= count <= _MAX_LISTEN_FDS:
        raise ActivationError(f"LISTEN_FDS={count} is out of range")
    if names_s is None:
        names = ["unknown"] * count
    else:  # like systemd's strv_split: "" is no names at all, "a::b" has an empty one
        names = names_s.split(":") if names_s else []
    if len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")

    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as exc:
            raise ActivationError(f"fd {fd} from LISTEN_FDS={count} is not open: "
                                  f"{exc.strerror}") from exc

    adopted: list[tuple[str, socket.socket]] = []
    try:
        for fd, name in zip(fds, names, strict=True):
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                if exc.errno != errno.ENOTSOCK:
                    raise ActivationError(f"fd {fd} ({name!r}): {exc.strerror}") from exc
                raise ActivationError(f"fd {fd} ({name!r}) is {_describe_fd(fd)}, "
                                      "not a socket") from None
            adopted.append((name, sock))
            _check_listener(sock, fd, name)
    except BaseException:
        for _, sock in adopted:
            sock.close()
        raise
    return adopted


def secure_socket_path(path: str, *, group: int | None) -> None:
    """Restrict who may connect: 0600 (owner only), or 0660 with group `group` when given.

    Connecting to an AF_UNIX socket needs write permission on its file, so this mode *is* the
    first access check. Works on the inode we opened with O_PATH|O_NOFOLLOW (through
    /proc/self/fd), so a symlink planted at `path` cannot redirect the chmod/chown. The mode
    is narrowed before the group changes and only widened afterwards, so the old group never
    gets access. chown is skipped when the group already matches (systemd's SocketGroup=),
    which keeps CAP_CHOWN unnecessary for activated sockets. Note that this overrides the
    unit's SocketMode=: pass the same group as SocketGroup=.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise ActivationError(f"{path} is not a socket (mode {st.st_mode:o})")
        target = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path
        os.chmod(target, 0o600)
        if group is not None:
            if st.st_gid != group:
                os.chown(target, -1, group)
            os.chmod(target, 0o660)
    finally:
        os.close(fd)


def _parse_notify_address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return "\0" + value[1:]
    return None


class Notifier:
    """sd_notify(3) over NOTIFY_SOCKET; a cheap no-op when not run by systemd.

    Sends never block and never raise for transport failures: a lost READY=1 costs a start
    timeout, whereas an exception or a blocked trio loop would take down every client.
    """

    def __init__(self, address: str | None = None, *, watchdog_usec: int | None = None) -> None:
        """`address` is NOTIFY_SOCKET syntax ("/path" or "@abstract"); None disables."""
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        if address:
            self._address = _parse_notify_address(address)
            if self._address is None:
                logger.warning("NOTIFY_SOCKET=%r: unsupported address, notifications off",
                               address)

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] = os.environ, *, unset: bool = True
    ) -> Notifier:
        """Build from NOTIFY_SOCKET/WATCHDOG_USEC/WATCHDOG_PID, removing them when `unset`.

        Like sd_watchdog_enabled(3), the watchdog is off if WATCHDOG_PID names another
        process (inherited variables) or WATCHDOG_USEC is malformed.
        """
        get = environ.pop if unset else environ.get
        address = get("NOTIFY_SOCKET", None)
        usec_s = get("WATCHDOG_USEC", None)
        pid_s = get("WATCHDOG_PID", None)
        usec: int | None = None
        if usec_s is not None:
            try:
                usec = int(usec_s)
                if pid_s is not None and int(pid_s) != os.getpid():
                    usec = None
            except ValueError:
                logger.warning("WATCHDOG_USEC=%r/WATCHDOG_PID=%r malformed: watchdog off",
                               usec_s, pid_s)
                usec = None
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() calls (half of WATCHDOG_USEC, as sd_notify advises)."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, text: str | None = None, /, **fields: object) -> bool:
        """Send `text` and/or KEY=value `fields` (e.g. ``notify(READY=1, STATUS="ok")``).

        Newlines in values are replaced by spaces so a status built from client input cannot
        inject extra assignments. Returns whether the datagram was sent.
        """
        lines = [text] if text else []
        for key, value in fields.items():
            if not _FIELD_NAME.fullmatch(key):
                raise ValueError(f"invalid sd_notify field name {key!r}")
            flat = ("1" if value is True else str(value)).replace("\n", " ")
            lines.append(f"{key}={flat}")
        if self._address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8", "surrogateescape")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(data, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            quiet = exc.errno in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOENT)
            logger.log(logging.DEBUG if quiet else logging.WARNING,
                       "sd_notify %r to %r failed: %s", data[:60], self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up (or a reload) finished and the socket is being served."""
        return self.notify(READY=1) if status is None else self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        """Announce shutdown (unit shows "deactivating"): after SIGTERM or before idle exit."""
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """Announce a reload (MONOTONIC_USEC is required by Type=notify-reload); then ready()."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog(self) -> bool:
        """Keep-alive; call every `watchdog_interval` seconds from the event loop itself."""
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Release the datagram socket (idempotent); later sends reopen it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
