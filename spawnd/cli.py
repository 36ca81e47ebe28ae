"""spawnd serve | run | ping | status | check-config: the command line."""

from __future__ import annotations

import argparse
import errno
import grp
import logging
import os
import signal
import socket
import sys
from typing import NoReturn

from .paths import default_socket_path

log = logging.getLogger("spawnd")


def _group_id(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group: {name!r}") from None


# -- argparse type= validators: a bad option is a one-line usage error (exit 2), never a
# traceback or a value the daemon would choke on later.
LOG_LEVELS = ("debug", "info", "warning", "error")
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL


def _log_level(text: str) -> str:
    level = text.lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return n


def _fd(text: str) -> int:
    return _count(text)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return v


def _grace(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _seconds(text)


def _socket_path(text: str) -> str:
    if not text or text.startswith("@") or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r}: a socket must be a filesystem path")
    if len(os.fsencode(text)) > SUN_PATH_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r}: longer than a Unix socket path may be ({SUN_PATH_MAX} bytes)")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line (the full usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CliError(Exception):
    """An ordinary mistake or condition, reported as one line (``spawnd CMD: message``)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def socket_dir_for(path: str, explicit: bool) -> None:
    """Make sure the socket's directory exists; create only the daemon's own last level.

    An explicit ``--socket`` must name an existing directory (a typo must not create a
    directory tree as root). The default path's last level (``spawnd/``) is created under
    a runtime directory that exists.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        return
    if explicit or not os.path.isdir(os.path.dirname(parent)):
        base = parent if explicit else os.path.dirname(parent)
        why = ""
        if not explicit and os.geteuid() != 0 and not os.environ.get("XDG_RUNTIME_DIR"):
            why = " (XDG_RUNTIME_DIR is not set; set it or pass --socket PATH)"
        elif not explicit:
            why = " (pass --socket PATH)"
        raise CliError(f"cannot listen on {path}: directory {base} does not exist{why}")
    os.mkdir(parent, 0o755 if os.geteuid() == 0 else 0o700)


def open_listener(path: str, group: int | None) -> socket.socket:
    """Bind a filesystem socket (never abstract) with 0600/0660 from the first instant.

    A stale socket file is replaced only if nothing answers on it: two daemons must
    never fight over one path.
    """
    from .activation import secure_socket_path

    if os.path.exists(path):
        _check_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no window in which the socket is open to others
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    secure_socket_path(path, group=group)
    sock.listen(256)
    return sock


def _check_stale(path: str) -> None:
    """Remove a stale socket file; refuse (one line, exit 1) if something listens on it.

    Says who holds it: a listener of another uid (SO_PEERCRED) may be squatting on the path
    to receive clients' environments and stdio, which is worth knowing by name.
    """
    import struct

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(5)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)  # nothing listens: a leftover of a daemon that died
            except FileNotFoundError:
                pass
            return
        except OSError as e:  # EACCES, a timeout: held, and not ours to delete
            try:
                owner = f" (the socket file belongs to uid {os.stat(path).st_uid})"
            except OSError:
                owner = ""
            raise SystemExit(f"spawnd: cannot check {path}: {e.strerror or e}{owner}; "
                             "not replacing it") from None
        pid, uid, _ = struct.unpack("3i", probe.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    finally:
        probe.close()
    if uid != os.geteuid():
        raise SystemExit(f"spawnd: {path} is held by a listener of another user: uid {uid} "
                         f"(pid {pid}); we are uid {os.geteuid()}. Not starting: use another "
                         "--socket or stop that process")
    raise SystemExit(f"spawnd: a daemon is already listening on {path} (pid {pid})")


def _serve(args: argparse.Namespace) -> int:
    import trio

    from .activation import ActivationError, Notifier, listen_sockets, secure_socket_path
    from .log import setup_logging
    from .policy import Policy, PolicyFileError
    from .server import Options, Server, raise_nofile_limit

    setup_logging(args.log_level)
    from . import signals

    signals.block_early()  # before any listener: no signal may find a default action
    child_nofile = raise_nofile_limit()  # every client's fds and pidfds are held here
    group = args.group  # a gid already (argparse type=_group_id)
    try:
        policy = Policy.load(args.config) if args.config else Policy.default(os.getuid())
    except PolicyFileError as e:
        log.error("%s", e)  # through the logger: <3> under journald, one line
        return 2
    try:
        activated = listen_sockets(os.environ)
    except ActivationError as e:
        log.error("%s", e)  # through the logger: <3> under journald, one line
        return 2
    if activated:
        listeners = [s for _, s in activated]
        for s in listeners:  # the daemon sets the mode itself, also under activation
            secure_socket_path(s.getsockname(), group=group)
        log.info("socket-activated: %s", ", ".join(f"{n}={s.getsockname()}" for n, s in activated))
    else:
        own_path = args.socket or default_socket_path()
        socket_dir_for(own_path, explicit=bool(args.socket))
        try:
            listeners = [open_listener(own_path, group)]
        except OSError as e:  # bind/chmod errors carry no path: name the socket
            raise CliError(f"cannot listen on {own_path}: {e.strerror or e}") from None
        log.info("listening on %s", own_path)
    from . import privileged  # the exec helper: C when built, else the Python twin
    try:
        helper = privileged.configure(args.exec_helper)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    log.info("exec helper: %s", helper.describe())
    notifier = Notifier.from_environ(os.environ)
    server = Server(
        listeners, policy, notifier=notifier,
        options=Options(on_stop=args.on_stop, stop_grace=args.stop_grace,
                        idle_exit=args.idle_exit, handshake_timeout=args.handshake_timeout,
                        frame_timeout=args.frame_timeout,
                        pool_max=args.pool_max),  # multiprocessing warm pools
        reload_policy=(lambda: Policy.load(args.config)) if args.config else None,
        lifeline=args.lifeline,
    )
    server.child_nofile = child_nofile
    if args.ready_fd is not None:
        async def main() -> None:
            async with trio.open_nursery() as n:
                await n.start(server.run)
                os.write(args.ready_fd, b"ready\n")
                if args.ready_fd != args.lifeline:
                    os.close(args.ready_fd)
        trio.run(main)
    else:
        trio.run(server.run)
    if not activated:
        try:
            os.unlink(own_path)
            if args.lifeline is not None:  # a private daemon's directory is its own
                os.rmdir(os.path.dirname(own_path))
        except OSError:
            pass
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from .policy import Policy, PolicyFileError, admission_warnings

    try:
        policy = Policy.load(args.file)
    except PolicyFileError as e:
        print(f"spawnd: {e}", file=sys.stderr)
        return 1
    warnings = admission_warnings(policy, daemon_uid=args.daemon_uid)
    for warning in warnings:
        print(f"spawnd: {args.file}: warning: {warning}", file=sys.stderr)
    print(f"{args.file}: OK" + (f" ({len(warnings)} warnings)" if warnings else ""))
    return 0


def _run(args: argparse.Namespace) -> int:
    """Run one command through the daemon with our stdio; exit with its status."""
    import spawnd_client

    cmd = args.command
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("spawnd run: no command given", file=sys.stderr)
        return 2
    client = spawnd_client.Client(args.socket) if args.socket else None
    if _pty_wanted(args):  # a terminal for the child (spawnd/pty_relay.py)
        return _run_pty(client or spawnd_client.default_client(), cmd)
    try:
        proc = spawnd_client.Popen(cmd, client=client)
    except spawnd_client.DaemonUnavailable:
        raise  # main() reports it: the daemon is at fault, not the command
    except OSError as e:
        return _start_failed(cmd[0], e)
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    for sig in forwarded:  # the child is not in our terminal's process group: forward
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def _start_failed(name: str, e: OSError) -> int:
    """Say why the command did not start; exit 127 (not found) or 126, as a shell does."""
    print(f"spawnd run: {name}: {e.strerror}"
          + (f" (stage: {e.stage})" if getattr(e, "stage", None) else ""), file=sys.stderr)
    return 127 if e.errno == errno.ENOENT else 126


def _pty_wanted(args: argparse.Namespace) -> bool:
    from .pty_relay import wants_pty

    return args.pty if args.pty is not None else wants_pty()


def _run_pty(client: object, cmd: list[str]) -> int:
    """``spawnd run --pty``: the child on a new pty, relayed like ``ssh -t``."""
    from .pty_relay import run_in_pty

    try:
        return run_in_pty(client.spawn, cmd)  # type: ignore[attr-defined]
    except OSError as e:
        return _start_failed(cmd[0], e)


def _ping(args: argparse.Namespace) -> int:
    import spawnd_client

    from . import protocol as P

    client = spawnd_client.Client(args.socket, autostart=False)
    t = client.transport()
    pong = t.request(P.Ping(id=t.next_id()))  # the whole Pong: exec_helper too
    info = {"pid": pong.pid, "children": pong.children, "connections": pong.connections,
            "exec_helper": pong.exec_helper}
    print(f"spawnd pid {info['pid']}: {info['children']} children, "
          f"{info['connections']} connections, exec helper {info.get('exec_helper') or '?'}")
    client.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    """Ask the daemon what it is doing (``--json``: the raw report)."""
    import json

    import spawnd_client

    from . import protocol as P
    from .status import format_report

    client = spawnd_client.Client(args.socket, autostart=False)
    try:
        t = client.transport()
        reply = t.request(P.Status(id=t.next_id()))
    finally:
        client.close()
    report = json.loads(reply.report)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_report(report))
    return 0


class _Version(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata costs every daemon ~6 ms
    and ~1.7 MiB of RSS when argparse's own version action needs the string up front)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, **kw)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        from .status import version

        print(f"spawnd {version()}")  # stdout, as argparse's version action
        parser.exit()


def _report(cmd: str, e: BaseException) -> int:
    """The one line for an error main() catches; returns the exit status."""
    import spawnd_client

    if isinstance(e, CliError):
        print(f"spawnd {cmd}: {e}", file=sys.stderr)
        return e.status
    if isinstance(e, spawnd_client.DaemonUnavailable):
        print(f"spawnd {cmd}: {e.strerror}", file=sys.stderr)
        return 125 if cmd == "run" else 1  # run: like env/timeout, not the command's status
    assert isinstance(e, OSError)
    what = f"{e.filename}: " if e.filename is not None else ""
    print(f"spawnd {cmd}: {what}{e.strerror or e}", file=sys.stderr)
    return 125 if cmd == "run" else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, OSError) as e:  # ordinary failures: one line, no traceback
        return _report(args.cmd, e)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """Every option has help text; tests check that none is missing."""
    p = _Parser(
        prog="spawnd", description="spawnd starts processes with posix_spawn on behalf of "
        "its clients, so that they never fork.")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    socket_help = f"the daemon's socket (default: $SPAWND_SOCKET, else {default_socket_path()})"

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--socket", type=_socket_path, metavar="PATH",
                   help=f"where to listen; its directory must exist (default: "
                   f"{default_socket_path()})")
    s.add_argument("--group", type=_group_id, metavar="GROUP",
                   help="make the socket 0660 for this group (name or gid)")
    s.add_argument("--config", metavar="FILE", help="policy file (TOML; see docs/policy.md)")
    s.add_argument("--log-level", type=_log_level, default="info", metavar="LEVEL",
                   help="debug, info, warning or error (default: info)")
    s.add_argument("--idle-exit", type=_seconds, metavar="SECONDS",
                   help="exit after this long with no connections and no children")
    s.add_argument("--on-stop", choices=("terminate", "kill", "wait"), default="terminate",
                   help="what stopping the daemon does to live children (default: terminate: "
                   "SIGTERM, then SIGKILL after --stop-grace)")
    s.add_argument("--stop-grace", type=_grace, default=5.0, metavar="SECONDS",
                   help="how long stopping children get between SIGTERM and SIGKILL "
                   "(default 5)")
    s.add_argument("--pool-max", type=_count, default=8, metavar="N",
                   help="most idle warm interpreters kept for multiprocessing, all "
                   "users together (default: 8; 0: start every warm request cold)")
    s.add_argument("--handshake-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                   help="close a connection that has not said hello by then (default 5)")
    s.add_argument("--frame-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="close a connection that leaves a message unfinished this long "
                   "(default 10)")
    s.add_argument("--exec-helper", choices=("auto", "c", "python"), default="auto",
                   help="the program between posix_spawn and exec for privileged children: "
                        "the C spawnd-exec (auto: when built) or the Python fallback")
    s.add_argument("--lifeline", type=_fd, metavar="FD", help=argparse.SUPPRESS)
    s.add_argument("--ready-fd", type=_fd, metavar="FD", help=argparse.SUPPRESS)
    s.set_defaults(func=_serve)

    r = sub.add_parser("run", help="run one command through the daemon")
    r.add_argument("--socket", type=_socket_path, metavar="PATH", help=socket_help)
    r.add_argument("--pty", action=argparse.BooleanOptionalAction, default=None,
                   help="run the command on a new pseudo-terminal, relayed to ours (default: "
                   "when stdin and stdout are terminals)")
    r.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command and its arguments (after --); spawnd run exits with its "
                   "status (125: spawnd itself failed)")
    r.set_defaults(func=_run)

    c = sub.add_parser("check-config", help="validate a policy file")
    c.add_argument("file", help="the policy file (TOML)")
    c.add_argument("--daemon-uid", type=_count, default=os.geteuid(), metavar="UID",
                   help="the uid the daemon will run as, for the warning when the policy "
                   "does not admit it (default: yours)")
    c.set_defaults(func=_check_config)

    g = sub.add_parser("ping", help="ask a running daemon how it is (cheap liveness check)")
    g.add_argument("--socket", type=_socket_path, metavar="PATH", help=socket_help)
    g.set_defaults(func=_ping)

    st = sub.add_parser("status", help="what the daemon is doing: clients, children, pools, "
                        "counters (yours only unless you are root)")
    st.add_argument("--socket", type=_socket_path, metavar="PATH", help=socket_help)
    st.add_argument("--json", action="store_true", help="print the report as JSON")
    st.set_defaults(func=_status)
    return p


if __name__ == "__main__":
    sys.exit(main())
