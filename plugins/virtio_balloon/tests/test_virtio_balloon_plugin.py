"""Tests of the virtio-balloon plugin: its contract with the core, then the device model
driven through the core's test driver (no KVM)."""

from __future__ import annotations

import struct
import threading
import time

import pytest
from vmm_virtio_balloon.device import (
    MAX_PFNS_PER_BUFFER,
    STAT,
    STATS_Q,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_STATS_VQ,
    VirtioBalloon,
    create,
)
from vmm_virtio_balloon.plugin import PLUGIN

from vmmcore.device_options import DeviceArgs, collect_devices
from vmmcore.errors import ConfigError
from vmmcore.plugin_api import DeviceContext
from vmmcore.registry import Registry
from vmmcore.virtio import DeviceType
from vmmcore.virtio.testing import DeviceHarness

MiB = 1 << 20
OPTIONS = {"deflate_on_oom": True, "stats": True, "discard": True, "queue_size": 16}


def test_registered_through_its_entry_point():
    record = Registry(fresh=True).get("device", "virtio_balloon")
    assert record is not None, "vmm-virtio-balloon is not installed"
    assert not record.broken, record.error
    assert record.spec is PLUGIN
    assert "@include common_device.policy" in record.policy_path.read_text()


def _select(text: str):
    return collect_devices(DeviceArgs([("--device", text)]), registry=Registry())


def test_options():
    [d] = _select("virtio_balloon")
    assert d.options == {"deflate_on_oom": True, "stats": True, "discard": True,
                         "queue_size": 128}
    [d] = _select("virtio-balloon:stats=false,queue_size=64")
    assert d.options["stats"] is False and d.options["queue_size"] == 64
    with pytest.raises(ConfigError, match="power of two"):
        _select("virtio_balloon:queue_size=100")


def test_features_and_queues():
    dev = create(OPTIONS, DeviceContext("virtio_balloon0", 0, 16 * MiB))
    assert dev.device_type == DeviceType.BALLOON
    assert dev.features() == (1 << VIRTIO_BALLOON_F_STATS_VQ
                              | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    assert len(dev.queue_max_sizes) == 3
    plain = create({**OPTIONS, "stats": False, "deflate_on_oom": False},
                   DeviceContext("virtio_balloon0", 0, 16 * MiB))
    assert plain.features() == 0 and len(plain.queue_max_sizes) == 2


def test_set_size_updates_num_pages_and_bumps_the_config_generation():
    dev = VirtioBalloon(16 * MiB)
    gen = dev.config_generation
    answer = dev.control("set_size", {"size": 4 * MiB + 123})
    assert answer["num_pages"] == 1024 and answer["target_bytes"] == 4 * MiB
    assert struct.unpack("<II", dev.read_config(0, 8)) == (1024, 0)
    assert dev.config_generation == (gen + 1) & 0xFF
    with pytest.raises(ValueError, match="larger than guest memory"):
        dev.control("set_size", {"size": 17 * MiB})
    with pytest.raises(ValueError):
        dev.control("set_size", {"size": -1})
    with pytest.raises(ValueError):
        dev.control("set_size", {})
    with pytest.raises(NotImplementedError):
        dev.control("explode", {})


def test_driver_writes_only_actual():
    dev = VirtioBalloon(16 * MiB)
    dev.control("set_size", {"size": 8 * MiB})
    dev.write_config(0, struct.pack("<II", 7, 99))      # num_pages is not the driver's
    assert struct.unpack("<II", dev.read_config(0, 8)) == (2048, 99)
    dev.write_config(6, b"\x01")
    assert dev.query()["actual"] == 99 | 1 << 16
    dev.write_config(100, b"\xff" * 4)                   # beyond the config: ignored
    assert dev.read_config(8, 4) == bytes(4)


@pytest.fixture
def balloon():
    harness = DeviceHarness(create(OPTIONS, DeviceContext("virtio_balloon0", 0, 4 * MiB)))
    harness.activate(1 << VIRTIO_BALLOON_F_STATS_VQ)
    yield harness
    harness.close()


def _pfns(*pfns: int) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def test_inflate_releases_the_pages_and_deflate_counts_them_back(balloon):
    dev, mem = balloon.device, balloon.mem
    page = 3 * MiB - 16384               # the end of the deflate queue's unused data area
    mem.write(page, b"\xab" * 8192)
    balloon.drivers[0].add(out=[_pfns(page >> 12, (page >> 12) + 1)])
    [used] = balloon.wait_used(0)
    assert used.length == 0
    assert mem.read(page, 8192) == bytes(8192)          # punched: reads back zeroes
    q = dev.query()
    assert q["inflated_pages"] == 2 and q["discarded_bytes"] == 8192
    balloon.drivers[1].add(out=[_pfns(page >> 12)])
    balloon.wait_used(1)
    assert dev.query()["inflated_pages"] == 1
    assert balloon.reset_reasons == []


def test_hostile_pfns_are_skipped_not_fatal(balloon):
    dev = balloon.device
    balloon.drivers[0].add(out=[_pfns(0xFFFF_FFFF, 1 << 30, 5000)])
    [used] = balloon.wait_used(0)
    assert dev.query()["invalid_pfns"] == 3 and dev.query()["inflated_pages"] == 0
    # a buffer far longer than any driver sends is looked at only in part
    big = _pfns(*([(3 * MiB - 16384) >> 12] * (MAX_PFNS_PER_BUFFER + 100)))
    balloon.drivers[0].add(out=[big])
    balloon.wait_used(0)
    assert dev.query()["inflated_pages"] == MAX_PFNS_PER_BUFFER
    assert balloon.reset_reasons == []


def test_stats_are_requested_and_reported(balloon):
    dev = balloon.device
    stats_q = balloon.drivers[STATS_Q]
    stats_q.add(out=[STAT.pack(4, 1000) + STAT.pack(5, 4096)])
    stats_q.kick()
    deadline = time.monotonic() + 5
    while dev.stats_updated is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.stats == {"free_memory": 1000, "total_memory": 4096}

    answer = {}
    asker = threading.Thread(target=lambda: answer.update(dev.control("stats", {})))
    asker.start()
    used = []
    deadline = time.monotonic() + 5
    while not used and time.monotonic() < deadline:
        used = stats_q.get_used()               # the device hands the buffer back
        time.sleep(0.01)
    assert used and used[0].length == 0
    stats_q.add(out=[STAT.pack(4, 2000) + STAT.pack(77, 1)])
    stats_q.kick()
    asker.join(5)
    assert answer["stats_fresh"] is True
    assert answer["stats"] == {"free_memory": 2000, "tag77": 1}


def test_stats_without_a_driver_answer_at_once():
    dev = VirtioBalloon(16 * MiB)
    answer = dev.control("stats", {})
    assert answer["stats"] == {} and answer["stats_fresh"] is False
    assert answer["driver"] is False
