"""ACPI tables for the guest: RSDP, XSDT/RSDT, FADT+FACS, DSDT, MADT and MCFG.

Without firmware, the VMM writes these directly into the BIOS read-only area at
layout.ACPI_ADDR, where Linux finds the RSDP by scanning 0xE0000-0xFFFFF on 16-byte
boundaries (no EFI needed). What each table is for:

* MADT: one enabled Local APIC per vCPU (APIC ids 0..n-1, matching cpuid.py), the IOAPIC
  with GSI base 0, IRQ0 -> GSI2 (the PIT is wired to IOAPIC pin 2) and the SCI override
  (level, active high), LINT1 = NMI on every CPU (regs.lapic_lint_setup).
* FADT: not hardware-reduced, so Linux uses the fixed PM1a event/control blocks that
  devices/acpi_pm.py implements; the fixed power button is present (PWR_BUTTON clear);
  SMI_CMD = 0 means "always in ACPI mode"; IAPC_BOOT_ARCH says an 8042 and legacy
  devices exist (i8042, serial, CMOS).
* DSDT: \\_S5_ = {S5_SLP_TYP, S5_SLP_TYP, 0, 0}, so `poweroff` writes SLP_TYP|SLP_EN to
  PM1a_CNT; and the PCI host bridge \\_SB.PCI0 with its bus range, I/O and memory
  windows and INTx routing (_PRT): with ACPI on, Linux finds PCI root buses only through
  the DSDT.
* MCFG (when an ECAM window is given): the PCIe enhanced configuration space. The window
  is also e820-reserved (boot_params.DEFAULT_RESERVED), which Linux insists on.

Every table checksum sums to zero; all tables lie in [ACPI_ADDR, ACPI_ADDR+ACPI_MAX_SIZE).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from vmmcore.arch.x86_64 import aml, layout
from vmmcore.errors import VmmError
from vmmcore.memory import GuestMemory

OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMACP"
OEM_REVISION = 1
CREATOR_ID = b"PVMM"
CREATOR_REVISION = 1
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")     # 36 bytes
RSDP_SIZE = 36
FACS_SIZE = 64

# MADT
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1          # dual 8259s present (KVM_CREATE_IRQCHIP has them)
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INT_SRC_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LAPIC_ENABLED = 1
IOAPIC_ID = 0
MPS_INTI_POLARITY_HIGH = 0x1
MPS_INTI_TRIGGER_LEVEL = 0xC
ALL_PROCESSORS = 0xFF

# FADT (revision 6, 276 bytes)
FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_SIZE = 276
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5      # set: no fixed-feature sleep button
FADT_FIX_RTC = 1 << 6         # set: RTC wake status is not in the fixed registers
FADT_HW_REDUCED = 1 << 20
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
GAS_SYSTEM_IO = 1
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
C2_LATENCY_NONE = 101         # > 100 us: C2 not supported
C3_LATENCY_NONE = 1001        # > 1000 us: C3 not supported

PCI_CONFIG_PORT = 0xCF8


class AcpiError(VmmError):
    """The ACPI tables cannot be built (too large for the ACPI area, bad parameters)."""


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes data sum to zero mod 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header, body, checksum filled in."""
    length = SDT_HEADER.size + len(body)
    table = bytearray(SDT_HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                                      OEM_REVISION, CREATOR_ID, CREATOR_REVISION) + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(address: int, bit_width: int, space: int = GAS_SYSTEM_IO) -> bytes:
    """A Generic Address Structure; access size 0 (undefined) as QEMU uses for PM1."""
    return struct.pack("<BBBBQ", space, bit_width, 0, 0, address)


def rsdp(xsdt_addr: int, rsdt_addr: int) -> bytes:
    """The 36-byte revision-2 RSDP with both checksums."""
    raw = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr,
                                RSDP_SIZE, xsdt_addr, 0, b"\0\0\0"))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def madt(num_cpus: int) -> bytes:
    """MADT ("APIC"): Local APICs, the IOAPIC, ISA overrides and LINT1 NMI."""
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for cpu in range(num_cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, 0, 2, 0)
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, layout.SCI_IRQ,
                        layout.SCI_IRQ, MPS_INTI_POLARITY_HIGH | MPS_INTI_TRIGGER_LEVEL)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 1)
    return sdt(b"APIC", MADT_REVISION, bytes(body))


def fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    """FADT ("FACP") revision 6 with the PM1a blocks from layout, not hardware-reduced."""
    f = bytearray(FADT_SIZE)
    # FIRMWARE_CTRL stays 0: with both it and X_FIRMWARE_CTRL set, Linux installs the FACS
    # twice. DSDT and X_DSDT may agree (ACPICA then uses X_DSDT once).
    struct.pack_into("<II", f, 36, 0, dsdt_addr)
    f[45] = 0                                              # Preferred_PM_Profile: unspecified
    struct.pack_into("<HI", f, 46, layout.SCI_IRQ, 0)      # SCI_INT, SMI_CMD (none)
    struct.pack_into("<I", f, 56, layout.PM1A_EVT_BLK)
    struct.pack_into("<I", f, 64, layout.PM1A_CNT_BLK)
    f[88], f[89] = PM1_EVT_LEN, PM1_CNT_LEN
    struct.pack_into("<HH", f, 96, C2_LATENCY_NONE, C3_LATENCY_NONE)
    struct.pack_into("<H", f, 109, IAPC_LEGACY_DEVICES | IAPC_8042)
    struct.pack_into("<I", f, 112, FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_FIX_RTC)
    f[131] = FADT_MINOR_REVISION
    struct.pack_into("<QQ", f, 132, facs_addr, dsdt_addr)  # X_FIRMWARE_CTRL, X_DSDT
    f[148:160] = gas(layout.PM1A_EVT_BLK, PM1_EVT_LEN * 8)
    f[172:184] = gas(layout.PM1A_CNT_BLK, PM1_CNT_LEN * 8)
    return sdt(b"FACP", FADT_REVISION, bytes(f[SDT_HEADER.size:]))


def facs() -> bytes:
    """FACS: no checksum; only present because a non-reduced FADT should point at one."""
    raw = bytearray(FACS_SIZE)
    struct.pack_into("<4sI", raw, 0, b"FACS", FACS_SIZE)
    raw[32] = 2                                            # version (ACPI 4.0+)
    return bytes(raw)


def pci_routing_table(prt: Sequence[tuple[int, int, int]]) -> bytes:
    """_PRT: Package {Address, Pin, Zero, GSI} per (address, pin, gsi); GSI mode (Source 0)."""
    return aml.name("_PRT", aml.package([aml.package([addr, pin, 0, gsi])
                                         for addr, pin, gsi in prt]))


def pci_host_bridge(ecam: tuple[int, int, int, int] | None, mem_size: int,
                    prt: Sequence[tuple[int, int, int]]) -> bytes:
    r"""\_SB.PCI0: PNP0A08/PNP0A03 with bus range and the windows the allocator hands out.

    _PRT repeats the INTx wiring of vmmcore.pci.intx (pins swizzled onto GSIs 16-19), so
    Linux routes a device's INTx without guessing from the Interrupt Line register.
    """
    segment, first_bus, last_bus = (ecam[1], ecam[2], ecam[3]) if ecam else (0, 0, 0xFF)
    resources = [
        aml.word_bus_number(first_bus, last_bus),
        aml.io_port(PCI_CONFIG_PORT, 8),
        aml.word_io(0, PCI_CONFIG_PORT),                       # legacy ISA ports
        aml.word_io(0xD00, 0x1_0000 - 0xD00),                  # includes the PCI I/O pool
        aml.dword_memory(layout.LOW_MMIO_START, layout.LOW_MMIO_SIZE),
        aml.qword_memory(layout.high_mmio_start(mem_size), layout.HIGH_MMIO_SIZE),
    ]
    return aml.device("PCI0", [
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_SEG", segment),
        aml.name("_UID", segment),
        aml.name("_BBN", first_bus),
        aml.name("_CRS", aml.resource_template(resources)),
        pci_routing_table(prt),
    ])


def dsdt(ecam: tuple[int, int, int, int] | None, mem_size: int,
         prt: Sequence[tuple[int, int, int]] | None) -> bytes:
    r"""DSDT (revision 2, so integers are 64-bit): \_S5_ and, given a _PRT, the host bridge."""
    s5 = aml.name("_S5_", aml.package([layout.S5_SLP_TYP, layout.S5_SLP_TYP, 0, 0]))
    sb = []
    if prt is not None:
        sb = [aml.scope("\\_SB_", [pci_host_bridge(ecam, mem_size, prt)])]
    return sdt(b"DSDT", 2, s5 + b"".join(sb))


def check_ecam(ecam: tuple[int, int, int, int]) -> None:
    """Reject an ECAM window that no OS could use."""
    base, segment, start, end = ecam
    if not (0 <= start <= end <= 0xFF and 0 <= segment <= 0xFFFF):
        raise AcpiError(f"bad ECAM bus range {start}-{end} / segment {segment}")
    if base % (1 << 20) or base + ((end + 1) << 20) > 1 << 64:
        raise AcpiError(f"ECAM base {base:#x} must be 1 MiB aligned")


def mcfg(ecam: tuple[int, int, int, int]) -> bytes:
    """MCFG: one ECAM allocation (base, segment, start bus, end bus)."""
    check_ecam(ecam)
    base, segment, start, end = ecam
    body = bytes(8) + struct.pack("<QHBBI", base, segment, start, end, 0)
    return sdt(b"MCFG", 1, body)


def xsdt(entries: Iterable[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))


def rsdt(entries: Iterable[int]) -> bytes:
    return sdt(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in entries))


class _Area:
    """Bump allocator over [ACPI_ADDR, ACPI_ADDR + ACPI_MAX_SIZE)."""

    def __init__(self) -> None:
        self.next = layout.ACPI_ADDR
        self.parts: list[tuple[int, bytes]] = []

    def place(self, blob: bytes, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + len(blob) > layout.ACPI_ADDR + layout.ACPI_MAX_SIZE:
            raise AcpiError(f"ACPI tables exceed {layout.ACPI_MAX_SIZE:#x} bytes")
        self.parts.append((addr, blob))
        self.next = addr + len(blob)
        return addr


def build_acpi_tables(mem: GuestMemory, num_cpus: int, *,
                      ecam: tuple[int, int, int, int] | None = None,
                      pci: bool = True,
                      prt: Sequence[tuple[int, int, int]] | None = None) -> int:
    """Write all ACPI tables at layout.ACPI_ADDR; return the RSDP's guest address.

    ecam = (base, segment, start_bus, end_bus) adds an MCFG and sets the PCI host
    bridge's segment and bus range. pci=False leaves the host bridge out of the DSDT
    (for a VM without a PCI root). prt lists the INTx routes (address, pin, gsi); by default
    vmmcore.pci.intx.prt_entries(), the wiring the PCI root really uses.
    """
    if pci and prt is None:
        from vmmcore.pci.intx import prt_entries  # local: the PCI package is optional here

        prt = prt_entries()
    if not 1 <= num_cpus <= 255:
        raise AcpiError(f"{num_cpus} vCPUs: the MADT holds xAPIC ids 0..254")
    if ecam is not None:
        check_ecam(ecam)
    area = _Area()
    rsdp_addr = area.place(bytes(RSDP_SIZE))          # reserve; filled in last
    facs_addr = area.place(facs(), 64)                 # the FACS must be 64-byte aligned
    dsdt_addr = area.place(dsdt(ecam, mem.size, prt if pci else None))
    tables = [area.place(fadt(dsdt_addr, facs_addr)), area.place(madt(num_cpus))]
    if ecam is not None:
        tables.append(area.place(mcfg(ecam)))
    xsdt_addr = area.place(xsdt(tables))
    rsdt_addr = area.place(rsdt(tables))
    area.parts[0] = (rsdp_addr, rsdp(xsdt_addr, rsdt_addr))
    mem.fill(layout.ACPI_ADDR, area.next - layout.ACPI_ADDR)
    for addr, blob in area.parts:
        mem.write(addr, blob)
    return rsdp_addr
