"""The i8042 keyboard controller, as much of it as a VMM needs: no keyboard or mouse is
attached, but the controller answers like a real one so that Linux's i8042 probe
finishes without timeouts and its reboot path (which waits for the input buffer to
drain, then writes 0xFE to port 0x64) resets at once.

Registered as one device over ports 0x60..0x64 (length 5):

    offset 0  0x60  data: controller replies (read), command parameters (write)
    offset 1  0x61  system control port B (normally served by KVM's in-kernel PIT
                    speaker device; a plain latch here, bit 4 toggling on every read)
    offset 2,3      nothing: reads 0xff, writes ignored
    offset 4  0x64  status (read) / controller command (write)

Commands: 0x20-0x3f read controller RAM (0x20: the command byte), 0x60-0x7f write it,
0xa7/0xa8 disable/enable the aux port, 0xa9 aux interface test (answers 0x02: no aux
device), 0xaa self-test (0x55), 0xab keyboard interface test (0x00), 0xad/0xae
disable/enable the keyboard, 0xc0 read input port, 0xd0/0xd1 read/write the output port
(bit 0 clear = reset), 0xd2/0xd3 echo a byte as keyboard/aux data (0xd3 echoes as
keyboard data, so Linux sees a loop test failure and quickly concludes there is no aux
port), 0xd4 byte to the aux device (dropped), 0xf0-0xff pulse output lines (even = the
reset line). Bytes for the keyboard itself are dropped: no keyboard answers.
A reset is reported as VmEvent.RESET; like crosvm, the VMM then exits.
"""

from __future__ import annotations

import threading
from collections import deque

from vmmcore.bus import BusDevice
from vmmcore.devices import read_bytewise, write_bytewise
from vmmcore.vm_events import VmEvent, VmEventSink

DATA = 0
PORT_B = 1
COMMAND = 4
LENGTH = 5

# Status register bits.
STS_OBF = 0x01        # output buffer full (data for the host at 0x60)
STS_IBF = 0x02        # input buffer full (never: we consume writes at once)
STS_SYS = 0x04        # system flag: self-test passed
STS_CMD = 0x08        # the last write was a command (0x64), not data (0x60)
STS_UNLOCKED = 0x10   # keyboard not inhibited by the keylock
STS_AUXDATA = 0x20    # the byte in the output buffer is from the aux port

# Command byte (controller RAM 0) bits.
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_KBDINT | CTR_SYS | CTR_XLATE

OUTPORT_RESET = 0x01   # active low: clearing it resets the CPU
OUTPORT_A20 = 0x02
OUTPORT_DEFAULT = OUTPORT_RESET | OUTPORT_A20

OUTPUT_QUEUE_MAX = 16

RESET_MESSAGE = "guest reset through the i8042"


class I8042(BusDevice):
    """The i8042 controller; a BusDevice over 0x60..0x64.

    I8042(events)
      events  the VmEventSink that gets VmEvent.RESET (status 0) on a reset pulse
    """

    def __init__(self, events: VmEventSink) -> None:
        self.events = events
        self._lock = threading.Lock()
        self.ram = bytearray(32)
        self.ram[0] = CTR_DEFAULT
        self.outport = OUTPORT_DEFAULT
        self.port_b = 0
        self.status = STS_SYS | STS_UNLOCKED
        self._out: deque[tuple[int, bool]] = deque()   # (byte, from aux)
        self._pending: int | None = None   # command waiting for its parameter byte
        self.reset_count = 0

    def debug_label(self) -> str:
        return "i8042"

    @property
    def command_byte(self) -> int:
        return self.ram[0]

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return read_bytewise(self._read_reg, LENGTH, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            write_bytewise(self._write_reg, LENGTH, offset, data)

    # Internals -----------------------------------------------------------------------

    def _status(self) -> int:
        status = self.status & ~(STS_OBF | STS_AUXDATA | STS_IBF)
        if self._out:
            status |= STS_OBF
            if self._out[0][1]:
                status |= STS_AUXDATA
        return status

    def _reply(self, value: int, aux: bool = False) -> None:
        if len(self._out) < OUTPUT_QUEUE_MAX:
            self._out.append((value & 0xFF, aux))

    def _read_reg(self, off: int) -> int:
        if off == DATA:
            return self._out.popleft()[0] if self._out else 0
        if off == PORT_B:
            self.port_b ^= 0x10          # refresh toggle, for old delay loops
            return self.port_b
        if off == COMMAND:
            return self._status()
        return 0xFF

    def _write_reg(self, off: int, value: int) -> None:
        if off == DATA:
            self.status &= ~STS_CMD
            self._data(value)
        elif off == PORT_B:
            self.port_b = (self.port_b & 0x10) | (value & 0x0F)
        elif off == COMMAND:
            self.status |= STS_CMD
            self._command(value)

    def _data(self, value: int) -> None:
        cmd, self._pending = self._pending, None
        if cmd is None or cmd == 0xD4:
            return                      # to the keyboard / mouse: nobody there
        if 0x60 <= cmd <= 0x7F:
            self.ram[cmd & 0x1F] = value
            if cmd == 0x60:
                self.status = (self.status & ~STS_SYS) | (value & CTR_SYS)
        elif cmd == 0xD1:
            self.outport = value
            if not value & OUTPORT_RESET:
                self._reset()
        elif cmd == 0xD2:
            self._reply(value)
        elif cmd == 0xD3:
            self._reply(value)          # as keyboard data: "no aux loop" to Linux

    def _command(self, cmd: int) -> None:
        self._pending = None
        if 0x20 <= cmd <= 0x3F:
            self._reply(self.ram[cmd & 0x1F])
        elif 0x60 <= cmd <= 0x7F or cmd in (0xD1, 0xD2, 0xD3, 0xD4):
            self._pending = cmd
        elif cmd == 0xA7:
            self.ram[0] |= CTR_AUXDIS
        elif cmd == 0xA8:
            self.ram[0] &= ~CTR_AUXDIS
        elif cmd == 0xA9:
            self._reply(0x02)           # aux data line stuck: there is no aux port
        elif cmd == 0xAA:
            self.status |= STS_SYS
            self._reply(0x55)
        elif cmd == 0xAB:
            self._reply(0x00)
        elif cmd == 0xAD:
            self.ram[0] |= CTR_KBDDIS
        elif cmd == 0xAE:
            self.ram[0] &= ~CTR_KBDDIS
        elif cmd == 0xC0:
            self._reply(0x00)
        elif cmd == 0xD0:
            self._reply(self.outport)
        elif cmd >= 0xF0 and not cmd & OUTPORT_RESET:
            self._reset()               # 0xFE and friends pulse the reset line

    def _reset(self) -> None:
        self.reset_count += 1
        self.events.report(VmEvent.RESET, 0, RESET_MESSAGE)
