"""A 16550A UART, as the Linux 8250 driver and early consoles drive it.

Registers (offset from the port base; DLAB is LCR bit 7):

    0  RBR (read) / THR (write)        DLL when DLAB=1
    1  IER (bits 0-3)                  DLM when DLAB=1
    2  IIR (read) / FCR (write)
    3  LCR      4  MCR (bits 0-4)      5  LSR      6  MSR      7  SCR

Transmission is instantaneous: a THR write goes straight to the backend (or, in
loopback mode, into the receive FIFO), so LSR always shows THRE and TEMT, and a THRE
interrupt is raised again after every write and whenever IER's THRI bit is switched on
(what the 8250 driver's THRE test at start-up and its TX path expect).

Interrupt sources, highest priority first, as IIR reports them:
    0x06 receiver line status (overrun)    cleared by reading LSR
    0x04 received data available           cleared when the receive FIFO is empty
    0x02 THR empty                         cleared by reading IIR (when it is the one
                                           reported) or by writing THR
    0x00 modem status                      cleared by reading MSR
IIR bits 7:6 read 0b11 while the FIFOs are enabled (FCR bit 0), which is how Linux
recognises a 16550A. The interrupt is raised with Interrupt.trigger() (an edge, like
crosvm's irqfd) each time a source that IER enables becomes pending.

Host input arrives through queue_input() from any thread; it waits in a host-side
buffer (bounded: INPUT_LIMIT bytes, beyond which bytes are dropped and LSR reports an
overrun) and is read by the guest through RBR.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Protocol

from vmmcore.bus import BusDevice
from vmmcore.devices import read_bytewise, write_bytewise
from vmmcore.interrupts import Interrupt

log = logging.getLogger(__name__)

# Register offsets.
DATA = 0        # RBR / THR, DLL with DLAB
IER = 1         # DLM with DLAB
IIR = 2         # FCR on write
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
REG_COUNT = 8

IER_RDI = 0x01      # received data available
IER_THRI = 0x02     # THR empty
IER_RLSI = 0x04     # receiver line status
IER_MSI = 0x08      # modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA_MASK = 0x0F
# Not in loopback: a host that is always there (CTS, DSR and DCD asserted), as crosvm.
MSR_DEFAULT = MSR_CTS | MSR_DSR | MSR_DCD

DEFAULT_BAUD_DIVISOR = 12   # 9600 baud
INPUT_LIMIT = 1 << 20       # host bytes waiting for the guest

# Pending-source bits, internal; ordered by priority for IIR.
_SRC_RLS = 0x1
_SRC_RDA = 0x2
_SRC_THRE = 0x4
_SRC_MS = 0x8
_IIR_FOR_SOURCE = ((_SRC_RLS, IIR_RLSI), (_SRC_RDA, IIR_RDI), (_SRC_THRE, IIR_THRI),
                   (_SRC_MS, IIR_MSI))


class SerialOutput(Protocol):
    """Where the guest's transmitted bytes go (serial_backends.SerialBackend)."""

    def write(self, data: bytes) -> None: ...


class Serial(BusDevice):
    """One 16550A UART; a BusDevice of 8 ports.

    Serial(interrupt, output=None, *, name="serial")
      interrupt  an Interrupt (vmmcore.interrupts) raised with trigger()
      output     anything with write(bytes) (a SerialBackend); None drops the output
      name       the debug label (e.g. "serial COM1")
    """

    def __init__(self, interrupt: Interrupt, output: SerialOutput | None = None, *,
                 name: str = "serial") -> None:
        self.interrupt = interrupt
        self.output = output
        self.name = name
        # The bus serialises vCPU accesses; this lock also covers queue_input().
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._output_failed = False
        self._force_trigger = False
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.ier = 0
        self.lcr = 0x03             # 8N1
        self.mcr = MCR_OUT2
        self.fcr = 0
        self.scr = 0
        self.divisor = DEFAULT_BAUD_DIVISOR
        self._thre_pending = False
        self._overrun = False
        self._msr_delta = 0
        self._last_modem_lines = self._modem_lines()

    # BusDevice interface ------------------------------------------------------------

    def debug_label(self) -> str:
        return self.name

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            before = self._sources()
            data = read_bytewise(self._read_reg, REG_COUNT, offset, size)
            fire = bool(self._sources() & ~before)
        if fire:
            self.interrupt.trigger()
        return data

    def write(self, offset: int, data: bytes) -> None:
        out = bytearray()
        with self._lock:
            before = self._sources()
            self._force_trigger = False
            write_bytewise(lambda off, v: self._write_reg(off, v, out), REG_COUNT,
                           offset, data)
            fire = self._force_trigger or bool(self._sources() & ~before)
        if out:
            self._emit(bytes(out))
        if fire:
            self.interrupt.trigger()

    # Host side -----------------------------------------------------------------------

    def queue_input(self, data: bytes) -> int:
        """Queue bytes for the guest to read (any thread); returns how many were
        accepted (the rest overflowed INPUT_LIMIT and count as an overrun)."""
        if not data:
            return 0
        with self._lock:
            before = self._sources()
            accepted = self._push_rx(bytes(data))
            fire = bool(self._sources() & ~before)
        if fire:
            self.interrupt.trigger()
        return accepted

    def pending_input(self) -> int:
        """Bytes waiting for the guest to read."""
        with self._lock:
            return len(self._rx)

    # Internals -----------------------------------------------------------------------

    def _push_rx(self, data: bytes) -> int:
        room = max(0, INPUT_LIMIT - len(self._rx))
        if len(data) > room:
            self._overrun = True
            data = data[:room]
        self._rx.extend(data)
        return len(data)

    def _emit(self, data: bytes) -> None:
        if self.output is None or self._output_failed:
            return
        try:
            self.output.write(data)
        except Exception as e:   # a broken backend must not take the vCPU down
            self._output_failed = True
            log.warning("%s: output failed, dropping further output: %s", self.name, e)

    def _loopback(self) -> bool:
        return bool(self.mcr & MCR_LOOP)

    def _modem_lines(self) -> int:
        """MSR bits 4-7 (the line states, without the delta bits)."""
        if self._loopback():
            m = self.mcr
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return MSR_DEFAULT

    def _update_modem_delta(self) -> None:
        lines = self._modem_lines()
        changed = lines ^ self._last_modem_lines
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        if self._last_modem_lines & MSR_RI and not lines & MSR_RI:
            self._msr_delta |= MSR_TERI    # trailing edge of ring indicator
        self._last_modem_lines = lines

    def _sources(self) -> int:
        """Pending interrupt sources that IER enables."""
        s = 0
        if self._overrun and self.ier & IER_RLSI:
            s |= _SRC_RLS
        if self._rx and self.ier & IER_RDI:
            s |= _SRC_RDA
        if self._thre_pending and self.ier & IER_THRI:
            s |= _SRC_THRE
        if self._msr_delta and self.ier & IER_MSI:
            s |= _SRC_MS
        return s

    def _iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
        sources = self._sources()
        for src, ident in _IIR_FOR_SOURCE:
            if sources & src:
                return fifo | ident
        return fifo | IIR_NO_INT

    def _lsr(self) -> int:
        lsr = LSR_THRE | LSR_TEMT
        if self._rx:
            lsr |= LSR_DR
        if self._overrun:
            lsr |= LSR_OE
        return lsr

    def _read_reg(self, off: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if off == DATA:
            if dlab:
                return self.divisor & 0xFF
            return self._rx.popleft() if self._rx else 0
        if off == IER:
            return (self.divisor >> 8) & 0xFF if dlab else self.ier
        if off == IIR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self._thre_pending = False   # reading IIR acknowledges THRE
            return iir
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            lsr = self._lsr()
            self._overrun = False
            return lsr
        if off == MSR:
            msr = self._modem_lines() | self._msr_delta
            self._msr_delta = 0
            return msr
        return self.scr  # SCR

    def _write_reg(self, off: int, value: int, out: bytearray) -> None:
        dlab = self.lcr & LCR_DLAB
        if off == DATA:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                return
            if self._loopback():
                self._push_rx(bytes([value]))
            else:
                out.append(value)
            # The byte leaves at once: THR is empty again, which the driver is told
            # after every write.
            self._thre_pending = True
            if self.ier & IER_THRI:
                self._force_trigger = True
        elif off == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return
            old = self.ier
            self.ier = value & IER_MASK
            if self.ier & IER_THRI:
                if not old & IER_THRI:
                    self._thre_pending = True   # THR is empty: raise THRE now
            else:
                self._thre_pending = False
        elif off == IIR:   # FCR
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
            self.fcr = value & ~(FCR_CLEAR_RCVR | FCR_CLEAR_XMIT) & 0xFF
        elif off == LCR:
            self.lcr = value
        elif off == MCR:
            self.mcr = value & MCR_MASK
            self._update_modem_delta()
        elif off == LSR:
            pass   # factory test register on real parts; read-only here
        elif off == MSR:
            pass
        else:
            self.scr = value
