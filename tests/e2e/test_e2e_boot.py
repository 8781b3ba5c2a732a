"""Boot Debian's stock kernel with `vmm run` to the level-2 busybox /init.

Scenarios (named in the report): with ``-c 2`` the guest sees 2 CPUs; ``poweroff -f`` in
the guest ends `vmm run` with status 0. All with the sandbox on (no --disable-sandbox).
`vmm run` runs directly where /dev/kvm runs a stock kernel (harness.has_direct_kvm), else
inside the level-1 host. The tests skip, with the reason "vmm cannot boot Linux yet",
while harness.vmm_linux_boot_missing() says so.

test_level2_image_under_qemu checks the level-2 image and every scenario (also those of
test_e2e_devices.py; blkpoll in test_blkpoll_scenario_under_qemu, with its own disk and
queues) against QEMU's own virtio devices with QEMU TCG on this host, so that a failing
`vmm run` scenario is not blamed on the image.
"""

from __future__ import annotations

import os
import subprocess
import time

import harness
import images
import pytest

VMM_TIMEOUT = 90.0   # `vmm run` itself (a nested boot to poweroff takes ~10 s); level 1 adds its own


def _level2_under_qemu(devices: list[str], params: str, label: str, e2e_timing) -> str:
    """Boot the level-2 image in QEMU TCG (2 CPUs, 256 MiB) with `devices` and the
    kernel parameters `params`; return its console once it has exited with status 0."""
    kernel, initrd = harness.level2_images()
    argv = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-m", "256", "-smp", "2",
            "-nographic", "-nodefaults", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), *devices,
            "-append", f"{harness.LEVEL2_APPEND} {params}"]
    t0 = time.monotonic()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=180)
    e2e_timing(f"level-2 {label}, QEMU TCG", time.monotonic() - t0)
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, out
    return out


def test_level2_image_under_qemu(e2e_kernel, e2e_timing, tmp_path):
    """Reference: every level-2 scenario passes against QEMU's own virtio devices (TCG)."""
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    rw.write_bytes(b""), ro.write_bytes(b"")
    os.truncate(rw, 64 << 20)
    os.truncate(ro, 32 << 20)
    out = _level2_under_qemu(
        ["-drive", f"file={rw},format=raw,if=virtio",
         "-drive", f"file={ro},format=raw,if=virtio,readonly=on",
         "-device", "virtio-rng-pci", "-device", "virtio-gpu-pci",
         "-device", "virtio-keyboard-pci", "-device", "virtio-mouse-pci"],
        "e2e_scenario=cpus,blk,rng,gpu,input", "all scenarios", e2e_timing)
    m = harness.parse_markers(out)
    for name in ("cpus", "blk", "rng", "gpu", "input"):
        assert m.get(f"scenario-{name}") == "done", out
    assert "scenario-status=1" not in out, out
    assert m.get("cpus") == "2" and m.get("online") == "0-1", out
    assert m.get("vda-readback") == "ok" and m.get("vdb-write") == "refused", out
    assert rw.read_bytes()[:images.BLK_PATTERN_BYTES] == images.blk_pattern()
    assert ro.read_bytes() == bytes(32 << 20)
    assert m.get("rng-current", "").startswith("virtio_rng") and m.get("hwrng-bytes") == "32"
    assert m.get("fb0") == "virtio_gpudrmfb" and m.get("fbcon-bound") == "1", out
    assert m.get("input-virtio") == "2", out
    assert "poweroff" in m, out


def test_blkpoll_scenario_under_qemu(e2e_kernel, e2e_timing, tmp_path):
    """Reference for test_e2e_devices' blk_poll: QEMU's own virtio-blk with 2 queues, 2
    CPUs and virtio_blk.poll_queues=1 passes the same blkpoll scenario."""
    disk = tmp_path / "poll.img"
    disk.write_bytes(images.iopoll_image())
    out = _level2_under_qemu(
        ["-drive", f"file={disk},format=raw,if=none,id=d0",
         "-device", "virtio-blk-pci,drive=d0,num-queues=2"],
        "virtio_blk.poll_queues=1 e2e_scenario=blkpoll", "blkpoll", e2e_timing)
    problem = images.blkpoll_problem(harness.parse_markers(out), disk.read_bytes())
    assert problem is None, f"{problem}\n{out}"


@pytest.fixture(scope="module")
def two_cpu_boot(e2e_kernel, vmm_can_boot_linux) -> harness.VmmResult:
    kernel, initrd = harness.level2_images()
    return harness.run_vmm(harness.vmm_run_argv(kernel, initrd, cpus=2, scenario="cpus"),
                           timeout=VMM_TIMEOUT)


def test_vmm_boots_to_init_with_2_cpus(two_cpu_boot, e2e_timing):
    res = two_cpu_boot
    e2e_timing("vmm run, -c 2, to exit", res.elapsed)
    if res.to_init is not None:
        e2e_timing("vmm run launch to /init", res.to_init)
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
