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
#include "_engine_int.h"

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

/* A singly linked list of requests (a popped batch, the part of it for the pool). */
struct req_list {
    struct req *first, *last;
    int n;
};

static void list_push(struct req_list *l, struct req *req) {
    req->next = NULL;
    if (l->last)
        l->last->next = req;
    else
        l->first = req;
    l->last = req;
    l->n++;
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
    struct req_list popped = {0};
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
        list_push(&popped, req);
    }
    if (!popped.n)
        return;
    uint32_t before = __atomic_fetch_add(&e->inflight, (uint32_t)popped.n, __ATOMIC_ACQ_REL);
    if (popped.n == 1 && before == 0) {
        serve(popped.first, 0);
        return;
    }
    struct req_list blocked = {0};
    for (struct req *req = popped.first, *next; req; req = next) {
        next = req->next;
        if (serve(req, 1) != 0)           /* else done: req went back to the free list */
            list_push(&blocked, req);
    }
    if (blocked.n)
        submit_batch(e, blocked.first, blocked.last, blocked.n);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Take the kick counter without ever blocking. The kick eventfd is the transport's and
 * stays blocking for its other users (O_NONBLOCK on it, or on a dup, which shares the
 * file status flags, would change what they see; /proc/self/fd reopening is refused for
 * an eventfd). RWF_NOWAIT makes this one read non-blocking: if something else drained
 * the counter between poll() and here, it is EAGAIN (nothing to do), not a thread stuck
 * in read() that stop() would wait for forever. A kernel without RWF_NOWAIT on eventfds
 * (EOPNOTSUPP, before 5.x) gets the plain read. */
static void take_kick(struct queue *q) {
    uint64_t v;
    struct iovec iov = {&v, sizeof v};
    if (preadv2(q->kick_fd, &iov, 1, -1, RWF_NOWAIT) < 0 && errno == EOPNOTSUPP)
        (void)!read(q->kick_fd, &v, sizeof v);
}

/* After serving a kick, watch avail->idx instead of sleeping, with the driver's kicks
 * off (QEMU's adaptive AioContext polling; poll_us is its poll-max-ns): a driver that
 * submits its next request within the window is served without a kick or a wake-up on
 * either side. The window adapts as QEMU's does: it starts at POLL_START_NS when a
 * kick follows the last service within poll_us, doubles (up to poll_us) each time the
 * thread slept but would have caught the request by polling longer, and drops to 0
 * when requests come further apart than poll_us, where polling would only burn a CPU.
 * Returns, with kicks on again, when a window passes with nothing new: the time that
 * window began, i.e. when the ring was last served. */
#define POLL_START_NS 4000u

static int polling_stops(struct engine *e) {
    return __atomic_load_n(&e->failed, __ATOMIC_ACQUIRE) ||
           __atomic_load_n(&e->stopping, __ATOMIC_ACQUIRE);
}

static uint64_t poll_ring(struct queue *q) {
    struct engine *e = q->e;
    for (;;) {
        uint64_t served = now_ns(), deadline = served + q->poll_ns;
        int found = 0;
        if (q->poll_ns) {
            set_notify(q, 0);
            while (!polling_stops(e)) {
                /* next_avail is only written by this thread: reading it unlocked is safe */
                if (load16(q->avail + 2) != q->next_avail) {
                    found = 1;
                    break;
                }
                if (now_ns() >= deadline)
                    break;
                __builtin_ia32_pause();
            }
        }
        if (!found && !set_notify(q, 1))
            return served;
        if (polling_stops(e)) {
            set_notify(q, 1);
            return served;
        }
        /* A kick sent before kicks went off (or racing that) is for what is served
         * now: taken here, it cannot wake the thread later as if a request came. */
        take_kick(q);
        /* counted first: whoever sees the completion also sees it counted */
        stat_add(&e->stats.polled, 1);
        handle_queue(q);
    }
}

/* A kick woke the queue thread `idle_ns` after it last served the ring (its polling
 * included): adapt the polling window (see poll_ring). */
static void adapt_poll(struct queue *q, uint64_t idle_ns) {
    uint64_t max = (uint64_t)q->e->cfg.poll_us * 1000u, w = q->poll_ns;
    if (idle_ns > max)
        w = 0;
    else if (idle_ns > w)
        w = w ? (2 * w < max ? 2 * w : max) : (POLL_START_NS < max ? POLL_START_NS : max);
    __atomic_store_n(&q->poll_ns, (uint32_t)w, __ATOMIC_RELAXED);   /* stats read it */
}

static void *queue_main(void *arg) {
    struct queue *q = arg;
    struct engine *e = q->e;
    struct pollfd fds[2] = {{q->kick_fd, POLLIN, 0}, {e->stop_fd, POLLIN, 0}};
    uint64_t idle_since = 0;    /* when the ring was last served (with poll_us) */
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
        take_kick(q);
        /* A wake-up with nothing new (a kick that an earlier service already covered)
         * says nothing about how far apart requests come, and opens no window. */
        int fresh = load16(q->avail + 2) != q->next_avail;
        if (e->cfg.poll_us && fresh)
            adapt_poll(q, now_ns() - idle_since);
        if (!__atomic_load_n(&e->failed, __ATOMIC_ACQUIRE)) {
            handle_queue(q);
            if (e->cfg.poll_us && fresh)
                idle_since = poll_ring(q);
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
    if (e->cfg.poll_us > 1000)        /* the plugin allows 0..1000; keep ns in 32 bits */
        e->cfg.poll_us = 1000;
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
    __atomic_store_n(&e->stopping, 1, __ATOMIC_RELEASE);   /* ends ring polling */
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

/* Under the queue's lock, which every completion holds from choosing the fd to writing
 * it (serve -> signal_queue): when this returns, no thread is about to write the old fd.
 * The MSI-X listener relies on that: after a mask it returns, the guest may rewrite the
 * vector's route, and an interrupt must go to the pending bit, not the old route. */
void blk_engine_set_irq_fd(struct engine *e, int index, int fd) {
    if (index < 0 || index >= e->nqueues)
        return;
    struct queue *q = &e->queues[index];
    pthread_mutex_lock(&q->lock);
    __atomic_store_n(&q->irq_fd, fd, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&q->lock);
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

int blk_engine_messages(struct engine *e, char *reason, char *last_error, size_t n,
                        uint32_t *errors) {
    pthread_mutex_lock(&e->msg_lock);
    snprintf(reason, n, "%s", e->reason);
    snprintf(last_error, n, "%s", e->last_error);
    e->last_error[0] = '\0';
    *errors = e->unreported_errors;
    e->unreported_errors = 0;
    int failed = e->failed;
    pthread_mutex_unlock(&e->msg_lock);
    return failed;
}

void blk_engine_stats(struct engine *e, struct blk_stats *out) {
    pthread_mutex_lock(&e->msg_lock);
    *out = e->stats;
    out->peak_in_disk = __atomic_load_n(&e->peak_in_disk, __ATOMIC_RELAXED);
    out->inflight = __atomic_load_n(&e->inflight, __ATOMIC_RELAXED);
    out->poll_ns = 0;
    for (int i = 0; i < e->nqueues; i++) {
        uint32_t w = __atomic_load_n(&e->queues[i].poll_ns, __ATOMIC_RELAXED);
        out->poll_ns = w > out->poll_ns ? w : out->poll_ns;
    }
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

