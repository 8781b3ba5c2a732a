"""Long-mode set-up: GDT/IDT/page tables in guest RAM and the sregs/regs we hand KVM."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from test_boot_images import make_elf

from vmmcore.arch.x86_64 import layout, regs
from vmmcore.arch.x86_64.linux_loader import LoadedKernel, load_kernel
from vmmcore.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def mem():
    with GuestMemory(layout.ram_ranges(64 * MiB)) as m:
        yield m


def decode_descriptor(d: int, selector: int) -> regs.Segment:
    """What KVM / the CPU make of an 8-byte GDT descriptor (limit scaled by G)."""
    limit = (d & 0xFFFF) | ((d >> 32) & 0xF_0000)
    g = (d >> 55) & 1
    return regs.Segment(
        base=((d >> 16) & 0xFF_FFFF) | ((d >> 32) & 0xFF00_0000),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector, type=(d >> 40) & 0xF, present=(d >> 47) & 1,
        dpl=(d >> 45) & 3, db=(d >> 54) & 1, s=(d >> 44) & 1, l=(d >> 53) & 1, g=g,
        avl=(d >> 52) & 1)


def translate(mem: GuestMemory, cr3: int, vaddr: int) -> int:
    """Walk 4-level paging (2 MiB leaves allowed) the way the MMU does."""
    pml4e = mem.read_u64(cr3 + ((vaddr >> 39) & 0x1FF) * 8)
    assert pml4e & 1, f"PML4E for {vaddr:#x} not present"
    pdpte = mem.read_u64((pml4e & ~0xFFF & (1 << 52) - 1) + ((vaddr >> 30) & 0x1FF) * 8)
    assert pdpte & 1 and not pdpte & 0x80, f"PDPTE for {vaddr:#x}"
    pde = mem.read_u64((pdpte & ~0xFFF & (1 << 52) - 1) + ((vaddr >> 21) & 0x1FF) * 8)
    assert pde & 1 and pde & 0x80 and pde & 2, f"PDE for {vaddr:#x} not a writable 2M page"
    return (pde & ~0x1F_FFFF & (1 << 52) - 1) | (vaddr & 0x1F_FFFF)


def test_gdt_in_memory_matches_the_segments(mem):
    st = regs.setup_long_mode(mem)
    assert st.gdt_base == layout.GDT_ADDR and st.gdt_limit == 4 * 8 - 1
    assert layout.GDT_ADDR + st.gdt_limit + 1 <= layout.IDT_ADDR, "GDT must not run into IDT"
    gdt = struct.unpack("<4Q", mem.read(layout.GDT_ADDR, 32))
    assert gdt[0] == 0
    assert gdt[regs.SELECTOR_CODE // 8] == 0x00AF_9B00_0000_FFFF
    assert gdt[regs.SELECTOR_DATA // 8] == 0x00CF_9300_0000_FFFF
    for seg in (st.cs, st.ds, st.es, st.fs, st.gs, st.ss, st.tr):
        assert decode_descriptor(gdt[seg.selector // 8], seg.selector) == seg


def test_segments_follow_the_64bit_boot_protocol(mem):
    st = regs.setup_long_mode(mem)
    assert st.cs.selector == 0x10 and st.cs.l == 1 and st.cs.db == 0 and st.cs.type & 0x8
    for seg in (st.ds, st.es, st.ss, st.fs, st.gs):
        assert seg.selector == 0x18 and seg.type & 0x2 and not seg.type & 0x8
        assert (seg.base, seg.limit, seg.present) == (0, 0xFFFF_FFFF, 1)
    assert st.tr.type == 0xB and st.tr.s == 0 and st.tr.present  # busy 64-bit TSS
    assert st.ldt.present == 0


def test_idt_is_empty(mem):
    mem.fill(layout.IDT_ADDR, 8, 0xFF)
    st = regs.setup_long_mode(mem)
    assert (st.idt_base, st.idt_limit) == (layout.IDT_ADDR, 7)
    assert mem.read(layout.IDT_ADDR, 8) == bytes(8)


def test_control_registers_enable_long_mode_paging(mem):
    st = regs.setup_long_mode(mem)
    assert st.cr0 & (1 << 0) and st.cr0 & (1 << 31)       # PE, PG
    assert st.cr0 & (1 << 4) and st.cr0 & (1 << 5)        # ET, NE
    assert st.cr4 & (1 << 5)                              # PAE
    assert st.efer & (1 << 8) and st.efer & (1 << 10)     # LME, LMA
    assert st.cr3 == layout.PML4_ADDR


@pytest.mark.parametrize("addr", [0, 0x7000, 0x20_0000, 0x123_4567, 0xBFFF_FFFF,
                                  layout.PCIE_ECAM_START, layout.IOAPIC_ADDR,
                                  layout.LAPIC_ADDR + 0x30, 0xFFFF_FFFF])
def test_first_4gib_is_identity_mapped(mem, addr):
    st = regs.setup_long_mode(mem)
    assert translate(mem, st.cr3, addr) == addr


def test_nothing_else_is_mapped(mem):
    regs.setup_long_mode(mem)
    pml4 = struct.unpack("<512Q", mem.read(layout.PML4_ADDR, 4096))
    pdpt = struct.unpack("<512Q", mem.read(layout.PDPT_ADDR, 4096))
    assert all(e == 0 for e in pml4[1:]) and all(e == 0 for e in pdpt[4:])


def test_boot_structures_do_not_overlap():
    spans = sorted([(layout.GDT_ADDR, 32), (layout.IDT_ADDR, 8), (layout.ZERO_PAGE_ADDR, 4096),
                    (0x8000, layout.BOOT_STACK_TOP - 0x8000), (layout.PML4_ADDR, 4096),
                    (layout.PDPT_ADDR, 4096), (layout.PD_ADDR, 4 * 4096),
                    (layout.CMDLINE_ADDR, layout.CMDLINE_MAX_SIZE),
                    (layout.EBDA_START, 0x100000 - layout.EBDA_START)])
    for (a, n), (b, _) in zip(spans, spans[1:], strict=False):
        assert a + n <= b, f"{a:#x}+{n:#x} overlaps {b:#x}"
    assert spans[-1][0] + spans[-1][1] <= layout.KERNEL_START


def test_state_is_plain_frozen_data(mem):
    st = regs.setup_long_mode(mem)
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.cr0 = 0  # type: ignore[misc]
    assert all(isinstance(v, int) for v in dataclasses.asdict(st.cs).values())


def test_boot_regs(mem):
    k = LoadedKernel(entry=0x100_0200, boot_params_addr=layout.ZERO_PAGE_ADDR, kind="bzimage",
                     kernel_end=0x200_0000)
    assert regs.boot_regs(k) == {"rip": 0x100_0200, "rsp": layout.BOOT_STACK_TOP,
                                 "rsi": layout.ZERO_PAGE_ADDR, "rflags": 0x2}


def test_elf_guest_entry_and_stack_are_mapped(mem, tmp_path):
    (tmp_path / "g").write_bytes(make_elf([{"paddr": 0x20_0000, "data": b"\xf4"}]))
    k = load_kernel(mem, tmp_path / "g", "", None, 64 * MiB)
    st = regs.setup_long_mode(mem)
    r = regs.boot_regs(k)
    for a in (r["rip"], r["rsp"] - 8, r["rsi"]):
        assert translate(mem, st.cr3, a) == a
    assert mem.read(r["rip"], 1) == b"\xf4"


def test_lapic_lints():
    page = bytearray(1024)
    struct.pack_into("<I", page, regs.APIC_LVT0, 0x0001_0000 | 0x400)   # masked, NMI mode
    struct.pack_into("<I", page, regs.APIC_LVT1, 0x0001_0000)
    struct.pack_into("<I", page, 0x340, 0xDEAD)
    regs.lapic_lint_setup(page)
    lvt0, lvt1 = (struct.unpack_from("<I", page, o)[0] for o in (0x350, 0x360))
    assert (lvt0 >> 8) & 7 == 7 and lvt0 & 0x1_0000      # ExtINT, other bits kept
    assert (lvt1 >> 8) & 7 == 4 and lvt1 & 0x1_0000      # NMI
    assert struct.unpack_from("<I", page, 0x340)[0] == 0xDEAD
    with pytest.raises(ValueError):
        regs.lapic_lint_setup(bytearray(0x360))
