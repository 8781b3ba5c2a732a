"""The virtio-rng device model (virtio 1.2 section 5.4): one request queue; each request
is a device-writable buffer that the device fills with entropy.

This is the template for a device plugin: subclass VirtioDevice, say what you are
(device_type, queue_max_sizes), implement handle_queue(), and expose a factory
`create(options, ctx)` that the PluginSpec names. The core wraps the device in the
virtio-pci transport, gives it guest memory, queues, kick eventfds and an interrupt, and
runs handle_queue() in a worker thread of its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from vmm_virtio_rng.entropy import EntropySource
from vmmcore.virtio import DeviceType, VirtioDevice

#: A guest may post a buffer of up to 4 GiB; we fill at most this much per request (the
#: driver sees a short write and asks again), so a hostile length costs nothing.
MAX_FILL = 64 * 1024
#: How long the worker waits for the rate limiter before answering a request short.
RATE_WAIT = 0.25


class VirtioRng(VirtioDevice):
    """virtio-rng: fills each writable buffer from an EntropySource."""

    device_type = DeviceType.RNG

    def __init__(self, source: EntropySource, queue_size: int = 256) -> None:
        super().__init__()
        self.source = source
        self.queue_max_sizes = (queue_size,)

    @property
    def name(self) -> str:
        return "virtio-rng"

    def handle_queue(self, index: int) -> None:
        queue, mem = self.queues[index], self.mem
        while (chain := queue.pop(mem)) is not None:
            want = min(chain.writable_len, MAX_FILL)
            data = self._entropy(want)
            queue.add_used(mem, chain, chain.write(mem, data) if data else 0)
            self.signal_used(index)

    def _entropy(self, want: int) -> bytes:
        """Up to want bytes; with a rate limit, wait briefly for at least one byte."""
        data = self.source.read(want)
        deadline = time.monotonic() + RATE_WAIT
        while not data and want and time.monotonic() < deadline:
            time.sleep(0.01)
            data = self.source.read(want)
        return data

    def keep_fds(self) -> list[int]:
        return [self.source.fileno()]

    def shutdown(self) -> None:
        super().shutdown()
        self.source.close()


def create(options: Mapping[str, Any], ctx: object) -> VirtioRng:
    """The PluginSpec factory: options are already validated against the schema."""
    source = EntropySource(options["source"], rate=options["rate"])
    return VirtioRng(source, queue_size=options["queue_size"])
