"""The spawnd multiprocessing start method and the daemon's warm pool, end to end.

Children started here import this module to find their targets, so targets that need no
code of ours are stdlib callables (``operator.neg``, ``time.sleep``, ``sys.exit``...): a
child then does not pay for importing pytest.
"""

from __future__ import annotations

import concurrent.futures
import errno
import multiprocessing
import operator
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from multiprocessing import connection, shared_memory
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, children_of, start_daemon, wait_until
from spawnd_client import _mp_compat, mp

from spawnd import protocol as P

PY = sys.executable


def stop_tracker() -> None:
    """The resource tracker is per process and started by the daemon of the moment: stop
    it before that daemon goes (it would wait out the daemon's grace period)."""
    import gc
    from multiprocessing import resource_tracker

    gc.collect()  # dead pools' semaphores unregister first, or the tracker unlinks them
    resource_tracker._resource_tracker._stop()


def close_clients() -> None:
    """Contexts share one client per daemon for the life of the process; close ours."""
    for c in list(mp._clients.values()):
        c.close()


def stop(d: Daemon) -> str:
    stop_tracker()
    close_clients()
    assert d.stop() == 0, d.log.read_text()
    log = d.log.read_text()
    assert "Traceback" not in log, log
    return log


@pytest.fixture(scope="module")
def mpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("mp"), "--stop-grace", "1")
    yield d
    stop(d)


@pytest.fixture(scope="module")
def ctx(mpd: Daemon) -> mp.SpawndContext:
    return mp.get_context(socket=mpd.path)


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(e.decode(errors="replace").partition("=")[::2] for e in raw.split(b"\0") if e)


def marked(daemon: Daemon, mark: str) -> set[int]:
    """The daemon's live pooled processes (idle or handed off) of the warm key ``mark``."""
    out = set()
    for pid, state in children_of(daemon.pid):
        env = environ_of(pid)
        if state != "Z" and env.get("SPAWND_TEST_MARK") == mark and "SPAWND_WARM_FD" in env:
            out.add(pid)
    return out


# -- targets that need this module ------------------------------------------------------

def report_start_method(q: multiprocessing.SimpleQueue) -> None:
    q.put((multiprocessing.get_start_method(), multiprocessing.current_process().name))


def client_in_child(q: multiprocessing.Queue, path: str) -> None:
    import spawnd_client  # the boot deferred the package's __init__: it must run now

    client = spawnd_client.Client(path, autostart=False)
    q.put((spawnd_client.Client.__name__, spawnd_client.run(["true"], client=client).returncode))


def square(x: int) -> int:
    return x * x


def _pid(_: object) -> int:
    return os.getpid()


def add_to_value(v, lock, n: int) -> None:
    for _ in range(n):
        with lock:
            v.value += 1


def fill_array(a, barrier, event) -> None:
    barrier.wait()
    for i in range(len(a)):
        a[i] = i * 2
    event.set()


def write_shm(name: str) -> None:
    shm = shared_memory.SharedMemory(name=name)
    shm.buf[:5] = b"hello"
    shm.close()


def echo_pipe(conn) -> None:
    conn.send(conn.recv() * 2)
    conn.close()


def use_manager(d, lst) -> None:
    d["child"] = os.getpid()
    lst.append("from child")


# -- Process ---------------------------------------------------------------------------

def test_exit_codes_are_exact(ctx: mp.SpawndContext) -> None:
    procs = {
        0: ctx.Process(target=operator.neg, args=(1,)),
        3: ctx.Process(target=sys.exit, args=(3,)),
        1: ctx.Process(target=operator.truediv, args=(1, 0)),  # an exception: 1
        -signal.SIGKILL: ctx.Process(target=signal.raise_signal, args=(signal.SIGKILL,)),
        -signal.SIGUSR1: ctx.Process(target=signal.raise_signal, args=(signal.SIGUSR1,)),
    }
    for p in procs.values():
        p.start()
    for want, p in procs.items():
        p.join(30)
        assert p.exitcode == want, (want, p)
        assert not p.is_alive()
        p.close()


def test_terminate_kill_sentinel(ctx: mp.SpawndContext) -> None:
    a = ctx.Process(target=time.sleep, args=(60,))
    b = ctx.Process(target=time.sleep, args=(60,))
    a.start()
    b.start()
    assert a.pid != os.getpid() and a.is_alive()
    assert connection.wait([a.sentinel, b.sentinel], timeout=0.2) == []
    a.terminate()
    assert connection.wait([a.sentinel, b.sentinel], timeout=10) == [a.sentinel]
    a.join()
    assert a.exitcode == -signal.SIGTERM
    b.kill()
    b.join(10)
    assert b.exitcode == -signal.SIGKILL
    assert a.join(0) is None and a.exitcode == -signal.SIGTERM  # stays known
    a.close()
    b.close()
    with pytest.raises(ValueError):
        a.pid  # noqa: B018 - a closed Process refuses, as with spawn


def test_join_timeout_and_poll(ctx: mp.SpawndContext) -> None:
    p = ctx.Process(target=time.sleep, args=(0.5,))
    p.start()
    t = time.monotonic()
    p.join(0.05)
    assert p.exitcode is None and time.monotonic() - t < 0.4
    p.join(30)
    assert p.exitcode == 0


def test_children_see_the_method_and_their_name(ctx: mp.SpawndContext) -> None:
    q = ctx.SimpleQueue()
    p = ctx.Process(target=report_start_method, args=(q,), name="worker-7")
    p.start()
    assert q.get() == ("spawnd", "worker-7")
    p.join(30)
    assert p.exitcode == 0


def test_the_client_package_works_in_a_child(ctx: mp.SpawndContext, mpd: Daemon) -> None:
    q = ctx.Queue()
    p = ctx.Process(target=client_in_child, args=(q, mpd.path))
    p.start()
    assert q.get(timeout=60) == ("Client", 0)
    p.join(30)
    assert p.exitcode == 0


def test_register_makes_it_a_start_method(mpd: Daemon) -> None:
    from multiprocessing import context

    saved = context._concrete_contexts.get("spawnd")
    try:
        ctx = mp.register(socket=mpd.path)
        assert multiprocessing.get_context("spawnd") is ctx
        assert ctx.get_start_method() == "spawnd"
        q = ctx.SimpleQueue()
        p = multiprocessing.get_context("spawnd").Process(target=report_start_method, args=(q,))
        p.start()
        assert q.get()[0] == "spawnd"
        p.join(30)
    finally:
        if saved is None:
            context._concrete_contexts.pop("spawnd", None)
        else:
            context._concrete_contexts["spawnd"] = saved


def test_set_start_method_in_a_program(mpd: Daemon, tmp_path: Path) -> None:
    """The default context (plain ``multiprocessing.Pool``) after set_start_method."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os
        from spawnd_client import mp

        def method(_):
            return multiprocessing.get_start_method()

        if __name__ == "__main__":
            mp.register(socket={mpd.path!r})
            multiprocessing.set_start_method("spawnd")
            with multiprocessing.Pool(2) as pool:
                print(sorted(set(pool.map(method, range(4)))))
    """))
    out = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['spawnd']"


def test_unsupported_python_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_mp_compat, "_checked", False)
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    with pytest.raises(mp.UnsupportedPython, match="supports CPython 3.11 to 3.14; this is"):
        mp.get_context()


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="never outlive"):
        mp.get_context(on_disconnect="keep")
    with pytest.raises(ValueError):
        mp.get_context(warm=17)
    with pytest.raises(TypeError):
        mp.get_context(preload="__main__")


# -- Pool, executor, synchronisation, shared state ------------------------------------

def test_pool_map(ctx: mp.SpawndContext) -> None:
    with ctx.Pool(3) as pool:
        assert pool.map(operator.neg, range(200)) == [-i for i in range(200)]
        assert pool.apply_async(square, (12,)).get(30) == 144
        pids = set(pool.map(_pid, range(20), chunksize=1))
    assert os.getpid() not in pids and 1 <= len(pids) <= 3


def test_pool_maxtasksperchild_replaces_workers(ctx: mp.SpawndContext) -> None:
    with ctx.Pool(2, maxtasksperchild=2) as pool:
        pids = pool.map(_pid, range(12), chunksize=1)
    assert len(set(pids)) >= 4  # workers were retired and restarted through the daemon


def test_process_pool_executor(ctx: mp.SpawndContext) -> None:
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert list(ex.map(square, range(50))) == [i * i for i in range(50)]
        fut = ex.submit(operator.truediv, 1, 0)
        with pytest.raises(ZeroDivisionError):
            fut.result(30)


def test_process_pool_executor_broken_worker(ctx: mp.SpawndContext) -> None:
    """A worker killed by a signal: the executor notices through the sentinel (pidfd)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        fut = ex.submit(signal.raise_signal, signal.SIGKILL)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            fut.result(60)


def test_queue_lock_value_event_barrier_array(ctx: mp.SpawndContext) -> None:
    v = ctx.Value("i", 0)
    lock = ctx.Lock()
    procs = [ctx.Process(target=add_to_value, args=(v, lock, 200)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert v.value == 600
    a = ctx.Array("i", 8)
    barrier = ctx.Barrier(2)
    event = ctx.Event()
    p = ctx.Process(target=fill_array, args=(a, barrier, event))
    p.start()
    barrier.wait(30)
    assert event.wait(30)
    assert a[:] == [i * 2 for i in range(8)]
    p.join(30)
    q = ctx.Queue()
    p = ctx.Process(target=q.put, args=({"x": [1, 2, 3]},))
    p.start()
    assert q.get(timeout=30) == {"x": [1, 2, 3]}
    p.join(30)


@pytest.mark.parametrize("warm", [0, 1])
def test_large_payload(mpd: Daemon, warm: int) -> None:
    """A process object bigger than the socket buffer: part is sent ahead of the start,
    the rest after the reply (the child is reading by then)."""
    ctx = mp.get_context(socket=mpd.path, warm=warm)
    big = os.urandom(8 << 20)
    q = ctx.Queue()
    p = ctx.Process(target=q.put, args=(big,))
    p.start()
    assert q.get(timeout=60) == big
    p.join(30)
    assert p.exitcode == 0


def test_pipe_and_shared_memory(ctx: mp.SpawndContext) -> None:
    parent, child = ctx.Pipe()
    p = ctx.Process(target=echo_pipe, args=(child,))
    p.start()
    child.close()
    parent.send("ab")
    assert parent.recv() == "abab"
    p.join(30)
    shm = shared_memory.SharedMemory(create=True, size=16)
    try:
        p = ctx.Process(target=write_shm, args=(shm.name,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert bytes(shm.buf[:5]) == b"hello"
    finally:
        shm.close()
        shm.unlink()


def test_manager(ctx: mp.SpawndContext, mpd: Daemon) -> None:
    with ctx.Manager() as manager:
        server = manager._process  # the Manager's server process is started by the daemon
        assert server.pid in {pid for pid, _ in children_of(mpd.pid)}
        d = manager.dict()
        lst = manager.list()
        p = ctx.Process(target=use_manager, args=(d, lst))
        p.start()
        p.join(30)
        assert d["child"] == p.pid and list(lst) == ["from child"]


# -- parent death ------------------------------------------------------------------------

PARENT = """
import os, sys, time
from multiprocessing import shared_memory
from spawnd_client import mp

if __name__ == "__main__":
    ctx = mp.get_context(socket={path!r}, on_disconnect={how!r}, grace=1.0)
    pool = ctx.Pool(2)
    pool.map(abs, range(4))
    lone = ctx.Process(target=time.sleep, args=(120,))
    lone.start()
    shm = shared_memory.SharedMemory(name={shm!r}, create=True, size=64)  # never unlinked
    from multiprocessing import resource_tracker
    pids = [p.pid for p in pool._pool] + [lone.pid, resource_tracker._resource_tracker._pid]
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_parent_sigkill_ends_its_workers(mpd: Daemon, tmp_path: Path, how: str) -> None:
    shm = f"spawnd-test-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(path=mpd.path, how=how, shm=shm))
    parent = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        *workers, tracker = map(int, line.split())
        assert len(workers) == 3 and all(os.path.exists(f"/proc/{w}") for w in workers)
        parent.kill()
        parent.wait()
        alive = lambda: [w for w in workers if w in {p for p, _ in children_of(mpd.pid)}]  # noqa: E731
        assert wait_until(lambda: not alive(), 10), alive()
        # With every write end gone the tracker cleans up what the parent leaked, and exits.
        assert wait_until(lambda: not os.path.exists(f"/dev/shm/{shm}"), 10)
        assert wait_until(lambda: tracker not in {p for p, _ in children_of(mpd.pid)}, 10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if os.path.exists(f"/dev/shm/{shm}"):
            os.unlink(f"/dev/shm/{shm}")


# -- the warm pool -----------------------------------------------------------------------

@pytest.fixture
def mark(monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh environment, hence a warm pool key of our own, findable in /proc."""
    value = uuid.uuid4().hex
    monkeypatch.setenv("SPAWND_TEST_MARK", value)
    return value


def ready(d: Daemon, pids: set[int]) -> bool:
    """Every one of ``pids`` said READY (refills may boot side by side)."""
    log = d.log.read_text()
    return all(f"warm: process {pid} ready " in log for pid in pids)


def test_warm_start_is_served_by_a_prestarted_process(mpd: Daemon, mark: str) -> None:
    ctx = mp.get_context(socket=mpd.path, warm=2, idle_timeout=60)
    ctx.prewarm()  # a cold start through the handoff; the daemon fills the pool
    assert wait_until(lambda: len(marked(mpd, mark)) == 2 and ready(mpd, marked(mpd, mark)), 30)
    idle = marked(mpd, mark)
    q = ctx.SimpleQueue()
    p = ctx.Process(target=report_start_method, args=(q,), name="warm-one")
    p.start()
    assert p.pid in idle  # started before we asked: handed over, not spawned
    assert q.get() == ("spawnd", "warm-one")
    p.join(30)
    assert p.exitcode == 0
    assert f"warm: handed idle {p.pid} " in mpd.log.read_text()
    assert wait_until(lambda: len(marked(mpd, mark)) == 2, 30)  # refilled in the background
    assert p.pid not in marked(mpd, mark)


def test_warm_pool_keys_differ_with_env(mpd: Daemon, mark: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = mp.get_context(socket=mpd.path, warm=1, idle_timeout=60)
    ctx.prewarm()
    assert wait_until(lambda: len(marked(mpd, mark)) == 1, 30)
    first_pool = marked(mpd, mark)
    monkeypatch.setenv("SPAWND_TEST_OTHER", "1")  # same context, different environment
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    assert p.pid not in first_pool
    p.join(30)
    assert environ_of(next(iter(first_pool))).get("SPAWND_TEST_OTHER") is None
    monkeypatch.delenv("SPAWND_TEST_OTHER")
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    assert p.pid in first_pool
    p.join(30)


def test_warm_pool_idle_timeout_empties_it(mpd: Daemon, mark: str) -> None:
    ctx = mp.get_context(socket=mpd.path, warm=2, idle_timeout=1.0)
    ctx.prewarm()
    assert wait_until(lambda: len(marked(mpd, mark)) == 2, 30)
    assert wait_until(lambda: not marked(mpd, mark), 15)


def test_warm_processes_get_the_same_fds_and_stdio(mpd: Daemon, mark: str,
                                                   tmp_path: Path) -> None:
    """A warm child's output goes where a cold child's would; nothing else leaks in."""
    script = tmp_path / "out.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from spawnd_client import mp

        def show():
            print("fds", sorted(int(f) for f in os.listdir("/proc/self/fd")), flush=True)
            print("to stderr", file=sys.stderr, flush=True)

        if __name__ == "__main__":
            ctx = mp.get_context(socket={mpd.path!r}, warm=int(sys.argv[1]))
            ctx.prewarm()
            import time; time.sleep(1.5)  # let the pool fill
            p = ctx.Process(target=show)
            p.start(); p.join()
            sys.exit(p.exitcode)
    """))
    outs = []
    for warm in ("0", "2"):
        r = subprocess.run([PY, str(script), warm], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip().splitlines()[-1] == "to stderr"
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1], outs  # the same fd table, warm or cold


def test_pool_max_zero_serves_every_warm_start_cold(tmp_path: Path, mark: str) -> None:
    d = start_daemon(tmp_path, "--pool-max", "0", "--stop-grace", "1")
    try:
        ctx = mp.get_context(socket=d.path, warm=4)
        with ctx.Pool(2) as pool:
            assert pool.map(operator.neg, range(10)) == [-i for i in range(10)]
        del pool  # its semaphores unregister before the tracker stops
        assert not marked(d, mark)  # nothing idle was kept
    finally:
        log = stop(d)
    assert "warm: no idle process" in log and "warm: handed idle" not in log


def test_daemon_stop_reaps_idle_warm_processes(tmp_path: Path, mark: str) -> None:
    d = start_daemon(tmp_path, "--stop-grace", "1")
    ctx = mp.get_context(socket=d.path, warm=3)
    ctx.prewarm()
    assert wait_until(lambda: len(marked(d, mark)) == 3, 30)
    idle = marked(d, mark)
    stop(d)
    assert all(not os.path.exists(f"/proc/{pid}") for pid in idle)


def test_warm_request_validation() -> None:
    conn = P.Connection("server")
    conn.receive_data(P.Connection("client").send(P.Hello()))
    assert isinstance(conn.next_event(), P.Hello)

    def parse(warm: object) -> P.Spawn:
        body = P.Connection("client").send(P.Spawn(id=1, argv=(b"x",)))
        import msgpack

        m = msgpack.unpackb(body[4:])
        m["warm"] = warm
        raw = msgpack.packb(m, use_bin_type=True)
        conn.receive_data(P.HEADER.pack(len(raw)) + raw)
        ev = conn.next_event()
        assert isinstance(ev, P.Spawn)
        return ev

    assert parse({"size": 3}).warm == {"size": 3, "idle_timeout": P.DEFAULT_WARM_IDLE}
    for bad in ({"size": P.MAX_WARM_SIZE + 1}, {"size": -1}, {"idle_timeout": 0},
                {"idle_timeout": 1e9}, {"size": 1, "preload": []}, [1], {"size": True}):
        with pytest.raises(P.ProtocolError) as e:
            parse(bad)
        assert e.value.errno == errno.EINVAL and e.value.field.startswith("warm")


# -- the no-fork guarantee -------------------------------------------------------------

NOFORK = """
import threading, time, concurrent.futures, operator
from multiprocessing import shared_memory
from spawnd_client import mp

if __name__ == "__main__":
    stop = threading.Event()
    def busy():
        while not stop.is_set():
            time.sleep(0.001)
    threads = [threading.Thread(target=busy) for _ in range(16)]
    for t in threads:
        t.start()
    ctx = mp.get_context(socket={path!r}, warm={warm})
    with ctx.Pool(4) as pool:
        assert pool.map(operator.neg, range(1000)) == [-i for i in range(1000)]
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=ctx) as ex:
        assert sum(ex.map(abs, range(100))) == 4950
    with ctx.Manager() as m:
        m.dict()["k"] = 1
    shm = shared_memory.SharedMemory(create=True, size=8)  # the resource tracker
    shm.close(); shm.unlink()
    stop.set()
    for t in threads:
        t.join()
    print("ok")
"""


@pytest.mark.parametrize("warm", [0, 2])
def test_no_fork_under_strace(mpd: Daemon, tmp_path: Path, warm: int) -> None:
    """Every clone the 16-thread parent makes is a thread: workers, the Manager's server
    and the resource tracker all come from the daemon."""
    if not os.path.exists("/usr/bin/strace"):
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    script = tmp_path / "nofork.py"
    script.write_text(NOFORK.format(path=mpd.path, warm=warm))
    trace = tmp_path / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=fork,vfork,clone,clone3", "-o",
                        str(trace), PY, str(script)], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    calls = [ln for ln in trace.read_text().splitlines()
             if any(f" {c}(" in ln or ln.split(None, 1)[-1].startswith(c + "(")
                    for c in ("fork", "vfork", "clone", "clone3"))]
    assert len(calls) >= 16, "strace saw too few clones: the check would be vacuous"
    offenders = [ln for ln in calls if "CLONE_THREAD" not in ln]
    assert not offenders, offenders


def test_many_threads_start_processes_concurrently(ctx: mp.SpawndContext) -> None:
    results: list[int | None] = []

    def one() -> None:
        p = ctx.Process(target=sys.exit, args=(5,))
        p.start()
        p.join(60)
        results.append(p.exitcode)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [5] * 8


def test_set_start_method_after_using_a_context(mpd: Daemon, tmp_path: Path) -> None:
    """docs/multiprocessing.md's snippet: a context used first, then set_start_method."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing
        from spawnd_client import mp

        if __name__ == "__main__":
            ctx = mp.get_context(socket={mpd.path!r})
            with ctx.Pool(2) as pool:
                print(pool.map(abs, [-1, -2]))
            mp.register(socket={mpd.path!r})
            multiprocessing.set_start_method("spawnd")
            print(multiprocessing.get_start_method())
    """))
    out = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[1,", "2]", "spawnd"]


def test_auto_warm_pool_follows_demand(mpd: Daemon, mark: str) -> None:
    """No options: the first start makes no pool; a second start makes a pool as large as
    the concurrency it saw (bounded by the CPUs), served warm from then on."""
    ctx = mp.get_context(socket=mpd.path, idle_timeout=60)
    assert ctx.options.warm == "auto"
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join(30)
    assert not marked(mpd, mark)  # one start: no pool
    ps = [ctx.Process(target=time.sleep, args=(3,)) for _ in range(2)]
    for q in ps:
        q.start()
    # The second of the two came right after the first: faster than a boot, so the rate
    # rule asks one more than the concurrency seen (pool.RATE_WEIGHT), within the CPUs.
    want = min(3, os.cpu_count() or 1)
    assert wait_until(lambda: len(marked(mpd, mark)) == want, 30)
    for q in ps:
        q.join(30)
    idle = marked(mpd, mark)
    r = ctx.Process(target=time.sleep, args=(0,))
    r.start()
    assert r.pid in idle
    r.join(30)
    zero = mp.get_context(socket=mpd.path, warm=0)
    for _ in range(2):
        z = zero.Process(target=time.sleep, args=(0,))
        z.start()
        z.join(30)
    assert len(marked(mpd, mark)) == want  # warm=0 made no pool of its own


# -- the auto sizing rule and the booting handoff (spawnd/pool.py) ------------------------

@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the rate rule is bounded by the CPUs")
def test_auto_pool_grows_by_rate_for_back_to_back_starts() -> None:
    """start(); join() in a loop never has two processes at once, but when each start comes
    sooner than a boot takes, the auto target is one boot per start in flight (rate x boot
    time), bounded by CPUs; spaced starts keep one. (The sizing rule itself: an end-to-end
    version depended on how fast this machine boots interpreters under load.)"""
    from collections import deque
    from types import SimpleNamespace

    from spawnd import pool

    def sizes(gap: float) -> list[int]:
        e = SimpleNamespace(last_used=0.0, peak=1, running=deque(), starts=1, gap=None,
                            boot_time=0.05)
        fake = SimpleNamespace(max_idle=8)
        out, now = [], 0.0
        for _ in range(5):
            now += gap
            out.append(pool.WarmPool._auto_size(fake, e, 16, now))  # type: ignore[arg-type]
            e.last_used = now
        return out

    assert sizes(0.01)[-1] == min(5, pool.CPUS, 8)  # ceil(0.05 / 0.01) boots in flight
    assert sizes(0.01)[-1] >= min(2, pool.CPUS)  # more than the concurrency (1) shows
    assert sizes(1.0) == [1] * 5  # starts slower than boots: one ready process


def _idle(d: Daemon, mark: str, busy: set[int]) -> set[int]:
    """Pooled processes of ``mark`` that no request has (yet)."""
    return marked(d, mark) - busy


def test_auto_pool_is_bounded_by_pool_max_and_empties_when_idle(tmp_path: Path,
                                                                 mark: str) -> None:
    """A burst of 3 grows an auto pool to min(3, CPUs, --pool-max); idle_timeout empties it."""
    d = start_daemon(tmp_path, "--pool-max", "1", "--stop-grace", "1")
    try:
        ctx = mp.get_context(socket=d.path, idle_timeout=2.0)
        first = ctx.Process(target=time.sleep, args=(0,))
        first.start()
        first.join(30)
        assert first.exitcode == 0
        assert wait_until(lambda: "warm: no idle process" in d.log.read_text(), 10)
        assert not marked(d, mark)  # a program that started one process: no pool
        ps = [ctx.Process(target=time.sleep, args=(2,)) for _ in range(3)]
        for p in ps:
            p.start()
        busy = {p.pid for p in ps}
        want = min(3, os.cpu_count() or 1, 1)
        assert wait_until(lambda: len(_idle(d, mark, busy)) == want, 30)
        time.sleep(0.5)  # a pool over its bounds would show by now
        assert len(_idle(d, mark, busy)) == want
        for p in ps:
            p.join(30)
            assert p.exitcode == 0
        assert wait_until(lambda: not marked(d, mark), 30)  # idle_timeout: emptied
    finally:
        stop(d)


BLOCKER = """\
import os, time
open(os.environ["SPAWND_TEST_BOOTING"] + "." + str(os.getpid()), "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(os.environ["SPAWND_TEST_RELEASE"]) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


@pytest.fixture
def slow_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mark: str) -> Path:
    """A preload module that keeps a pooled process booting until ``release`` exists."""
    mod = tmp_path / f"spawnd_blocker_{mark}.py"
    mod.write_text(BLOCKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPAWND_TEST_BOOTING", str(tmp_path / "booting"))
    monkeypatch.setenv("SPAWND_TEST_RELEASE", str(tmp_path / "release"))
    return tmp_path


def _booting_pool_process(mpd: Daemon, slow_boot: Path, mark: str) -> tuple[Any, int]:
    """A warm=1 context whose one pooled process is stuck in its preload."""
    ctx = mp.get_context(socket=mpd.path, warm=1, preload=[f"spawnd_blocker_{mark}"])
    ctx.prewarm()  # cold: it has its request at once, so it skips the (blocking) preload
    assert wait_until(lambda: list(slow_boot.glob("booting.*")), 30)
    (pid,) = [int(p.suffix[1:]) for p in slow_boot.glob("booting.*")]
    assert pid in marked(mpd, mark)
    return ctx, pid


def _start_in_thread(p: Any) -> threading.Thread:
    t = threading.Thread(target=p.start)
    t.start()
    return t


def test_a_start_takes_the_booting_pool_process(mpd: Daemon, slow_boot: Path,
                                                mark: str) -> None:
    """No ready process but one booting: the request waits for it instead of a cold start
    of its own (which would compete with it for the CPUs)."""
    ctx, booting = _booting_pool_process(mpd, slow_boot, mark)
    p = ctx.Process(target=sys.exit, args=(3,))
    t = _start_in_thread(p)
    assert wait_until(lambda: f"warm: a request waits for booting process {booting}\n"
                      in mpd.log.read_text(), 10)
    assert t.is_alive()  # the reply waits for the booting process to take the request
    assert len(marked(mpd, mark)) == 1  # and no cold process was started beside it
    (slow_boot / "release").touch()
    t.join(30)
    assert p.pid == booting
    p.join(30)
    assert p.exitcode == 3
    assert f"warm: handed booting {booting} " in mpd.log.read_text()


def test_a_pool_process_dying_mid_boot_falls_back_to_a_cold_start(
        mpd: Daemon, slow_boot: Path, mark: str) -> None:
    ctx, booting = _booting_pool_process(mpd, slow_boot, mark)
    q = ctx.SimpleQueue()
    p = ctx.Process(target=report_start_method, args=(q,), name="after-death")
    t = _start_in_thread(p)
    assert wait_until(lambda: f"warm: a request waits for booting process {booting}\n"
                      in mpd.log.read_text(), 10)
    os.kill(booting, signal.SIGKILL)  # the daemon's child: it reaps it
    (slow_boot / "release").touch()  # a refill after the death must not block the test
    t.join(30)
    assert p.pid is not None and p.pid != booting
    assert q.get() == ("spawnd", "after-death")
    p.join(30)
    assert p.exitcode == 0
    assert f"warm: booting process {booting} died before taking a request" in (
        mpd.log.read_text())


# -- every pooled process is a fresh interpreter started by the daemon --------------------

def report_parent_and_hash(q: multiprocessing.SimpleQueue) -> None:
    q.put((os.getppid(), hash("spawnd: a str hashed with this interpreter's own seed")))


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(pid)


def _all_pooled(mark: str) -> dict[int, int]:
    """Every live process of the key ``mark`` started for a pool, whoever its parent: pid
    -> PPid (a process made by another would inherit its environment, mark included)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            env = environ_of(int(entry))
            if env.get("SPAWND_TEST_MARK") == mark and "SPAWND_WARM_FD" in env:
                try:
                    out[int(entry)] = _ppid(int(entry))
                except OSError:
                    pass  # gone meanwhile
    return out


def test_warm_children_are_the_daemons_with_their_own_hash_seed(
        mpd: Daemon, mark: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No pooled process is made from another (no clone/fork of a ready interpreter): each
    one's parent is the daemon, and each has its own hash seed, as ``spawn`` children do."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    ctx = mp.get_context(socket=mpd.path, warm=3, idle_timeout=60)
    ctx.prewarm()
    assert wait_until(lambda: len(marked(mpd, mark)) == 3, 30)
    q = ctx.SimpleQueue()
    seen: list[tuple[int, int]] = []
    pooled: set[int] = set()
    for _ in range(4):  # the first three from the pool, then refills
        pool = _all_pooled(mark)
        pooled |= set(pool)
        assert set(pool.values()) == {mpd.pid}, pool
        p = ctx.Process(target=report_parent_and_hash, args=(q,))
        p.start()
        seen.append(q.get())
        p.join(30)
        assert p.exitcode == 0
        assert wait_until(lambda: len(marked(mpd, mark)) == 3, 30)
    assert {ppid for ppid, _ in seen} == {mpd.pid}
    assert len({h for _, h in seen}) == len(seen), seen  # 2**-64-ish chance of a tie
    assert len(pooled) >= 4
    assert "copied" not in mpd.log.read_text() and "zygote" not in mpd.log.read_text()


def test_terminate_right_after_a_warm_start_is_sigterm(mpd: Daemon, mark: str) -> None:
    """Every start runs its process, even one handed out the moment it became ready (a
    daemon closing its end with the process's READY unread makes its next read fail once
    with ECONNRESET, ahead of the queued handoff)."""
    ctx = mp.get_context(socket=mpd.path, warm=2)
    ctx.prewarm()
    for _ in range(6):
        ps = [ctx.Process(target=time.sleep, args=(60,)) for _ in range(5)]
        for p in ps:
            p.start()
        time.sleep(0.001)
        for p in ps:
            p.terminate()
        for p in ps:
            p.join(30)
        assert [p.exitcode for p in ps] == [-signal.SIGTERM] * 5
