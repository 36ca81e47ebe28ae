"""setuptools glue for what pyproject.toml cannot say. Each hook is its own block.

- The C exec helper (spawnd/exec_helper/spawnd-exec) is compiled at install time. Wheels get
  the binary in the build tree; editable installs get it next to the source. Without a C
  compiler the install still succeeds and the daemon uses the Python fallback
  (spawnd/_trampoline.py).
- The SPAWND_INSTALL=1 start-up hook (docs/install.md): a .pth file must sit at the top of
  site-packages; package data cannot put it there.
"""

import importlib.util
import os
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


class BuildPy(build_py):
    def run(self):
        super().run()
        # -- the C exec helper
        if getattr(self, "editable_mode", False):
            dest = HERE / "spawnd" / "exec_helper" / "spawnd-exec"
        else:
            dest = Path(self.build_lib) / "spawnd" / "exec_helper" / "spawnd-exec"
        _builder().build(dest)
        # -- spawnd_client.install()'s .pth hook
        self.copy_file(os.path.join("client", "spawnd_install.pth"),
                       os.path.join(self.build_lib, "spawnd_install.pth"))


setup(cmdclass={"build_py": BuildPy})
