/* The native virtio-blk engine's API (_engine.c). _engine_build.py gives these
 * declarations to cffi as they are, minus the lines starting with '#'. */
#include <stddef.h>
#include <stdint.h>

/* One guest RAM region and where it is mapped in this process. */
struct blk_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t host;              /* host virtual address of gpa */
};

/* The disk and the negotiated device behaviour. */
struct blk_config {
    int fd;                     /* the image, buffered (read-only or read-write) */
    int direct_fd;              /* the same file opened O_DIRECT, or -1 */
    int64_t file_offset;        /* disk byte 0 is at this file offset */
    uint32_t direct_align;      /* O_DIRECT alignment to try first (512) */
    int read_only;              /* OUT, DISCARD, WRITE_ZEROES get IOERR */
    int writethrough;           /* FLUSH not negotiated: sync after every write */
    int flush_syncs;            /* FLUSH calls fdatasync (not on a read-only image) */
    int can_discard;            /* DISCARD offered */
    int can_write_zeroes;       /* WRITE_ZEROES offered */
    int may_unmap;              /* WRITE_ZEROES with UNMAP may punch holes */
    int block_device;           /* the image is a block device: never punch holes */
    uint8_t serial[20];         /* GET_ID, NUL padded */
    int io_threads;             /* worker pool size */
    uint32_t poll_us;           /* watch the ring this long after a kick (0: never) */
    int event_fd;               /* written on a failure or a disk error */
};

/* One virtqueue as the transport configured it (validated by prepare_queues). */
struct blk_queue_config {
    uint16_t size;
    uint64_t desc, avail, used;
    int event_idx, indirect;
    uint16_t next_avail, next_used;
    int kick_fd;                /* the queue's ioeventfd */
    int call_fd;                /* "signal this queue" to Python */
    int irq_fd;                 /* the vector's irqfd when writing it is enough, or -1 */
};

struct blk_stats {
    uint64_t requests, reads, writes, flushes, discards, write_zeroes, disk_errors;
    uint64_t irqfd_signals, python_signals;
    uint64_t served_inline;     /* batch requests the queue thread served without blocking */
    uint64_t polled;            /* ring checks that found work without a kick */
    uint32_t peak_in_disk;      /* most requests inside a disk call at once */
    uint32_t inflight;
    uint32_t poll_ns;           /* the widest queue polling window now (ns; 0: asleep) */
};

struct engine;

struct engine *blk_engine_new(const struct blk_config *cfg, const struct blk_region *regions,
                              int nregions, int nqueues, uint64_t capacity);
int blk_engine_set_queue(struct engine *e, int index, const struct blk_queue_config *c);
int blk_engine_start(struct engine *e);
void blk_engine_stop(struct engine *e);
void blk_engine_set_capacity(struct engine *e, uint64_t sectors);
void blk_engine_set_irq_fd(struct engine *e, int index, int fd);
void blk_engine_queue_state(struct engine *e, int index, uint16_t *next_avail,
                            uint16_t *next_used);
/* The failure reason (returns failed), the last disk error and how many disk errors
 * happened since the previous call (the text is only the last one's). */
int blk_engine_messages(struct engine *e, char *reason, char *last_error, size_t n,
                        uint32_t *errors);
void blk_engine_stats(struct engine *e, struct blk_stats *out);
void blk_engine_free(struct engine *e);
