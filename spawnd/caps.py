"""Linux capability names and numbers, and reading capability sets from ``/proc``.

Pure tables plus two tiny readers. Kept apart from :mod:`spawnd.policy` (which validates
names) and :mod:`spawnd.privileged` (which sends numbers to the trampoline) so both agree
on one table, and so tests can compare ``/proc/<pid>/status`` against a grant exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

# <linux/capability.h>, in number order. The kernel on this machine knows 0..40
# (CAP_CHECKPOINT_RESTORE, Linux 5.9); last_cap() says what the running kernel knows.
_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)

#: Canonical name -> number.
NUMBERS: Mapping[str, int] = {name: i for i, name in enumerate(_NAMES)}


def canonical(name: str) -> str:
    """``"net_bind_service"`` / ``"CAP_NET_BIND_SERVICE"`` -> ``"CAP_NET_BIND_SERVICE"``.

    Case and the ``CAP_`` prefix are forgiven because people write both (systemd and
    capsh use different spellings); anything else unknown raises ``KeyError`` so a typo
    can never silently grant nothing or something else.
    """
    upper = name.strip().upper()
    if not upper.startswith("CAP_"):
        upper = "CAP_" + upper
    if upper not in NUMBERS:
        raise KeyError(name)
    return upper


def number(name: str) -> int:
    """Number of a capability name (any spelling :func:`canonical` accepts)."""
    return NUMBERS[canonical(name)]


def name_of(num: int) -> str:
    """Canonical name of a number; unknown (newer kernel) numbers read ``"cap_<n>"``."""
    return _NAMES[num] if 0 <= num < len(_NAMES) else f"cap_{num}"


def mask(names: Iterable[str]) -> int:
    """Bit mask of a set of names, as ``/proc/<pid>/status`` prints it (hex)."""
    m = 0
    for n in names:
        m |= 1 << number(n)
    return m


def names_in(m: int) -> tuple[str, ...]:
    """Names of the bits set in a mask, in number order."""
    return tuple(name_of(i) for i in range(m.bit_length()) if m >> i & 1)


@cache
def last_cap() -> int:
    """Highest capability the running kernel knows (bounding-set drops go up to it)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(_NAMES) - 1


@dataclass(frozen=True, slots=True)
class CapSets:
    """The five capability sets of a process, as masks."""

    effective: int
    permitted: int
    inheritable: int
    bounding: int
    ambient: int


def read_status(pid: int | str = "self") -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict (``"Uid" -> "1000\\t1000\\t1000\\t1000"``)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        return parse_status(f.read())


def parse_status(text: str) -> dict[str, str]:
    """Parse the ``Key:\\tvalue`` lines of a ``/proc/<pid>/status`` text."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def cap_sets(status: Mapping[str, str]) -> CapSets:
    """The capability masks of a parsed status."""
    return CapSets(
        effective=int(status["CapEff"], 16), permitted=int(status["CapPrm"], 16),
        inheritable=int(status["CapInh"], 16), bounding=int(status["CapBnd"], 16),
        ambient=int(status.get("CapAmb", "0"), 16),
    )


def own_permitted() -> frozenset[str]:
    """Capabilities this process could grant: its permitted set (empty if unreadable)."""
    try:
        return frozenset(names_in(cap_sets(read_status()).permitted))
    except (OSError, KeyError, ValueError):
        return frozenset()
