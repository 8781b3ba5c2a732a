"""Tier 2: our own guests drive virtio-pci devices from the plugins on the host's /dev/kvm.

The guests (guests/tests/virtio_rng.c, virtio_blk.c) do everything a firmware and a
kernel would: enumerate bus 0 through 0xcf8/0xcfc and ECAM (MCFG), size and assign the
BARs, walk the virtio capabilities, negotiate VERSION_1, set up a split virtqueue and an
MSI-X vector with an IDT handler, and exit with a status naming the step that failed
(documented at the top of each guest's source).

A test skips only while its device plugin (or, for virtio-blk, the raw disk format it
needs) is not installed or says "not implemented yet"; a broken plugin fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vmmcore import guests as guest_builds

pytestmark = pytest.mark.kvm

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("tier 2 needs read-write access to /dev/kvm", allow_module_level=True)

RUN_TIMEOUT = 120
RNG_LINE = re.compile(r"^rng\[(\d)\]: ([0-9a-f]{128})$", re.M)

# What the guests exit with (see their sources).
RNG_EXIT_NO_DEVICE = 2
BLK_EXIT_NO_DEVICE = 2
EXCEPTION_EXITS = range(0xE0, 0x100)

# guests/tests/virtio_blk.c writes this to sector 1.
BLK_PATTERN_TEXT = b"vmm virtio-blk test: sector 1\n"
BLK_PATTERN = BLK_PATTERN_TEXT + bytes((i * 7 + 1) & 0xFF
                                       for i in range(len(BLK_PATTERN_TEXT), 512))
SECTOR0 = b"vmm tier-2 virtio-blk image, sector 0 \xde\xad\xbe\xef" + bytes(range(64))

# guests/tests/virtio_blk.c zeroes sectors 2-5 with DISCARD and 6-9 with WRITE_ZEROES (6-7
# without, 8-9 with the unmap flag) when the device offers those features.
DISCARDED = range(2, 6)
WRITE_ZEROED = range(6, 10)
BLK_DISCARD_LINES = [
    "discard: max_discard_sectors ",
    "discard: sectors 2-9 written and read back",
    "discard: sectors 2-5 discarded",
    "write-zeroes: sectors 6-7 zeroed",
    "write-zeroes: sectors 8-9 zeroed with unmap",
    "discard: flushed",
    "discard: sectors 2-5 read back as zeroes",
    "write-zeroes: sectors 6-9 read back as zeroes",
]


def guest(name: str) -> Path:
    return guest_builds.guest_path(name)


def vmm(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmcore.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def plugin_ready(kind: str, name: str) -> tuple[bool, str]:
    """(usable, why not). Not installed / not implemented yet -> not usable; broken fails."""
    from vmmcore.registry import get_registry

    rec = get_registry().get(kind, name)
    if rec is None:
        return False, f"the {kind} plugin {name} is not installed in this environment"
    if rec.broken:
        pytest.fail(f"the {kind} plugin {name} is broken: {rec.error}")
    if not rec.implemented:
        return False, f"the {kind} plugin {name} says it is not implemented yet"
    return True, ""


def require_plugins(*wanted: tuple[str, str]) -> None:
    for kind, name in wanted:
        ok, why = plugin_ready(kind, name)
        if not ok:
            pytest.skip(why)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


# -- the guests build without instructions kvm-pvm's ring-0 emulator lacks -----------------


# -- virtio-rng -----------------------------------------------------------------------------


def test_virtio_rng_guest_without_the_device_exits_with_its_not_found_status():
    result = vmm("run", str(guest("tests/virtio_rng")))
    assert result.returncode == RNG_EXIT_NO_DEVICE, explain(result)
    assert "no 1af4:1044 on bus 0" in result.stdout


@pytest.mark.parametrize("sandbox", [[], ["--disable-sandbox"]], ids=["default", "no-sandbox"])
def test_virtio_rng_guest_gets_random_bytes_through_msix(sandbox):
    require_plugins(("device", "virtio_rng"))
    result = vmm("run", *sandbox, str(guest("tests/virtio_rng")), "--device", "virtio_rng")
    assert result.returncode not in EXCEPTION_EXITS, explain(result)
    assert result.returncode == 0, explain(result)
    out = result.stdout
    # both enumeration mechanisms saw the device; the guest assigned BAR0 itself
    assert re.search(r"pci: (\d+) functions through 0xcf8", out), out
    assert "functions through ECAM at 0xe0000000" in out, out
    m = re.search(r"virtio-rng at 00:[0-9a-f]{2}\.0, BAR0 (0x[0-9a-f]+) \(64-bit, size 0x8000\)", out)
    assert m and 0xC000_0000 <= int(m.group(1), 16) < 0xE000_0000, out
    assert "status 0xf" in out, out        # ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
    # the VIRTIO_PCI_CAP_PCI_CFG window reads the same common config as the BAR
    assert "1 queue(s)" in out and "num_queues through the pci_cfg window: 1" in out, out
    assert out.count("msix interrupt received") == 2, out
    assert "2 of 2 completions signalled by MSI-X" in out
    samples = dict(RNG_LINE.findall(out))
    assert set(samples) == {"0", "1"}, out
    assert samples["0"] != samples["1"]
    assert all(s.strip("0") for s in samples.values())
    assert "virtio-rng: OK" in out


def test_virtio_rng_guest_by_polling_only():
    require_plugins(("device", "virtio_rng"))
    result = vmm("run", str(guest("tests/virtio_rng")), "--device", "virtio_rng",
                 "-p", "nomsix=1")
    assert result.returncode == 0, explain(result)
    assert "msix interrupt received" not in result.stdout
    assert result.stdout.count("seen by polling the used ring") == 2, result.stdout


def test_virtio_rng_guest_in_process_through_build_vm(tmp_path):
    """The same guest through vmmcore.vm_builder.build_vm + inst.run(), serial to a file."""
    require_plugins(("device", "virtio_rng"))
    from vmmcore.config import DeviceConfig, VmConfig
    from vmmcore.registry import get_registry
    from vmmcore.vm_builder import build_vm
    from vmmcore.vm_events import VmEvent

    spec = get_registry().get("device", "virtio_rng").spec
    options = {o.name: o.default_value() for o in spec.options}
    out = tmp_path / "serial.txt"
    config = VmConfig(kernel=guest("tests/virtio_rng"), mem_mib=64,
                      serial=[f"type=file,path={out}"],
                      devices=[DeviceConfig("virtio_rng", options)])
    config.validate()
    inst = build_vm(config)
    watchdog = threading.Timer(RUN_TIMEOUT, inst.stop, args=("test watchdog",))
    watchdog.start()
    try:
        vm_exit = inst.run()
    finally:
        watchdog.cancel()
        inst.close()
    serial = out.read_text(errors="replace")
    assert "test watchdog" not in (vm_exit.message or ""), serial
    assert (vm_exit.event, vm_exit.status) == (VmEvent.GUEST_EXIT, 0), (vm_exit, serial)
    assert serial.count("msix interrupt received") == 2, serial
    assert len(RNG_LINE.findall(serial)) == 2, serial


# -- virtio-blk -----------------------------------------------------------------------------


def make_image(path: Path, sectors: int = 2048) -> bytes:
    data = bytearray(sectors * 512)
    data[:len(SECTOR0)] = SECTOR0
    for s in range(2, sectors):                 # every other sector: its own number
        data[s * 512:s * 512 + 8] = s.to_bytes(8, "little")
    path.write_bytes(data)
    return bytes(data)


def assert_lines_in_order(out: str, prefixes: list[str]) -> None:
    """Each prefix starts a line of out, in this order."""
    lines = out.splitlines()
    at = 0
    for p in prefixes:
        hits = [i for i in range(at, len(lines)) if lines[i].startswith(p)]
        assert hits, f"no line starting {p!r} (in order) in:\n{out}"
        at = hits[0] + 1


def test_virtio_blk_guest_without_the_device_exits_with_its_not_found_status():
    result = vmm("run", str(guest("tests/virtio_blk")))
    assert result.returncode == BLK_EXIT_NO_DEVICE, explain(result)
    assert "no 1af4:1042 on bus 0" in result.stdout


@pytest.mark.parametrize("engine,sandbox", [("native", []), ("python", []),
                                            ("native", ["--disable-sandbox"])])
def test_virtio_blk_guest_reads_writes_and_flushes_a_raw_image(tmp_path, engine, sandbox):
    """On both request engines (native is the default for raw), jailed and in-process."""
    require_plugins(("device", "virtio_blk"), ("disk_format", "raw"))
    img = tmp_path / "disk.img"
    before = make_image(img)
    result = vmm("run", *sandbox, str(guest("tests/virtio_blk")), "--device",
                 f"virtio_blk:path={img},engine={engine}")
    assert result.returncode not in EXCEPTION_EXITS, explain(result)
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert "capacity 2048 sectors" in out, out
    assert f"sector0: {SECTOR0[:64].hex()}" in out, out
    assert "msix interrupt received" in out, out
    assert "virtio-blk: OK" in out
    # DISCARD and WRITE_ZEROES were offered (sparse raw image) and negotiated
    assert "not offered" not in out, out
    assert_lines_in_order(out, BLK_DISCARD_LINES)
    assert "write-zeroes: max_write_zeroes_sectors " in out, out
    after = img.read_bytes()
    assert len(after) == len(before)
    assert after[512:1024] == BLK_PATTERN           # what the guest wrote and flushed
    assert after[1024:5120] == bytes(4096)          # sectors 2-9: discarded / write-zeroed
    assert after[:512] == before[:512] and after[5120:] == before[5120:]   # nothing else
    # (That a discard frees host blocks is tested on the raw format itself, with
    # block-aligned ranges: plugins/raw/tests. Sectors 2-5 share one 4 KiB file-system
    # block with live data here, so nothing can be freed.)


def test_virtio_blk_guest_without_discard_still_write_zeroes(tmp_path):
    """sparse=false: no VIRTIO_BLK_F_DISCARD (the guest says so and does not fail), but
    WRITE_ZEROES is still offered and zeroes sectors 6-9; sectors 2-5 are not touched."""
    require_plugins(("device", "virtio_blk"), ("disk_format", "raw"))
    img = tmp_path / "disk.img"
    before = make_image(img)
    result = vmm("run", str(guest("tests/virtio_blk")), "--device",
                 f"virtio_blk:path={img},sparse=false")
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert "discard: not offered" in out, out
    assert "write-zeroes: not offered" not in out, out
    assert "discard: max_discard_sectors" not in out and "discarded" not in out, out
    assert_lines_in_order(out, ["write-zeroes: max_write_zeroes_sectors ",
                                "discard: sectors 6-9 written and read back",
                                "write-zeroes: sectors 6-7 zeroed",
                                "write-zeroes: sectors 8-9 zeroed with unmap",
                                "discard: flushed",
                                "write-zeroes: sectors 6-9 read back as zeroes",
                                "virtio-blk: OK"])
    after = img.read_bytes()
    assert len(after) == len(before)
    assert after[512:1024] == BLK_PATTERN
    assert after[3072:5120] == bytes(2048)          # sectors 6-9
    assert after[:512] == before[:512] and after[1024:3072] == before[1024:3072]
    assert after[5120:] == before[5120:]


def test_guests_assign_every_function_distinct_bars_and_drive_theirs_behind_another(tmp_path):
    """Two virtio devices: the guest gives both BARs (in bus order, like firmware), so its
    own device is the second one in the window and the first one decodes too."""
    require_plugins(("device", "virtio_rng"), ("device", "virtio_blk"), ("disk_format", "raw"))
    img = tmp_path / "disk.img"
    make_image(img)
    blk = f"virtio_blk:path={img}"
    for name, devices in (("tests/virtio_rng", [blk, "virtio_rng"]),
                          ("tests/virtio_blk", ["virtio_rng", blk])):
        args = [a for d in devices for a in ("--device", d)]
        result = vmm("run", str(guest(name)), *args)
        assert result.returncode == 0, explain(result)
        bars = re.findall(r"^pci 00:([0-9a-f]{2})\.0 bar0 (0x[0-9a-f]+) size (0x[0-9a-f]+)$",
                          result.stdout, re.M)
        assert len(bars) == 2, result.stdout
        (d1, a1, s1), (d2, a2, s2) = ((d, int(a, 16), int(s, 16)) for d, a, s in bars)
        assert d1 < d2 and a1 + s1 <= a2 and a1 % s1 == 0 and a2 % s2 == 0, result.stdout
        short = name.split("_")[1]
        assert re.search(rf"virtio-{short} at 00:{d2}\.0, BAR0 {a2:#x}", result.stdout), result.stdout
        assert f"virtio-{short}: OK" in result.stdout


# -- the demo guest lists the devices ------------------------------------------------------

DEMO_LINES = {
    "virtio_rng": re.compile(r"00:[0-9a-f]{2}\.0 1af4:1044 class ff\.00\.00 +virtio-rng"),
    "virtio_blk": re.compile(r"00:[0-9a-f]{2}\.0 1af4:1042 class 01\.00\.00 +virtio-block"),
}


def device_args(name: str, tmp_path: Path) -> list[str]:
    if name == "virtio_blk":
        img = tmp_path / "demo.img"
        make_image(img, 64)
        return ["--device", f"virtio_blk:path={img}"]
    return ["--device", name]


@pytest.mark.parametrize("names", [["virtio_rng"], ["virtio_blk"], ["virtio_rng", "virtio_blk"]],
                         ids=["rng", "blk", "rng+blk"])
def test_demo_lists_the_virtio_devices_with_their_class_codes(tmp_path, names):
    wanted = [("device", n) for n in names]
    if "virtio_blk" in names:
        wanted.append(("disk_format", "raw"))
    require_plugins(*wanted)
    args = [a for n in names for a in device_args(n, tmp_path)]
    result = vmm("run", *args)
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert "00:00.0 8086:29c0 class 06.00.00  host bridge" in out, out
    for n in names:
        assert DEMO_LINES[n].search(out), f"no {n} line in:\n{out}"
    # command-line order is bus order
    slots = [DEMO_LINES[n].search(out).group(0)[:7] for n in names]
    assert slots == sorted(slots)
