/*
 * tests/virtio_blk: drives a virtio-blk device (1af4:1042) with the runtime's virtio-pci
 * driver (same bring-up as tests/virtio_rng: both enumeration mechanisms, BARs assigned
 * by the guest, MSI-X entry 0 -> vector 0x40, one queue), then:
 *
 *   reads the capacity from the device configuration      "virtio-blk: capacity N sectors"
 *   reads sector 0 and prints its first 64 bytes          "sector0: <128 hex digits>"
 *   writes PATTERN (below) to sector 1, flushes, reads sector 1 back and compares
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
 *   0xe0|v  unexpected CPU exception v
 * Command line: `nomsix=1` polls instead of waiting for interrupts.
 */
#include "irq.h"
#include "runtime.h"
#include "virtio.h"

#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_S_OK 0
#define SECTOR 512
#define BLK_VECTOR IRQ_VECTOR_DEVICE0
#define PATTERN_TEXT "vmm virtio-blk test: sector 1\n"

struct blk_req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct blk_req_hdr hdr __attribute__((aligned(16)));
static u8 data[SECTOR] __attribute__((aligned(512)));
static u8 pattern[SECTOR];
static volatile u8 status;

static int want_irq, irqs, polled;

/* One request: header, optional data, status.  Returns the status byte (0 = OK), or
 * -(exit status) if the request failed at the transport level. */
static int blk_request(struct virtio_dev *d, u32 type, u64 sector, int has_data, int data_in)
{
	struct virtq *q = &d->vq[0];
	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = 0xff;
	struct virtq_buf b[3];
	unsigned n = 0;
	b[n++] = (struct virtq_buf){ (u64)(uintptr_t)&hdr, sizeof(hdr), 0 };
	if (has_data)
		b[n++] = (struct virtq_buf){ (u64)(uintptr_t)data, SECTOR, data_in };
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

int main(const void *bp)
{
	char arg[8];
	want_irq = !(cmdline_get(boot_cmdline(bp), "nomsix", arg, sizeof(arg)) && arg[0] == '1');
	const u16 id = VIRTIO_PCI_MODERN_ID(VIRTIO_ID_BLOCK);

	static struct pci_func cf8[32], ecam[32];
	unsigned ncf8 = pci_scan(PCI_CF8, cf8, ARRAY_SIZE(cf8));
	struct pci_func f;
	if (pci_find(PCI_CF8, VIRTIO_PCI_VENDOR, id, &f)) {
		puts("virtio-blk: no 1af4:1042 on bus 0 (0xcf8 scan)");
		return 2;
	}
	if (!pci_ecam()->base) {
		puts("virtio-blk: no MCFG table");
		return 3;
	}
	unsigned necam = pci_scan(PCI_ECAM, ecam, ARRAY_SIZE(ecam));
	int same = ncf8 == necam;
	for (unsigned i = 0; same && i < ncf8 && i < ARRAY_SIZE(cf8); i++)
		same = cf8[i].dev == ecam[i].dev && cf8[i].vendor == ecam[i].vendor &&
		       cf8[i].device == ecam[i].device;
	if (!same || pci_find(PCI_ECAM, VIRTIO_PCI_VENDOR, id, &f)) {
		puts("virtio-blk: the ECAM scan differs from the 0xcf8 scan");
		return 4;
	}
	struct pci_window mem = { PCI_LOW_MMIO_START, PCI_LOW_MMIO_END };
	struct pci_window io = { PCI_IO_START, PCI_IO_END };
	/* every function gets its BARs, in bus order, like firmware would do */
	if (pci_assign_all(ecam, necam < ARRAY_SIZE(ecam) ? necam : ARRAY_SIZE(ecam), &mem, &io)) {
		puts("virtio-blk: BAR assignment failed");
		return 5;
	}
	for (unsigned i = 0; i < necam && i < ARRAY_SIZE(ecam); i++) {
		if (ecam[i].dev == f.dev && ecam[i].fn == f.fn)
			f = ecam[i];
		for (unsigned b = 0; b < 6; b++)
			if (ecam[i].bar_addr[b])
				printf("pci 00:%02x.%u bar%u %#lx size %#lx\n", ecam[i].dev, ecam[i].fn,
				       b, ecam[i].bar_addr[b], ecam[i].bar_size[b]);
	}
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
					  1ULL << VIRTIO_BLK_F_BLK_SIZE);
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
	printf("virtio-blk: %d request(s) signalled by MSI-X, %d seen by polling\n", irqs, polled);
	if (irqs)
		puts("msix interrupt received");
	if (want_irq && polled) {
		puts("virtio-blk: a request completed without an MSI-X interrupt");
		return 31;
	}
	virtio_reset(&d);
	puts("virtio-blk: OK");
	return 0;
}
