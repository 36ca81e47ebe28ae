"""Who may connect, and what a spawn request may get: the policy file and its defaults.

Pure: no sockets, no processes. The only I/O is reading the policy file, resolving the
paths it names (``realpath``) and asking the user database (``pwd``/``grp``, through a
replaceable :class:`Directory`) for names and group memberships.

The model (see ``docs/policy.md``): a policy is a list of ``[[allow]]`` rules. A peer
(identified only by the kernel's ``SO_PEERCRED`` uid/gid, never its pid) may connect if
some rule selects it, and a request is granted if **one** rule that selects the peer
allows all of it. Rules never add up: two half-permissions in two rules do not make a
whole one. With no file, :meth:`Policy.default` lets a per-user daemon serve only its own
uid, and a root daemon serve every uid strictly as itself.
"""

from __future__ import annotations

import errno
import fnmatch
import grp
import math
import os
import pwd
import re
import resource
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from . import caps
from . import protocol as P

__all__ = [
    "RLIMITS",
    "DaemonIdentity",
    "Directory",
    "Grant",
    "Peer",
    "Policy",
    "PolicyFileError",
    "Refused",
    "SystemDirectory",
    "is_unsafe_env",
]

#: Default per-uid live-children cap of a root daemon without a policy file: every child
#: costs the daemon a pidfd, so one user must not be able to exhaust them for everyone.
ROOT_DEFAULT_MAX_CHILDREN = 1024

#: rlimit names accepted in requests and policy ("NOFILE" or "RLIMIT_NOFILE").
RLIMITS: Mapping[str, int] = {
    "NOFILE": resource.RLIMIT_NOFILE, "NPROC": resource.RLIMIT_NPROC,
    "CORE": resource.RLIMIT_CORE, "AS": resource.RLIMIT_AS, "CPU": resource.RLIMIT_CPU,
    "FSIZE": resource.RLIMIT_FSIZE, "DATA": resource.RLIMIT_DATA,
    "STACK": resource.RLIMIT_STACK, "MEMLOCK": resource.RLIMIT_MEMLOCK,
    "NICE": resource.RLIMIT_NICE, "RTPRIO": resource.RLIMIT_RTPRIO,
    "MSGQUEUE": resource.RLIMIT_MSGQUEUE, "SIGPENDING": resource.RLIMIT_SIGPENDING,
    "LOCKS": getattr(resource, "RLIMIT_LOCKS", 10),  # Linux's number; Python lacks the name
    "RSS": resource.RLIMIT_RSS, "RTTIME": resource.RLIMIT_RTTIME,
}

# Variables a child must not receive from a client when it runs with more privilege than
# that client: glibc's unsecvars.h (what the loader itself drops in secure-exec mode, which
# an ambient-capability child is NOT in), plus loader/interpreter hooks of other runtimes
# and the systemd variables that would let a child talk to the service manager as us.
_UNSAFE_EXACT = frozenset({
    # glibc unsecvars.h
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
    "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
    # systemd protocol
    "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "MAINPID", "INVOCATION_ID",
    # shells
    "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "CDPATH", "GLOBIGNORE",
    # other runtimes' code-loading hooks
    "PERL5LIB", "PERLLIB", "PERL5OPT", "PERL5DB", "RUBYLIB", "RUBYOPT", "NODE_OPTIONS",
    "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
    "GIO_EXTRA_MODULES", "GTK_MODULES", "GTK_PATH", "QT_PLUGIN_PATH", "OPENSSL_CONF",
    "OPENSSL_ENGINES", "SSLKEYLOGFILE", "GIT_EXEC_PATH", "GIT_CONFIG_GLOBAL",
})
_UNSAFE_PATTERNS = ("LD_*", "MALLOC_*", "PYTHON*", "LISTEN_*", "BASH_FUNC_*", "LUA_*",
                    "GCONV_*", "GLIBC_*")


def is_unsafe_env(name: str) -> bool:
    """Is ``name`` a variable that could inject code into a more privileged child?"""
    return name in _UNSAFE_EXACT or _UNSAFE_MATCH(name)


# ---------------------------------------------------------------------------- data types

@dataclass(frozen=True, slots=True)
class Peer:
    """A connected client, from ``SO_PEERCRED``. ``pid`` is for logs only: pids are
    recycled and a peer can pass its socket to another process, so never authorize on it."""

    uid: int
    gid: int
    pid: int


class PolicyFileError(Exception):
    """The policy file is unusable. The message names the file, table, field and line."""

    def __init__(self, message: str, *, filename: str = "<policy>", line: int | None = None,
                 table: str | None = None, field: str | None = None) -> None:
        where = filename if line is None else f"{filename}:{line}"
        super().__init__(f"{where}: {message}")
        self.filename = filename
        self.line = line
        self.table = table
        self.field = field


class Refused(Exception):
    """A request the policy does not allow (EPERM), cannot parse (EINVAL), or that would
    exceed a limit (EAGAIN). ``field`` names the request field at fault."""

    def __init__(self, errno: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class Grant:
    """Exactly what a child gets. ``None`` credentials mean "unchanged": the daemon's own,
    which :class:`Policy` only leaves when the peer has the daemon's uid."""

    executable: bytes | None  # None: decided without it (Policy.path_agnostic)
    argv: tuple[bytes, ...]
    env: tuple[bytes, ...]
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    umask: int | None = None
    capabilities: tuple[str, ...] = ()
    rlimits: dict[int, tuple[int, int]] = field(default_factory=dict)
    no_new_privs: bool = False
    #: The rlimits applied with the daemon's privilege, before the credential switch; the
    #: others are applied after it, so the kernel allows only what the child could do itself.
    privileged_rlimits: frozenset[int] = frozenset()
    rule: str = ""  # which rule allowed it, for logs
    #: New namespaces for the child (the exec helper unshares them).
    namespaces: tuple[str, ...] = ()

    @property
    def needs_trampoline(self) -> bool:
        """posix_spawn cannot change credentials, caps, rlimits or no_new_privs."""
        return (self.uid is not None or self.gid is not None or self.groups is not None
                or bool(self.capabilities) or bool(self.rlimits) or self.no_new_privs)

    @property
    def manages_capabilities(self) -> bool:
        """Set all five capability sets to exactly ``capabilities``?

        Yes whenever the uid is set (a child of another uid must hold only what was
        granted, bounding set included) or capabilities were asked for. No for a child that
        keeps the daemon's uid and asked for none: a per-user daemon has nothing to drop,
        and a root peer asking for a root child gets root, as it could itself.
        """
        return self.uid is not None or bool(self.capabilities)


@dataclass(frozen=True, slots=True)
class DaemonIdentity:
    """The daemon's own credentials: what "unchanged" means, and which caps it can give."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    permitted: frozenset[str] = frozenset()

    @classmethod
    def current(cls, uid: int | None = None) -> DaemonIdentity:
        return cls(uid=os.geteuid() if uid is None else uid, gid=os.getegid(),
                   groups=tuple(os.getgroups()), permitted=caps.own_permitted())


class Directory(Protocol):
    """The user and group database (tests substitute a dict-backed one)."""

    def uid_of(self, name: str) -> int | None: ...
    def gid_of(self, name: str) -> int | None: ...
    def user_name(self, uid: int) -> str | None: ...
    def primary_gid(self, uid: int) -> int | None: ...
    def groups_of(self, uid: int, gid: int) -> tuple[int, ...]: ...


class SystemDirectory:
    """``pwd``/``grp`` (NSS). ``groups_of`` is ``getgrouplist``: what ``initgroups`` gives."""

    def uid_of(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def gid_of(self, name: str) -> int | None:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None

    def user_name(self, uid: int) -> str | None:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return None

    def primary_gid(self, uid: int) -> int | None:
        try:
            return pwd.getpwuid(uid).pw_gid
        except KeyError:
            return None

    def groups_of(self, uid: int, gid: int) -> tuple[int, ...]:
        name = self.user_name(uid)
        if name is None:
            return (gid,)  # unknown to the database: only the gid we were told
        return tuple(dict.fromkeys([gid, *os.getgrouplist(name, gid)]))


# ---------------------------------------------------------------------------- rules

@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[allow]]`` table, validated and with names resolved to numbers."""

    label: str
    everyone: bool = False
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    executables: tuple[bytes, ...] = ()
    allow_scripts: bool = True
    run_as_uids: frozenset[int] = frozenset()
    run_as_any_user: bool = False
    run_as_gids: frozenset[int] = frozenset()
    run_as_any_group: bool = False
    capabilities: frozenset[str] = frozenset()
    rlimits: frozenset[int] = frozenset()  # settable with the daemon's privilege
    no_new_privs_always: bool = False
    env_allow: tuple[str, ...] | None = None
    env_deny: tuple[str, ...] = ()
    env_unsafe_allow: tuple[str, ...] = ()
    max_children: int | None = None
    spawn_rate: float | None = None
    spawn_burst: int | None = None
    namespaces: frozenset[str] = frozenset()  # which new namespaces a request may ask for


@dataclass(frozen=True, slots=True)
class Limits:
    max_children: int | None = None
    spawn_rate: float | None = None
    spawn_burst: int | None = None


class _Deny(Protocol):
    """Raise a rule's refusal: ``deny(step, message, field[, errno])``."""

    def __call__(self, step: int, message: str, fld: str | None,
                 code: int = errno.EPERM) -> NoReturn: ...


class _Denied(Exception):
    """A rule's refusal, with how far the request got (to report the most relevant one)."""

    def __init__(self, step: int, refused: Refused) -> None:
        self.step = step
        self.refused = refused


@dataclass(frozen=True, slots=True)
class _Creds:
    uid: int | None
    gid: int | None
    groups: tuple[int, ...] | None
    elevated: bool  # the child gets a uid or group the peer does not have


# ---------------------------------------------------------------------------- the policy

class Policy:
    """A validated policy. Build with :meth:`load`, :meth:`from_text` or :meth:`default`."""

    def __init__(self, rules: Sequence[Rule], *, limits: Limits | None = None,
                 identity: DaemonIdentity | None = None, directory: Directory | None = None,
                 source: str = "<policy>") -> None:
        self.rules = tuple(rules)
        # Per rule, what does not depend on the request, compiled once (hot path).
        self._compiled: dict[int, _CompiledRule] = {id(r): _CompiledRule(r) for r in self.rules}
        #: No rule looks at which file runs (any executable, scripts too): a decision needs
        #: no executable, so the server need not open the file to check it first.
        self.path_agnostic = all(b"/" in self._compiled[id(r)].exec_dirs and r.allow_scripts
                                 for r in self.rules)
        self.limits = limits or Limits()
        self.identity = identity or DaemonIdentity.current()
        self.directory: Directory = directory or SystemDirectory()
        self.source = source

    # -- construction
    @classmethod
    def load(cls, path: str, *, identity: DaemonIdentity | None = None,
             directory: Directory | None = None) -> Policy:
        """Read and validate a policy file; refuse one that others could have written."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except OSError as e:
            raise PolicyFileError(f"cannot read: {e.strerror}", filename=path) from None
        _check_file_trust(path, st)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PolicyFileError(f"not UTF-8 (byte {e.start})", filename=path) from None
        return cls.from_text(text, path, identity=identity, directory=directory)

    @classmethod
    def from_text(cls, text: str, name: str = "<policy>", *,
                  identity: DaemonIdentity | None = None, directory: Directory | None = None,
                  resolve_paths: bool = True) -> Policy:
        """Validate TOML text. ``resolve_paths`` realpaths executables entries (symlinked
        directories such as ``/bin`` -> ``/usr/bin`` must match the file actually run)."""
        d: Directory = directory or SystemDirectory()
        rules, limits = _Loader(text, name, d, resolve_paths).load()
        return cls(rules, limits=limits, identity=identity, directory=d, source=name)

    @classmethod
    def default(cls, daemon_uid: int, *, identity: DaemonIdentity | None = None,
                directory: Directory | None = None) -> Policy:
        """No policy file. A per-user daemon: its own uid only, anything it could do itself.
        A root daemon: every uid, each strictly as itself (never as root), no capabilities,
        and at most :data:`ROOT_DEFAULT_MAX_CHILDREN` live children per uid."""
        ident = identity or DaemonIdentity.current(daemon_uid)
        if daemon_uid == 0:
            rules = [Rule(label="default (root daemon: every uid as itself)", everyone=True,
                          executables=(b"/",)),
                     # A root client may already setuid/unshare itself, as subprocess and
                     # systemd-run --uid let it: run as any user or group, any namespace.
                     Rule(label="default (root daemon: root client as any user)",
                          uids=frozenset({0}), executables=(b"/",), run_as_any_user=True,
                          run_as_any_group=True, namespaces=frozenset(P.NAMESPACES))]
            limits = Limits(max_children=ROOT_DEFAULT_MAX_CHILDREN)
        else:
            # Namespaces: whatever the kernel lets this user unshare (it answers EPERM).
            rules = [Rule(label=f"default (per-user daemon: uid {daemon_uid} only)",
                          uids=frozenset({daemon_uid}), executables=(b"/",),
                          namespaces=frozenset(P.NAMESPACES))]
            limits = Limits()
        return cls(rules, limits=limits, identity=ident, directory=directory,
                   source="<default>")

    # -- questions the server asks
    def may_connect(self, peer: Peer) -> bool:
        """Some rule selects this peer's uid or one of its groups."""
        return bool(self._rules_for(peer))

    def max_children(self, peer: Peer) -> int | None:
        """Live children allowed per uid: the largest any selecting rule sets, else [limits]."""
        vals = [r.max_children for r in self._rules_for(peer) if r.max_children is not None]
        return max(vals) if vals else self.limits.max_children

    def spawn_rate(self, peer: Peer) -> tuple[float, int] | None:
        """(spawns per second, burst) for a token bucket per uid, or None for no limit."""
        rules = [r for r in self._rules_for(peer) if r.spawn_rate is not None]
        if rules:
            best = max(rules, key=lambda r: r.spawn_rate or 0.0)
            rate, burst = best.spawn_rate, best.spawn_burst
        else:
            rate, burst = self.limits.spawn_rate, self.limits.spawn_burst
        if rate is None:
            return None
        return rate, burst if burst is not None else max(1, math.ceil(rate))

    def decide(self, peer: Peer, req: P.Spawn, executable: bytes | None, *,
               is_script: bool = False) -> Grant:
        """The :class:`Grant` for ``req``, or :class:`Refused`.

        ``executable`` is the canonical absolute path of the file that will run: the server
        gets it from the opened fd (``privileged.real_path``), not from the request, so the
        check and the exec concern the same file. None only when :attr:`path_agnostic`.
        """
        if executable is None and not self.path_agnostic:
            raise ValueError("this policy looks at the executable: give its real path")
        rules = self._rules_for(peer)
        if not rules:
            raise Refused(errno.EPERM, f"uid {peer.uid} is not allowed by the policy")
        req_caps = _request_caps(req)
        req_rlimits = _request_rlimits(req)
        best: _Denied | None = None
        for rule in rules:
            try:
                return self._decide_rule(rule, peer, req, executable, is_script, req_caps,
                                         req_rlimits)
            except _Denied as d:
                if best is None or d.step > best.step:
                    best = d
        assert best is not None
        raise best.refused

    def inherit_grants(self, peer: Peer, grant: Grant) -> frozenset[int]:
        """The rlimits a child of ``grant`` may have beyond the peer's own (issue 11).

        A peer of another uid passes on at most its real limits and nice value (spawnd/peer.py);
        the rule that allowed ``grant`` lifts that cap for the rlimits it lists (the same
        ``rlimits = [...]`` that allows raising them with ``rlimits=``), ``NICE`` also for
        a lower nice value.
        """
        out: frozenset[int] = frozenset()
        for rule in self._rules_for(peer):
            if rule.label == grant.rule:
                out |= rule.rlimits
        return out

    # -- internals
    def _rules_for(self, peer: Peer) -> list[Rule]:
        out = []
        groups: frozenset[int] | None = None
        for r in self.rules:
            if r.everyone or peer.uid in r.uids:
                out.append(r)
                continue
            if r.gids:
                if groups is None:
                    groups = self._own_groups(peer.uid, peer.gid)
                if groups & r.gids:
                    out.append(r)
        return out

    def _own_groups(self, uid: int, gid: int) -> frozenset[int]:
        return frozenset({gid, *self.directory.groups_of(uid, gid)})

    def _decide_rule(self, rule: Rule, peer: Peer, req: P.Spawn, executable: bytes | None,
                     is_script: bool, req_caps: tuple[str, ...],
                     req_rlimits: dict[int, tuple[int, int]]) -> Grant:
        def deny(step: int, message: str, fld: str | None, code: int = errno.EPERM) -> NoReturn:
            raise _Denied(step, Refused(code, f"{message} (rule {rule.label})", fld))

        compiled = self._compiled.get(id(rule)) or _CompiledRule(rule)
        if executable is not None:
            self._check_executable(rule, req, executable, is_script, deny, compiled)
        creds = self._credentials(rule, peer, req, deny)
        granted_caps = self._check_caps(rule, req_caps, deny) if req_caps else ()
        elevated = peer.uid != 0 and (creds.elevated or bool(granted_caps))
        if elevated or compiled.has_env_rules:  # else nothing to check: O(1) in the env
            self._check_env(rule, req.env, elevated, deny, compiled)
        if req.namespaces:
            self._check_namespaces(rule, req, deny)
        return Grant(
            executable=executable, argv=tuple(req.argv), env=tuple(req.env),
            uid=creds.uid, gid=creds.gid, groups=creds.groups, umask=req.umask,
            capabilities=granted_caps, rlimits=dict(req_rlimits),
            no_new_privs=rule.no_new_privs_always or req.no_new_privs,
            privileged_rlimits=frozenset(req_rlimits) & rule.rlimits, rule=rule.label,
            namespaces=tuple(req.namespaces),
        )

    @staticmethod
    def _check_executable(rule: Rule, req: P.Spawn, executable: bytes, is_script: bool,
                          deny: _Deny, compiled: _CompiledRule | None = None) -> None:
        fld = "executable" if req.executable is not None else "argv[0]"
        c = compiled or _CompiledRule(rule)
        if not executable.startswith(b"/") or not _canonical(executable):
            deny(1, f"{os.fsdecode(executable)!r} is not a canonical absolute path", fld,
                 errno.EINVAL)
        if not (executable.startswith(c.exec_dirs) or executable in c.exec_files):
            deny(1, f"{os.fsdecode(executable)!r} is not in the executables allowed", fld)
        if is_script and not rule.allow_scripts:
            deny(1, f"{os.fsdecode(executable)!r} is a #! script and scripts are not allowed",
                 fld)

    def _credentials(self, rule: Rule, peer: Peer, req: P.Spawn, deny: _Deny) -> _Creds:
        """Target uid/gid/groups. A child never keeps the daemon's groups under another uid."""
        target = req.user if req.user is not None else peer.uid
        if target != peer.uid and not (rule.run_as_any_user or target in rule.run_as_uids):
            deny(2, f"uid {peer.uid} may not run a child as uid {target}", "user")
        same = target == peer.uid == self.identity.uid
        if same and req.group is None and req.extra_groups is None:
            return _Creds(uid=None, gid=None, groups=None, elevated=False)  # the fast path
        base_gid = peer.gid if target == peer.uid else self.directory.primary_gid(target)
        own_list: tuple[int, ...] = ()
        if base_gid is None:  # a uid without a passwd entry has no groups of its own
            if req.group is None:
                deny(2, f"uid {target} has no passwd entry: give group=", "group", errno.EINVAL)
            base_gid = req.group
        else:
            own_list = self.directory.groups_of(target, base_gid)
        own = frozenset(own_list)
        if req.group is not None:
            self._check_group(rule, req.group, own, "group", deny)
        gid = req.group if req.group is not None else (None if same else base_gid)
        groups: tuple[int, ...] | None
        if req.extra_groups is not None:
            for i, g in enumerate(req.extra_groups):
                self._check_group(rule, g, own, f"extra_groups[{i}]", deny)
            groups = tuple(dict.fromkeys(req.extra_groups))
        elif same:
            groups = None
        elif gid is None or gid == base_gid:
            groups = own_list or (base_gid,)
        else:
            groups = self.directory.groups_of(target, gid)
        peer_groups = (own if (target, base_gid) == (peer.uid, peer.gid)
                       else self._own_groups(peer.uid, peer.gid))
        elevated = (target != peer.uid or (gid is not None and gid not in peer_groups)
                    or (groups is not None and not set(groups) <= peer_groups))
        return _Creds(uid=None if same else target, gid=gid, groups=groups, elevated=elevated)

    @staticmethod
    def _check_group(rule: Rule, gid: int, own: frozenset[int], fld: str, deny: _Deny) -> None:
        if gid in own or rule.run_as_any_group or gid in rule.run_as_gids:
            return
        deny(2, f"gid {gid} is neither one of the target user's groups nor allowed", fld)

    def _check_caps(self, rule: Rule, req_caps: tuple[str, ...], deny: _Deny) -> tuple[str, ...]:
        for i, name in enumerate(req_caps):
            if name not in rule.capabilities:
                deny(3, f"capability {name} is not granted", f"capabilities[{i}]")
            if name not in self.identity.permitted:
                deny(3, f"the daemon itself does not hold {name}", f"capabilities[{i}]")
        return tuple(sorted(set(req_caps), key=caps.number))

    @staticmethod
    def _check_namespaces(rule: Rule, req: P.Spawn, deny: _Deny) -> None:
        for i, name in enumerate(req.namespaces):
            if name not in rule.namespaces:
                deny(5, f"a new {name} namespace is not granted", f"namespaces[{i}]")

    @staticmethod
    def _check_env(rule: Rule, env: Iterable[bytes], elevated: bool, deny: _Deny,
                   compiled: _CompiledRule | None = None) -> None:
        c = compiled or _CompiledRule(rule)
        allow, deny_m, unsafe_ok = c.env_allow, c.env_deny, c.env_unsafe_allow
        for i, entry in enumerate(env):
            name = os.fsdecode(entry.partition(b"=")[0])
            if elevated and is_unsafe_env(name) and not unsafe_ok(name):
                deny(4, f"{name} is refused: the child runs with a uid, groups or capabilities "
                        "the client does not have (glibc's secure mode does not cover ambient "
                        "capabilities)", f"env[{i}]")
            if allow is not None and not allow(name):
                deny(4, f"{name} is not in env_allow", f"env[{i}]")
            if deny_m(name):
                deny(4, f"{name} is in env_deny", f"env[{i}]")


def _canonical(path: bytes) -> bool:
    """``os.path.normpath(path) == path``, without normpath for the usual path (which has no
    ``//``, no ``/.`` and no trailing ``/``: normpath changes none of those)."""
    if b"//" not in path and b"/." not in path and not path.endswith(b"/"):
        return True
    return os.path.normpath(path) == path


class _CompiledRule:
    """What a :class:`Rule` checks that does not depend on the request, compiled once.

    Env patterns become one regex per list (``fnmatchcase`` semantics: ``fnmatch.translate``
    is what ``fnmatchcase`` itself compiles), executables a tuple of directory prefixes and
    a set of files; ``has_env_rules`` False lets a non-elevated request skip the env.
    """

    __slots__ = ("env_allow", "env_deny", "env_unsafe_allow", "exec_dirs", "exec_files",
                 "has_env_rules")

    def __init__(self, rule: Rule) -> None:
        self.env_allow = None if rule.env_allow is None else _matcher(rule.env_allow)
        self.env_deny = _matcher(rule.env_deny)
        self.env_unsafe_allow = _matcher(rule.env_unsafe_allow)
        self.exec_dirs = tuple(e for e in rule.executables if e.endswith(b"/"))
        self.exec_files = frozenset(e for e in rule.executables if not e.endswith(b"/"))
        self.has_env_rules = rule.env_allow is not None or bool(rule.env_deny)


def _never(name: str) -> bool:
    return False


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """One compiled regex for "matches any of ``patterns``" (as :func:`_matches_any`)."""
    pats = tuple(patterns)
    if not pats:
        return _never
    match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats)).match
    return lambda name: match(name) is not None


_UNSAFE_MATCH = _matcher(_UNSAFE_PATTERNS)


# ---------------------------------------------------------------------------- request parts

def _request_caps(req: P.Spawn) -> tuple[str, ...]:
    """Canonical names; an unknown name is EINVAL whatever the rules say."""
    out = []
    for i, name in enumerate(req.capabilities):
        try:
            out.append(caps.canonical(name))
        except KeyError:
            raise Refused(errno.EINVAL, f"unknown capability {name!r}",
                          f"capabilities[{i}]") from None
    return tuple(out)


def rlimit_number(name: str) -> int:
    """``"NOFILE"``/``"rlimit_nofile"`` -> ``resource.RLIMIT_NOFILE`` (KeyError if unknown)."""
    key = name.strip().upper()
    return RLIMITS[key.removeprefix("RLIMIT_")]


def _request_rlimits(req: P.Spawn) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for name, (soft, hard) in (req.rlimits or {}).items():
        fld = f"rlimits.{name}"
        try:
            num = rlimit_number(name)
        except KeyError:
            raise Refused(errno.EINVAL, f"unknown rlimit {name!r}", fld) from None
        if num in out:
            raise Refused(errno.EINVAL, f"rlimit {name!r} given twice", fld)
        s = resource.RLIM_INFINITY if soft == -1 else soft
        h = resource.RLIM_INFINITY if hard == -1 else hard
        if h != resource.RLIM_INFINITY and (s == resource.RLIM_INFINITY or s > h):
            raise Refused(errno.EINVAL, f"soft limit {soft} exceeds hard limit {hard}", fld)
        out[num] = (s, h)
    return out


def _matches_any(patterns: Iterable[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_file_trust(path: str, st: os.stat_result) -> None:
    """The policy decides who gets root's powers: only root or the daemon may write it."""
    if st.st_uid not in (0, os.geteuid()):
        raise PolicyFileError(f"owned by uid {st.st_uid}, not root or the daemon's uid",
                              filename=path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyFileError(f"writable by group or others (mode {st.st_mode & 0o777:o})",
                              filename=path)


# ---------------------------------------------------------------------------- file loading

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]#]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*[\"']?([A-Za-z0-9_-]+)[\"']?\s*=")


class _Locator:
    """Line numbers for tables and keys: tomllib reports lines only for syntax errors."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, int], int] = {}
        self._keys: dict[tuple[str, int], dict[str, int]] = {}
        counts: dict[str, int] = {}
        current = ("", 0)
        for lineno, line in enumerate(text.splitlines(), 1):
            m = _HEADER.match(line)
            if m:
                name = m.group(2).strip()
                index = counts.get(name, 0)
                if m.group(1) == "[[":
                    counts[name] = index + 1
                current = (name, index if m.group(1) == "[[" else 0)
                self._lines.setdefault(current, lineno)
                continue
            k = _KEY.match(line)
            if k:
                self._keys.setdefault(current, {}).setdefault(k.group(1), lineno)

    def line(self, table: str, index: int, key: str | None) -> int | None:
        if key is not None:
            found = self._keys.get((table, index), {}).get(key)
            if found is not None:
                return found
        return self._lines.get((table, index))


_SELECTORS = ("users", "uids", "groups", "gids", "everyone")
_RULE_KEYS = frozenset({
    "name", *_SELECTORS, "executables", "allow_scripts", "run_as_users", "run_as_uids",
    "run_as_groups", "run_as_gids", "capabilities", "rlimits", "no_new_privs", "env_allow",
    "env_deny", "env_unsafe_allow", "max_children", "spawn_rate", "spawn_burst", "namespaces",
})
_LIMIT_KEYS = frozenset({"max_children", "spawn_rate", "spawn_burst"})
_TOP_KEYS = frozenset({"version", "limits", "allow"})


class _Loader:
    """Turns parsed TOML into rules, with every error naming file, table, field and line."""

    def __init__(self, text: str, filename: str, directory: Directory,
                 resolve_paths: bool) -> None:
        self.text = text
        self.filename = filename
        self.dir = directory
        self.resolve_paths = resolve_paths
        self.loc = _Locator(text)
        self.table = ""
        self.index = 0
        self.label = ""

    def fail(self, key: str | None, message: str) -> NoReturn:
        where = self.label or (f"[{self.table}]" if self.table else "top level")
        fld = f"{where}: {key}: " if key else f"{where}: "
        line = self.loc.line(self.table, self.index, key.split("[")[0] if key else None)
        raise PolicyFileError(fld + message, filename=self.filename, line=line,
                              table=self.table or None, field=key)

    def load(self) -> tuple[list[Rule], Limits]:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"line (\d+)", str(e))
            line = int(m.group(1)) if m else None
            if line is None and "end of document" in str(e):
                line = self.text.count("\n") + (not self.text.endswith("\n"))
            raise PolicyFileError(f"TOML syntax: {e}", filename=self.filename,
                                  line=line) from None
        for key in data:
            if key not in _TOP_KEYS:
                self.fail(key, f"unknown key (expected one of {sorted(_TOP_KEYS)})")
        if data.get("version", 1) != 1:
            self.fail("version", "only version = 1 is understood")
        limits = self._limits(data.get("limits", {}))
        allow = data.get("allow", [])
        if not isinstance(allow, list):
            self.fail("allow", "must be an array of tables: write [[allow]]")
        rules = [self._rule(i, t) for i, t in enumerate(allow)]
        return rules, limits

    def _limits(self, t: Any) -> Limits:
        self.table, self.index, self.label = "limits", 0, "[limits]"
        if not isinstance(t, dict):
            self.fail(None, "must be a table")
        for key in t:
            if key not in _LIMIT_KEYS:
                self.fail(key, f"unknown key (expected one of {sorted(_LIMIT_KEYS)})")
        mc, rate, burst = self._limit_values(t)
        self.table, self.label = "", ""
        return Limits(max_children=mc, spawn_rate=rate, spawn_burst=burst)

    def _limit_values(self, t: Mapping[str, Any]) -> tuple[int | None, float | None, int | None]:
        mc = self._int(t, "max_children", 0) if "max_children" in t else None
        rate = None
        if "spawn_rate" in t:
            v = t["spawn_rate"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                self.fail("spawn_rate", "must be a positive number (spawns per second)")
            rate = float(v)
        burst = self._int(t, "spawn_burst", 1) if "spawn_burst" in t else None
        if burst is not None and rate is None:
            self.fail("spawn_burst", "needs spawn_rate")
        return mc, rate, burst

    def _rule(self, i: int, t: Any) -> Rule:
        self.table, self.index = "allow", i
        self.label = f"[[allow]] #{i + 1}"
        if not isinstance(t, dict):
            self.fail(None, "must be a table")
        if "name" in t:
            if not isinstance(t["name"], str) or not t["name"]:
                self.fail("name", "must be a non-empty string")
            self.label += f" ({t['name']!r})"
        for key in t:
            if key not in _RULE_KEYS:
                self.fail(key, f"unknown key (expected one of {sorted(_RULE_KEYS)})")
        if not any(k in t for k in _SELECTORS):
            self.fail(None, f"selects nobody: give at least one of {', '.join(_SELECTORS)}")
        any_user, run_uids = self._ids(t, "run_as_users", "run_as_uids", self.dir.uid_of)
        any_group, run_gids = self._ids(t, "run_as_groups", "run_as_gids", self.dir.gid_of)
        _, uids = self._ids(t, "users", "uids", self.dir.uid_of, star=False)
        _, gids = self._ids(t, "groups", "gids", self.dir.gid_of, star=False)
        mc, rate, burst = self._limit_values(t)
        env_allow = self._patterns(t, "env_allow") if "env_allow" in t else None
        return Rule(
            label=self.label, everyone=self._bool(t, "everyone", False), uids=uids, gids=gids,
            executables=self._executables(t), allow_scripts=self._bool(t, "allow_scripts", True),
            run_as_uids=run_uids, run_as_any_user=any_user, run_as_gids=run_gids,
            run_as_any_group=any_group, capabilities=self._caps(t), rlimits=self._rlimits(t),
            no_new_privs_always=self._nnp(t), env_allow=env_allow,
            env_deny=self._patterns(t, "env_deny"),
            env_unsafe_allow=self._patterns(t, "env_unsafe_allow"),
            max_children=mc, spawn_rate=rate, spawn_burst=burst,
            namespaces=self._namespaces(t),
        )

    # -- field parsers
    def _list(self, t: Mapping[str, Any], key: str, kind: type) -> list[Any]:
        v = t.get(key, [])
        if not isinstance(v, list):
            self.fail(key, f"must be an array of {kind.__name__}")
        for j, x in enumerate(v):
            if not isinstance(x, kind) or isinstance(x, bool):
                self.fail(f"{key}[{j}]", f"must be a {kind.__name__}, not {x!r}")
        return v

    def _bool(self, t: Mapping[str, Any], key: str, default: bool) -> bool:
        v = t.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, "must be true or false")
        return v

    def _int(self, t: Mapping[str, Any], key: str, lo: int) -> int:
        v = t[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            self.fail(key, f"must be an integer >= {lo}")
        return v

    def _ids(self, t: Mapping[str, Any], names_key: str, ids_key: str,
             lookup: Any, star: bool = True) -> tuple[bool, frozenset[int]]:
        """Names (resolved now, so a typo fails at start) plus numbers; "*" means any."""
        out: set[int] = set()
        any_ = False
        for j, name in enumerate(self._list(t, names_key, str)):
            if name == "*" and star:
                any_ = True
                continue
            num = lookup(name)
            if num is None:
                self.fail(f"{names_key}[{j}]", f"no such {'user' if 'user' in names_key else 'group'}"
                          f" {name!r}")
            out.add(num)
        for j, num in enumerate(self._list(t, ids_key, int)):
            if not 0 <= num < 2**32 - 1:
                self.fail(f"{ids_key}[{j}]", f"{num} is not a valid id")
            out.add(num)
        return any_, frozenset(out)

    def _executables(self, t: Mapping[str, Any]) -> tuple[bytes, ...]:
        out = []
        for j, entry in enumerate(self._list(t, "executables", str)):
            if not entry.startswith("/") or "\0" in entry:
                self.fail(f"executables[{j}]", f"{entry!r} must be an absolute path "
                          "(a directory ends with '/')")
            is_dir = entry.endswith("/")
            path = os.path.realpath(entry) if self.resolve_paths else os.path.normpath(entry)
            if is_dir and not path.endswith("/"):
                path += "/"
            out.append(os.fsencode(path))
        return tuple(out)

    def _caps(self, t: Mapping[str, Any]) -> frozenset[str]:
        out = set()
        for j, name in enumerate(self._list(t, "capabilities", str)):
            try:
                out.add(caps.canonical(name))
            except KeyError:
                self.fail(f"capabilities[{j}]", f"unknown capability {name!r}")
        return frozenset(out)

    def _rlimits(self, t: Mapping[str, Any]) -> frozenset[int]:
        out = set()
        for j, name in enumerate(self._list(t, "rlimits", str)):
            if name == "*":
                out.update(RLIMITS.values())
                continue
            try:
                out.add(rlimit_number(name))
            except KeyError:
                self.fail(f"rlimits[{j}]", f"unknown rlimit {name!r} (known: "
                          f"{', '.join(RLIMITS)})")
        return frozenset(out)

    def _namespaces(self, t: Mapping[str, Any]) -> frozenset[str]:
        out = set()
        for j, name in enumerate(self._list(t, "namespaces", str)):
            if name == "*":
                out.update(P.NAMESPACES)
            elif name in P.NAMESPACES:
                out.add(name)
            else:
                self.fail(f"namespaces[{j}]", f"unknown namespace {name!r} (known: "
                          f"{', '.join(P.NAMESPACES)})")
        return frozenset(out)

    def _nnp(self, t: Mapping[str, Any]) -> bool:
        v = t.get("no_new_privs", "on_request")
        if v not in ("on_request", "always"):
            self.fail("no_new_privs", 'must be "on_request" or "always"')
        return v == "always"

    def _patterns(self, t: Mapping[str, Any], key: str) -> tuple[str, ...]:
        pats = self._list(t, key, str)
        for j, p in enumerate(pats):
            if not p or "=" in p:
                self.fail(f"{key}[{j}]", "must be a variable name or glob pattern (no '=')")
        return tuple(pats)


# ---------------------------------------------------------------------------- admission check
# ``spawnd check-config`` warns about a valid policy that would lock everyone out, or the
# daemon's own uid (then even ``spawnd status`` as that user is refused).

def admission_warnings(policy: Policy, daemon_uid: int,
                       accounts: Iterable[tuple[int, int]] | None = None) -> list[str]:
    """Warnings, as sentences, about who ``policy`` admits (empty: nothing to say).

    ``accounts`` is every (uid, primary gid) to consider (default: the passwd database);
    "admits nobody" means no rule selects any of them, nor ``everyone``.
    """
    out = []
    d = policy.directory
    gid = d.primary_gid(daemon_uid)
    if not policy.may_connect(Peer(uid=daemon_uid, gid=gid if gid is not None else -1, pid=0)):
        out.append(f"no rule admits uid {daemon_uid}, the uid the daemon runs as: its own "
                   "clients (spawnd ping/status as that user) will be refused")
    if not policy.rules:
        out.append("the policy has no [[allow]] rule: the daemon will refuse every client")
        return out
    if any(r.everyone or r.uids for r in policy.rules):
        return out
    if accounts is None:
        accounts = [(pw.pw_uid, pw.pw_gid) for pw in pwd.getpwall()]
    if not any(policy.may_connect(Peer(uid=u, gid=g, pid=0)) for u, g in accounts):
        out.append("no existing user is selected by any rule (their groups have no "
                   "members): the daemon will refuse every client")
    return out
