"""Exceptions: the daemon's error replies become the ``OSError`` subclasses ``subprocess`` raises."""

from __future__ import annotations

from spawnd import protocol as P


class DaemonConnectionError(ConnectionError):
    """The connection to the daemon broke (the daemon died or closed on us).

    Children started over it may still run; their exit status is lost with the connection.
    """


class DaemonUnavailable(ConnectionRefusedError):
    """No daemon answers at the socket (and autostart is off or failed). Names the path."""


class RequestNotSent(DaemonConnectionError):
    """The connection was found dead before the request left: the daemon never saw it.

    Internal: :class:`~spawnd_client.Client` resends such a request on a new connection
    (after a daemon restart); only when that fails too does the caller see it.
    """


def error_to_exception(err: P.Error) -> OSError:
    """``OSError(errno, ...)`` picks the subclass (``FileNotFoundError``, ``PermissionError``...).

    The failing stage and field stay attached as data: ``exc.stage``, ``exc.field``.
    """
    text = err.message
    if err.field and err.stage != P.STAGE_EXEC:
        text = f"{text} [field {err.field}]" if err.field not in text else text
    if err.filename is not None:
        exc = OSError(err.errno, text, err.filename)
    else:
        exc = OSError(err.errno, text)
    exc.stage = err.stage  # type: ignore[attr-defined]
    exc.field = err.field  # type: ignore[attr-defined]
    return exc
