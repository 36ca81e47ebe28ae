"""A multithreaded program starts processes through spawnd: no fork, errors at once."""

import threading
import time

import spawnd_client as sc


def worker(n: int, results: list) -> None:
    r = sc.run(["sh", "-c", f"echo worker {n}; exit {n % 3}"], capture_output=True, text=True)
    results.append((n, r.returncode, r.stdout.strip()))


def main() -> None:
    results: list = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n, results)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for _n, rc, out in sorted(results):
        print(f"  {out!r:14} exit {rc}")
    print(f"16 threads, 16 children in {dt * 1000:.1f} ms")
    try:
        sc.run(["/no/such/program"])
    except FileNotFoundError as e:
        print(f"synchronous error: {type(e).__name__}: {e} (stage: {e.stage})")


if __name__ == "__main__":
    main()
