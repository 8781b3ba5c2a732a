/*
 * tests/virtio_blk: drives a virtio-blk device (1af4:1042) with the runtime's virtio-pci
 * driver (same bring-up as tests/virtio_rng: both enumeration mechanisms, BARs assigned
 * by the guest, MSI-X entry 0 -> vector 0x40, one queue), then:
 *
 *   reads the capacity from the device configuration      "virtio-blk: capacity N sectors"
 *   reads sector 0 and prints its first 64 bytes          "sector0: <128 hex digits>"
 *   writes PATTERN (below) to sector 1, flushes, reads sector 1 back and compares
 *   DISCARD and WRITE_ZEROES (negotiated when offered; see "Discard" below)
 *   "virtio-blk: OK"
 *
 * PATTERN, what the host checks in the image afterwards: the ASCII text
 * "vmm virtio-blk test: sector 1\n" then, for i from 30 to 511, the byte (i * 7 + 1) & 0xff.
 *
 * Exit status (0 = success):
 *   2  no 1af4:1042 in the 0xcf8 scan      3  no MCFG / ECAM window
 *   4  ECAM scan differs from 0xcf8 scan  5  BAR sizing/assignment failed
 *   6  the local APIC is disabled
 *   10+n  virtio bring-up failed with VIRTIO_ERR_n (see tests/virtio_rng.c / virtio.h)
 *   20 a request was never completed      21 used element with the wrong id
 *   22 reading sector 0 failed (status)   23 capacity below 2 sectors
 *   24 the device is read-only (VIRTIO_BLK_F_RO)   25 no VIRTIO_BLK_F_FLUSH
 *   26 writing sector 1 failed            27 flush failed
 *   28 reading sector 1 back failed       29 sector 1 read back differs from what was written
 *   30 DEVICE_NEEDS_RESET while running   31 requests completed without any MSI-X interrupt
 *   32 DISCARD/WRITE_ZEROES negotiated but its config limits are unusable (max sectors < 4,
 *      max segments 0, or write-zeroes max sectors < 2)
 *   33 writing ZPATTERN to the sectors to be zeroed failed (status)
 *   34 reading them back before zeroing failed (status) or they differ from ZPATTERN
 *   35 DISCARD of sectors 2-5 failed (status)
 *   36 WRITE_ZEROES of sectors 6-7 or 8-9 failed (status)
 *   37 the flush after zeroing failed     38 reading the zeroed sectors back failed (status)
 *   39 a discarded sector (2-5) does not read back as zeroes
 *   40 a write-zeroed sector (6-9) does not read back as zeroes
 *   0xe0|v  unexpected CPU exception v
 *
 * Discard (after sector 1, before the MSI-X summary).  Sectors 2-5 are the DISCARD range
 * and sectors 6-9 the WRITE_ZEROES range; a range is used only if its feature was
 * negotiated, and each missing one prints its own line and is not a failure:
 *   "discard: not offered"                        (VIRTIO_BLK_F_DISCARD, bit 13)
 *   "write-zeroes: not offered"                   (VIRTIO_BLK_F_WRITE_ZEROES, bit 14)
 * A disk below 10 sectors skips both ("discard: capacity below 10 sectors, skipped").
 * Otherwise, one line per step:
 *   "discard: max_discard_sectors N, max_discard_seg N, discard_sector_alignment N"
 *   "write-zeroes: max_write_zeroes_sectors N, max_write_zeroes_seg N, may_unmap N"
 *   "discard: sectors A-B written and read back"  (ZPATTERN over the ranges in use)
 *   "discard: sectors 2-5 discarded"              (one segment, flags 0: the unmap
 *                                                  flag is for WRITE_ZEROES only)
 *   "write-zeroes: sectors 6-7 zeroed"            (flags 0)
 *   "write-zeroes: sectors 8-9 zeroed with unmap" (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
 *   "discard: flushed"
 *   "discard: sectors 2-5 read back as zeroes"
 *   "write-zeroes: sectors 6-9 read back as zeroes"
 * Reading a discarded range as zeroes is what this VMM's raw format gives (a punched
 * hole, on a host file system that can punch holes); the virtio spec does not promise
 * any particular data after DISCARD, so 39 tests this VMM, not the spec.
 * ZPATTERN: byte i of sector s is (s * 17 + i * 5 + 0x5a) & 0xff (never a zero sector).
 * Command line: `nomsix=1` polls instead of waiting for interrupts; `reads=N` reads
 * sector 0 N more times before the summary ("virtio-blk: N more reads, H halts": H is how
 * many HLTs the waits executed); `hold=1` prints "holding" after "virtio-blk: OK" and then
 * halts with interrupts off instead of exiting, so a test can look at a running VM whose
 * vCPU sits in HLT inside KVM.
 */
#include "irq.h"
#include "runtime.h"
#include "virtio.h"

#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1
/* struct virtio_blk_config offsets (virtio 1.2, 5.2.4) */
#define BLK_CFG_MAX_DISCARD_SECTORS 36
#define BLK_CFG_MAX_DISCARD_SEG 40
#define BLK_CFG_DISCARD_SECTOR_ALIGNMENT 44
#define BLK_CFG_MAX_WRITE_ZEROES_SECTORS 48
#define BLK_CFG_MAX_WRITE_ZEROES_SEG 52
#define BLK_CFG_WRITE_ZEROES_MAY_UNMAP 56
#define ZERO_FIRST 2		/* DISCARD: sectors 2-5, WRITE_ZEROES: sectors 6-9 */
#define ZERO_SECTORS 8
#define VIRTIO_BLK_S_OK 0
#define SECTOR 512
#define BLK_VECTOR IRQ_VECTOR_DEVICE0
#define PATTERN_TEXT "vmm virtio-blk test: sector 1\n"

struct blk_req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* The data of DISCARD and WRITE_ZEROES: one or more of these segments. */
struct blk_discard_write_zeroes {
	u64 sector;
	u32 num_sectors;
	u32 flags;
};

static struct blk_req_hdr hdr __attribute__((aligned(16)));
static u8 data[SECTOR] __attribute__((aligned(512)));
static u8 zdata[ZERO_SECTORS * SECTOR] __attribute__((aligned(512)));
static u8 zpattern[ZERO_SECTORS * SECTOR];
static struct blk_discard_write_zeroes seg __attribute__((aligned(16)));
static u8 pattern[SECTOR];
static volatile u8 status;

static int want_irq, irqs, polled;

static void print_hex(const char *label, const u8 *buf, unsigned n);

/* One request: header, optional data (buf, buflen; device-writable if data_in), status.
 * Returns the status byte (0 = OK), or -(exit status) if the request failed at the
 * transport level. */
static int blk_io(struct virtio_dev *d, u32 type, u64 sector, void *buf, u32 buflen, int data_in)
{
	struct virtq *q = &d->vq[0];
	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = 0xff;
	struct virtq_buf b[3];
	unsigned n = 0;
	b[n++] = (struct virtq_buf){ (u64)(uintptr_t)&hdr, sizeof(hdr), 0 };
	if (buf)
		b[n++] = (struct virtq_buf){ (u64)(uintptr_t)buf, buflen, data_in };
	b[n++] = (struct virtq_buf){ (u64)(uintptr_t)&status, 1, 1 };

	u32 seen = irq_counts[BLK_VECTOR];
	int head = virtq_submit(q, b, n);
	virtq_kick(q);
	int got = want_irq ? irq_wait_vector(BLK_VECTOR, seen, 3000) : 0;
	for (unsigned i = 0; i < 200000 && !virtq_has_used(q); i++)
		cpu_relax();
	if (virtio_status(d) & VIRTIO_STATUS_NEEDS_RESET) {
		puts("virtio-blk: DEVICE_NEEDS_RESET");
		return -30;
	}
	u32 id, len;
	if (virtq_get_used(q, &id, &len)) {
		puts("virtio-blk: request not completed");
		return -20;
	}
	if (got)
		irqs++;
	else
		polled++;
	if (id != (u32)head) {
		printf("virtio-blk: used id %u, expected %d\n", id, head);
		return -21;
	}
	return status;
}

/* A one-sector request on data[] (has_data), or one without data. */
static int blk_request(struct virtio_dev *d, u32 type, u64 sector, int has_data, int data_in)
{
	return blk_io(d, type, sector, has_data ? data : 0, SECTOR, data_in);
}

/* DISCARD or WRITE_ZEROES of one segment (the sector field of the header is unused). */
static int blk_zero(struct virtio_dev *d, u32 type, u64 sector, u32 count, u32 flags)
{
	seg.sector = sector;
	seg.num_sectors = count;
	seg.flags = flags;
	return blk_io(d, type, 0, &seg, sizeof(seg), 0);
}

/* The index of the first sector of zdata[] (sectors ZERO_FIRST..) that is not all zero
 * among [first, first + count), or -1. */
static int nonzero_sector(unsigned first, unsigned count)
{
	for (unsigned s = first; s < first + count; s++) {
		const u8 *p = zdata + (s - ZERO_FIRST) * SECTOR;
		for (unsigned i = 0; i < SECTOR; i++)
			if (p[i])
				return (int)s;
	}
	return -1;
}

/* Sectors 2-5 by DISCARD, 6-9 by WRITE_ZEROES (each only if negotiated); 0 or the exit
 * status.  See "Discard" at the top. */
static int test_discard(struct virtio_dev *d, u64 capacity)
{
	int dis = d->driver_features >> VIRTIO_BLK_F_DISCARD & 1;
	int wz = d->driver_features >> VIRTIO_BLK_F_WRITE_ZEROES & 1;
	if (!dis)
		puts("discard: not offered");
	if (!wz)
		puts("write-zeroes: not offered");
	if (!dis && !wz)
		return 0;
	if (capacity < ZERO_FIRST + ZERO_SECTORS) {
		puts("discard: capacity below 10 sectors, skipped");
		return 0;
	}
	if (dis) {
		u32 max = virtio_cfg_read32(d, BLK_CFG_MAX_DISCARD_SECTORS);
		u32 nseg = virtio_cfg_read32(d, BLK_CFG_MAX_DISCARD_SEG);
		printf("discard: max_discard_sectors %u, max_discard_seg %u, "
		       "discard_sector_alignment %u\n", max, nseg,
		       virtio_cfg_read32(d, BLK_CFG_DISCARD_SECTOR_ALIGNMENT));
		if (max < 4 || !nseg) {
			puts("discard: the device's limits do not allow a 4-sector discard");
			return 32;
		}
	}
	if (wz) {
		u32 max = virtio_cfg_read32(d, BLK_CFG_MAX_WRITE_ZEROES_SECTORS);
		u32 nseg = virtio_cfg_read32(d, BLK_CFG_MAX_WRITE_ZEROES_SEG);
		printf("write-zeroes: max_write_zeroes_sectors %u, max_write_zeroes_seg %u, "
		       "may_unmap %u\n", max, nseg,
		       virtio_cfg_read8(d, BLK_CFG_WRITE_ZEROES_MAY_UNMAP));
		if (max < 2 || !nseg) {
			puts("write-zeroes: the device's limits do not allow a 2-sector write-zeroes");
			return 32;
		}
	}

	/* the ranges in use, as sectors of zdata[] */
	unsigned first = dis ? ZERO_FIRST : ZERO_FIRST + 4;
	unsigned count = (dis && wz) ? ZERO_SECTORS : 4;
	u8 *zbuf = zdata + (first - ZERO_FIRST) * SECTOR;
	u8 *zpat = zpattern + (first - ZERO_FIRST) * SECTOR;
	for (unsigned s = 0; s < ZERO_SECTORS; s++)
		for (unsigned i = 0; i < SECTOR; i++)
			zpattern[s * SECTOR + i] = (u8)((ZERO_FIRST + s) * 17 + i * 5 + 0x5a);
	memcpy(zbuf, zpat, count * SECTOR);
	int rc = blk_io(d, VIRTIO_BLK_T_OUT, first, zbuf, count * SECTOR, 0);
	if (rc < 0)
		return -rc;
	if (rc) {
		printf("discard: write of sectors %u-%u: status %d\n", first, first + count - 1, rc);
		return 33;
	}
	memset(zbuf, 0, count * SECTOR);
	rc = blk_io(d, VIRTIO_BLK_T_IN, first, zbuf, count * SECTOR, 1);
	if (rc < 0)
		return -rc;
	if (rc || memcmp(zbuf, zpat, count * SECTOR)) {
		printf("discard: read of sectors %u-%u: status %d%s\n", first, first + count - 1, rc,
		       rc ? "" : ", data differs from what was written");
		return 34;
	}
	printf("discard: sectors %u-%u written and read back\n", first, first + count - 1);

	if (dis) {
		rc = blk_zero(d, VIRTIO_BLK_T_DISCARD, ZERO_FIRST, 4, 0);
		if (rc < 0)
			return -rc;
		if (rc) {
			printf("discard: discard of sectors 2-5: status %d\n", rc);
			return 35;
		}
		puts("discard: sectors 2-5 discarded");
	}
	if (wz) {
		rc = blk_zero(d, VIRTIO_BLK_T_WRITE_ZEROES, ZERO_FIRST + 4, 2, 0);
		if (rc < 0)
			return -rc;
		if (rc) {
			printf("write-zeroes: sectors 6-7: status %d\n", rc);
			return 36;
		}
		puts("write-zeroes: sectors 6-7 zeroed");
		rc = blk_zero(d, VIRTIO_BLK_T_WRITE_ZEROES, ZERO_FIRST + 6, 2,
			      VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
		if (rc < 0)
			return -rc;
		if (rc) {
			printf("write-zeroes: sectors 8-9 with unmap: status %d\n", rc);
			return 36;
		}
		puts("write-zeroes: sectors 8-9 zeroed with unmap");
	}
	rc = blk_request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
	if (rc < 0)
		return -rc;
	if (rc) {
		printf("discard: flush: status %d\n", rc);
		return 37;
	}
	puts("discard: flushed");

	memset(zbuf, 0xa5, count * SECTOR);
	rc = blk_io(d, VIRTIO_BLK_T_IN, first, zbuf, count * SECTOR, 1);
	if (rc < 0)
		return -rc;
	if (rc) {
		printf("discard: read of sectors %u-%u after zeroing: status %d\n", first,
		       first + count - 1, rc);
		return 38;
	}
	if (dis) {
		int bad = nonzero_sector(ZERO_FIRST, 4);
		if (bad >= 0) {
			print_hex("discard: sector", zdata + (bad - ZERO_FIRST) * SECTOR, 64);
			printf("discard: discarded sector %d does not read as zeroes\n", bad);
			return 39;
		}
		puts("discard: sectors 2-5 read back as zeroes");
	}
	if (wz) {
		int bad = nonzero_sector(ZERO_FIRST + 4, 4);
		if (bad >= 0) {
			print_hex("write-zeroes: sector", zdata + (bad - ZERO_FIRST) * SECTOR, 64);
			printf("write-zeroes: sector %d does not read as zeroes\n", bad);
			return 40;
		}
		puts("write-zeroes: sectors 6-9 read back as zeroes");
	}
	return 0;
}

static void print_hex(const char *label, const u8 *buf, unsigned n)
{
	static const char hex[] = "0123456789abcdef";
	char line[2 * 64 + 1];
	if (n > 64)
		n = 64;
	for (unsigned i = 0; i < n; i++) {
		line[2 * i] = hex[buf[i] >> 4];
		line[2 * i + 1] = hex[buf[i] & 15];
	}
	line[2 * n] = '\0';
	printf("%s: %s\n", label, line);
}

/* reads=N: N more reads of sector 0, each waiting for its interrupt (in HLT, counted in
 * irq_halts), then "virtio-blk: N more reads, H halts". */
static int more_reads(struct virtio_dev *d, const char *cmdline)
{
	char arg[12];
	u64 reads;
	if (!cmdline_get(cmdline, "reads", arg, sizeof(arg)) || !parse_u64(arg, &reads))
		return 0;
	u32 halts = irq_halts;
	for (u64 i = 0; i < reads; i++) {
		int rc = blk_request(d, VIRTIO_BLK_T_IN, 0, 1, 1);
		if (rc < 0)
			return -rc;
		if (rc) {
			printf("virtio-blk: read of sector 0: status %d\n", rc);
			return 22;
		}
	}
	printf("virtio-blk: %lu more reads, %u halts\n", reads, irq_halts - halts);
	return 0;
}

int main(const void *bp)
{
	char arg[8];
	want_irq = !(cmdline_get(boot_cmdline(bp), "nomsix", arg, sizeof(arg)) && arg[0] == '1');
	const u16 id = VIRTIO_PCI_MODERN_ID(VIRTIO_ID_BLOCK);

	struct pci_func f;
	int failed = pci_bring_up(VIRTIO_PCI_VENDOR, id, "virtio-blk", &f);
	if (failed)
		return failed;
	printf("virtio-blk at 00:%02x.%u, BAR0 %#lx size %#lx\n", f.dev, f.fn, f.bar_addr[0],
	       f.bar_size[0]);
	if (irq_init()) {
		puts("virtio-blk: the local APIC is disabled");
		return 6;
	}

	struct virtio_dev d;
	int rc = virtio_probe(&d, &f);
	if (!rc)
		rc = virtio_negotiate(&d, 1ULL << VIRTIO_BLK_F_FLUSH | 1ULL << VIRTIO_BLK_F_RO |
					  1ULL << VIRTIO_BLK_F_BLK_SIZE | 1ULL << VIRTIO_BLK_F_DISCARD |
					  1ULL << VIRTIO_BLK_F_WRITE_ZEROES);
	if (!rc)
		rc = virtio_setup_msix(&d, lapic_id(), BLK_VECTOR);
	if (!rc)
		rc = virtio_setup_queue(&d, 0, 16, 0);
	if (!rc)
		rc = virtio_driver_ok(&d);
	if (rc) {
		printf("virtio-blk: bring-up failed: %s\n", d.error);
		return 10 + rc;
	}
	u64 capacity = virtio_cfg_read64(&d, 0);
	printf("virtio-blk: features %#lx, capacity %lu sectors", d.driver_features, capacity);
	if (d.driver_features >> VIRTIO_BLK_F_BLK_SIZE & 1)
		printf(", blk_size %u", virtio_cfg_read32(&d, 20));
	putc('\n');
	if (d.driver_features >> VIRTIO_BLK_F_RO & 1) {
		puts("virtio-blk: the device is read-only");
		return 24;
	}
	if (!(d.driver_features >> VIRTIO_BLK_F_FLUSH & 1)) {
		puts("virtio-blk: no VIRTIO_BLK_F_FLUSH");
		return 25;
	}
	if (capacity < 2) {
		puts("virtio-blk: capacity below 2 sectors");
		return 23;
	}

	rc = blk_request(&d, VIRTIO_BLK_T_IN, 0, 1, 1);
	if (rc < 0)
		return -rc;
	if (rc) {
		printf("virtio-blk: read of sector 0: status %d\n", rc);
		return 22;
	}
	print_hex("sector0", data, 64);

	memcpy(pattern, PATTERN_TEXT, sizeof(PATTERN_TEXT) - 1);
	for (unsigned i = sizeof(PATTERN_TEXT) - 1; i < SECTOR; i++)
		pattern[i] = (u8)(i * 7 + 1);
	memcpy(data, pattern, SECTOR);
	rc = blk_request(&d, VIRTIO_BLK_T_OUT, 1, 1, 0);
	if (rc < 0)
		return -rc;
	if (rc) {
		printf("virtio-blk: write of sector 1: status %d\n", rc);
		return 26;
	}
	rc = blk_request(&d, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
	if (rc < 0)
		return -rc;
	if (rc) {
		printf("virtio-blk: flush: status %d\n", rc);
		return 27;
	}
	memset(data, 0, SECTOR);
	rc = blk_request(&d, VIRTIO_BLK_T_IN, 1, 1, 1);
	if (rc < 0)
		return -rc;
	if (rc) {
		printf("virtio-blk: read of sector 1: status %d\n", rc);
		return 28;
	}
	if (memcmp(data, pattern, SECTOR)) {
		print_hex("sector1", data, 64);
		puts("virtio-blk: sector 1 differs from what was written");
		return 29;
	}
	puts("virtio-blk: sector 1 written, flushed and read back");
	rc = test_discard(&d, capacity);
	if (rc)
		return rc;
	rc = more_reads(&d, boot_cmdline(bp));
	if (rc)
		return rc;
	printf("virtio-blk: %d request(s) signalled by MSI-X, %d seen by polling\n", irqs, polled);
	if (irqs)
		puts("msix interrupt received");
	if (want_irq && polled) {
		puts("virtio-blk: a request completed without an MSI-X interrupt");
		return 31;
	}
	virtio_reset(&d);
	puts("virtio-blk: OK");
	if (cmdline_get(boot_cmdline(bp), "hold", arg, sizeof(arg)) && arg[0] == '1') {
		puts("holding");
		for (;;)
			__asm__ volatile("cli; hlt" ::: "memory");	/* halted for good */
	}
	return 0;
}
