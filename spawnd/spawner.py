"""The only place in spawnd that creates processes: glibc ``posix_spawn`` via ctypes.

Why not ``os.posix_spawn``: it has no chdir and no closefrom action. Why not fork or
subprocess: the daemon must stay cheap and deterministic. glibc (>= 2.24) spawns with
``clone(CLONE_VM | CLONE_VFORK)``, so every failure up to and including ``execve`` comes
back synchronously as the return value, and glibc reaps the failed child itself.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import signal
import stat
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "STAGE_CWD",
    "STAGE_EXEC",
    "STAGE_FDS",
    "SpawnError",
    "SpawnSpec",
    "resolve_executable",
    "spawn",
]

STAGE_FDS = "fds"
STAGE_CWD = "cwd"
STAGE_EXEC = "exec"
STAGE_RLIMITS = "rlimits"
STAGE_AFFINITY = "affinity"

#: Highest fd number a client may ask for; RLIMIT_NOFILE usually bounds it far lower.
MAX_TARGET_FD = 1_000_000

# <spawn.h> flag values (glibc). SETSID is a glibc extension (2.26).
_SETPGROUP = 0x02
_SETSIGDEF = 0x04
_SETSIGMASK = 0x08
_SETSID = 0x80

# Opaque glibc types, sized generously: on x86_64 posix_spawnattr_t is 336 bytes,
# posix_spawn_file_actions_t 80 and sigset_t 128.
_ATTR_SIZE = 1024
_ACTIONS_SIZE = 1024
_SIGSET_SIZE = 256

_DEVNULL = b"/dev/null"

# The daemon's own umask, read once (reading it means setting it): only spawn() below
# changes it, for the length of one posix_spawn, so a caller's equal umask costs nothing.
_OWN_UMASK = os.umask(0o022)
os.umask(_OWN_UMASK)


# --- ctypes bindings, resolved once ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_vp = ctypes.c_void_p
_int = ctypes.c_int
_argvp = ctypes.POINTER(ctypes.c_char_p)


def _bind(name: str, *argtypes: type) -> ctypes._CFuncPtr:
    func = getattr(_libc, name)
    func.argtypes = argtypes
    func.restype = _int
    return func


_posix_spawn = _bind("posix_spawn", ctypes.POINTER(_int), ctypes.c_char_p, _vp, _vp, _argvp, _argvp)
_fa_init = _bind("posix_spawn_file_actions_init", _vp)
_fa_destroy = _bind("posix_spawn_file_actions_destroy", _vp)
_fa_dup2 = _bind("posix_spawn_file_actions_adddup2", _vp, _int, _int)
_fa_close = _bind("posix_spawn_file_actions_addclose", _vp, _int)
_fa_open = _bind(
    "posix_spawn_file_actions_addopen", _vp, _int, ctypes.c_char_p, _int, ctypes.c_uint
)
_fa_chdir = _bind("posix_spawn_file_actions_addchdir_np", _vp, ctypes.c_char_p)
_fa_fchdir = _bind("posix_spawn_file_actions_addfchdir_np", _vp, _int)
_fa_closefrom = _bind("posix_spawn_file_actions_addclosefrom_np", _vp, _int)
_attr_init = _bind("posix_spawnattr_init", _vp)
_attr_destroy = _bind("posix_spawnattr_destroy", _vp)
_attr_setflags = _bind("posix_spawnattr_setflags", _vp, ctypes.c_short)
_attr_setsigdefault = _bind("posix_spawnattr_setsigdefault", _vp, _vp)
_attr_setsigmask = _bind("posix_spawnattr_setsigmask", _vp, _vp)
_attr_setpgroup = _bind("posix_spawnattr_setpgroup", _vp, _int)


def _sigset_of_all_signals(keep: tuple[int, ...] = ()) -> ctypes.Array:
    """Every signal 1..NSIG-1, including glibc's internal 32 and 33.

    Not sigfillset: it leaves out the internal signals, and for signals outside the
    sigdefault set glibc's spawn child sets the internal ones to SIG_IGN, which
    survives exec (os.posix_spawn children show SigIgn 0x180000000).
    """
    buf = ctypes.create_string_buffer(_SIGSET_SIZE)  # zeroed: also the empty mask
    word_bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    words = (ctypes.c_ulong * (_SIGSET_SIZE * 8 // word_bits)).from_buffer(buf)
    for sig in range(1, signal.NSIG):
        if sig in keep:
            continue
        words[(sig - 1) // word_bits] |= 1 << ((sig - 1) % word_bits)
    return buf


# Built once: every signal back to SIG_DFL (Python ignores SIGPIPE and SIGXFSZ, and an
# ignore survives exec), and an empty mask (all zero bytes, as sigemptyset makes it).
_ALL_SIGNALS = _sigset_of_all_signals()
_NO_SIGNALS = ctypes.create_string_buffer(_SIGSET_SIZE)
# restore_signals=False (subprocess's flag): SIGPIPE and SIGXFSZ keep the daemon's SIG_IGN
# (Python's), which is what the stdlib's child inherits from a Python parent.
_ALL_BUT_PIPE_XFSZ = _sigset_of_all_signals((signal.SIGPIPE, signal.SIGXFSZ))


# --- public API ------------------------------------------------------------------------


class SpawnError(OSError):
    """A spawn that failed before the child ran: errno plus the stage that failed.

    posix_spawn reports only an errno; ``stage`` tells the client whether its fds,
    its cwd or the executable was at fault (subprocess makes the same split).
    """

    stage: str

    def __init__(self, errno_value: int, stage: str, filename: bytes | str | None = None):
        super().__init__(errno_value, os.strerror(errno_value), filename)
        self.stage = stage

    def __str__(self) -> str:
        text = f"[Errno {self.errno}] {self.strerror}"
        if self.filename is not None:
            name = self.filename
            text += f": {os.fsdecode(name)!r}" if isinstance(name, bytes) else f": {name!r}"
        return f"{text} (stage: {self.stage})"

    def __reduce__(self) -> tuple[type, tuple[int, str, bytes | str | None]]:
        # OSError's own reduce would pass (errno, strerror, filename) to our __init__.
        return (type(self), (self.errno, self.stage, self.filename))


@dataclass(frozen=True, slots=True)
class SpawnSpec:
    """Everything needed to start one child; validated by the caller except the fds."""

    executable: bytes
    argv: Sequence[bytes]
    env: Sequence[bytes]
    fd_map: Sequence[tuple[int, int]] = ()
    cwd: bytes | None = None
    setsid: bool = False
    pgroup: int | None = None
    umask: int | None = None
    exec_fd: int | None = None
    # Inherited caller state and isolation (issue 11); the defaults keep the daemon's own.
    cwd_fd: int | None = None  # daemon fd of a directory: fchdir(cwd_fd), then chdir(cwd)
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard) for the child
    nice: int | None = None  # absolute nice value
    affinity: tuple[int, ...] | None = None  # CPU numbers
    namespaces: tuple[str, ...] = ()  # subset of NAMESPACES
    ctty: int | None = None  # a target fd in fd_map that becomes the controlling terminal
    restore_signals: bool = True  # False: SIGPIPE/SIGXFSZ stay ignored (stdlib semantics)


def spawn(spec: SpawnSpec) -> int:
    """Start the child described by ``spec``; return its pid or raise SpawnError.

    No child exists after a SpawnError: glibc reaps a child whose exec failed.
    """
    if spec.namespaces or spec.ctty is not None or (
            spec.nice is not None and spec.nice != os.getpriority(os.PRIO_PROCESS, 0)):
        # Only the exec helper can do these (privileged.needs_helper routes them there):
        # never drop them silently.
        raise SpawnError(errno.EINVAL, STAGE_EXEC, spec.executable)
    targets = _check_fd_map(spec.fd_map)
    top = max(2, max(targets, default=2))
    flags = _SETSIGDEF | _SETSIGMASK
    pgroup = spec.pgroup
    if spec.setsid:
        flags |= _SETSID
        if pgroup:
            # A session leader cannot join another group: setpgid would fail EPERM.
            raise SpawnError(errno.EPERM, STAGE_EXEC, spec.executable)
        pgroup = None  # setsid already made the child leader of a new group
    if pgroup is not None:
        flags |= _SETPGROUP
    path = spec.executable
    if spec.exec_fd is not None:
        try:
            fcntl.fcntl(spec.exec_fd, fcntl.F_GETFD)
        except OSError as exc:
            raise SpawnError(exc.errno, STAGE_FDS, spec.executable) from None
        # The daemon's pid, not "self": the child's copy of the fd is closed by our
        # closefrom action (and by exec), yet a #! interpreter opens this path later.
        path = b"/proc/%d/fd/%d" % (os.getpid(), spec.exec_fd)

    argv = _ARGV.array(spec.argv)
    envp = _ENVP.array(spec.env)
    pid = _int()
    moved = _move_sources(targets, top)
    old_umask: int | None = None
    saved_limits: list[tuple[int, tuple[int, int]]] = []
    saved_affinity: set[int] | None = None
    kept = True
    try:
        actions, kept = _file_actions(targets, moved, top, spec.cwd_fd, spec.cwd)
        attr = _attributes(flags, spec.restore_signals, pgroup)
        if spec.umask is not None and spec.umask != _OWN_UMASK:
            old_umask = os.umask(spec.umask)  # the child inherits it; single-threaded
        saved_limits = _borrow_rlimits(spec.rlimits)
        saved_affinity = _borrow_affinity(spec.affinity)
        err = _posix_spawn(ctypes.byref(pid), path, actions, attr, argv, envp)
    finally:
        if old_umask is not None:
            os.umask(old_umask)
        _give_back(saved_limits, saved_affinity)
        if not kept:
            _fa_destroy(actions)
        for fd in moved.values():
            os.close(fd)
    if err:
        raise _classify(err, spec)
    return pid.value


def resolve_executable(name: bytes, path_env: bytes | None, cwd: bytes | None) -> bytes:
    """Search PATH like os.execvpe/subprocess, but in the daemon, before spawning.

    Names containing b"/" are returned unchanged. Otherwise the first executable
    regular file along ``path_env`` (default os.defpath) wins. The result may be
    relative; like execve in the child it is then relative to ``cwd``, which is
    also where this check looks. Like execvpe, a candidate that exists but cannot
    be executed makes the final error EACCES instead of ENOENT.
    """
    if b"/" in name:
        return name
    if not name:
        raise SpawnError(errno.ENOENT, STAGE_EXEC, name)
    dirs = (os.fsencode(os.defpath) if path_env is None else path_env).split(b":")
    saved: int | None = None
    for directory in dirs:
        candidate = os.path.join(directory, name)
        where = candidate if cwd is None else os.path.join(cwd, candidate)
        try:
            st = os.stat(where)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and saved is None:
                saved = exc.errno
            continue
        if stat.S_ISREG(st.st_mode) and os.access(where, os.X_OK):
            return candidate
        if saved is None:
            saved = errno.EACCES
    raise SpawnError(saved if saved is not None else errno.ENOENT, STAGE_EXEC, name)


# --- helpers ---------------------------------------------------------------------------


# --- what one spawn hands glibc, built once per distinct value ---------------------------
# A client repeats the same request: the same argv and environment (the same tuples, from
# protocol's seen-spawn cache), the same fd numbers, the same attributes. Building the
# glibc structures costs more in ctypes calls than the rest of the daemon's Python work on
# a plain spawn, so each distinct value is built once and kept (bounded); glibc only reads
# them during posix_spawn.


class _ArrayCache:
    """NULL-terminated ``char *[]`` arrays of immutable byte-string tuples, by identity.
    Bounded in count and in what each entry keeps alive (a request's strings)."""

    SIZE = 32
    MAX_BYTES = 32 * 1024

    def __init__(self) -> None:
        self._arrays: dict[int, tuple[tuple[bytes, ...], ctypes.Array]] = {}

    def array(self, strings: Sequence[bytes]) -> ctypes.Array:
        if type(strings) is not tuple:  # a list could change under its id
            return (ctypes.c_char_p * (len(strings) + 1))(*strings)
        hit = self._arrays.get(id(strings))
        if hit is not None and hit[0] is strings:
            return hit[1]
        arr = (ctypes.c_char_p * (len(strings) + 1))(*strings)
        if sum(map(len, strings)) <= self.MAX_BYTES:
            if len(self._arrays) >= self.SIZE:
                self._arrays.clear()
            self._arrays[id(strings)] = (strings, arr)  # the tuple keeps its bytes (and id)
        return arr


_ARGV = _ArrayCache()
_ENVP = _ArrayCache()
_ATTRS: dict[tuple[int, bool, int | None], ctypes.Array] = {}
_ACTIONS: dict[tuple[object, ...], ctypes.Array] = {}
_ACTIONS_KEPT = 32
_CWD_KEPT_MAX = 4096  # file actions with a longer cwd path are built, used and destroyed


def _attributes(flags: int, restore_signals: bool, pgroup: int | None) -> ctypes.Array:
    """The spawn attributes; those of a new group or the daemon's (a few) are kept."""
    key = (flags, restore_signals, pgroup)
    attr = _ATTRS.get(key)
    if attr is not None:
        return attr
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _attr_init(attr)  # a memset in glibc; destroy is a no-op (a kept one is never destroyed)
    _ok(_attr_setflags(attr, flags), STAGE_EXEC)
    _ok(_attr_setsigdefault(attr, _ALL_SIGNALS if restore_signals else _ALL_BUT_PIPE_XFSZ),
        STAGE_EXEC)
    _ok(_attr_setsigmask(attr, _NO_SIGNALS), STAGE_EXEC)
    if pgroup is not None:
        _ok(_attr_setpgroup(attr, pgroup), STAGE_EXEC)
    if pgroup in (None, 0):  # an explicit group id is rarely used twice: not kept
        _ATTRS[key] = attr
    return attr


def _file_actions(targets: dict[int, int], moved: dict[int, int], top: int,
                  cwd_fd: int | None, cwd: bytes | None) -> tuple[ctypes.Array, bool]:
    """The file actions for these fd numbers and cwd, kept by exactly those values; and
    whether they are kept (else the caller destroys them after its spawn)."""
    key = (tuple(targets.items()), tuple(moved.items()), top, cwd_fd, cwd)
    actions = _ACTIONS.get(key)
    if actions is not None:
        return actions, True
    actions = ctypes.create_string_buffer(_ACTIONS_SIZE)
    _fa_init(actions)  # a memset in glibc: cannot fail
    try:
        if cwd_fd is not None:
            # First, before any dup2/close action can reuse or close that fd number.
            _ok(_fa_fchdir(actions, cwd_fd), STAGE_CWD, cwd)
        _add_fd_actions(actions, targets, moved, top)
        if cwd is not None:
            _ok(_fa_chdir(actions, cwd), STAGE_CWD, cwd)
    except SpawnError:
        _fa_destroy(actions)
        raise
    if cwd is not None and len(cwd) > _CWD_KEPT_MAX:
        return actions, False  # each entry holds a copy of the path: long ones are not kept
    if len(_ACTIONS) >= _ACTIONS_KEPT:
        for old in _ACTIONS.values():
            _fa_destroy(old)  # glibc frees the copied paths and the action list
        _ACTIONS.clear()
    _ACTIONS[key] = actions
    return actions, True


def _borrow_rlimits(limits: Sequence[tuple[int, int, int]]) -> list[tuple[int, tuple[int, int]]]:
    """Give the daemon the child's soft limits for the length of one posix_spawn.

    The child inherits them; the daemon is single-threaded, so nothing else runs before
    :func:`_give_back`. Only soft limits under the same hard limit: anything else needs the
    exec helper (``privileged.needs_helper`` routes it there), so it is refused here.
    """
    saved: list[tuple[int, tuple[int, int]]] = []
    try:
        for res, soft, hard in limits:
            cur = resource.getrlimit(res)
            if (soft, hard) == cur:
                continue
            if hard != cur[1]:
                raise SpawnError(errno.EPERM, STAGE_RLIMITS)
            resource.setrlimit(res, (soft, hard))
            saved.append((res, cur))
    except (OSError, ValueError) as exc:
        _give_back(saved, None)
        if isinstance(exc, SpawnError):
            raise
        raise SpawnError(getattr(exc, "errno", None) or errno.EINVAL, STAGE_RLIMITS) from None
    return saved


def _borrow_affinity(cpus: Sequence[int] | None) -> set[int] | None:
    """Likewise the CPU affinity (the child inherits it across posix_spawn)."""
    if cpus is None:
        return None
    cur = os.sched_getaffinity(0)
    if set(cpus) == cur:
        return None
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise SpawnError(exc.errno, STAGE_AFFINITY) from None
    return cur


def _give_back(limits: list[tuple[int, tuple[int, int]]], affinity: set[int] | None) -> None:
    for res, old in reversed(limits):
        resource.setrlimit(res, old)
    if affinity is not None:
        os.sched_setaffinity(0, affinity)



def _ok(err: int, stage: str, filename: bytes | None = None) -> None:
    if err:
        raise SpawnError(err, stage, filename)


def _check_fd_map(fd_map: Sequence[tuple[int, int]]) -> dict[int, int]:
    """Return {target: source}; reject what would only fail later inside the child."""
    targets: dict[int, int] = {}
    for source, target in fd_map:
        if source < 0 or target < 0 or target > MAX_TARGET_FD:
            raise SpawnError(errno.EBADF, STAGE_FDS)
        if target in targets:
            raise SpawnError(errno.EINVAL, STAGE_FDS)  # two files for one fd number
        targets[target] = source
    return targets


def _move_sources(targets: dict[int, int], top: int) -> dict[int, int]:
    """Dup each source whose number is also a target to a fresh fd above top.

    Then no dup2 action can clobber a source that a later dup2 still reads, so swaps
    and cycles just work, and a source never equals its target (a real dup2 always
    clears CLOEXEC). Other sources are left alone: dup2 writes only target numbers, and
    the /dev/null opens and closes run after all dup2s; a closed one fails the child's
    dup2, which posix_spawn reports as EBADF (stage "fds"), with no child left.
    Returns {source: temporary fd}; the caller closes them.
    """
    moved: dict[int, int] = {}
    try:
        for source in set(targets.values()):
            if source in targets:
                moved[source] = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, top + 1)
    except OSError as exc:
        for fd in moved.values():
            os.close(fd)
        # EINVAL here means top + 1 >= RLIMIT_NOFILE: a target glibc would call EBADF.
        code = errno.EBADF if exc.errno == errno.EINVAL else exc.errno
        raise SpawnError(code, STAGE_FDS) from None
    return moved


def _add_fd_actions(
    actions: ctypes.Array, targets: dict[int, int], moved: dict[int, int], top: int
) -> None:
    """Make the child's fd table exactly {0, 1, 2} | targets."""
    for target, source in targets.items():
        _ok(_fa_dup2(actions, moved.get(source, source), target), STAGE_FDS)
    for fd in (0, 1, 2):
        if fd not in targets:  # never leak the daemon's own stdio
            _ok(_fa_open(actions, fd, _DEVNULL, os.O_RDWR, 0), STAGE_FDS)
    for fd in range(3, top):
        if fd not in targets:
            _ok(_fa_close(actions, fd), STAGE_FDS)
    err = _fa_closefrom(actions, top + 1)
    # EBADF: top + 1 is at RLIMIT_NOFILE, so the child cannot hold anything above it.
    if err and err != errno.EBADF:
        raise SpawnError(err, STAGE_FDS)


def _classify(err: int, spec: SpawnSpec) -> SpawnError:
    """Name the failed stage: posix_spawn returns only an errno, so re-check the cwd."""
    if err in (errno.EBADF, errno.EMFILE):
        return SpawnError(err, STAGE_FDS)
    if spec.cwd_fd is not None and not _usable_dir(b".", spec.cwd_fd):
        return SpawnError(err, STAGE_CWD, spec.cwd)
    if spec.cwd is not None and not _usable_dir(spec.cwd, spec.cwd_fd):
        return SpawnError(err, STAGE_CWD, spec.cwd)
    return SpawnError(err, STAGE_EXEC, spec.executable)


def _usable_dir(path: bytes, dir_fd: int | None = None) -> bool:
    try:
        st = os.stat(path, dir_fd=dir_fd)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and os.access(path, os.X_OK, dir_fd=dir_fd)
