"""Tests of the virtio-rng plugin: the template for a plugin's own tests.

They run with the core and this plugin installed (`tox -e virtio_rng-py311`, or after
scripts/dev-install): first the contract with the core (the registry finds the plugin,
its spec is valid, its options parse, its policy ships), then the device-side logic.
"""

from __future__ import annotations

import os
import time

import pytest
from vmm_virtio_rng.device import MAX_FILL, create
from vmm_virtio_rng.entropy import EntropySource
from vmm_virtio_rng.plugin import PLUGIN

from vmmcore.device_options import DeviceArgs, collect_devices
from vmmcore.errors import ConfigError
from vmmcore.plugin_api import DeviceContext
from vmmcore.registry import Registry
from vmmcore.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmmcore.virtio.testing import DeviceHarness


@pytest.fixture(scope="module")
def record():
    return Registry(fresh=True).get("device", "virtio_rng")


def test_registered_through_its_entry_point(record):
    assert record is not None, "vmm-virtio-rng is not installed"
    assert not record.broken, record.error
    assert record.spec is PLUGIN and record.kind == "device"
    assert record.policy_path is not None and record.policy_path.name == "virtio_rng.policy"
    assert "@include common_device.policy" in record.policy_path.read_text()


def _select(text: str):
    return collect_devices(DeviceArgs([("--device", text)]), registry=Registry(),
                           require_implemented=False)


def test_options_and_defaults():
    [d] = _select("virtio_rng")
    assert d.options == {"source": PLUGIN.option("source").default_value(), "rate": 0,
                         "queue_size": 256}
    [d] = _select("virtio_rng:source=/dev/zero,rate=4096,queue_size=64")
    assert d.options["rate"] == 4096 and str(d.options["source"]) == "/dev/zero"


@pytest.mark.parametrize("text,message", [
    ("virtio_rng:queue_size=100", "queue_size=100 is not a power of two"),
    ("virtio_rng:rate=-1", "rate='-1' is not valid: expected an int from 0 to"),
    ("virtio_rng:source=/no/such/source", "does not exist"),
])
def test_bad_options(text, message):
    with pytest.raises(ConfigError, match=message):
        _select(text)


def test_selecting_builds_an_implemented_device():
    [d] = collect_devices(DeviceArgs([("--device", "virtio-rng")]), registry=Registry())
    assert d.name == "virtio_rng"


@pytest.fixture
def rng(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(bytes(range(256)) * 1024)
    harness = DeviceHarness(create({"source": source, "rate": 0, "queue_size": 8},
                                   DeviceContext("virtio_rng0", 0, 1 << 22)))
    harness.activate()
    yield harness
    harness.close()


def test_requests_are_filled_from_the_source(rng):
    d = rng.drivers[0]
    d.add(in_sizes=[16])
    d.add(in_sizes=[8, 8], indirect=True)
    used = rng.wait_used(count=2)
    assert [u.length for u in used] == [16, 16]
    assert used[0].data == bytes(range(16)) and used[1].data == bytes(range(16, 32))
    assert rng.reset_reasons == []


def test_a_huge_buffer_is_answered_short_not_allocated(rng):
    d = rng.drivers[0]
    d.add(in_sizes=[MAX_FILL + 4096])
    [used] = rng.wait_used()
    assert used.length == MAX_FILL


def test_a_malformed_chain_means_needs_reset_not_a_crash(rng):
    d = rng.drivers[0]
    d.write_desc(0, 0x1000, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0)   # a loop
    d.publish(0)
    d.kick()
    deadline = time.monotonic() + 5
    while not rng.reset_reasons and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rng.reset_reasons, "the device did not ask for a reset"
    assert "malformed request" in rng.reset_reasons[0], rng.reset_reasons


def test_rate_limit_gives_short_answers(tmp_path):
    harness = DeviceHarness(create({"source": "/dev/urandom", "rate": 64, "queue_size": 8},
                                   DeviceContext("virtio_rng0", 0, 1 << 22)))
    harness.activate()
    try:
        d = harness.drivers[0]
        d.add(in_sizes=[1024])
        [used] = harness.wait_used()
        assert 0 < used.length <= 64
    finally:
        harness.close()


def test_entropy_source_reads(tmp_path):
    f = tmp_path / "bytes"
    f.write_bytes(bytes(range(256)))
    with EntropySource(f) as src:
        assert src.read(10) == bytes(range(10))
        assert src.read(0) == b""


def test_entropy_source_rate_limit(tmp_path):
    now = [0.0]
    with EntropySource("/dev/zero", rate=100, clock=lambda: now[0]) as src:
        assert len(src.read(1000)) == 100       # one second's worth at once
        assert src.read(10) == b""             # then nothing until time passes
        now[0] += 0.5
        assert len(src.read(1000)) == 50
    with pytest.raises(ValueError):
        EntropySource("/dev/zero", rate=-1)
    with pytest.raises(FileNotFoundError):
        EntropySource(os.path.join(str(tmp_path), "missing"))
