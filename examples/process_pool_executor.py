"""``concurrent.futures.ProcessPoolExecutor`` with workers started by spawnd.

``mp_context=ctx`` is all it takes: the executor's workers, its queues' locks and the
resource tracker come from the daemon, so this process never forks. The second executor
shows the warm pool: its workers are interpreters the daemon started in the background
after the first one, with this module already imported.
"""

from __future__ import annotations

import concurrent.futures
import math
import time

from spawnd_client import mp


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def first_result_latency(ctx: mp.SpawndContext) -> tuple[float, int]:
    """Seconds from creating an executor to its first result, and the prime count."""
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=ctx) as ex:
        first = ex.submit(is_prime, 2)
        first.result()
        latency = time.perf_counter() - t0
        count = sum(ex.map(is_prime, range(200_000), chunksize=5_000))
    return latency, count


def main() -> None:
    ctx = mp.get_context(warm=4, idle_timeout=30)
    for label in ("cold (the daemon fills the pool meanwhile)", "warm"):
        latency, count = first_result_latency(ctx)
        print(f"{label}: first result after {latency * 1000:.1f} ms; "
              f"{count} primes below 200000")
        time.sleep(1.0)  # give the daemon time to refill the warm pool


if __name__ == "__main__":
    main()
