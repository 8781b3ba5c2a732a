"""Long-mode CPU state for the boot vCPU, prepared by the VMM instead of firmware.

Linux's 64-bit boot protocol (and our freestanding test guests) expect to be entered
already in 64-bit mode with paging on and the kernel, zero page and command line
identity-mapped. This module writes the descriptor tables and page tables into guest RAM
and returns the register state as plain data; vcpu_init.py turns it into KVM_SET_SREGS.

GDT at layout.GDT_ADDR (four 8-byte entries; IDT_ADDR follows 32 bytes later):

    0x00  null
    0x08  TSS    (64-bit busy TSS; only its low half fits, see below)
    0x10  code   64-bit, execute/read, flat   -> CS  (Linux's __BOOT_CS)
    0x18  data   read/write, flat             -> DS, ES, FS, GS, SS  (__BOOT_DS)

boot.rst asks for __BOOT_CS = 0x10 and __BOOT_DS = 0x18, so we use those rather than
crosvm's 0x08/0x10 (Linux reloads its own GDT at once, so either boots). TR comes from the
sregs we return, not from the GDT, so the TSS descriptor only has to exist for the
selector; a 64-bit system descriptor is 16 bytes and its upper half would overlap the code
descriptor, so no guest may `ltr 0x08` (none does: Linux sets up its own TSS).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmmcore.arch.x86_64 import layout
from vmmcore.arch.x86_64.linux_loader import LoadedKernel
from vmmcore.memory import GuestMemory

# Control-register and EFER bits.
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7        # in a PD entry: this is a 2 MiB page

SELECTOR_TSS = 0x08
SELECTOR_CODE = 0x10
SELECTOR_DATA = 0x18
GDT_ENTRIES = 4
IDT_LIMIT = 7                 # one zero quadword: every vector is out of range

RFLAGS_RESERVED = 0x2         # bit 1 always reads as one

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7
APIC_DELIVERY_MODE_MASK = 0x700


@dataclass(frozen=True)
class Segment:
    """A segment register as KVM's struct kvm_segment sees it (limit already scaled)."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name of the long-mode bit
    g: int
    avl: int

    def descriptor(self) -> int:
        """Encode as an 8-byte GDT descriptor (the inverse of KVM's segment view)."""
        limit = self.limit >> 12 if self.g else self.limit
        access = (self.type & 0xF) | (self.s << 4) | ((self.dpl & 3) << 5) | (self.present << 7)
        flags = self.avl | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return ((limit & 0xFFFF)
                | ((self.base & 0xFF_FFFF) << 16)
                | (access << 40)
                | (((limit >> 16) & 0xF) << 48)
                | (flags << 52)
                | (((self.base >> 24) & 0xFF) << 56))


@dataclass(frozen=True)
class LongModeState:
    """Everything of KVM_SET_SREGS the VMM decides for a 64-bit entry."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    cr0: int
    cr3: int
    cr4: int
    efer: int


CODE_SEGMENT = Segment(base=0, limit=0xFFFF_FFFF, selector=SELECTOR_CODE, type=0xB,
                       present=1, dpl=0, db=0, s=1, l=1, g=1, avl=0)
DATA_SEGMENT = Segment(base=0, limit=0xFFFF_FFFF, selector=SELECTOR_DATA, type=0x3,
                       present=1, dpl=0, db=1, s=1, l=0, g=1, avl=0)
TSS_SEGMENT = Segment(base=0, limit=0x67, selector=SELECTOR_TSS, type=0xB,
                      present=1, dpl=0, db=0, s=0, l=0, g=0, avl=0)
# No LDT: type 2 (LDT), not present; vcpu_init marks a non-present segment unusable.
LDT_SEGMENT = Segment(base=0, limit=0, selector=0, type=0x2, present=0, dpl=0, db=0,
                      s=0, l=0, g=0, avl=0)


def gdt_table() -> list[int]:
    """The boot GDT's descriptors, in selector order."""
    return [0, TSS_SEGMENT.descriptor(), CODE_SEGMENT.descriptor(), DATA_SEGMENT.descriptor()]


def _write_page_tables(mem: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages: 1 PML4 entry, 4 PDPTEs, 4 PDs.

    4 GiB covers everything the boot needs (kernel, zero page, command line, initrd all
    sit below the MMIO hole) and the hole itself, so test guests can reach MMIO devices.
    """
    pml4 = bytearray(4096)
    struct.pack_into("<Q", pml4, 0, layout.PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE)
    mem.write(layout.PML4_ADDR, pml4)
    pdpt = bytearray(4096)
    for i in range(4):
        struct.pack_into("<Q", pdpt, i * 8,
                         (layout.PD_ADDR + i * 4096) | PTE_PRESENT | PTE_WRITABLE)
    mem.write(layout.PDPT_ADDR, pdpt)
    pds = struct.pack("<2048Q", *((i << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE
                                  for i in range(2048)))
    mem.write(layout.PD_ADDR, pds)


def setup_long_mode(mem: GuestMemory) -> LongModeState:
    """Write GDT, IDT and identity page tables to guest RAM; return the sregs to load."""
    gdt = gdt_table()
    mem.write(layout.GDT_ADDR, struct.pack(f"<{len(gdt)}Q", *gdt))
    mem.write(layout.IDT_ADDR, bytes(IDT_LIMIT + 1))
    _write_page_tables(mem)
    return LongModeState(
        cs=CODE_SEGMENT, ds=DATA_SEGMENT, es=DATA_SEGMENT, fs=DATA_SEGMENT,
        gs=DATA_SEGMENT, ss=DATA_SEGMENT, tr=TSS_SEGMENT, ldt=LDT_SEGMENT,
        gdt_base=layout.GDT_ADDR, gdt_limit=len(gdt) * 8 - 1,
        idt_base=layout.IDT_ADDR, idt_limit=IDT_LIMIT,
        # ET is hard-wired on anything since the 486; NE selects native x87 error reporting
        # (no IRQ13 legacy path), which is what Linux and our guests expect.
        cr0=X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG,
        cr3=layout.PML4_ADDR,
        cr4=X86_CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )


def boot_regs(loaded: LoadedKernel) -> dict[str, int]:
    """General registers for the boot vCPU: entry point, stack, zero page in RSI."""
    return {
        "rip": loaded.entry,
        "rsp": layout.BOOT_STACK_TOP,
        "rsi": loaded.boot_params_addr,
        "rflags": RFLAGS_RESERVED,    # interrupts off, as the boot protocol requires
    }


def _set_delivery_mode(value: int, mode: int) -> int:
    return (value & ~APIC_DELIVERY_MODE_MASK) | (mode << 8)


def lapic_lint_setup(regs: bytearray) -> None:
    """Route LINT0 as ExtINT (the 8259 PIC) and LINT1 as NMI, as a PC BIOS would.

    regs is the 1024-byte KVM_GET_LAPIC register page, modified in place. Without this
    Linux's early timer check through the PIC finds no interrupts.
    """
    if len(regs) < APIC_LVT1 + 4:
        raise ValueError(f"LAPIC register page is {len(regs)} bytes; need 1024")
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", regs, off)
        struct.pack_into("<I", regs, off, _set_delivery_mode(value, mode))
