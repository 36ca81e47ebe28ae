"""Build hook: compile the C exec helper (spawnd/exec_helper/spawnd-exec) at install time.

Everything else is declared in pyproject.toml. Wheels get the binary in the build tree;
editable installs get it next to the source. Without a C compiler the install still
succeeds and the daemon uses the Python fallback (spawnd/_trampoline.py).
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _builder():
    # By file path: the package's dependencies (trio, msgpack) need not be importable yet.
    spec = importlib.util.spec_from_file_location(
        "_spawnd_exec_build", HERE / "spawnd" / "exec_helper" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithHelper(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            dest = HERE / "spawnd" / "exec_helper" / "spawnd-exec"
        else:
            dest = Path(self.build_lib) / "spawnd" / "exec_helper" / "spawnd-exec"
        _builder().build(dest)


setup(cmdclass={"build_py": BuildPyWithHelper})
