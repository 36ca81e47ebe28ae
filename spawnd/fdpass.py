"""SCM_RIGHTS in one place: ancillary data to send fds with, and the fds in received data.

Pure (no I/O); shared by the daemon, the warm pool and the clients.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Iterable, Sequence

Ancillary = list[tuple[int, int, bytes | array.array]]


def ancillary(fds: Sequence[int]) -> Ancillary:
    """``sendmsg`` ancillary data carrying ``fds`` (empty when there are none)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []


def received_fds(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in ``recvmsg`` ancillary data (a truncated trailing int is ignored)."""
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(blob[: len(blob) - len(blob) % a.itemsize])
            fds.extend(a)
    return fds
