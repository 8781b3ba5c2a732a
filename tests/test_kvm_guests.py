"""Tier 2: our own test guests on the host's /dev/kvm, through the real run loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmmcore.bus import BusDevice
from vmmcore.config import VmConfig
from vmmcore.errors import ConfigError, KvmError
from vmmcore.hookspecs import hookimpl
from vmmcore.registry import get_registry
from vmmcore.vm_builder import build_vm
from vmmcore.vm_events import VmEvent

pytestmark = pytest.mark.kvm

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("tier 2 needs read-write access to /dev/kvm", allow_module_level=True)


def guest(name: str) -> Path:
    from vmmcore.guests import guest_path

    return guest_path(name)


def run_guest(tmp_path: Path, name: str, *, cpus: int = 1, params: list[str] | None = None,
              setup=None):
    """Boot a test guest with its serial output in a file; returns (VmExit, serial text)."""
    out = tmp_path / "serial.txt"
    config = VmConfig(kernel=guest(name), cpus=cpus, mem_mib=64, params=params or [],
                      serial=[f"type=file,path={out}"])
    config.validate()
    inst = build_vm(config)
    try:
        if setup:
            setup(inst)
        vm_exit = inst.run()
    finally:
        inst.close()
    return vm_exit, out.read_text(errors="replace")


def test_hello_guest_prints_and_reports_its_exit_status(tmp_path):
    vm_exit, serial = run_guest(tmp_path, "tests/hello")
    assert "hello from guest" in serial
    assert (vm_exit.event, vm_exit.status) == (VmEvent.GUEST_EXIT, 0)


def test_exit_status_comes_from_the_guest(tmp_path):
    vm_exit, _ = run_guest(tmp_path, "tests/hello", params=["exit=7"])
    assert (vm_exit.event, vm_exit.status) == (VmEvent.GUEST_EXIT, 7)


def test_two_vcpus_both_run(tmp_path):
    vm_exit, serial = run_guest(tmp_path, "tests/smp", cpus=2)
    assert "cpus online: 2" in serial, serial
    assert vm_exit.status == 0, vm_exit.message


class MmioProbe(BusDevice):
    """Answers reads with a known value and records writes."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.thread = ""

    def read(self, offset: int, size: int) -> bytes:
        return (0xCAFE0000 + 0x42 + offset).to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.thread = threading.current_thread().name
        self.writes.append((offset, bytes(data)))


def test_unmapped_mmio_reaches_a_bus_device(tmp_path):
    probe = MmioProbe()
    vm_exit, _ = run_guest(tmp_path, "tests/mmio",
                           setup=lambda inst: inst.mmio_bus.insert(probe, 0xD000_0000, 0x1000))
    assert probe.writes == [(0, (0x12345678).to_bytes(4, "little"))]
    assert probe.thread == "vcpu0"
    assert vm_exit.status == 0x46       # low byte of the value read at offset 4


def test_triple_fault_is_a_crash_with_a_clear_message(tmp_path):
    vm_exit, _ = run_guest(tmp_path, "tests/crash")
    assert vm_exit.event == VmEvent.CRASH
    assert vm_exit.status == 3
    assert "triple" in vm_exit.message or "internal error" in vm_exit.message


def vmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmcore.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_vmm_run_with_no_arguments_boots_the_demo_and_exits_0():
    result = vmm("run")
    assert result.returncode == 0, result.stderr
    assert "vmm demo guest" in result.stdout.lower(), result.stdout
    assert "cpus" in result.stdout.lower()


def test_vmm_run_exit_status_is_the_guests(tmp_path):
    result = vmm("run", str(guest("tests/hello")), "-p", "exit=5")
    assert result.returncode == 5
    assert "hello from guest" in result.stdout


def test_missing_kvm_device_is_one_clear_line(tmp_path):
    result = vmm("run", "--kvm-device", str(tmp_path / "nokvm"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_kvm_permission_error_is_clear(tmp_path):
    path = tmp_path / "kvm"
    path.write_text("")
    path.chmod(0)
    if os.geteuid() == 0:
        # root bypasses file modes; a directory stands in for an unopenable device
        path.unlink()
        path.mkdir()
    with pytest.raises(KvmError):
        from vmmcore.kvm import Kvm

        Kvm(str(path))


@pytest.mark.parametrize("args,message", [
    (["-c", "0"], "--cpus"),
    (["-m", "1"], "--mem"),
    (["/no/such/kernel"], "no such file"),
    (["--serial", "type=bogus"], "invalid type"),
    (["--serial", "type=file"], "path"),
])
def test_bad_run_options_exit_2(args, message):
    result = vmm("run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_guest_finds_the_pci_host_bridge_through_config_mechanism_1(tmp_path):
    vm_exit, serial = run_guest(tmp_path, "tests/pci")
    assert "pci 00:00.0 id 8086:29c0 class 060000" in serial, serial
    assert (vm_exit.event, vm_exit.status) == (VmEvent.GUEST_EXIT, 1)   # one function


class LifecycleRecorder:
    """A hook plugin registered in-process: records the lifecycle calls in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def vmm_configure(self, config):
        self.calls.append("configure")

    @hookimpl
    def vmm_kernel_cmdline(self, config):
        self.calls.append("cmdline")
        return ["exit=9"]

    @hookimpl
    def vmm_vm_created(self, vm, memory, allocator):
        self.calls.append("created")
        assert memory.size > 0 and allocator is not None

    @hookimpl
    def vmm_devices_created(self, vm, devices):
        self.calls.append(f"devices:{len(devices)}")

    @hookimpl
    def vmm_vm_started(self, vm):
        self.calls.append("started")

    @hookimpl
    def vmm_vm_stopped(self, vm, exit_status):
        self.calls.append(f"stopped:{exit_status}")


def test_lifecycle_hooks_are_called_in_order(tmp_path):
    pm = get_registry().hook_manager()
    recorder = LifecycleRecorder()
    pm.register(recorder)
    try:
        vm_exit, _ = run_guest(tmp_path, "tests/hello")
    finally:
        pm.unregister(recorder)
    assert recorder.calls == ["configure", "created", "devices:0", "cmdline", "started",
                              "stopped:9"]
    assert vm_exit.status == 9          # the parameter a plugin added reached the guest


def test_a_hook_refusing_the_config_stops_before_anything_starts(tmp_path):
    class Refuse:
        @hookimpl
        def vmm_configure(self, config):
            raise ConfigError("refused by a plugin")

    pm = get_registry().hook_manager()
    plugin = Refuse()
    pm.register(plugin)
    try:
        with pytest.raises(ConfigError, match="refused by a plugin"):
            run_guest(tmp_path, "tests/hello")
    finally:
        pm.unregister(plugin)


def test_pause_resume_and_stop_a_running_guest(tmp_path):
    """A guest that spins forever: suspend holds its vCPUs, resume lets them go, stop ends it."""
    out = tmp_path / "serial.txt"
    config = VmConfig(kernel=guest("tests/hello"), mem_mib=64, params=["spin=1"],
                      serial=[f"type=file,path={out}"])
    inst = build_vm(config)
    result = {}
    runner = threading.Thread(target=lambda: result.update(exit=inst.run()))
    try:
        runner.start()
        deadline = time.monotonic() + 10
        while "spinning" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "spinning" in out.read_text()
        assert inst.pause() and inst.paused
        exits = inst.loops[0].exits
        time.sleep(0.3)
        assert inst.loops[0].exits == exits        # held: no guest exits while paused
        inst.resume()
        deadline = time.monotonic() + 5
        while inst.loops[0].exits == exits and time.monotonic() < deadline:
            time.sleep(0.02)
        assert inst.loops[0].exits > exits        # running again
        inst.stop("test stop")
        runner.join(10)
        assert not runner.is_alive()
        assert result["exit"].event == VmEvent.STOPPED and result["exit"].status == 0
    finally:
        inst.stop()
        runner.join(10)
        inst.close()


def test_a_kernel_that_is_not_one_is_bad_input(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    result = vmm("run", str(junk))
    assert result.returncode == 2
    assert "neither a bzImage nor an ELF64 kernel" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_sigterm_stops_a_running_vm_cleanly_with_143():
    proc = subprocess.Popen([sys.executable, "-m", "vmmcore.cli", "run", str(guest("tests/hello")),
                             "-p", "spin=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 20
        line = ""
        while "spinning" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert "spinning" in line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
