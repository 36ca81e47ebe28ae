"""Where the daemon listens by default; shared by daemon and client (pure, stdlib only)."""

from __future__ import annotations

import os
from collections.abc import Mapping


def default_socket_path(environ: Mapping[str, str] = os.environ) -> str:
    """``$SPAWND_SOCKET``; else root's system socket; else ``$XDG_RUNTIME_DIR/spawnd/``.

    Root always means the system daemon (``/run/spawnd``, the systemd unit's path); a user
    without ``XDG_RUNTIME_DIR`` falls back to ``/run/user/<uid>`` like systemd would set it.
    """
    explicit = environ.get("SPAWND_SOCKET")
    if explicit:
        return explicit
    if os.geteuid() == 0:
        return "/run/spawnd/spawnd.sock"
    runtime = environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return os.path.join(runtime, "spawnd", "spawnd.sock")
