"""The device plugins sandboxed under their own policies, and in-process: same behaviour.

Each device is built by its plugin factory inside the device process (which opens the
disk image or entropy source before the jail closes), jailed under the plugin's policy
file (plus the disk format's, which @include-less fragments add) and the core's common
policy, and driven through a PciRoot the way Linux's virtio_pci driver does.
"""

from __future__ import annotations

import importlib
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_sandbox_proxy import _SKIP  # the same namespace probe

from vmmcore.sandbox.testing import PciVirtioRig
from vmmcore.virtio.pci_transport import VirtioPciDevice

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def plugin(name: str):
    """(spec, factory, policy path) of an installed plugin, or skip."""
    try:
        mod = importlib.import_module(f"vmm_{name}.plugin")
    except ImportError:
        pytest.skip(f"plugin {name} is not installed")
    from vmmcore.plugin_api import load_factory

    spec = mod.PLUGIN
    try:
        factory = load_factory(spec)
    except (ImportError, NotImplementedError) as e:
        pytest.skip(f"plugin {name}: {e}")
    return spec, factory, str(Path(mod.__file__).parent / spec.policy)


def options(spec, **given):
    opts = {o.name: o.default_value() for o in spec.options}
    opts.update(given)
    return opts


def rig_for(name: str, sandboxed: bool, extra_policies=(), ctx=None, **opts) -> PciVirtioRig:
    spec, factory, policy = plugin(name)
    o = options(spec, **opts)
    ctx = ctx or SimpleNamespace(name=f"{name}0", index=0)
    return PciVirtioRig(lambda mem: VirtioPciDevice(factory(o, ctx), mem, label=ctx.name),
                        sandboxed=sandboxed, policies=[policy, *extra_policies],
                        label=ctx.name)


MODES = [pytest.param(False, id="in-process"), pytest.param(True, id="sandboxed")]


@pytest.mark.parametrize("sandboxed", MODES)
def test_virtio_rng(sandboxed):
    with rig_for("virtio_rng", sandboxed) as rig:
        lengths = []
        for n in (16, 4096, 100_000):
            used = rig.request(0, in_sizes=[n])
            lengths.append(used.length)
            assert len(set(used.data)) > 1              # random, not the 0xaa filler
        assert lengths == [16, 4096, 65536]             # MAX_FILL per request
        if sandboxed:
            assert not rig.device.dead
        rig.reset()
        assert rig.status() == 0


def _blk_session(rig: PciVirtioRig, image: Path) -> list:
    """Write, read back, flush, get-id, discard, write-zeroes; the statuses and data."""
    data = bytes(range(256)) * 16
    out = []
    used = rig.request(0, out=[struct.pack("<IIQ", 1, 0, 8), data], in_sizes=[1])
    out.append(("write", used.data))
    used = rig.request(0, out=[struct.pack("<IIQ", 0, 0, 8)], in_sizes=[4096, 1])
    out.append(("read", used.data[:4096] == data, used.data[4096:]))
    out.append(("flush", rig.request(0, out=[struct.pack("<IIQ", 4, 0, 0)],
                                     in_sizes=[1]).data))
    out.append(("get_id", rig.request(0, out=[struct.pack("<IIQ", 8, 0, 0)],
                                      in_sizes=[20, 1]).data[-1:]))
    out.append(("discard", rig.request(0, out=[struct.pack("<IIQ", 11, 0, 0),
                                               struct.pack("<QII", 0, 8, 0)],
                                       in_sizes=[1]).data))
    out.append(("write_zeroes", rig.request(0, out=[struct.pack("<IIQ", 13, 0, 0),
                                                    struct.pack("<QII", 8, 4, 0)],
                                            in_sizes=[1]).data))
    used = rig.request(0, out=[struct.pack("<IIQ", 0, 0, 8)], in_sizes=[4096, 1])
    out.append(("read2", used.data[:2048] == bytes(2048), used.data[2048:4096] == data[2048:]))
    # Past the end: an error status (the device lives on).
    used = rig.request(0, out=[struct.pack("<IIQ", 0, 0, 1 << 40)], in_sizes=[512, 1])
    out.append(("past_end", used.length))
    return out


@pytest.mark.parametrize("sandboxed", MODES)
def test_virtio_blk_raw(tmp_path, sandboxed):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    _, _, raw_policy = plugin("raw")
    with rig_for("virtio_blk", sandboxed, [raw_policy], path=image, format="raw") as rig:
        result = _blk_session(rig, image)
        if sandboxed:
            assert not rig.device.dead, rig.device.death_reason
    assert result == [("write", b"\0"), ("read", True, b"\0"), ("flush", b"\0"),
                      ("get_id", b"\0"), ("discard", b"\0"), ("write_zeroes", b"\0"),
                      ("read2", True, True), ("past_end", 1)]
    on_disk = image.read_bytes()
    assert on_disk[8 * 512 + 2048:8 * 512 + 4096] == (bytes(range(256)) * 16)[2048:]


def test_virtio_blk_model_built_in_the_main_process(tmp_path):
    """The builder's way (DeviceContext: factories run in the main process): the model
    opens its image here; the device process inherits it and keeps model.keep_fds()."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    spec, factory, policy = plugin("virtio_blk")
    _, _, raw_policy = plugin("raw")
    ctx = SimpleNamespace(name="virtio_blk0", index=0, mem_size=8 << 20)
    model = factory(options(spec, path=image, format="raw"), ctx)
    try:
        with PciVirtioRig(lambda mem: VirtioPciDevice(model, mem, label=ctx.name),
                          sandboxed=True, policies=[policy, raw_policy], label=ctx.name,
                          keep_fds=model.keep_fds()) as rig:
            result = _blk_session(rig, image)
            assert not rig.device.dead, rig.device.death_reason
    finally:
        model.shutdown()
    assert result[:3] == [("write", b"\0"), ("read", True, b"\0"), ("flush", b"\0")]
    assert image.read_bytes()[8 * 512 + 2048:8 * 512 + 4096] == \
        (bytes(range(256)) * 16)[2048:]


@pytest.mark.parametrize("sandboxed", MODES)
def test_virtio_blk_qcow2(tmp_path, sandboxed):
    _, _, qcow2_policy = plugin("qcow2")
    from vmm_qcow2.create import create_image

    image = tmp_path / "disk.qcow2"
    create_image(image, 1 << 20)
    with rig_for("virtio_blk", sandboxed, [qcow2_policy], path=image,
                 format="qcow2") as rig:
        result = _blk_session(rig, image)
        if sandboxed:
            assert not rig.device.dead, rig.device.death_reason
    assert result[:3] == [("write", b"\0"), ("read", True, b"\0"), ("flush", b"\0")]


@pytest.mark.parametrize("name", ["virtio_input", "virtio_gpu", "virtio_wl",
                                  "virtio_balloon"])
def test_other_devices_come_up_under_their_policy(name):
    ctx = SimpleNamespace(name=f"{name}0", index=0, mem_size=8 << 20)
    try:
        rig = rig_for(name, True, ctx=ctx)
    except pytest.skip.Exception:
        raise
    except Exception as e:  # a factory needing a host resource this machine lacks
        if "dead" in str(e) or "seccomp" in str(e):
            raise
        pytest.skip(f"{name}: {e}")
    with rig:
        assert rig.status() & 0x4                      # DRIVER_OK
        assert not rig.device.dead, rig.device.death_reason
        rig.reset()
        assert rig.status() == 0
        assert rig.device.ping()["pid"] == 1




def test_sandbox_binds_may_be_read_only():
    """API 1.3: a plugin's bind is a path (read-write, as before) or (path, writable)."""
    from vmmcore.vm_builder import _bind_mount

    assert _bind_mount("/run/wayland-0") == ("/run/wayland-0", "/run/wayland-0", True)
    assert _bind_mount(("/usr/lib", False)) == ("/usr/lib", "/usr/lib", False)


@pytest.mark.parametrize("sandboxed", MODES)
def test_virtio_gpu_virgl_renders_in_its_jail(sandboxed):
    """backend=virglrenderer, built as the VM builder builds it: the factory runs here,
    virglrenderer initialises later in the (jailed) device process, where Mesa's llvmpipe
    finds its libraries through the plugin's read-only binds and runs under its policy;
    a virgl CLEAR, read back with TRANSFER_FROM_HOST_3D, is right in every pixel.
    In-process runs first: virglrenderer cleaned up here must still start in a fork."""
    spec, factory, policy = plugin("virtio_gpu")
    _, _, headless_policy = plugin("display_headless")
    from vmm_virtio_gpu.virgl import VirglUnavailable, check_virglrenderer

    try:
        check_virglrenderer()
    except VirglUnavailable as e:
        pytest.skip(f"virglrenderer cannot initialise here: {e}")
    from vmm_virtio_gpu.protocol import VIRTIO_GPU_F_VIRGL
    from vmm_virtio_gpu.testing import RGBA, GpuClient

    from vmmcore.sandbox.jail import JailConfig
    from vmmcore.vm_builder import _bind_mount

    o = options(spec, backend="virglrenderer", width=GpuClient.width,
                height=GpuClient.height)
    ctx = SimpleNamespace(name="virtio_gpu0", index=0, mem_size=8 << 20)
    model = factory(o, ctx)
    jail = JailConfig(binds=[_bind_mount(b) for b in spec.sandbox_binds(o)],
                      preload=spec.sandbox_preload)
    # the policies the VM builder compiles (vm_builder.jail_policies): API 1.4's
    # sandbox_policies add virtio_gpu_virgl.policy for this backend only
    policies = [policy, *(str(Path(policy).parent / name)
                          for name in spec.sandbox_policies(o)), headless_policy]
    assert len(policies) == 3
    try:
        with PciVirtioRig(lambda mem: VirtioPciDevice(model, mem, label=ctx.name),
                          sandboxed=sandboxed, policies=policies,
                          jail=jail, features=1 << VIRTIO_GPU_F_VIRGL,
                          keep_fds=model.keep_fds(),
                          label=ctx.name, timeout=30) as rig:
            pixels = GpuClient.over_rig(rig).clear_and_read_back()
            if sandboxed:
                assert not rig.device.dead, rig.device.death_reason
                assert rig.device.ping()["pid"] == 1
    finally:
        model.shutdown()
    bgra = [RGBA[2], RGBA[1], RGBA[0], RGBA[3]]
    assert (pixels == bgra).all(), pixels.reshape(-1, 4)[:4]
    assert jail.binds and all(not writable for _, _, writable in jail.binds)
