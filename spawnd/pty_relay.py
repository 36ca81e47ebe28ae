"""``spawnd run --pty``: give a daemon-started child a terminal, like ``ssh -t``/``systemd-run --pty``.

The child is the daemon's, not ours, so it cannot share our terminal's session: we open a
pty, the child gets the slave as fds 0-2 and as its controlling terminal (``ctty``: it
becomes a session leader, ``TIOCSCTTY``), and this process relays between our terminal (in
raw mode, so ^C/^Z/^D reach the child's line discipline as bytes) and the master side.
Window-size changes (SIGWINCH) are copied to the pty; SIGINT/SIGTERM/SIGHUP/SIGQUIT sent to
us are forwarded to the child; SIGTSTP sent to us restores the terminal and stops us, and
SIGCONT puts it back. We exit with the child's status. Client-side code: a poll loop.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import sys
import termios
import tty
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["copy_winsize", "run_in_pty", "wants_pty"]

BUF = 65536
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def wants_pty(stdin: int = 0, stdout: int = 1) -> bool:
    """``--pty`` by default when both our stdin and stdout are terminals."""
    return os.isatty(stdin) and os.isatty(stdout)


def copy_winsize(src: int, dst: int) -> None:
    """TIOCGWINSZ on ``src`` -> TIOCSWINSZ on ``dst`` (nothing if ``src`` is no terminal)."""
    try:
        ws = fcntl.ioctl(src, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    except OSError:
        return
    fcntl.ioctl(dst, termios.TIOCSWINSZ, ws)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class _Terminal:
    """Our terminal in raw mode; :meth:`restore` puts the saved mode back (idempotent)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None

    def raw(self) -> None:
        if self.saved is None and os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)

    def restore(self) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSAFLUSH, self.saved)
            self.saved = None


def run_in_pty(spawn: Callable[..., Any], argv: Sequence[str], *, stdin: int = 0,
               stdout: int = 1) -> int:
    """Run ``argv`` on a new pty through ``spawn`` (``Client.spawn``); return its exit code
    the way a shell reports it (128 + signal number for a signal)."""
    master, slave = os.openpty()
    term = _Terminal(stdin)
    old_handlers: dict[int, Any] = {}
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = -1
    child = None
    try:
        copy_winsize(stdin, slave)
        child = spawn(list(argv), fds={0: slave, 1: slave, 2: slave}, ctty=0)
        os.close(slave)
        slave = -1
        pending: list[int] = []

        def note(sig: int, _frame: object) -> None:
            pending.append(sig)

        for sig in (*_FORWARDED, signal.SIGWINCH, signal.SIGTSTP, signal.SIGCONT):
            old_handlers[sig] = signal.signal(sig, note)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        term.raw()
        _relay(child, master, stdin, stdout, wake_r, pending, term)
        rc = child.wait()
    finally:
        term.restore()
        if old_wakeup != -1 or old_handlers:
            signal.set_wakeup_fd(old_wakeup)
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        for fd in (master, slave, wake_r, wake_w):
            if fd >= 0:
                os.close(fd)
        if child is not None:
            child.close()
    return 128 - rc if rc < 0 else rc


def _relay(child: Any, master: int, stdin: int, stdout: int, wake_r: int,
           pending: list[int], term: _Terminal) -> None:
    os.set_blocking(master, False)
    sources = [master, wake_r] + ([stdin] if stdin >= 0 else [])
    pidfd = child.pidfd
    if pidfd is not None:
        sources.append(pidfd)
    while True:
        ready, _, _ = select.select(sources, [], [], None if pidfd is not None else 0.1)
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
            _signals(child, pending, master, stdin, term)
        if master in ready and not _pump_master(master, stdout):
            return  # EIO: every slave holder is gone
        if stdin in ready:
            data = os.read(stdin, BUF)
            if data:
                _write_all(master, data)
            else:  # our input ended (not a terminal): the child reads end-of-file
                sources.remove(stdin)
                _write_all(master, bytes([termios.tcgetattr(master)[6][termios.VEOF][0]]))
        if (pidfd is not None and pidfd in ready) or (pidfd is None and child.poll() is not None):
            _pump_master(master, stdout)  # what it wrote just before exiting
            return


def _pump_master(master: int, stdout: int) -> bool:
    """Copy what the child wrote; False once the pty is hung up."""
    while True:
        try:
            data = os.read(master, BUF)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno == errno.EIO:
                return False
            raise
        if not data:
            return False
        _write_all(stdout, data)


def _signals(child: Any, pending: list[int], master: int, stdin: int,
             term: _Terminal) -> None:
    while pending:
        sig = pending.pop(0)
        if sig == signal.SIGWINCH:
            copy_winsize(stdin, master)
        elif sig == signal.SIGTSTP:  # stopped from outside: give the terminal back first
            term.restore()
            os.kill(os.getpid(), signal.SIGSTOP)
        elif sig == signal.SIGCONT:
            term.raw()
            copy_winsize(stdin, master)
        else:
            try:
                child.send_signal(sig)
            except OSError as e:
                print(f"spawnd run: cannot forward signal {sig}: {e}", file=sys.stderr)
