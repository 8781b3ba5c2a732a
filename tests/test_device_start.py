"""Plugin API 1.5: a device's on_device_sandboxed() runs where the device runs, inside
its closed jail (or in this process with --disable-sandbox), before the guest does, and
its failure stops `vmm run` with one line naming the device.

The fixture plugin (tests/fixtures/start_plugin, pip-installed as a third party would)
is told by its `fail` option to raise, raise a ConfigError, crash with SIGSEGV, or make
a system call its policy forbids. The ProxyDevice tests need no KVM; `vmm run` does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fixtures.plugin_env import FIXTURES, pip_installed
from test_sandbox_proxy import _SKIP  # the same namespace probe

from vmmcore.errors import ConfigError, VmmError
from vmmcore.memory import GuestMemory
from vmmcore.sandbox.jail import JailConfig
from vmmcore.sandbox.policy import compile_policy
from vmmcore.sandbox.proxy import DeviceDied, ProxyDevice
from vmmcore.sandbox.testing import PciVirtioRig
from vmmcore.virtio.pci_transport import VirtioPciDevice

START = FIXTURES / "start_plugin"
LABEL = "fixture_start0"
needs_namespaces = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                               reason="`vmm run` needs read-write access to /dev/kvm")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    with pip_installed(START, workdir=tmp_path_factory.mktemp("pip")):
        yield


def _fixture(fail: str):
    """(the fixture's model, its policy path), imported from the installed plugin."""
    from vmm_fixture_start import device, plugin

    policy = os.path.join(os.path.dirname(plugin.__file__), plugin.PLUGIN.policy)
    return device.StartFixture(fail), policy


def _proxy(fail: str) -> ProxyDevice:
    model, policy = _fixture(fail)
    mem = GuestMemory([(0, 1 << 20)])
    try:
        return ProxyDevice(lambda m: VirtioPciDevice(model, m, label=LABEL), mem,
                           label=LABEL, jail=JailConfig(seccomp=compile_policy([policy])))
    finally:
        mem.close()


# -- the device process (no KVM) ---------------------------------------------------------------


@needs_namespaces
@pytest.mark.parametrize("fail,kind,message", [
    ("raise", VmmError, f"device {LABEL} failed to start: RuntimeError: fixture: start "
                        "failed on purpose"),
    ("config", ConfigError, f"device {LABEL} failed to start: fixture: this "
                            "configuration cannot start"),
    ("where", VmmError, f"device {LABEL} failed to start: RuntimeError: fixture: running "
                        "as pid 1"),           # in the device process's PID namespace
    ("segv", DeviceDied, f"device {LABEL} was killed by SIGSEGV (while starting in its "
                         "process)"),
    ("syscall", DeviceDied, f"device {LABEL} was killed by seccomp: system call 111 "
                            "(getpgrp) is not allowed by its policy"),   # seccomp is on
])
def test_a_refusing_device_process_fails_its_construction(installed, fail, kind, message):
    with pytest.raises(kind) as info:
        _proxy(fail).destroy()
    assert str(info.value) == message and type(info.value) is kind


@needs_namespaces
def test_a_starting_device_process_serves(installed):
    proxy = _proxy("none")
    try:
        assert proxy.ping()["pid"] == 1 and not proxy.dead
    finally:
        proxy.destroy()


def test_the_in_process_rig_runs_the_hook_too(installed):
    model, _ = _fixture("raise")
    with pytest.raises(VmmError, match=f"^device {LABEL} failed to start: RuntimeError"):
        PciVirtioRig(lambda m: VirtioPciDevice(model, m, label=LABEL), sandboxed=False)


# -- `vmm run` -------------------------------------------------------------------------------


def vmm_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmmcore.cli", "run", *args],
                          capture_output=True, text=True, timeout=120)


MODES = [pytest.param([], id="sandboxed"), pytest.param(["--disable-sandbox"], id="in-process")]


@needs_kvm
@pytest.mark.parametrize("sandbox", MODES)
@pytest.mark.parametrize("fail,status,why", [
    ("raise", 1, "RuntimeError: fixture: start failed on purpose"),
    ("config", 2, "fixture: this configuration cannot start"),
])
def test_vmm_run_stops_at_start_up_with_one_line(installed, sandbox, fail, status, why):
    res = vmm_run(*sandbox, "--device", f"fixture_start:fail={fail}")
    assert res.returncode == status, res
    assert res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr == f"vmm: error: device {LABEL} failed to start: {why}\n"


@needs_kvm
@needs_namespaces
@pytest.mark.parametrize("fail,how", [
    ("segv", "was killed by SIGSEGV (while starting in its process)"),
    ("syscall", "was killed by seccomp: system call 111 (getpgrp) is not allowed by its "
                "policy"),
])
def test_vmm_run_reports_a_device_process_dying_at_start_up(installed, fail, how):
    res = vmm_run("--device", f"fixture_start:fail={fail}")
    assert res.returncode == 1, res
    assert res.stderr == f"vmm: error: device {LABEL} {how}\n", res.stderr
