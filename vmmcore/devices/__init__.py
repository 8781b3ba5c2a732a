"""The legacy devices the core always has, as plain BusDevice models (no KVM here).

    serial.Serial                 16550A UART (COM1..COM4, see serial_backends for --serial)
    i8042.I8042                   keyboard controller at 0x60..0x64: status, reset line
    cmos.Cmos                     CMOS RAM and RTC at 0x70/0x71
    acpi_pm.AcpiPmDevice          ACPI PM1a event and control blocks (S5 power-off, SCI)
    debug_exit.DebugExit          the test guests' exit port

Every model is safe for any access a hostile guest can make: a size or offset a register
does not have reads as 0xff and writes are ignored; nothing raises into the vCPU loop.

The helpers below are for 8-bit ISA devices: a wider port access to such a device is
split into byte cycles at consecutive ports (what an ISA bus does with a 16-bit IN/OUT),
so ``inw 0x70`` reads the CMOS index and then the data port.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_ACCESS_SIZE = 8   # the widest MMIO/PIO access KVM reports


def ff_bytes(size: int) -> bytes:
    """What an unclaimed read of size bytes returns (clamped for hostile sizes)."""
    return b"\xff" * max(0, min(int(size), MAX_ACCESS_SIZE))


def read_bytewise(read_byte: Callable[[int], int], length: int, offset: int,
                  size: int) -> bytes:
    """Read size bytes at offset, one byte register at a time; offsets outside
    [0, length) read as 0xff."""
    size = max(0, min(int(size), MAX_ACCESS_SIZE))
    out = bytearray(b"\xff" * size)
    for i in range(size):
        off = offset + i
        if 0 <= off < length:
            out[i] = read_byte(off) & 0xFF
    return bytes(out)


def write_bytewise(write_byte: Callable[[int, int], None], length: int, offset: int,
                   data: bytes) -> None:
    """Write data at offset one byte register at a time; bytes outside [0, length)
    are dropped."""
    data = bytes(data[:MAX_ACCESS_SIZE])
    for i, value in enumerate(data):
        off = offset + i
        if 0 <= off < length:
            write_byte(off, value)
