"""Stock Linux drivers against vmm's devices: virtio-blk (raw, qcow2, read-only, second
disk, poll queues), virtio-rng, virtio-gpu (2D, and 3D with virgl) and its virtio-input devices.
Sandbox on throughout.

Each group boots one level-2 VM under `vmm run` (nested where needed) and asserts on the
guest's own ``E2E:`` markers, printed by the scenarios in images.LEVEL2_SCENARIOS, and on
the disk images afterwards. A group skips while `vmm run` cannot boot Linux or while a
plugin it needs is not implemented (``vmm plugins list --json``). The same scenarios pass
against QEMU's own devices in test_e2e_boot.py::test_level2_image_under_qemu.

The device options used are in DEVICE_ARGS below: the one place to change when a plugin's
command line changes.
"""

from __future__ import annotations

import os
import subprocess

import harness
import images
import pytest

VMM_TIMEOUT = 120.0


def DEVICE_ARGS(tmp) -> dict[str, list[str]]:  # noqa: N802 (a table)
    return {
        # vda: writable raw; vdb: read-only raw (crosvm's --rwdisk / --disk)
        "blk_raw": ["--rwdisk", f"{tmp}/rw.img", "--disk", f"{tmp}/ro.img"],
        "blk_qcow2": ["--rwdisk", f"{tmp}/disk.qcow2"],
        # two request queues: Linux makes the second a poll queue (BOOT_OPTIONS below)
        "blk_poll": ["--device", f"virtio_blk:path={tmp}/poll.img,num_queues=2"],
        "rng": ["--device", "virtio_rng"],
        # the headless display writes the scanout to screenshot= (the last frame stays)
        "gpu_input": ["--gpu", "width=800,height=600,display=headless,"
                               f"screenshot={tmp}/screen.png,"
                               "window_keyboard=true,window_mouse=true"],
        # virgl: Mesa's llvmpipe renders in the jailed device process at level 1
        "gpu3d": ["--gpu", "backend=virglrenderer,width=640,height=480,display=headless,"
                           f"screenshot={tmp}/screen.png"],
    }


PLUGINS = {
    "blk_raw": ("virtio_blk", "raw"),
    "blk_qcow2": ("virtio_blk", "qcow2"),
    "blk_poll": ("virtio_blk", "raw"),
    "rng": ("virtio_rng",),
    "gpu_input": ("virtio_gpu", "headless"),
    "gpu3d": ("virtio_gpu", "headless"),
}

SCENARIOS = {"blk_raw": "blk", "blk_qcow2": "blk", "blk_poll": "blkpoll", "rng": "rng",
             "gpu_input": "gpu,input", "gpu3d": "gpu,gpu3d"}

#: Groups that need more than the default level-2 VM: (vCPUs, extra kernel parameters).
#: virtio_blk makes min(vCPUs, num_queues) queues, of which poll_queues poll.
BOOT_OPTIONS = {"blk_poll": (2, "virtio_blk.poll_queues=1")}


def _boot(group: str, tmp, e2e_kernel) -> harness.VmmResult:
    why = harness.vmm_linux_boot_missing()
    if why:
        pytest.skip(f"vmm cannot boot Linux yet ({why})")
    why = harness.vmm_plugin_missing(*PLUGINS[group])
    if why:
        pytest.skip(why)
    kernel, initrd = harness.level2_images()
    cpus, params = BOOT_OPTIONS.get(group, (1, ""))
    argv = harness.vmm_run_argv(kernel, initrd, cpus=cpus,
                                append=f"{harness.LEVEL2_APPEND} {params}".strip(),
                                scenario=SCENARIOS[group], extra=DEVICE_ARGS(tmp)[group])
    return harness.run_vmm(argv, timeout=VMM_TIMEOUT, rw_dirs=[tmp])


def _common(res: harness.VmmResult, e2e_timing, label: str) -> None:
    e2e_timing(f"vmm run {label}, to exit", res.elapsed)
    if res.to_init is not None:
        e2e_timing(f"vmm run {label}, to /init", res.to_init)
    assert "init" in res.markers, res.describe()
    assert "scenario-status=1" not in res.output, res.describe()
    assert res.status == 0, res.describe()


# --------------------------------------------------------------------------- virtio-blk, raw


@pytest.fixture(scope="module")
def blk_raw(e2e_kernel, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blk_raw")
    for name, size in (("rw.img", 64 << 20), ("ro.img", 32 << 20)):
        with open(tmp / name, "wb") as f:
            f.truncate(size)
    return tmp, _boot("blk_raw", tmp, e2e_kernel)


def test_blk_raw_pattern_written_synced_read_back(blk_raw, e2e_timing):
    tmp, res = blk_raw
    _common(res, e2e_timing, "blk raw")
    assert res.markers.get("vda-sectors") == str((64 << 20) // 512), res.describe()
    assert res.markers.get("vda-write") == "ok", res.describe()
    assert res.markers.get("vda-readback") == "ok", res.describe()
    data = (tmp / "rw.img").read_bytes()
    assert data[:images.BLK_PATTERN_BYTES] == images.blk_pattern()
    assert not any(data[images.BLK_PATTERN_BYTES:])


def test_blk_second_disk_is_vdb(blk_raw):
    _, res = blk_raw
    assert res.markers.get("vdb-sectors") == str((32 << 20) // 512), res.describe()


def test_blk_readonly_disk_refuses_writes(blk_raw):
    tmp, res = blk_raw
    assert res.markers.get("vdb-ro") == "1", res.describe()
    assert res.markers.get("vdb-write") == "refused", res.describe()
    assert not any((tmp / "ro.img").read_bytes())


# --------------------------------------------------------------------------- virtio-blk, qcow2


@pytest.fixture(scope="module")
def blk_qcow2(e2e_kernel, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blk_qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp / "disk.qcow2"), "64M"],
                   check=True)
    return tmp, _boot("blk_qcow2", tmp, e2e_kernel)


def test_blk_qcow2_pattern_and_qemu_img_check(blk_qcow2, e2e_timing):
    tmp, res = blk_qcow2
    _common(res, e2e_timing, "blk qcow2")
    assert res.markers.get("vda-sectors") == str((64 << 20) // 512), res.describe()
    assert res.markers.get("vda-write") == "ok", res.describe()
    assert res.markers.get("vda-readback") == "ok", res.describe()
    check = subprocess.run(["qemu-img", "check", str(tmp / "disk.qcow2")], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp / "disk.qcow2"), str(raw)],
                   check=True)
    with open(raw, "rb") as f:
        assert f.read(images.BLK_PATTERN_BYTES) == images.blk_pattern()
    os.unlink(raw)


# --------------------------------------------------------------------------- virtio-blk, polled


@pytest.fixture(scope="module")
def blk_poll(e2e_kernel, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blk_poll")
    (tmp / "poll.img").write_bytes(images.iopoll_image())
    return tmp, _boot("blk_poll", tmp, e2e_kernel)


def test_blk_poll_queue_serves_io_uring_iopoll(blk_poll, e2e_timing):
    """Linux's virtio_blk with poll_queues=1 on a device with two queues makes one queue
    with an interrupt and one poll queue (no MSI-X vector, interrupts off). io_uring
    IOPOLL reads and writes (iopoll_check.c: one at a time and 8 at once, every byte
    checked, then fsync) run on the poll queue, reaped by the guest spinning on the used
    ring: 104 requests raise no interrupt (the fsync's flush, on the interrupt queue, may
    raise one). Had they taken the interrupt path, each would have raised one. (This
    shows the device serves a queue without a vector and interrupts off; whether its
    own ring polling caught a request is not visible from here: the tier-1 tests check
    that.)"""
    tmp, res = blk_poll
    _common(res, e2e_timing, "blk polled")
    assert res.markers.get("vda-req-vectors") == "1", res.describe()   # poll queue: none
    problem = images.blkpoll_problem(res.markers, (tmp / "poll.img").read_bytes())
    assert problem is None, f"{problem}\n{res.describe()}"


# --------------------------------------------------------------------------- virtio-rng


def test_rng_feeds_dev_hwrng(e2e_kernel, tmp_path, e2e_timing):
    res = _boot("rng", tmp_path, e2e_kernel)
    _common(res, e2e_timing, "rng")
    assert res.markers.get("rng-current", "").startswith("virtio_rng"), res.describe()
    assert res.markers.get("hwrng-bytes") == "32", res.describe()
    hexbytes = res.markers.get("hwrng-hex", "")
    assert len(hexbytes) == 32 and set(hexbytes) != {"0"}, res.describe()


# --------------------------------------------------------------------------- virtio-gpu, input


@pytest.fixture(scope="module")
def gpu_input(e2e_kernel, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    return tmp, _boot("gpu_input", tmp, e2e_kernel)


def test_gpu_drm_device_and_fbcon(gpu_input, e2e_timing):
    tmp, res = gpu_input
    _common(res, e2e_timing, "gpu+input")
    assert "card0" in res.markers.get("drm", ""), res.describe()
    assert res.markers.get("fb0") == "virtio_gpudrmfb", res.describe()
    assert res.markers.get("fbcon-bound") == "1", res.describe()
    # fbcon drew through virtio-gpu: the headless scanout is 800x600 and not blank
    _assert_console_drawn(tmp / "screen.png", 800, 600)


def _assert_console_drawn(png, width: int, height: int) -> None:
    """The screenshot has the mode's size and is not blank (the console's text lines
    cover several percent of it)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as shot:
        assert shot.size == (width, height)
        lit = int((np.asarray(shot.convert("L")) > 16).sum())
    assert lit >= 0.01 * width * height, f"screenshot nearly blank: {lit} lit pixels"


def test_input_devices_appear(gpu_input):
    _, res = gpu_input
    assert res.markers.get("input-virtio") == "2", res.describe()   # keyboard and mouse


# --------------------------------------------------------------------------- virtio-gpu, virgl


@pytest.fixture(scope="module")
def gpu3d(e2e_kernel, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu3d")
    return tmp, _boot("gpu3d", tmp, e2e_kernel)


def test_gpu_virgl_negotiated_and_renders(gpu3d, e2e_timing):
    """Debian's virtio_gpu negotiates virgl with backend=virglrenderer; a guest program
    (virgl_check.c) clears a render target through EXECBUFFER and reads every pixel back;
    fbcon, drawing through dumb buffers that virglrenderer now holds, reaches the
    headless screenshot."""
    tmp, res = gpu3d
    _common(res, e2e_timing, "gpu virgl")
    assert int(res.markers.get("virgl-dmesg", "0")) >= 1, res.describe()
    assert res.markers.get("virgl-3d-features") == "1", res.describe()
    assert res.markers.get("virgl-caps-max-version") == "1", res.describe()
    assert res.markers.get("virgl-bad-pixels") == "0", res.describe()
    assert res.markers.get("virgl-check") == "ok", res.describe()
    _assert_console_drawn(tmp / "screen.png", 640, 480)
