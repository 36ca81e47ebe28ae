"""Which Pythons the spawnd start method supports, checked before touching any internals.

A start method cannot be written against public API alone: it must provide a ``_Popen``,
register itself where ``set_start_method`` looks (``context._concrete_contexts``), reuse the
spawn child's bootstrap (``spawn._main``, ``spawn._fixup_main_from_*``) and replace the
resource tracker's launcher. These are private and change between releases, so we name
the versions we have read the sources of and fail early and clearly on anything else,
instead of misbehaving in a child process where nobody sees the traceback.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["SUPPORTED", "UnsupportedPython", "check"]

#: Inclusive range of CPython minor versions whose multiprocessing internals we rely on.
SUPPORTED = ((3, 11), (3, 14))

# (module, attribute) pairs the start method uses; a missing one means the internals moved.
_REQUIRED = (
    ("multiprocessing.context", "_concrete_contexts"),
    ("multiprocessing.context", "set_spawning_popen"),
    ("multiprocessing.context", "BaseContext"),
    ("multiprocessing.process", "BaseProcess"),
    ("multiprocessing.spawn", "_main"),
    ("multiprocessing.spawn", "get_preparation_data"),
    ("multiprocessing.spawn", "get_executable"),
    ("multiprocessing.spawn", "_fixup_main_from_name"),
    ("multiprocessing.spawn", "_fixup_main_from_path"),
    ("multiprocessing.resource_tracker", "ResourceTracker"),
    ("multiprocessing.resource_tracker", "_resource_tracker"),
    ("multiprocessing.util", "_args_from_interpreter_flags"),
    ("multiprocessing.util", "_flush_std_streams"),
)

_checked = False


class UnsupportedPython(RuntimeError):
    """This interpreter's multiprocessing internals are not ones the spawnd method knows."""


def check() -> None:
    """Raise :class:`UnsupportedPython` unless this is a CPython/Linux we support."""
    global _checked
    if _checked:
        return
    lo, hi = SUPPORTED
    here = sys.version_info[:2]
    if sys.implementation.name != "cpython" or not lo <= here <= hi:
        raise UnsupportedPython(
            f"the spawnd multiprocessing start method supports CPython "
            f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}; this is {sys.implementation.name} "
            f"{here[0]}.{here[1]}. Use the 'spawn' start method here.")
    if not sys.platform.startswith("linux"):
        raise UnsupportedPython("the spawnd start method needs Linux (pidfds, SCM_RIGHTS)")
    for module, attr in _REQUIRED:
        if not hasattr(importlib.import_module(module), attr):
            raise UnsupportedPython(
                f"{module}.{attr} is missing in Python {sys.version.split()[0]}: the "
                "multiprocessing internals the spawnd start method builds on have changed")
    _checked = True
