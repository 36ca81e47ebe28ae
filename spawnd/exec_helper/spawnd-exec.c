/* spawnd-exec: the small step between the daemon's posix_spawn and the child's exec.
 *
 * posix_spawn cannot change credentials, capabilities, hard rlimits, the nice value,
 * namespaces or the controlling terminal. The daemon (single-threaded, no fork) therefore
 * posix_spawns this program with the child's fds already in place, and it applies the rest
 * in a fixed order, then execs. Usage: spawnd-exec SPEC_FD STATUS_FD SPEC_LEN.
 *
 * The spec is SPEC_LEN bytes of NUL-terminated tokens on SPEC_FD: one letter, then a value
 * (numbers in decimal, lists comma-separated). Our environment is empty; the child's comes
 * in the spec, so nothing a client sends can reach the loader while we are still root.
 *
 * A failing stage writes "<stage> <errno>" to STATUS_FD (close-on-exec) and exits 127;
 * end-of-file with no data means the exec happened. spawnd/_trampoline.py is the Python
 * twin (the fallback where no C compiler exists): same tokens, same stages, same order.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>
#include <linux/capability.h>

#define MAX_SPEC (64u << 20)   /* argv + env are bounded by ARG_MAX long before this */
#define MAX_RLIMITS 64
#define MAX_GROUPS 65536       /* NGROUPS_MAX */

static int status_fd = -1;

static void fail(const char *stage, int err)
{
    char msg[64];
    int n = snprintf(msg, sizeof msg, "%s %d", stage, err ? err : EIO);
    if (status_fd >= 0 && n > 0)
        (void)!write(status_fd, msg, (size_t)n);
    _exit(127);
}

#define CHECK(cond, stage) do { if (!(cond)) fail(stage, errno); } while (0)

/* Parse one unsigned decimal; advance *p past it and one separator. */
static int num(const char **p, unsigned long long *out)
{
    char *end;
    if (**p < '0' || **p > '9')
        return -1;
    errno = 0;
    *out = strtoull(*p, &end, 10);
    if (errno || (*end && *end != ','))
        return -1;
    *p = *end ? end + 1 : end;
    return 0;
}

static long long snum(const char *p)  /* a signed decimal filling the whole token */
{
    char *end;
    errno = 0;
    long long v = strtoll(p, &end, 10);
    if (errno || *end || end == p)
        fail("spec", EINVAL);
    return v;
}

struct rl { int res; rlim_t soft, hard; };
static struct rl rl_pre[MAX_RLIMITS], rl_post[MAX_RLIMITS];
static gid_t groups[MAX_GROUPS];

static int rlimits_token(const char *p, struct rl *tab, int *n)
{
    unsigned long long r, s, h;
    if (*n >= MAX_RLIMITS || num(&p, &r) || num(&p, &s) || num(&p, &h) || *p)
        return -1;
    tab[*n].res = (int)r;
    tab[*n].soft = (rlim_t)s;
    tab[*n].hard = (rlim_t)h;
    (*n)++;
    return 0;
}

static void set_rlimits(const struct rl *tab, int n)
{
    for (int i = 0; i < n; i++) {
        struct rlimit lim = { tab[i].soft, tab[i].hard };
        CHECK(setrlimit(tab[i].res, &lim) == 0, "rlimits");
    }
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    CHECK(fd >= 0, "namespaces");
    ssize_t len = (ssize_t)strlen(text);
    CHECK(write(fd, text, (size_t)len) == len, "namespaces");
    close(fd);
}

/* A new user namespace in which we are root, mapped to our current uid/gid outside
 * (unshare --map-root-user). setgroups must be denied before an unprivileged gid_map. */
static void user_namespace(int flags)
{
    char map[64];
    uid_t uid = geteuid();
    gid_t gid = getegid();
    CHECK(unshare(CLONE_NEWUSER | flags) == 0, "namespaces");
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "0 %u 1\n", (unsigned)uid);
    write_file("/proc/self/uid_map", map);
    snprintf(map, sizeof map, "0 %u 1\n", (unsigned)gid);
    write_file("/proc/self/gid_map", map);
}

static void capset_masks(uint64_t eff, uint64_t prm, uint64_t inh)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2] = {
        { (uint32_t)eff, (uint32_t)prm, (uint32_t)inh },
        { (uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32) },
    };
    CHECK(syscall(SYS_capset, &hdr, data) == 0, "capabilities");
}

static uint64_t permitted_now(void)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    CHECK(syscall(SYS_capget, &hdr, data) == 0, "capabilities");
    return (uint64_t)data[0].permitted | ((uint64_t)data[1].permitted << 32);
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 127;
    int spec_fd = atoi(argv[1]);
    status_fd = atoi(argv[2]);
    unsigned long len = strtoul(argv[3], NULL, 10);
    if (fcntl(status_fd, F_SETFD, FD_CLOEXEC) != 0)
        return 127;
    if (len == 0 || len > MAX_SPEC)
        fail("spec", EINVAL);

    /* ---- read and parse the spec: one buffer, tokens parsed in place */
    char *buf = malloc(len + 1);
    CHECK(buf != NULL, "spec");
    for (size_t got = 0; got < len;) {
        ssize_t n = read(spec_fd, buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("spec", n ? errno : EPIPE);
        got += (size_t)n;
    }
    close(spec_fd);
    buf[len] = '\0';
    if (buf[len - 1] != '\0')
        fail("spec", EINVAL);

    size_t nargs = 0, nenv = 0;
    for (char *t = buf; t < buf + len; t += strlen(t) + 1)
        nargs += *t == 'A', nenv += *t == 'E';
    char **cargv = calloc(nargs + 1, sizeof *cargv);
    char **cenv = calloc(nenv + 1, sizeof *cenv);
    CHECK(cargv && cenv, "spec");

    int n_pre = 0, n_post = 0, ngroups = -1, ns_flags = 0, user_ns = 0, nnp = 0;
    int have_nice = 0, nice_val = 0, have_aff = 0, have_caps = 0, last_cap = -1;
    int cwd_fd = -1, ctty = -1, exec_fd = -1, script = 0, keep_signals = 0;
    long long uid = -1, gid = -1, umask_val = -1;
    uint64_t cap_mask = 0;
    const char *cwd = NULL, *check_path = NULL, *exec_path = NULL;
    cpu_set_t aff;
    CPU_ZERO(&aff);
    size_t ia = 0, ie = 0;

    for (char *t = buf; t < buf + len; t += strlen(t) + 1) {
        const char *v = t + 1;
        unsigned long long x;
        int bad = 0;
        switch (*t) {
        case 'A': cargv[ia++] = (char *)v; break;
        case 'E': cenv[ie++] = (char *)v; break;
        case 'r': bad = rlimits_token(v, rl_pre, &n_pre); break;
        case 'R': bad = rlimits_token(v, rl_post, &n_post); break;
        case 'n': have_nice = 1; nice_val = (int)snum(v); break;
        case 'a':
            have_aff = 1;
            while (*v && !(bad = num(&v, &x))) {
                if (x >= CPU_SETSIZE)
                    fail("affinity", EINVAL);
                CPU_SET((int)x, &aff);
            }
            break;
        case 'N': ns_flags = (int)snum(v); break;
        case 'U': user_ns = 1; break;
        case 'G':
            ngroups = 0;
            while (*v && !(bad = num(&v, &x) || ngroups >= MAX_GROUPS))
                groups[ngroups++] = (gid_t)x;
            if (ngroups >= MAX_GROUPS && *v)
                fail("groups", EINVAL);
            break;
        case 'g': gid = snum(v); break;
        case 'u': uid = snum(v); break;
        case 'c': have_caps = 1; cap_mask = (uint64_t)snum(v); break;
        case 'L': last_cap = (int)snum(v); break;
        case 'p': nnp = 1; break;
        case 'm': umask_val = snum(v); break;
        case 'd': cwd_fd = (int)snum(v); break;
        case 'D': cwd = v; break;
        case 't': ctty = (int)snum(v); break;
        case 'x': exec_fd = (int)snum(v); break;
        case 'P': exec_path = v; break;
        case 'C': check_path = v; break;
        case 'S': script = 1; break;
        case 'i': keep_signals = 1; break;
        default: bad = 1;
        }
        if (bad)
            fail("spec", EINVAL);
    }
    /* Something to run; and a re-open as the target user needs the checked file to match. */
    if (nargs == 0 || (exec_fd < 0 && !exec_path) || (check_path && exec_fd < 0))
        fail("spec", EINVAL);
    /* Our own fds must not reach the child. The checked file's identity is taken now. */
    struct stat want;
    if (exec_fd >= 0) {
        CHECK(fcntl(exec_fd, F_SETFD, FD_CLOEXEC) == 0, "spec");
        CHECK(fstat(exec_fd, &want) == 0, "spec");
    }
    if (cwd_fd >= 0)
        CHECK(fcntl(cwd_fd, F_SETFD, FD_CLOEXEC) == 0, "spec");

    /* ---- the stages, in order */
    set_rlimits(rl_pre, n_pre);                     /* with the daemon's privilege */
    if (have_nice) {
        errno = 0;
        CHECK(setpriority(PRIO_PROCESS, 0, nice_val) == 0, "nice");
    }
    if (have_aff)
        CHECK(sched_setaffinity(0, sizeof aff, &aff) == 0, "affinity");
    int switching = uid >= 0 || gid >= 0 || ngroups >= 0;
    if (user_ns && !switching)
        user_namespace(ns_flags);
    else if (ns_flags)
        CHECK(unshare(ns_flags) == 0, "namespaces");
    if (ns_flags & CLONE_NEWNS)
        CHECK(mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) == 0, "namespaces");
    if (ngroups >= 0)
        CHECK(setgroups((size_t)ngroups, groups) == 0, "groups");
    if (gid >= 0)
        CHECK(setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) == 0, "gid");
    if (have_caps && uid >= 0)
        CHECK(prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) == 0, "keep_caps");
    if (uid >= 0)
        CHECK(setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) == 0, "uid");
    if (user_ns && switching) {                     /* mapped to the target user */
        /* Writing our own maps needs us dumpable again (setresuid cleared it), which lets
         * the target user ptrace us: drop the fd root opened first (only its identity is
         * needed now: check_path is always set when switching). */
        if (exec_fd >= 0 && check_path) {
            close(exec_fd);
            exec_fd = -1;
        }
        CHECK(prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) == 0, "namespaces");
        user_namespace(0);
    }
    if (have_caps) {
        /* keep-caps kept the permitted set; make it effective to drop the bounding set */
        uint64_t prm = permitted_now();
        capset_masks(prm, prm, 0);
        for (int c = 0; c <= last_cap; c++)
            if (!(cap_mask >> c & 1))
                CHECK(prctl(PR_CAPBSET_DROP, c, 0, 0, 0) == 0, "capabilities");
        capset_masks(cap_mask, cap_mask, cap_mask);
        CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == 0, "capabilities");
        for (int c = 0; c <= last_cap; c++)
            if (cap_mask >> c & 1)
                CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0) == 0,
                      "capabilities");
    }
    set_rlimits(rl_post, n_post);                   /* as the child: only what it may */
    if (nnp)
        CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "no_new_privs");
    if (umask_val >= 0)
        umask((mode_t)umask_val);
    if (cwd_fd >= 0)
        CHECK(fchdir(cwd_fd) == 0, "cwd");
    if (cwd)
        CHECK(chdir(cwd) == 0, "cwd");
    if (ctty >= 0) {
        if (getsid(0) != getpid())
            CHECK(setsid() >= 0, "ctty");
        CHECK(ioctl(ctty, TIOCSCTTY, 0) == 0, "ctty");
        CHECK(tcsetpgrp(ctty, getpid()) == 0, "ctty");
    }

    /* ---- exec. With a credential switch the file is opened again here, as the target
     * user, so the kernel checks every search permission on its path with the child's
     * rights; it must be the very file the daemon's policy checked (exec_fd). */
    if (keep_signals) {
        signal(SIGPIPE, SIG_IGN);
        signal(SIGXFSZ, SIG_IGN);
    }
    int run_fd = exec_fd;
    if (check_path) {
        struct stat got;
        int fd = open(check_path, O_PATH | O_CLOEXEC);
        /* The daemon opened it a moment ago: gone now means "not the file checked". */
        if (fd < 0 && errno == ENOENT)
            fail("exec", EACCES);
        CHECK(fd >= 0, "exec");
        CHECK(fstat(fd, &got) == 0, "exec");
        if (want.st_dev != got.st_dev || want.st_ino != got.st_ino)
            fail("exec", EACCES);
        run_fd = fd;
    }
    if (script || run_fd < 0)
        execve(exec_path ? exec_path : check_path, cargv, cenv);  /* #! re-opens by name */
    else
        fexecve(run_fd, cargv, cenv);
    fail("exec", errno);
    return 127;
}
