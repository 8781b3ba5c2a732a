"""PciConfiguration: one function's configuration space, with the guest's view enforced.

The guest reads and writes configuration space freely (and a hostile one writes
anything anywhere), so every register has a write mask: a guest write can only change
the bits the PCI Local Bus spec makes writable, RW1C status bits are cleared by writing
ones, and everything else stays put. The BAR sizing protocol (write all-ones, read back
~(size-1) | type bits) then falls out of the masks alone: a BAR's writable bits are
exactly the address bits above its size, so no special case is needed for sizing.

The array is 4 KiB (PCIe extended space, reachable through ECAM); conventional
devices leave 0x100-0xfff as read-only zeros, which Linux reads as "no extended
capabilities".
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

# Register offsets of the type-0 header.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
PROG_IF = 0x09
SUBCLASS = 0x0A
CLASS_CODE = 0x0B
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
NUM_BARS = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_BAR = 0x30
CAPABILITY_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

CONFIG_SPACE_SIZE = 256
EXTENDED_CONFIG_SPACE_SIZE = 4096
NUM_REGS = EXTENDED_CONFIG_SPACE_SIZE // 4
FIRST_CAPABILITY_OFFSET = 0x40

# Command register bits.
COMMAND_IO_SPACE = 1 << 0
COMMAND_MEMORY_SPACE = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_PARITY_ERROR_RESPONSE = 1 << 6
COMMAND_SERR_ENABLE = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
# Writable command bits: the rest (special cycles, MWI, VGA snoop, fast b2b) are
# hardwired to 0 on a virtual function, as QEMU does.
COMMAND_WRITABLE = (COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER
                    | COMMAND_PARITY_ERROR_RESPONSE | COMMAND_SERR_ENABLE
                    | COMMAND_INTX_DISABLE)

# Status register bits.
STATUS_INTERRUPT = 1 << 3            # RO: INTx asserted
STATUS_CAPABILITIES_LIST = 1 << 4    # RO: a capability list exists at 0x34
STATUS_MASTER_DATA_PARITY_ERROR = 1 << 8
STATUS_SIGNALED_TARGET_ABORT = 1 << 11
STATUS_RECEIVED_TARGET_ABORT = 1 << 12
STATUS_RECEIVED_MASTER_ABORT = 1 << 13
STATUS_SIGNALED_SYSTEM_ERROR = 1 << 14
STATUS_DETECTED_PARITY_ERROR = 1 << 15
STATUS_RW1C = (STATUS_MASTER_DATA_PARITY_ERROR | STATUS_SIGNALED_TARGET_ABORT
               | STATUS_RECEIVED_TARGET_ABORT | STATUS_RECEIVED_MASTER_ABORT
               | STATUS_SIGNALED_SYSTEM_ERROR | STATUS_DETECTED_PARITY_ERROR)

# BAR low bits.
BAR_IO_SPACE = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCHABLE = 0x8
BAR_MEM_ADDRESS_MASK = 0xFFFF_FFF0
BAR_IO_ADDRESS_MASK = 0xFFFF_FFFC

HEADER_TYPE_DEVICE = 0x00
HEADER_TYPE_BRIDGE = 0x01

U32 = 0xFFFF_FFFF


class PciClass(enum.IntEnum):
    """Base class codes (PCI Code and ID Assignment spec)."""

    UNCLASSIFIED = 0x00
    MASS_STORAGE = 0x01
    NETWORK = 0x02
    DISPLAY = 0x03
    MULTIMEDIA = 0x04
    MEMORY = 0x05
    BRIDGE = 0x06
    SIMPLE_COMMUNICATION = 0x07
    BASE_SYSTEM_PERIPHERAL = 0x08
    INPUT = 0x09
    DOCKING_STATION = 0x0A
    PROCESSOR = 0x0B
    SERIAL_BUS = 0x0C
    WIRELESS = 0x0D
    ENCRYPTION = 0x10
    SIGNAL_PROCESSING = 0x11
    OTHER = 0xFF


class MassStorageSubclass(enum.IntEnum):
    SCSI = 0x00
    IDE = 0x01
    SATA = 0x06
    NVM = 0x08
    OTHER = 0x80


class NetworkSubclass(enum.IntEnum):
    ETHERNET = 0x00
    OTHER = 0x80


class DisplaySubclass(enum.IntEnum):
    """0x03/0x00 is what Linux's VGA arbiter (boot_vga) and Xorg look for."""

    VGA_COMPATIBLE = 0x00
    XGA = 0x01
    THREE_D = 0x02
    OTHER = 0x80


class MultimediaSubclass(enum.IntEnum):
    VIDEO = 0x00
    AUDIO = 0x01
    TELEPHONY = 0x02
    HD_AUDIO = 0x03
    OTHER = 0x80


class BridgeSubclass(enum.IntEnum):
    HOST = 0x00
    ISA = 0x01
    PCI_TO_PCI = 0x04
    OTHER = 0x80


class SimpleCommunicationSubclass(enum.IntEnum):
    SERIAL = 0x00
    OTHER = 0x80


class BaseSystemPeripheralSubclass(enum.IntEnum):
    OTHER = 0x80


class InputSubclass(enum.IntEnum):
    KEYBOARD = 0x00
    MOUSE = 0x02
    OTHER = 0x80


class OtherSubclass(enum.IntEnum):
    OTHER = 0x00


class BarKind(enum.Enum):
    """What a BAR decodes: 32- or 64-bit memory, or port IO."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"

    @property
    def is_memory(self) -> bool:
        return self is not BarKind.IO


@dataclass(frozen=True)
class BarRange:
    """A BAR's guest address range, as the root maps it on the MMIO or IO bus."""

    bar: int
    base: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class PciBar:
    """A BAR the device declared (its size and kind never change after set-up)."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False


@dataclass(frozen=True)
class Capability:
    """A registered capability: where it sits and what observes guest writes to it."""

    cap_id: int
    offset: int
    length: int
    on_write: Callable[[int, int], None] | None


class ConfigSpaceError(ValueError):
    """A device model set up its configuration space wrongly (a VMM bug, not the guest)."""


def _bytes_mask(offset: int, size: int) -> int:
    return ((1 << (8 * size)) - 1) << (8 * offset)


class PciConfiguration:
    """The 4 KiB configuration space of one function, with write and RW1C masks.

    Device models set their registers through the set_* methods (which ignore the
    masks); the guest goes through write_reg(), which honours them.
    """

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int,
                 subclass: int, prog_if: int = 0, revision_id: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 header_type: int = HEADER_TYPE_DEVICE) -> None:
        self._regs = [0] * NUM_REGS
        # The guest's config writes (a vCPU) and device-side status updates (the INTx
        # status bit, from a device worker) read-modify-write the same dword (COMMAND and
        # STATUS share register 1): serialised here so neither loses the other's bits.
        self._rmw = threading.RLock()
        self._wmask = [0] * NUM_REGS
        self._w1c = [0] * NUM_REGS
        self._bars: dict[int, PciBar] = {}
        self._caps: list[Capability] = []
        self._next_cap_offset = FIRST_CAPABILITY_OFFSET
        self.set_u16(VENDOR_ID, vendor_id)
        self.set_u16(DEVICE_ID, device_id)
        self.set_u8(REVISION_ID, revision_id)
        self.set_u8(PROG_IF, prog_if)
        self.set_u8(SUBCLASS, subclass)
        self.set_u8(CLASS_CODE, class_code)
        self.set_u8(HEADER_TYPE, header_type)
        self.set_u16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set_u16(SUBSYSTEM_ID, subsystem_id)
        self._set_wmask(COMMAND, 2, COMMAND_WRITABLE)
        self._w1c[STATUS // 4] |= STATUS_RW1C << 16
        # Cache line size and latency timer are plain RW scratch registers for the OS;
        # interrupt line is where firmware/OS records the routed IRQ.
        self._set_wmask(CACHE_LINE_SIZE, 1, 0xFF)
        self._set_wmask(LATENCY_TIMER, 1, 0xFF)
        self._set_wmask(INTERRUPT_LINE, 1, 0xFF)

    # -- raw access for the device model (no masks) ------------------------------

    def _get(self, offset: int, size: int) -> int:
        reg, shift = offset // 4, (offset % 4) * 8
        if shift + size * 8 > 32:
            return self._get(offset, 2) | (self._get(offset + 2, size - 2) << 16)
        return (self._regs[reg] >> shift) & ((1 << (size * 8)) - 1)

    def _set(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset <= EXTENDED_CONFIG_SPACE_SIZE - size:
            raise ConfigSpaceError(f"config offset {offset:#x}+{size} out of range")
        for i in range(size):
            reg, shift = (offset + i) // 4, ((offset + i) % 4) * 8
            byte = (value >> (8 * i)) & 0xFF
            self._regs[reg] = (self._regs[reg] & ~(0xFF << shift)) | (byte << shift)

    def _set_wmask(self, offset: int, size: int, mask: int) -> None:
        for i in range(size):
            reg, shift = (offset + i) // 4, ((offset + i) % 4) * 8
            byte = (mask >> (8 * i)) & 0xFF
            self._wmask[reg] = (self._wmask[reg] & ~(0xFF << shift)) | (byte << shift)

    def get_u8(self, offset: int) -> int:
        return self._get(offset, 1)

    def get_u16(self, offset: int) -> int:
        return self._get(offset, 2)

    def get_u32(self, offset: int) -> int:
        return self._get(offset, 4)

    def set_u8(self, offset: int, value: int) -> None:
        self._set(offset, 1, value)

    def set_u16(self, offset: int, value: int) -> None:
        self._set(offset, 2, value)

    def set_u32(self, offset: int, value: int) -> None:
        self._set(offset, 4, value)

    def read_bytes(self, offset: int, length: int) -> bytes:
        return bytes(self._get(offset + i, 1) for i in range(length))

    # -- the guest's view ------------------------------------------------------------

    def read_reg(self, reg_idx: int) -> int:
        """The dword at reg_idx (0..1023); out of range reads all-ones like a master abort."""
        if not 0 <= reg_idx < NUM_REGS:
            return U32
        return self._regs[reg_idx]

    def write_reg(self, reg_idx: int, offset: int, data: bytes) -> None:
        """A guest write of data at byte offset within dword reg_idx.

        Only writable bits change; ones written to RW1C bits clear them. Accesses that
        cross the dword or have odd sizes are dropped: the root never produces them, so
        seeing one means a buggy caller, and dropping is what hardware would do with
        byte enables it cannot decode.
        """
        size = len(data)
        if not 0 <= reg_idx < NUM_REGS or size not in (1, 2, 4) or not 0 <= offset <= 4 - size:
            return
        value = int.from_bytes(data, "little") << (8 * offset)
        lanes = _bytes_mask(offset, size)
        with self._rmw:
            old = self._regs[reg_idx]
            wmask = self._wmask[reg_idx] & lanes
            w1c = self._w1c[reg_idx] & lanes
            new = (old & ~wmask) | (value & wmask)
            new &= ~(value & w1c)
            self._regs[reg_idx] = new
        if new != old:
            self._notify_capabilities(reg_idx * 4 + offset, size)

    def _notify_capabilities(self, offset: int, size: int) -> None:
        for cap in self._caps:
            if cap.on_write and offset < cap.offset + cap.length and cap.offset < offset + size:
                cap.on_write(cap.offset, offset - cap.offset)

    # -- header fields -----------------------------------------------------------------

    @property
    def command(self) -> int:
        return self.get_u16(COMMAND)

    @property
    def status(self) -> int:
        return self.get_u16(STATUS)

    def set_status_bits(self, bits: int, on: bool = True) -> None:
        """Device-side status updates (interrupt status, error bits to be RW1C'd)."""
        with self._rmw:
            status = self.status
            self.set_u16(STATUS, (status | bits) if on else (status & ~bits))

    def set_interrupt(self, line: int, pin: int) -> None:
        """Interrupt line (the routed IRQ, guest-writable) and pin (1=INTA..4=INTD, RO)."""
        self.set_u8(INTERRUPT_LINE, line)
        self.set_u8(INTERRUPT_PIN, pin)

    @property
    def interrupt_pin(self) -> int:
        return self.get_u8(INTERRUPT_PIN)

    # -- BARs ------------------------------------------------------------------------

    def add_bar(self, index: int, size: int, kind: BarKind, prefetchable: bool = False) -> PciBar:
        """Declare BAR index of size bytes (a power of two); a 64-bit BAR takes index+1 too.

        Memory BARs are at least 16 bytes (the type bits), IO BARs 4-256 bytes (the PCI
        spec's limit for IO). Sizes of memory BARs a guest maps should be at least a
        page so that the mapping can be moved cheaply; that is the caller's choice.
        """
        slots = 2 if kind is BarKind.MEM64 else 1
        if not 0 <= index <= NUM_BARS - slots:
            raise ConfigSpaceError(f"BAR {index} ({kind.value}) does not fit in the header")
        if size <= 0 or size & (size - 1):
            raise ConfigSpaceError(f"BAR {index}: size {size:#x} is not a power of two")
        if kind is BarKind.IO and not 4 <= size <= 256:
            raise ConfigSpaceError(f"BAR {index}: IO BARs are 4-256 bytes, not {size}")
        if kind is BarKind.MEM32 and not 16 <= size <= 1 << 31:
            raise ConfigSpaceError(f"BAR {index}: 32-bit memory BAR of {size:#x} bytes")
        if kind is BarKind.MEM64 and not 16 <= size <= 1 << 63:
            raise ConfigSpaceError(f"BAR {index}: 64-bit memory BAR of {size:#x} bytes")
        for i in range(index, index + slots):
            if i in self._bars or self._covered_by_mem64(i):
                raise ConfigSpaceError(f"BAR {i} is already in use")
        bar = PciBar(index, size, kind, prefetchable and kind.is_memory)
        self._bars[index] = bar
        off = BAR0 + 4 * index
        size_mask = ~(size - 1)
        if kind is BarKind.IO:
            self._regs[off // 4] = BAR_IO_SPACE
            self._wmask[off // 4] = size_mask & BAR_IO_ADDRESS_MASK
        else:
            low = (BAR_MEM_TYPE_64 if kind is BarKind.MEM64 else 0) | (
                BAR_MEM_PREFETCHABLE if bar.prefetchable else 0)
            self._regs[off // 4] = low
            self._wmask[off // 4] = size_mask & BAR_MEM_ADDRESS_MASK
            if kind is BarKind.MEM64:
                self._regs[off // 4 + 1] = 0
                self._wmask[off // 4 + 1] = (size_mask >> 32) & U32
        return bar

    def _covered_by_mem64(self, index: int) -> bool:
        prev = self._bars.get(index - 1)
        return prev is not None and prev.kind is BarKind.MEM64

    def bars(self) -> list[PciBar]:
        """The declared BARs, by index."""
        return [self._bars[i] for i in sorted(self._bars)]

    def bar(self, index: int) -> PciBar | None:
        return self._bars.get(index)

    def bar_address(self, index: int) -> int:
        """The address currently programmed in BAR index (0 when undeclared)."""
        bar = self._bars.get(index)
        if bar is None:
            return 0
        reg = (BAR0 // 4) + index
        if bar.kind is BarKind.IO:
            return self._regs[reg] & BAR_IO_ADDRESS_MASK
        addr = self._regs[reg] & BAR_MEM_ADDRESS_MASK
        if bar.kind is BarKind.MEM64:
            addr |= self._regs[reg + 1] << 32
        return addr

    def set_bar_address(self, index: int, address: int) -> None:
        """The VMM places BAR index (e.g. from the SystemAllocator) before the guest runs."""
        bar = self._bars.get(index)
        if bar is None:
            raise ConfigSpaceError(f"BAR {index} is not declared")
        if address % bar.size:
            raise ConfigSpaceError(f"BAR {index}: {address:#x} is not aligned to {bar.size:#x}")
        limit = 1 << (64 if bar.kind is BarKind.MEM64 else 32)
        if not 0 <= address <= limit - bar.size:
            raise ConfigSpaceError(f"BAR {index}: {address:#x} does not fit a {bar.kind.value} BAR")
        reg = (BAR0 // 4) + index
        low_bits = self._regs[reg] & (0x3 if bar.kind is BarKind.IO else 0xF)
        self._regs[reg] = (address & U32 & ~(0x3 if bar.kind is BarKind.IO else 0xF)) | low_bits
        if bar.kind is BarKind.MEM64:
            self._regs[reg + 1] = address >> 32

    def bar_ranges(self) -> list[BarRange]:
        """The BARs the function decodes right now, as the root should map them.

        A BAR is decoded when its space is enabled in the command register and its
        address is a real one: 0 is "unassigned", and an address whose last byte is the
        top of the BAR's address space is what a BAR holds during sizing (all-ones
        written); IO BARs must also lie in the 64 KiB x86 port space. These are QEMU's
        pci_bar_address rules. Linux disables decode while it
        sizes and while it rewrites 64-bit BARs, so half-written addresses are not
        normally seen here at all.
        """
        command = self.command
        top_of = {BarKind.MEM32: U32, BarKind.MEM64: (1 << 64) - 1}
        ranges: list[BarRange] = []
        for bar in self.bars():
            enabled = COMMAND_IO_SPACE if bar.kind is BarKind.IO else COMMAND_MEMORY_SPACE
            if not command & enabled:
                continue
            base = self.bar_address(bar.index)
            last = base + bar.size - 1
            if base == 0 or (last > 0xFFFF if bar.kind is BarKind.IO else last >= top_of[bar.kind]):
                continue
            ranges.append(BarRange(bar.index, base, bar.size, bar.kind, bar.prefetchable))
        return ranges

    # -- capabilities -----------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None,
                       on_write: Callable[[int, int], None] | None = None) -> int:
        """Append a capability; returns its offset in configuration space.

        body is the capability after its two-byte header (ID, next pointer), wmask the
        guest-writable bits of body (default: none). on_write(cap_offset, rel_offset)
        runs after a guest write changed bytes of this capability, so e.g. MSI-X can act
        on its enable and function-mask bits. The ID and next pointer are always
        read-only; the list is kept in registration order.
        """
        length = 2 + len(body)
        if wmask is not None and len(wmask) != len(body):
            raise ConfigSpaceError("capability write mask and body differ in length")
        offset = self._next_cap_offset
        if offset + length > CONFIG_SPACE_SIZE:
            raise ConfigSpaceError(f"capability {cap_id:#x} of {length} bytes does not fit")
        self.set_u8(offset, cap_id)
        self.set_u8(offset + 1, 0)
        for i, b in enumerate(body):
            self.set_u8(offset + 2 + i, b)
        if wmask:
            for i, b in enumerate(wmask):
                self._set_wmask(offset + 2 + i, 1, b)
        if self._caps:
            self.set_u8(self._caps[-1].offset + 1, offset)
        else:
            self.set_u8(CAPABILITY_POINTER, offset)
            self.set_status_bits(STATUS_CAPABILITIES_LIST)
        self._caps.append(Capability(cap_id, offset, length, on_write))
        self._next_cap_offset = (offset + length + 3) & ~3
        return offset

    def capabilities(self) -> list[Capability]:
        return list(self._caps)
