"""Compile ``spawnd-exec.c`` with the system C compiler: an install-time tool.

Used by ``setup.py`` (wheel and editable installs) and by hand
(``python3 -m spawnd.exec_helper.build [DEST]``). The daemon never imports this module.
Only the standard library, so ``setup.py`` can load it by file path before anything is
installed. No compiler (or a failed build) is not an error: the Python fallback is used.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import tempfile
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
            rc, err = _run(cmd)
        except OSError as e:
            rc, err = None, str(e)
            break
        if rc == 0:
            break
    if rc != 0:
        if not quiet:
            print(f"spawnd: building the C exec helper failed ({' '.join(cmd)}):\n{err}"
                  "the Python exec helper will be used", file=sys.stderr)
        tmp.unlink(missing_ok=True)
        return False
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return True


def _run(cmd: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """Run the compiler with posix_spawn (nothing in spawnd forks, install tools included);
    its exit status and stderr. A compiler hung past ``timeout`` is killed."""
    with tempfile.TemporaryFile() as errf:
        pid = os.posix_spawnp(cmd[0], cmd, dict(os.environ), file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, errf.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, errf.fileno(), 2)])
        pidfd = os.pidfd_open(pid)
        try:
            if not select.select([pidfd], [], [], timeout)[0]:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
        status = os.waitpid(pid, 0)[1]
        errf.seek(0)
        return os.waitstatus_to_exitcode(status), errf.read().decode(errors="replace")


def ensure_built(dest: Path | None = None) -> bool:
    """Build unless ``dest`` exists and is newer than the source (for tests and dev trees)."""
    dest = dest or SOURCE.with_name("spawnd-exec")
    if dest.exists() and dest.stat().st_mtime >= SOURCE.stat().st_mtime:
        return True
    return build(dest, quiet=True)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE.with_name("spawnd-exec")
    sys.exit(0 if build(target) else 1)
