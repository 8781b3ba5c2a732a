"""The debug exit port: how a test guest ends the VM with a result.

A write of 1, 2 or 4 bytes of value v (little-endian) at offset 0 of the port
(layout.DEBUG_EXIT_PORT) reports VmEvent.GUEST_EXIT with status v, and `vmm run` exits
with status v (0 = success). Unlike QEMU's isa-debug-exit the value is not transformed
((v << 1) | 1 there). Writes of other sizes or at other offsets are ignored; reads
return 0xff.
"""

from __future__ import annotations

from vmmcore.bus import BusDevice
from vmmcore.devices import ff_bytes
from vmmcore.vm_events import VmEvent, VmEventSink

VALID_SIZES = (1, 2, 4)


class DebugExit(BusDevice):
    """The exit port; a BusDevice (the builder maps 4 ports so a 32-bit OUT fits).

    DebugExit(events)
      events  the VmEventSink that gets VmEvent.GUEST_EXIT with the written value
    """

    def __init__(self, events: VmEventSink) -> None:
        self.events = events

    def debug_label(self) -> str:
        return "debug-exit"

    def read(self, offset: int, size: int) -> bytes:
        return ff_bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) not in VALID_SIZES:
            return
        value = int.from_bytes(bytes(data), "little")
        # A process exit status is one byte: a failure code above 255 must not wrap to
        # success (256 -> 0), so anything larger becomes 255.
        status = min(value, 255)
        self.events.report(VmEvent.GUEST_EXIT, status, f"guest exit status {value}")
