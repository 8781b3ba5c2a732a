/*
 * The demo guest `vmm run` boots when no kernel is given.  It shows what the VMM gave it
 * (memory map, CPUs, CPUID, PCI devices, the RTC), brings up each virtio-blk disk with
 * the runtime's virtio-pci driver to print its size and the start of its first sector
 * (read-only: it never writes to a disk), then powers off through ACPI.
 */
#include "irq.h"
#include "runtime.h"
#include "virtio.h"

static void show_cpu(void)
{
	u32 a, b, c, d;
	char vendor[13], brand[49], hv[13];

	cpuid(0, 0, &a, &b, &c, &d);
	__builtin_memcpy(vendor + 0, &b, 4);
	__builtin_memcpy(vendor + 4, &d, 4);
	__builtin_memcpy(vendor + 8, &c, 4);
	vendor[12] = '\0';
	printf("  cpu      %s", vendor);

	cpuid(0x80000000, 0, &a, &b, &c, &d);
	if (a >= 0x80000004) {
		u32 *w = (u32 *)brand;
		for (u32 leaf = 0; leaf < 3; leaf++)
			cpuid(0x80000002 + leaf, 0, &w[leaf * 4], &w[leaf * 4 + 1],
			      &w[leaf * 4 + 2], &w[leaf * 4 + 3]);
		brand[48] = '\0';
		const char *p = brand;
		while (*p == ' ')
			p++;
		if (*p)
			printf(", \"%s\"", p);
	}

	cpuid(1, 0, &a, &b, &c, &d);
	printf(", family %u model %u", ((a >> 8) & 0xf) + ((a >> 20) & 0xff),
	       ((a >> 4) & 0xf) | ((a >> 12) & 0xf0));
	if (c & (1u << 31)) {
		cpuid(0x40000000, 0, &a, &b, &c, &d);
		__builtin_memcpy(hv + 0, &b, 4);
		__builtin_memcpy(hv + 4, &c, 4);
		__builtin_memcpy(hv + 8, &d, 4);
		hv[12] = '\0';
		for (int i = 0; i < 12; i++)
			if (hv[i] && (hv[i] < 0x20 || hv[i] > 0x7e))
				hv[i] = '?';
		printf(", hypervisor \"%s\"", hv);
	}
	putc('\n');
}

static void show_memory(const void *bp)
{
	unsigned n = e820_count(bp);
	if (!n) {
		puts("  memory   no e820 map in boot_params");
		return;
	}
	printf("  memory   e820 map, %u entries:\n", n);
	for (unsigned i = 0; i < n; i++) {
		const struct e820_entry *e = e820_entry(bp, i);
		printf("             %016lx-%016lx  %s\n", e->addr,
		       e->size ? e->addr + e->size - 1 : e->addr, e820_type_name(e->type));
	}
	u64 ram = e820_total_ram(bp);
	printf("  RAM      %lu MiB usable (%lu KiB)\n", ram >> 20, ram >> 10);
}

static void show_acpi(const struct acpi_info *a)
{
	if (!a->rsdp) {
		puts("  ACPI     no RSDP in 0xe0000..0xfffff");
		return;
	}
	printf("  ACPI     RSDP at %#lx rev %u OEM \"%s\", %s at %#lx\n", a->rsdp, a->revision,
	       a->oem_id, a->revision >= 2 ? "XSDT" : "RSDT", a->sdt);
	if (a->madt) {
		printf("  CPUs     %u in the MADT (APIC ids", a->cpus);
		for (unsigned i = 0; i < a->cpus && i < ARRAY_SIZE(a->apic_ids); i++)
			printf(" %u", a->apic_ids[i]);
		printf("), local APIC at %#x\n", a->lapic_addr);
	} else {
		puts("  CPUs     no MADT");
	}
}

/* Modern virtio-pci device ids are 0x1040 + the virtio device type. */
static const char *virtio_name(u16 vendor, u16 device)
{
	static const char *const names[] = {
		[1] = "net", [2] = "block", [3] = "console", [4] = "rng", [5] = "balloon",
		[8] = "scsi", [9] = "9p", [16] = "gpu", [18] = "input", [19] = "vsock",
		[26] = "fs", [40] = "wl",
	};
	if (vendor != 0x1af4 || device < 0x1040 || device >= 0x1040 + ARRAY_SIZE(names))
		return 0;
	return names[device - 0x1040];
}

static void show_pci(void)
{
	unsigned found = 0;
	puts("  PCI      bus 0:");
	for (u8 dev = 0; dev < 32; dev++) {
		u8 nfn = 1;
		for (u8 fn = 0; fn < nfn; fn++) {
			u32 id = pci_read32(0, dev, fn, 0x00);
			if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
				continue;
			if (fn == 0 && (pci_read8(0, dev, 0, 0x0e) & 0x80))
				nfn = 8;	/* multi-function device */
			u32 cls = pci_read32(0, dev, fn, 0x08);
			const char *virtio = virtio_name((u16)id, (u16)(id >> 16));
			printf("             00:%02x.%u %04x:%04x class %02x.%02x.%02x  %s%s\n", dev,
			       fn, id & 0xffff, id >> 16, cls >> 24, (cls >> 16) & 0xff,
			       (cls >> 8) & 0xff, virtio ? "virtio-" : "",
			       virtio ? virtio : pci_class_name((u8)(cls >> 24), (u8)(cls >> 16)));
			found++;
		}
	}
	if (!found)
		puts("             (no devices)");
}

/* ---- virtio-blk disks: size, read-only flag and the first bytes of sector 0 ---- */

#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_S_OK 0
#define SECTOR 512
#define DISK_VECTOR IRQ_VECTOR_DEVICE0
#define DISK_TIMEOUT_MS 2000
#define SHOW_BYTES 16

static struct {
	u32 type, reserved;
	u64 sector;
} blk_hdr __attribute__((aligned(16)));
static u8 blk_data[SECTOR] __attribute__((aligned(4096)));
static volatile u8 blk_status;

/* Reads sector 0 into blk_data: 0 on success, else a short reason in *why. */
static int read_sector0(struct virtio_dev *d, int use_irq, const char **why)
{
	struct virtq *q = &d->vq[0];
	blk_hdr.type = VIRTIO_BLK_T_IN;
	blk_hdr.reserved = 0;
	blk_hdr.sector = 0;
	blk_status = 0xff;
	memset(blk_data, 0, sizeof(blk_data));
	const struct virtq_buf b[3] = {
		{ (u64)(uintptr_t)&blk_hdr, sizeof(blk_hdr), 0 },
		{ (u64)(uintptr_t)blk_data, SECTOR, 1 },
		{ (u64)(uintptr_t)&blk_status, 1, 1 },
	};
	u32 seen = irq_counts[DISK_VECTOR];
	int head = virtq_submit(q, b, 3);
	if (head < 0) {
		*why = "the queue is too small";
		return -1;
	}
	virtq_kick(q);
	if (use_irq)
		irq_wait_vector(DISK_VECTOR, seen, DISK_TIMEOUT_MS);
	for (unsigned i = 0; i < 200000 && !virtq_has_used(q); i++)
		cpu_relax();
	u32 id, len;
	if (virtq_get_used(q, &id, &len)) {
		*why = virtio_status(d) & VIRTIO_STATUS_NEEDS_RESET ? "device needs reset"
								    : "no completion (timed out)";
		return -1;
	}
	if (id != (u32)head) {
		*why = "the device returned another request";
		return -1;
	}
	if (blk_status != VIRTIO_BLK_S_OK) {
		*why = blk_status == 1 ? "status IOERR" : "status UNSUPP or bad";
		return -1;
	}
	return 0;
}

static void show_bytes(const u8 *p, unsigned n)
{
	print("               sector 0:");
	for (unsigned i = 0; i < n; i++)
		printf(i % 4 ? "%02x" : " %02x", p[i]);
	print("  |");
	for (unsigned i = 0; i < n; i++)
		putc(p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '.');
	puts("|");
}

/* One disk: bring-up, capacity, read-only flag, sector 0; then reset the device. */
static void show_disk(struct pci_func *f, unsigned n, int use_irq)
{
	static struct virtio_dev d;
	char name[4] = { 'v', 'd', (char)('a' + n % 26), '\0' };
	printf("             %s at 00:%02x.%u", name, f->dev, f->fn);
	int rc = virtio_probe(&d, f);
	if (!rc)
		rc = virtio_negotiate(&d, 1ULL << VIRTIO_BLK_F_RO | 1ULL << VIRTIO_BLK_F_BLK_SIZE);
	if (!rc && use_irq)
		rc = virtio_setup_msix(&d, lapic_id(), DISK_VECTOR);
	if (!rc)
		rc = virtio_setup_queue(&d, 0, 4, use_irq ? 0 : VIRTIO_MSI_NO_VECTOR);
	if (!rc)
		rc = virtio_driver_ok(&d);
	if (rc) {
		printf(": bring-up failed: %s\n", d.error);
		if (d.common)
			virtio_reset(&d);
		return;
	}
	u64 sectors = virtio_cfg_read64(&d, 0);
	int ro = d.driver_features >> VIRTIO_BLK_F_RO & 1;
	printf(": %lu sectors (%lu MiB), %s", sectors, sectors >> 11,
	       ro ? "read-only" : "read-write");
	if (d.driver_features >> VIRTIO_BLK_F_BLK_SIZE & 1)
		printf(", block size %u", virtio_cfg_read32(&d, 20));
	putc('\n');
	const char *why = "";
	if (!sectors)
		puts("               sector 0: (empty disk)");
	else if (read_sector0(&d, use_irq, &why))
		printf("               sector 0: read failed: %s\n", why);
	else
		show_bytes(blk_data, SHOW_BYTES);
	virtio_reset(&d);
}

static void show_disks(void)
{
	static struct pci_func funcs[32];
	unsigned n = pci_scan(PCI_CF8, funcs, ARRAY_SIZE(funcs));
	if (n > ARRAY_SIZE(funcs))
		n = ARRAY_SIZE(funcs);
	unsigned disks = 0;
	for (unsigned i = 0; i < n; i++)
		disks += funcs[i].vendor == VIRTIO_PCI_VENDOR &&
			 funcs[i].device == VIRTIO_PCI_MODERN_ID(VIRTIO_ID_BLOCK);
	if (!disks)
		return;
	printf("  disks    %u virtio-blk (read-only here: sector 0 is read, nothing written):\n",
	       disks);
	/* what firmware does first: every function gets its BARs, in bus order */
	struct pci_window mem = { PCI_LOW_MMIO_START, PCI_LOW_MMIO_END };
	struct pci_window io = { PCI_IO_START, PCI_IO_END };
	if (pci_assign_all(funcs, n, &mem, &io)) {
		puts("             BAR assignment failed");
		return;
	}
	int use_irq = irq_init() == 0;
	unsigned shown = 0;
	for (unsigned i = 0; i < n; i++) {
		if (funcs[i].vendor != VIRTIO_PCI_VENDOR ||
		    funcs[i].device != VIRTIO_PCI_MODERN_ID(VIRTIO_ID_BLOCK))
			continue;
		if (shown == VIRTIO_RING_POOL) {	/* one ring per disk, never reused */
			printf("             (%u more not shown)\n", disks - shown);
			break;
		}
		show_disk(&funcs[i], shown++, use_irq);
	}
}

static void show_rtc(void)
{
	struct rtc_time t;
	if (rtc_read(&t))
		puts("  RTC      not present or not sane");
	else
		printf("  RTC      %04u-%02u-%02u %02u:%02u:%02u\n", t.year, t.month, t.day, t.hour,
		       t.minute, t.second);
}

extern const char __image_start[], __image_end[];

int main(const void *bp)
{
	puts("");
	puts("vmm demo guest: freestanding x86-64 C, entered in 64-bit long mode");
	printf("  image    %p..%p, boot_params at %p\n", (const void *)__image_start,
	       (const void *)__image_end, bp);
	const char *cmdline = boot_cmdline(bp);
	printf("  cmdline  \"%s\"\n", cmdline);
	show_cpu();
	show_memory(bp);
	const struct acpi_info *a = acpi();
	show_acpi(a);
	show_pci();
	show_disks();
	show_rtc();

	if (a->fadt && a->pm1a_cnt) {
		printf("powering off: ACPI S5 (SLP_TYP %u%s) via PM1a_CNT port %#x\n", a->s5_slp_typ,
		       a->s5_from_dsdt ? " from the DSDT" : ", the default", a->pm1a_cnt);
		power_off();
		for (int i = 0; i < 1000; i++)
			cpu_relax();
		puts("ACPI power-off did not take effect; exiting with status 1 via port 0xf4");
		return 1;
	}
	printf("no FADT with a PM1a control block: exiting with status 0 via port %#x instead\n",
	       DEBUG_EXIT_PORT);
	return 0;
}
