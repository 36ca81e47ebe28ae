"""What a spawnd child runs before its target, compared with the stdlib ``spawn`` child.

Every boot costs CPU (docs/multiprocessing.md, *The bound*), so a spawnd child must import
nothing the ``spawn`` child does not, apart from our own few modules; and it must still
look like a ``spawn`` child to the target: the parent's ``sys.path``, its ``__main__`` as
``__mp_main__``, its own hash seed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, start_daemon
from spawnd_client import mp

OURS = ("spawnd_client", "spawnd_client.")

#: Run as a program (so ``__main__`` has a path): starts one child with ``spawn`` and one
#: with spawnd and prints what each saw at the start of its target.
PROGRAM = textwrap.dedent("""
    import json, multiprocessing, os, sys

    def probe(q):
        main = sys.modules.get("__mp_main__")
        q.put({"path": sys.path, "modules": sorted(sys.modules), "hash": hash("x" * 9),
               "main_file": getattr(main, "__file__", None), "main_is_mp_main":
               sys.modules.get("__main__") is main, "argv": sys.argv,
               "flags": [sys.flags.no_site, sys.flags.isolated, sys.flags.ignore_environment,
                         sys.flags.no_user_site, sys.flags.safe_path]})

    if __name__ == "__main__":
        # Only in the parent: a child gets it from the parent's sys.path alone. (Done at the
        # top, the child's re-import of __main__ would add it again, which a pooled child
        # that imported __main__ at boot, as forkserver does, would not: timing-dependent.)
        sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "added"))
        from spawnd_client import mp
        ctxs = {"spawn": multiprocessing.get_context("spawn"),
                "spawnd": mp.get_context(socket=sys.argv[1], warm=int(sys.argv[2]))}
        out = {}
        for name, ctx in ctxs.items():
            if name == "spawnd" and ctx.options.warm:
                ctx.prewarm()
            q = ctx.SimpleQueue()
            p = ctx.Process(target=probe, args=(q,))
            p.start()
            out[name] = q.get()
            p.join()
            assert p.exitcode == 0, p.exitcode
        print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def bootd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("mpboot"), "--stop-grace", "1")
    yield d
    d.stop_cleanly()


def run_program(tmp_path: Path, d: Daemon, warm: int) -> dict[str, dict]:
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    (tmp_path / "added").mkdir()
    p = subprocess.run([sys.executable, str(prog), d.path, str(warm)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path, env=os.environ.copy())
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.parametrize("warm", [0, 1], ids=["cold", "warm"])
def test_child_sees_what_a_spawn_child_sees(bootd: Daemon, tmp_path: Path, warm: int) -> None:
    out = run_program(tmp_path, bootd, warm)
    spawn, ours = out["spawn"], out["spawnd"]
    assert ours["path"] == spawn["path"]  # the parent's, with the directory it added
    assert str(tmp_path / "added") in ours["path"]
    assert ours["main_file"] == spawn["main_file"] == str(tmp_path / "prog.py")
    assert ours["main_is_mp_main"] == spawn["main_is_mp_main"]
    assert ours["argv"] == spawn["argv"]
    assert ours["flags"] == spawn["flags"]  # same interpreter flags: site runs, as for spawn
    assert ours["hash"] != spawn["hash"] or "PYTHONHASHSEED" in os.environ


def test_cold_child_imports_nothing_a_spawn_child_does_not(bootd: Daemon,
                                                           tmp_path: Path) -> None:
    """Before: the boot imported dataclasses (inspect, ast, dis, tokenize...), typing and
    the ``spawnd`` package in every child: ~4 ms of CPU a boot."""
    out = run_program(tmp_path, bootd, 0)
    extra = set(out["spawnd"]["modules"]) - set(out["spawn"]["modules"])
    assert {m for m in extra if not m.startswith(OURS)} == set()


def test_import_mp_costs_only_multiprocessing_and_subprocess() -> None:
    """``import spawnd_client.mp`` loads our modules on top of the floor (multiprocessing,
    and subprocess for the package's exception classes), nothing else (was: dataclasses)."""
    code = ("import sys;import multiprocessing, subprocess;a=set(sys.modules);"
            "import spawnd_client.mp;print(' '.join(sorted(set(sys.modules)-a)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env=os.environ.copy())
    assert [m for m in p.stdout.split() if not m.startswith(OURS)] == []


def test_options_is_a_frozen_value() -> None:
    o = mp.Options(warm=2, preload=["a", "b"])
    assert o.preload == ("a", "b") and o.warm == 2 and o.socket is None
    assert mp.Options(warm=2, preload=(m for m in "ab")) == o == mp.Options(None, 2, ("a", "b"))
    assert hash(o) == hash(mp.Options(warm=2, preload=("a", "b")))
    assert o != mp.Options()
    with pytest.raises(AttributeError):
        o.warm = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del o.warm
    with pytest.raises(AttributeError):
        o.other = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        mp.Options(nope=1)  # type: ignore[call-arg]
    assert pickle.loads(pickle.dumps(o)) == o
    assert o.asdict()["preload"] == ("a", "b")
    assert repr(o).startswith("Options(socket=None, warm=2, preload=('a', 'b')")
    ctx = mp.get_context(warm=3, socket="/nonexistent")
    assert pickle.loads(pickle.dumps(ctx)).options == ctx.options
