"""The test-side virtio driver now lives in vmmcore.virtio.testing (plugins use it too)."""

from vmmcore.virtio.testing import *  # noqa: F403
from vmmcore.virtio.testing import DESC, Used, VirtqueueDriver  # noqa: F401
