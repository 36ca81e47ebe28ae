"""A multithreaded program using a multiprocessing Pool, and never forking.

Eight threads (think: request handlers of a server) share one ``Pool`` whose workers the
spawnd daemon starts with ``posix_spawn``: no fork of this process, however many threads
or however much memory it has. ``warm=4`` keeps four interpreters with this module already
imported, so a worker that dies (``maxtasksperchild``) is replaced in a few milliseconds.

Run it with a daemon (``spawnd serve``, or ``SPAWND_SOCKET=...``) or without: the client
then starts a private daemon for this process once, and it goes away with us.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

from spawnd_client import mp


def digest(block: int) -> tuple[int, str]:
    """CPU work that benefits from other processes (the GIL stays in each worker)."""
    data = block.to_bytes(8, "little") * 100_000
    return os.getpid(), hashlib.sha256(data).hexdigest()[:12]


def handler(pool, n: int, results: dict[int, list[tuple[int, str]]]) -> None:
    results[n] = pool.map(digest, range(n * 10, n * 10 + 10))


def main() -> None:
    ctx = mp.get_context(warm=4)  # workers end with us, even if we are SIGKILLed
    t0 = time.perf_counter()
    with ctx.Pool(4, maxtasksperchild=5) as pool:
        results: dict[int, list[tuple[int, str]]] = {}
        threads = [threading.Thread(target=handler, args=(pool, n, results)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    dt = time.perf_counter() - t0
    workers = {pid for rows in results.values() for pid, _ in rows}
    print(f"8 threads, {sum(map(len, results.values()))} tasks, {len(workers)} worker "
          f"processes (maxtasksperchild=5 replaced some) in {dt:.2f} s")
    print(f"start method of the workers: {ctx.get_start_method()!r}; this process "
          f"({os.getpid()}) forked nothing")


if __name__ == "__main__":
    main()
