"""The virtio-input device model (virtio 1.2, section 5.8): keyboard, mouse or tablet.

Two queues: eventq (0), device-writable 8-byte buffers the device fills with
virtio_input_event (Linux evdev type, code, value), and statusq (1), events from the
driver (keyboard LEDs), which are consumed and remembered.

Config space (5.8.4): the driver writes select and subsel, then reads size and the
union: ID_NAME, ID_SERIAL (strings), ID_DEVIDS (bus, vendor, product, version),
PROP_BITS, EV_BITS for each event type (a bitmap of codes; size 0 when the type is not
supported) and ABS_INFO for each absolute axis. That is everything Linux's virtio_input
probe reads.

Events come from an InputChannel (vmmcore.display) that a display backend feeds, and
from inject() (tests, tools). They wait, bounded, until the driver has posted buffers.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vmmcore.virtio import DeviceType, Reader, VirtioDevice

log = logging.getLogger(__name__)

# config select values
CFG_UNSET, CFG_ID_NAME, CFG_ID_SERIAL, CFG_ID_DEVIDS = 0x00, 0x01, 0x02, 0x03
CFG_PROP_BITS, CFG_EV_BITS, CFG_ABS_INFO = 0x10, 0x11, 0x12
CONFIG_SIZE = 8 + 128
EVENT = struct.Struct("<HHi")
ABSINFO = struct.Struct("<iiiii")
DEVIDS = struct.Struct("<HHHH")

EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_MSC, EV_LED, EV_REP = 0x00, 0x01, 0x02, 0x03, 0x04, 0x11, 0x14
REL_X, REL_Y, REL_HWHEEL, REL_WHEEL = 0x00, 0x01, 0x06, 0x08
ABS_X, ABS_Y = 0x00, 0x01
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA = 0x110, 0x111, 0x112, 0x113, 0x114
LED_NUML, LED_CAPSL, LED_SCROLLL = 0, 1, 2
REP_DELAY, REP_PERIOD = 0, 1
KEY_ESC, KEY_MICMUTE = 1, 248
INPUT_PROP_POINTER = 0x00
BUS_VIRTUAL = 0x06
ABS_MAX = 32767

#: events kept while the driver has posted no buffers; older ones are dropped
MAX_PENDING = 4096
#: status events remembered (newest)
MAX_STATUS = 256


def bitmap(codes: Iterable[int]) -> bytes:
    """Little-endian bitmap of codes, trimmed after the last non-zero byte."""
    codes = list(codes)
    if not codes:
        return b""
    out = bytearray(max(codes) // 8 + 1)
    for c in codes:
        out[c // 8] |= 1 << (c % 8)
    return bytes(out)


PROFILES: dict[str, dict[str, Any]] = {
    "keyboard": {
        "name": "vmm virtio keyboard", "product": 0x0001, "props": [],
        "ev": {EV_KEY: range(KEY_ESC, KEY_MICMUTE + 1),
               EV_REP: [REP_DELAY, REP_PERIOD],
               EV_LED: [LED_NUML, LED_CAPSL, LED_SCROLLL]},
        "abs": {},
    },
    "mouse": {
        "name": "vmm virtio mouse", "product": 0x0002, "props": [INPUT_PROP_POINTER],
        "ev": {EV_KEY: [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA],
               EV_REL: [REL_X, REL_Y, REL_HWHEEL, REL_WHEEL]},
        "abs": {},
    },
    "tablet": {
        "name": "vmm virtio tablet", "product": 0x0003, "props": [],
        "ev": {EV_KEY: [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA],
               EV_REL: [REL_HWHEEL, REL_WHEEL],
               EV_ABS: [ABS_X, ABS_Y]},
        "abs": {ABS_X: (0, ABS_MAX, 0, 0, 0), ABS_Y: (0, ABS_MAX, 0, 0, 0)},
    },
}


class VirtioInput(VirtioDevice):
    """A virtio-input device of one kind (keyboard, mouse, tablet)."""

    device_type = DeviceType.INPUT

    def __init__(self, kind: str = "keyboard", name: str = "", serial: str = "",
                 channel: Any = None, queue_size: int = 64, vendor: int = 0x0627,
                 version: int = 1) -> None:
        super().__init__()
        if kind not in PROFILES:
            raise ValueError(f"unknown input kind {kind!r}")
        self.kind = kind
        self.profile = PROFILES[kind]
        self.dev_name = name or self.profile["name"]
        self.serial = serial
        self.devids = (BUS_VIRTUAL, vendor, self.profile["product"], version)
        self.channel = channel
        self.queue_max_sizes = (queue_size, queue_size)
        self.select = 0
        self.subsel = 0
        self.pending: collections.deque[tuple[int, int, int]] = collections.deque()
        self.dropped = 0
        self.delivered = 0
        self.status: collections.deque[tuple[int, int, int]] = collections.deque(
            maxlen=MAX_STATUS)
        self._lock = threading.Lock()
        self._refresh_config()

    @property
    def name(self) -> str:
        return f"input-{self.kind}"

    # -- config space -----------------------------------------------------------------------

    def config_payload(self, select: int, subsel: int) -> bytes:
        """The union's bytes for (select, subsel); b"" = size 0 (nothing there)."""
        if select == CFG_ID_NAME and subsel == 0:
            return self.dev_name.encode("utf-8", "replace")[:128]
        if select == CFG_ID_SERIAL and subsel == 0:
            return self.serial.encode("utf-8", "replace")[:128]
        if select == CFG_ID_DEVIDS and subsel == 0:
            return DEVIDS.pack(*self.devids)
        if select == CFG_PROP_BITS and subsel == 0:
            return bitmap(self.profile["props"])
        if select == CFG_EV_BITS:
            return bitmap(self.profile["ev"].get(subsel, ()))[:128]
        if select == CFG_ABS_INFO and subsel in self.profile["abs"]:
            return ABSINFO.pack(*self.profile["abs"][subsel])
        return b""

    def _refresh_config(self) -> None:
        payload = self.config_payload(self.select, self.subsel)
        self.config = bytearray(struct.pack("<BBB5x", self.select, self.subsel, len(payload))
                                + payload.ljust(128, b"\0"))

    def write_config(self, offset: int, data: bytes) -> None:
        """select (byte 0) and subsel (byte 1) are writable; the rest is read-only."""
        for i, b in enumerate(data):
            if offset + i == 0:
                self.select = b
            elif offset + i == 1:
                self.subsel = b
        self._refresh_config()

    # -- events -------------------------------------------------------------------------------

    def inject(self, events: Sequence[tuple[int, int, int]]) -> None:
        """Queue events for the guest (any thread) and deliver what buffers allow."""
        with self._lock:
            self._enqueue(events)
            if self.mem is not None and self.queues and self.worker is not None:
                self._deliver()

    def _enqueue(self, events: Iterable[tuple[int, int, int]]) -> None:
        for ev in events:
            if len(self.pending) >= MAX_PENDING:
                self.pending.popleft()
                self.dropped += 1
            self.pending.append(ev)

    def _deliver(self) -> None:
        """Fill posted eventq buffers with pending events (caller holds the lock)."""
        queue, mem = self.queues[0], self.mem
        assert mem is not None
        sent = False
        while self.pending:
            chain = queue.pop(mem)
            if chain is None:
                break
            t, c, v = self.pending.popleft()
            data = EVENT.pack(t & 0xFFFF, c & 0xFFFF, v)
            written = chain.write(mem, data) if chain.writable_len >= EVENT.size else 0
            queue.add_used(mem, chain, written)
            self.delivered += 1
            sent = True
        if sent:
            self.signal_used(0)

    def _on_channel(self) -> None:
        with self._lock:
            self._enqueue(self.channel.receive())
            self._deliver()

    def handle_queue(self, index: int) -> None:
        with self._lock:
            if index == 0:
                self._deliver()
                return
            queue, mem = self.queues[1], self.mem
            used = False
            while (chain := queue.pop(mem)) is not None:
                reader = Reader(mem, chain)
                while reader.available_bytes() >= EVENT.size:
                    self.status.append(reader.read_obj(EVENT))
                queue.add_used(mem, chain, 0)
                used = True
            if used:
                self.signal_used(1)

    @property
    def leds(self) -> dict[int, bool]:
        """The LED state the driver last set through statusq."""
        out: dict[int, bool] = {}
        for t, c, v in self.status:
            if t == EV_LED:
                out[c] = bool(v)
        return out

    # -- lifecycle ----------------------------------------------------------------------------

    def activate(self, mem, interrupt, queues, queue_evts) -> None:  # type: ignore[override]
        self.mem, self.interrupt = mem, interrupt
        self.queues, self.queue_evts = list(queues), list(queue_evts)
        extra = {self.channel.fileno(): self._on_channel} if self.channel is not None else {}
        self.start_worker(extra)

    def reset(self) -> bool:
        stopped = super().reset()       # joins the worker: must not hold the lock here
        with self._lock:
            self.pending.clear()
        return stopped

    def keep_fds(self) -> list[int]:
        return self.channel.keep_fds() if self.channel is not None else []


def create(options: Mapping[str, Any], ctx: Any) -> VirtioInput:
    """The PluginSpec factory."""
    channel = None
    source = options.get("source") or ""
    if source.startswith("display:"):
        from vmmcore.display import input_channel

        channel = input_channel(source[len("display:"):])
    elif source:
        raise ValueError(f"source={source!r} is not valid")
    return VirtioInput(options.get("kind", "keyboard"), name=options.get("name") or "",
                       serial=options.get("serial") or "", channel=channel,
                       queue_size=options.get("queue_size", 64))
