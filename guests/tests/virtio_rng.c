/*
 * tests/virtio_rng: drives a virtio-rng device (1af4:1044) with the runtime's virtio-pci
 * driver, the way firmware and a kernel would on a machine with no BIOS:
 *
 *   1. finds the device by scanning bus 0 through 0xcf8/0xcfc AND through ECAM (base
 *      from the ACPI MCFG table); both scans must list the same functions
 *   2. sizes and assigns the BARs of every function itself, in bus order (low MMIO
 *      window 0xc0000000..), enables memory decode and bus mastering (over ECAM);
 *      prints "pci 00:DD.F barN 0x... size 0x..." per assigned BAR
 *   3. virtio capability walk, reset, ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK,
 *      MSI-X entry 0 -> vector 0x40 on this CPU's APIC, queue 0, DRIVER_OK
 *   4. twice: posts one 64-byte device-writable buffer, kicks, waits (sti; hlt, bounded)
 *      for the MSI-X interrupt, checks the used element, prints the bytes in hex
 *
 * Output lines the tier-2 test looks for:
 *   virtio-rng at 00:DD.F, BAR0 0x... (64-bit, size 0x...)
 *   msix interrupt received                     (once per request that got one)
 *   rng[N]: <128 hex digits>
 *   virtio-rng: OK
 *
 * Exit status (0 = success; the step that failed otherwise):
 *   2  no 1af4:1044 function in the 0xcf8 scan
 *   3  no MCFG table / ECAM window in ACPI
 *   4  the ECAM scan disagrees with the 0xcf8 scan (or lacks the device)
 *   5  BAR sizing/assignment failed (does not fit, does not read back)
 *   6  IDT/LAPIC set-up failed (LAPIC disabled in IA32_APIC_BASE)
 *   10+n  virtio bring-up failed with VIRTIO_ERR_n (virtio.h): 11 capabilities,
 *         12 reset, 13 no VERSION_1, 14 FEATURES_OK, 15 MSI-X capability/table,
 *         16 queue set-up, 17 queue MSI-X vector refused, 18 NEEDS_RESET after DRIVER_OK
 *   20 a request was never completed (no used element, even by polling)
 *   21 the used element has the wrong id or a length other than 64
 *   22 the 64 bytes are all zero
 *   23 the second request returned the same bytes as the first
 *   24 the requests completed but no MSI-X interrupt arrived (seen only by polling)
 *   25 the device set DEVICE_NEEDS_RESET while running
 *   0xe0|v  unexpected CPU exception v (irq.c prints it)
 * Command line: `nomsix=1` skips waiting for the interrupt (polls only, exit 0 possible).
 */
#include "irq.h"
#include "runtime.h"
#include "virtio.h"

#define RNG_LEN 64
#define RNG_VECTOR IRQ_VECTOR_DEVICE0

static u8 rng_buf[2][RNG_LEN] __attribute__((aligned(64)));

/* One request: post buf, kick, wait.  Returns 0 or an exit status. */
static int request(struct virtio_dev *d, u8 *buf, int want_irq, int *got_irq)
{
	struct virtq *q = &d->vq[0];
	struct virtq_buf b = { (u64)(uintptr_t)buf, RNG_LEN, 1 };
	memset(buf, 0, RNG_LEN);
	u32 seen = irq_counts[RNG_VECTOR];
	int head = virtq_submit(q, &b, 1);
	virtq_kick(q);

	*got_irq = 0;
	if (want_irq)
		*got_irq = irq_wait_vector(RNG_VECTOR, seen, 3000);
	/* the bounded fallback: poll the used index */
	for (unsigned i = 0; i < 200000 && !virtq_has_used(q); i++)
		cpu_relax();
	if (virtio_status(d) & VIRTIO_STATUS_NEEDS_RESET) {
		puts("virtio-rng: DEVICE_NEEDS_RESET");
		return 25;
	}
	u32 id, len;
	if (virtq_get_used(q, &id, &len)) {
		puts("virtio-rng: request not completed");
		return 20;
	}
	if (*got_irq)
		puts("msix interrupt received");
	else if (want_irq)
		puts("virtio-rng: completed, seen by polling the used ring (no interrupt)");
	else
		puts("virtio-rng: completed, seen by polling the used ring");
	if (id != (u32)head || len != RNG_LEN) {
		printf("virtio-rng: used id %u len %u, expected id %d len %u\n", id, len, head, RNG_LEN);
		return 21;
	}
	return 0;
}

static void print_hex(unsigned n, const u8 *buf)
{
	char line[2 * RNG_LEN + 1];
	static const char hex[] = "0123456789abcdef";
	for (unsigned i = 0; i < RNG_LEN; i++) {
		line[2 * i] = hex[buf[i] >> 4];
		line[2 * i + 1] = hex[buf[i] & 15];
	}
	line[2 * RNG_LEN] = '\0';
	printf("rng[%u]: %s\n", n, line);
}

int main(const void *bp)
{
	char arg[8];
	int want_irq = !(cmdline_get(boot_cmdline(bp), "nomsix", arg, sizeof(arg)) && arg[0] == '1');

	/* 1. enumeration through both mechanisms, 2. BARs, programmed over ECAM */
	struct pci_func f;
	int failed = pci_bring_up(VIRTIO_PCI_VENDOR, VIRTIO_PCI_MODERN_ID(VIRTIO_ID_RNG),
				  "virtio-rng", &f);
	if (failed)
		return failed;
	printf("virtio-rng at 00:%02x.%u, BAR0 %#lx (%s, size %#lx), command %#x\n", f.dev, f.fn,
	       f.bar_addr[0], f.bar_flags[0] & PCI_BAR_MEM64 ? "64-bit" : "32-bit", f.bar_size[0],
	       pcif_read16(&f, PCI_COMMAND));

	if (irq_init()) {
		puts("virtio-rng: the local APIC is disabled");
		return 6;
	}
	u8 apic = lapic_id();
	printf("lapic id %u, timer %s\n", apic, irq_timer_works() ? "counts" : "does not count");

	/* 3. virtio bring-up */
	struct virtio_dev d;
	int rc = virtio_probe(&d, &f);
	if (!rc) {
		printf("virtio caps: common %#x notify %#x (multiplier %u) isr %#x device %#x "
		       "pci_cfg %#x; %u queue(s)\n", d.cap_common, d.cap_notify, d.notify_mult,
		       d.cap_isr, d.cap_device, d.cap_pci_cfg, d.num_queues);
		rc = virtio_negotiate(&d, 0);
	}
	if (!rc)
		rc = virtio_setup_msix(&d, apic, RNG_VECTOR);
	if (!rc)
		rc = virtio_setup_queue(&d, 0, 16, 0);
	if (!rc)
		rc = virtio_driver_ok(&d);
	if (rc) {
		printf("virtio-rng: bring-up failed: %s\n", d.error);
		return 10 + rc;
	}
	printf("virtio-rng: features %#lx, queue 0 size %u, msix entry %u -> vector %#x, "
	       "notify at %#lx, status %#x\n", d.driver_features, d.vq[0].size,
	       d.vq[0].msix_vector, RNG_VECTOR, d.vq[0].notify, virtio_status(&d));
	if (d.cap_pci_cfg)
		printf("virtio-rng: num_queues through the pci_cfg window: %u\n",
		       virtio_pci_cfg_read(&d, 0, (u32)(d.common - f.bar_addr[0]) + VIRTIO_COMMON_NUMQ, 2));

	/* 4. two requests */
	int irqs = 0;
	for (unsigned n = 0; n < 2; n++) {
		int got;
		rc = request(&d, rng_buf[n], want_irq, &got);
		if (rc)
			return rc;
		irqs += got;
		print_hex(n, rng_buf[n]);
		int nonzero = 0;
		for (unsigned i = 0; i < RNG_LEN; i++)
			nonzero |= rng_buf[n][i];
		if (!nonzero) {
			puts("virtio-rng: all 64 bytes are zero");
			return 22;
		}
	}
	if (!memcmp(rng_buf[0], rng_buf[1], RNG_LEN)) {
		puts("virtio-rng: two requests returned the same bytes");
		return 23;
	}
	printf("virtio-rng: %d of 2 completions signalled by MSI-X\n", irqs);
	if (want_irq && irqs < 2) {
		puts("virtio-rng: no MSI-X interrupt");
		return 24;
	}
	virtio_reset(&d);
	puts("virtio-rng: OK");
	return 0;
}
