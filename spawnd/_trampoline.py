"""spawnd's exec trampoline: apply credentials, capabilities and limits, then exec by fd.

posix_spawn cannot change uid/gid/groups, capabilities, rlimits or no_new_privs, so for
such a grant the daemon posix_spawns ``python -I -S -B`` on this file (no environment,
no site, no user code) and this does the rest in the child, in the one order that works:

    rlimits the policy grants with privilege (while still root)
    setgroups -> setresgid
    drop the bounding set to the grant (needs CAP_SETPCAP: before setresuid)
    PR_SET_KEEPCAPS -> setresuid (so the permitted set survives leaving uid 0)
    capset E=P=I=grant -> ambient raise each (so they survive exec of an ordinary binary)
    the client's own rlimits (as the new user: the kernel allows only what it could do)
    no_new_privs -> chdir (as the new user) -> umask -> execve(fd)

Any failure writes ``b"<stage> <errno>"`` to the status pipe and exits 127; a successful
exec closes the pipe (close-on-exec) with nothing written. Python with ``-I -S`` has already
imported everything imported here except ``_ctypes``/``resource``, which are imported
before the credential switch (the interpreter's files may be unreadable afterwards).
Invoked as ``trampoline.py SPEC_FD STATUS_FD``; the spec is a ``marshal``-ed dict.
Annotations are plain builtins on purpose: ``from __future__`` or ``typing`` would be
imports, and every import here is paid on every privileged spawn.
"""

import _signal
import marshal
import os
import sys

_PR_CAPBSET_DROP = 24
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_V3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set

stage = "spec"


def _libc() -> tuple:
    """(prctl, capset, get_errno) from libc."""
    try:
        return _libc_core()
    except (ImportError, AttributeError, TypeError):  # the private C API changed
        return _libc_ctypes()


def _libc_core() -> tuple:
    """Through ``_ctypes`` directly: ``import ctypes`` costs ~2.5 ms (ctypes/__init__,
    struct, types), its C core ~0.4 ms, and two int-returning calls need only the core."""
    import _ctypes

    class c_int(_ctypes._SimpleCData):
        _type_ = "i"

    class c_ulong(_ctypes._SimpleCData):
        _type_ = "L"

    class Func(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = c_int

    class Libc:
        _handle = _ctypes.dlopen(None, 0x2)  # dlopen(NULL, RTLD_NOW): the global scope (libc)

    prctl = Func(("prctl", Libc))
    prctl.argtypes = (c_ulong,) * 5
    capset = Func(("capset", Libc))
    return prctl, capset, _ctypes.get_errno


def _libc_ctypes() -> tuple:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = (ctypes.c_ulong,) * 5
    return prctl, libc.capset, ctypes.get_errno


def _check(ret: int, get_errno) -> None:
    if ret == -1:
        err = get_errno()
        raise OSError(err, os.strerror(err))


def _read_spec(fd: int) -> dict:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return marshal.loads(b"".join(chunks))


def _set_rlimits(limits: list) -> None:
    """prlimit, not setrlimit: Python turns setrlimit's EPERM into a ValueError."""
    if limits:
        import resource

        for res, soft, hard in limits:
            try:
                resource.prlimit(0, res, (soft, hard))
            except ValueError:  # only EINVAL (soft > hard) is a ValueError for prlimit
                raise OSError(22, "Invalid argument") from None


def _capset(capset, get_errno, caps: list) -> None:
    m = 0
    for c in caps:
        m |= 1 << c
    lo, hi = m & 0xFFFFFFFF, m >> 32
    header = _CAP_V3.to_bytes(4, sys.byteorder) + (0).to_bytes(4, sys.byteorder)
    data = b"".join(w.to_bytes(4, sys.byteorder) for w in (lo, lo, lo, hi, hi, hi))
    _check(capset(header, data), get_errno)


def _apply(spec: dict) -> None:
    """Everything between reading the spec and exec, in order; sets ``stage`` as it goes."""
    global stage
    caps = spec["caps"]
    lib = _libc() if caps is not None or spec["nnp"] else None
    stage = "rlimits"
    pre, post = spec["rl_pre"], spec["rl_post"]
    if pre or post:
        import resource  # noqa: F401  (imported now: the stdlib may be unreadable later)
    _set_rlimits(pre)
    stage = "credentials"
    if spec["groups"] is not None:
        os.setgroups(spec["groups"])
    if spec["gid"] is not None:
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    if caps is not None:
        stage = "capabilities"
        prctl, capset, get_errno = lib
        for c in range(spec["last_cap"] + 1):
            if c not in caps:
                _check(prctl(_PR_CAPBSET_DROP, c, 0, 0, 0), get_errno)
        if caps and spec["uid"] is not None:
            _check(prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), get_errno)
    stage = "credentials"
    if spec["uid"] is not None:
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    if caps is not None:
        stage = "capabilities"
        _capset(capset, get_errno, caps)
        _check(prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), get_errno)
        for c in caps:
            _check(prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, c, 0, 0), get_errno)
    stage = "rlimits"
    _set_rlimits(post)
    if spec["nnp"]:
        stage = "no_new_privs"
        prctl, _, get_errno = lib
        _check(prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), get_errno)
    stage = "cwd"
    if spec["cwd"] is not None:
        os.chdir(spec["cwd"])
    if spec["umask"] is not None:
        os.umask(spec["umask"])


def _exec(spec: dict) -> None:
    global stage
    stage = "exec"
    if spec["check_path"] is not None:
        # The daemon opened the file with its own rights; the new user must be able to
        # reach it too. ENOENT means it was renamed since: the fd, checked, still runs.
        try:
            os.stat(spec["check_path"])
        except PermissionError:
            raise
        except OSError:
            pass
    # Python ignores these two, and an ignored signal stays ignored across exec.
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    env = dict(e.partition(b"=")[::2] for e in spec["env"])
    target = spec["exec_fd"] if spec["exec_fd"] is not None else spec["path"]
    os.execve(target, spec["argv"], env)


def main() -> None:
    status = int(sys.argv[2])
    try:
        os.set_inheritable(status, False)
        spec = _read_spec(int(sys.argv[1]))
        if spec["exec_fd"] is not None:
            os.set_inheritable(spec["exec_fd"], False)  # fexecve of an ELF needs no fd
        _apply(spec)
        _exec(spec)
        err = 5  # EIO: execve returned without raising
    except OSError as e:
        err = e.errno or 5
    except BaseException:  # noqa: B036  (a bad spec: report it, never a traceback on fd 2)
        err = 22  # EINVAL
    try:
        os.write(status, f"{stage} {err}".encode())
    finally:
        os._exit(127)


if __name__ == "__main__":
    main()
