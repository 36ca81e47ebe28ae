"""Spawning what posix_spawn cannot express, through the exec helper, with synchronous errors.

posix_spawn cannot change credentials, capabilities, hard rlimits, nice, namespaces or the
controlling terminal, and the daemon must neither fork (it would copy the trio loop) nor change
its own process-wide credentials around a spawn. So it posix_spawns the exec helper (the C
program ``exec_helper/spawnd-exec``, or its Python twin ``_trampoline.py`` where none was
built) with the request's fds plus its own above the highest requested target: a spec pipe
(read end), a status pipe (write end), the checked executable as an ``O_PATH`` fd and the
caller's cwd fd. The helper applies the stages in order and execs; a failed stage comes back
as ``b"<stage> <errno>"`` on the status pipe, which is close-on-exec, so end-of-file with no
data means the exec happened. Errors therefore stay synchronous, as with plain posix_spawn.

The spec is NUL-terminated tokens (one letter, then the value), written into the pipe before
the helper even starts when it fits the pipe buffer (one wake-up per privileged spawn).
The plain path does not come here: see :func:`needs_helper`.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import stat
from typing import Any

import trio

from . import caps, exec_helper, spawner
from .policy import Grant
from .spawner import SpawnError, SpawnSpec

__all__ = ["NAMESPACE_FLAGS", "configure", "helper", "needs_helper", "open_executable",
           "real_path", "spawn_privileged"]

#: The helper normally reports within a millisecond (C) or ~10 ms (Python). This only bounds
#: a wedged one (e.g. a cwd on a hung NFS mount), which is then killed and reported ETIMEDOUT.
STATUS_TIMEOUT = 30.0
MAX_STATUS = 256  # a status record is "<stage> <errno>"; anything longer is not ours
PIPE_BUF_SAFE = 60 * 1024  # a spec this small is written before the spawn without blocking

STAGE_TRAMPOLINE = "trampoline"  # the helper itself could not be started (kept for clients)

#: clone(2) flags of the namespaces a request may ask for (``user`` is handled apart).
NAMESPACE_FLAGS = {"net": 0x40000000, "ipc": 0x08000000, "uts": 0x04000000,
                   "mount": 0x00020000, "user": 0x10000000}

_helper: exec_helper.Helper | None = None


def configure(mode: str = "auto") -> exec_helper.Helper:
    """Choose the exec helper (``auto``, ``c`` or ``python``); the daemon calls it at start."""
    global _helper
    _helper = exec_helper.choose(mode)
    return _helper


def helper() -> exec_helper.Helper:
    """The helper in use (chosen on first use if :func:`configure` was not called)."""
    return _helper if _helper is not None else configure("auto")


# The rlimits the daemon may lower or raise (soft, up to its hard limit) on itself for the
# length of one posix_spawn: none of them can hurt the daemon in that window. CPU (SIGXCPU),
# AS/DATA/STACK/RSS (the spawn itself allocates) go through the helper.
_SELF_SETTABLE = frozenset({
    resource.RLIMIT_NOFILE, resource.RLIMIT_CORE, resource.RLIMIT_FSIZE,
    resource.RLIMIT_NPROC, resource.RLIMIT_MEMLOCK, resource.RLIMIT_MSGQUEUE,
    resource.RLIMIT_SIGPENDING, resource.RLIMIT_NICE, resource.RLIMIT_RTPRIO,
    resource.RLIMIT_RTTIME, getattr(resource, "RLIMIT_LOCKS", 10)})


def needs_helper(spec: SpawnSpec, grant: Grant | None = None) -> bool:
    """Does this child need the exec helper? Only for what posix_spawn cannot do.

    cwd/cwd_fd, umask, affinity and a soft-only rlimit difference stay on the plain path
    (``spawner.spawn`` sets the daemon's own soft limit/affinity around posix_spawn).
    """
    if grant is not None and (grant.needs_trampoline or grant.namespaces):
        return True
    if spec.namespaces or spec.ctty is not None:
        return True
    if spec.nice is not None and spec.nice != os.getpriority(os.PRIO_PROCESS, 0):
        return True
    for res, soft, hard in spec.rlimits:
        cur_soft, cur_hard = resource.getrlimit(res)
        if (soft, hard) == (cur_soft, cur_hard):
            continue
        if hard != cur_hard or res not in _SELF_SETTABLE:
            return True
    return False


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
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        # The #! probe (a reopen through /proc, a read, a close) per file version, not per
        # spawn: any write to the file changes its mtime/ctime (ctime cannot be set back).
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        script = _SCRIPT_CACHE.get(key)
        if script is None:
            script = _is_script(fd)
            if len(_SCRIPT_CACHE) >= _SCRIPT_CACHE_SIZE:
                _SCRIPT_CACHE.clear()
            _SCRIPT_CACHE[key] = script
        return fd, script
    except BaseException:
        os.close(fd)
        raise


#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of an opened executable -> is it a
#: #! script. Only the probe's answer is cached: every spawn still opens and runs the file
#: by fd, so a path swapped meanwhile is a different key.
_SCRIPT_CACHE: dict[tuple[int, ...], bool] = {}
_SCRIPT_CACHE_SIZE = 512


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
    """Start ``spec`` through the exec helper with ``grant`` applied; return the child's pid.

    ``spec.exec_fd`` (from :func:`open_executable`) is the file the policy checked. When the
    credentials change, the helper opens ``spec.executable`` again as the target user (after
    its cwd) and runs that, refusing EACCES unless it is the same inode; otherwise it runs
    the fd. Without ``exec_fd`` (a script) the helper execs ``spec.executable`` by path.
    Raises :class:`spawner.SpawnError` with ``stage`` one of the helper's stages (see
    ``_trampoline.py``), "fds" or "trampoline"; no child is left behind on error (it is
    reaped here) or on cancellation (killed and reaped). On success the pid belongs to the
    caller, who must reap it.
    """
    h = helper()
    base = max((target for _, target in spec.fd_map), default=2) + 1
    exec_target = base + 2 if spec.exec_fd is not None else None
    cwd_target = base + 3 if spec.cwd_fd is not None else None
    plan = _plan(spec, grant, exec_target, cwd_target)
    spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
    try:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        _close(spec_r, spec_w)
        raise
    extra = [(spec_r, base), (status_w, base + 1)]
    if spec.exec_fd is not None:
        extra.append((spec.exec_fd, base + 2))
    if spec.cwd_fd is not None:
        extra.append((spec.cwd_fd, base + 3))
    setsid = spec.setsid and spec.ctty is None  # with a ctty the helper does setsid itself
    if spec.ctty is not None and spec.pgroup:
        _close(spec_r, spec_w, status_r, status_w)
        raise SpawnError(errno.EPERM, spawner.STAGE_EXEC, spec.executable)
    hspec = SpawnSpec(
        executable=h.executable,
        argv=(*h.argv_prefix, b"%d" % base, b"%d" % (base + 1), b"%d" % len(plan)),
        env=(), fd_map=(*spec.fd_map, *extra), setsid=setsid,
        pgroup=None if spec.ctty is not None else spec.pgroup)
    written = 0
    try:
        # Usually the whole spec fits the pipe: no second wake-up to feed it. Non-blocking,
        # because a pipe can be one page (pipe-user-pages-soft) and nobody reads it yet.
        os.set_blocking(spec_w, False)
        try:
            written = os.write(spec_w, plan[:PIPE_BUF_SAFE])
        except BlockingIOError:
            written = 0
        pid = spawner.spawn(hspec)
    except BaseException as e:
        _close(spec_w, status_r)
        if isinstance(e, SpawnError) and e.stage == spawner.STAGE_EXEC:
            raise SpawnError(e.errno, STAGE_TRAMPOLINE, h.executable) from None
        raise
    finally:
        _close(spec_r, status_w)  # the helper has its copies
    return await _supervise(pid, spec_w, status_r, plan[written:], spec)


def _rlimit_tokens(letter: bytes, limits: Any) -> list[bytes]:
    inf = resource.RLIM_INFINITY
    out = []
    for res, soft, hard in limits:
        s = (1 << 64) - 1 if soft == inf else soft
        h = (1 << 64) - 1 if hard == inf else hard
        out.append(letter + b"%d,%d,%d" % (res, s, h))
    return out


def _plan(spec: SpawnSpec, grant: Grant, exec_target: int | None,
          cwd_target: int | None) -> bytes:
    """The helper's instructions: NUL-terminated tokens, one letter then the value."""
    t: list[bytes] = []
    pre = [*spec.rlimits, *((r, s, h) for r, (s, h) in grant.rlimits.items()
                            if r in grant.privileged_rlimits)]
    post = [(r, s, h) for r, (s, h) in grant.rlimits.items() if r not in grant.privileged_rlimits]
    t += _rlimit_tokens(b"r", pre)
    t += _rlimit_tokens(b"R", post)
    if spec.nice is not None:
        t.append(b"n%d" % spec.nice)
    if spec.affinity is not None:
        t.append(b"a" + b",".join(b"%d" % c for c in spec.affinity))
    names = set(spec.namespaces) | set(grant.namespaces)
    flags = 0
    for name in names:
        if name not in NAMESPACE_FLAGS:
            raise SpawnError(errno.EINVAL, "namespaces")
        if name != "user":
            flags |= NAMESPACE_FLAGS[name]
    if flags:
        t.append(b"N%d" % flags)
    if "user" in names:
        t.append(b"U")
    if grant.groups is not None:
        t.append(b"G" + b",".join(b"%d" % g for g in grant.groups))
    if grant.gid is not None:
        t.append(b"g%d" % grant.gid)
    if grant.uid is not None:
        t.append(b"u%d" % grant.uid)
    if grant.manages_capabilities:
        t.append(b"c%d" % caps.mask(grant.capabilities))
        t.append(b"L%d" % caps.last_cap())
    if grant.no_new_privs:
        t.append(b"p")
    umask = grant.umask if grant.umask is not None else spec.umask
    if umask is not None:
        t.append(b"m%d" % umask)
    if cwd_target is not None:
        t.append(b"d%d" % cwd_target)
    if spec.cwd is not None:
        t.append(b"D" + spec.cwd)
    if spec.ctty is not None:
        t.append(b"t%d" % spec.ctty)
    switching = grant.uid is not None or grant.gid is not None or grant.groups is not None
    if exec_target is not None:
        t.append(b"x%d" % exec_target)
        if switching:  # opened again as the target user, identity compared
            t.append(b"C" + spec.executable)
    else:
        t.append(b"S")
        t.append(b"P" + spec.executable)
    if not spec.restore_signals:
        t.append(b"i")
    t += [b"A" + a for a in spec.argv]
    t += [b"E" + e for e in spec.env]
    for tok in t:
        if b"\0" in tok:
            raise SpawnError(errno.EINVAL, spawner.STAGE_EXEC, spec.executable)
    return b"\0".join(t) + b"\0"


async def _supervise(pid: int, spec_w: int, status_r: int, plan: bytes,
                     spec: SpawnSpec) -> int:
    """Feed what is left of the plan, await the verdict; kill and reap the helper on any
    failure. The happy path costs one wait on the status pipe: no pidfd, no streams."""
    out: trio.lowlevel.FdStream | None = None
    if plan:
        out = trio.lowlevel.FdStream(spec_w)  # owns spec_w from here
    else:
        os.close(spec_w)  # all of it is already in the pipe: EOF for the helper's reader
    try:
        with trio.fail_after(STATUS_TIMEOUT):
            record = await _exchange(out, status_r, plan)
    except BaseException as e:
        await _kill_and_reap(pid)
        if isinstance(e, trio.TooSlowError):
            raise SpawnError(errno.ETIMEDOUT, STAGE_TRAMPOLINE, helper().executable) from None
        raise
    finally:
        if out is not None:
            out.close()
        trio.lowlevel.notify_closing(status_r)
        os.close(status_r)
    if not record:
        return pid
    # It exits right after writing; the kill only matters for a record that is not ours.
    await _kill_and_reap(pid)
    raise _error_from(record, spec)


async def _exchange(out: trio.lowlevel.FdStream | None, status_r: int, plan: bytes) -> bytes:
    """Write what is left of the plan, then read the status record; b"" (end-of-file) means
    the exec succeeded."""
    if out is not None:
        try:
            await out.send_all(plan)
        except trio.BrokenResourceError:
            pass  # the helper died before reading: its status (or EOF) says why
        out.close()
    # One write of a few bytes (atomic, below PIPE_BUF) then exit, or EOF at exec: once
    # readable, a single read has the whole answer.
    await trio.lowlevel.wait_readable(status_r)
    return os.read(status_r, MAX_STATUS)


def _error_from(record: bytes, spec: SpawnSpec) -> SpawnError:
    try:
        stage, code = record.decode("ascii").split()
        num = int(code)
    except ValueError:
        return SpawnError(errno.EPROTO, STAGE_TRAMPOLINE, helper().executable)
    filename = {"exec": spec.executable, "cwd": spec.cwd}.get(stage)
    return SpawnError(num, stage, filename)


async def _kill_and_reap(pid: int) -> None:
    """Kill the helper and reap it; shielded, because leaving an unreaped child behind is
    worse than finishing a cancelled call late. Its pid cannot be recycled meanwhile: it
    is our unreaped child."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # out of fds: a SIGKILLed child is reaped at once, block for it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return
    try:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with trio.CancelScope(shield=True):
            await trio.lowlevel.wait_readable(pidfd)
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
