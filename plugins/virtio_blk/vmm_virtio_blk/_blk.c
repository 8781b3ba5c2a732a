/* One virtio-blk request against the file: what vmm_virtio_blk/pyengine.py does, same
 * checks, same order, same statuses; the I/O is preadv2/pwritev2 straight between the
 * file and guest memory, fdatasync and fallocate, as the raw format does it. */
#include "_engine_int.h"
/* -- moving data: preadv/pwritev straight between the file and guest memory ---------- */

/* Up to max iovecs covering len bytes of the segments, starting `skip` bytes in. */
static uint32_t slice_segs(const struct segs *s, uint64_t skip, uint64_t len,
                           struct iovec *out, uint32_t max) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->n && len && n < max; i++) {
        uint64_t l = s->v[i].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip < len ? l - skip : len;
        out[n].iov_base = s->v[i].host + skip;
        out[n].iov_len = take;
        n++;
        len -= take;
        skip = 0;
    }
    return n;
}

/* The data of a request as iovecs (req->iov): the segments from byte `skip`, len bytes. */
static int build_iov(struct req *req, const struct segs *s, uint64_t skip, uint64_t len,
                     uint32_t *count) {
    if (req->iov_cap < s->n) {
        struct iovec *iov = realloc(req->iov, s->n * sizeof *iov);
        if (!iov)
            return -1;
        req->iov = iov;
        req->iov_cap = s->n;
    }
    *count = slice_segs(s, skip, len, req->iov, s->n);
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

/* Copy n <= 16 bytes (a header or a segment) from the readable segments, `skip` bytes
 * in; each segment is at least one byte, so 16 iovecs always cover them. */
static void gather(const struct segs *s, uint64_t skip, uint8_t *out, uint64_t n) {
    struct iovec v[16];
    uint32_t count = slice_segs(s, skip, n, v, 16);
    for (uint32_t i = 0; i < count; i++) {
        memcpy(out, v[i].iov_base, v[i].iov_len);
        out += v[i].iov_len;
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
int execute(struct engine *e, struct req *req, int nowait, uint32_t *written) {
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

