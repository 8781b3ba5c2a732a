/*
 * iopoll_check DEVICE: polled block I/O through io_uring (IORING_SETUP_IOPOLL) on an
 * O_DIRECT block device, the way fio --hipri or an SPDK-like reader does it. The kernel
 * sends such requests to virtio_blk's poll queues (module option poll_queues): queues
 * created without an interrupt, whose completions the submitting task reaps by calling
 * virtqueue_get_buf itself. Where there is no poll queue, Linux (6.1) quietly sends the
 * request down the interrupt path instead, so success here does not prove polling: the
 * scenario counts the request queues' interrupts around this program for that.
 *
 * The host filled the disk so that every 4 KiB block starts with its block number
 * (u64, little endian) followed by the bytes (block + i) & 0xff. This program:
 *   - reads blocks 0..63 one at a time, and 8 reads of 16 KiB at once, checking every byte;
 *   - writes blocks 256..271 (the byte 0xA5 ^ block everywhere, one at a time and 8 at
 *     once), reads them back polled and checks them; the host checks the image after.
 * Prints "E2E: iopoll=ok iopoll-ios=N" or "E2E: iopoll=FAILED-<what>" and exits 0 / 1.
 * Raw io_uring syscalls: liburing is not in the level-2 image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCK 4096
#define DEPTH 8

struct ring {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static int ios;

static void fail(const char *what, long value) {
    printf("E2E: iopoll=FAILED-%s(%ld)\n", what, value);
    fflush(stdout);
    exit(1);
}

static void ring_setup(struct ring *r) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_IOPOLL;
    r->fd = (int)syscall(__NR_io_uring_setup, DEPTH, &p);
    if (r->fd < 0)
        fail("setup", errno);
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    uint8_t *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       r->fd, IORING_OFF_SQ_RING);
    uint8_t *cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       r->fd, IORING_OFF_CQ_RING);
    r->sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || r->sqes == MAP_FAILED)
        fail("mmap", errno);
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}

static void queue_io(struct ring *r, int fd, int op, void *buf, unsigned len, uint64_t off,
                     uint64_t tag) {
    unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = (uint8_t)op;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len;
    sqe->off = off;
    sqe->user_data = tag;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

/* Submit what is queued and poll until n completions, each of `len` bytes. */
static void submit_and_reap(struct ring *r, unsigned n, unsigned len) {
    unsigned done = 0;
    int submit = (int)n;
    while (done < n) {
        long got = syscall(__NR_io_uring_enter, r->fd, submit, 1, IORING_ENTER_GETEVENTS,
                           NULL, 0);
        if (got < 0 && errno != EINTR && errno != EAGAIN)
            fail("enter", errno);
        if (got > 0)
            submit -= (int)got;
        unsigned head = *r->cq_head;
        while (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            if (cqe->res < 0)
                fail("io", -cqe->res);
            if ((unsigned)cqe->res != len)
                fail("short", cqe->res);
            head++;
            done++;
            ios++;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
}

static void fill_expected(uint8_t *b, uint64_t block) {
    for (unsigned i = 0; i < BLOCK; i++)
        b[i] = (uint8_t)(block + i);
    memcpy(b, &block, 8);
}

static void check_read(const uint8_t *buf, uint64_t first, unsigned blocks) {
    static uint8_t want[BLOCK];
    for (unsigned k = 0; k < blocks; k++) {
        fill_expected(want, first + k);
        if (memcmp(buf + (size_t)k * BLOCK, want, BLOCK))
            fail("data", (long)(first + k));
    }
}

static void check_written(const uint8_t *buf, uint64_t block) {
    for (unsigned i = 0; i < BLOCK; i++)
        if (buf[i] != (uint8_t)(0xA5 ^ block))
            fail("readback", (long)block);
}

int main(int argc, char **argv) {
    if (argc != 2)
        fail("usage", argc);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0)
        fail("open", errno);
    struct ring r;
    ring_setup(&r);
    uint8_t *buf = aligned_alloc(BLOCK, (size_t)DEPTH * 4 * BLOCK);
    if (!buf)
        fail("alloc", 0);

    for (uint64_t b = 0; b < 64; b++) {                       /* QD1 reads */
        queue_io(&r, fd, IORING_OP_READ, buf, BLOCK, b * BLOCK, b);
        submit_and_reap(&r, 1, BLOCK);
        check_read(buf, b, 1);
    }
    for (unsigned i = 0; i < DEPTH; i++)                      /* 8 x 16 KiB at once */
        queue_io(&r, fd, IORING_OP_READ, buf + (size_t)i * 4 * BLOCK, 4 * BLOCK,
                 (64 + 4 * (uint64_t)i) * BLOCK, i);
    submit_and_reap(&r, DEPTH, 4 * BLOCK);
    check_read(buf, 64, DEPTH * 4);

    for (uint64_t b = 256; b < 264; b++) {                    /* QD1 writes */
        memset(buf, 0xA5 ^ (int)b, BLOCK);
        queue_io(&r, fd, IORING_OP_WRITE, buf, BLOCK, b * BLOCK, b);
        submit_and_reap(&r, 1, BLOCK);
    }
    for (unsigned i = 0; i < DEPTH; i++) {                    /* 8 writes at once */
        uint64_t b = 264 + i;
        memset(buf + (size_t)i * BLOCK, 0xA5 ^ (int)b, BLOCK);
        queue_io(&r, fd, IORING_OP_WRITE, buf + (size_t)i * BLOCK, BLOCK, b * BLOCK, b);
    }
    submit_and_reap(&r, DEPTH, BLOCK);
    for (uint64_t b = 256; b < 272; b++) {                    /* read them back */
        queue_io(&r, fd, IORING_OP_READ, buf, BLOCK, b * BLOCK, b);
        submit_and_reap(&r, 1, BLOCK);
        check_written(buf, b);
    }
    if (fsync(fd) < 0)
        fail("fsync", errno);
    printf("E2E: iopoll=ok iopoll-ios=%d\n", ios);
    fflush(stdout);
    return 0;
}
