"""PciConfiguration: header fields, write masks, RW1C, BAR sizing as Linux does it,
capability lists, and hostile writes that must not change read-only state."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmcore.pci.config_space import (
    COMMAND_WRITABLE,
    STATUS_CAPABILITIES_LIST,
    STATUS_INTERRUPT,
    STATUS_RECEIVED_MASTER_ABORT,
    STATUS_SIGNALED_TARGET_ABORT,
    BarKind,
    BarRange,
    ConfigSpaceError,
    DisplaySubclass,
    PciClass,
    PciConfiguration,
)


def make_config(**kw) -> PciConfiguration:
    args = dict(vendor_id=0x1AF4, device_id=0x1050, class_code=PciClass.DISPLAY,
                subclass=DisplaySubclass.VGA_COMPATIBLE, prog_if=0, revision_id=1,
                subsystem_vendor_id=0x1AF4, subsystem_id=0x0010)
    args.update(kw)
    return PciConfiguration(**args)


def write(cfg: PciConfiguration, offset: int, value: int, size: int) -> None:
    cfg.write_reg(offset // 4, offset % 4, value.to_bytes(size, "little"))


def read(cfg: PciConfiguration, offset: int, size: int) -> int:
    return (cfg.read_reg(offset // 4) >> (8 * (offset % 4))) & ((1 << (8 * size)) - 1)


# -- Linux's __pci_read_base and pci_size, re-derived from the algorithm -------------------

def pci_size(base: int, maxbase: int, mask: int) -> int:
    size = mask & maxbase
    if not size:
        return 0
    size &= ~(size - 1)
    if base == maxbase and ((base | (size - 1)) & mask) != mask:
        return 0
    return size - 1


def linux_read_base(cfg: PciConfiguration, pos: int) -> tuple[str, int, int]:
    """(type, size, address) the way Linux probes one BAR: save, write ~0, read, restore."""
    orig = cfg.read_reg(pos // 4)
    write(cfg, pos, 0xFFFFFFFF, 4)
    sz = cfg.read_reg(pos // 4)
    write(cfg, pos, orig, 4)
    if sz == 0xFFFFFFFF:
        sz = 0
    if orig == 0xFFFFFFFF:
        orig = 0
    if orig & 1:
        kind, l64, sz64, mask64 = "io", orig & ~3 & 0xFFFFFFFF, sz & ~3 & 0xFFFFFFFF, 0xFFFC
    else:
        kind = "mem64" if (orig >> 1) & 3 == 2 else "mem32"
        l64, sz64, mask64 = orig & ~0xF & 0xFFFFFFFF, sz & ~0xF & 0xFFFFFFFF, 0xFFFFFFF0
    if kind == "mem64":
        hi = cfg.read_reg(pos // 4 + 1)
        write(cfg, pos + 4, 0xFFFFFFFF, 4)
        szhi = cfg.read_reg(pos // 4 + 1)
        write(cfg, pos + 4, hi, 4)
        l64 |= hi << 32
        sz64 |= szhi << 32
        mask64 |= 0xFFFFFFFF << 32
    if not sz64:
        return kind, 0, l64
    return kind, pci_size(l64, sz64, mask64) + 1, l64


def test_header_fields_as_set():
    cfg = make_config(prog_if=0x01)
    assert read(cfg, 0x00, 2) == 0x1AF4 and read(cfg, 0x02, 2) == 0x1050
    assert cfg.read_reg(2) == (0x03 << 24) | (0x00 << 16) | (0x01 << 8) | 0x01
    assert read(cfg, 0x0E, 1) == 0
    assert read(cfg, 0x2C, 2) == 0x1AF4 and read(cfg, 0x2E, 2) == 0x0010
    assert read(cfg, 0x34, 1) == 0 and not cfg.status & STATUS_CAPABILITIES_LIST


def test_command_register_only_writable_bits_change():
    cfg = make_config()
    write(cfg, 0x04, 0xFFFF, 2)
    assert read(cfg, 0x04, 2) == COMMAND_WRITABLE == 0x0547
    write(cfg, 0x04, 0, 2)
    assert read(cfg, 0x04, 2) == 0


def test_status_bits_are_rw1c_and_a_command_write_leaves_them():
    cfg = make_config()
    cfg.set_status_bits(STATUS_RECEIVED_MASTER_ABORT | STATUS_SIGNALED_TARGET_ABORT
                        | STATUS_INTERRUPT)
    write(cfg, 0x04, 0x0006, 2)              # word write to command only
    assert cfg.status & STATUS_RECEIVED_MASTER_ABORT
    write(cfg, 0x06, 0, 2)                    # writing zeros clears nothing
    assert cfg.status & STATUS_RECEIVED_MASTER_ABORT
    # A dword write to command+status with one RW1C bit set clears just that bit.
    write(cfg, 0x04, (STATUS_RECEIVED_MASTER_ABORT << 16) | 0x0006, 4)
    assert not cfg.status & STATUS_RECEIVED_MASTER_ABORT
    assert cfg.status & STATUS_SIGNALED_TARGET_ABORT
    assert cfg.command == 0x0006
    # Read-only status bits (interrupt, capabilities list) ignore ones.
    write(cfg, 0x06, 0xFFFF, 2)
    assert cfg.status == STATUS_INTERRUPT


def test_read_only_registers_ignore_every_byte_write():
    cfg = make_config()
    cfg.set_interrupt(line=10, pin=1)
    before = [cfg.read_reg(i) for i in range(1024)]
    for offset in [0, 1, 2, 3, 8, 9, 10, 11, 0x0E, 0x0F, 0x2C, 0x2D, 0x2E, 0x2F, 0x30, 0x34,
                   0x3D, 0x3E, 0x3F, 0x40, 0xFC, 0x100, 0xFFF]:
        write(cfg, offset, 0xFF, 1)
    assert [cfg.read_reg(i) for i in range(1024)] == before


def test_scratch_registers_and_interrupt_line_are_writable():
    cfg = make_config()
    write(cfg, 0x0C, 0x10, 1)
    write(cfg, 0x0D, 0x40, 1)
    write(cfg, 0x3C, 0x0B, 1)
    assert read(cfg, 0x0C, 1) == 0x10 and read(cfg, 0x0D, 1) == 0x40
    assert read(cfg, 0x3C, 1) == 0x0B


@pytest.mark.parametrize("reg,offset,data", [
    (1, 0, b"\xff\xff\xff"),        # 3 bytes
    (1, 3, b"\xff\xff"),            # crosses the dword
    (1, 2, b"\xff" * 4),
    (1, 0, b""),
    (1, 0, b"\xff" * 8),
    (1024, 0, b"\xff\xff\xff\xff"),
    (-1, 0, b"\xff\xff\xff\xff"),
    (1, 4, b"\xff"),
    (1, -1, b"\xff"),
])
def test_malformed_writes_are_dropped(reg, offset, data):
    cfg = make_config()
    before = [cfg.read_reg(i) for i in range(1024)]
    cfg.write_reg(reg, offset, data)
    assert [cfg.read_reg(i) for i in range(1024)] == before


def test_out_of_range_reads_are_all_ones():
    cfg = make_config()
    assert cfg.read_reg(1024) == 0xFFFFFFFF and cfg.read_reg(-1) == 0xFFFFFFFF
    assert cfg.read_reg(0x100 // 4) == 0    # no extended capabilities


@pytest.mark.parametrize("kind,size,prefetchable,expect_type", [
    (BarKind.MEM32, 0x1000, False, "mem32"),
    (BarKind.MEM32, 16, False, "mem32"),
    (BarKind.MEM32, 1 << 31, False, "mem32"),
    (BarKind.MEM64, 0x4000, True, "mem64"),
    (BarKind.MEM64, 8 << 30, True, "mem64"),
    (BarKind.MEM64, 1 << 40, False, "mem64"),
    (BarKind.IO, 0x20, False, "io"),
    (BarKind.IO, 4, False, "io"),
    (BarKind.IO, 256, False, "io"),
])
def test_bar_sizing_as_linux_does_it(kind, size, prefetchable, expect_type):
    cfg = make_config()
    cfg.add_bar(2, size, kind, prefetchable)
    addr = {"io": 0x1000 & ~(size - 1) or size, "mem32": 0x8000_0000 if size < 1 << 31 else
            1 << 31, "mem64": 1 << 40 if size <= 1 << 40 else size}[expect_type]
    addr = (addr + size - 1) & ~(size - 1)
    cfg.set_bar_address(2, addr)
    got_kind, got_size, got_addr = linux_read_base(cfg, 0x10 + 8)
    assert (got_kind, got_size, got_addr) == (expect_type, size, addr)
    # The low flag bits survive sizing; the address was restored.
    low = cfg.read_reg(0x18 // 4)
    if kind.is_memory:
        assert bool(low & 0x8) == prefetchable
        assert (low >> 1) & 3 == (2 if kind is BarKind.MEM64 else 0)
    else:
        assert low & 3 == 1
    assert cfg.bar_address(2) == addr


def test_undeclared_bars_and_rom_size_to_nothing():
    cfg = make_config()
    cfg.add_bar(0, 0x1000, BarKind.MEM32)
    for pos in (0x14, 0x18, 0x1C, 0x20, 0x24):
        assert linux_read_base(cfg, pos)[1] == 0
    write(cfg, 0x30, 0xFFFFF800, 4)
    assert cfg.read_reg(0x30 // 4) == 0


def test_bar_address_writes_keep_alignment_and_type_bits():
    cfg = make_config()
    cfg.add_bar(0, 0x1000, BarKind.MEM32, prefetchable=True)
    write(cfg, 0x10, 0xC000_1234, 4)
    assert cfg.read_reg(4) == 0xC000_1008      # low 12 bits: size, type, prefetch
    assert cfg.bar_address(0) == 0xC000_1000
    # A byte write into the middle of the BAR changes just that byte's writable bits.
    write(cfg, 0x12, 0xAB, 1)
    assert cfg.bar_address(0) == 0xC0AB_1000


def test_bar_declaration_errors():
    cfg = make_config()
    cfg.add_bar(4, 0x1000, BarKind.MEM64)
    with pytest.raises(ConfigSpaceError):
        cfg.add_bar(5, 0x1000, BarKind.MEM32)      # upper half of BAR4
    with pytest.raises(ConfigSpaceError):
        cfg.add_bar(4, 0x1000, BarKind.MEM32)
    with pytest.raises(ConfigSpaceError):
        cfg.add_bar(5, 0x1000, BarKind.MEM64)      # would need BAR6
    with pytest.raises(ConfigSpaceError):
        cfg.add_bar(0, 0x1800, BarKind.MEM32)      # not a power of two
    with pytest.raises(ConfigSpaceError):
        cfg.add_bar(0, 512, BarKind.IO)
    with pytest.raises(ConfigSpaceError):
        cfg.add_bar(0, 8, BarKind.MEM32)
    with pytest.raises(ConfigSpaceError):
        cfg.add_bar(3, 0x100, BarKind.MEM64)       # its upper half is BAR4
    cfg.add_bar(0, 0x100, BarKind.MEM64)
    with pytest.raises(ConfigSpaceError):
        cfg.add_bar(1, 0x100, BarKind.IO)
    with pytest.raises(ConfigSpaceError):
        cfg.set_bar_address(0, 0x180)              # misaligned
    with pytest.raises(ConfigSpaceError):
        cfg.set_bar_address(0, 1 << 64)
    with pytest.raises(ConfigSpaceError):
        cfg.set_bar_address(1, 0x1000)             # undeclared


def test_bar_ranges_follow_decode_bits_and_ignore_unassigned_or_sizing_values():
    cfg = make_config()
    cfg.add_bar(0, 0x1000, BarKind.MEM32)
    cfg.add_bar(1, 0x20, BarKind.IO)
    cfg.add_bar(2, 0x4000, BarKind.MEM64, prefetchable=True)
    cfg.set_bar_address(0, 0xC000_0000)
    cfg.set_bar_address(1, 0x1000)
    assert cfg.bar_ranges() == []
    write(cfg, 0x04, 0x1, 2)
    assert cfg.bar_ranges() == [BarRange(1, 0x1000, 0x20, BarKind.IO)]
    write(cfg, 0x04, 0x3, 2)
    assert [r.bar for r in cfg.bar_ranges()] == [0, 1]     # BAR2 still at 0: unassigned
    write(cfg, 0x10, 0xFFFFFFFF, 4)                        # sizing with decode on
    assert [r.bar for r in cfg.bar_ranges()] == [1]
    write(cfg, 0x18, 0xFFFFFFFF, 4)
    write(cfg, 0x1C, 0xFFFFFFFF, 4)
    assert [r.bar for r in cfg.bar_ranges()] == [1]
    write(cfg, 0x14, 0xFFFFFFFF, 4)
    assert cfg.bar_ranges() == []


def walk_capabilities(cfg: PciConfiguration) -> list[tuple[int, int]]:
    """Follow the list like Linux's pci_find_capability (with its loop guard)."""
    assert cfg.status & STATUS_CAPABILITIES_LIST
    pos, seen = read(cfg, 0x34, 1) & ~3, []
    ttl = 48
    while pos >= 0x40 and ttl:
        seen.append((pos, read(cfg, pos, 1)))
        pos = read(cfg, pos + 1, 1) & ~3
        ttl -= 1
    assert ttl, "capability list loops"
    return seen


def test_capability_list_is_chained_in_order_and_dword_aligned():
    cfg = make_config()
    a = cfg.add_capability(0x09, b"\x10" + b"\x00" * 13)        # vendor-specific, 16 bytes
    b = cfg.add_capability(0x05, b"\x00" * 3)                   # 5 bytes -> next aligned
    c = cfg.add_capability(0x11, b"\x00" * 10)
    assert (a, b) == (0x40, 0x50) and c == 0x58
    assert walk_capabilities(cfg) == [(0x40, 0x09), (0x50, 0x05), (0x58, 0x11)]
    assert read(cfg, c + 1, 1) == 0


def test_capability_write_masks_and_observer():
    cfg = make_config()
    seen = []
    off = cfg.add_capability(0x09, bytes([6, 0xAA, 0xBB, 0xCC]), wmask=bytes([0, 0xF0, 0, 0xFF]),
                             on_write=lambda cap, rel: seen.append((cap, rel)))
    write(cfg, off, 0xFFFF_FFFF, 4)              # ID, next, len, first body byte
    assert read(cfg, off, 2) == 0x0009 and read(cfg, off + 2, 1) == 6
    assert read(cfg, off + 3, 1) == 0xFA
    write(cfg, off + 4, 0x0000, 2)
    assert read(cfg, off + 4, 2) == 0x00BB and read(cfg, off + 5, 1) == 0x00
    assert seen == [(off, 0), (off, 4)]
    write(cfg, off + 4, 0x0000, 2)               # no change -> no callback
    assert len(seen) == 2


def test_capabilities_that_do_not_fit_are_refused():
    cfg = make_config()
    cfg.add_capability(0x09, bytes(180))
    with pytest.raises(ConfigSpaceError):
        cfg.add_capability(0x09, bytes(40))
    with pytest.raises(ConfigSpaceError):
        cfg.add_capability(0x09, bytes(4), wmask=bytes(3))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 3), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF)), max_size=60))
def test_random_writes_never_touch_read_only_bits(writes):
    cfg = make_config()
    cfg.add_bar(0, 0x1000, BarKind.MEM32)
    cfg.add_bar(2, 0x4000, BarKind.MEM64, prefetchable=True)
    cfg.add_bar(4, 0x40, BarKind.IO)
    cfg.add_capability(0x09, bytes([6, 1, 2, 3]), wmask=bytes([0, 0xFF, 0, 0]))
    cfg.set_interrupt(11, 1)
    ro = {i: (cfg.read_reg(i), ~(cfg._wmask[i] | cfg._w1c[i]) & 0xFFFFFFFF)
          for i in range(1024)}
    for reg, offset, size, value in writes:
        cfg.write_reg(reg, offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
    for i, (initial, mask) in ro.items():
        assert cfg.read_reg(i) & mask == initial & mask
    # The BAR flag bits in particular never change.
    assert cfg.read_reg(4) & 0xF == 0 and cfg.read_reg(6) & 0xF == 0xC
    assert cfg.read_reg(8) & 0x3 == 1


def test_io_bar_may_end_at_the_last_port_but_not_beyond():
    cfg = make_config()
    cfg.add_bar(0, 0x20, BarKind.IO)
    write(cfg, 0x04, 0x1, 2)
    write(cfg, 0x10, 0xFFE0, 4)
    assert cfg.bar_ranges() == [BarRange(0, 0xFFE0, 0x20, BarKind.IO)]
    write(cfg, 0x10, 0x1_0000, 4)
    assert cfg.bar_ranges() == []
