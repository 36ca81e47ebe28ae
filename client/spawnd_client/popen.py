"""The ``subprocess``-compatible face: ``Popen`` and ``run``/``call``/``check_call``/``check_output``.

``Popen`` subclasses ``subprocess.Popen`` and replaces only the parts that create, wait
for and signal the child, so pipes, text mode, ``communicate`` and timeouts behave
exactly as the stdlib's do on this Python version. The child itself is created by the
daemon: it receives only the fds we pass (stdio included) and the env we send.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import types
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


class Popen(subprocess.Popen):
    """``subprocess.Popen`` whose child is started by spawnd (``client=`` picks the daemon).

    Extra keywords: ``on_disconnect`` (what the daemon does to the child if our connection
    closes: ``"terminate"`` (default), ``"kill"`` or ``"keep"``), ``capabilities``,
    ``rlimits``, ``no_new_privs`` (granted only if the daemon's policy allows).
    ``close_fds`` is always effectively true: the child gets stdio and ``pass_fds`` only.
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
                 no_new_privs: bool = False) -> None:
        if preexec_fn is not None:
            raise ValueError(_PREEXEC_REFUSED)
        self._client = client or default_client()
        self._child: Child | None = None
        self._grants = {"on_disconnect": on_disconnect, "capabilities": tuple(capabilities),
                        "rlimits": rlimits, "no_new_privs": no_new_privs}
        super().__init__(args, bufsize, executable, stdin, stdout, stderr, None, close_fds,
                         shell, cwd, env, universal_newlines, startupinfo, creationflags,
                         restore_signals, start_new_session, pass_fds, user=user, group=group,
                         extra_groups=extra_groups, encoding=encoding, errors=errors,
                         text=text, umask=umask, pipesize=pipesize, process_group=process_group)

    @property
    def pidfd(self) -> int | None:
        """A pidfd for the child (readable once it exits), or None after it was reaped."""
        return None if self._child is None else self._child.pidfd

    def _execute_child(self, args: Any, executable: Any, preexec_fn: Any, close_fds: bool,
                       pass_fds: Any, cwd: Any, env: Any, startupinfo: Any, creationflags: int,
                       shell: bool, p2cread: int, p2cwrite: int, c2pread: int, c2pwrite: int,
                       errread: int, errwrite: int, restore_signals: bool, gid: int | None,
                       gids: Any, uid: int | None, umask: int, start_new_session: bool,
                       process_group: int) -> None:
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

        fds: dict[int, int] = {}
        for target, mine in ((0, p2cread), (1, c2pwrite), (2, errwrite)):
            fd = target if mine == -1 else mine  # None: our own stdio, passed explicitly
            if _is_open(fd):
                fds[target] = fd
        for fd in pass_fds:
            if fd > 2:
                fds[fd] = fd
        try:
            self._child = self._client.spawn(
                args, env=env, fds=fds, executable=executable, cwd=cwd,
                start_new_session=start_new_session,
                process_group=None if process_group == -1 else process_group,
                user=uid, group=gid, extra_groups=gids, umask=None if umask < 0 else umask,
                args=self.args, **self._grants)
        except OSError as e:
            if getattr(e, "stage", None) == P.STAGE_EXEC and e.filename is not None:
                e.filename = orig_executable  # subprocess names what the caller passed
            raise
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        self.pid = self._child.pid
        self._child_created = True

    def _set_returncode(self, rc: int) -> None:
        self.returncode = rc
        if self._child is not None:
            self._child.close()  # the pidfd is not needed once the status is known

    def _internal_poll(self, _deadstate: int | None = None, **_: Any) -> int | None:
        if self.returncode is None and self._child is not None:
            try:
                rc = self._child.poll()
            except ConnectionError:
                if _deadstate is None:
                    raise
                rc = _deadstate
            if rc is not None:
                self._set_returncode(rc)
        return self.returncode

    def _wait(self, timeout: float | None) -> int:
        if self.returncode is None:
            assert self._child is not None
            rc = self._child.wait(timeout)
            if rc is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._set_returncode(rc)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is None and self._child is not None:
            self._child.send_signal(sig)


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


# run/call/check_call/check_output are the stdlib's own functions, re-bound to our Popen:
# their timeout, check, input and capture semantics then match this Python version exactly.
_g = dict(vars(subprocess))
_g["Popen"] = Popen
run = _rebind(subprocess.run, _g)
call = _rebind(subprocess.call, _g)
check_call = _rebind(subprocess.check_call, _g)
check_output = _rebind(subprocess.check_output, _g)
_g.update(run=run, call=call, check_call=check_call, check_output=check_output)
