"""Fixtures: a real daemon on a real socket, and ways to look inside it (/proc)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import spawnd_client

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _no_autostart() -> Iterator[None]:
    """Tests name their daemon explicitly; a stray private daemon would hide bugs."""
    old = os.environ.get("SPAWND_AUTOSTART")
    os.environ["SPAWND_AUTOSTART"] = "0"
    yield
    if old is None:
        os.environ.pop("SPAWND_AUTOSTART", None)
    else:
        os.environ["SPAWND_AUTOSTART"] = old


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == pid:
            out.append((int(entry), rest[0]))
    return out


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


@dataclass
class Daemon:
    path: str
    proc: subprocess.Popen
    log: Path
    clients: list[spawnd_client.Client] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self) -> spawnd_client.Client:
        c = spawnd_client.Client(self.path, autostart=False)
        self.clients.append(c)
        return c

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop_cleanly(self) -> str:
        """Close our clients and stop it; it must exit 0 with no traceback. Returns its log."""
        for c in self.clients:
            c.close()
        rc = self.stop()
        log = self.log.read_text()
        assert rc == 0, log
        assert "Traceback" not in log, log
        return log

    def settle(self, baseline_fds: int | None = None) -> None:
        """Wait for the daemon to be idle again: no children, fds back to ``baseline``."""
        assert wait_until(lambda: not children_of(self.pid)), children_of(self.pid)
        if baseline_fds is not None:
            assert wait_until(lambda: fd_count(self.pid) <= baseline_fds), (
                fd_count(self.pid), baseline_fds, os.listdir(f"/proc/{self.pid}/fd"))


def start_daemon(tmp_path: Path, *extra: str, env: dict[str, str] | None = None,
                 name: str = "spawnd.sock") -> Daemon:
    path = str(tmp_path / name)
    log = tmp_path / (name + ".log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spawnd", "serve", "--socket", path, "--log-level", "debug",
         *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
        env=env if env is not None else os.environ.copy())

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {log.read_text()}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return True
        except OSError:
            return False
        finally:
            s.close()

    assert wait_until(up, 15), log.read_text()
    return Daemon(path, proc, log)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path)
    yield d
    d.stop_cleanly()


@pytest.fixture
def client(daemon: Daemon) -> spawnd_client.Client:
    return daemon.client()


# -- real other users (tests/secutil.py), shared by the end-to-end test modules

@pytest.fixture(scope="module")
def accounts() -> Iterator[Any]:
    """Two throw-away users (useradd); skipped where the machine cannot make them."""
    import secutil  # it imports this module

    why = secutil.missing_prerequisite()
    if why:
        pytest.skip(why)
    yield from secutil.make_accounts()


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A directory every test user can read (they cannot read the checkout under /root)."""
    import secutil

    d = secutil.make_shared_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def clients(shared: Path) -> Any:
    """Runs client code as a test user against the copy of the library in ``shared``."""
    import secutil

    return secutil.ClientLib(secutil.install_client_library(shared))
