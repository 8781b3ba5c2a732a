/*
 * The demo guest `vmm run` boots when no kernel is given.  It shows what the VMM gave it
 * (memory map, CPUs, CPUID, PCI devices, the RTC), then powers off through ACPI.
 */
#include "runtime.h"

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
