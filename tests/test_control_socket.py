"""The control socket (vmmcore.control_socket, vmmcore.cli_control).

Tier 1 (no KVM): the protocol parser, creating the socket (mode 0600, live/stale/other
files), the device-control contract on stand-in devices. Tier 2: every command against
a running VM -- the hello test guest with spin=1 -- in-process (build_vm + inst.run() in a
thread) and through `vmm run --socket` and the client subcommands as processes.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmmcore import control_socket as cs
from vmmcore.control_socket import (
    ControlClientError,
    ControlError,
    ControlServer,
    parse_request,
    send_request,
)
from vmmcore.errors import ConfigError, VmmError

HAS_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
kvm = pytest.mark.skipif(not HAS_KVM, reason="tier 2 needs read-write access to /dev/kvm")


@pytest.fixture
def sock_path():
    # unix socket paths are short (107 bytes): pytest's tmp_path can be too long
    import tempfile

    d = tempfile.mkdtemp(prefix="vmmctl", dir="/tmp")
    yield Path(d) / "vm.sock"
    for f in Path(d).iterdir():
        f.unlink()
    os.rmdir(d)


def raw_request(path: Path, data: bytes, timeout: float = 10) -> list[dict]:
    """Send raw bytes, shut the sending side, read every response line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# -- tier 1: protocol --------------------------------------------------------------------


@pytest.mark.parametrize("line,message", [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"command": "status"}', "no 'version'"),
    (b'{"version": 2, "command": "status"}', "unsupported protocol version 2"),
    (b'{"version": true, "command": "status"}', "unsupported protocol version"),
    (b'{"version": 1.0, "command": "status"}', "unsupported protocol version"),
    (b'{"version": 1}', "no 'command'"),
    (b'{"version": 1, "command": "status", "args": [1]}', "'args' must be a JSON object"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
])
def test_bad_requests_are_refused_with_a_reason(line, message):
    with pytest.raises(ControlError, match=message):
        parse_request(line)


def test_a_good_request_parses():
    assert parse_request(b'{"version":1,"command":"balloon","args":{"size":4096},"id":7}') \
        == {"command": "balloon", "args": {"size": 4096}, "id": 7}
    assert parse_request(b'{"version":1,"command":"status","args":null}')["args"] == {}


# -- tier 1: the socket file ---------------------------------------------------------------


def test_socket_is_0600_and_removed_at_close(sock_path):
    server = ControlServer(sock_path)
    try:
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert os.listdir(sock_path.parent) == ["vm.sock"]     # no temporary left over
    finally:
        server.close()
    assert not sock_path.exists()
    server.close()                                              # idempotent


def test_a_live_socket_is_not_clobbered(sock_path):
    with ControlServer(sock_path):
        with pytest.raises(VmmError, match="in use by a running VMM"):
            ControlServer(sock_path)
        assert cs.socket_is_live(sock_path)


def test_a_stale_socket_is_replaced(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))
    s.close()                                   # the file stays; nobody listens
    with pytest.raises(ControlClientError, match="stale control socket"):
        send_request(sock_path, "status")
    with ControlServer(sock_path) as server:
        server.start(None)
        answer = send_request(sock_path, "status")
        assert answer == {"version": 1, "ok": False, "error": "the VM is not running yet"}


def test_other_files_and_bad_paths_are_refused(sock_path):
    sock_path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(sock_path)
    assert sock_path.read_text() == "precious"
    with pytest.raises(ControlClientError, match="not a socket"):
        send_request(sock_path, "status")
    sock_path.unlink()
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        ControlServer("/tmp/" + "x" * 200)
    with pytest.raises(ConfigError, match="does not exist"):
        ControlServer("/nonexistent-dir/vm.sock")
    with pytest.raises(ControlClientError, match="no such control socket"):
        send_request(sock_path, "status")


# -- tier 1: the device-control contract ----------------------------------------------------


class FakeModel:
    control_commands = ("resize", "boom", "bad", "sneaky")

    def __init__(self) -> None:
        self.calls = []

    def control(self, command, args):
        self.calls.append((command, args))
        if command == "boom":
            raise RuntimeError("kaput")
        if command == "bad":
            return [1]
        if command == "sneaky":
            raise ValueError("two\nlines")
        if args.get("size", 0) > 100:
            raise ValueError("too big")
        return {"size": args.get("size")}


class FakePci:
    def __init__(self, label, model=None) -> None:
        self.label, self.device = label, model

    def debug_label(self):
        return self.label


def fake_vm(*devices):
    """A stand-in VmInstance: (plugin name, FakePci) pairs on a fake PCI root."""
    pci = [(f"00:{i + 1:02x}.0", d) for i, (_, d) in enumerate(devices)]
    return SimpleNamespace(
        plugin_devices=[(SimpleNamespace(name=name), d) for name, d in devices],
        pci_root=SimpleNamespace(devices=lambda: pci))


def test_devices_are_found_by_kind_index_and_label():
    blk0, blk1, rng = FakePci("virtio_blk0"), FakePci("virtio_blk1"), FakePci("virtio_rng0")
    vm = fake_vm(("virtio_blk", blk0), ("virtio_rng", rng), ("virtio_blk", blk1))
    assert cs.find_device(vm, kind="disk", index=1).pci_device is blk1
    assert cs.find_device(vm, kind="virtio_blk").address == "00:01.0"
    assert cs.find_device(vm, device="virtio_rng0").pci_device is rng
    with pytest.raises(ControlError, match=r"no virtio_blk device 2: this VM has 2"):
        cs.find_device(vm, kind="disk", index=2)
    with pytest.raises(ControlError, match="this VM has no virtio_gpu device"):
        cs.find_device(vm, kind="gpu")
    with pytest.raises(ControlError, match="no device labelled 'x'.*virtio_blk0"):
        cs.find_device(vm, device="x")


def test_the_control_contract():
    model = FakeModel()
    dev = cs.find_device(fake_vm(("virtio_blk", FakePci("virtio_blk0", model))), kind="disk")
    assert cs.device_control(dev, "resize", {"size": 5}) == {"size": 5}
    with pytest.raises(ControlError, match="virtio_blk0: resize failed: too big"):
        cs.device_control(dev, "resize", {"size": 500})
    with pytest.raises(ControlError, match="does not support 'shrink'.*resize, boom"):
        cs.device_control(dev, "shrink", {})
    with pytest.raises(ControlError, match="boom failed: RuntimeError: kaput"):
        cs.device_control(dev, "boom", {})
    with pytest.raises(ControlError, match="not a dict"):
        cs.device_control(dev, "bad", {})
    with pytest.raises(ControlError) as e:
        cs.device_control(dev, "sneaky", {})
    assert cs.error_response(str(e.value))["error"] == "virtio_blk0: sneaky failed: two lines"
    plain = cs.find_device(fake_vm(("virtio_rng", FakePci("virtio_rng0", object()))),
                           kind="rng")
    with pytest.raises(ControlError, match="virtio_rng0 does not support control commands"):
        cs.device_control(plain, "resize", {})


# -- tier 2: a running VM ---------------------------------------------------------------------
#
# The core's tests install no plugin, so the devices here are stand-ins added to the PCI
# root before the VM runs, each implementing (or not) the device-control contract the way
# the real plugins do; plugins/virtio_balloon/tests drives the real balloon this way, and
# the virtio-blk test below uses the real plugin when it is installed.


def guest(name: str) -> Path:
    from vmmcore.guests import guest_path

    return guest_path(name)


PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")


def stand_in_devices(inst) -> None:
    """virtio_blk0 (resize), virtio_gpu0 (screenshot) and plain0 (no control at all)."""
    from vmmcore.config import DeviceConfig
    from vmmcore.virtio import DeviceType, VirtioDevice
    from vmmcore.virtio.pci_transport import VirtioPciDevice

    class StandInDisk(VirtioDevice):
        device_type = DeviceType.BLOCK
        queue_max_sizes = (16,)
        control_commands = ("resize",)

        def __init__(self) -> None:
            super().__init__()
            self.config = bytearray(struct.pack("<Q", 2048))

        def control(self, command, args):
            size = args["size"]
            if size % 512:
                raise ValueError(f"size {size} is not a multiple of 512")
            struct.pack_into("<Q", self.config, 0, size // 512)
            self.config_changed()
            return {"capacity": size // 512}

    class StandInGpu(VirtioDevice):
        device_type = DeviceType.GPU
        queue_max_sizes = (16, 16)
        control_commands = ("screenshot",)

        def control(self, command, args):
            if args["path"].endswith("self.png"):        # a device writing the file itself
                Path(args["path"]).write_bytes(PNG_1X1)
                return {"width": 1, "height": 1}
            return {"png": PNG_1X1, "width": 1, "height": 1}

    class Plain(VirtioDevice):
        device_type = DeviceType.RNG
        queue_max_sizes = (16,)

    for plugin, model in (("virtio_blk", StandInDisk()), ("virtio_gpu", StandInGpu()),
                          ("plain", Plain())):
        pci = VirtioPciDevice(model, inst.mem, label=f"{plugin}0")
        inst.pci_root.add_device(pci)
        inst.plugin_devices.append((DeviceConfig(plugin), pci))


class RunningVm:
    """The hello guest spinning (spin=1) with a control server, run in a thread."""

    def __init__(self, tmp_path: Path, path: Path, devices=(), setup=stand_in_devices) -> None:
        from vmmcore.config import VmConfig
        from vmmcore.device_options import DeviceArgs, collect_devices
        from vmmcore.vm_builder import build_vm

        self.serial = tmp_path / "serial.txt"
        config = VmConfig(kernel=guest("tests/hello"), mem_mib=64, params=["spin=1"],
                          serial=[f"type=file,path={self.serial}"],
                          devices=collect_devices(DeviceArgs([("--device", d)
                                                              for d in devices])))
        self.path = path
        self.server = ControlServer(path)
        self.inst = build_vm(config)
        if setup:
            setup(self.inst)
        self.server.start(self.inst)
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.update(exit=self.inst.run()))
        self.thread.start()
        deadline = time.monotonic() + 15
        while "spinning" not in self.text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "spinning" in self.text(), self.text()

    def text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def ask(self, command: str, /, **args) -> dict:
        return send_request(self.path, command, args)

    def model(self, label: str):
        return cs.find_device(self.inst, device=label).model

    def close(self) -> None:
        self.inst.stop("test teardown")
        self.thread.join(15)
        self.server.close()
        self.inst.close()


@pytest.fixture
def vm(tmp_path, sock_path):
    running = RunningVm(tmp_path, sock_path)
    yield running
    running.close()


@kvm
def test_status_lists_vcpus_devices_and_uptime(vm):
    s = vm.ask("status")
    assert s["ok"] and s["version"] == 1
    assert s["state"] == "running" and s["paused"] is False
    assert s["cpus"] == 1 and s["mem_mib"] == 64 and s["pid"] == os.getpid()
    assert s["uptime"] > 0
    [vcpu] = s["vcpus"]
    assert vcpu["id"] == 0 and vcpu["state"] == "running" and vcpu["exits"] > 0
    devices = {d["label"]: d for d in s["devices"]}
    assert devices["pci-host-bridge"]["address"] == "00:00.0"
    assert devices["pci-host-bridge"]["state"] == "present"
    disk = devices["virtio_blk0"]
    assert disk == {"address": "00:01.0", "label": "virtio_blk0", "plugin": "virtio_blk",
                    "index": 0, "state": "reset", "control": True, "virtio_type": "block"}
    assert devices["virtio_gpu0"]["address"] == "00:02.0"
    assert devices["plain0"]["control"] is False
    time.sleep(0.1)                 # the vCPU thread needs the GIL now and then
    later = vm.ask("status")
    assert later["vcpus"][0]["exits"] > vcpu["exits"] and later["uptime"] > s["uptime"]


@kvm
def test_suspend_holds_the_vcpus_and_resume_releases_them(vm):
    assert vm.ask("suspend") == {"version": 1, "ok": True, "state": "paused"}
    s = vm.ask("status")
    assert s["state"] == "paused" and s["paused"] and s["vcpus"][0]["state"] == "paused"
    exits = vm.inst.loops[0].exits
    time.sleep(0.3)
    assert vm.inst.loops[0].exits == exits
    assert vm.ask("suspend")["ok"]                          # idempotent
    assert vm.ask("resume") == {"version": 1, "ok": True, "state": "running"}
    deadline = time.monotonic() + 5
    while vm.inst.loops[0].exits == exits and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vm.inst.loops[0].exits > exits
    assert vm.ask("status")["state"] == "running"


@kvm
def test_powerbtn_presses_the_acpi_power_button(vm):
    from vmmcore.devices.acpi_pm import STS_PWRBTN

    assert not vm.inst.acpi_pm.status & STS_PWRBTN
    answer = vm.ask("powerbtn")
    assert answer["ok"] and answer["guest_listening"] is False   # hello has no ACPI driver
    assert vm.inst.acpi_pm.status & STS_PWRBTN


@kvm
def test_disk_resize_goes_through_the_device_control_api(vm):
    disk = vm.model("virtio_blk0")
    generation = disk.config_generation
    answer = vm.ask("disk_resize", index=0, size=4 << 20)
    assert answer == {"version": 1, "ok": True, "device": "virtio_blk0", "capacity": 8192}
    assert struct.unpack("<Q", disk.read_config(0, 8))[0] == 8192
    assert disk.config_generation == generation + 1
    assert vm.ask("disk_resize", index=0, size=1000)["error"] == \
        "virtio_blk0: resize failed: size 1000 is not a multiple of 512"
    assert vm.ask("disk_resize", index=1, size=1 << 20)["error"] == \
        "no virtio_blk device 1: this VM has 1 (indices 0-0)"
    assert "missing argument 'size'" in vm.ask("disk_resize", index=0)["error"]
    assert "must be an integer" in vm.ask("disk_resize", size="1G")["error"]


@kvm
def test_gpu_screenshot_writes_the_png(vm, tmp_path):
    out = tmp_path / "shot.png"
    answer = vm.ask("gpu_screenshot", path=str(out))
    assert answer["ok"], answer
    assert answer["path"] == str(out) and answer["bytes"] == len(PNG_1X1)
    assert answer["device"] == "virtio_gpu0" and answer["width"] == 1
    assert out.read_bytes() == PNG_1X1
    assert vm.ask("gpu_screenshot", path=str(tmp_path / "self.png"))["width"] == 1
    assert (tmp_path / "self.png").read_bytes() == PNG_1X1
    assert "does not exist" in vm.ask("gpu_screenshot",
                                      path=str(tmp_path / "no" / "x.png"))["error"]
    assert "must be absolute" in vm.ask("gpu_screenshot", path="x.png")["error"]
    assert "no virtio_gpu device 3" in vm.ask("gpu_screenshot", path=str(out),
                                              index=3)["error"]


@kvm
def test_unknown_commands_and_missing_devices_get_clear_errors(vm):
    answer = vm.ask("reboot")
    assert not answer["ok"] and "unknown command 'reboot'" in answer["error"]
    assert "status" in answer["error"]
    assert vm.ask("balloon", size=1 << 20)["error"] == "this VM has no virtio_balloon device"
    assert vm.ask("balloon_stats")["error"] == "this VM has no virtio_balloon device"
    answer = vm.ask("device", device="plain0", command="resize")
    assert answer["error"] == ("device plain0 does not support control commands "
                               "(so not 'resize')")
    answer = vm.ask("device", device="virtio_blk0", command="grow")
    assert answer["error"] == "device virtio_blk0 does not support 'grow' (it supports: resize)"
    answer = vm.ask("device", kind="disk", index=0, command="resize", args={"size": 512})
    assert answer["ok"] and answer["result"] == {"capacity": 1}
    assert "no device labelled 'nope'" in vm.ask("device", device="nope",
                                                 command="x")["error"]


@kvm
def test_disk_resize_reaches_the_real_virtio_blk_plugin(tmp_path, sock_path):
    pytest.importorskip("vmm_virtio_blk")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    running = RunningVm(tmp_path, sock_path, devices=(f"virtio_blk:path={image}",),
                        setup=None)
    try:
        # The device runs sandboxed (the default); status still knows its virtio type.
        [disk] = [d for d in running.ask("status")["devices"] if d["plugin"] == "virtio_blk"]
        assert disk["virtio_type"] == "block", disk
        # The command crosses to its process, which grows the image file and raises a
        # config-change interrupt.
        answer = running.ask("disk_resize", index=0, size=4 << 20)
        assert answer["ok"], answer
        assert (answer["size"], answer["sectors"]) == (4 << 20, 8192), answer
        assert image.stat().st_size == 4 << 20
        answer = running.ask("disk_resize", index=0, size=1000)
        assert not answer["ok"] and "not a multiple of 512" in answer["error"]
    finally:
        running.close()


@kvm
def test_stop_ends_the_run_and_the_socket_goes(vm):
    from vmmcore.vm_events import VmEvent

    assert vm.ask("stop") == {"version": 1, "ok": True, "state": "stopping"}
    vm.thread.join(15)
    assert not vm.thread.is_alive()
    assert vm.result["exit"].event == VmEvent.STOPPED and vm.result["exit"].status == 0
    answer = vm.ask("suspend")
    assert not answer["ok"] and "shutting down" in answer["error"]
    assert vm.ask("status")["state"] == "stopping"
    vm.server.close()
    assert not vm.path.exists()
    with pytest.raises(ControlClientError, match="no such control socket"):
        vm.ask("status")


@kvm
def test_requests_carry_ids_and_share_a_connection(vm):
    lines = b"".join(json.dumps({"version": 1, "command": c, "id": i}).encode() + b"\n"
                     for i, c in enumerate(["status", "nope", "status"]))
    answers = raw_request(vm.path, lines + b'{"version":1,"command":"status","id":"last"}')
    assert [a["id"] for a in answers] == [0, 1, 2, "last"]
    assert [a["ok"] for a in answers] == [True, False, True, True]


# -- tier 2: `vmm run --socket` and the client subcommands as processes ------------------------


def vmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmcore.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and cs.socket_is_live(path):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


@kvm
def test_the_cli_end_to_end(tmp_path, sock_path):
    serial = tmp_path / "serial.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmcore.cli", "run", "-m", "64", "-p", "spin=1",
         "--serial", f"type=file,path={serial}", "--socket", str(sock_path),
         str(guest("tests/hello"))],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock_path)
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600

        busy = vmm("run", "-s", str(sock_path), str(guest("tests/hello")))
        assert busy.returncode == 1 and "in use by a running VMM" in busy.stderr

        result = vmm("status", str(sock_path), "--json")
        assert result.returncode == 0, result.stderr
        s = json.loads(result.stdout)
        assert s["pid"] == proc.pid and s["vcpus"][0]["state"] == "running"
        result = vmm("status", str(sock_path))
        assert "state: running" in result.stdout and "pci-host-bridge" in result.stdout
        assert "vcpu0" in result.stdout

        assert vmm("suspend", str(sock_path)).returncode == 0
        assert json.loads(vmm("status", str(sock_path), "--json").stdout)["paused"] is True
        assert vmm("resume", str(sock_path)).returncode == 0
        assert json.loads(vmm("status", str(sock_path), "--json").stdout)["paused"] is False

        result = vmm("powerbtn", str(sock_path))
        assert result.returncode == 0 and "not enabled the power button" in result.stderr

        result = vmm("disk", "resize", str(sock_path), "0", "1G")
        assert result.returncode == 1
        assert result.stderr.strip() == "vmm: error: this VM has no virtio_blk device"
        result = vmm("gpu", "screenshot", str(sock_path), str(tmp_path / "s.png"))
        assert result.returncode == 1 and "no virtio_gpu device" in result.stderr
        result = vmm("balloon", str(sock_path), "16M")
        assert result.returncode == 1 and "no virtio_balloon device" in result.stderr
        result = vmm("balloon", str(sock_path), "12Q")
        assert result.returncode == 2 and "SIZE '12Q' is not valid" in result.stderr
        result = vmm("device", str(sock_path), "pci-host-bridge", "query")
        assert result.returncode == 1 and "does not support control" in result.stderr
        result = vmm("device", str(sock_path), "pci-host-bridge", "query", "[1]")
        assert result.returncode == 2 and "must be an object" in result.stderr

        result = vmm("stop", str(sock_path))
        assert result.returncode == 0, result.stderr
        assert proc.wait(30) == 0
        assert not sock_path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def start_vmm(sock_path: Path, serial: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmcore.cli", "run", "-m", "64", "-p", "spin=1",
         "--serial", f"type=file,path={serial}", "-s", str(sock_path),
         str(guest("tests/hello"))],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(sock_path)
    return proc


@kvm
def test_a_killed_vmm_leaves_a_stale_socket_the_next_run_replaces(tmp_path, sock_path):
    import signal

    proc = start_vmm(sock_path, tmp_path / "serial.txt")
    proc.kill()                                   # SIGKILL: no chance to clean up
    proc.wait(10)
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert "stale control socket" in vmm("status", str(sock_path)).stderr
    proc = start_vmm(sock_path, tmp_path / "serial.txt")
    try:
        assert vmm("status", str(sock_path)).returncode == 0
        proc.send_signal(signal.SIGTERM)          # a clean stop removes the socket
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert not sock_path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_client_errors_are_one_line(sock_path):
    for args, message in [
        (("stop", str(sock_path)), "no such control socket"),
        (("status", "/etc/hostname"), "not a socket"),
        (("suspend", "/tmp/" + "y" * 200), "at most 107 bytes"),
    ]:
        result = vmm(*args)
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))
    s.close()
    result = vmm("resume", str(sock_path))
    assert result.returncode == 1 and "stale control socket" in result.stderr


def test_run_refuses_a_socket_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = vmm("run", "-s", str(f))
    assert result.returncode == 2 and "not a socket" in result.stderr
    assert f.read_text() == "x"


@kvm
def test_gpu_screenshot_reaches_the_real_sandboxed_virtio_gpu(tmp_path, sock_path):
    """`gpu_screenshot` crosses to the jailed GPU process and back. The spinning test
    guest never sets a scanout, so the answer is the device's own clear refusal (the PNG
    path itself is tested in plugins/virtio_gpu with a driven scanout, and end to end
    with Linux's fbcon in tests/e2e)."""
    pytest.importorskip("vmm_virtio_gpu")
    running = RunningVm(tmp_path, sock_path,
                        devices=("virtio_gpu:width=64,height=48,display=headless",),
                        setup=None)
    try:
        out = tmp_path / "shot.png"
        answer = running.ask("gpu_screenshot", path=str(out))
        assert not answer["ok"]
        assert answer["error"] == ("virtio_gpu0: screenshot failed: ValueError: scanout 0 "
                                   "is not enabled (the guest shows nothing)")
        assert not out.exists()
        assert running.ask("status")["ok"]          # the VM and its GPU carry on
    finally:
        running.close()
