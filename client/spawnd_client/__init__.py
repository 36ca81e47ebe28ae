"""Start processes through the spawnd daemon instead of forking.

``Popen``/``run``/``call``/``check_call``/``check_output`` mirror ``subprocess``;
``Client`` is the thread-safe lower-level API; ``AsyncClient`` the anyio one (imported on
first use, so programs that never use it never import anyio or trio).
"""

from __future__ import annotations

from subprocess import CalledProcessError, CompletedProcess, SubprocessError, TimeoutExpired
from typing import Any

from .client import Child, Client, default_client
from .errors import DaemonConnectionError, DaemonUnavailable

# The process-wide switch (docs/install.md). The functions shadow the submodule's name:
# reach the module itself as sys.modules["spawnd_client.install"].
from .install import install, uninstall
from .popen import (
    DEVNULL,
    PIPE,
    STDOUT,
    Popen,
    call,
    check_call,
    check_output,
    getoutput,
    getstatusoutput,
    run,
)

__all__ = [
    "DEVNULL", "PIPE", "STDOUT", "AsyncClient", "CalledProcessError", "Child", "Client",
    "CompletedProcess", "DaemonConnectionError", "DaemonUnavailable", "Popen",
    "SubprocessError", "TimeoutExpired", "call", "check_call", "check_output",
    "default_client", "getoutput", "getstatusoutput", "install", "run", "uninstall",
]


def __getattr__(name: str) -> Any:
    if name in ("AsyncClient", "AsyncChild"):
        from . import aio

        return getattr(aio, name)
    if name == "mp":
        import importlib

        return importlib.import_module(".mp", __name__)
    raise AttributeError(name)
