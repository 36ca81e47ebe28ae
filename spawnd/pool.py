"""Warm interpreter pools: pre-started interpreters, never a fork or a copy of one.

A ``Spawn`` request with ``warm`` set (the multiprocessing start method sends it) is not
spawned directly. The daemon keeps a few *pre-started* processes per **key** — everything
that makes two starts interchangeable: peer uid/gid, the executable (and the file's
identity), argv, env, cwd, session/group/umask, the granted credentials and the request's
fd target numbers. A process is only ever handed to a request with the same key, so it is
exactly the process that request would have started, just earlier.

A pooled process is started with ``posix_spawn`` like any child, with two differences: every
fd number the request will fill holds a ``/dev/null`` placeholder (so the interpreter cannot
allocate those numbers while it imports), and one more fd, named by ``SPAWND_WARM_FD`` in its
environment, is a private ``SOCK_SEQPACKET`` control socket whose other end the daemon keeps.
The program imports what it likes, then blocks on that socket. The *handoff* is one message::

    b"SPWH" + uint32 n (little endian) + n int32 target fd numbers, with n fds (SCM_RIGHTS)

The process ``dup2``s each fd onto its target (replacing the placeholder), closes the control
socket and goes on as if it had been started with those fds. It also says two one-byte
things on that socket: ``R`` when its imports are done and it waits (it is *ready*), ``A``
once it has installed a handoff's fds (it *took* the request). A request takes, in order:
a ready process (the reply goes at once); else the oldest still *booting* one (the fds are
queued in its socket, it skips the rest of its preload and takes them; the reply waits for
its ``A`` off the connection's reader; if it dies first the request goes on to the next
choice); else a fresh process started *cold* with the handoff queued at once: one code
path, warm or cold. The control
socket is a socketpair: unlike CPython's forkserver socket (CVE-2022-42919; 3.14 added an
HMAC for it) nobody else can ever connect to it, so there is nothing to authenticate.

Idle processes belong to the pool, not to the :class:`~spawnd.children.ChildTable`: the pool
watches and reaps them itself (pidfd, in the trio loop, no thread), kills them on idle
timeout and at shutdown. On handoff it stops watching and returns the pid, and the server
registers the child in the ChildTable under the requesting connection like any other (the
pid cannot be recycled before it is reaped, so ``pidfd_open`` there is race-free). Refills
run in one task per key in the server's root nursery; the request path never waits for one.

**No start is slower than a cold one.** An interpreter's boot is ~35 ms of CPU here
(docs/multiprocessing.md, *What a boot costs*): a refill
booting beside a request's boot would slow that request down, so refills (of every key)
wait while any request's process is still booting (a cold start, or a booting process
handed a request), and at most ``REFILL_PARALLEL`` refills boot at once, unless a CPU is
idle right now. Without copying a process (never done: each pooled process is a fresh
``posix_spawn``), sustained starts faster than CPUs / boot CPU each wait for a boot.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import struct
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import trio

from . import fdpass, spawner
from .spawner import SpawnError, SpawnSpec

if TYPE_CHECKING:
    from .policy import Grant

log = logging.getLogger("spawnd")

__all__ = ["DEFAULT_POOL_MAX", "WARM_FD_ENV", "WarmPool"]

#: Environment variable naming the control socket's fd in a pooled process.
WARM_FD_ENV = b"SPAWND_WARM_FD"
HANDOFF_MAGIC = b"SPWH"
HANDOFF_HEADER = struct.Struct("<4sI")
#: Idle pooled processes across all keys and users (``spawnd serve --pool-max``): each is a
#: whole interpreter (~10-20 MB), so the default stays small.
DEFAULT_POOL_MAX = 8
#: A key whose pooled processes keep dying while idle stops being refilled after this many
#: in a row (requests are then served cold, through the same handoff).
MAX_FAILURES = 5
BACKOFF_FIRST = 0.1  # seconds before refilling after an idle death, doubling each time
BACKOFF_MAX = 10.0
#: After a handoff, wait this long before starting the replacement: its posix_spawn blocks
#: the loop for a moment and its imports take a CPU for ~35 ms, which the process just
#: handed off (and the reply to its request) should not have to compete with.
REFILL_DELAY = 0.02
#: Keys remembered at once (each holds a task and an fd): distinct requests beyond this
#: evict the least recently used key, so varying env or argv cannot grow the daemon.
MAX_ENTRIES = 64
#: Automatic sizing (a request with ``warm["auto"]``): the pool of a key is sized from the
#: demand the daemon observes for that key, never above the request's size, the CPU count
#: or ``--pool-max``. The first start of a key makes no pool (a program that starts one
#: process pays for none); each later start measures the concurrency it joins (itself plus
#: the key's earlier processes still running) and the target is the peak of that. The peak
#: forgets after SHRINK_AFTER seconds without a start (the pool shrinks to the demand of
#: the next burst), and idle_timeout without a start empties it.
SHRINK_AFTER = 10.0
#: Starts that come faster than an interpreter boots (a loop of ``start(); join()``) show
#: a concurrency of 1 but drain a pool of 1 before its refill is ready: the target is also
#: at least ceil(boot time / time between starts), i.e. rate x boot time (Little's law),
#: bounded like the peak. Both are running averages per key (weight RATE_WEIGHT for the
#: newest); the boot time is measured from spawn to READY, BOOT_GUESS until then.
RATE_WEIGHT = 0.5
BOOT_GUESS = 0.06
#: A request waits at most this long for the booting process it was handed to (then it
#: gets that process anyway: its fds are queued in it), and a request's boot holds back
#: refills at most this long (a ``__main__`` that hangs at import must not stop the pools).
BOOT_WAIT = 5.0
#: Refills booting at once, daemon-wide: one per two CPUs (the rest is the program's)...
REFILL_PARALLEL = max(1, (os.cpu_count() or 1) // 2)
#: ...and more, up to one per CPU, while a CPU is idle (fewer runnable tasks than CPUs in
#: /proc/loadavg: an instant count, read only when a refill is due); the same lets a refill
#: boot beside a request's boot when that cannot slow it down.
CPUS = os.cpu_count() or 1
IDLE_RECHECK = 0.01  # a gated refill looks for an idle CPU again this often
READY = b"R"  # pooled process -> daemon: imports done, waiting for a handoff
TOOK = b"A"  # pooled process -> daemon: a handoff's fds are in place
TRACKED = 64  # handed-out pids remembered per key for the concurrency count

Key = tuple[Any, ...]


@dataclass(eq=False)
class WarmProcess:
    pid: int
    pidfd: int  # -1: a cold start's process, which the ChildTable owns and reaps
    control: socket.socket
    entry: Entry
    handed_off: bool = False  # set when given to a request: the pool no longer owns it
    retired: bool = False  # killed on purpose (timeout, eviction, shutdown)
    ready: bool = False  # said READY: imports done, waiting
    took: bool = False  # said TOOK: a request's fds are in place
    request: trio.Event | None = None  # set when a request handed to it while booting can go on
    boot: str | None = None  # "idle" or "request" while it boots (see WarmPool._booting)
    boot_started: float = 0.0


@dataclass(eq=False)
class Entry:
    """One key's pool: its spawn spec (placeholders included), size and idle processes."""

    key: Key
    spec: SpawnSpec  # the request's spec; fd_map sources are replaced at each spawn
    targets: tuple[int, ...]
    size: int
    idle_timeout: float
    last_used: float
    idle: deque[WarmProcess] = field(default_factory=deque)
    changed: trio.Event = field(default_factory=trio.Event)
    failures: int = 0
    scope: trio.CancelScope | None = None
    auto: bool = False
    starts: int = 0
    peak: int = 0
    running: deque[int] = field(default_factory=lambda: deque(maxlen=TRACKED))
    gap: float | None = None  # running average of the time between starts (auto)
    boot_time: float = BOOT_GUESS  # running average of spawn -> READY


class WarmPool:
    """All warm pools of one daemon. ``take`` waits only for a process that is already
    booting (never for a refill to start); its caller runs it off the connection's reader."""

    def __init__(self, nursery: trio.Nursery, max_idle: int = DEFAULT_POOL_MAX) -> None:
        self._nursery = nursery
        self.max_idle = max_idle
        self._entries: dict[Key, Entry] = {}
        self._stopping = False
        # One /dev/null for every placeholder; O_CLOEXEC: only dup2 puts it in a child.
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        # Processes still importing, by kind ("idle": a refill nobody asked for yet,
        # "request": one a request waits for). Refills go only when no request boots.
        self._booting: dict[str, set[WarmProcess]] = {"idle": set(), "request": set()}
        self._boots_changed = trio.Event()

    # -- introspection (logs, tests)
    @property
    def idle_count(self) -> int:
        return sum(len(e.idle) for e in self._entries.values())

    # -- the request path
    async def take(self, uid: int, gid: int, spec: SpawnSpec, grant: Grant,
                   warm: dict[str, Any]) -> int:
        """Start ``spec`` through the pool: hand a ready equivalent process the request's
        fds, else a booting one (waiting for it to take them), else start one and hand off
        at once. Returns the pid; raises SpawnError like spawn()."""
        targets = tuple(t for _, t in spec.fd_map)
        sources = [s for s, _ in spec.fd_map]
        key = self._key(uid, gid, spec, grant, targets)
        now = trio.current_time()
        size = min(int(warm.get("size", 1)), self.max_idle)
        auto = bool(warm.get("auto"))
        entry = self._entries.get(key)
        if auto:
            size = self._auto_size(entry, size, now)
        if entry is None:
            entry = Entry(key=key, spec=self._entry_spec(spec), targets=targets, size=size,
                          idle_timeout=float(warm["idle_timeout"]), last_used=now, auto=auto,
                          starts=1, peak=1 if auto else 0)
            if (size > 0 or auto) and not self._stopping:
                if len(self._entries) >= MAX_ENTRIES:
                    self._evict_lru()
                self._entries[key] = entry
                self._nursery.start_soon(self._run_entry, entry)
        else:
            entry.size = size
            entry.idle_timeout = float(warm["idle_timeout"])
        entry.last_used = now
        entry.changed.set()  # the refill task re-checks size and deadline
        while (proc := self._pick(entry)) is not None:
            try:
                given = self._hand_off(proc.control, sources, targets)
            except BaseException:  # the request's fds are bad: the process stays idle
                entry.idle.appendleft(proc)
                raise
            if not given:
                self._retire(proc)  # it died or is dying; its watcher reaps it
                continue
            if not proc.ready and not await self._await_took(proc):
                log.info("warm: booting process %d died before taking a request", proc.pid)
                continue
            self._release(proc)
            entry.failures = 0
            entry.running.append(proc.pid)
            log.debug("warm: handed %s %d to uid %d", "idle" if proc.ready else "booting",
                      proc.pid, uid)
            return proc.pid
        try:
            pid, control = self._spawn(entry.spec, targets)
        finally:
            if self._entries.get(key) is not entry:  # size 0 or stopping: a one-off entry
                self._close_entry(entry)
        try:
            given = self._hand_off(control, sources, targets)
            if not given:
                raise SpawnError(errno.EPIPE, spawner.STAGE_FDS)
        except BaseException:
            control.close()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # bounded: SIGKILL, and it is our child
            raise
        # Watched until it has booted (refills wait for that); the ChildTable reaps it.
        cold = WarmProcess(pid=pid, pidfd=-1, control=control, entry=entry, handed_off=True)
        self._set_boot(cold, "request")
        self._nursery.start_soon(self._watch, cold)
        entry.running.append(pid)
        log.debug("warm: no idle process for uid %d; started %d cold (pool target %d)",
                  uid, pid, entry.size)
        return pid

    @staticmethod
    def _pick(entry: Entry) -> WarmProcess | None:
        """The ready process that waited longest, else the booting one started first."""
        for proc in entry.idle:
            if proc.ready:
                entry.idle.remove(proc)
                return proc
        return entry.idle.popleft() if entry.idle else None

    async def _await_took(self, proc: WarmProcess) -> bool:
        """A booting process holds the request's fds: wait (BOOT_WAIT at most) for it to
        take them. False if it died first (the request then goes on to another process)."""
        self._set_boot(proc, "request")
        proc.request = trio.Event()
        log.debug("warm: a request waits for booting process %d", proc.pid)
        try:
            with trio.move_on_after(BOOT_WAIT) as timeout:
                await proc.request.wait()
        except BaseException:  # cancelled (shutdown): it holds fds for nobody now
            if not proc.took:
                self._retire(proc)
            raise
        if timeout.cancelled_caught:
            log.warning("warm: process %d still booting after %.0fs; handing it over anyway",
                        proc.pid, BOOT_WAIT)
            return True
        return proc.took

    def _auto_size(self, entry: Entry | None, cap: int, now: float) -> int:
        """The pool target for an ``auto`` key at this start (see SHRINK_AFTER)."""
        if entry is None:
            return 0  # a first start: serve it cold, keep nothing warm yet
        if now - entry.last_used > SHRINK_AFTER:
            entry.peak = 0
        entry.running = deque((p for p in entry.running if _alive(p)), maxlen=TRACKED)
        entry.starts += 1
        entry.peak = max(entry.peak, len(entry.running) + 1)
        gap = now - entry.last_used
        entry.gap = gap if entry.gap is None else (
            RATE_WEIGHT * gap + (1 - RATE_WEIGHT) * entry.gap)
        target = entry.peak
        if entry.gap < entry.boot_time:  # starts outpace boots: one boot per start in flight
            target = max(target, entry.peak + 1, -int(-entry.boot_time // max(entry.gap, 1e-3)))
        return min(target, cap, CPUS, self.max_idle)

    def stop(self) -> None:
        """Daemon shutdown: kill every idle process (watchers reap them) and stop refilling."""
        self._stopping = True
        for entry in list(self._entries.values()):
            while entry.idle:
                self._retire(entry.idle.popleft())
            if entry.scope is not None:
                entry.scope.cancel()

    # -- keys and spawning
    @staticmethod
    def _key(uid: int, gid: int, spec: SpawnSpec, grant: Grant, targets: tuple[int, ...]) -> Key:
        # The file that runs, by identity: the fd the policy checked when the server opened
        # one (the pool keeps its own dup of it), else whatever the path names now.
        exe = spec.executable
        try:
            if spec.exec_fd is not None:
                st = os.fstat(spec.exec_fd)
            else:
                st = os.stat(exe if exe.startswith(b"/") or spec.cwd is None
                             else os.path.join(spec.cwd, exe))
            identity: tuple[int, ...] | None = (st.st_dev, st.st_ino, st.st_mtime_ns)
        except OSError:
            identity = None  # the spawn will fail and say why
        creds = (grant.uid, grant.gid, grant.groups, tuple(grant.capabilities),
                 tuple(sorted(grant.rlimits.items())), grant.no_new_privs)
        return (uid, gid, exe, identity, spec.exec_fd is not None, tuple(spec.argv),
                tuple(spec.env), spec.cwd, spec.setsid, spec.pgroup, spec.umask, targets, creds,
                spec.restore_signals)

    @staticmethod
    def _entry_spec(spec: SpawnSpec) -> SpawnSpec:
        """The spec refills reuse: no request fds, and our own dup of the checked executable
        (the request's is closed when the request is done)."""
        exec_fd = None if spec.exec_fd is None else fcntl.fcntl(spec.exec_fd,
                                                               fcntl.F_DUPFD_CLOEXEC, 3)
        return replace(spec, fd_map=(), exec_fd=exec_fd)

    @staticmethod
    def _close_entry(entry: Entry) -> None:
        if entry.spec.exec_fd is not None:
            os.close(entry.spec.exec_fd)
            entry.spec = replace(entry.spec, exec_fd=None)

    def _spawn(self, spec: SpawnSpec, targets: tuple[int, ...]) -> tuple[int, socket.socket]:
        """posix_spawn one poolable process: placeholders at ``targets``, control socket above."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ctl = max((*targets, 2)) + 1
            fd_map = tuple((self._devnull, t) for t in targets) + ((theirs.fileno(), ctl),)
            prefix = WARM_FD_ENV + b"="
            env = tuple(e for e in spec.env if not e.startswith(prefix)) + (prefix + b"%d" % ctl,)
            pid = spawner.spawn(replace(spec, fd_map=fd_map, env=env))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return pid, ours

    @staticmethod
    def _hand_off(control: socket.socket, sources: list[int], targets: tuple[int, ...]) -> bool:
        """Send the fds and their targets; False if the process is gone (its end is closed)."""
        msg = HANDOFF_HEADER.pack(HANDOFF_MAGIC, len(targets)) + struct.pack(
            f"<{len(targets)}i", *targets)
        anc = fdpass.ancillary(sources)
        try:
            # Never blocks: the socket is fresh and this is the only message it ever carries.
            control.sendmsg([msg], anc)
        except (BlockingIOError, BrokenPipeError, ConnectionError):
            return False
        except OSError as e:  # EBADF on a source fd, ETOOMANYREFS...: the request's fault
            raise SpawnError(e.errno or errno.EBADF, spawner.STAGE_FDS) from None
        return True

    # -- ownership of idle processes
    def _release(self, proc: WarmProcess) -> None:
        """The process now belongs to a request: stop watching it, keep no fd of it."""
        proc.handed_off = True
        self._set_boot(proc, None)
        trio.lowlevel.notify_closing(proc.control)  # wakes its watcher, which then returns
        proc.control.close()
        os.close(proc.pidfd)
        proc.pidfd = -1

    def _retire(self, proc: WarmProcess) -> None:
        """Kill a pooled process on purpose (already removed from its entry's idle list)."""
        proc.retired = True
        self._set_boot(proc, None)
        trio.lowlevel.notify_closing(proc.control)  # its watcher goes on to reap it
        proc.control.close()  # EOF alone makes it exit; SIGKILL makes it prompt
        try:
            signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _set_boot(self, proc: WarmProcess, kind: str | None) -> None:
        """Move ``proc`` between the boot budgets; a boot that ends wakes the refills."""
        if proc.boot is not None:
            self._booting[proc.boot].discard(proc)
            self._boots_changed.set()
            self._boots_changed = trio.Event()
        proc.boot = kind
        if kind is not None:
            proc.boot_started = trio.current_time()
            self._booting[kind].add(proc)

    def _refill_wait(self) -> float:
        """0 if a refill may boot now; else how long until the gate must be re-checked."""
        now = trio.current_time()
        requests = [p.boot_started + BOOT_WAIT - now for p in self._booting["request"]]
        requests = [t for t in requests if t > 0]  # a boot past BOOT_WAIT holds nothing back
        idle = len(self._booting["idle"])
        if not requests and idle < REFILL_PARALLEL:
            return 0.0
        if idle + len(requests) < CPUS and _cpu_idle():
            return 0.0  # a CPU nobody uses: the boots in flight cannot be slowed by this one
        return min((*requests, IDLE_RECHECK))

    async def _watch(self, proc: WarmProcess) -> None:
        """Read what the process says (READY, TOOK), then reap it if it dies in the pool."""
        try:
            while not (proc.control.fileno() < 0 or proc.took):
                try:
                    await trio.lowlevel.wait_readable(proc.control)
                except trio.ClosedResourceError:
                    break  # released (no longer ours) or retired (reaped below)
                try:
                    msg = proc.control.recv(16)
                except BlockingIOError:
                    continue
                except OSError:
                    msg = b""
                if not msg:  # EOF: it exited or is exiting
                    break
                if TOOK in msg:
                    proc.took = True
                    self._set_boot(proc, None)
                elif READY in msg and not proc.ready:
                    proc.ready = True
                    took = trio.current_time() - proc.boot_started
                    if proc.boot == "idle":  # a whole boot, not one cut short by a request
                        e = proc.entry
                        e.boot_time = RATE_WEIGHT * took + (1 - RATE_WEIGHT) * e.boot_time
                    log.debug("warm: process %d ready (%.0f ms)", proc.pid, took * 1000)
                    self._set_boot(proc, None)
            self._set_boot(proc, None)
            if proc.request is not None:
                proc.request.set()  # TOOK, or it died: the request it holds goes on
            if proc.handed_off or proc.took:
                return  # a cold start's process, or one a request now owns
            await trio.lowlevel.wait_readable(proc.pidfd)  # bounded: it is exiting
        except trio.ClosedResourceError:
            return  # released while we waited
        finally:
            if proc.pidfd == -1 and proc.control.fileno() >= 0:
                proc.control.close()  # a cold process after its boot
            elif not proc.handed_off and not proc.took and proc.pidfd >= 0:
                self._reap(proc)

    def _reap(self, proc: WarmProcess) -> None:
        info = os.waitid(os.P_PIDFD, proc.pidfd, os.WEXITED | os.WNOHANG)
        if info is None:  # cancelled while alive (shutdown): bounded, it is SIGKILLed
            signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
            info = os.waitid(os.P_PIDFD, proc.pidfd, os.WEXITED)
        os.close(proc.pidfd)
        proc.pidfd = -1
        proc.control.close()
        entry = proc.entry
        if proc in entry.idle:
            entry.idle.remove(proc)
        if not proc.retired:
            entry.failures += 1
            log.warning("warm: pooled process %d died (status %d, code %d); %d in a row",
                        proc.pid, info.si_status, info.si_code, entry.failures)
            entry.changed.set()
        else:
            log.debug("warm: retired idle process %d", proc.pid)

    # -- refilling and expiry, one task per key
    async def _run_entry(self, entry: Entry) -> None:
        try:
            with trio.CancelScope() as entry.scope:
                while not self._stopping and self._entries.get(entry.key) is entry:
                    entry.changed = trio.Event()
                    await self._refill(entry)
                    deadline = entry.last_used + entry.idle_timeout
                    if trio.current_time() >= deadline:
                        log.debug("warm: pool idle for %.1fs; emptying it", entry.idle_timeout)
                        break
                    with trio.move_on_at(deadline):
                        await entry.changed.wait()
                        await trio.sleep(REFILL_DELAY)
        finally:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
            while entry.idle:
                self._retire(entry.idle.popleft())
            self._close_entry(entry)

    async def _refill(self, entry: Entry) -> None:
        while (len(entry.idle) < entry.size and not self._stopping
               and self._entries.get(entry.key) is entry):
            if entry.failures >= MAX_FAILURES:
                if entry.failures == MAX_FAILURES:
                    entry.failures += 1  # log once
                    log.warning("warm: %d pooled processes died idle in a row; not refilling "
                                "this pool (requests are served cold)", MAX_FAILURES)
                return
            if entry.failures:
                await trio.sleep(min(BACKOFF_FIRST * 2 ** (entry.failures - 1), BACKOFF_MAX))
                if len(entry.idle) >= entry.size or self._stopping:
                    return
            while (wait := self._refill_wait()) > 0:  # no refill beside a request's boot
                with trio.move_on_after(wait):
                    await self._boots_changed.wait()
            if len(entry.idle) >= entry.size or self._stopping:
                return
            if not self._make_room(entry):
                return
            try:
                pid, control = self._spawn(entry.spec, entry.targets)
            except OSError as e:
                entry.failures += 1
                log.warning("warm: refill failed: %s", e)
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                control.close()
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
            proc = WarmProcess(pid=pid, pidfd=pidfd, control=control, entry=entry)
            self._set_boot(proc, "idle")
            entry.idle.append(proc)
            self._nursery.start_soon(self._watch, proc)
            log.debug("warm: started idle process %d (%d/%d)", pid, len(entry.idle), entry.size)
            await trio.sleep(0)  # one spawn per turn of the loop: requests go first

    def _evict_lru(self) -> None:
        victim = min(self._entries.values(), key=lambda e: e.last_used)
        del self._entries[victim.key]  # its task ends at its next checkpoint and cleans up
        while victim.idle:
            self._retire(victim.idle.popleft())
        if victim.scope is not None:
            victim.scope.cancel()

    def _make_room(self, entry: Entry) -> bool:
        """Under the daemon-wide cap, or evict an idle process of a less recently used key."""
        if self.idle_count < self.max_idle:
            return True
        victims = [e for e in self._entries.values()
                   if e is not entry and e.idle and e.last_used < entry.last_used]
        if not victims:
            return False
        victim = min(victims, key=lambda e: e.last_used)
        self._retire(victim.idle.popleft())
        return True


def _cpu_idle() -> bool:
    """Fewer runnable tasks than CPUs right now (this daemon, reading, is one of them).

    /proc/loadavg's fourth field is the kernel's instant count of runnable tasks,
    machine-wide (a container's CPU quota is not seen). A procfs read, not disk I/O."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return False
    return running - 1 < CPUS


def _alive(pid: int) -> bool:
    """A handed-out process (our child, reaped by the ChildTable) has not exited yet.

    WNOWAIT: only looks. A reaped pid is ECHILD; it could be reused only by another of our
    children, which merely counts one process too many in a sizing heuristic."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False

