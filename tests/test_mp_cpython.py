"""CPython's own multiprocessing test cases, run with the "spawnd" start method.

``test._test_multiprocessing.install_tests_in_module_dict`` builds the ``WithProcesses*``
classes the stdlib runs for fork/spawn/forkserver; we keep the families the issue names
and skip, one by one, the cases that depend on fork semantics or on the stdlib's own
launcher internals (each with its reason; the list is in docs/multiprocessing.md). The
whole module shares one daemon: children import this module to unpickle the test
classes, so nothing here may start anything at import time. No pytest import: the module
also runs as ``python3.X -m unittest test_mp_cpython`` (in tests/) on other Pythons.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

try:
    from test import _test_multiprocessing as _tmp  # the interpreter's test package
except ImportError:  # pragma: no cover - distributions may strip it
    raise unittest.SkipTest("this Python does not ship its test package") from None

from spawnd_client import mp

mp.register(warm=int(os.environ.get("SPAWND_TEST_WARM", "0")))
_tmp.install_tests_in_module_dict(globals(), mp.START_METHOD, only_type="processes")

#: The families the issue asks for (class names without "WithProcesses").
KEEP = {
    "TestProcess", "TestSubclassingProcess", "TestQueue", "TestLock", "TestSemaphore",
    "TestCondition", "TestEvent", "TestValue", "TestArray", "TestConnection",
    "TestPicklingConnections", "TestPool", "TestPoolWorkerErrors", "TestPoolWorkerLifetime",
    "TestBarrier", "TestSharedMemory", "TestFinalize", "TestSharedCTypes", "TestHeap",
}

#: Cases that genuinely test something else than a start method can provide.
#: Keep docs/multiprocessing.md ("CPython's test cases") in step with this table.
SKIP: dict[str, str] = {
    "WithProcessesTestProcess.test_parent_process":
        "the daemon ends a process's children when that process dies (on_disconnect), so "
        "the grandchild cannot outlive its parent to observe the death",
}

for _name in [n for n, v in globals().items()
              if isinstance(v, type) and issubclass(v, unittest.TestCase)
              and n.startswith("WithProcesses")]:
    if _name[len("WithProcesses"):] not in KEEP:
        del globals()[_name]
for _case, _why in SKIP.items():
    _cls_name, _, _meth = _case.partition(".")
    _cls = globals().get(_cls_name)
    if _cls is not None and hasattr(_cls, _meth):
        setattr(_cls, _meth, unittest.skip(_why)(getattr(_cls, _meth)))
del _name, _case, _why, _cls, _cls_name, _meth  # or pytest collects _cls a second time


_stdlib_setup = globals()["setUpModule"]
_stdlib_teardown = globals()["tearDownModule"]
_daemon: dict[str, object] = {}


def setUpModule() -> None:  # noqa: N802 - unittest's name
    """One daemon for the module, named by SPAWND_SOCKET so children find it too. Started
    here, not in a fixture: the stdlib's setUpModule already creates semaphores, which
    start the resource tracker, which needs the daemon."""
    tmp = Path(tempfile.mkdtemp(prefix="spawnd-mpcpython-"))
    path = str(tmp / "spawnd.sock")
    log = tmp / "spawnd.log"
    # The daemon may run on another Python than the one under test (only the client side
    # needs the version being tested): SPAWND_TEST_DAEMON_PYTHON=/path/to/python3.11.
    daemon_python = os.environ.get("SPAWND_TEST_DAEMON_PYTHON", sys.executable)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [daemon_python, "-m", "spawnd", "serve", "--socket", path, "--stop-grace", "1",
             "--log-level", "info"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    _daemon.update(proc=proc, log=log, tmp=tmp, old=os.environ.get("SPAWND_SOCKET"))
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    os.environ["SPAWND_SOCKET"] = path
    # Register again: other test modules may have made contexts since import, and the
    # resource tracker starts through the most recent one.
    mp.register(warm=int(os.environ.get("SPAWND_TEST_WARM", "0")))
    _stdlib_setup()


def tearDownModule() -> None:  # noqa: N802
    try:
        _stdlib_teardown()  # also stops the resource tracker, while the daemon still runs
    finally:
        old = _daemon["old"]
        if old is None:
            os.environ.pop("SPAWND_SOCKET", None)
        else:
            os.environ["SPAWND_SOCKET"] = old  # type: ignore[assignment]
        import spawnd_client

        spawnd_client.default_client().close()  # register() used the default client
        proc: subprocess.Popen = _daemon["proc"]  # type: ignore[assignment]
        log: Path = _daemon["log"]  # type: ignore[assignment]
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()
        shutil.rmtree(_daemon["tmp"], ignore_errors=True)  # type: ignore[arg-type]
