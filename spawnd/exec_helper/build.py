"""Compile ``spawnd-exec.c`` with the system C compiler: an install-time tool.

Used by ``setup.py`` (wheel and editable installs) and by hand
(``python3 -m spawnd.exec_helper.build [DEST]``). The daemon never imports this module.
Only the standard library, so ``setup.py`` can load it by file path before anything is
installed. No compiler (or a failed build) is not an error: the Python fallback is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("spawnd-exec.c")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")


def compiler() -> str | None:
    cc = os.environ.get("CC", "cc").split()[0]
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def build(dest: Path, *, quiet: bool = False) -> bool:
    """Compile into ``dest`` (atomically, mode 0755); False if there is no working compiler."""
    cc = compiler()
    if cc is None:
        if not quiet:
            print("spawnd: no C compiler: the Python exec helper will be used", file=sys.stderr)
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    # Static first: no dynamic loader run per privileged spawn (~0.1 ms); where no static
    # libc is installed, a dynamic build does the same.
    for extra in (["-static"], []):
        cmd = [cc, *CFLAGS, *extra, "-o", str(tmp), str(SOURCE)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except OSError as e:
            res = None
            err = str(e)
            break
        err = res.stderr
        if res.returncode == 0:
            break
    if res is None or res.returncode != 0:
        if not quiet:
            print(f"spawnd: building the C exec helper failed ({' '.join(cmd)}):\n{err}"
                  "the Python exec helper will be used", file=sys.stderr)
        tmp.unlink(missing_ok=True)
        return False
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return True


def ensure_built(dest: Path | None = None) -> bool:
    """Build unless ``dest`` exists and is newer than the source (for tests and dev trees)."""
    dest = dest or SOURCE.with_name("spawnd-exec")
    if dest.exists() and dest.stat().st_mtime >= SOURCE.stat().st_mtime:
        return True
    return build(dest, quiet=True)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE.with_name("spawnd-exec")
    sys.exit(0 if build(target) else 1)
