"""The image builder: module dependency closure, the cpio archive, the extracted vmlinux."""

from __future__ import annotations

import gzip
import shutil
import subprocess

import images
import pytest


def test_cpio_writer_round_trip(tmp_path):
    w = images.CpioWriter()
    w.file("a/b/c.txt", b"hello", 0o600)
    w.symlink("a/link", "b/c.txt")
    w.chardev("dev/console", 5, 1)
    data = w.finish()
    assert data.startswith(b"070701") and len(data) % 4 == 0
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True,
                             check=True).stdout.decode()
    assert "a/b/c.txt" in listing and "a/link -> b/c.txt" in listing
    assert "5,   1" in listing or "5, 1" in listing
    subprocess.run(["cpio", "-idm", "--quiet", "a/b/c.txt"], input=data, cwd=tmp_path,
                   check=True)
    assert (tmp_path / "a/b/c.txt").read_bytes() == b"hello"


def test_module_closure_orders_dependencies(e2e_kernel):
    idx = images.ModuleIndex(e2e_kernel.modules_dir)
    order = [p.name.split(".ko")[0].replace("-", "_") for p in idx.closure(images.LEVEL1_MODULES)]
    assert order.index("kvm") < order.index("kvm_amd")
    assert order.index("irqbypass") < order.index("kvm")
    assert order.index("9pnet") < order.index("9pnet_virtio") < order.index("9p")
    l2 = [p.name.split(".ko")[0].replace("-", "_") for p in idx.closure(images.LEVEL2_MODULES)]
    assert "drm" in l2 and l2.index("drm") < l2.index("virtio_gpu")
    for name in ("virtio_pci", "virtio_blk", "virtio_rng", "virtio_input"):
        assert name in l2


def test_images_build(e2e_kernel):
    vmlinux = e2e_kernel.vmlinux.read_bytes()
    assert vmlinux[:4] == b"\x7fELF"
    assert b"Xen" in vmlinux   # the PVH entry note QEMU boots it through (XEN_ELFNOTE_PHYS32)
    for path in (images.build_level1_initramfs(e2e_kernel),
                 images.build_level2_initramfs(e2e_kernel, {"extra": "echo hi\n"})):
        data = gzip.decompress(path.read_bytes())
        assert b"TRAILER!!!" in data and b"bin/busybox" in data
        assert b"init\0" in data and b"etc/modules.load" in data


def test_level1_loads_kvm_after_the_refined_tsc_calibration():
    """kvm.ko takes the TSC rate of the moment it loads; loaded before the refined
    calibration, it can leave level-2 timers tens of seconds late (README: timer lockups).
    The level-1 /init waits for the tsc clocksource before its first insmod."""
    init = images.LEVEL1_INIT
    wait = init.index("clocksource0/current_clocksource")
    assert wait < init.index('insmod "$m"')
    assert "!= tsc" in init[wait:init.index('insmod "$m"')]
