"""Spawning with credentials, capabilities, rlimits or no_new_privs, with synchronous errors.

posix_spawn cannot express any of these, and the daemon must neither fork (it would copy
the trio loop) nor change its own process-wide credentials around a spawn (other requests
are in flight, and a root daemon that setuid()s cannot come back). So the daemon
posix_spawns a tiny Python trampoline (``_trampoline.py``) with the request's fds plus
three of its own above the highest requested target: a spec pipe (read end), a status
pipe (write end) and the target executable as an ``O_PATH`` fd. The trampoline applies the
grant in order and ``fexecve``\\s the fd; it reports a failed step as ``b"<stage> <errno>"``
on the status pipe, which is close-on-exec, so end-of-file with no data means the exec
happened. Errors therefore stay synchronous, exactly as with plain posix_spawn.

The plain path (no credential change) does not come here: see ``Grant.needs_trampoline``.
"""

from __future__ import annotations

import errno
import marshal
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import trio

from . import caps, spawner
from .policy import Grant
from .spawner import SpawnError, SpawnSpec

__all__ = ["TRAMPOLINE", "open_executable", "real_path", "spawn_privileged"]

TRAMPOLINE = os.fsencode(Path(__file__).with_name("_trampoline.py"))
PYTHON = os.fsencode(sys.executable)
#: ``-I``: no PYTHON* variables, no user site, no script directory on sys.path;
#: ``-S``: no site (nothing outside the stdlib is importable); ``-B``: write no .pyc.
PYTHON_FLAGS = (b"-I", b"-S", b"-B")

#: The trampoline normally reports within ~10 ms. This only bounds a wedged one (e.g. a
#: cwd on a hung NFS mount), which is then killed and reported as ETIMEDOUT.
STATUS_TIMEOUT = 30.0
MAX_STATUS = 256  # a status record is "<stage> <errno>"; anything longer is not ours

STAGE_TRAMPOLINE = "trampoline"  # the interpreter itself could not be started


def open_executable(path: bytes, cwd: bytes | None = None) -> tuple[int, bool]:
    """Open the file to run as ``O_PATH|O_CLOEXEC``; also say whether it is a ``#!`` script.

    The caller checks policy against :func:`real_path` of this fd and runs the fd, so a path
    swapped after the check cannot be run in its place. A relative ``path`` is relative to
    ``cwd`` (where the child would look it up). Raises ``OSError`` with ``filename`` set;
    anything but a regular file is EACCES, as ``execve`` would say.
    """
    full = path if path.startswith(b"/") or cwd is None else os.path.join(cwd, path)
    try:
        fd = os.open(full, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        return fd, _is_script(fd)
    except BaseException:
        os.close(fd)
        raise


def _is_script(fd: int) -> bool:
    """Read the first two bytes of the opened inode (reopened via /proc, not by path).

    A file the daemon cannot read is reported as not a script: the kernel can still exec an
    unreadable ELF, while an unreadable script could not be read by its interpreter anyway.
    """
    try:
        rd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
                     | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return os.pread(rd, 2, 0) == b"#!"
    except OSError:
        return False
    finally:
        os.close(rd)


def real_path(fd: int) -> bytes:
    """The canonical path of an opened file, for the policy check (no TOCTOU: by fd)."""
    return os.readlink(b"/proc/self/fd/%d" % fd)


async def spawn_privileged(spec: SpawnSpec, grant: Grant) -> int:
    """Start ``spec`` through the trampoline with ``grant`` applied; return the child's pid.

    ``spec.exec_fd`` (from :func:`open_executable`) is what runs; without it (a script) the
    trampoline execs ``spec.executable`` by path. ``spec.cwd`` is entered by the trampoline
    *after* the credential switch, so it is checked with the child's rights, not ours.
    Raises :class:`spawner.SpawnError` with ``stage`` in {"fds", "trampoline", "rlimits",
    "credentials", "capabilities", "no_new_privs", "cwd", "exec"}; no child is left behind
    on error (it is reaped here) or on cancellation (killed and reaped). On success the pid
    belongs to the caller, who must reap it.
    """
    base = max((target for _, target in spec.fd_map), default=2) + 1
    plan = _plan(spec, grant, exec_target=base + 2 if spec.exec_fd is not None else None)
    spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    extra = [(spec_r, base), (status_w, base + 1)]
    if spec.exec_fd is not None:
        extra.append((spec.exec_fd, base + 2))
    tspec = SpawnSpec(
        executable=PYTHON, argv=(PYTHON, *PYTHON_FLAGS, TRAMPOLINE, b"%d" % base,
                                 b"%d" % (base + 1)),
        env=(), fd_map=(*spec.fd_map, *extra), cwd=None, setsid=spec.setsid,
        pgroup=spec.pgroup, umask=None, exec_fd=None)
    try:
        pid = spawner.spawn(tspec)
    except BaseException as e:
        _close(spec_w, status_r)
        if isinstance(e, SpawnError) and e.stage == spawner.STAGE_EXEC:
            raise SpawnError(e.errno, STAGE_TRAMPOLINE, PYTHON) from None
        raise
    finally:
        _close(spec_r, status_w)  # the trampoline has its copies
    return await _supervise(pid, spec_w, status_r, plan, spec)


def _plan(spec: SpawnSpec, grant: Grant, exec_target: int | None) -> bytes:
    """The trampoline's instructions (marshal: builtin in the interpreter, nothing to import).

    ``caps`` is None when the capability sets are to be left alone (see
    ``Grant.manages_capabilities``); otherwise the exact list of numbers to keep.
    """
    pre = [(r, s, h) for r, (s, h) in grant.rlimits.items() if r in grant.privileged_rlimits]
    post = [(r, s, h) for r, (s, h) in grant.rlimits.items() if r not in grant.privileged_rlimits]
    # The reachability check runs after the chdir: a relative path then resolves where the
    # child itself would look it up.
    switching = grant.uid is not None or grant.gid is not None or grant.groups is not None
    check = spec.executable if switching and exec_target is not None else None
    plan: dict[str, Any] = {
        "argv": list(spec.argv), "env": list(spec.env), "path": spec.executable,
        "exec_fd": exec_target, "check_path": check,
        "uid": grant.uid, "gid": grant.gid,
        "groups": None if grant.groups is None else list(grant.groups),
        "caps": ([caps.number(c) for c in grant.capabilities]
                 if grant.manages_capabilities else None),
        "last_cap": caps.last_cap(), "rl_pre": pre, "rl_post": post,
        "nnp": grant.no_new_privs, "cwd": spec.cwd,
        "umask": grant.umask if grant.umask is not None else spec.umask,
    }
    return marshal.dumps(plan)


async def _supervise(pid: int, spec_w: int, status_r: int, plan: bytes,
                     spec: SpawnSpec) -> int:
    """Feed the plan, await the verdict; kill and reap the trampoline on any failure."""
    out = trio.lowlevel.FdStream(spec_w)  # own both fds from here: closed whatever happens
    inp = trio.lowlevel.FdStream(status_r)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        out.close()
        inp.close()
        os.kill(pid, signal.SIGKILL)  # cannot be recycled: it is our unreaped child
        os.waitpid(pid, 0)
        raise
    try:
        with trio.fail_after(STATUS_TIMEOUT):
            record = await _exchange(out, inp, plan)
    except BaseException as e:
        await _kill_and_reap(pidfd)
        if isinstance(e, trio.TooSlowError):
            raise SpawnError(errno.ETIMEDOUT, STAGE_TRAMPOLINE, PYTHON) from None
        raise
    finally:
        out.close()
        inp.close()
    if not record:
        os.close(pidfd)
        return pid
    # It exits right after writing; the kill only matters for a record that is not ours.
    await _kill_and_reap(pidfd)
    raise _error_from(record, spec)


async def _exchange(out: trio.lowlevel.FdStream, inp: trio.lowlevel.FdStream,
                    plan: bytes) -> bytes:
    """Write the plan, close it, read the status pipe to EOF (b"" = exec succeeded)."""
    try:
        await out.send_all(plan)
    except trio.BrokenResourceError:
        pass  # the trampoline died before reading: its status (or EOF) says why
    out.close()  # EOF for the trampoline's reader
    record = b""
    while chunk := await inp.receive_some(MAX_STATUS):
        record += chunk
        if len(record) > MAX_STATUS:
            break
    return record


def _error_from(record: bytes, spec: SpawnSpec) -> SpawnError:
    try:
        stage, code = record.decode("ascii").split()
        num = int(code)
    except ValueError:
        return SpawnError(errno.EPROTO, STAGE_TRAMPOLINE, PYTHON)
    filename = {"exec": spec.executable, "cwd": spec.cwd}.get(stage)
    return SpawnError(num, stage, filename)


async def _reap(pidfd: int) -> None:
    """Wait for the (killed or exiting) trampoline to end and reap it; shielded, because
    leaving an unreaped child behind is worse than finishing a cancelled call late."""
    try:
        with trio.CancelScope(shield=True):
            await trio.lowlevel.wait_readable(pidfd)
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


async def _kill_and_reap(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await _reap(pidfd)


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
