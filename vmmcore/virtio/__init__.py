"""virtio core: the split virtqueue, the VirtioDevice base class and its interrupt path.

The virtio-pci transport (VirtioPciDevice) builds on these; device plugins subclass
VirtioDevice.
"""

from vmmcore.virtio.descriptor_utils import Reader, Writer
from vmmcore.virtio.device import EventFdMsix, VirtioDevice, VirtioInterrupt, VirtioWorker
from vmmcore.virtio.queue import (
    DescriptorChain,
    Queue,
    VirtqueueError,
    prepare_queues,
    vring_need_event,
)
from vmmcore.virtio.status import DeviceStatus, DeviceType

__all__ = [
    "DescriptorChain",
    "DeviceStatus",
    "DeviceType",
    "EventFdMsix",
    "Queue",
    "Reader",
    "VirtioDevice",
    "VirtioInterrupt",
    "VirtioWorker",
    "VirtqueueError",
    "Writer",
    "prepare_queues",
    "vring_need_event",
]
