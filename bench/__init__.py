"""spawnd benchmarks: ``python -m bench`` (full, ~10 min) or ``python -m bench --quick`` (CI).

Parts (one module each, every measurement taken in the same run so ratios hold):

1. ``latency``    spawn-to-exit of /bin/true vs parent size and threads (Figure 1 of
                  "A fork() in the road", extended with spawnd)
2. ``throughput`` spawns/s through one daemon vs tight posix_spawn loops (Python and C)
3. ``memory``     daemon RSS idle / with 1,000 live children / after; vs a forkserver
4. ``mp``         multiprocessing start methods, spawnd cold and warm
5. ``privileged`` the cost of uid/capabilities/rlimits over the plain path

``report`` prints the tables, checks the issue's targets and writes JSON and the PNG.
See docs/benchmarks.md.
"""
