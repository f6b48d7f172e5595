/* scopewatch-relay: the native relay of `scopewatch wrap` (collectors/native_relay.py starts it).
 *
 * The Python wrapper starts the MCP server and the observer process, then hands this program the
 * descriptors: the client side (stdin/stdout), the server's stdin/stdout pipes, the write end of the
 * observer's copy pipe, the drop counters both share (a memfd, layout of collectors.tap.DropCounters)
 * and a SOCK_SEQPACKET control socket to the wrapper. Two threads relay, one per direction, each a
 * blocking read -> copy frame -> write loop: the same order, frames and loss accounting as the
 * Python relay (collectors/stdio.py + collectors/tap.py), without an interpreter on the call path.
 *
 * Copy frames (little-endian): kind u8 | length u32 | wall_ns i64 | mono_ns i64 | body.
 * kinds: 1 client -> server, 2 server -> client, 3 gap (direction u8, bytes u64, newlines u64,
 * ends_with_newline u8), 4 end of session.
 *
 * Each frame goes into the pipe with one non-blocking writev before its chunk is forwarded. A full
 * pipe is waited for at most PATIENCE_MS (-1: as long as it takes; the full-spool policy decides),
 * and the wrapper is asked to wake the observer; a chunk whose frame could not be started in that
 * time is still relayed but counted as lost (a gap frame precedes the next frame of its direction,
 * and the shared counters hold the same numbers). A frame once started is always finished.
 *
 * Control messages from the wrapper: 'E' wall i64 mono i64 timeout_ms i64 (outstanding gaps and the
 * end frame, then close; answered 'e' + ok u8), 'C' close the copy pipe (answered 'c'), 'R' with two
 * descriptors (a new observer's pipe and counters), 'G' (no observer any more), 'Q' exit.
 * To the wrapper: 'W' the pipe is full (wake the observer), 'B' the observer is gone (this thread
 * waits for 'R' or 'G'), 'S' the server's output has been relayed to its end.
 *
 * usage: scopewatch-relay PARENT_PID CTL IN OUT CHILD_IN CHILD_OUT TAP COUNTERS PATIENCE_MS
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536
#define C2S 1
#define S2C 2
#define GAP 3
#define END 4
#define HEAD 21
#define GAP_BODY 18
#define GAP_FRAME (HEAD + GAP_BODY)
#define COUNTERS_BYTES 48

struct gap {
    uint64_t nbytes, newlines;
    int ends_with_newline;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int tap_fd = -1, ctl_fd = -1;
static unsigned char *counters; /* COUNTERS_BYTES shared with the observer, or NULL */
static long patience_ms;
static int broken, closed_, gave_up, restart_asked;
static struct gap gaps[3] = {{0, 0, 1}, {0, 0, 1}, {0, 0, 1}};

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static void head(unsigned char *p, int kind, uint32_t length, int64_t wall, int64_t mono) {
    p[0] = (unsigned char)kind;
    put_u32(p + 1, length);
    put_u64(p + 5, (uint64_t)wall);
    put_u64(p + 13, (uint64_t)mono);
}
static void gap_frame(unsigned char *p, int direction) {
    struct gap *g = &gaps[direction];
    head(p, GAP, GAP_BODY, now_ns(CLOCK_REALTIME), now_ns(CLOCK_MONOTONIC));
    p[HEAD] = (unsigned char)direction;
    put_u64(p + HEAD + 1, g->nbytes);
    put_u64(p + HEAD + 9, g->newlines);
    p[HEAD + 17] = (unsigned char)(g->ends_with_newline ? 1 : 0);
}
static void ctl_send(char what) {
    (void)send(ctl_fd, &what, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

static uint64_t count_newlines(const unsigned char *data, size_t n) {
    uint64_t count = 0;
    const unsigned char *p = data, *end = data + n;
    while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        count++;
        p++;
    }
    return count;
}

/* The chunk was relayed but not handed over: count it (locked). */
static void drop(int direction, const unsigned char *chunk, size_t n) {
    uint64_t newlines = count_newlines(chunk, n);
    int ends = n > 0 && chunk[n - 1] == '\n';
    struct gap *g = &gaps[direction];
    g->nbytes += n;
    g->newlines += newlines;
    g->ends_with_newline = ends;
    if (counters != NULL) {
        unsigned char *c = counters + (direction == C2S ? 0 : 24);
        put_u64(c, get_u64(c) + newlines);
        put_u64(c + 8, get_u64(c + 8) + n);
        put_u64(c + 16, (uint64_t)ends);
    }
}

/* Drop the first n bytes of an iov array. */
static void advance(struct iovec **iov, int *count, size_t n) {
    while (n > 0 && *count > 0) {
        if (n >= (*iov)->iov_len) {
            n -= (*iov)->iov_len;
            (*iov)++;
            (*count)--;
        } else {
            (*iov)->iov_base = (char *)(*iov)->iov_base + n;
            (*iov)->iov_len -= n;
            n = 0;
        }
    }
    while (*count > 0 && (*iov)->iov_len == 0) {
        (*iov)++;
        (*count)--;
    }
}

/* Write every iov to the copy pipe (locked). 1: written; 0: nothing written, the pipe stayed full for
 * `patience` ms (< 0: no limit); -1: the observer is gone. */
static int tap_write(struct iovec *iov, int count, long patience) {
    if (broken || tap_fd < 0) return -1;
    int started = 0, waited = 0;
    int64_t deadline = -1;
    for (;;) {
        ssize_t n = writev(tap_fd, iov, count);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                broken = 1;
                return -1;
            }
            n = 0;
        }
        if (n > 0) started = 1;
        advance(&iov, &count, (size_t)n);
        if (count == 0) return 1;
        if (!waited) {
            waited = 1;
            ctl_send('W'); /* the observer reads on a timer: have the wrapper wake it now */
            if (patience >= 0) deadline = now_ns(CLOCK_MONOTONIC) + (int64_t)patience * 1000000LL;
        }
        int timeout = 1000;
        if (!started && deadline >= 0) { /* nothing of this frame written yet: may give up */
            int64_t left = deadline - now_ns(CLOCK_MONOTONIC);
            if (left <= 0) return 0;
            timeout = (int)((left + 999999) / 1000000);
        }
        struct pollfd pfd = {tap_fd, POLLOUT, 0};
        int ready = poll(&pfd, 1, timeout);
        if (ready > 0 && (pfd.revents & (POLLERR | POLLHUP | POLLNVAL))) {
            broken = 1;
            return -1;
        }
    }
}

static void close_tap(void) {
    if (!closed_) {
        closed_ = 1;
        if (tap_fd >= 0) close(tap_fd);
        tap_fd = -1;
        pthread_cond_broadcast(&changed);
    }
}

/* Hand a copy of `chunk` to the observer (or count it as lost), as collectors.tap.Tap.send. */
static void tap_send(int direction, const unsigned char *chunk, size_t n, int64_t wall, int64_t mono) {
    unsigned char gaphead[GAP_FRAME], framehead[HEAD];
    struct iovec iov[3];
    int count = 0;
    pthread_mutex_lock(&lock);
    struct gap *g = &gaps[direction];
    if (g->nbytes) {
        gap_frame(gaphead, direction);
        iov[count].iov_base = gaphead;
        iov[count++].iov_len = GAP_FRAME;
    }
    head(framehead, direction, (uint32_t)n, wall, mono);
    iov[count].iov_base = framehead;
    iov[count++].iov_len = HEAD;
    iov[count].iov_base = (void *)chunk;
    iov[count++].iov_len = n;
    int result = closed_ ? 0 : tap_write(iov, count, patience_ms);
    if (result == 1) {
        if (g->nbytes) {
            g->nbytes = g->newlines = 0;
            g->ends_with_newline = 1;
        }
    } else {
        drop(direction, chunk, n);
        if (result < 0 && !gave_up && !closed_) {
            /* the observer is gone: the wrapper starts another; wait for it as the Python relay does */
            if (!restart_asked) {
                restart_asked = 1;
                ctl_send('B');
            }
            while (broken && !closed_ && !gave_up) pthread_cond_wait(&changed, &lock);
        }
    }
    pthread_mutex_unlock(&lock);
}

static int write_all(int fd, const unsigned char *data, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, data, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

struct pump {
    int src, dst, direction, close_dst;
};

static void *pump(void *arg) {
    struct pump *p = arg;
    static unsigned char buffers[3][CHUNK];
    unsigned char *buf = buffers[p->direction];
    int dst = p->dst;
    for (;;) {
        ssize_t n = read(p->src, buf, CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        tap_send(p->direction, buf, (size_t)n, now_ns(CLOCK_REALTIME), now_ns(CLOCK_MONOTONIC));
        if (dst >= 0 && write_all(dst, buf, (size_t)n) < 0) {
            /* the other side is gone: keep draining so the child never blocks */
            if (p->close_dst) close(dst);
            dst = -1;
        }
    }
    if (p->close_dst && dst >= 0) close(dst);
    if (p->direction == S2C) ctl_send('S');
    return NULL;
}

static int timed_lock(long timeout_ms) {
    if (timeout_ms < 0) return pthread_mutex_lock(&lock) == 0;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    return pthread_mutex_timedlock(&lock, &until) == 0;
}

/* 'E': the outstanding gaps and the end frame, then close; 1 if done (0: no room for timeout_ms). */
static int end_session(int64_t wall, int64_t mono, long timeout_ms) {
    int64_t started = now_ns(CLOCK_MONOTONIC);
    if (!timed_lock(timeout_ms)) return 0;
    int ok = 0;
    if (!closed_) {
        unsigned char frames[2][GAP_FRAME], endhead[HEAD];
        struct iovec iov[3];
        int count = 0;
        for (int d = C2S; d <= S2C; d++) {
            if (gaps[d].nbytes) {
                gap_frame(frames[count], d);
                iov[count].iov_base = frames[count];
                iov[count].iov_len = GAP_FRAME;
                count++;
            }
        }
        head(endhead, END, 0, wall, mono);
        iov[count].iov_base = endhead;
        iov[count++].iov_len = HEAD;
        long left = timeout_ms;
        if (timeout_ms >= 0) {
            left = timeout_ms - (long)((now_ns(CLOCK_MONOTONIC) - started) / 1000000LL);
            if (left < 0) left = 0;
        }
        int result = tap_write(iov, count, left);
        if (result != 0 || broken) {
            for (int d = C2S; d <= S2C; d++) {
                gaps[d].nbytes = gaps[d].newlines = 0;
                gaps[d].ends_with_newline = 1;
            }
            close_tap();
            ok = 1;
        }
    }
    pthread_mutex_unlock(&lock);
    return ok;
}

static unsigned char *map_counters(int fd) {
    if (fd < 0) return NULL;
    void *m = mmap(NULL, COUNTERS_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return m == MAP_FAILED ? NULL : m;
}

static void reopen(int fd, int counters_fd) {
    pthread_mutex_lock(&lock);
    if (tap_fd >= 0) close(tap_fd);
    tap_fd = fd;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (counters != NULL) munmap(counters, COUNTERS_BYTES);
    counters = map_counters(counters_fd);
    broken = 0;
    restart_asked = 0;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
}

static void control(void) {
    for (;;) {
        unsigned char msg[64];
        union {
            char buf[CMSG_SPACE(2 * sizeof(int))];
            struct cmsghdr align;
        } cbuf;
        struct iovec iov = {msg, sizeof msg};
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.buf;
        mh.msg_controllen = sizeof cbuf.buf;
        ssize_t n = recvmsg(ctl_fd, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) _exit(0); /* the wrapper is gone */
        int fds[2] = {-1, -1}, nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < k; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                    if (nfds < 2) fds[nfds++] = fd;
                    else close(fd);
                }
            }
        }
        switch (msg[0]) {
        case 'E':
            if (n == 25) {
                char reply[2] = {'e', 0};
                reply[1] = (char)end_session((int64_t)get_u64(msg + 1), (int64_t)get_u64(msg + 9),
                                             (long)(int64_t)get_u64(msg + 17));
                (void)send(ctl_fd, reply, 2, MSG_NOSIGNAL);
            }
            break;
        case 'C':
            pthread_mutex_lock(&lock);
            close_tap();
            pthread_mutex_unlock(&lock);
            (void)send(ctl_fd, "c", 1, MSG_NOSIGNAL);
            break;
        case 'R':
            if (nfds == 2) {
                reopen(fds[0], fds[1]);
                fds[0] = fds[1] = -1;
            }
            break;
        case 'G':
            pthread_mutex_lock(&lock);
            gave_up = 1;
            pthread_cond_broadcast(&changed);
            pthread_mutex_unlock(&lock);
            break;
        case 'Q':
            _exit(0);
        default:
            break;
        }
        for (int i = 0; i < 2; i++)
            if (fds[i] >= 0) close(fds[i]);
    }
}

static int arg_int(const char *s, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end) return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    long a[9];
    if (argc != 10) {
        fprintf(stderr, "usage: scopewatch-relay PARENT CTL IN OUT CHILD_IN CHILD_OUT TAP COUNTERS PATIENCE_MS\n");
        return 2;
    }
    for (int i = 0; i < 9; i++) {
        if (arg_int(argv[i + 1], &a[i]) < 0) {
            fprintf(stderr, "scopewatch-relay: bad argument %d\n", i + 1);
            return 2;
        }
    }
    /* the wrapper forwards signals to the server; this process goes when the wrapper does */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if ((long)getppid() != a[0]) return 3;
    signal(SIGPIPE, SIG_IGN);
    int ignored[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++) signal((int)ignored[i], SIG_IGN);
    ctl_fd = (int)a[1];
    tap_fd = (int)a[6];
    fcntl(tap_fd, F_SETFL, fcntl(tap_fd, F_GETFL) | O_NONBLOCK);
    counters = map_counters((int)a[7]);
    patience_ms = a[8];
    static struct pump up, down;
    up = (struct pump){(int)a[2], (int)a[4], C2S, 1};
    down = (struct pump){(int)a[5], (int)a[3], S2C, 0};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t t1, t2;
    if (pthread_create(&t1, &attr, pump, &up) || pthread_create(&t2, &attr, pump, &down)) {
        fprintf(stderr, "scopewatch-relay: cannot start the relay threads\n");
        return 4;
    }
    control();
    return 0;
}
