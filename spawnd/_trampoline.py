"""spawnd's Python exec helper: the twin of ``exec_helper/spawnd-exec.c``, its fallback.

Used where no C compiler was available at install time (or with ``spawnd serve
--exec-helper python``). Started as ``python -I -S -B _trampoline.py SPEC_FD STATUS_FD LEN``
with an empty environment; reads the same NUL-separated spec tokens as the C program and
applies the same stages in the same order, with the same stage names:

    rlimits (privileged) -> nice -> affinity -> namespaces -> groups -> gid -> keep_caps
    -> uid -> capabilities (bounding, inheritable, ambient) -> rlimits (as the child)
    -> no_new_privs -> umask -> cwd -> ctty -> exec

A failure writes ``b"<stage> <errno>"`` to the status pipe (close-on-exec) and exits 127; a
successful exec closes it with nothing written. ``_ctypes``/``resource`` are imported before
the credential switch (the interpreter's files may be unreadable afterwards). Annotations are
plain builtins on purpose: every import here is paid on every privileged spawn.
"""

import _signal
import os
import sys

_PR_CAPBSET_DROP = 24
_PR_SET_KEEPCAPS = 8
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_V3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_TIOCSCTTY = 0x540E

stage = "spec"


def _libc() -> tuple:
    """(prctl, capset, capget, unshare, mount, get_errno) from libc."""
    try:
        return _libc_core()
    except (ImportError, AttributeError, TypeError):  # the private C API changed
        return _libc_ctypes()


def _libc_core() -> tuple:
    """Through ``_ctypes`` directly: ``import ctypes`` costs ~2.5 ms (ctypes/__init__,
    struct, types), its C core ~0.4 ms, and a few int-returning calls need only the core."""
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
    return (prctl, Func(("capset", Libc)), Func(("capget", Libc)), Func(("unshare", Libc)),
            Func(("mount", Libc)), Func(("ioctl", Libc)), _ctypes.get_errno)


def _libc_ctypes() -> tuple:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = (ctypes.c_ulong,) * 5
    return (prctl, libc.capset, libc.capget, libc.unshare, libc.mount, libc.ioctl,
            ctypes.get_errno)


def _check(ret: int, get_errno) -> None:
    if ret == -1:
        err = get_errno()
        raise OSError(err, os.strerror(err))


def _read_spec(fd: int, length: int) -> list:
    buf = b""
    while len(buf) < length:
        chunk = os.read(fd, length - len(buf))
        if not chunk:
            raise OSError(32, "Broken pipe")
        buf += chunk
    os.close(fd)
    if not buf.endswith(b"\0"):
        raise ValueError("spec")
    return buf[:-1].split(b"\0")


def _nums(v: bytes) -> list:
    return [int(x) for x in v.split(b",")] if v else []


def _parse(tokens: list) -> dict:
    s = {"A": [], "E": [], "r": [], "R": [], "a": None, "G": None, "n": None, "N": 0,
         "U": False, "g": None, "u": None, "c": None, "L": -1, "p": False, "m": None,
         "d": None, "D": None, "t": None, "x": None, "P": None, "C": None, "S": False,
         "i": False, "want": None}
    for tok in tokens:
        k, v = chr(tok[0]), tok[1:]
        if k in "AE":
            s[k].append(v)
        elif k in "rR":
            res, soft, hard = _nums(v)
            s[k].append((res, soft, hard))
        elif k in "aG":
            s[k] = _nums(v)
        elif k in "nNgucLmdtx":
            s[k] = int(v)
        elif k in "DPC":
            s[k] = v
        elif k in "UpSi":
            s[k] = True
        else:
            raise ValueError(k)
    # Something to run; and a re-open as the target user needs the checked file to match.
    if not s["A"] or (s["x"] is None and s["P"] is None) or (s["C"] and s["x"] is None):
        raise ValueError("spec")
    return s


def _set_rlimits(limits: list) -> None:
    """prlimit, not setrlimit: Python turns setrlimit's EPERM into a ValueError."""
    if limits:
        import resource

        inf = 2**64 - 1  # RLIM_INFINITY on the wire (C's rlim_t)
        for res, soft, hard in limits:
            soft = resource.RLIM_INFINITY if soft == inf else soft
            hard = resource.RLIM_INFINITY if hard == inf else hard
            try:
                resource.prlimit(0, res, (soft, hard))
            except ValueError:  # only EINVAL (soft > hard) is a ValueError for prlimit
                raise OSError(22, "Invalid argument") from None


def _capset(lib: tuple, eff: int, prm: int, inh: int) -> None:
    bo = sys.byteorder
    header = _CAP_V3.to_bytes(4, bo) + (0).to_bytes(4, bo)
    words = (eff & 0xFFFFFFFF, prm & 0xFFFFFFFF, inh & 0xFFFFFFFF, eff >> 32, prm >> 32,
             inh >> 32)
    _check(lib[1](header, b"".join(w.to_bytes(4, bo) for w in words)), lib[-1])


def _permitted() -> int:
    """CapPrm from /proc/self/status (capget would need a writable ctypes buffer)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"CapPrm:"):
                return int(line.split()[1], 16)
    raise OSError(5, "no CapPrm")


def _write(path: str, text: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


def _user_namespace(lib: tuple, flags: int) -> None:
    """Root inside, mapped to our uid/gid outside (``unshare --map-root-user``)."""
    uid, gid = os.geteuid(), os.getegid()
    _check(lib[3](_CLONE_NEWUSER | flags), lib[-1])
    _write("/proc/self/setgroups", b"deny")
    _write("/proc/self/uid_map", b"0 %d 1\n" % uid)
    _write("/proc/self/gid_map", b"0 %d 1\n" % gid)


def _apply(s: dict) -> None:
    """Every stage between reading the spec and exec, in order; sets ``stage`` as it goes."""
    global stage
    caps = s["c"]
    need_lib = caps is not None or s["p"] or s["N"] or s["U"] or s["t"] is not None
    lib = _libc() if need_lib else None
    if s["r"] or s["R"]:
        import resource  # noqa: F401  (imported now: the stdlib may be unreadable later)
    stage = "rlimits"
    _set_rlimits(s["r"])
    if s["n"] is not None:
        stage = "nice"
        os.setpriority(os.PRIO_PROCESS, 0, s["n"])
    if s["a"] is not None:
        stage = "affinity"
        os.sched_setaffinity(0, s["a"])
    switching = s["u"] is not None or s["g"] is not None or s["G"] is not None
    stage = "namespaces"
    if s["U"] and not switching:
        _user_namespace(lib, s["N"])
    elif s["N"]:
        _check(lib[3](s["N"]), lib[-1])
    if s["N"] & _CLONE_NEWNS:
        _check(lib[4](None, b"/", None, _MS_REC | _MS_PRIVATE, None), lib[-1])
    if s["G"] is not None:
        stage = "groups"
        os.setgroups(s["G"])
    if s["g"] is not None:
        stage = "gid"
        os.setresgid(s["g"], s["g"], s["g"])
    if caps is not None and s["u"] is not None:
        stage = "keep_caps"
        _check(lib[0](_PR_SET_KEEPCAPS, 1, 0, 0, 0), lib[-1])
    if s["u"] is not None:
        stage = "uid"
        os.setresuid(s["u"], s["u"], s["u"])
    if s["U"] and switching:
        stage = "namespaces"
        # Writing our own maps needs us dumpable again (setresuid cleared it), which lets the
        # target user ptrace us: drop the fd root opened first (its identity is in "want").
        if s["x"] is not None and s["C"] is not None:
            os.close(s["x"])
            s["x"] = None
        _check(lib[0](_PR_SET_DUMPABLE, 1, 0, 0, 0), lib[-1])
        _user_namespace(lib, 0)
    if caps is not None:
        stage = "capabilities"
        prm = _permitted()
        _capset(lib, prm, prm, 0)
        for c in range(s["L"] + 1):
            if not caps >> c & 1:
                _check(lib[0](_PR_CAPBSET_DROP, c, 0, 0, 0), lib[-1])
        _capset(lib, caps, caps, caps)
        _check(lib[0](_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), lib[-1])
        for c in range(s["L"] + 1):
            if caps >> c & 1:
                _check(lib[0](_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, c, 0, 0), lib[-1])
    stage = "rlimits"
    _set_rlimits(s["R"])
    if s["p"]:
        stage = "no_new_privs"
        _check(lib[0](_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), lib[-1])
    if s["m"] is not None:
        stage = "umask"
        os.umask(s["m"])
    stage = "cwd"
    if s["d"] is not None:
        os.fchdir(s["d"])
    if s["D"] is not None:
        os.chdir(s["D"])
    if s["t"] is not None:
        stage = "ctty"
        if os.getsid(0) != os.getpid():
            os.setsid()
        _check(lib[5](s["t"], _TIOCSCTTY, 0), lib[-1])
        os.tcsetpgrp(s["t"], os.getpid())


def _exec(s: dict) -> None:
    """Opened again as the target user when credentials changed: the kernel checks every
    search permission on the path with the child's rights, and it must be the same file
    the daemon's policy checked (``x``), or EACCES."""
    global stage
    stage = "exec"
    if s["i"]:
        _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
        _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    else:  # Python ignores these two, and an ignored signal stays ignored across exec
        _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
        _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    run = s["x"]
    if s["C"] is not None:
        try:
            fd = os.open(s["C"], os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:  # the daemon opened it a moment ago: not the file checked
            raise OSError(13, "Permission denied") from None
        got = os.fstat(fd)
        if s["want"] != (got.st_dev, got.st_ino):
            raise OSError(13, "Permission denied")
        run = fd
    env = dict(e.partition(b"=")[::2] for e in s["E"])
    if s["S"] or run is None:
        os.execve(s["P"] if s["P"] is not None else s["C"], s["A"], env)
    os.execve(run, s["A"], env)


def main() -> None:
    status = int(sys.argv[2])
    try:
        os.set_inheritable(status, False)
        s = _parse(_read_spec(int(sys.argv[1]), int(sys.argv[3])))
        for fd in (s["x"], s["d"]):
            if fd is not None:
                os.set_inheritable(fd, False)
        if s["x"] is not None:
            st = os.fstat(s["x"])
            s["want"] = (st.st_dev, st.st_ino)
        _apply(s)
        _exec(s)
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
