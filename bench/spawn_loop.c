/* The machine's limit: a tight posix_spawn loop in C, /bin/true children, at most WINDOW
 * of them in flight (1 = spawn, wait, repeat). Compiled at run time by bench/throughput.py.
 *
 *     spawn_loop COUNT WINDOW    -> prints the elapsed nanoseconds on stdout
 */
#define _GNU_SOURCE
#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s COUNT WINDOW\n", argv[0]);
        return 2;
    }
    long count = strtol(argv[1], NULL, 10), window = strtol(argv[2], NULL, 10);
    if (count < 1 || window < 1) {
        fprintf(stderr, "COUNT and WINDOW must be >= 1\n");
        return 2;
    }
    char *child_argv[] = {"/bin/true", NULL};
    char *child_env[] = {"PATH=/usr/bin:/bin", NULL};
    long started = 0, done = 0, inflight = 0;
    long long t0 = now_ns();
    while (done < count) {
        while (inflight < window && started < count) {
            pid_t pid;
            int err = posix_spawn(&pid, "/bin/true", NULL, NULL, child_argv, child_env);
            if (err) {
                fprintf(stderr, "posix_spawn: %s\n", strerror(err));
                return 1;
            }
            started++;
            inflight++;
        }
        int status;
        if (waitpid(-1, &status, 0) < 0) {
            perror("waitpid");
            return 1;
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child failed: status %d\n", status);
            return 1;
        }
        done++;
        inflight--;
    }
    printf("%lld\n", now_ns() - t0);
    return 0;
}
