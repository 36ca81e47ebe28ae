"""Every code block in README.md and docs/*.md runs as written (issue 15, point 6).

The rule: a fenced block is classified by the first word of its info string.

- ``python``/``py``: saved as ``block.py`` and run by this interpreter in a fresh temp dir, with ``SPAWND_SOCKET``
  naming a real daemon (root, no policy) and ``SPAWND_AUTOSTART=0``; must exit 0.
- ``sh``/``bash``/``shell``: run by ``bash -e`` in a fresh temp dir, same environment,
  ``spawnd`` first on ``PATH`` and ``$SPAWND_REPO`` = the checkout; must exit 0.
- ``toml``: a policy file; ``spawnd check-config`` must accept it.
- no info string, ``text``, ``console``, ``ini``, ``json``, ``output``: not code, not run.
- anything else fails (a typo such as ``pyton`` must not silently skip a block).

``norun: REASON`` in the info string (```` ```sh norun: needs systemd as PID 1 ````) keeps a
block from running; the reason is required.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Daemon, start_daemon

RUN_PYTHON = {"python", "py"}
RUN_SH = {"sh", "bash", "shell"}
CHECK_TOML = {"toml"}
NOT_CODE = {"", "text", "console", "ini", "json", "output"}
TIMEOUT = 60

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
_NORUN = re.compile(r"\bnorun\b(:\s*(?P<reason>\S.*))?")


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repo
    line: int  # of the opening fence
    lang: str
    info: str
    code: str

    @property
    def norun(self) -> str | None:
        """The reason, '' if ``norun`` has none, None if the block is to be run."""
        m = _NORUN.search(self.info)
        if m is None:
            return None
        return (m.group("reason") or "").strip()


def blocks_of(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None or (m.group(2)[0] == "`" and "`" in m.group(3)):
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        start = i
        body = []
        i += 1
        while i < len(lines):
            close = re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i])
            if close:
                break
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        i += 1
        lang = info.split()[0].lower() if info else ""
        yield Block(str(path.relative_to(REPO)), start + 1, lang, info, "\n".join(body) + "\n")


def all_blocks() -> list[Block]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [b for f in files for b in blocks_of(f)]


BLOCKS = all_blocks()


def _id(b: Block) -> str:
    return f"{b.file}:{b.line}"


@pytest.fixture(scope="module")
def docs_daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="spawnd-docs-") as d:
        daemon = start_daemon(Path(d))
        yield daemon
        daemon.stop_cleanly()


def _env(daemon: Daemon) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return dict(
        os.environ, SPAWND_SOCKET=daemon.path, SPAWND_AUTOSTART="0", SPAWND_REPO=str(REPO),
        PATH=os.pathsep.join([bindir, os.environ.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "client"),
                                    *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_every_block_is_classified() -> None:
    bad = [f"{_id(b)}: ```{b.info}" for b in BLOCKS
           if b.lang not in RUN_PYTHON | RUN_SH | CHECK_TOML | NOT_CODE]
    assert not bad, "unknown code block languages (see tests/test_docs.py):\n" + "\n".join(bad)
    no_reason = [_id(b) for b in BLOCKS if b.norun == ""]
    assert not no_reason, f"norun needs a reason (```sh norun: why): {no_reason}"


def test_the_collector_finds_blocks() -> None:
    """Guards the parser itself: README's python example must be found and runnable."""
    readme = [b for b in BLOCKS if b.file == "README.md"]
    assert any(b.lang == "python" and b.norun is None and "sc.run" in b.code for b in readme)
    assert len({_id(b) for b in BLOCKS}) == len(BLOCKS)


RUNNABLE = [b for b in BLOCKS if b.norun is None and b.lang in RUN_PYTHON | RUN_SH | CHECK_TOML]


@pytest.mark.parametrize("block", RUNNABLE, ids=[_id(b) for b in RUNNABLE])
def test_block_runs(block: Block, docs_daemon: Daemon, tmp_path: Path) -> None:
    env = _env(docs_daemon)
    if block.lang in RUN_PYTHON:  # a file, as a user would save it (multiprocessing needs one)
        script = tmp_path / "block.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    elif block.lang in RUN_SH:
        cmd = ["bash", "-e", "-"]
    else:
        policy = tmp_path / "policy.toml"
        policy.write_text(block.code)
        policy.chmod(0o644)
        cmd = [sys.executable, "-m", "spawnd", "check-config", str(policy)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         start_new_session=True)  # its own group: a hung block dies whole
    try:
        out, err = p.communicate(block.code, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{_id(block)} did not finish in {TIMEOUT}s:\n{block.code}\n"
                    f"--- stderr\n{err[-2000:]}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever the block left behind
        except ProcessLookupError:
            pass
    assert p.returncode == 0, (
        f"{_id(block)} ({block.lang}) failed with {p.returncode}:\n{block.code}\n"
        f"--- stdout\n{out[-2000:]}\n--- stderr\n{err[-3000:]}")


def test_quick_start_demo_runs_from_the_checkout() -> None:
    """README's first command (marked norun because it must run in the checkout): here."""
    env = dict(os.environ)
    env.pop("SPAWND_SOCKET", None)
    r = subprocess.run(["./scripts/demo.sh"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hello from pid" in r.stdout and "exit status: 3" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
