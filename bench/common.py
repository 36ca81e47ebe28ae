"""Shared pieces: the benchmark daemon, runner subprocesses, statistics, /proc readers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

TRUE = "/bin/true"
SLEEP = "/bin/sleep"
#: The environment every child gets, whichever way it is started: small and identical.
CHILD_ENV = {"PATH": "/usr/bin:/bin"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- environment

def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for our runners and daemons: repo importable, no autostart."""
    env = os.environ.copy()
    paths = [str(REPO), str(REPO / "client")]
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    env["SPAWND_AUTOSTART"] = "0"
    env.pop("SPAWND_SOCKET", None)
    if extra:
        env.update(extra)
    return env


# ---------------------------------------------------------------------------- statistics

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize_ns(samples_ns: Sequence[int], *, keep: bool = True) -> dict[str, Any]:
    """Median, p90, min, mean in microseconds (and the samples, rounded to 0.1 us)."""
    s = sorted(samples_ns)
    out: dict[str, Any] = {
        "n": len(s),
        "median_us": round(percentile(s, 0.5) / 1e3, 1),
        "p90_us": round(percentile(s, 0.9) / 1e3, 1),
        "min_us": round(s[0] / 1e3, 1) if s else None,
        "mean_us": round(sum(s) / len(s) / 1e3, 1) if s else None,
    }
    if keep:
        out["samples_us"] = [round(x / 1e3, 1) for x in samples_ns]
    return out


def shuffled(items: Sequence[Any], rng: random.Random) -> list[Any]:
    """One round's order: a fresh permutation, so that neither drift nor the after-effects
    of one method (say, a 50 ms interpreter start) always land on the same next method."""
    out = list(items)
    rng.shuffle(out)
    return out


def rounds_rng() -> random.Random:
    return random.Random(0x5BA3D)  # fixed: runs are comparable


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return round(a / b, 3)


# ---------------------------------------------------------------------------- /proc

def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and its anonymous/file parts, KiB."""
    st = proc_status(pid)
    return {k: int(st[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile") if k in st}


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid``, in clock ticks (``os.sysconf("SC_CLK_TCK")`` a second)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def system_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already in user
    return total - idle, total


def background_load(seconds: float = 1.0) -> float:
    """Busy CPUs on the machine right now (before we start anything): others' work skews
    absolute times; ratios taken in the same run suffer much less."""
    b0, t0 = system_ticks()
    time.sleep(seconds)
    b1, t1 = system_ticks()
    return round((os.cpu_count() or 1) * (b1 - b0) / (t1 - t0), 2) if t1 > t0 else 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "euid": os.geteuid(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f
                                if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        info["transparent_hugepage"] = thp
    except OSError:
        pass
    try:
        info["libc"] = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        pass
    return info


# ---------------------------------------------------------------------------- the daemon

@dataclass
class Daemon:
    """A spawnd daemon the benchmark owns: separate process, private socket."""

    workdir: Path
    name: str = "spawnd"
    policy: str | None = None  # TOML text for --config
    proc: subprocess.Popen[bytes] | None = None
    clients: list[Any] = field(default_factory=list)

    @property
    def path(self) -> str:
        return str(self.workdir / f"{self.name}.sock")

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *extra_args: str, timeout: float = 20.0) -> Daemon:
        import spawnd_client

        argv = [sys.executable, "-m", "spawnd", "serve", "--socket", self.path,
                "--log-level", "warning", "--on-stop", "kill", *extra_args]
        if self.policy is not None:
            cfg = self.workdir / f"{self.name}.toml"
            cfg.write_text(self.policy)
            os.chmod(cfg, 0o600)
            argv += ["--config", str(cfg)]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=logf,
                                         env=python_env(), cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: "
                                   f"{self.log_text()}")
            try:
                c = spawnd_client.Client(self.path, autostart=False)
                c.ping()
                c.close()
                return self
            except (OSError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"daemon did not answer: {self.log_text()}") from None
                time.sleep(0.05)

    def client(self) -> Any:
        import spawnd_client

        c = spawnd_client.Client(self.path, autostart=False)
        self.clients.append(c)
        return c

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="spawnd-bench-"))


# ---------------------------------------------------------------------------- runners

class RunnerError(RuntimeError):
    pass


def run_runner(module: str, config: dict[str, Any], *, timeout: float,
               extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``module.runner(config)`` in a fresh process; return what it returns (JSON).

    Each runner is its own process, so its size, threads and imports are its own. It is
    started as ``python -m bench --runner MODULE CONFIG OUT``: a ``__main__`` module named
    ``bench.__main__`` is one multiprocessing's spawn children need not re-import.
    """
    with tempfile.NamedTemporaryFile(prefix="bench-", suffix=".json", delete=False) as f:
        out = f.name
    name = module.rsplit(".", 1)[-1]
    try:
        argv = [sys.executable, "-m", "bench", "--runner", module, json.dumps(config), out]
        try:
            p = subprocess.run(argv, env=python_env(extra_env), cwd=str(REPO),
                               stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RunnerError(f"{module} runner timed out after {timeout:.0f}s: "
                              f"{(e.stderr or b'')[-2000:].decode(errors='replace')}") from None
        err = p.stderr.decode(errors="replace")
        if p.returncode != 0:
            raise RunnerError(f"{module} runner exited {p.returncode}: {err[-3000:]}")
        for line in err.strip().splitlines()[-20:]:
            log(f"    [{name}] {line}")
        with open(out) as f:
            return json.load(f)
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass


def runner_main(argv: list[str]) -> int:
    """``python -m bench --runner MODULE CONFIG_JSON OUT``: the runner side."""
    import importlib

    module, config, out = argv
    result = importlib.import_module(module).runner(json.loads(config))
    with open(out, "w") as f:
        json.dump(result, f)
    return 0
