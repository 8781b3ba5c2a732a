/*
 * tests/smp: the BSP starts the APs with INIT-SIPI-SIPI through the local APIC's ICR.
 * Each AP prints its APIC id and increments a shared counter with lock xadd; the BSP
 * waits (bounded) for MADT-count - 1 APs, prints "cpus online: N" and exits with status 0
 * if N equals the number of CPUs in the MADT, else 1.
 */
#include "runtime.h"

#define TRAMPOLINE_BASE 0x6000UL	/* must match smp_trampoline.S */
#define SIPI_VECTOR (TRAMPOLINE_BASE >> 12)
#define AP_MAX 63

#define LAPIC_ID 0x020
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_DELIVERY_PENDING (1u << 12)
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)

extern const u8 smp_trampoline_start[], smp_trampoline_end[], tramp_cr3[], tramp_efer[];

static volatile u32 aps_online;

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

/* Called by each AP on its own stack (smp_trampoline.S). */
void ap_main(void);
void ap_main(void)
{
	u32 id = lapic_read(LAPIC_ID) >> 24;
	printf_locked("smp: AP online, APIC id %u\n", id);
	u32 one = 1;
	__asm__ volatile("lock xaddl %0, %1" : "+r"(one), "+m"(aps_online) : : "memory");
}

/* Busy-wait about `cycles` TSC cycles; bounded in iterations in case the TSC stands still. */
static void tsc_delay(u64 cycles)
{
	u64 start = rdtsc();
	for (u32 i = 0; i < 200000 && rdtsc() - start < cycles; i++)
		cpu_relax();
}

static int send_ipi(u32 icr)
{
	lapic_write(LAPIC_ICR_HI, 0);
	lapic_write(LAPIC_ICR_LO, icr);
	for (int i = 0; i < 10000; i++)
		if (!(lapic_read(LAPIC_ICR_LO) & ICR_DELIVERY_PENDING))
			return 0;
	return -1;
}

static u64 read_cr3(void)
{
	u64 v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

static u64 read_efer(void)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0xc0000080u));
	return (u64)hi << 32 | lo;
}

/*
 * Waits until `want` APs are online.  The bound is wall time: five ticks of the CMOS RTC
 * seconds (4-5 s), or ~15e9 TSC cycles, whichever comes first; plus an iteration cap in
 * case neither clock moves.
 */
static u32 wait_for_aps(u32 want)
{
	u8 last_sec = cmos_read(0x00);
	int rtc_ok = last_sec != 0xff, ticks = 0;
	u64 start = rdtsc();
	u32 cap = rtc_ok ? 50000000u : 2000000u;
	for (u32 i = 0; i < cap; i++) {
		if (__atomic_load_n(&aps_online, __ATOMIC_ACQUIRE) >= want)
			break;
		cpu_relax();
		if ((i & 4095) == 4095) {
			if (rdtsc() - start > 15000000000ULL)
				break;
			if (rtc_ok) {
				u8 sec = cmos_read(0x00);
				if (sec != last_sec && ++ticks >= 5)
					break;
				last_sec = sec;
			}
		}
	}
	return __atomic_load_n(&aps_online, __ATOMIC_ACQUIRE);
}

int main(const void *bp)
{
	(void)bp;
	const struct acpi_info *a = acpi();
	u32 expected = a->madt && a->cpus ? a->cpus : 1;
	u32 bsp_id = lapic_read(LAPIC_ID) >> 24;
	printf("smp: BSP APIC id %u; the MADT lists %u CPU(s)%s\n", bsp_id, expected,
	       a->madt ? "" : " (no MADT: assuming 1)");

	if (expected > 1) {
		if (expected - 1 > AP_MAX)
			printf("smp: only %u APs have stacks; the rest will park\n", AP_MAX);
		/* Copy the trampoline below 1 MiB and give it the BSP's paging set-up. */
		size_t len = (size_t)(smp_trampoline_end - smp_trampoline_start);
		if (len > 4096) {
			printf("smp: trampoline is %lu bytes, more than a page\n", (unsigned long)len);
			return 1;
		}
		u8 *dst = (u8 *)TRAMPOLINE_BASE;
		memcpy(dst, smp_trampoline_start, len);
		u32 cr3 = (u32)read_cr3(), efer = (u32)(read_efer() & ((1u << 11) | 1u)) | (1u << 8);
		__builtin_memcpy(dst + (tramp_cr3 - smp_trampoline_start), &cr3, 4);
		__builtin_memcpy(dst + (tramp_efer - smp_trampoline_start), &efer, 4);

		/* Software-enable the local APIC (spurious vector 0xff); IF stays 0. */
		lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff);

		printf("smp: INIT-SIPI-SIPI to all APs, trampoline at %#lx (%lu bytes)\n",
		       TRAMPOLINE_BASE, (unsigned long)len);
		if (send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT))
			puts("smp: INIT IPI still pending");
		tsc_delay(40000000);	/* 10 ms at 4 GHz */
		for (int i = 0; i < 2; i++) {
			if (send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | SIPI_VECTOR))
				puts("smp: SIPI still pending");
			tsc_delay(1000000);	/* 250 us at 4 GHz */
		}
	}

	u32 aps = expected > 1 ? wait_for_aps(expected - 1) : 0;
	u32 online = aps + 1;
	printf_locked("cpus online: %u\n", online);
	if (online != expected)
		printf_locked("smp: FAIL: expected %u CPUs from the MADT\n", expected);
	return online == expected ? 0 : 1;
}
