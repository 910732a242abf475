/* The benchmark's CoAP clients, in C so that they cost the machine as little CPU as possible:
 * the servers under test share its cores with them (bench/README.md, "The load generators").
 *
 *   coapload gets  ...  closed-loop small GETs (bench/run.py, flood.py, soak.py, fleet.py)
 *   coapload fleet ...  simulated devices downloading an image block by block (fleet.py)
 *
 * Each prints one JSON object on stdout; bench/coapload.py builds this file. Only what the
 * benchmark sends and reads is encoded or parsed here. */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CON 0
#define NON 1
#define ACK 2
#define RST 3
#define CODE_GET 0x01
#define CODE_VALID 0x43
#define CODE_CONTENT 0x45
#define CODE_REQUEST_ENTITY_INCOMPLETE 0x88
#define OPT_ETAG 4
#define OPT_URI_PATH 11
#define OPT_BLOCK2 23
#define TOKEN_LENGTH 4
#define MAX_DATAGRAM 2048
#define MAX_REQUEST 512

/* ---- clocks, CPU, process tree ------------------------------------------------------------ */

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double real(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double self_cpu(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6 + r.ru_stime.tv_sec +
           r.ru_stime.tv_usec * 1e-6;
}

static void nap(double seconds) {
    struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&ts, NULL);
}

/* utime + stime + cutime + cstime of one process, in clock ticks (0 if it is gone) */
static long long proc_ticks(int pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    /* fields after the command: state(3) ... utime(14) stime(15) cutime(16) cstime(17) */
    long long v[17] = {0};
    int field = 2;
    char *save;
    for (char *tok = strtok_r(p + 1, " ", &save); tok && field < 17; tok = strtok_r(NULL, " ", &save)) {
        field++;
        v[field - 1] = atoll(tok);
    }
    return v[13] + v[14] + v[15] + v[16];
}

/* CPU seconds of a process and all its descendants (as bench/proctree.py counts them) */
static long long tree_ticks(int pid, int depth) {
    long long total = proc_ticks(pid);
    if (depth > 16) return total;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *tasks = opendir(path);
    if (!tasks) return total;
    struct dirent *t;
    while ((t = readdir(tasks))) {
        if (t->d_name[0] == '.') continue;
        char cpath[320], buf[4096];
        snprintf(cpath, sizeof cpath, "/proc/%d/task/%s/children", pid, t->d_name);
        int fd = open(cpath, O_RDONLY);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        buf[n] = 0;
        char *save;
        for (char *tok = strtok_r(buf, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save))
            total += tree_ticks(atoi(tok), depth + 1);
    }
    closedir(tasks);
    return total;
}

static double tree_cpu(int pid) { return pid > 0 ? tree_ticks(pid, 0) / (double)sysconf(_SC_CLK_TCK) : 0; }

/* ---- CoAP encoding and parsing ------------------------------------------------------------ */

static size_t put_option(uint8_t *out, int delta, const uint8_t *value, size_t length) {
    size_t i = 1;
    int dn = delta, ln = (int)length;
    if (delta >= 269) { dn = 14; out[i++] = (uint8_t)((delta - 269) >> 8); out[i++] = (uint8_t)(delta - 269); }
    else if (delta >= 13) { dn = 13; out[i++] = (uint8_t)(delta - 13); }
    if (length >= 269) { ln = 14; out[i++] = (uint8_t)((length - 269) >> 8); out[i++] = (uint8_t)(length - 269); }
    else if (length >= 13) { ln = 13; out[i++] = (uint8_t)(length - 13); }
    out[0] = (uint8_t)(dn << 4 | ln);
    memcpy(out + i, value, length);
    return i + length;
}

static size_t put_uint(uint8_t *out, uint32_t v) {
    size_t n = 0;
    for (int shift = 24; shift >= 0; shift -= 8)
        if (n || (v >> shift) & 0xFF) out[n++] = (uint8_t)(v >> shift);
    return n; /* 0 is the empty string */
}

/* A GET with a 4-byte token: [ETag], Uri-Path segments of `path` ("a/b"), [Block2]. Message ID
 * and token are patched in at bytes 2-3 and 4-7. Returns the length, 0 if it does not fit. */
static size_t encode_get(uint8_t *out, int mtype, const char *path, const uint8_t *etag,
                         size_t etag_length, int block_num, int szx) {
    size_t n = 8;
    int last = 0;
    out[0] = (uint8_t)(0x40 | mtype << 4 | TOKEN_LENGTH);
    out[1] = CODE_GET;
    memset(out + 2, 0, 6);
    if (etag) {
        n += put_option(out + n, OPT_ETAG - last, etag, etag_length);
        last = OPT_ETAG;
    }
    const char *seg = path;
    while (*path) {
        const char *slash = strchr(seg, '/');
        size_t len = slash ? (size_t)(slash - seg) : strlen(seg);
        if (n + len + 8 > MAX_REQUEST) return 0;
        n += put_option(out + n, OPT_URI_PATH - last, (const uint8_t *)seg, len);
        last = OPT_URI_PATH;
        if (!slash) break;
        seg = slash + 1;
    }
    if (block_num >= 0) {
        uint8_t v[4];
        size_t len = put_uint(v, (uint32_t)block_num << 4 | (uint32_t)szx);
        n += put_option(out + n, OPT_BLOCK2 - last, v, len);
    }
    return n;
}

/* Message ID and the 4-byte token into a message encode_get made */
static void set_id(uint8_t *raw, int mid, uint32_t token) {
    raw[2] = (uint8_t)(mid >> 8);
    raw[3] = (uint8_t)mid;
    raw[4] = (uint8_t)(token >> 24);
    raw[5] = (uint8_t)(token >> 16);
    raw[6] = (uint8_t)(token >> 8);
    raw[7] = (uint8_t)token;
}

struct response {
    int mtype, code, mid;
    const uint8_t *token;
    int token_length;
    const uint8_t *etag;
    int etag_length, has_block2;
    uint32_t block2;
    const uint8_t *payload;
    size_t payload_length;
};

/* 0 on success, -1 for a datagram that is not a well-formed CoAP message */
static int parse(const uint8_t *d, size_t n, struct response *r) {
    memset(r, 0, sizeof *r);
    if (n < 4 || d[0] >> 6 != 1) return -1;
    r->mtype = d[0] >> 4 & 3;
    r->token_length = d[0] & 0x0F;
    r->code = d[1];
    r->mid = d[2] << 8 | d[3];
    size_t i = 4 + (size_t)r->token_length;
    if (r->token_length > 8 || i > n) return -1;
    r->token = d + 4;
    int number = 0;
    while (i < n && d[i] != 0xFF) {
        int delta = d[i] >> 4, length = d[i] & 0x0F;
        i++;
        if (delta == 13) { if (i >= n) return -1; delta = 13 + d[i++]; }
        else if (delta == 14) { if (i + 1 >= n) return -1; delta = 269 + (d[i] << 8 | d[i + 1]); i += 2; }
        else if (delta == 15) return -1;
        if (length == 13) { if (i >= n) return -1; length = 13 + d[i++]; }
        else if (length == 14) { if (i + 1 >= n) return -1; length = 269 + (d[i] << 8 | d[i + 1]); i += 2; }
        else if (length == 15) return -1;
        if (i + (size_t)length > n) return -1;
        number += delta;
        if (number == OPT_ETAG && !r->etag) { r->etag = d + i; r->etag_length = length; }
        if (number == OPT_BLOCK2 && length <= 3) {
            r->has_block2 = 1;
            r->block2 = 0;
            for (int k = 0; k < length; k++) r->block2 = r->block2 << 8 | d[i + k];
        }
        i += (size_t)length;
    }
    if (i < n) { r->payload = d + i + 1; r->payload_length = n - i - 1; }
    return 0;
}

static int hex_decode(const char *hex, uint8_t *out, size_t room) {
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > room) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (uint8_t)v;
    }
    return (int)(n / 2);
}

/* ---- small helpers ------------------------------------------------------------------------ */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("coapload: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *zalloc(size_t count, size_t item) {
    void *p = calloc(count ? count : 1, item);
    if (!p) die("out of memory");
    return p;
}

static void *grow(void *p, size_t *capacity, size_t need, size_t item) {
    if (need <= *capacity) return p;
    size_t c = *capacity ? *capacity : 1024;
    while (c < need) c *= 2;
    p = realloc(p, c * item);
    if (!p) die("out of memory");
    *capacity = c;
    return p;
}

static int udp_socket(const struct sockaddr_in *to, int timestamps) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    int on = 1;
    if (timestamps) setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
    if (connect(fd, (const struct sockaddr *)to, sizeof *to) < 0) die("connect: %s", strerror(errno));
    return fd;
}

static void raise_nofile(size_t need) {
    struct rlimit r;
    getrlimit(RLIMIT_NOFILE, &r);
    if (r.rlim_cur < need) {
        r.rlim_cur = need < r.rlim_max ? need : r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

/* When the kernel received the datagram (SO_TIMESTAMPNS, CLOCK_REALTIME), on the monotonic
 * clock; `fallback` if the message carries no timestamp. */
static double arrival(struct msghdr *m, double real_minus_mono, double fallback) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return ts.tv_sec + ts.tv_nsec * 1e-9 - real_minus_mono;
        }
    }
    return fallback;
}

static ssize_t receive(int fd, uint8_t *buf, size_t room, double real_minus_mono, double woke,
                       double *when) {
    union { char space[CMSG_SPACE(sizeof(struct timespec))]; struct cmsghdr align; } control;
    struct iovec iov = {buf, room};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                       .msg_controllen = sizeof control.space};
    ssize_t n = recvmsg(fd, &m, MSG_DONTWAIT);
    if (n >= 0) *when = arrival(&m, real_minus_mono, woke);
    return n;
}

/* JSON string: printable ASCII kept, the rest as \u00XX */
static void json_string(FILE *out, const char *s) {
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(out, "\\%c", *p);
        else if (*p < 0x20 || *p > 0x7E) fprintf(out, "\\u%04x", *p);
        else fputc(*p, out);
    }
    fputc('"', out);
}

static void json_number(FILE *out, double v, int valid) {
    if (valid) fprintf(out, "%.17g", v); /* full precision: monotonic times run to 10**6 s and more */
    else fputs("null", out);
}

/* ---- gets: closed-loop small GETs --------------------------------------------------------- */

#define MAX_REQUESTS 60000 /* per socket, below 2**16 Message IDs: none may look like a duplicate */
#define LOSS_TIMEOUT 1.0   /* a request unanswered this long is counted lost and replaced */
#define RING 262144        /* outstanding requests by token; an entry still there when its
                              slot comes round again (262,144 requests later, many seconds at
                              any rate reached here) is counted lost */

struct slot { int fd, mid, sent, window; };
struct retired { int fd; double at; };
struct pending { uint32_t token; int slot; double sent; int live; };

struct gets {
    struct sockaddr_in to;
    int server_pid, window, requests, sockets, warmup, timed, etag_mode;
    double seconds, max_time, tick;
    uint8_t (*templates)[MAX_REQUEST];
    size_t *template_length;
    int paths;
    struct slot *slots;
    int slot_count;
    int *fds;
    int fd_count;
    size_t fds_room;
    struct retired *retired;
    size_t retired_count, retired_room;
    int ep;
    struct pending *ring;
    uint32_t counter;
    long outstanding, other, lost, done, measured_ok, send_limit;
    int measuring;
    double cpu0, srv0, t0, send_end;
    float *lat;
    size_t lat_count, lat_room;
};

static void gets_watch(struct gets *g, int slot) {
    int fd = g->slots[slot].fd;
    g->fds = grow(g->fds, &g->fds_room, (size_t)g->fd_count + 1, sizeof(int));
    g->fds[g->fd_count++] = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(g->ep, EPOLL_CTL_ADD, fd, &ev);
}

static void gets_finished(struct gets *g, int slot, double now);

/* A replaced socket is still read for late answers, and closed once none can be pending. */
static void retire(struct gets *g, int fd, double now) {
    g->retired = grow(g->retired, &g->retired_room, g->retired_count + 1, sizeof *g->retired);
    g->retired[g->retired_count++] = (struct retired){fd, now};
}

static void close_retired(struct gets *g, double now) {
    size_t kept = 0;
    for (size_t i = 0; i < g->retired_count; i++) {
        struct retired r = g->retired[i];
        if (now - r.at > 2 * LOSS_TIMEOUT) {
            epoll_ctl(g->ep, EPOLL_CTL_DEL, r.fd, NULL);
            close(r.fd);
            for (int k = 0; k < g->fd_count; k++)
                if (g->fds[k] == r.fd) g->fds[k] = -1;
        } else {
            g->retired[kept++] = r;
        }
    }
    g->retired_count = kept;
}

static void gets_send(struct gets *g, int slot, double now) {
    if ((!g->timed && (long)g->counter >= g->send_limit) || now >= g->send_end) return;
    struct slot *s = &g->slots[slot];
    if (s->sent >= MAX_REQUESTS) { /* a fresh source port; the old one is still read */
        retire(g, s->fd, now);
        s->fd = udp_socket(&g->to, g->tick > 0);
        s->sent = 0;
        gets_watch(g, slot);
    }
    uint32_t token = ++g->counter;
    struct pending *p = &g->ring[token % RING];
    if (p->live) { /* outstanding for RING requests: lost long ago */
        p->live = 0;
        g->outstanding--;
        g->lost++;
        g->done++;
    }
    uint8_t *raw = g->templates[token % (uint32_t)g->paths];
    size_t len = g->template_length[token % (uint32_t)g->paths];
    s->mid = (s->mid + 1) & 0xFFFF;
    s->sent++;
    set_id(raw, s->mid, token);
    *p = (struct pending){token, slot, now, 1};
    g->outstanding++;
    send(s->fd, raw, len, MSG_DONTWAIT); /* a full buffer: the request is lost and replaced */
}

static void gets_finished(struct gets *g, int slot, double now) {
    g->done++;
    if (!g->measuring && g->done >= g->warmup) {
        g->measuring = 1;
        g->cpu0 = self_cpu();
        g->srv0 = tree_cpu(g->server_pid);
        g->t0 = mono();
        if (g->timed) g->send_end = g->t0 + g->seconds;
    }
    gets_send(g, slot, now);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static int gets_main(int argc, char **argv) {
    struct gets g = {0};
    const char *host = "127.0.0.1", *type = "con", *etag_hex = NULL;
    int port = 0;
    g.window = 1; g.requests = 3000; g.sockets = 1; g.warmup = 200; g.max_time = 20;
    static const struct option options[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"server-pid", 1, 0, 'P'},
        {"window", 1, 0, 'w'}, {"requests", 1, 0, 'n'}, {"seconds", 1, 0, 's'},
        {"sockets", 1, 0, 'S'}, {"warmup", 1, 0, 'W'}, {"max-time", 1, 0, 'm'},
        {"type", 1, 0, 't'}, {"etag", 1, 0, 'e'}, {"tick", 1, 0, 'k'}, {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (c) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': g.server_pid = atoi(optarg); break;
        case 'w': g.window = atoi(optarg); break;
        case 'n': g.requests = atoi(optarg); break;
        case 's': g.seconds = atof(optarg); break;
        case 'S': g.sockets = atoi(optarg); break;
        case 'W': g.warmup = atoi(optarg); break;
        case 'm': g.max_time = atof(optarg); break;
        case 't': type = optarg; break;
        case 'e': etag_hex = optarg; break;
        case 'k': g.tick = atof(optarg); break;
        default: die("gets: unknown option");
        }
    }
    g.paths = argc - optind;
    if (!port || g.paths < 1 || g.window < 1) die("gets: --port, --window >= 1 and paths are needed");
    g.to.sin_family = AF_INET;
    g.to.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &g.to.sin_addr) != 1) die("gets: --host must be an IPv4 address");
    uint8_t etag[8];
    int etag_length = 0;
    if (etag_hex && (etag_length = hex_decode(etag_hex, etag, sizeof etag)) < 0) die("gets: bad --etag");
    g.etag_mode = etag_hex != NULL;
    int mtype = strcmp(type, "non") ? CON : NON;
    g.templates = zalloc((size_t)g.paths, MAX_REQUEST);
    g.template_length = zalloc((size_t)g.paths, sizeof(size_t));
    for (int i = 0; i < g.paths; i++) {
        g.template_length[i] = encode_get(g.templates[i], mtype, argv[optind + i],
                                          g.etag_mode ? etag : NULL, (size_t)etag_length, -1, 0);
        if (!g.template_length[i]) die("gets: path too long: %s", argv[optind + i]);
    }
    int ok_code = g.etag_mode ? CODE_VALID : CODE_CONTENT;
    g.timed = g.seconds > 0;
    g.send_limit = (long)g.warmup + g.requests + g.window;
    g.send_end = 1e300;
    g.ring = zalloc(RING, sizeof *g.ring);
    g.ep = epoll_create1(EPOLL_CLOEXEC);
    /* each slot its own share of the window: a closed loop of its own (see bench/coapload.py) */
    g.slot_count = g.sockets < g.window ? (g.sockets > 0 ? g.sockets : 1) : g.window;
    g.slots = zalloc((size_t)g.slot_count, sizeof *g.slots);
    raise_nofile((size_t)g.slot_count * 4 + 64);
    uint16_t seed = (uint16_t)(getpid() * 2654435761u);
    for (int i = 0; i < g.slot_count; i++) {
        g.slots[i] = (struct slot){udp_socket(&g.to, g.tick > 0), (seed + i * 9973) & 0xFFFF, 0,
                                   g.window / g.slot_count + (i < g.window % g.slot_count)};
        gets_watch(&g, i);
    }
    double hard_end = mono() + g.max_time, now = mono();
    for (int i = 0; i < g.slot_count; i++)
        for (int k = 0; k < g.slots[i].window; k++) gets_send(&g, i, now);
    int timed_out = 0;
    double next_loss_check = now + LOSS_TIMEOUT / 4;
    struct epoll_event events[256];
    uint8_t buf[MAX_DATAGRAM];
    while (g.timed || !g.measuring || g.done < (long)g.warmup + g.requests) {
        now = mono();
        if (now >= hard_end) { timed_out = 1; break; }
        int n = epoll_wait(g.ep, events, 256, 50);
        double woke = mono(), real_minus_mono = real() - woke;
        for (int e = 0; e < n; e++) {
            int fd = events[e].data.fd;
            for (;;) {
                double arrived;
                ssize_t len = receive(fd, buf, sizeof buf, real_minus_mono, woke, &arrived);
                if (len < 0) {
                    if (errno == ECONNREFUSED) g.other++;
                    break;
                }
                if (len < 8 || (buf[0] & 0x0F) != TOKEN_LENGTH) continue;
                uint32_t token = (uint32_t)buf[4] << 24 | buf[5] << 16 | buf[6] << 8 | buf[7];
                struct pending *p = &g.ring[token % RING];
                if (!p->live || p->token != token) continue;
                p->live = 0;
                g.outstanding--;
                now = mono();
                if (!g.tick) arrived = now; /* no timestamps asked for: read at once anyway */
                if (buf[1] == ok_code) {
                    if (g.measuring) {
                        g.measured_ok++;
                        g.lat = grow(g.lat, &g.lat_room, g.lat_count + 1, sizeof(float));
                        g.lat[g.lat_count++] = (float)(arrived - p->sent);
                    }
                } else {
                    g.other++;
                }
                gets_finished(&g, p->slot, now);
            }
        }
        now = mono();
        if (now >= next_loss_check) {
            next_loss_check = now + LOSS_TIMEOUT / 4;
            close_retired(&g, now);
            for (int i = 0; i < RING; i++) {
                struct pending *p = &g.ring[i];
                if (p->live && now - p->sent > LOSS_TIMEOUT) {
                    p->live = 0;
                    g.outstanding--;
                    g.lost++;
                    gets_finished(&g, p->slot, now);
                }
            }
        }
        if (!g.outstanding && ((!g.timed && (long)g.counter >= g.send_limit) || now >= g.send_end)) break;
        if (g.tick > 0) {
            double rest = woke + g.tick - mono();
            if (rest > 0) nap(rest);
        }
    }
    double t1 = mono();
    int sockets_used = 0;
    for (int i = 0; i < g.fd_count; i++) {
        sockets_used++;
        if (g.fds[i] >= 0) close(g.fds[i]);
    }
    if (!g.measuring) {
        printf("{\"error\": \"warm-up not finished in %g s\"}\n", g.max_time);
        return 0;
    }
    double cpu1 = self_cpu(), srv1 = tree_cpu(g.server_pid), elapsed = t1 - g.t0;
    if (g.lat_count) qsort(g.lat, g.lat_count, sizeof(float), cmp_float);
    int any = g.measured_ok > 0;
    printf("{\"rate\": %.9g, \"ok\": %ld, \"other\": %ld, \"lost\": %ld, \"elapsed\": %.9g, "
           "\"t0\": %.9f, \"t1\": %.9f, \"server_cpu\": [%.9g, %.9g], \"client_cpu\": %.9g, "
           "\"sockets_used\": %d, \"timed_out\": %s, \"client_cpu_per_req_us\": ",
           g.measured_ok / elapsed, g.measured_ok, g.other, g.lost, elapsed, g.t0, t1, g.srv0,
           srv1, cpu1 - g.cpu0, sockets_used, timed_out ? "true" : "false");
    json_number(stdout, (cpu1 - g.cpu0) / (double)g.measured_ok * 1e6, any);
    fputs(", \"server_cpu_per_req_us\": ", stdout);
    json_number(stdout, (srv1 - g.srv0) / (double)g.measured_ok * 1e6, any);
    fputs(", \"latency_median_ms\": ", stdout);
    json_number(stdout, g.lat_count ? g.lat[g.lat_count / 2] * 1e3 : 0, g.lat_count > 0);
    fputs("}\n", stdout);
    return 0;
}

/* ---- fleet: devices downloading one image ------------------------------------------------- */

#define BIN 0.25        /* seconds per bin of the block-arrival histogram ("bin" in the JSON) */
#define MAX_RESTARTS 3  /* 4.08 (lost Block2 state) restarts from block 0 per device */

struct device {
    int fd, mid, sent_mids, szx, etag_length, has_etag, tries, gen, closed;
    uint32_t token;
    uint8_t raw[MAX_REQUEST];
    size_t raw_length;
    uint8_t etag[8];
    long offset, blocks, retries, lost, restarts;
    double timeout, sent_at, t_start, t_done;
    char *error;
};

struct timer { double when; uint64_t seq; int device, gen; };

struct fleet {
    const char *path;
    uint8_t *image;
    long size;
    int count, szx, max_retransmit, active;
    double rtt, loss, ack_timeout, ack_random, start, ramp, end, tick;
    struct device *devices;
    struct timer *heap;
    size_t heap_count, heap_room;
    uint64_t seq, rng;
    long *bins;
    size_t bins_room, bins_count;
    float *resp_ms;
    size_t resp_count, resp_room;
    int ep;
};

static double uniform01(struct fleet *f) { /* splitmix64 */
    uint64_t z = (f->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}

static int timer_before(const struct timer *a, const struct timer *b) {
    return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

static void at(struct fleet *f, double when, int i) {
    struct device *d = &f->devices[i];
    f->heap = grow(f->heap, &f->heap_room, f->heap_count + 1, sizeof *f->heap);
    size_t k = f->heap_count++;
    struct timer t = {when, ++f->seq, i, ++d->gen};
    while (k > 0 && timer_before(&t, &f->heap[(k - 1) / 2])) {
        f->heap[k] = f->heap[(k - 1) / 2];
        k = (k - 1) / 2;
    }
    f->heap[k] = t;
}

static struct timer pop(struct fleet *f) {
    struct timer top = f->heap[0], last = f->heap[--f->heap_count];
    size_t k = 0, n = f->heap_count;
    for (;;) {
        size_t c = 2 * k + 1;
        if (c >= n) break;
        if (c + 1 < n && timer_before(&f->heap[c + 1], &f->heap[c])) c++;
        if (!timer_before(&f->heap[c], &last)) break;
        f->heap[k] = f->heap[c];
        k = c;
    }
    if (n) f->heap[k] = last;
    return top;
}

static void close_device(struct fleet *f, int i) {
    struct device *d = &f->devices[i];
    if (d->closed) return;
    d->closed = 1;
    epoll_ctl(f->ep, EPOLL_CTL_DEL, d->fd, NULL);
    close(d->fd);
    f->active--;
}

static void fail(struct fleet *f, int i, const char *fmt, ...) {
    struct device *d = &f->devices[i];
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    d->error = strdup(why);
    d->gen++; /* cancels its timers */
    close_device(f, i);
}

static void transmit(struct fleet *f, int i, double now) {
    struct device *d = &f->devices[i];
    d->sent_at = mono(); /* not the batch's time: the response time starts at this send */
    if (send(d->fd, d->raw, d->raw_length, MSG_DONTWAIT) < 0 && errno != EAGAIN) {
        fail(f, i, "send: %s", strerror(errno));
        return;
    }
    at(f, now + d->timeout, i);
}

/* a new request (new Message ID and token) for the device's next block */
static void send_new(struct fleet *f, int i, double now) {
    struct device *d = &f->devices[i];
    if (d->sent_mids >= 0xFFFF) { fail(f, i, "Message IDs exhausted"); return; }
    d->mid = (d->mid + 1) & 0xFFFF;
    d->token = (uint32_t)++d->sent_mids;
    d->raw_length = encode_get(d->raw, CON, f->path, NULL, 0, (int)(d->offset / (16 << d->szx)), d->szx);
    set_id(d->raw, d->mid, d->token);
    d->tries = 0;
    d->timeout = f->ack_timeout * (1.0 + (f->ack_random - 1.0) * uniform01(f));
    if (d->t_start < 0) d->t_start = now;
    transmit(f, i, now);
}

static void retransmit(struct fleet *f, int i, double now) {
    struct device *d = &f->devices[i];
    if (d->tries >= f->max_retransmit) {
        fail(f, i, "no response at byte %ld after %d retransmissions", d->offset, d->tries);
        return;
    }
    d->tries++;
    d->retries++;
    d->timeout *= 2;
    transmit(f, i, now);
}

static void restart(struct fleet *f, int i, double now, const char *why) {
    struct device *d = &f->devices[i];
    if (++d->restarts > MAX_RESTARTS) { fail(f, i, "restarted %ld times (%s)", d->restarts, why); return; }
    d->offset = 0;
    d->has_etag = 0;
    at(f, now + f->rtt, i);
    d->tries = -1;
}

static void received(struct fleet *f, int i, const uint8_t *data, size_t n, double now) {
    struct device *d = &f->devices[i];
    struct response r;
    if (d->closed || parse(data, n, &r) < 0) return;
    if (r.mtype == CON) { /* a separate response: acknowledge it */
        uint8_t ack[4] = {0x60, 0, (uint8_t)(r.mid >> 8), (uint8_t)r.mid};
        send(d->fd, ack, sizeof ack, MSG_DONTWAIT);
    }
    if (r.mtype == RST) { fail(f, i, "reset by the server"); return; }
    if (r.code == 0) { /* empty ACK: the response comes separately, stop retransmitting */
        if (r.mid == d->mid) d->tries = f->max_retransmit;
        return;
    }
    uint8_t token[4] = {(uint8_t)(d->token >> 24), (uint8_t)(d->token >> 16), (uint8_t)(d->token >> 8), (uint8_t)d->token};
    if (r.token_length != 4 || memcmp(r.token, token, 4)) return; /* a late answer to an earlier request */
    if (uniform01(f) < f->loss) { d->lost++; return; } /* "lost on the way": wait for the timer */
    f->resp_ms = grow(f->resp_ms, &f->resp_room, f->resp_count + 1, sizeof(float));
    f->resp_ms[f->resp_count++] = (float)((now - d->sent_at) * 1e3);
    if (r.code == CODE_REQUEST_ENTITY_INCOMPLETE && d->offset > 0) { restart(f, i, now, "4.08"); return; }
    if (r.code != CODE_CONTENT) {
        char text[61] = {0};
        for (size_t k = 0; k < r.payload_length && k < 60; k++)
            text[k] = r.payload[k] >= 0x20 && r.payload[k] < 0x7F ? (char)r.payload[k] : '.';
        fail(f, i, "%d.%02d %s at byte %ld", r.code >> 5, r.code & 0x1F, text, d->offset);
        return;
    }
    if (!r.has_block2) { fail(f, i, "response without Block2"); return; }
    long num = r.block2 >> 4;
    int more = r.block2 >> 3 & 1, szx = r.block2 & 7;
    if (num * (16 << szx) != d->offset) {
        fail(f, i, "block %ld (szx %d) does not continue at byte %ld", num, szx, d->offset);
        return;
    }
    if (d->offset == 0) {
        d->has_etag = r.etag != NULL;
        d->etag_length = r.etag_length > 8 ? 8 : r.etag_length;
        if (r.etag) memcpy(d->etag, r.etag, (size_t)d->etag_length);
    } else if ((r.etag != NULL) != d->has_etag ||
               (r.etag && (r.etag_length != d->etag_length || memcmp(r.etag, d->etag, (size_t)d->etag_length)))) {
        fail(f, i, "ETag changed mid-download at byte %ld", d->offset);
        return;
    }
    if (d->offset + (long)r.payload_length > f->size ||
        (r.payload_length && memcmp(r.payload, f->image + d->offset, r.payload_length))) {
        fail(f, i, "image mismatch in the %zu bytes at byte %ld", r.payload_length, d->offset);
        return;
    }
    d->offset += (long)r.payload_length;
    d->blocks++;
    d->szx = szx;
    size_t b = (size_t)((now - f->start) / BIN);
    if (now >= f->start) {
        if (b >= f->bins_count) {
            f->bins = grow(f->bins, &f->bins_room, b + 1, sizeof(long));
            memset(f->bins + f->bins_count, 0, (b + 1 - f->bins_count) * sizeof(long));
            f->bins_count = b + 1;
        }
        f->bins[b]++;
    }
    if (more) {
        at(f, now + f->rtt, i);
        d->tries = -1; /* "sleeping": the next timer sends a new request */
        return;
    }
    if (d->offset != f->size) { fail(f, i, "image ends at byte %ld of %ld", d->offset, f->size); return; }
    d->t_done = now;
    d->gen++;
    close_device(f, i);
}

static int fleet_main(int argc, char **argv) {
    struct fleet f = {0};
    const char *host = "127.0.0.1", *image = NULL;
    int port = 0, seed = 1;
    f.szx = 2; f.rtt = 0.05; f.loss = 0.01; f.ack_timeout = 2.0; f.ack_random = 1.5;
    f.max_retransmit = 4; f.ramp = 1.0; f.tick = 0.001; f.start = -1; f.end = -1;
    static const struct option options[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"path", 1, 0, 'u'}, {"image", 1, 0, 'i'},
        {"count", 1, 0, 'c'}, {"szx", 1, 0, 'z'}, {"rtt", 1, 0, 'r'}, {"loss", 1, 0, 'l'},
        {"ack-timeout", 1, 0, 'a'}, {"ack-random", 1, 0, 'A'}, {"max-retransmit", 1, 0, 'x'},
        {"start", 1, 0, 's'}, {"ramp", 1, 0, 'R'}, {"end", 1, 0, 'e'}, {"seed", 1, 0, 'S'},
        {"tick", 1, 0, 'k'}, {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (c) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'u': f.path = optarg; break;
        case 'i': image = optarg; break;
        case 'c': f.count = atoi(optarg); break;
        case 'z': f.szx = atoi(optarg); break;
        case 'r': f.rtt = atof(optarg); break;
        case 'l': f.loss = atof(optarg); break;
        case 'a': f.ack_timeout = atof(optarg); break;
        case 'A': f.ack_random = atof(optarg); break;
        case 'x': f.max_retransmit = atoi(optarg); break;
        case 's': f.start = atof(optarg); break;
        case 'R': f.ramp = atof(optarg); break;
        case 'e': f.end = atof(optarg); break;
        case 'S': seed = atoi(optarg); break;
        case 'k': f.tick = atof(optarg); break;
        default: die("fleet: unknown option");
        }
    }
    if (!port || !f.path || !image || f.count < 1 || f.start < 0 || f.end < 0 || f.szx < 0 || f.szx > 6)
        die("fleet: --port, --path, --image, --count >= 1, --start and --end are needed");
    int ifd = open(image, O_RDONLY);
    struct stat st;
    if (ifd < 0 || fstat(ifd, &st) < 0) die("fleet: %s: %s", image, strerror(errno));
    f.size = st.st_size;
    f.image = malloc((size_t)f.size + 1);
    if (read(ifd, f.image, (size_t)f.size) != f.size) die("fleet: cannot read %s", image);
    close(ifd);
    uint8_t probe[MAX_REQUEST];
    if (!encode_get(probe, CON, f.path, NULL, 0, (int)(f.size / (16 << f.szx)), f.szx))
        die("fleet: path too long: %s", f.path);
    f.rng = (uint64_t)seed * 0x2545F4914F6CDD1Dull;
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &to.sin_addr) != 1) die("fleet: --host must be an IPv4 address");
    raise_nofile((size_t)f.count + 64);
    f.ep = epoll_create1(EPOLL_CLOEXEC);
    f.devices = zalloc((size_t)f.count, sizeof *f.devices);
    f.active = f.count;
    for (int i = 0; i < f.count; i++) {
        struct device *d = &f.devices[i];
        d->fd = udp_socket(&to, 1);
        d->mid = (int)(uniform01(&f) * 65536);
        d->szx = f.szx;
        d->t_start = d->t_done = -1;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(f.ep, EPOLL_CTL_ADD, d->fd, &ev);
    }
    for (int i = 0; i < f.count; i++) {
        at(&f, f.start + f.ramp * i / f.count, i);
        f.devices[i].tries = -1;
    }
    double cpu0 = self_cpu(), half_tick = f.tick / 2;
    struct epoll_event events[512];
    uint8_t buf[MAX_DATAGRAM];
    while (f.heap_count || f.active) {
        double now = mono();
        if (now >= f.end) break;
        double next = f.heap_count && f.heap[0].when < f.end ? f.heap[0].when : f.end;
        int wait_ms = next > now ? (int)((next - now) * 1000) + 1 : 0;
        int n = epoll_wait(f.ep, events, 512, wait_ms);
        double woke = mono(), real_minus_mono = real() - woke;
        for (int e = 0; e < n; e++) {
            int i = (int)events[e].data.u32;
            struct device *d = &f.devices[i];
            while (!d->closed) {
                double when;
                ssize_t len = receive(d->fd, buf, sizeof buf, real_minus_mono, woke, &when);
                if (len < 0) break;
                received(&f, i, buf, (size_t)len, when);
            }
        }
        now = mono();
        while (f.heap_count && f.heap[0].when <= now + half_tick) {
            struct timer t = pop(&f);
            struct device *d = &f.devices[t.device];
            if (t.gen != d->gen || d->closed) continue;
            if (d->tries < 0) send_new(&f, t.device, now);
            else retransmit(&f, t.device, now);
        }
        if (!f.active) break;
        if (f.tick > 0) { /* at most one wake-up per tick: what arrives meanwhile is read at once */
            double rest = woke + f.tick - mono();
            if (rest > 0) nap(rest);
        }
    }
    double t_end = mono(), cpu = self_cpu() - cpu0;
    for (int i = 0; i < f.count; i++) close_device(&f, i);
    printf("{\"t_end\": %.9f, \"cpu\": %.9g, \"total_blocks\": %ld, \"bin\": %g, \"bins\": [",
           t_end, cpu, (f.size + (16 << f.szx) - 1) / (16 << f.szx), BIN);
    for (size_t b = 0; b < f.bins_count; b++) printf(b ? ", %ld" : "%ld", f.bins[b]);
    fputs("], \"resp_ms\": [", stdout);
    for (size_t k = 0; k < f.resp_count; k++) printf(k ? ", %.4g" : "%.4g", f.resp_ms[k]);
    fputs("], \"devices\": [", stdout);
    for (int i = 0; i < f.count; i++) {
        struct device *d = &f.devices[i];
        fputs(i ? ", {\"start\": " : "{\"start\": ", stdout);
        json_number(stdout, d->t_start, d->t_start >= 0);
        fputs(", \"done\": ", stdout);
        json_number(stdout, d->t_done, d->t_done >= 0);
        printf(", \"blocks\": %ld, \"offset\": %ld, \"retries\": %ld, \"lost\": %ld, \"restarts\": %ld, \"error\": ",
               d->blocks, d->offset, d->retries, d->lost, d->restarts);
        if (d->error) json_string(stdout, d->error);
        else fputs("null", stdout);
        fputc('}', stdout);
    }
    fputs("]}\n", stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "gets")) return gets_main(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "fleet")) return fleet_main(argc - 1, argv + 1);
    die("usage: coapload gets|fleet OPTIONS (see bench/coapload.py)");
    return 2;
}
