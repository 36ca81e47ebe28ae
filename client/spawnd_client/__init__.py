"""Start processes through the spawnd daemon instead of forking.

``Popen``/``run``/``call``/``check_call``/``check_output`` mirror ``subprocess``;
``Client`` is the thread-safe lower-level API; ``AsyncClient`` the anyio one.

Every name is imported on first use (PEP 562), so ``import spawnd_client`` costs about
what ``import subprocess`` does: the protocol (msgpack, dataclasses) loads with the first
``Client``/``Popen``, anyio/trio only with ``AsyncClient``, multiprocessing only with ``mp``.
"""

from __future__ import annotations

import importlib
from subprocess import CalledProcessError, CompletedProcess, SubprocessError, TimeoutExpired

# The process-wide switch (docs/install.md), imported eagerly (it is cheap): the functions
# shadow the submodule's name; reach the module itself as sys.modules["spawnd_client.install"].
from .install import install, uninstall

TYPE_CHECKING = False  # not typing's: importing typing costs ~1.6 ms (issue 12, target 6)
if TYPE_CHECKING:
    from typing import Any

    from .aio import AsyncChild as AsyncChild
    from .aio import AsyncClient
    from .client import Child, Client, default_client
    from .errors import DaemonConnectionError, DaemonUnavailable
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

#: name -> submodule that defines it
_LAZY = {
    **dict.fromkeys(("Child", "Client", "default_client"), ".client"),
    **dict.fromkeys(("DaemonConnectionError", "DaemonUnavailable"), ".errors"),
    **dict.fromkeys(("DEVNULL", "PIPE", "STDOUT", "Popen", "call", "check_call",
                     "check_output", "getoutput", "getstatusoutput", "run"), ".popen"),
    **dict.fromkeys(("AsyncClient", "AsyncChild"), ".aio"),
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is not None:
        value = getattr(importlib.import_module(where, __name__), name)
        globals()[name] = value  # later lookups are plain module attributes
        return value
    if name == "mp":
        return importlib.import_module(".mp", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "mp"})


# Referenced so linters see the re-exports as used.
_EAGER = (CalledProcessError, CompletedProcess, SubprocessError, TimeoutExpired)
