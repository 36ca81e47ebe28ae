"""The ``spawnd`` multiprocessing start method: ``spawn`` semantics, no fork, warm starts.

``get_context(**options)`` returns a :class:`multiprocessing.context.BaseContext` whose
processes are started by the spawnd daemon, so a large multithreaded program can use
``Process``, ``Pool``, ``Manager``, queues, locks, shared memory and
``ProcessPoolExecutor(mp_context=ctx)`` without this process ever forking: workers, a
Manager's server and the resource tracker are all posix_spawn'ed by the daemon. With
``warm=N`` the daemon keeps ``N`` interpreters started ahead of time with the parent's
``__main__`` (and ``preload``) imported, and a start hands one of them the new process's
fds. Each is a fresh interpreter the daemon posix_spawned (never a copy of another:
its own hash seed, its own file offsets), as ``spawn`` would start it. ``register()`` makes ``"spawnd"`` a start method name
(``multiprocessing.set_start_method("spawnd")``, ``get_context("spawnd")``).

Semantics are ``spawn``'s (a fresh interpreter, the parent's main re-imported as
``__mp_main__``, everything else pickled), plus: workers never outlive their parent (the
daemon ends them when the parent's connection closes, even after SIGKILL: ``on_disconnect``
is ``"terminate"`` or ``"kill"``), and ``exitcode`` comes from the daemon's exit event, so
it is exact (negative for a signal). See ``docs/multiprocessing.md``.
"""

from __future__ import annotations

import copyreg
import threading
from multiprocessing import context as _context
from multiprocessing import process as _process

from ._mp_compat import SUPPORTED, UnsupportedPython, check

# Every spawnd child imports this module before its target runs (the pickled process is a
# SpawndProcess), so it imports nothing the stdlib ``spawn`` child does not: no typing, no
# dataclasses (inspect, ast, dis, tokenize: ~4 ms a boot). tests/test_mp_boot.py checks it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._mp_popen import Popen
    from .client import Client

__all__ = [
    "START_METHOD", "SUPPORTED", "Options", "SpawndContext", "SpawndProcess",
    "UnsupportedPython", "get_context", "register",
]

START_METHOD = "spawnd"
ON_DISCONNECT = ("terminate", "kill")
MAX_WARM = 16  # the daemon's protocol limit per request (it caps the total again)


class Options:
    """How a context starts processes. Every field is the same for all its starts.

    ``socket``: the daemon (default ``$SPAWND_SOCKET`` or the per-user/system socket, with
    the client's autostart rules). ``warm``: idle pre-started interpreters to keep: ``"auto"`` (default) lets the daemon
    size the pool from the demand it sees (see docs/multiprocessing.md), an int fixes it,
    0 turns it off.
    ``preload``: modules a warm interpreter imports before it is needed (``"__main__"``
    means the parent's main module, as ``__mp_main__``). ``idle_timeout``: seconds without
    a start after which the daemon empties the warm pool. ``on_disconnect``/``grace``: what
    the daemon does to the processes if this program's connection closes (it died).
    """

    __slots__ = _FIELDS = ("socket", "warm", "preload", "idle_timeout", "on_disconnect",
                           "grace", "autostart")

    socket: str | None
    warm: int | str
    preload: tuple[str, ...]
    idle_timeout: float
    on_disconnect: str
    grace: float
    autostart: bool | None

    def __init__(self, socket: str | None = None, warm: int | str = "auto",
                 preload: tuple[str, ...] = ("__main__",), idle_timeout: float = 60.0,
                 on_disconnect: str = "terminate", grace: float = 5.0,
                 autostart: bool | None = None) -> None:
        if not isinstance(preload, str):
            preload = tuple(preload)
        if isinstance(preload, str) or not all(isinstance(m, str) for m in preload):
            raise TypeError("preload must be a sequence of module names")
        if warm != "auto" and not (isinstance(warm, int) and not isinstance(warm, bool)
                                   and 0 <= warm <= MAX_WARM):
            raise ValueError(f'warm must be "auto" or an integer in [0, {MAX_WARM}]')
        if not 0 < idle_timeout <= 3600:
            raise ValueError("idle_timeout must be in (0, 3600] seconds")
        if on_disconnect not in ON_DISCONNECT:
            raise ValueError(f"on_disconnect must be one of {ON_DISCONNECT}: workers never "
                             "outlive their parent")
        if not 0 <= grace <= 3600:
            raise ValueError("grace must be in [0, 3600] seconds")
        values = (socket, warm, preload, idle_timeout, on_disconnect, grace, autostart)
        for name, value in zip(self._FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    # A frozen value, as the dataclass it replaces was (dataclasses costs ~4 ms to import).
    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def asdict(self) -> dict[str, Any]:
        """The fields as keywords for ``get_context(**...)``."""
        return {name: getattr(self, name) for name in self._FIELDS}

    def _astuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Options:
            return NotImplemented
        return self._astuple() == other._astuple()

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        return "Options(" + ", ".join(f"{k}={v!r}" for k, v in self.asdict().items()) + ")"

    def __reduce__(self) -> Any:
        return (_options, (self.asdict(),))


def _options(fields: dict[str, Any]) -> Options:
    return Options(**fields)


class SpawndProcess(_process.BaseProcess):
    """``Process`` for the spawnd method. Each context has its own subclass that knows it."""

    _start_method = START_METHOD
    _spawnd_ctx: SpawndContext | None = None  # None: the registered "spawnd" context

    @staticmethod
    def _Popen(process_obj: _process.BaseProcess) -> Popen:
        from ._mp_popen import Popen

        ctx = getattr(type(process_obj), "_spawnd_ctx", None) or _registered()
        return Popen(process_obj, ctx)

    @staticmethod
    def _after_fork() -> None:
        pass  # a fresh interpreter: nothing to reset (as for SpawnProcess)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A context's own subclass is not importable by name: the child gets the base
        # class (its own "spawnd" context is the registered one). User subclasses are
        # pickled by reference as usual.
        rv = super().__reduce_ex__(protocol)
        if not type(self).__dict__.get("_spawnd_per_context"):
            return rv
        state = rv[2] if isinstance(rv, tuple) and len(rv) > 2 else None
        return (copyreg._reconstructor, (SpawndProcess, object, None), state)


class SpawndContext(_context.BaseContext):
    """A multiprocessing context whose processes the spawnd daemon starts."""

    _name = START_METHOD

    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.Process = type("SpawndProcess", (SpawndProcess,), {
            "_spawnd_ctx": self, "_spawnd_per_context": True,
            "__module__": __name__, "__qualname__": "SpawndProcess",
            "__doc__": SpawndProcess.__doc__,
        })

    def prewarm(self) -> None:
        """Fill this context's warm pool now instead of at its first start.

        A pool is keyed by everything a start sends, so the only faithful way to create
        it is a start: this runs one process that does nothing (a cold start, ~40 ms) and
        the daemon fills the pool in the background. No-op without ``warm``.
        """
        if self.options.warm:
            p = self.Process(name="spawnd-prewarm")
            p.start()
            p.join()
            p.close()

    def client(self) -> Client:
        """The (shared, thread-safe) daemon client this context starts processes with."""
        return _client_for(self.options)

    def __reduce__(self) -> Any:
        return (_rebuild, (self.options.asdict(),))

    def __repr__(self) -> str:
        return f"<SpawndContext {self.options}>"


def _rebuild(options: dict[str, Any]) -> SpawndContext:
    return get_context(**options)


_clients: dict[tuple[str | None, bool | None], Client] = {}
_clients_lock = threading.Lock()


def _client_for(options: Options) -> Client:
    from .client import Client, default_client

    if options.socket is None and options.autostart is None:
        return default_client()  # shared with Popen/run users of this process
    key = (options.socket, options.autostart)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = Client(options.socket, autostart=options.autostart)
        return c


def _registered() -> SpawndContext:
    ctx = _context._concrete_contexts.get(START_METHOD)
    if isinstance(ctx, SpawndContext):
        return ctx
    return register()


def get_context(**options: Any) -> SpawndContext:
    """A spawnd context; keywords are :class:`Options` fields. Nothing connects yet.

    Also routes this process's resource tracker through the daemon (see ``_mp_tracker``):
    it is process-wide, and the one process the stdlib would otherwise still vfork.
    Raises :class:`UnsupportedPython` on interpreters whose internals we do not know.
    """
    check()
    options = {**_inherited_defaults, **options}
    ctx = SpawndContext(Options(**options))
    from ._mp_tracker import install  # not "from . import": see _mp_boot.defer_package_init

    install(ctx)
    return ctx


def register(**options: Any) -> SpawndContext:
    """Make ``"spawnd"`` a start method name, with these options; returns its context.

    Then ``multiprocessing.get_context("spawnd")`` and ``set_start_method("spawnd")``
    work, and processes started with it see ``get_start_method() == "spawnd"``.
    """
    ctx = get_context(**options)
    _context._concrete_contexts[START_METHOD] = ctx
    return ctx


#: In a spawnd child: the parent's daemon and settings, the defaults of every context made
#: here, so code that calls ``register()``/``get_context()`` at import uses the same daemon.
_inherited_defaults: dict[str, Any] = {}


def _setup_child(options: dict[str, Any]) -> None:
    """In a spawnd child, before ``prepare()``: register the method with the parent's
    settings and daemon (no autostart: a child never starts a daemon of its own)."""
    keys = ("warm", "preload", "idle_timeout", "on_disconnect", "grace")
    _inherited_defaults.update({k: options[k] for k in keys if k in options},
                               socket=options["socket"], autostart=False)
    register()
