"""Tier 2: the real virtio-balloon plugin in a running VM (the hello test guest spinning),
driven through the control socket -- in-process and through `vmm run --socket` and
`vmm balloon` / `vmm balloon_stats` as processes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vmmcore.control_socket import ControlServer, find_device, send_request, socket_is_live

pytestmark = pytest.mark.kvm

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("tier 2 needs read-write access to /dev/kvm", allow_module_level=True)


@pytest.fixture
def short_dir():
    d = Path(tempfile.mkdtemp(prefix="vmmbal", dir="/tmp"))   # socket paths are short
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def hello() -> Path:
    """The hello test guest; from the source tree's guests/ when the installed core has
    no guest sources (a wheel, as in `tox -e virtio_balloon-py311`)."""
    from vmmcore.errors import VmmError
    from vmmcore.guests import guest_path

    try:
        return guest_path("tests/hello")
    except VmmError as e:
        tree = Path(__file__).resolve().parents[3] / "guests"
        if not tree.is_dir():
            pytest.skip(f"no test guests: {e}")
        os.environ["VMM_GUESTS_DIR"] = str(tree)
        return guest_path("tests/hello")


def test_balloon_commands_in_a_running_vm(short_dir):
    from vmmcore.config import VmConfig
    from vmmcore.device_options import DeviceArgs, collect_devices
    from vmmcore.vm_builder import build_vm

    serial = short_dir / "serial.txt"
    devices = collect_devices(DeviceArgs([("--device", "virtio_balloon"),
                                          ("--device", "virtio_balloon:stats=false")]))
    # In-process devices: the test reads the balloon model's config space directly.
    config = VmConfig(kernel=hello(), mem_mib=64, params=["spin=1"],
                      serial=[f"type=file,path={serial}"], devices=devices,
                      disable_sandbox=True)
    path = short_dir / "vm.sock"
    server = ControlServer(path)
    inst = build_vm(config)
    server.start(inst)
    runner = threading.Thread(target=inst.run)
    runner.start()
    try:
        deadline = time.monotonic() + 15
        while "spinning" not in serial.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = send_request(path, "status")
        balloons = [d for d in status["devices"] if d["plugin"] == "virtio_balloon"]
        assert [(d["label"], d["index"], d["virtio_type"], d["control"]) for d in balloons] \
            == [("virtio_balloon0", 0, "balloon", True), ("virtio_balloon1", 1, "balloon", True)]

        answer = send_request(path, "balloon", {"size": 8 << 20})
        assert answer["ok"] and answer["device"] == "virtio_balloon0"
        assert answer["num_pages"] == 2048 and answer["target_bytes"] == 8 << 20
        model = find_device(inst, device="virtio_balloon0").model
        assert struct.unpack("<II", model.read_config(0, 8)) == (2048, 0)

        answer = send_request(path, "balloon", {"size": 4 << 20, "index": 1})
        assert answer["device"] == "virtio_balloon1" and answer["num_pages"] == 1024

        stats = send_request(path, "balloon_stats")
        assert stats["ok"] and stats["num_pages"] == 2048 and stats["actual"] == 0
        assert stats["stats"] == {} and stats["stats_fresh"] is False   # no guest driver

        too_big = send_request(path, "balloon", {"size": 1 << 30})
        assert too_big["error"] == ("virtio_balloon0: set_size failed: balloon size "
                                    f"{1 << 30} is larger than guest memory ({64 << 20} bytes)")
        assert "no virtio_balloon device 2" in send_request(
            path, "balloon", {"size": 0, "index": 2})["error"]
        assert send_request(path, "device", {"device": "virtio_balloon1",
                                             "command": "query"})["result"]["num_pages"] == 1024
    finally:
        inst.stop("test end")
        runner.join(15)
        server.close()
        inst.close()


def vmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmcore.cli", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_vmm_balloon_cli(short_dir):
    path = short_dir / "vm.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmcore.cli", "run", "-m", "64", "-p", "spin=1",
         "--serial", f"type=file,path={short_dir / 'serial.txt'}", "-s", str(path),
         "--device", "virtio_balloon", str(hello())],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (path.exists() and socket_is_live(path)) and time.monotonic() < deadline:
            time.sleep(0.05)
        result = vmm("balloon", str(path), "16M")
        assert result.returncode == 0 and result.stdout == "", result.stderr
        stats = json.loads(vmm("balloon_stats", str(path)).stdout)
        assert stats["num_pages"] == 4096 and stats["device"] == "virtio_balloon0"
        result = vmm("balloon", str(path), "1G")
        assert result.returncode == 1
        assert result.stderr.startswith("vmm: error: virtio_balloon0: set_size failed: ")
        assert "virtio_balloon0" in vmm("status", str(path)).stdout
        assert vmm("stop", str(path)).returncode == 0
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
