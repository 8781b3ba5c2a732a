"""The x86-64 guest physical address map, in one place.

Every module that places something in guest memory or address space takes its address
from here, so the e820 map, the ACPI tables and the SystemAllocator pools always agree.

    0x0000_0500  GDT               0x0000_7000  boot_params (zero page)
    0x0000_9000  PML4, PDPT, PDs   0x0002_0000  kernel command line
    0x0009_fc00  MP table (EBDA)   0x000e_0000  ACPI tables (RSDP scan area)
    0x0020_0000  kernel            ...          initrd below min(RAM, initrd_addr_max)
    0xc000_0000  32-bit PCI MMIO   0xe000_0000  PCIe ECAM (MCFG)
    0xfec0_0000  IOAPIC            0xfee0_0000  LAPIC
    0xfffb_c000  KVM identity map  0xfffb_d000  KVM TSS (3 pages)
    4 GiB        RAM above the hole, then the 64-bit PCI MMIO pool
"""

from __future__ import annotations

from vmmcore.allocator import SystemAllocator, align_up

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Low memory used by the VMM's boot set-up.
GDT_ADDR = 0x500
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000          # four page directories: identity-map the first 4 GiB
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x10000
EBDA_START = 0x9FC00
MPTABLE_ADDR = EBDA_START
ACPI_ADDR = 0xE0000        # RSDP lives in the BIOS scan area
ACPI_MAX_SIZE = 0x20000
HIGH_MEMORY_START = 0x100000
KERNEL_START = 0x200000

# The 32-bit MMIO hole below 4 GiB.
MMIO_HOLE_START = 0xC000_0000
LOW_MMIO_START = MMIO_HOLE_START
LOW_MMIO_SIZE = 0x2000_0000
PCIE_ECAM_START = 0xE000_0000
PCIE_ECAM_SIZE = 0x1000_0000   # 256 buses x 32 devices x 8 functions x 4 KiB
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
IDENTITY_MAP_ADDR = 0xFFFB_C000
TSS_ADDR = 0xFFFB_D000
FOUR_GIB = 4 * GiB
HIGH_MMIO_SIZE = 64 * GiB

# Port IO and interrupts.
PCI_IO_START = 0x1000
PCI_IO_SIZE = 0xF000
IOAPIC_PINS = 24
FIRST_ALLOCATABLE_GSI = 16     # 0-15 are the ISA IRQs; 16-23 the IOAPIC's PCI pins
LAST_GSI = 1023
SERIAL_IRQS = {0x3F8: 4, 0x2F8: 3, 0x3E8: 4, 0x2E8: 3}
SERIAL_PORTS = (0x3F8, 0x2F8, 0x3E8, 0x2E8)   # COM1..COM4, crosvm's num=1..4

# Legacy devices the core always has.
I8042_PORT = 0x60           # data 0x60, command/status 0x64
CMOS_PORT = 0x70            # index 0x70, data 0x71
DEBUG_EXIT_PORT = 0xF4      # test guests write their exit status here (like isa-debug-exit)

# ACPI fixed hardware (FADT): PM1a event block (status u16, enable u16) and control block.
ACPI_PM_BASE = 0x600
PM1A_EVT_BLK = ACPI_PM_BASE         # 4 bytes
PM1A_CNT_BLK = ACPI_PM_BASE + 4     # 2 bytes; SLP_TYP bits 10-12, SLP_EN bit 13
ACPI_PM_SIZE = 8
SCI_IRQ = 9
S5_SLP_TYP = 5              # the \_S5 package value in the DSDT; writing it powers off


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM ranges for mem_size bytes, split around the MMIO hole."""
    if mem_size <= 0 or mem_size % (4 * KiB):
        raise ValueError(f"memory size {mem_size} must be a positive multiple of 4 KiB")
    below = min(mem_size, MMIO_HOLE_START)
    ranges = [(0, below)]
    if mem_size > below:
        ranges.append((FOUR_GIB, mem_size - below))
    return ranges


def ram_end(mem_size: int) -> int:
    """One past the highest guest RAM address."""
    start, size = ram_ranges(mem_size)[-1]
    return start + size


def high_mmio_start(mem_size: int) -> int:
    """The 64-bit MMIO pool starts above RAM and 4 GiB, 1 GiB aligned."""
    return align_up(max(ram_end(mem_size), FOUR_GIB), GiB)


def system_allocator(mem_size: int) -> SystemAllocator:
    """The SystemAllocator pools that match this layout."""
    return SystemAllocator(
        io=(PCI_IO_START, PCI_IO_SIZE),
        low_mmio=(LOW_MMIO_START, LOW_MMIO_SIZE),
        high_mmio=(high_mmio_start(mem_size), HIGH_MMIO_SIZE),
        gsi=(FIRST_ALLOCATABLE_GSI, LAST_GSI),
    )
