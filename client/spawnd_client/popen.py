"""The ``subprocess``-compatible face: ``Popen``, ``run``/``call``/``check_*``, ``getoutput``.

``Popen`` subclasses ``subprocess.Popen`` and replaces only the parts that create, wait
for and signal the child, so pipes, text mode, ``communicate`` and timeouts behave
exactly as the stdlib's do on this Python version. The child itself is created by the
daemon: it receives only the fds we pass (stdio included) and the env we send.

The replaced parts are plain functions (``_spawnd_*`` below) so that
:func:`spawnd_client.install` can put the very same code under ``subprocess.Popen``
itself, for every caller in the process.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import types
import weakref
from typing import Any

from spawnd import protocol as P

from .client import Child, Client, default_client

PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
DEVNULL = subprocess.DEVNULL

_PREEXEC_REFUSED = (
    "preexec_fn is not supported: the daemon starts the child with posix_spawn, so no Python "
    "code can run in it before exec. Use start_new_session, process_group, umask, user, "
    "group, rlimits or capabilities instead, or exec through a wrapper program."
)

#: pid -> Child of every live child started through this module, for the ``os.waitpid``
#: emulation :func:`spawnd_client.install` puts in place (the pid is the daemon's child).
children: weakref.WeakValueDictionary[int, Child] = weakref.WeakValueDictionary()

_UID_MAX = 2**32 - 1  # (uid_t)-1: the stdlib passes it on and setreuid treats it as "keep"


def _check_id(value: int | None, what: str) -> int | None:
    """Range-check a uid/gid the way the stdlib's converter does, with its exception."""
    if value is None:
        return None
    if not 0 <= value <= _UID_MAX:
        raise OverflowError(f"{what} is less than minimum")
    return None if value == _UID_MAX else value


def _check_no_nul(args: list[Any], env: Any) -> list[bytes] | None:
    """The stdlib's checks on argv and env, raised at the call as it raises them."""
    for a in args:
        if b"\0" in os.fsencode(a):
            raise ValueError("embedded null byte")
    if env is None:
        return None
    out = []
    for k, v in env.items():
        k = os.fsencode(k)
        if b"=" in k:
            raise ValueError("illegal environment variable name")
        v = os.fsencode(v)
        if b"\0" in k or b"\0" in v:
            raise ValueError("embedded null byte")
        out.append(k + b"=" + v)
    return out


def inheritable_fds() -> list[int]:
    """Our fds above 2 without FD_CLOEXEC: what a forked-and-exec'ed child would inherit."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if os.get_inheritable(fd):
                out.append(fd)
        except OSError:
            pass  # the listing's own fd, closed by now
    return sorted(out)


# -- the spawnd implementation of Popen's process-facing methods -----------------------

def _spawnd_execute_child(self: subprocess.Popen, args: Any, executable: Any,
                          preexec_fn: Any, close_fds: bool, pass_fds: Any, cwd: Any,
                          env: Any, startupinfo: Any, creationflags: int, shell: bool,
                          p2cread: int, p2cwrite: int, c2pread: int, c2pwrite: int,
                          errread: int, errwrite: int, restore_signals: bool,
                          gid: int | None, gids: Any, uid: int | None, umask: int,
                          start_new_session: bool, process_group: int = -1) -> None:
    try:
        if preexec_fn is not None:
            raise ValueError(_PREEXEC_REFUSED)
        if isinstance(args, (str, bytes)):
            args = [args]
        elif isinstance(args, os.PathLike):
            if shell:
                raise TypeError("path-like args is not allowed when shell is true")
            args = [args]
        else:
            args = list(args)
        if shell:
            args = ["/bin/sh", "-c", *args]
            if executable:
                args[0] = executable
        orig_executable = executable if executable is not None else args[0]
        sys.audit("subprocess.Popen", orig_executable, args, cwd, env)
        _check_no_nul([*args, *([executable] if executable is not None else []),
                       *([cwd] if cwd is not None else [])], env)
        uid = _check_id(uid, "uid")
        gid = _check_id(gid, "gid")
        if gids is not None:
            gids = list(gids)
            if not all(0 <= g < _UID_MAX for g in gids):
                raise ValueError("invalid group id")

        fds: dict[int, int] = {}
        for target, mine in ((0, p2cread), (1, c2pwrite), (2, errwrite)):
            fd = target if mine == -1 else mine  # None: our own stdio, passed explicitly
            if _is_open(fd):
                fds[target] = fd
        if not close_fds:
            # What the stdlib's child would inherit: every inheritable fd, same number.
            for fd in inheritable_fds():
                if fd not in (p2cwrite, c2pread, errread):
                    fds.setdefault(fd, fd)
            if len(fds) >= P.MAX_FDS:  # one of the MAX_FDS carries our cwd (issue 11)
                raise OSError(errno.E2BIG, f"close_fds=False would pass {len(fds)} fds; "
                              f"spawnd sends at most {P.MAX_FDS - 1} with one request: mark "
                              "the rest close-on-exec or use pass_fds")
        for fd in pass_fds:
            if fd > 2:
                fds[fd] = fd
        client = self.__dict__.get("_client") or default_client()
        grants = self.__dict__.get("_grants") or {}
        try:
            child = client.spawn(
                args, env=env, fds=fds, executable=executable, cwd=cwd,
                start_new_session=start_new_session,
                process_group=None if process_group == -1 else process_group,
                user=uid, group=gid, extra_groups=gids, umask=None if umask < 0 else umask,
                args=self.args, restore_signals=restore_signals, **grants)
        except OSError as e:
            stage = getattr(e, "stage", None)
            if stage == P.STAGE_EXEC and e.filename is not None:
                e.filename = orig_executable  # subprocess names what the caller passed
            elif stage == P.STAGE_CWD:
                e.filename = cwd  # as the stdlib: the cwd, as the caller spelled it
            raise
    finally:
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
    self._child = child
    self.pid = child.pid
    self._child_created = True
    children[child.pid] = child


def _spawnd_set_returncode(self: subprocess.Popen, rc: int) -> None:
    # Several threads may learn the status at once (wait/poll/kill): one closes the pidfd.
    with _close_lock:
        if self.returncode is None:
            self.returncode = rc
        child = self.__dict__.get("_child")
        if child is not None:
            child.close()  # the pidfd is not needed once the status is known


_close_lock = threading.Lock()


def _spawnd_internal_poll(self: subprocess.Popen, _deadstate: int | None = None,
                          **_: Any) -> int | None:
    child = self.__dict__.get("_child")
    if self.returncode is None and child is not None:
        try:
            rc = child.poll()
        except ConnectionError:
            if _deadstate is None:
                raise
            rc = _deadstate
        if rc is not None:
            _spawnd_set_returncode(self, rc)
    return self.returncode


def _spawnd_wait(self: subprocess.Popen, timeout: float | None) -> int:
    if self.returncode is None:
        child = self.__dict__["_child"]
        rc = child.wait(timeout)
        if rc is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        _spawnd_set_returncode(self, rc)
    return self.returncode  # type: ignore[return-value]


def _spawnd_send_signal(self: subprocess.Popen, sig: int) -> None:
    self.poll()
    child = self.__dict__.get("_child")
    if self.returncode is None and child is not None:
        child.send_signal(sig)


class Popen(subprocess.Popen):
    """``subprocess.Popen`` whose child is started by spawnd (``client=`` picks the daemon).

    Extra keywords: ``on_disconnect`` (what the daemon does to the child if our connection
    closes: ``"terminate"`` (default), ``"kill"`` or ``"keep"``), ``capabilities``,
    ``rlimits``, ``no_new_privs``, ``namespaces`` (granted only if the daemon's policy
    allows).
    ``close_fds=False`` passes every inheritable fd (what the stdlib's child inherits).
    """

    def __init__(self, args: Any, bufsize: int = -1, executable: Any = None, stdin: Any = None,
                 stdout: Any = None, stderr: Any = None, preexec_fn: Any = None,
                 close_fds: bool = True, shell: bool = False, cwd: Any = None, env: Any = None,
                 universal_newlines: bool | None = None, startupinfo: Any = None,
                 creationflags: int = 0, restore_signals: bool = True,
                 start_new_session: bool = False, pass_fds: Any = (), *, user: Any = None,
                 group: Any = None, extra_groups: Any = None, encoding: str | None = None,
                 errors: str | None = None, text: bool | None = None, umask: int = -1,
                 pipesize: int = -1, process_group: int | None = None,
                 client: Client | None = None, on_disconnect: str = P.DEFAULT_ON_DISCONNECT,
                 capabilities: Any = (), rlimits: dict[str, tuple[int, int]] | None = None,
                 no_new_privs: bool = False, namespaces: Any = ()) -> None:
        if preexec_fn is not None:
            raise ValueError(_PREEXEC_REFUSED)
        self._client = client or default_client()
        self._child: Child | None = None
        self._grants = {"on_disconnect": on_disconnect, "capabilities": tuple(capabilities),
                        "rlimits": rlimits, "no_new_privs": no_new_privs,
                        "namespaces": tuple(namespaces)}
        super().__init__(args, bufsize, executable, stdin, stdout, stderr, None, close_fds,
                         shell, cwd, env, universal_newlines, startupinfo, creationflags,
                         restore_signals, start_new_session, pass_fds, user=user, group=group,
                         extra_groups=extra_groups, encoding=encoding, errors=errors,
                         text=text, umask=umask, pipesize=pipesize, process_group=process_group)

    @property
    def pidfd(self) -> int | None:
        """A pidfd for the child (readable once it exits), or None after it was reaped."""
        return None if self._child is None else self._child.pidfd

    _execute_child = _spawnd_execute_child
    _set_returncode = _spawnd_set_returncode
    _internal_poll = _spawnd_internal_poll
    _wait = _spawnd_wait
    send_signal = _spawnd_send_signal


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        if e.errno == errno.EBADF:
            return False
        raise
    return True


def _rebind(fn: types.FunctionType, g: dict[str, Any]) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__doc__ = fn.__doc__
    new.__module__ = __name__
    return new


# run/call/check_call/check_output/getoutput/getstatusoutput are the stdlib's own
# functions, re-bound to our Popen: their timeout, check, input and capture semantics then
# match this Python version exactly.
_g = dict(vars(subprocess))
_g["Popen"] = Popen
run = _rebind(subprocess.run, _g)
call = _rebind(subprocess.call, _g)
check_call = _rebind(subprocess.check_call, _g)
check_output = _rebind(subprocess.check_output, _g)
_g.update(run=run, call=call, check_call=check_call, check_output=check_output)
getstatusoutput = _rebind(subprocess.getstatusoutput, _g)
_g.update(getstatusoutput=getstatusoutput)
getoutput = _rebind(subprocess.getoutput, _g)
