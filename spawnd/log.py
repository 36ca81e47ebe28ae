"""Logging set-up: journald-aware, one line per event.

Under systemd, stderr is a stream to journald, which adds its own timestamp and reads a
leading ``<N>`` as the syslog priority (sd-daemon(3)); JOURNAL_STREAM lets us tell that
stream apart from a stderr that was redirected elsewhere (systemd.exec(5)).
Newlines are escaped so every record stays one line: journald would split a multi-line
record into separate entries, and a client-controlled string containing "\\n<0>" could
otherwise forge an entry with another priority.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = ["LEVELS", "setup_logging", "syslog_priority"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def syslog_priority(levelno: int) -> int:
    """Map a logging level to the syslog priority journald expects in ``<N>``."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def _is_journal_stream(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when `stream` is the journald stream named by JOURNAL_STREAM ("dev:ino")."""
    try:
        dev, ino = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset/garbled, or no real fd (StringIO)
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        fmt = "%(message)s" if journal else "spawnd[%(process)d]: %(levelname)s %(message)s"
        super().__init__(fmt)
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\r", "\\r").replace("\n", "\\n")
        return f"<{syslog_priority(record.levelno)}>{line}" if self._journal else line


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler we own, so a second setup_logging() replaces it."""


def setup_logging(
    level: str = "info",
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
) -> logging.Logger:
    """Configure and return the "spawnd" logger; safe to call again (e.g. on reload).

    `stream` defaults to sys.stderr at call time, not import time, so a replaced stderr
    (tests, daemonisation) is honoured. The logger does not propagate, so a root handler
    installed by some library cannot duplicate lines.
    """
    try:
        levelno = LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"invalid log level {level!r}; expected one of {', '.join(LEVELS)}") from None
    if stream is None:
        stream = sys.stderr
    logger = logging.getLogger("spawnd")
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
        old.close()
    handler = _Handler(stream)
    handler.setFormatter(_Formatter(_is_journal_stream(stream, environ)))
    logger.addHandler(handler)
    logger.setLevel(levelno)
    logger.propagate = False
    return logger
