/*
 * Internals shared by the native virtio-blk engine's three files:
 *   _ring.c    guest memory translation, popping and validating chains, the used ring
 *   _blk.c     executing one request against the file (preadv2/pwritev2, fallocate)
 *   _engine.c  the queue threads, the worker pool and the API of _engine.h
 * See _engine.c for the design; every guest-controlled number is checked in _ring.c
 * (addresses, lengths, indexes) or _blk.c (request header and payload).
 */
#ifndef VMM_BLK_ENGINE_INT_H
#define VMM_BLK_ENGINE_INT_H
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
#define USED_F_NO_NOTIFY 1
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
    int notify_off;             /* queue thread: polling, so the driver need not kick */
    uint32_t poll_ns;           /* queue thread: the adaptive polling window */
    int kick_fd, call_fd;
    int irq_fd;                 /* under lock: >= 0 write it directly, else call_fd */
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
    int stopping;               /* atomic: blk_engine_stop began (ends ring polling) */
    int failed;                 /* atomic */
    char reason[256];           /* the first failure, set once under msg_lock */
    char last_error[256];       /* the last disk error, under msg_lock */
    uint32_t unreported_errors; /* disk errors since Python last read them, under msg_lock */
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

/* -- shared by the three files (hidden: the extension exports only blk_engine_*) ------ */

/* _ring.c: guest memory and the split ring (vmmcore/virtio/queue.py's checks) */
uint8_t *mem_ptr(const struct engine *e, uint64_t gpa, uint64_t len);
void engine_fail(struct engine *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void disk_error(struct engine *e, const char *what, uint64_t off, int err);
int pop(struct queue *q, struct req *req);
int set_notify(struct queue *q, int on);
void add_used(struct queue *q, uint16_t head, uint32_t written);
int needs_interrupt(struct queue *q);
void signal_queue(struct queue *q);

/* _blk.c: one request (vmm_virtio_blk/pyengine.py's checks) */
int execute(struct engine *e, struct req *req, int nowait, uint32_t *written);

#endif
