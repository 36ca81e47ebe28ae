"""The floor of a trio spawn daemon on this machine, measured beside spawnd (issue 12).

``python -m bench.floor [N]`` (and the ``cost`` part) starts a *minimal* trio daemon: one
task reading one Unix-socket connection, ``os.posix_spawn`` of ``/bin/true``, ``pidfd_open``,
a reply carrying the pidfd (SCM_RIGHTS), one reaper task on one epoll fd of all pidfds that
``waitid``s and writes the exit. Its client sends a fixed 16-byte request and reads the two
replies. Nothing else: no protocol, no policy, no caller state, no executable checks.

Variants add one of spawnd's costs at a time, in the same run:

* ``+ caller state``: the client also captures what a fork would inherit
  (``spawnd_client._caller.caller_state``: 16 getrlimit, /proc/self/status, the cwd fd);
* ``+ spawnd protocol``: the client builds and encodes a real ``Spawn`` request (full
  environment), the daemon decodes and validates it with ``spawnd.protocol``, and both
  encode/decode real ``Spawned``/``Exit`` replies.

What is left between the last variant and spawnd is spawnd's own daemon work (executable
checks, policy, inherited state, the child table) and its client (transport, Child).
"""

from __future__ import annotations

import array
import os
import resource
import select
import socket
import struct
import sys
import tempfile
import time
from typing import Any

TRUE = "/bin/true"
REQ = struct.Struct("<QQ")  # (request id, flags): 16 bytes


def _daemon(path: str, proto: bool) -> None:
    import trio

    from spawnd import protocol as P

    env = os.environ

    async def main() -> None:
        lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await lsock.bind(path)
        lsock.listen(1)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        conn, _ = await lsock.accept()
        raw = socket.socket(fileno=conn.fileno())
        ep = select.epoll()
        kids: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, request id)
        pc = P.Connection("server") if proto else None
        if pc is not None:
            pc.their_hello = P.Hello()  # no handshake in this prototype

        def send(data: bytes, fds: list[int]) -> None:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            raw.sendmsg([data], anc)

        async def reaper() -> None:
            while True:
                await trio.lowlevel.wait_readable(ep.fileno())
                for fd, _ in ep.poll(0):
                    pid, rid = kids.pop(fd)
                    info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
                    ep.unregister(fd)
                    os.close(fd)
                    code = info.si_status if info is not None else -1
                    if pc is not None:
                        send(pc.send(P.Exit(id=rid, pid=pid, returncode=code)), [])
                    else:
                        send(REQ.pack(rid, code), [])

        async with trio.open_nursery() as n:
            n.start_soon(reaper)
            while True:
                try:
                    data, anc, _, _ = await conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
                except ConnectionError:
                    data = b""
                if not data:
                    n.cancel_scope.cancel()
                    return
                got: list[int] = []
                for _, _, blob in anc:
                    a = array.array("i")
                    a.frombytes(blob[: len(blob) - len(blob) % 4])
                    got.extend(a)
                if pc is not None:
                    pc.receive_data(data, got)
                while got:
                    os.close(got.pop())
                if pc is not None:
                    while (ev := pc.next_event()) is not None:
                        rid = ev.id  # type: ignore[attr-defined]
                        argv, cenv = list(ev.argv), list(ev.env)  # type: ignore[attr-defined]
                        pid = os.posix_spawn(argv[0], argv, dict(
                            e.split(b"=", 1) for e in cenv))
                        fd = os.pidfd_open(pid)
                        ep.register(fd, select.EPOLLIN)
                        kids[fd] = (pid, rid)
                        send(pc.send(P.Spawned(id=rid, pid=pid, pidfd=True)), [fd])
                else:
                    rid, _ = REQ.unpack(data[:REQ.size])
                    pid = os.posix_spawn(TRUE, [TRUE], env)
                    fd = os.pidfd_open(pid)
                    ep.register(fd, select.EPOLLIN)
                    kids[fd] = (pid, rid)
                    send(REQ.pack(rid, pid), [fd])

    trio.run(main)


def _cpu(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class FloorClient:
    """A client of the minimal daemon, started by :meth:`start`; :meth:`one` is one
    spawn+wait of ``/bin/true`` (``v``: "bare", "caller" or "proto", see the module doc)."""

    def __init__(self, v: str) -> None:
        import subprocess

        from spawnd import protocol as P

        self.v = v
        self.dir = tempfile.mkdtemp(prefix="spawnd-floor-")
        self.path = os.path.join(self.dir, "s")
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             f"import bench.floor as f; f._daemon({self.path!r}, {v == 'proto'})"],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
        self.cc = P.Connection("client")
        self.cc.their_hello = P.Hello()
        self.buf = bytearray(65536)
        self.rid = 0
        from spawnd_client._caller import caller_state
        from spawnd_client.client import spawn_request

        self._client_fns = (caller_state, spawn_request)  # imported once, not per timed spawn

    def _recv_event(self) -> Any:
        while True:
            ev = self.cc.next_event()
            if ev is not None:
                return ev
            nb, anc, _, _ = self.sock.recvmsg_into([self.buf], socket.CMSG_SPACE(4))
            self.cc.receive_data(bytes(self.buf[:nb]), _fds(anc))

    def one(self) -> None:
        caller_state, spawn_request = self._client_fns
        self.rid += 1
        i, s, v = self.rid, self.sock, self.v
        fds: list[int] = []
        if v == "bare":
            s.sendall(REQ.pack(i, 0))
            _, anc, _, _ = s.recvmsg(16, socket.CMSG_SPACE(4))
            s.recv(16)
            fds = _fds(anc)
        else:
            st = caller_state()
            try:
                if v == "caller":
                    s.sendmsg([REQ.pack(i, 0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", [st.cwd_fd]))])
                    _, anc, _, _ = s.recvmsg(16, socket.CMSG_SPACE(4))
                    s.recv(16)
                    fds = _fds(anc)
                else:
                    req, _ = spawn_request(i, [TRUE], env=None, fds=None,
                                           executable=None, cwd=None, extra_groups=None,
                                           capabilities=(), rlimits=None, caller=st)
                    s.sendmsg([req.frame],  # the encoded request, as spawnd_client sends it
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [st.cwd_fd]))])
                    fds = list(self._recv_event().fds_received)
                    self._recv_event()
            finally:
                st.close()
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass


def _fds(anc: Any) -> list[int]:
    out: list[int] = []
    for _, _, blob in anc:
        a = array.array("i")
        a.frombytes(blob[: len(blob) - len(blob) % 4])
        out.extend(a)
    return out


def _variant(v: str, n: int, hz: int) -> dict[str, Any]:
    fc = FloorClient(v)
    try:
        for _ in range(50):
            fc.one()
        d0 = _cpu(fc.proc.pid)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.perf_counter()
        for _ in range(n):
            fc.one()
        w1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        d1 = _cpu(fc.proc.pid)
        return {"wall_ms": round((w1 - w0) / n * 1e3, 4),
                "daemon_cpu_ms": round((d1 - d0) / hz / n * 1e3, 4),
                "client_cpu_ms": round((r1.ru_utime + r1.ru_stime - r0.ru_utime
                                        - r0.ru_stime) / n * 1e3, 4)}
    finally:
        fc.close()


def measure(n: int = 1000, variants: tuple[str, ...] = ("bare", "caller", "proto")
            ) -> dict[str, Any]:
    """Per spawn: wall, daemon CPU and client CPU (ms) of each variant, and the local
    ``os.posix_spawn``+``waitpid`` of the same environment afterwards (variants run one
    after another, not interleaved: read them as an isolation of costs, not a race)."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, Any] = {"spawns": n}
    for v in variants:
        out[v] = _variant(v, n, hz)
    env = os.environ
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn(TRUE, [TRUE], env)
        os.waitpid(pid, 0)
    out["local_posix_spawn_ms"] = round((time.perf_counter() - t0) / n * 1e3, 4)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1000), indent=1))
