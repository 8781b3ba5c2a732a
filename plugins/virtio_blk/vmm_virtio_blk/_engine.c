/*
 * The native data plane of virtio-blk: split-ring virtqueues served in C.
 *
 * It does what vmmcore/virtio/queue.py (Queue.pop, _walk_chain, add_used,
 * needs_interrupt) and vmm_virtio_blk/pyengine.py (execute) do, with the same checks in
 * the same order, so a guest sees the same statuses and the same NEEDS_RESET cases
 * whichever engine serves it (tests/test_engine_differential.py compares them).
 *
 * Threads: one queue thread per virtqueue waits (poll) on the queue's kick eventfd,
 * pops every available chain and either runs a lone request itself (the QD1 latency
 * path) or hands the batch to a pool of io_threads workers, so a deep queue really has
 * that many requests in the disk. A completion writes the status byte, then, under the
 * queue's lock, the used element, used->idx, and the interrupt decision (EVENT_IDX),
 * and writes an eventfd: the vector's irqfd when Python said it may (MSI-X enabled and
 * the vector unmasked), else the queue's "call" eventfd that a Python thread turns into
 * VirtioInterrupt.signal_used_queue(). Protocol violations set the engine's failure
 * reason and write the event eventfd; Python then puts the device into NEEDS_RESET.
 *
 * Hostile guest: every guest address goes through mem_ptr(), which returns a host
 * pointer only when [gpa, gpa+len) lies inside one RAM region (no u64 overflow), else
 * NULL. Descriptors are copied once out of guest memory before they are checked.
 *
 * Memory ordering (x86-64 TSO, the only host this VMM supports): 16-bit ring indexes
 * are accessed with single atomic 16-bit loads/stores; a full fence sits where the
 * device stores then reads the driver's state (avail_event then avail->idx; used->idx
 * then used_event / avail->flags), as in queue.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_engine.h"

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define MAX_INDIRECT_ENTRIES 0x10000u
#define U32_MAX_LEN 0xFFFFFFFFull

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2
#define S_AGAIN (-1)       /* not a status: "would block, run me in the pool" */
#define WZ_FLAG_UNMAP 1u
#define ID_BYTES 20
#define SECTOR_SHIFT 9
#define MAX_SEG_SECTORS ((1u << 22) - 8)   /* MAX_DISCARD/WRITE_ZEROES_SECTORS */
#define MAX_SEGS 32                          /* MAX_DISCARD/WRITE_ZEROES_SEG */

#define FL_KEEP_SIZE 0x01
#define FL_PUNCH_HOLE 0x02
#define FL_ZERO_RANGE 0x10
#define DIRECT_ALIGN_MAX 4096
#define ZERO_CHUNK (1 << 20)
#define SHRINK_SEGS 1024          /* a request's arrays above this are freed after use */

/* One guest buffer, already translated: host pointer and length (never 0). */
struct seg {
    uint8_t *host;
    uint32_t len;
};

/* A growable array of segments. */
struct segs {
    struct seg *v;
    uint32_t n, cap;
};

struct queue;

/* One popped chain (DescriptorChain in queue.py) and the request it carries. */
struct req {
    struct queue *q;
    uint16_t head;
    struct segs r, w;           /* device-readable / device-writable, in chain order */
    uint64_t rlen, wlen;        /* their totals (<= 2**32 - 1 together) */
    int readable_after_writable;
    struct iovec *iov;          /* scratch for preadv/pwritev */
    uint32_t iov_cap;
    struct req *next;           /* pool job list / queue free list */
};

struct queue {
    struct engine *e;
    int index;
    uint16_t size;
    int event_idx, indirect;
    uint64_t desc_gpa;
    uint8_t *desc;              /* 16 * size bytes, checked at set-up */
    uint8_t *avail;             /* 6 + 2 * size */
    uint8_t *used;              /* 6 + 8 * size */
    uint16_t next_avail, next_used, signalled_used;
    uint32_t unsignalled;
    int kick_fd, call_fd;
    int irq_fd;                 /* atomic: >= 0 write it directly, else call_fd */
    pthread_mutex_t lock;       /* pop and completion, like the Python queue lock */
    pthread_t thread;
    int started;
    struct req *free_reqs;      /* under lock */
};

struct engine {
    struct blk_config cfg;
    struct blk_region *regions;
    int nregions;
    uint64_t capacity;          /* atomic: sectors */
    uint32_t align;             /* atomic: O_DIRECT alignment in use (512 or 4096) */
    int no_write_nowait;        /* atomic: pwritev2(RWF_NOWAIT) is refused here */
    struct queue *queues;
    int nqueues;
    int stop_fd;
    int failed;                 /* atomic */
    char reason[256];           /* the first failure, set once under msg_lock */
    char last_error[256];       /* the last disk error, under msg_lock */
    pthread_mutex_t msg_lock;
    /* the worker pool */
    pthread_mutex_t pool_lock;
    pthread_cond_t pool_cond, idle_cond;
    struct req *jobs_head, *jobs_tail;
    int pool_stop;
    uint32_t inflight;          /* atomic: dispatched, not completed */
    uint32_t in_disk, peak_in_disk;  /* atomic: requests inside a disk call */
    pthread_t *workers;
    int nworkers;
    struct blk_stats stats;     /* atomic counters */
};

/* -- small helpers ---------------------------------------------------------------- */

static inline void fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint16_t load16(const uint8_t *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void store16(uint8_t *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

static inline void stat_add(uint64_t *counter, uint64_t n) {
    __atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

/* Host pointer of guest range [gpa, gpa+len), or NULL unless it lies inside one region.
 * Written so that nothing overflows: gpa - start <= size - len. */
static uint8_t *mem_ptr(const struct engine *e, uint64_t gpa, uint64_t len) {
    for (int i = 0; i < e->nregions; i++) {
        const struct blk_region *r = &e->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            if (len > r->size || gpa - r->gpa > r->size - len)
                return NULL;
            return (uint8_t *)(uintptr_t)r->host + (gpa - r->gpa);
        }
    }
    return NULL;
}

/* Record the first protocol violation and tell Python (the event eventfd). */
static void engine_fail(struct engine *e, const char *fmt, ...) {
    pthread_mutex_lock(&e->msg_lock);
    if (!__atomic_load_n(&e->failed, __ATOMIC_ACQUIRE)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->reason, sizeof e->reason, fmt, ap);
        va_end(ap);
        __atomic_store_n(&e->failed, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&e->msg_lock);
    eventfd_write(e->cfg.event_fd, 1);
}

/* Remember a disk error (the guest gets IOERR); Python logs it. */
static void disk_error(struct engine *e, const char *what, uint64_t off, int err) {
    pthread_mutex_lock(&e->msg_lock);
    snprintf(e->last_error, sizeof e->last_error, "%s at %llu failed: %s", what,
             (unsigned long long)off, strerror(err));
    pthread_mutex_unlock(&e->msg_lock);
    stat_add(&e->stats.disk_errors, 1);
    eventfd_write(e->cfg.event_fd, 1);
}

static int segs_push(struct segs *s, uint8_t *host, uint32_t len) {
    if (s->n == s->cap) {
        uint32_t cap = s->cap ? 2 * s->cap : 8;
        struct seg *v = realloc(s->v, cap * sizeof *v);
        if (!v)
            return -1;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n].host = host;
    s->v[s->n].len = len;
    s->n++;
    return 0;
}

/* -- the available ring: Queue.pop / _walk_chain ------------------------------------ */

/* One descriptor, copied out of guest memory before anything looks at it. */
struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

static void read_desc(const uint8_t *table, uint32_t index, struct desc *d) {
    const volatile uint8_t *p = table + 16ull * index;
    uint8_t raw[16];
    for (int i = 0; i < 16; i++)
        raw[i] = p[i];
    memcpy(&d->addr, raw, 8);
    memcpy(&d->len, raw + 8, 4);
    memcpy(&d->flags, raw + 12, 2);
    memcpy(&d->next, raw + 14, 2);
}

/* Walk the chain from head into req (whose arrays are reused); 0, or -1 after
 * engine_fail with the same reasons _walk_chain raises VirtqueueError for. */
static int walk_chain(struct queue *q, uint16_t head, uint32_t slot, struct req *req) {
    struct engine *e = q->e;
    if (head >= q->size) {
        engine_fail(e, "avail ring slot %u names descriptor %u, queue size is %u",
                    slot, head, q->size);
        return -1;
    }
    req->r.n = req->w.n = 0;
    req->rlen = req->wlen = 0;
    req->readable_after_writable = 0;
    req->head = head;
    const uint8_t *table = q->desc;
    uint32_t table_len = q->size, index = head, visited = 0;
    int in_indirect = 0, seen_write = 0;
    const char *where = "queue size";
    for (;;) {
        if (++visited > table_len) {       /* a loop, or a chain longer than its table */
            engine_fail(e, "descriptor chain from head %u is longer than the %s (%u): a loop?",
                        head, where, table_len);
            return -1;
        }
        struct desc d;
        read_desc(table, index, &d);        /* index < table_len: inside the table */
        if (d.flags & DESC_F_INDIRECT) {
            if (in_indirect) {
                engine_fail(e, "chain %u: nested indirect descriptor at table index %u",
                            head, index);
                return -1;
            }
            if (!q->indirect) {
                engine_fail(e, "chain %u: indirect descriptor but RING_INDIRECT_DESC was "
                            "not negotiated", head);
                return -1;
            }
            if (d.flags & DESC_F_NEXT) {
                engine_fail(e, "chain %u: descriptor %u sets both INDIRECT and NEXT",
                            head, index);
                return -1;
            }
            if (d.len == 0 || d.len % 16) {
                engine_fail(e, "chain %u: indirect table length %u is not a non-zero "
                            "multiple of 16", head, d.len);
                return -1;
            }
            if (d.len / 16 > MAX_INDIRECT_ENTRIES) {   /* cannot happen with a u32 len */
                engine_fail(e, "chain %u: indirect table of %u entries", head, d.len / 16);
                return -1;
            }
            const uint8_t *t = mem_ptr(e, d.addr, d.len);
            if (!t) {
                engine_fail(e, "chain %u: indirect table %#llx+%#x is outside guest RAM",
                            head, (unsigned long long)d.addr, d.len);
                return -1;
            }
            table = t;
            table_len = d.len / 16;
            where = "indirect table";
            index = 0;
            visited = 0;
            in_indirect = 1;
            continue;
        }
        int writable = d.flags & DESC_F_WRITE;
        if (writable)
            seen_write = 1;
        else if (seen_write)
            req->readable_after_writable = 1;
        if (d.len) {
            uint8_t *host = mem_ptr(e, d.addr, d.len);
            if (!host) {
                engine_fail(e, "chain %u: buffer %#llx+%#x is outside guest RAM",
                            head, (unsigned long long)d.addr, d.len);
                return -1;
            }
            if (segs_push(writable ? &req->w : &req->r, host, d.len) < 0) {
                engine_fail(e, "chain %u: out of memory", head);
                return -1;
            }
            if (writable)
                req->wlen += d.len;
            else
                req->rlen += d.len;
            if (req->rlen + req->wlen > U32_MAX_LEN) {
                engine_fail(e, "chain %u: total length exceeds 2**32-1 bytes", head);
                return -1;
            }
        }
        if (!(d.flags & DESC_F_NEXT))
            return 0;
        if (d.next >= table_len) {
            engine_fail(e, "chain %u: next index %u is beyond the %s (%u)",
                        head, d.next, where, table_len);
            return -1;
        }
        index = d.next;
    }
}

/* Queue.pop: 1 with a chain in req, 0 when the ring is empty, -1 after engine_fail.
 * Caller holds q->lock. */
static int pop(struct queue *q, struct req *req) {
    uint8_t *avail_event = q->used + 4 + 8u * q->size;
    uint16_t pending = (uint16_t)(load16(q->avail + 2) - q->next_avail);
    if (pending == 0) {
        if (!q->event_idx)
            return 0;
        store16(avail_event, q->next_avail);   /* kick me for the next one ... */
        fence();                               /* ... then look again */
        pending = (uint16_t)(load16(q->avail + 2) - q->next_avail);
        if (pending == 0)
            return 0;
    }
    if (pending > q->size) {
        engine_fail(q->e, "avail idx is %u entries ahead of the device (next %u), more "
                    "than the queue size %u", pending, q->next_avail, q->size);
        return -1;
    }
    uint32_t slot = q->next_avail & (q->size - 1u);
    uint16_t head = load16(q->avail + 4 + 2 * slot);   /* slot < size: in the ring */
    if (walk_chain(q, head, slot, req) < 0)
        return -1;
    q->next_avail++;
    if (q->event_idx)
        store16(avail_event, q->next_avail);
    return 1;
}

/* -- the used ring: add_used / needs_interrupt / signalling ------------------------- */

static void add_used(struct queue *q, uint16_t head, uint32_t written) {
    uint8_t *elem = q->used + 4 + 8u * (q->next_used & (q->size - 1u));
    uint32_t id = head;
    memcpy(elem, &id, 4);
    memcpy(elem + 4, &written, 4);
    q->next_used++;
    store16(q->used + 2, q->next_used);    /* after the element: TSO keeps the order */
    q->unsignalled++;
}

static int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx) {
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

static int needs_interrupt(struct queue *q) {
    if (q->unsignalled == 0)
        return 0;
    uint32_t added = q->unsignalled;
    q->unsignalled = 0;
    uint16_t old = q->signalled_used, new_idx = q->next_used;
    q->signalled_used = new_idx;
    fence();            /* our used->idx store before we read the driver's state */
    if (!q->event_idx)
        return !(load16(q->avail) & AVAIL_F_NO_INTERRUPT);
    if (added >= 0x8000)
        return 1;
    return vring_need_event(load16(q->avail + 4 + 2u * q->size), new_idx, old);
}

static void signal_queue(struct queue *q) {
    int fd = __atomic_load_n(&q->irq_fd, __ATOMIC_ACQUIRE);
    if (fd >= 0) {
        eventfd_write(fd, 1);
        stat_add(&q->e->stats.irqfd_signals, 1);
    } else {
        eventfd_write(q->call_fd, 1);
        stat_add(&q->e->stats.python_signals, 1);
    }
}

/* -- moving data: preadv/pwritev straight between the file and guest memory ---------- */

/* The data of a request as iovecs: the segments from byte `skip` for `len` bytes. */
static int build_iov(struct req *req, const struct segs *s, uint64_t skip, uint64_t len,
                     uint32_t *count) {
    if (req->iov_cap < s->n) {
        struct iovec *iov = realloc(req->iov, s->n * sizeof *iov);
        if (!iov)
            return -1;
        req->iov = iov;
        req->iov_cap = s->n;
    }
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->n && len; i++) {
        uint64_t l = s->v[i].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip < len ? l - skip : len;
        req->iov[n].iov_base = s->v[i].host + skip;
        req->iov[n].iov_len = take;
        n++;
        len -= take;
        skip = 0;
    }
    *count = n;
    return 0;
}

/* Drop the first `done` bytes of iov[*first..count) after a short transfer. */
static void iov_advance(struct iovec *iov, uint32_t *first, uint32_t count, size_t done) {
    while (*first < count && done >= iov[*first].iov_len) {
        done -= iov[*first].iov_len;
        (*first)++;
    }
    if (*first < count && done) {
        iov[*first].iov_base = (uint8_t *)iov[*first].iov_base + done;
        iov[*first].iov_len -= done;
    }
}

/* preadv2/pwritev2 of every iovec at off, in IOV_MAX batches, looping on short
 * transfers and EINTR. A read at end of file fills the rest with zeroes (a file shorter
 * than the disk). flags is 0 or RWF_NOWAIT. Returns 0 or an errno. */
static int rw_all(int fd, struct iovec *iov, uint32_t count, uint64_t off, int write,
                  int flags) {
    uint32_t first = 0;
    while (first < count) {
        int batch = count - first > IOV_MAX ? IOV_MAX : (int)(count - first);
        ssize_t n = write ? pwritev2(fd, iov + first, batch, (off_t)off, flags)
                          : preadv2(fd, iov + first, batch, (off_t)off, flags);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0) {
            if (write)
                return EIO;                     /* no progress */
            for (uint32_t i = first; i < count; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        off += (uint64_t)n;
        iov_advance(iov, &first, count, (size_t)n);
    }
    return 0;
}

static int aligned(const struct iovec *iov, uint32_t count, uint64_t off, uint64_t len,
                   uint32_t a) {
    if (off % a || len % a)
        return 0;
    for (uint32_t i = 0; i < count; i++)
        if ((uintptr_t)iov[i].iov_base % a || iov[i].iov_len % a)
            return 0;
    return 1;
}

/* The file I/O of an IN or OUT: O_DIRECT when the request is aligned for it, else the
 * buffered descriptor (the kernel keeps both coherent), as the raw format does. */
static int disk_rw(struct engine *e, struct req *req, uint32_t count, uint64_t off,
                   uint64_t len, int write) {
    uint64_t foff = (uint64_t)e->cfg.file_offset + off;
    __atomic_add_fetch(&e->in_disk, 1, __ATOMIC_RELAXED);
    uint32_t now = __atomic_load_n(&e->in_disk, __ATOMIC_RELAXED);
    uint32_t peak = __atomic_load_n(&e->peak_in_disk, __ATOMIC_RELAXED);
    while (now > peak && !__atomic_compare_exchange_n(&e->peak_in_disk, &peak, now, 0,
                                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    int err = -1;
    if (e->cfg.direct_fd >= 0) {
        uint32_t a = __atomic_load_n(&e->align, __ATOMIC_RELAXED);
        if (aligned(req->iov, count, foff, len, a)) {
            struct iovec *copy = malloc(count * sizeof *copy);   /* rw_all edits iov */
            if (copy) {
                memcpy(copy, req->iov, count * sizeof *copy);
                err = rw_all(e->cfg.direct_fd, copy, count, foff, write, 0);
                free(copy);
                if (err == EINVAL && a < DIRECT_ALIGN_MAX)
                    __atomic_store_n(&e->align, DIRECT_ALIGN_MAX, __ATOMIC_RELAXED);
            }
        }
    }
    if (err != 0)
        err = rw_all(e->cfg.fd, req->iov, count, foff, write, 0);
    __atomic_sub_fetch(&e->in_disk, 1, __ATOMIC_RELAXED);
    return err;
}

/* The same I/O without blocking (RWF_NOWAIT on the buffered descriptor): 0 when it is
 * all done (the data was in the page cache), else EAGAIN and the pool does it again,
 * whole, with blocking calls. A thread hand-off costs more than copying a page-cache
 * hit, so the queue thread serves those itself. Direct I/O always blocks: EAGAIN. */
static int disk_rw_nowait(struct engine *e, struct req *req, uint32_t count, uint64_t off,
                          uint64_t len, int write) {
    uint64_t foff = (uint64_t)e->cfg.file_offset + off;
    if (e->cfg.direct_fd >= 0 &&
        aligned(req->iov, count, foff, len, __atomic_load_n(&e->align, __ATOMIC_RELAXED)))
        return EAGAIN;
    if (write && __atomic_load_n(&e->no_write_nowait, __ATOMIC_RELAXED))
        return EAGAIN;
    int err = rw_all(e->cfg.fd, req->iov, count, foff, write, RWF_NOWAIT);
    if (err == EOPNOTSUPP && write)          /* this file system cannot: stop trying */
        __atomic_store_n(&e->no_write_nowait, 1, __ATOMIC_RELAXED);
    return err ? EAGAIN : 0;
}

static int disk_flush(struct engine *e) {
    stat_add(&e->stats.flushes, 1);
    if (!e->cfg.flush_syncs)
        return 0;
    return fdatasync(e->cfg.fd) < 0 ? errno : 0;
}

static int unsupported(int err) {
    return err == EOPNOTSUPP || err == ENOSYS || err == EINVAL || err == ENODEV;
}

/* DISCARD: punch a hole; a file system that cannot is left alone (advisory). */
static int disk_discard(struct engine *e, uint64_t off, uint64_t len) {
    stat_add(&e->stats.discards, 1);
    if (!len)
        return 0;
    if (fallocate(e->cfg.fd, FL_PUNCH_HOLE | FL_KEEP_SIZE,
                  (off_t)(e->cfg.file_offset + off), (off_t)len) == 0)
        return 0;
    return unsupported(errno) ? 0 : errno;
}

/* WRITE_ZEROES: a punched hole if allowed, else ZERO_RANGE, else written zeroes. */
static int disk_write_zeroes(struct engine *e, uint64_t off, uint64_t len, int unmap) {
    stat_add(&e->stats.write_zeroes, 1);
    if (!len)
        return 0;
    off_t foff = (off_t)(e->cfg.file_offset + off);
    int modes[2], nmodes = 0;
    if (unmap && !e->cfg.block_device)
        modes[nmodes++] = FL_PUNCH_HOLE | FL_KEEP_SIZE;
    modes[nmodes++] = FL_ZERO_RANGE | FL_KEEP_SIZE;
    for (int i = 0; i < nmodes; i++) {
        if (fallocate(e->cfg.fd, modes[i], foff, (off_t)len) == 0)
            return 0;
        if (!unsupported(errno))
            return errno;
    }
    static const uint8_t zeroes[ZERO_CHUNK];
    while (len) {
        size_t n = len < ZERO_CHUNK ? len : ZERO_CHUNK;
        struct iovec iov = {(void *)zeroes, n};
        int err = rw_all(e->cfg.fd, &iov, 1, (uint64_t)foff, 1, 0);
        if (err)
            return err;
        foff += (off_t)n;
        len -= n;
    }
    return 0;
}

/* -- requests: pyengine.execute ------------------------------------------------------ */

/* Copy n bytes from the readable segments starting `skip` bytes in. */
static void gather(const struct segs *s, uint64_t skip, uint8_t *out, uint64_t n) {
    for (uint32_t i = 0; i < s->n && n; i++) {
        uint64_t l = s->v[i].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip < n ? l - skip : n;
        memcpy(out, s->v[i].host + skip, take);
        out += take;
        n -= take;
        skip = 0;
    }
}

/* Scatter n bytes into the writable segments from their start. */
static void scatter(const struct segs *s, const uint8_t *in, uint64_t n) {
    for (uint32_t i = 0; i < s->n && n; i++) {
        uint64_t take = s->v[i].len < n ? s->v[i].len : n;
        memcpy(s->v[i].host, in, take);
        in += take;
        n -= take;
    }
}

/* IOERR unless [sector, sector + len/512) is on the disk and len is whole sectors. */
static int data_range(struct engine *e, uint64_t sector, uint64_t len, uint64_t *off) {
    uint64_t capacity = __atomic_load_n(&e->capacity, __ATOMIC_ACQUIRE);
    if (len % 512)
        return S_IOERR;
    uint64_t nsectors = len >> SECTOR_SHIFT;
    if (sector > capacity || nsectors > capacity - sector)
        return S_IOERR;
    *off = sector << SECTOR_SHIFT;
    return S_OK;
}

struct span {
    uint64_t off, len;
    int unmap;
};

/* Parse and check every DISCARD/WRITE_ZEROES segment before doing any (pyengine
 * segments(): same order of checks). */
static int parse_segments(struct engine *e, struct req *req, uint64_t out_len, int discard,
                          struct span *spans, uint32_t *count) {
    if (out_len == 0 || out_len % 16)
        return S_IOERR;
    uint64_t n = out_len / 16;
    if (n > MAX_SEGS)
        return S_IOERR;
    uint64_t capacity = __atomic_load_n(&e->capacity, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++) {
        uint8_t raw[16];
        gather(&req->r, 16 + 16ull * i, raw, 16);
        uint64_t sector;
        uint32_t nsectors, flags;
        memcpy(&sector, raw, 8);
        memcpy(&nsectors, raw + 8, 4);
        memcpy(&flags, raw + 12, 4);
        if (flags & ~WZ_FLAG_UNMAP)
            return S_UNSUPP;
        int unmap = (flags & WZ_FLAG_UNMAP) != 0;
        if (discard && unmap)
            return S_UNSUPP;
        if (nsectors > MAX_SEG_SECTORS)
            return S_IOERR;
        if (sector > capacity || nsectors > capacity - sector)
            return S_IOERR;
        spans[i].off = sector << SECTOR_SHIFT;
        spans[i].len = (uint64_t)nsectors << SECTOR_SHIFT;
        spans[i].unmap = unmap;
    }
    *count = (uint32_t)n;
    return S_OK;
}

static int do_discard_wz(struct engine *e, struct req *req, uint64_t out_len, int discard) {
    const struct blk_config *c = &e->cfg;
    if (c->read_only)
        return S_IOERR;
    if (!(discard ? c->can_discard : c->can_write_zeroes))
        return S_UNSUPP;
    struct span spans[MAX_SEGS];
    uint32_t n = 0;
    int st = parse_segments(e, req, out_len, discard, spans, &n);
    if (st != S_OK)
        return st;
    for (uint32_t i = 0; i < n; i++) {
        int err = discard ? disk_discard(e, spans[i].off, spans[i].len)
                          : disk_write_zeroes(e, spans[i].off, spans[i].len,
                                              spans[i].unmap && c->may_unmap);
        if (err) {
            disk_error(e, discard ? "discard" : "write-zeroes", spans[i].off, err);
            return S_IOERR;
        }
    }
    if (c->writethrough && !discard) {
        int err = disk_flush(e);
        if (err) {
            disk_error(e, "flush", 0, err);
            return S_IOERR;
        }
    }
    return S_OK;
}

static int do_rw(struct engine *e, struct req *req, uint64_t sector, uint64_t in_len,
                 uint64_t out_len, int write, int nowait, uint32_t *written) {
    if (write && e->cfg.read_only)
        return S_IOERR;
    if (write ? in_len != 0 : out_len != 0)      /* data in the wrong direction */
        return S_IOERR;
    uint64_t len = write ? out_len : in_len, off;
    if (data_range(e, sector, len, &off) != S_OK)
        return S_IOERR;
    uint32_t count;
    if (build_iov(req, write ? &req->r : &req->w, write ? 16 : 0, len, &count) < 0) {
        disk_error(e, "allocating iovecs", off, ENOMEM);
        return S_IOERR;
    }
    if (nowait && (write && e->cfg.writethrough))
        return S_AGAIN;                             /* a flush follows: it blocks */
    if (nowait && disk_rw_nowait(e, req, count, off, len, write))
        return S_AGAIN;
    int err = nowait ? 0 : disk_rw(e, req, count, off, len, write);
    if (err) {
        disk_error(e, write ? "write" : "read", off, err);
        return S_IOERR;
    }
    stat_add(write ? &e->stats.writes : &e->stats.reads, 1);
    if (write && e->cfg.writethrough && (err = disk_flush(e)) != 0) {
        disk_error(e, "flush", 0, err);
        return S_IOERR;
    }
    *written = write ? 0 : (uint32_t)len;
    return S_OK;
}

/* Carry out one request; returns its status and sets *written (data bytes given to the
 * guest, status excluded). The chain has at least one writable byte. With nowait,
 * S_AGAIN means "would block": nothing was answered, run it again without nowait. */
static int execute(struct engine *e, struct req *req, int nowait, uint32_t *written) {
    *written = 0;
    if (req->readable_after_writable)
        return S_IOERR;
    if (req->rlen < 16)
        return S_IOERR;
    uint8_t hdr[16];
    gather(&req->r, 0, hdr, 16);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    uint64_t in_len = req->wlen - 1, out_len = req->rlen - 16;
    switch (type) {
    case T_IN:
    case T_OUT:
        return do_rw(e, req, sector, in_len, out_len, type == T_OUT, nowait, written);
    case T_FLUSH: {
        if (nowait)
            return S_AGAIN;
        int err = disk_flush(e);
        if (err) {
            disk_error(e, "flush", 0, err);
            return S_IOERR;
        }
        return S_OK;
    }
    case T_GET_ID: {
        if (in_len < ID_BYTES)
            return S_IOERR;
        scatter(&req->w, e->cfg.serial, ID_BYTES);
        *written = ID_BYTES;
        return S_OK;
    }
    case T_DISCARD:
    case T_WRITE_ZEROES:
        if (nowait)
            return S_AGAIN;
        return do_discard_wz(e, req, out_len, type == T_DISCARD);
    default:
        return S_UNSUPP;
    }
}

/* -- completing and dispatching -------------------------------------------------------- */

static void release_req(struct queue *q, struct req *req) {
    if (req->r.cap > SHRINK_SEGS || req->w.cap > SHRINK_SEGS || req->iov_cap > SHRINK_SEGS) {
        free(req->r.v);
        free(req->w.v);
        free(req->iov);
        memset(req, 0, sizeof *req);
        req->q = q;
    }
    req->next = q->free_reqs;
    q->free_reqs = req;
}

/* Run a request, write its status (the last writable byte), return it to the driver.
 * With nowait, returns -1 (and does nothing visible) when the request would block. */
static int serve(struct req *req, int nowait) {
    struct queue *q = req->q;
    struct engine *e = q->e;
    uint32_t written = 0;
    int status = execute(e, req, nowait, &written);
    if (status == S_AGAIN)
        return -1;
    struct seg *last = &req->w.v[req->w.n - 1];
    last->host[last->len - 1] = (uint8_t)status;
    pthread_mutex_lock(&q->lock);
    add_used(q, req->head, written + 1);
    if (needs_interrupt(q))
        signal_queue(q);
    release_req(q, req);
    pthread_mutex_unlock(&q->lock);
    stat_add(&e->stats.requests, 1);
    if (nowait)
        stat_add(&e->stats.served_inline, 1);
    __atomic_sub_fetch(&e->inflight, 1, __ATOMIC_ACQ_REL);
    return 0;
}

static void *worker_main(void *arg) {
    struct engine *e = arg;
    pthread_mutex_lock(&e->pool_lock);
    for (;;) {
        while (!e->jobs_head && !e->pool_stop)
            pthread_cond_wait(&e->pool_cond, &e->pool_lock);
        if (!e->jobs_head)
            break;                                   /* stopping and nothing left */
        struct req *req = e->jobs_head;
        e->jobs_head = req->next;
        if (!e->jobs_head)
            e->jobs_tail = NULL;
        pthread_mutex_unlock(&e->pool_lock);
        serve(req, 0);
        pthread_mutex_lock(&e->pool_lock);
        if (__atomic_load_n(&e->inflight, __ATOMIC_ACQUIRE) == 0)
            pthread_cond_broadcast(&e->idle_cond);
    }
    pthread_mutex_unlock(&e->pool_lock);
    return NULL;
}

static void submit_batch(struct engine *e, struct req *first, struct req *last, int n) {
    pthread_mutex_lock(&e->pool_lock);
    if (e->jobs_tail)
        e->jobs_tail->next = first;
    else
        e->jobs_head = first;
    e->jobs_tail = last;
    last->next = NULL;
    if (n == 1)
        pthread_cond_signal(&e->pool_cond);
    else
        pthread_cond_broadcast(&e->pool_cond);
    pthread_mutex_unlock(&e->pool_lock);
}

static struct req *get_req(struct queue *q) {
    struct req *req = q->free_reqs;
    if (req) {
        q->free_reqs = req->next;
        return req;
    }
    req = calloc(1, sizeof *req);
    if (req)
        req->q = q;
    return req;
}

/* handle_queue: pop every available chain, then run a lone one here (nothing else in
 * flight: the QD1 latency path); of a batch, serve here what completes without blocking
 * (page-cache hits) and hand the rest to the pool. */
static void handle_queue(struct queue *q) {
    struct engine *e = q->e;
    struct req *first = NULL, *last = NULL;
    int n = 0;
    while (!__atomic_load_n(&e->failed, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&q->lock);
        struct req *req = get_req(q);
        int got = req ? pop(q, req) : (engine_fail(e, "out of memory"), -1);
        if (got <= 0 && req)
            release_req(q, req);
        pthread_mutex_unlock(&q->lock);
        if (got <= 0)
            break;
        if (req->wlen == 0) {
            engine_fail(e, "virtio-blk request %u has no device-writable status byte",
                        req->head);
            pthread_mutex_lock(&q->lock);
            release_req(q, req);
            pthread_mutex_unlock(&q->lock);
            break;
        }
        req->next = NULL;
        if (last)
            last->next = req;
        else
            first = req;
        last = req;
        n++;
    }
    if (!n)
        return;
    uint32_t before = __atomic_fetch_add(&e->inflight, (uint32_t)n, __ATOMIC_ACQ_REL);
    if (n == 1 && before == 0) {
        serve(first, 0);
        return;
    }
    struct req *pool_first = NULL, *pool_last = NULL;
    int pool_n = 0;
    for (struct req *req = first, *next; req; req = next) {
        next = req->next;
        if (serve(req, 1) == 0)
            continue;                     /* done (req went back to the free list) */
        req->next = NULL;
        if (pool_last)
            pool_last->next = req;
        else
            pool_first = req;
        pool_last = req;
        pool_n++;
    }
    if (pool_n)
        submit_batch(e, pool_first, pool_last, pool_n);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* After serving a kick, watch avail->idx for poll_us before sleeping again (QEMU's
 * poll-max-ns): a driver that submits its next request within that window is served
 * without a kick's wake-up. A full window with nothing new costs poll_us of CPU. */
static void poll_ring(struct queue *q) {
    struct engine *e = q->e;
    uint64_t window = (uint64_t)e->cfg.poll_us * 1000u;
    if (!window)
        return;
    uint64_t deadline = now_ns() + window;
    while (!__atomic_load_n(&e->failed, __ATOMIC_ACQUIRE)) {
        /* next_avail is only written by this thread: reading it unlocked is safe */
        if (load16(q->avail + 2) != q->next_avail) {
            handle_queue(q);
            stat_add(&e->stats.polled, 1);
            deadline = now_ns() + window;
            continue;
        }
        if (now_ns() >= deadline)
            return;
        __builtin_ia32_pause();
    }
}

static void *queue_main(void *arg) {
    struct queue *q = arg;
    struct engine *e = q->e;
    struct pollfd fds[2] = {{q->kick_fd, POLLIN, 0}, {e->stop_fd, POLLIN, 0}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            engine_fail(e, "queue %d: poll failed: %s", q->index, strerror(errno));
            return NULL;
        }
        if (fds[1].revents)
            return NULL;
        if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            engine_fail(e, "queue %d: kick eventfd failed", q->index);
            return NULL;
        }
        eventfd_t v;
        if (eventfd_read(q->kick_fd, &v) < 0 && errno != EAGAIN)
            continue;
        if (!__atomic_load_n(&e->failed, __ATOMIC_ACQUIRE)) {
            handle_queue(q);
            poll_ring(q);
        }
    }
}

/* -- the API (see _engine.h) ------------------------------------------------------------ */

struct engine *blk_engine_new(const struct blk_config *cfg, const struct blk_region *regions,
                              int nregions, int nqueues, uint64_t capacity) {
    if (nregions < 1 || nqueues < 1 || cfg->io_threads < 1)
        return NULL;
    struct engine *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->cfg = *cfg;
    e->regions = calloc((size_t)nregions, sizeof *regions);
    e->queues = calloc((size_t)nqueues, sizeof *e->queues);
    e->workers = calloc((size_t)cfg->io_threads, sizeof *e->workers);
    e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!e->regions || !e->queues || !e->workers || e->stop_fd < 0) {
        blk_engine_free(e);
        return NULL;
    }
    memcpy(e->regions, regions, (size_t)nregions * sizeof *regions);
    e->nregions = nregions;
    e->nqueues = nqueues;
    e->capacity = capacity;
    e->align = cfg->direct_align ? cfg->direct_align : 512;
    pthread_mutex_init(&e->msg_lock, NULL);
    pthread_mutex_init(&e->pool_lock, NULL);
    pthread_cond_init(&e->pool_cond, NULL);
    pthread_cond_init(&e->idle_cond, NULL);
    for (int i = 0; i < nqueues; i++) {
        e->queues[i].e = e;
        e->queues[i].index = i;
        e->queues[i].kick_fd = -1;
        pthread_mutex_init(&e->queues[i].lock, NULL);
    }
    return e;
}

int blk_engine_set_queue(struct engine *e, int index, const struct blk_queue_config *c) {
    if (index < 0 || index >= e->nqueues || c->size == 0 || c->size > 32768 ||
        (c->size & (c->size - 1)))
        return -EINVAL;
    struct queue *q = &e->queues[index];
    /* The transport validated the rings (prepare_queues); translate them once here. */
    q->desc = mem_ptr(e, c->desc, 16ull * c->size);
    q->avail = mem_ptr(e, c->avail, 6ull + 2ull * c->size);
    q->used = mem_ptr(e, c->used, 6ull + 8ull * c->size);
    if (!q->desc || !q->avail || !q->used || c->avail % 2 || c->used % 4)
        return -EFAULT;
    q->size = c->size;
    q->desc_gpa = c->desc;
    q->event_idx = c->event_idx;
    q->indirect = c->indirect;
    q->next_avail = c->next_avail;
    q->next_used = q->signalled_used = c->next_used;
    q->kick_fd = c->kick_fd;
    q->call_fd = c->call_fd;
    q->irq_fd = c->irq_fd;
    return 0;
}

int blk_engine_start(struct engine *e) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    int err = 0;
    for (int i = 0; i < e->cfg.io_threads && !err; i++) {
        err = pthread_create(&e->workers[i], &attr, worker_main, e);
        if (!err)
            e->nworkers++;
    }
    for (int i = 0; i < e->nqueues && !err; i++) {
        if (e->queues[i].kick_fd < 0)
            continue;                         /* not ready: the driver did not set it up */
        err = pthread_create(&e->queues[i].thread, &attr, queue_main, &e->queues[i]);
        if (!err)
            e->queues[i].started = 1;
    }
    pthread_attr_destroy(&attr);
    if (err)
        blk_engine_stop(e);
    return -err;
}

void blk_engine_stop(struct engine *e) {
    eventfd_write(e->stop_fd, 1);
    for (int i = 0; i < e->nqueues; i++) {
        if (e->queues[i].started) {
            pthread_join(e->queues[i].thread, NULL);
            e->queues[i].started = 0;
        }
    }
    /* every popped request is queued or running: wait for them, then end the pool */
    pthread_mutex_lock(&e->pool_lock);
    while (__atomic_load_n(&e->inflight, __ATOMIC_ACQUIRE) != 0 && e->nworkers)
        pthread_cond_wait(&e->idle_cond, &e->pool_lock);
    e->pool_stop = 1;
    pthread_cond_broadcast(&e->pool_cond);
    pthread_mutex_unlock(&e->pool_lock);
    for (int i = 0; i < e->nworkers; i++)
        pthread_join(e->workers[i], NULL);
    e->nworkers = 0;
}

void blk_engine_set_capacity(struct engine *e, uint64_t sectors) {
    __atomic_store_n(&e->capacity, sectors, __ATOMIC_RELEASE);
}

void blk_engine_set_irq_fd(struct engine *e, int index, int fd) {
    if (index >= 0 && index < e->nqueues)
        __atomic_store_n(&e->queues[index].irq_fd, fd, __ATOMIC_RELEASE);
}

void blk_engine_queue_state(struct engine *e, int index, uint16_t *next_avail,
                            uint16_t *next_used) {
    if (index < 0 || index >= e->nqueues)
        return;
    pthread_mutex_lock(&e->queues[index].lock);
    *next_avail = e->queues[index].next_avail;
    *next_used = e->queues[index].next_used;
    pthread_mutex_unlock(&e->queues[index].lock);
}

int blk_engine_messages(struct engine *e, char *reason, char *last_error, size_t n) {
    pthread_mutex_lock(&e->msg_lock);
    snprintf(reason, n, "%s", e->reason);
    snprintf(last_error, n, "%s", e->last_error);
    e->last_error[0] = '\0';
    int failed = e->failed;
    pthread_mutex_unlock(&e->msg_lock);
    return failed;
}

void blk_engine_stats(struct engine *e, struct blk_stats *out) {
    pthread_mutex_lock(&e->msg_lock);
    *out = e->stats;
    out->peak_in_disk = __atomic_load_n(&e->peak_in_disk, __ATOMIC_RELAXED);
    out->inflight = __atomic_load_n(&e->inflight, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&e->msg_lock);
}

static void free_reqs(struct req *r) {
    while (r) {
        struct req *next = r->next;
        free(r->r.v);
        free(r->w.v);
        free(r->iov);
        free(r);
        r = next;
    }
}

void blk_engine_free(struct engine *e) {
    if (!e)
        return;
    if (e->queues) {
        for (int i = 0; i < e->nqueues; i++) {
            free_reqs(e->queues[i].free_reqs);
            pthread_mutex_destroy(&e->queues[i].lock);
        }
    }
    if (e->stop_fd >= 0)
        close(e->stop_fd);
    free(e->queues);
    free(e->regions);
    free(e->workers);
    free(e);
}
