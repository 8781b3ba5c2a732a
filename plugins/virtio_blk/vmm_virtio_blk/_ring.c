/* The split virtqueue, device side, in C: what vmmcore/virtio/queue.py does (pop,
 * _walk_chain, add_used, needs_interrupt), with the same checks in the same order and
 * the same failure reasons. Every guest address goes through mem_ptr(). */
#include "_engine_int.h"

/* Host pointer of guest range [gpa, gpa+len), or NULL unless it lies inside one region.
 * Written so that nothing overflows: gpa - start <= size - len. */
uint8_t *mem_ptr(const struct engine *e, uint64_t gpa, uint64_t len) {
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
void engine_fail(struct engine *e, const char *fmt, ...) {
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
void disk_error(struct engine *e, const char *what, uint64_t off, int err) {
    pthread_mutex_lock(&e->msg_lock);
    snprintf(e->last_error, sizeof e->last_error, "%s at %llu failed: %s", what,
             (unsigned long long)off, strerror(err));
    e->unreported_errors++;
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
            /* Spec 2.7.5.3.1: no chain longer than the queue size, indirect entries
             * included (visited - 1 direct descriptors came before this one). */
            if (visited - 1 + d.len / 16 > q->size) {
                engine_fail(e, "chain %u: %u descriptors and an indirect table of %u "
                            "entries exceed the queue size (%u)",
                            head, visited - 1, d.len / 16, q->size);
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
int pop(struct queue *q, struct req *req) {
    uint8_t *avail_event = q->used + 4 + 8u * q->size;
    uint16_t pending = (uint16_t)(load16(q->avail + 2) - q->next_avail);
    if (pending == 0) {
        if (!q->event_idx || q->notify_off)
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
    if (q->event_idx && !q->notify_off)
        store16(avail_event, q->next_avail);
    return 1;
}

/* Turn the driver's kicks off while the queue thread polls the ring, and back on
 * before it sleeps (QEMU's virtio_queue_set_notification, vhost's enable/disable_notify).
 * With EVENT_IDX "off" is avail_event one behind the next entry, so that not even the
 * next request kicks (the driver kicks when its new entries cross avail_event; any value
 * is allowed, 2.7.10), and pop leaves it there; "on" republishes next_avail. Without,
 * it is VIRTQ_USED_F_NO_NOTIFY in used->flags. Returns whether chains are waiting once
 * kicks are on again: one published in between would otherwise sit there unkicked.
 * Queue thread only (it alone pops). */
int set_notify(struct queue *q, int on) {
    uint8_t *avail_event = q->used + 4 + 8u * q->size;
    q->notify_off = !on;
    if (q->event_idx) {
        store16(avail_event, (uint16_t)(on ? q->next_avail : q->next_avail - 1u));
    } else {
        store16(q->used, on ? 0 : USED_F_NO_NOTIFY);
    }
    if (!on)
        return 0;
    fence();
    return load16(q->avail + 2) != q->next_avail;
}

/* -- the used ring: add_used / needs_interrupt / signalling ------------------------- */

void add_used(struct queue *q, uint16_t head, uint32_t written) {
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

int needs_interrupt(struct queue *q) {
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

/* Caller holds q->lock (see blk_engine_set_irq_fd). */
void signal_queue(struct queue *q) {
    int fd = __atomic_load_n(&q->irq_fd, __ATOMIC_ACQUIRE);
    if (fd >= 0) {
        eventfd_write(fd, 1);
        stat_add(&q->e->stats.irqfd_signals, 1);
    } else {
        eventfd_write(q->call_fd, 1);
        stat_add(&q->e->stats.python_signals, 1);
    }
}

