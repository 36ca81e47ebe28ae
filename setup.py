"""setuptools glue for what pyproject.toml cannot say. Each hook is its own block."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


# -- spawnd_client.install(): the SPAWND_INSTALL=1 start-up hook (docs/install.md) --------
# A .pth file must sit at the top of site-packages; package data cannot put it there.
class _BuildPyWithInstallHook(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join("client", "spawnd_install.pth"),
                       os.path.join(self.build_lib, "spawnd_install.pth"))


setup(cmdclass={"build_py": _BuildPyWithInstallHook})
