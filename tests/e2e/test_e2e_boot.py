"""Boot Debian's stock kernel with `vmm run` to the level-2 busybox /init.

Scenarios (named in the report): with ``-c 2`` the guest sees 2 CPUs; ``poweroff -f`` in
the guest ends `vmm run` with status 0. All with the sandbox on (no --disable-sandbox).
`vmm run` runs directly where /dev/kvm runs a stock kernel (harness.has_direct_kvm), else
inside the level-1 host. The tests skip, with the reason "vmm cannot boot Linux yet",
while harness.vmm_linux_boot_missing() says so.

test_level2_image_under_qemu checks the level-2 image itself with QEMU TCG on this host,
so that a failing `vmm run` scenario is not blamed on the image.
"""

from __future__ import annotations

import subprocess
import time

import harness
import pytest

VMM_TIMEOUT = 240.0   # `vmm run` itself; level 1 adds its own boot allowance


def test_level2_image_under_qemu(e2e_kernel, e2e_timing):
    kernel, initrd = harness.level2_images()
    argv = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-m", "256", "-smp", "2",
            "-nographic", "-nodefaults", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append",
            "console=ttyS0 quiet mitigations=off panic=-1"]
    t0 = time.monotonic()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    e2e_timing("level-2 image, QEMU TCG", time.monotonic() - t0)
    out = r.stdout.decode("utf-8", "replace")
    m = harness.parse_markers(out)
    assert r.returncode == 0, out
    assert m.get("cpus") == "2", out
    assert m.get("scenario-status") == "0", out
    assert "poweroff" in m, out


@pytest.fixture(scope="module")
def two_cpu_boot(e2e_kernel, vmm_can_boot_linux) -> harness.VmmResult:
    kernel, initrd = harness.level2_images()
    return harness.run_vmm(harness.vmm_run_argv(kernel, initrd, cpus=2), timeout=VMM_TIMEOUT)


def test_vmm_boots_to_init_with_2_cpus(two_cpu_boot, e2e_timing):
    res = two_cpu_boot
    e2e_timing("vmm run, -c 2, to poweroff", res.elapsed)
    if "init" in res.markers:
        e2e_timing("level-2 /init (guest uptime)", float(res.markers["init"]))
    if res.level1 is not None:
        e2e_timing("level-1 total", res.level1.elapsed)
    assert "init" in res.markers, res.describe()
    assert res.markers.get("cpus") == "2", res.describe()
    assert res.markers.get("online") == "0-1", res.describe()
    assert res.markers.get("scenario-status") == "0", res.describe()


def test_vmm_poweroff_ends_run_with_status_0(two_cpu_boot):
    res = two_cpu_boot
    assert "poweroff" in res.markers, res.describe()
    assert "poweroff-failed" not in res.markers, res.describe()
    assert res.status == 0, res.describe()
