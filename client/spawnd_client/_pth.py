"""What the ``spawnd_install.pth`` hook runs at interpreter start-up when ``SPAWND_INSTALL=1``.

The ``.pth`` line itself only reads the variable, so an interpreter without it set pays
one ``os.environ`` lookup. ``SPAWND_FORBID_FORK=1`` adds the fork fence.
"""

from __future__ import annotations

import os


def run() -> None:
    if os.environ.get("SPAWND_INSTALL") != "1":
        return
    from .install import install

    install(forbid_fork=os.environ.get("SPAWND_FORBID_FORK") == "1")
