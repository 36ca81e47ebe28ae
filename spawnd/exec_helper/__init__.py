"""Where the exec helper lives: the C program ``spawnd-exec`` or its Python twin.

The daemon posix_spawns the helper only for a child that needs what posix_spawn cannot
do (credentials, capabilities, no_new_privs, namespaces, a controlling terminal, nice,
hard rlimits). The C program is built when the package is installed (``setup.py``, with
the system compiler; ``python3 -m spawnd.exec_helper.build`` does it by hand); without a
compiler the install still succeeds and ``spawnd/_trampoline.py`` (a Python interpreter
start per privileged spawn, ~10 ms) does the same stages.

Nothing here starts a process: this only finds files.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BINARY", "MODES", "SOURCE", "Helper", "choose", "find_c_helper"]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "spawnd-exec.c"
BINARY = HERE / "spawnd-exec"
TRAMPOLINE = HERE.parent / "_trampoline.py"
MODES = ("auto", "c", "python")

#: ``-I``: no PYTHON* variables, no user site, no script directory on sys.path;
#: ``-S``: no site (nothing outside the stdlib is importable); ``-B``: write no .pyc.
PYTHON_FLAGS = (b"-I", b"-S", b"-B")


@dataclass(frozen=True, slots=True)
class Helper:
    """How to start the helper: ``argv_prefix`` + [spec fd, status fd, spec length]."""

    kind: str  # "c" or "python"
    executable: bytes
    argv_prefix: tuple[bytes, ...]

    def describe(self) -> str:
        return f"{self.kind} ({os.fsdecode(self.argv_prefix[-1])})"


def _trusted(path: Path) -> bool:
    """A root daemon runs the helper as root: neither it nor its directory may be writable
    by anyone but root or the daemon's uid (else the Python fallback is used)."""
    try:
        st = path.stat()
        dst = path.parent.stat()
    except OSError:
        return False
    owners = (0, os.geteuid())
    return (stat.S_ISREG(st.st_mode) and bool(st.st_mode & stat.S_IXUSR)
            and st.st_uid in owners and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            and dst.st_uid in owners and not dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def find_c_helper() -> Path | None:
    """The built ``spawnd-exec`` next to this file (``SPAWND_EXEC_HELPER`` overrides)."""
    override = os.environ.get("SPAWND_EXEC_HELPER")
    path = Path(override) if override else BINARY
    return path if _trusted(path) else None


def python_helper() -> Helper:
    py = os.fsencode(sys.executable)
    return Helper("python", py, (py, *PYTHON_FLAGS, os.fsencode(TRAMPOLINE)))


def choose(mode: str = "auto") -> Helper:
    """``auto``: the C helper when built, else Python. ``c`` without a build: FileNotFoundError."""
    if mode not in MODES:
        raise ValueError(f"exec helper must be one of {MODES}, not {mode!r}")
    if mode != "python":
        path = find_c_helper()
        if path is not None:
            exe = os.fsencode(path)
            return Helper("c", exe, (exe,))
        if mode == "c":
            raise FileNotFoundError(f"the C exec helper is not built: {BINARY} (run "
                                    "python3 -m spawnd.exec_helper.build)")
    return python_helper()
