"""spawnd.policy: schema validation, defaults, and decisions. Pure: a fake user database."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

from spawnd import caps
from spawnd import protocol as P
from spawnd.policy import (
    ROOT_DEFAULT_MAX_CHILDREN,
    DaemonIdentity,
    Grant,
    Peer,
    Policy,
    PolicyFileError,
    Refused,
    is_unsafe_env,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.toml"


class FakeDirectory:
    """alice(1000: dev, audio), bob(1001), www-data(33), app(900: app, dev), root(0)."""

    users = {"root": (0, 0), "alice": (1000, 1000), "bob": (1001, 1001),
             "www-data": (33, 33), "app": (900, 900)}
    groups = {"root": 0, "alice": 1000, "bob": 1001, "dev": 2000, "audio": 29,
              "www-data": 33, "app": 900, "ssl-cert": 103, "users": 100}
    members = {1000: (2000, 29), 900: (2000,), 33: (103,)}

    def uid_of(self, name: str) -> int | None:
        return self.users[name][0] if name in self.users else None

    def gid_of(self, name: str) -> int | None:
        return self.groups.get(name)

    def user_name(self, uid: int) -> str | None:
        return next((n for n, (u, _) in self.users.items() if u == uid), None)

    def primary_gid(self, uid: int) -> int | None:
        return next((g for u, g in self.users.values() if u == uid), None)

    def groups_of(self, uid: int, gid: int) -> tuple[int, ...]:
        if self.user_name(uid) is None:
            return (gid,)
        return tuple(dict.fromkeys((gid, *self.members.get(uid, ()))))


DIR = FakeDirectory()
ROOT = DaemonIdentity(uid=0, gid=0, groups=(0,), permitted=frozenset(caps.NUMBERS))
USER = DaemonIdentity(uid=1000, gid=1000, groups=(1000, 2000, 29))
ALICE = Peer(uid=1000, gid=1000, pid=4242)
BOB = Peer(uid=1001, gid=1001, pid=4343)
ROOTPEER = Peer(uid=0, gid=0, pid=1)
LS = b"/usr/bin/ls"


def req(**kw: object) -> P.Spawn:
    kw.setdefault("argv", (b"ls",))
    return P.Spawn(id=1, **kw)  # type: ignore[arg-type]


def pol(text: str, identity: DaemonIdentity = ROOT, **kw: object) -> Policy:
    return Policy.from_text(text, "test.toml", identity=identity, directory=DIR,
                            resolve_paths=kw.pop("resolve_paths", False))  # type: ignore[arg-type]


def refused(fn: object, *args: object, **kw: object) -> Refused:
    with pytest.raises(Refused) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value


# ---------------------------------------------------------------------------- the file

@pytest.mark.parametrize(("text", "line", "needle"), [
    ("[[allow]]\nusers = [\"alice\"\n", 2, "TOML syntax"),
    ("[[allow]]\nusers = [\"alice\" \"bob\"]\nuids = [1]\n", 2, "TOML syntax"),
    ("[[allow]]\nuids = [1]\n\n[[allow]]\nuids = [2]\nbogus = 1\n", 6, "[[allow]] #2: bogus"),
    ("[[allow]]\nname = \"web\"\nuids = [1]\ncapabilities = [\"CAP_NET_BIND_SERVICE\", "
     "\"CAP_FLY\"]\n", 4, "[[allow]] #1 ('web'): capabilities[1]: unknown capability 'CAP_FLY'"),
    ("[[allow]]\nusers = [\"mallory\"]\n", 2, "users[0]: no such user 'mallory'"),
    ("[[allow]]\nuids = [1]\nrun_as_groups = [\"nogroup\"]\n", 3, "no such group 'nogroup'"),
    ("[[allow]]\nexecutables = [\"/bin/\"]\n", 1, "selects nobody"),
    ("[[allow]]\nuids = [1]\nexecutables = [\"bin/ls\"]\n", 3, "must be an absolute path"),
    ("[[allow]]\nuids = [1]\nno_new_privs = true\n", 3, '"on_request" or "always"'),
    ("[[allow]]\nuids = [1]\nspawn_burst = 3\n", 3, "spawn_burst: needs spawn_rate"),
    ("[[allow]]\nuids = [\"1000\"]\n", 2, "uids[0]: must be a int"),
    ("[[allow]]\nuids = [1]\nrlimits = [\"NOFILE\", \"FILES\"]\n", 3, "unknown rlimit 'FILES'"),
    ("[[allow]]\nuids = [1]\nenv_deny = [\"A=B\"]\n", 3, "env_deny[0]"),
    ("version = 2\n", 1, "only version = 1"),
    ("allowed = []\n", 1, "allowed: unknown key"),
    ("[limits]\nmax_children = -1\n", 2, "[limits]: max_children: must be an integer >= 0"),
    ("[limits]\nspawn_rate = 0\n", 2, "spawn_rate: must be a positive number"),
])
def test_file_errors_name_field_and_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(PolicyFileError) as info:
        pol(text)
    e = info.value
    assert e.line == line, str(e)
    assert needle in str(e)
    assert str(e).startswith(f"test.toml:{line}: ")


def test_load_names_the_file_and_refuses_writable(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[[allow]]\nuids = [1000]\nexecutables = [\"/usr/bin/\"]\n")
    f.chmod(0o644)
    p = Policy.load(str(f), identity=ROOT, directory=DIR)
    assert p.may_connect(ALICE) and not p.may_connect(BOB)
    f.chmod(0o666)
    with pytest.raises(PolicyFileError, match="writable by group or others") as info:
        Policy.load(str(f), identity=ROOT, directory=DIR)
    assert info.value.filename == str(f)
    with pytest.raises(PolicyFileError, match="cannot read"):
        Policy.load(str(tmp_path / "missing.toml"))


def test_example_policy_loads() -> None:
    p = Policy.from_text(EXAMPLE.read_text(), str(EXAMPLE), identity=ROOT, directory=DIR)
    assert p.may_connect(ALICE)
    assert not p.may_connect(BOB)


# ---------------------------------------------------------------------------- defaults

def test_default_per_user_daemon() -> None:
    p = Policy.default(1000, identity=USER, directory=DIR)
    assert p.may_connect(ALICE) and not p.may_connect(BOB) and not p.may_connect(ROOTPEER)
    g = p.decide(ALICE, req(env=(b"LD_PRELOAD=x.so",)), LS)
    assert (g.uid, g.gid, g.groups, g.capabilities) == (None, None, None, ())
    assert not g.needs_trampoline
    assert p.decide(ALICE, req(user=1000), LS).uid is None  # as itself: always fine
    e = refused(p.decide, ALICE, req(user=1001), LS)
    assert (e.errno, e.field) == (errno.EPERM, "user")
    e = refused(p.decide, ALICE, req(capabilities=("CAP_NET_BIND_SERVICE",)), LS)
    assert (e.errno, e.field) == (errno.EPERM, "capabilities[0]")
    e = refused(p.decide, ALICE, req(capabilities=("CAP_TELEPORT",)), LS)
    assert (e.errno, e.field) == (errno.EINVAL, "capabilities[0]")
    e = refused(p.decide, BOB, req(), LS)
    assert e.errno == errno.EPERM
    g = p.decide(ALICE, req(rlimits={"NOFILE": (64, 64)}, no_new_privs=True), LS)
    assert g.needs_trampoline and not g.manages_capabilities
    assert g.rlimits == {resource.RLIMIT_NOFILE: (64, 64)} and not g.privileged_rlimits
    assert p.max_children(ALICE) is None and p.spawn_rate(ALICE) is None


def test_default_root_daemon_runs_each_peer_as_itself() -> None:
    p = Policy.default(0, identity=ROOT, directory=DIR)
    assert p.may_connect(ALICE) and p.may_connect(BOB)
    g = p.decide(ALICE, req(), LS)
    assert (g.uid, g.gid, g.groups, g.capabilities) == (1000, 1000, (1000, 2000, 29), ())
    assert g.needs_trampoline and g.manages_capabilities
    # Its own group and variables: nothing it does not already have, so no env refusal.
    g = p.decide(ALICE, req(group=2000, env=(b"LD_PRELOAD=x.so",)), LS)
    assert (g.uid, g.gid) == (1000, 2000)
    for kw, fld in [({"user": 0}, "user"), ({"user": 1001}, "user"), ({"group": 0}, "group"),
                    ({"extra_groups": (29, 0)}, "extra_groups[1]"),
                    ({"capabilities": ("CAP_NET_BIND_SERVICE",)}, "capabilities[0]")]:
        e = refused(p.decide, ALICE, req(**kw), LS)
        assert (e.errno, e.field) == (errno.EPERM, fld), kw
    g = p.decide(ROOTPEER, req(), LS)  # root asking for root: the daemon's own credentials
    assert (g.uid, g.gid, g.groups) == (None, None, None) and not g.needs_trampoline
    assert p.max_children(ALICE) == ROOT_DEFAULT_MAX_CHILDREN
    assert p.spawn_rate(ALICE) is None


def test_uids_without_passwd_entry() -> None:
    p = Policy.default(0, identity=ROOT, directory=DIR)
    ghost = Peer(uid=5555, gid=5555, pid=9)
    g = p.decide(ghost, req(), LS)
    assert (g.uid, g.gid, g.groups) == (5555, 5555, (5555,))
    p = pol('[[allow]]\nusers = ["alice"]\nexecutables = ["/"]\nrun_as_uids = [7777]\n'
            'run_as_groups = ["audio"]\n')
    e = refused(p.decide, ALICE, req(user=7777), LS)
    assert (e.errno, e.field) == (errno.EINVAL, "group")
    e = refused(p.decide, ALICE, req(user=7777, group=4444), LS)  # no groups of its own
    assert (e.errno, e.field) == (errno.EPERM, "group")
    g = p.decide(ALICE, req(user=7777, group=29), LS)
    assert (g.uid, g.gid, g.groups) == (7777, 29, (29,))


# ---------------------------------------------------------------------------- executables

def test_executables_files_and_directories() -> None:
    p = pol('[[allow]]\nusers = ["alice"]\nexecutables = ["/usr/bin/", "/opt/app/bin/tool"]\n')
    for ok in (b"/usr/bin/ls", b"/usr/bin/sub/dir/x", b"/opt/app/bin/tool"):
        assert p.decide(ALICE, req(), ok).executable == ok
    for bad in (b"/usr/binx/ls", b"/opt/app/bin/tool2", b"/opt/app/bin/other", b"/bin/ls"):
        e = refused(p.decide, ALICE, req(), bad)
        assert (e.errno, e.field) == (errno.EPERM, "argv[0]"), bad
    e = refused(p.decide, ALICE, req(executable=b"/usr/bin/../../etc/x"), b"/usr/bin/../../etc/x")
    assert (e.errno, e.field) == (errno.EINVAL, "executable")
    e = refused(p.decide, ALICE, req(), b"usr/bin/ls")
    assert e.errno == errno.EINVAL


def test_executable_entries_are_realpathed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "bin").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    text = f'[[allow]]\nusers = ["alice"]\nexecutables = ["{tmp_path}/link/bin/"]\n'
    p = pol(text, resolve_paths=True)
    assert p.decide(ALICE, req(), os.fsencode(real / "bin" / "tool"))
    # The server passes the real path of the opened fd: a symlink planted inside the
    # allowed directory that points elsewhere resolves outside it and is refused.
    e = refused(p.decide, ALICE, req(), os.fsencode(real / "other" / "tool"))
    assert e.errno == errno.EPERM


def test_scripts_can_be_refused() -> None:
    p = pol('[[allow]]\nusers = ["alice"]\nexecutables = ["/"]\nallow_scripts = false\n')
    assert p.decide(ALICE, req(), LS)
    e = refused(p.decide, ALICE, req(), b"/usr/bin/script.sh", is_script=True)
    assert "script" in e.message and e.field == "argv[0]"


# ---------------------------------------------------------------------------- run_as, caps

RUN_AS = """
[[allow]]
name = "web"
users = ["alice"]
executables = ["/usr/bin/"]
run_as_users = ["www-data"]
run_as_groups = ["ssl-cert", "dev"]
capabilities = ["CAP_NET_BIND_SERVICE"]
rlimits = ["NOFILE"]
"""


def test_run_as_another_user_gets_that_users_groups() -> None:
    p = pol(RUN_AS)
    g = p.decide(ALICE, req(user=33), LS)
    assert (g.uid, g.gid, g.groups) == (33, 33, (33, 103))
    assert g.rule.endswith("('web')")
    g = p.decide(ALICE, req(user=33, group=2000, extra_groups=(103, 103)), LS)
    assert (g.gid, g.groups) == (2000, (103,))
    e = refused(p.decide, ALICE, req(user=33, group=1000), LS)
    assert (e.errno, e.field) == (errno.EPERM, "group")
    e = refused(p.decide, ALICE, req(user=1001), LS)
    assert (e.errno, e.field) == (errno.EPERM, "user")
    assert "(rule [[allow]] #1 ('web'))" in e.message


def test_capabilities_granted_only_as_listed_and_held() -> None:
    p = pol(RUN_AS)
    g = p.decide(ALICE, req(capabilities=("net_bind_service", "CAP_NET_BIND_SERVICE")), LS)
    assert g.capabilities == ("CAP_NET_BIND_SERVICE",) and g.uid == 1000
    assert g.manages_capabilities
    e = refused(p.decide, ALICE, req(capabilities=("CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN")), LS)
    assert (e.errno, e.field) == (errno.EPERM, "capabilities[1]")
    weak = DaemonIdentity(uid=0, gid=0, permitted=frozenset({"CAP_SETUID"}))
    e = refused(pol(RUN_AS, identity=weak).decide, ALICE,
                req(capabilities=("CAP_NET_BIND_SERVICE",)), LS)
    assert "daemon itself does not hold" in e.message


def test_rlimits_privileged_only_when_listed() -> None:
    p = pol(RUN_AS)
    g = p.decide(ALICE, req(rlimits={"NOFILE": (10, -1), "rlimit_core": (0, 0)}), LS)
    assert g.rlimits == {resource.RLIMIT_NOFILE: (10, resource.RLIM_INFINITY),
                         resource.RLIMIT_CORE: (0, 0)}
    assert g.privileged_rlimits == {resource.RLIMIT_NOFILE}
    e = refused(p.decide, ALICE, req(rlimits={"FILES": (1, 1)}), LS)
    assert (e.errno, e.field) == (errno.EINVAL, "rlimits.FILES")
    e = refused(p.decide, ALICE, req(rlimits={"CPU": (5, 2)}), LS)
    assert (e.errno, e.field) == (errno.EINVAL, "rlimits.CPU")
    e = refused(p.decide, ALICE, req(rlimits={"CPU": (-1, 2)}), LS)
    assert e.errno == errno.EINVAL


def test_no_new_privs_on_request_or_always() -> None:
    p = pol(RUN_AS)
    assert not p.decide(ALICE, req(), LS).no_new_privs
    assert p.decide(ALICE, req(no_new_privs=True), LS).no_new_privs
    p = pol(RUN_AS + 'no_new_privs = "always"\n')
    assert p.decide(ALICE, req(), LS).no_new_privs


# ---------------------------------------------------------------------------- env

def test_unsafe_env_list() -> None:
    for name in ("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "LD_ANYTHING", "GCONV_PATH",
                 "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "NOTIFY_SOCKET", "LISTEN_PID",
                 "LISTEN_FDS", "LISTEN_FDNAMES", "PYTHONPATH", "PYTHONSTARTUP", "BASH_ENV",
                 "BASH_FUNC_x%%", "PERL5OPT", "NODE_OPTIONS", "TMPDIR"):
        assert is_unsafe_env(name), name
    for name in ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "USER", "LDX"):
        assert not is_unsafe_env(name), name


def test_unsafe_env_refused_when_child_gains_privilege() -> None:
    p = pol(RUN_AS)
    env = (b"PATH=/usr/bin", b"LD_PRELOAD=/tmp/evil.so")
    e = refused(p.decide, ALICE, req(user=33, env=env), LS)
    assert (e.errno, e.field) == (errno.EPERM, "env[1]") and "LD_PRELOAD" in e.message
    e = refused(p.decide, ALICE, req(capabilities=("CAP_NET_BIND_SERVICE",), env=env), LS)
    assert e.field == "env[1]"
    e = refused(p.decide, ALICE, req(group=103, env=(b"GLIBC_TUNABLES=x",)), LS)
    assert e.field == "env[0]"  # a group alice does not have
    assert p.decide(ALICE, req(env=env), LS).env == env  # as herself: her business
    root_rule = pol('[[allow]]\nuids = [0]\nexecutables = ["/"]\nrun_as_users = ["*"]\n')
    assert root_rule.decide(ROOTPEER, req(user=33, env=env), LS).uid == 33


def test_env_allow_deny_and_unsafe_exceptions() -> None:
    p = pol(RUN_AS + 'env_allow = ["PATH", "LANG", "LC_*", "TMPDIR"]\nenv_deny = ["LC_SECRET"]\n'
            'env_unsafe_allow = ["TMPDIR"]\n')
    assert p.decide(ALICE, req(user=33, env=(b"PATH=/x", b"LC_ALL=C", b"TMPDIR=/t")), LS)
    e = refused(p.decide, ALICE, req(env=(b"LANG=C", b"HOME=/h")), LS)
    assert (e.field, e.errno) == ("env[1]", errno.EPERM) and "env_allow" in e.message
    e = refused(p.decide, ALICE, req(env=(b"LC_SECRET=1",)), LS)
    assert "env_deny" in e.message


# ---------------------------------------------------------------------------- combination

def test_rules_do_not_add_up_and_report_the_closest_refusal() -> None:
    p = pol("""
[[allow]]
users = ["alice"]
executables = ["/usr/bin/"]

[[allow]]
groups = ["dev"]
executables = ["/opt/svc/"]
capabilities = ["CAP_NET_BIND_SERVICE"]
max_children = 5
spawn_rate = 2.5
""")
    netcap = ("CAP_NET_BIND_SERVICE",)
    assert p.decide(ALICE, req(capabilities=netcap), b"/opt/svc/d").capabilities == netcap
    e = refused(p.decide, ALICE, req(capabilities=netcap), LS)
    assert e.field == "capabilities[0]" and "#1" in e.message  # got furthest in rule 1
    e = refused(p.decide, ALICE, req(), b"/etc/passwd")
    assert e.field == "argv[0]"
    app = Peer(uid=900, gid=900, pid=1)  # member of dev through the group database
    assert p.may_connect(app) and not p.may_connect(BOB)
    assert p.decide(app, req(), b"/opt/svc/d").uid == 900
    assert p.max_children(ALICE) == 5 and p.spawn_rate(ALICE) == (2.5, 3)


def test_limits_table_is_the_default() -> None:
    p = pol("""
[limits]
max_children = 50
spawn_rate = 10
spawn_burst = 40

[[allow]]
everyone = true
executables = ["/"]

[[allow]]
uids = [1000]
max_children = 7
""")
    assert p.max_children(BOB) == 50 and p.spawn_rate(BOB) == (10.0, 40)
    assert p.max_children(ALICE) == 7  # the largest any selecting rule sets
    assert p.spawn_rate(ALICE) == (10.0, 40)


def test_grant_needs_trampoline() -> None:
    base = Grant(executable=LS, argv=(b"ls",), env=())
    assert not base.needs_trampoline and not base.manages_capabilities
    assert Grant(executable=LS, argv=(b"ls",), env=(), umask=0o77).needs_trampoline is False
    for kw in ({"uid": 1}, {"gid": 1}, {"groups": ()}, {"capabilities": ("CAP_KILL",)},
               {"rlimits": {resource.RLIMIT_CORE: (0, 0)}}, {"no_new_privs": True}):
        assert Grant(executable=LS, argv=(b"ls",), env=(), **kw).needs_trampoline, kw


def test_path_agnostic_only_when_no_rule_looks_at_the_executable() -> None:
    """issue 12: the server skips opening the file only when no decision could differ."""
    assert Policy.default(0, identity=ROOT, directory=DIR).path_agnostic
    assert Policy.default(1000, identity=USER, directory=DIR).path_agnostic
    anything = '[[allow]]\nusers = ["alice"]\nexecutables = ["/"]\n'
    assert pol(anything).path_agnostic
    for text in ('[[allow]]\nusers = ["alice"]\nexecutables = ["/usr/bin/"]\n',
                 anything + "allow_scripts = false\n",
                 anything + '[[allow]]\nusers = ["bob"]\nexecutables = ["/usr/bin/ls"]\n'):
        p = pol(text)
        assert not p.path_agnostic
        with pytest.raises(ValueError):
            p.decide(ALICE, req(), None)
    g = pol(anything).decide(ALICE, req(), None)
    assert g.executable is None and g.argv == (b"ls",)
