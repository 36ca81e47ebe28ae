"""Where the client's CPU per spawn goes, against a running daemon (not part of ``python -m bench``).

    python -m bench.client_micro SOCKET [N] [ROUNDS]

Variants, interleaved per round, each over N ``/bin/true`` spawns with our stdio and the
full environment; the figure is the client's own CPU (``getrusage``, user + system):

- ``client``: ``Client.spawn(...).wait()`` and ``close()``, as a user meets it;
- ``direct``: the same system calls and the same request, reply decoding and pidfd
  handling, without the transport, ``Child`` and ``Client`` layers around them;
- ``no-caller``: ``direct`` with the caller state captured once, not per spawn;
- ``no-request``: ``direct`` with the request encoded once (only its id changes);
- ``floor``: neither: the system calls and the reply decoding alone.

A warm loop times each piece a thousand times in a row, with hot caches; inside a spawn
loop (the process sleeps twice per spawn) the same code costs several times that, which
is what these differences show.
"""

from __future__ import annotations

import array
import os
import resource
import socket
import statistics
import sys
from collections.abc import Callable

from spawnd_client import Client
from spawnd_client import _transport as T
from spawnd_client._caller import caller_state
from spawnd_client.client import spawn_request

OPTIONS = {"start_new_session": False, "process_group": None, "on_disconnect": "terminate",
           "grace": 5.0, "want_pidfd": True, "user": None, "group": None, "umask": None,
           "no_new_privs": False, "warm": None, "ctty": None, "namespaces": (),
           "restore_signals": True}
STDIO = {0: 0, 1: 1, 2: 2}


def variants(client: Client) -> dict[str, Callable[[], None]]:
    t = client.transport()
    sock, buf = t.sock, bytearray(4096)
    fixed = caller_state()
    base, base_fds = spawn_request(1, ["/bin/true"], env=None, fds=STDIO, executable=None,
                                   cwd=None, extra_groups=None, capabilities=(),
                                   rlimits=None, caller=fixed, **OPTIONS)

    def direct(per_spawn_caller: bool, per_spawn_request: bool) -> Callable[[], None]:
        def one() -> None:
            st = caller_state() if per_spawn_caller else fixed
            rid = t.next_id()
            if per_spawn_request:
                req, fds = spawn_request(rid, ["/bin/true"], env=None, fds=STDIO,
                                         executable=None, cwd=None, extra_groups=None,
                                         capabilities=(), rlimits=None, caller=st, **OPTIONS)
            else:
                req, fds = base.with_id(rid), base_fds
            sock.sendmsg([req.frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))])
            if st is not fixed:
                st.close()
            n, anc, _, _ = sock.recvmsg_into([buf], T.FD_SPACE, socket.MSG_CMSG_CLOEXEC)
            got = T.fdpass.received_fds(anc)
            T.P._spawn_reply(bytes(buf[:n]), tuple(got))
            n, _, _, _ = sock.recvmsg_into([buf], T.FD_SPACE, socket.MSG_CMSG_CLOEXEC)
            T.P._spawn_reply(bytes(buf[:n]), ())
            for fd in got:
                os.close(fd)
        return one

    def real() -> None:
        ch = client.spawn(["/bin/true"], fds=STDIO)
        ch.wait()
        ch.close()

    return {"client": real, "direct": direct(True, True), "no-caller": direct(False, True),
            "no-request": direct(True, False), "floor": direct(False, False)}


def cpu_ms(f: Callable[[], None], n: int) -> float:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n):
        f()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n * 1e3


def main(path: str, n: int = 2000, rounds: int = 5) -> None:
    client = Client(path, autostart=False)
    vs = variants(client)
    for f in vs.values():  # warm up, and the request cache
        for _ in range(50):
            f()
    got: dict[str, list[float]] = {name: [] for name in vs}
    for _ in range(rounds):
        for name, f in vs.items():
            got[name].append(cpu_ms(f, n))
    for name, xs in got.items():
        print(f"{name:11s} client CPU {statistics.median(xs):.4f} ms/spawn (median of "
              f"{rounds}: {' '.join(f'{x:.3f}' for x in xs)})")
    client.close()


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
