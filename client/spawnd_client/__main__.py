"""``python -m spawnd_client run [--forbid-fork] script.py args…`` / ``run -m module args…``.

Runs a program as ``python script.py`` / ``python -m module`` would, with
:func:`spawnd_client.install` in effect from its first line: every process it (or any
library in it) starts is started by the spawnd daemon. ``SPAWND_INSTALL=1`` is exported so
that Python children with the package's ``.pth`` hook installed do the same.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m spawnd_client",
        description="Run a Python program whose every child process is started by spawnd.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a script or module with spawnd_client.install()")
    run.add_argument("--forbid-fork", action="store_true",
                     help="make os.fork/forkpty/posix_spawn raise (prove it never forks)")
    run.add_argument("--no-multiprocessing", action="store_true",
                     help="leave multiprocessing's default start method alone")
    run.add_argument("--no-asyncio", action="store_true",
                     help="leave asyncio's subprocess functions alone")
    run.add_argument("-m", dest="module", metavar="MODULE",
                     help="run a library module as a script (like python -m)")
    run.add_argument("target", nargs=argparse.REMAINDER,
                     help="script.py and its arguments (or the module's arguments with -m)")
    args = parser.parse_args(argv)
    if args.module is None and not args.target:
        parser.error("run: a script or -m module is needed")

    from .install import install

    os.environ["SPAWND_INSTALL"] = "1"
    if args.forbid_fork:
        os.environ["SPAWND_FORBID_FORK"] = "1"
    install(multiprocessing=not args.no_multiprocessing, asyncio=not args.no_asyncio,
            forbid_fork=args.forbid_fork)
    if args.module is not None:
        sys.argv[:] = [args.module, *args.target]  # runpy sets argv[0] to the file
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        script, *rest = args.target
        sys.argv[:] = [script, *rest]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
