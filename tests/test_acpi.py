"""ACPI tables and the AML encoder: parse our own output back the way Linux finds it,
check every checksum and pointer, and let iasl (acpica-tools) disassemble and recompile
the tables when it is installed."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmmcore.arch.x86_64 import acpi, aml, layout
from vmmcore.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30
ECAM = (layout.PCIE_ECAM_START, 0, 0, 255)


# -- a small ACPI reader, as an OS would do it ----------------------------------------------

def find_rsdp(mem: GuestMemory) -> int:
    """Scan the BIOS area 0xE0000-0xFFFFF on 16-byte boundaries, as Linux does."""
    area = mem.read(0xE0000, 0x20000)
    for off in range(0, len(area), 16):
        if area[off:off + 8] == b"RSD PTR " and sum(area[off:off + 20]) % 256 == 0:
            return 0xE0000 + off
    raise AssertionError("no RSDP in the BIOS scan area")


def read_table(mem: GuestMemory, addr: int) -> bytes:
    assert layout.ACPI_ADDR <= addr < layout.ACPI_ADDR + layout.ACPI_MAX_SIZE
    length = struct.unpack("<I", mem.read(addr + 4, 4))[0]
    assert length >= 36 and addr + length <= layout.ACPI_ADDR + layout.ACPI_MAX_SIZE
    table = mem.read(addr, length)
    assert sum(table) % 256 == 0, f"{table[:4]!r} checksum"
    return table


def read_all(mem: GuestMemory) -> dict[bytes, bytes]:
    rsdp_addr = find_rsdp(mem)
    rsdp = mem.read(rsdp_addr, 36)
    assert rsdp[15] == 2, "RSDP revision 2 (ACPI 2.0+, has an XSDT)"
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert sum(rsdp) % 256 == 0, "extended checksum"
    rsdt_addr, _len, xsdt_addr = struct.unpack_from("<IIQ", rsdp, 16)
    xsdt = read_table(mem, xsdt_addr)
    rsdt = read_table(mem, rsdt_addr)
    assert xsdt[:4] == b"XSDT" and rsdt[:4] == b"RSDT"
    x_entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    r_entries = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    assert list(x_entries) == list(r_entries)
    tables = {b"RSDP": rsdp, b"XSDT": xsdt, b"RSDT": rsdt}
    for a in x_entries:
        t = read_table(mem, a)
        assert t[:4] not in tables, f"duplicate {t[:4]!r}"
        tables[t[:4]] = t
    fadt = tables[b"FACP"]
    x_dsdt = struct.unpack_from("<Q", fadt, 140)[0]
    assert struct.unpack_from("<I", fadt, 40)[0] == x_dsdt
    tables[b"DSDT"] = read_table(mem, x_dsdt)
    facs_addr = struct.unpack_from("<Q", fadt, 132)[0]
    assert facs_addr % 64 == 0
    assert struct.unpack_from("<I", fadt, 36)[0] == 0, "FACS only via X_FIRMWARE_CTRL"
    tables[b"FACS"] = mem.read(facs_addr, 64)
    return tables


@pytest.fixture
def mem():
    with GuestMemory(layout.ram_ranges(512 * MiB)) as m:
        yield m


@pytest.fixture
def tables(mem):
    rsdp = acpi.build_acpi_tables(mem, 4, ecam=ECAM)
    assert rsdp == find_rsdp(mem) == layout.ACPI_ADDR
    return read_all(mem)


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 44
    while off < len(madt):
        typ, length = madt[off], madt[off + 1]
        assert length >= 2 and off + length <= len(madt)
        out.append((typ, madt[off:off + length]))
        off += length
    assert off == len(madt)
    return out


# -- tables ---------------------------------------------------------------------------------

def test_all_tables_are_reachable_with_good_checksums(tables):
    assert set(tables) == {b"RSDP", b"XSDT", b"RSDT", b"FACP", b"APIC", b"MCFG", b"DSDT",
                           b"FACS"}


def test_no_mcfg_without_ecam(mem):
    acpi.build_acpi_tables(mem, 1)
    assert b"MCFG" not in read_all(mem)


@pytest.mark.parametrize("cpus", [1, 2, 7, 64])
def test_madt_one_enabled_lapic_per_cpu_ioapic_and_overrides(mem, cpus):
    acpi.build_acpi_tables(mem, cpus)
    madt = read_all(mem)[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)
    entries = madt_entries(madt)
    lapics = [struct.unpack_from("<BBI", e, 2) for t, e in entries if t == 0]
    assert lapics == [(i, i, 1) for i in range(cpus)]
    ioapics = [struct.unpack_from("<BBII", e, 2) for t, e in entries if t == 1]
    assert ioapics == [(0, 0, layout.IOAPIC_ADDR, 0)]
    isos = [struct.unpack_from("<BBIH", e, 2) for t, e in entries if t == 2]
    assert (0, 0, 2, 0) in isos                              # IRQ0 -> GSI2
    assert (0, layout.SCI_IRQ, layout.SCI_IRQ, 0xD) in isos  # SCI level, active high
    nmis = [struct.unpack_from("<BHB", e, 2) for t, e in entries if t == 4]
    assert nmis == [(0xFF, 0, 1)]


def test_fadt_pm_blocks_sci_and_boot_flags(tables):
    f = tables[b"FACP"]
    assert f[8] == 6 and len(f) == 276
    assert struct.unpack_from("<H", f, 46)[0] == layout.SCI_IRQ
    assert struct.unpack_from("<I", f, 48)[0] == 0        # no SMI_CMD: always ACPI mode
    assert struct.unpack_from("<I", f, 56)[0] == layout.PM1A_EVT_BLK
    assert struct.unpack_from("<I", f, 64)[0] == layout.PM1A_CNT_BLK
    assert (f[88], f[89]) == (4, 2)
    assert struct.unpack_from("<H", f, 109)[0] & acpi.IAPC_8042
    flags = struct.unpack_from("<I", f, 112)[0]
    assert not flags & acpi.FADT_HW_REDUCED
    assert not flags & (1 << 4), "fixed-feature power button (devices/acpi_pm.py has one)"
    assert struct.unpack_from("<BBBBQ", f, 148) == (1, 32, 0, 0, layout.PM1A_EVT_BLK)
    assert struct.unpack_from("<BBBBQ", f, 172) == (1, 16, 0, 0, layout.PM1A_CNT_BLK)
    assert tables[b"FACS"][:4] == b"FACS"


def test_mcfg_describes_the_ecam_window(tables):
    m = tables[b"MCFG"]
    assert len(m) == 60
    assert struct.unpack_from("<QHBB", m, 44) == ECAM


def test_dsdt_has_s5_package(tables):
    s5 = bytes([0x08]) + b"_S5_" + bytes([0x12, 0x08, 0x04, 0x0A, 5, 0x0A, 5, 0, 0])
    assert layout.S5_SLP_TYP == 5
    assert s5 in tables[b"DSDT"]
    assert tables[b"DSDT"][8] == 2, "revision 2: 64-bit integers (QWordMemory window)"


def test_tables_stay_inside_the_acpi_area(mem):
    mem.fill(layout.ACPI_ADDR - 16, 16, 0xAB)
    acpi.build_acpi_tables(mem, 255, ecam=ECAM)
    assert mem.read(layout.ACPI_ADDR - 16, 16) == b"\xab" * 16
    read_all(mem)


@pytest.mark.parametrize("cpus", [0, 256])
def test_bad_cpu_counts(mem, cpus):
    with pytest.raises(acpi.AcpiError):
        acpi.build_acpi_tables(mem, cpus)


@pytest.mark.parametrize("ecam", [(0xE000_0000, 0, 5, 4), (0xE000_1000, 0, 0, 255),
                                  (0xE000_0000, 0x10000, 0, 1)])
def test_bad_ecam(mem, ecam):
    with pytest.raises(acpi.AcpiError):
        acpi.build_acpi_tables(mem, 1, ecam=ecam)


def test_pci_host_bridge_windows_follow_the_layout(mem):
    acpi.build_acpi_tables(mem, 1, ecam=(layout.PCIE_ECAM_START, 0, 0, 15))
    d = read_all(mem)[b"DSDT"]
    assert aml.word_bus_number(0, 15) in d
    assert aml.dword_memory(layout.LOW_MMIO_START, layout.LOW_MMIO_SIZE) in d
    assert aml.qword_memory(layout.high_mmio_start(512 * MiB), layout.HIGH_MMIO_SIZE) in d
    assert aml.word_io(0xD00, 0xF300) in d
    assert layout.PCI_IO_START >= 0xD00 and layout.PCI_IO_START + layout.PCI_IO_SIZE <= 0x10000


def test_prt_repeats_the_pci_intx_wiring(mem):
    from vmmcore.pci.intx import intx_gsi, prt_entries

    acpi.build_acpi_tables(mem, 1)
    d = read_all(mem)[b"DSDT"]
    entries = prt_entries()
    assert len(entries) == 31 * 4
    assert aml.name("_PRT", aml.package([aml.package([a, p, 0, g]) for a, p, g in entries])) in d
    assert aml.package([(3 << 16) | 0xFFFF, 1, 0, intx_gsi(3, 2)]) in d


def test_custom_prt(mem):
    acpi.build_acpi_tables(mem, 1, prt=[(0x1FFFF, 0, 16)])
    d = read_all(mem)[b"DSDT"]
    assert aml.name("_PRT", aml.package([aml.package([0x1FFFF, 0, 0, 16])])) in d


def test_no_host_bridge_when_asked(mem):
    acpi.build_acpi_tables(mem, 1, pci=False)
    assert b"PCI0" not in read_all(mem)[b"DSDT"]


# -- AML encoder ----------------------------------------------------------------------------

@pytest.mark.parametrize("body,encoded", [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (0xFFD, b"\x4f\xff"),
    (0xFFE, b"\x81\x00\x01"), (0xFFFFC, b"\x8f\xff\xff"), (0xFFFFD, b"\xc1\x00\x00\x01"),
])
def test_pkg_length(body, encoded):
    assert aml.pkg_length(body) == encoded


def test_pkg_length_limit():
    with pytest.raises(aml.AmlError):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0x1_0000, b"\x0c\x00\x00\x01\x00"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
])
def test_integer(value, encoded):
    assert aml.integer(value) == encoded


def test_names_and_strings():
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("A.B.C") == b"\x2f\x03A___B___C___"
    assert aml.string("PNP") == b"\x0dPNP\x00"
    assert aml.eisa_id("PNP0A03") == b"\x0c" + struct.pack("<I", 0x030AD041)
    for bad in ("", "s5", "TOOLONG", "1ABC", "A.B."):
        with pytest.raises(aml.AmlError):
            aml.name_string(bad)
    for bad in (-1, 1 << 64):
        with pytest.raises(aml.AmlError):
            aml.integer(bad)
    with pytest.raises(aml.AmlError):
        aml.eisa_id("pnp0a03")
    with pytest.raises(aml.AmlError):
        aml.string("caf\u00e9")


def test_package_and_containers():
    assert aml.package([5, 5, 0, 0]) == b"\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"
    big = aml.package(list(range(100)))
    assert big[0] == 0x12 and big[1] >> 6 == 1            # two-byte PkgLength
    with pytest.raises(aml.AmlError):
        aml.package([0] * 256)
    dev = aml.device("COM1", [aml.name("_HID", aml.eisa_id("PNP0501"))])
    assert dev[:2] == b"\x5b\x82" and dev[3:7] == b"COM1"
    assert aml.method_return("_STA", 0xF) == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.resource_template([])[-2:] == b"\x79\x00"


# -- iasl, when installed ---------------------------------------------------------------------

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl not installed "
                                "(apt-get install acpica-tools)")


def iasl(args: list[str], cwd: Path) -> str:
    res = subprocess.run([IASL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    return out


@needs_iasl
@pytest.mark.parametrize("sig", [b"DSDT", b"FACP", b"APIC", b"MCFG", b"XSDT", b"FACS"])
def test_iasl_disassembles_cleanly(tables, tmp_path, sig):
    name = sig.decode().lower()
    (tmp_path / f"{name}.dat").write_bytes(tables[sig])
    out = iasl(["-d", f"{name}.dat"], tmp_path)
    dsl = (tmp_path / f"{name}.dsl").read_text()
    assert "Error" not in out and "**** " not in dsl, out + dsl
    if sig == b"FACP":
        assert "SCI Interrupt : 0009" in dsl
        assert "PM1A Control Block Address : 00000604" in dsl
        assert "Hardware Reduced (V5) : 0" in dsl
        assert "8042 Present on ports 60/64 (V2) : 1" in dsl
    if sig == b"APIC":
        assert dsl.count("[Processor Local APIC]") == 4
        assert "Local Apic ID : 03" in dsl


@needs_iasl
def test_iasl_recompiles_our_dsdt_to_the_same_aml(tables, tmp_path):
    (tmp_path / "dsdt.dat").write_bytes(tables[b"DSDT"])
    iasl(["-d", "dsdt.dat"], tmp_path)
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert "Name (_S5, Package (0x04)" in dsl
    assert 'EisaId ("PNP0A08")' in dsl
    assert "Name (_PRT, Package (0x7C)" in dsl
    out = iasl(["-oa", "-p", "again", "dsdt.dsl"], tmp_path)
    assert " 0 Errors" in out, out
    again = (tmp_path / "again.aml").read_bytes()
    assert again[36:] == tables[b"DSDT"][36:], "AML body differs from iasl's encoding"
