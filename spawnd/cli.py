"""``spawnd serve | run | ping | check-config``: the command line."""

from __future__ import annotations

import argparse
import errno
import grp
import logging
import os
import signal
import socket
import sys

from .paths import default_socket_path

log = logging.getLogger("spawnd")


def _group_id(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SystemExit(f"spawnd: no such group: {name!r}") from None


def open_listener(path: str, group: int | None) -> socket.socket:
    """Bind a filesystem socket (never abstract) with 0600/0660 from the first instant.

    A stale socket file is replaced only if nothing answers on it: two daemons must
    never fight over one path.
    """
    from .activation import secure_socket_path

    os.makedirs(os.path.dirname(path) or ".", mode=0o755 if os.geteuid() == 0 else 0o700,
                exist_ok=True)
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
    child_nofile = raise_nofile_limit()  # every client's fds and pidfds are held here
    group = _group_id(args.group) if args.group else None
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
        listeners = [open_listener(own_path, group)]
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
    from .policy import Policy, PolicyFileError

    try:
        Policy.load(args.file)
    except PolicyFileError as e:
        print(f"spawnd: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
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
    except OSError as e:
        print(f"spawnd run: {cmd[0]}: {e.strerror}"
              + (f" (stage: {e.stage})" if getattr(e, "stage", None) else ""), file=sys.stderr)
        return 127 if e.errno == errno.ENOENT else 126
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    for sig in forwarded:  # the child is not in our terminal's process group: forward
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def _pty_wanted(args: argparse.Namespace) -> bool:
    from .pty_relay import wants_pty

    return args.pty if args.pty is not None else wants_pty()


def _run_pty(client: object, cmd: list[str]) -> int:
    """``spawnd run --pty``: the child on a new pty, relayed like ``ssh -t``."""
    from .pty_relay import run_in_pty

    try:
        return run_in_pty(client.spawn, cmd)  # type: ignore[attr-defined]
    except OSError as e:
        print(f"spawnd run: {cmd[0]}: {e.strerror}"
              + (f" (stage: {e.stage})" if getattr(e, "stage", None) else ""), file=sys.stderr)
        return 127 if e.errno == errno.ENOENT else 126


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spawnd", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--socket", help=f"socket path (default: {default_socket_path()})")
    s.add_argument("--group", help="make the socket 0660 for this group")
    s.add_argument("--config", help="policy file (TOML)")
    s.add_argument("--log-level", default="info", help="debug, info, warning or error")
    s.add_argument("--idle-exit", type=float, metavar="SECONDS",
                   help="exit after this long with no connections and no children")
    s.add_argument("--on-stop", choices=("terminate", "kill", "wait"), default="terminate",
                   help="what stopping the daemon does to live children (default: terminate: "
                   "SIGTERM, then SIGKILL after --stop-grace)")
    s.add_argument("--stop-grace", type=float, default=5.0, metavar="SECONDS")
    s.add_argument("--pool-max", type=int, default=8, metavar="N",
                   help="most idle warm interpreters kept for multiprocessing, all "
                   "users together (default: 8; 0: start every warm request cold)")
    s.add_argument("--handshake-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close a connection that has not said hello by then (default 5)")
    s.add_argument("--frame-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection that leaves a message unfinished this long "
                   "(default 10)")
    s.add_argument("--exec-helper", choices=("auto", "c", "python"), default="auto",
                   help="the program between posix_spawn and exec for privileged children: "
                        "the C spawnd-exec (auto: when built) or the Python fallback")
    s.add_argument("--lifeline", type=int, metavar="FD", help=argparse.SUPPRESS)
    s.add_argument("--ready-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    s.set_defaults(func=_serve)

    r = sub.add_parser("run", help="run one command through the daemon")
    r.add_argument("--socket")
    r.add_argument("--pty", action=argparse.BooleanOptionalAction, default=None,
                   help="run the command on a new pseudo-terminal, relayed to ours (default: "
                   "when stdin and stdout are terminals)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=_run)

    c = sub.add_parser("check-config", help="validate a policy file")
    c.add_argument("file")
    c.set_defaults(func=_check_config)

    g = sub.add_parser("ping", help="ask a running daemon how it is")
    g.add_argument("--socket")
    g.set_defaults(func=_ping)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
