"""A device's jail compiles the policies of the plugins it really uses (PluginSpec.policy_with):
the disk formats its image (and backing files) opened, the display it opened, not every
installed plugin of those kinds. No KVM, no fork: the factories run here, as the VM builder
runs them in the main process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vmmcore.disk import open_disk
from vmmcore.registry import get_registry, note_plugin_use, track_plugin_use
from vmmcore.vm_builder import jail_policies


def record(kind: str, name: str):
    rec = get_registry().get(kind, name)
    if rec is None or rec.broken or rec.spec is None or rec.policy_path is None:
        pytest.skip(f"plugin {name} is not usable here")
    return rec


def policy_names(paths) -> list[str]:
    return [p.name for p in paths]


def test_track_plugin_use_collects_only_inside_the_block():
    note_plugin_use("disk_format", "outside")          # no tracker: a no-op
    with track_plugin_use() as used:
        note_plugin_use("disk_format", "raw")
        note_plugin_use("disk_format", "raw")
        with track_plugin_use() as inner:              # nested: the inner one collects
            note_plugin_use("display", "headless")
        note_plugin_use("display", "web")
    note_plugin_use("display", "after")
    assert used == {"disk_format": {"raw"}, "display": {"web"}}
    assert inner == {"display": {"headless"}}


def test_open_disk_notes_the_formats_of_the_image_and_its_backing_file(tmp_path):
    record("disk_format", "raw")
    record("disk_format", "qcow2")
    from vmm_qcow2.create import create_image

    base = tmp_path / "base.img"
    base.write_bytes(bytes(1 << 20))
    top = tmp_path / "top.qcow2"
    create_image(top, 1 << 20, backing_file=str(base), backing_format="raw")
    with track_plugin_use() as used:
        open_disk(base).close()
    assert used == {"disk_format": {"raw"}}
    with track_plugin_use() as used:
        open_disk(top).close()
    assert used == {"disk_format": {"qcow2", "raw"}}


def test_virtio_blk_jail_has_the_policy_of_the_format_it_opened_only(tmp_path):
    blk = record("device", "virtio_blk")
    raw, qcow2 = record("disk_format", "raw"), record("disk_format", "qcow2")
    from vmmcore.plugin_api import load_factory

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    opts = {o.name: o.default_value() for o in blk.spec.options}
    opts.update(path=image)
    ctx = SimpleNamespace(name="virtio_blk0", index=0, mem_size=8 << 20)
    with track_plugin_use() as used:                   # what the VM builder does
        model = load_factory(blk.spec)(opts, ctx)
    model.shutdown()
    assert used.get("disk_format") == {"raw"}
    policies = jail_policies(blk, used)
    assert policies == [blk.policy_path, raw.policy_path]
    assert qcow2.policy_path not in policies


def test_a_kind_with_nothing_noted_falls_back_to_every_installed_plugin():
    """A plugin that loads its disk formats some other way must not lose their syscalls."""
    blk = record("device", "virtio_blk")
    registry = get_registry()
    every = [registry.get("disk_format", n).policy_path for n in registry.names("disk_format")
             if not registry.get("disk_format", n).broken]
    policies = jail_policies(blk, {})
    assert policies[0] == blk.policy_path
    assert set(every) <= set(policies)


def test_virtio_gpu_jail_has_the_display_it_opened_only():
    gpu = record("device", "virtio_gpu")
    headless = record("display", "headless")
    from vmmcore.display import open_display

    with track_plugin_use() as used:
        open_display("headless").close()
    assert used == {"display": {"headless"}}
    others = [get_registry().get("display", n) for n in get_registry().names("display")
              if n != "headless"]
    policies = jail_policies(gpu, used)
    assert policies == [gpu.policy_path, headless.policy_path]
    assert not {o.policy_path for o in others if o is not None} & set(policies)


def test_virtio_gpu_2d_jail_maps_nothing_executable():
    """API 1.4 sandbox_policies: only backend=virglrenderer compiles Mesa's rules (mmap
    and mprotect with PROT_EXEC, opens, directory listings) into the GPU's filter; the
    2D device keeps the common policy's "nothing executable" (it once had them all)."""
    from vmmcore.sandbox.policy import ALLOW, merge, parse_files

    gpu = record("device", "virtio_gpu")
    headless = record("display", "headless")
    used = {"display": {"headless"}}

    def unconditional(options) -> set[str]:
        rules = merge(parse_files(jail_policies(gpu, used, options)))
        return {r.syscall for r in rules if r.action == ALLOW and not r.atoms}

    virgl = gpu.policy_path.parent / "virtio_gpu_virgl.policy"
    assert jail_policies(gpu, used, {"backend": "2d"}) == [gpu.policy_path,
                                                           headless.policy_path]
    assert jail_policies(gpu, used, {"backend": "virglrenderer"}) == [
        gpu.policy_path, virgl, headless.policy_path]
    mesa = {"mmap", "mprotect", "sched_setaffinity", "getdents64"}
    assert not mesa & unconditional({"backend": "2d"})
    assert mesa <= unconditional({"backend": "virglrenderer"})


def test_a_display_s_binds_and_preloads_join_only_the_gpu_that_opened_it(monkeypatch,
                                                                         tmp_path):
    """API 1.6: display=window's X11 socket (read-only) and its preload (pygame, SDL's X11
    libraries) join the jail of a GPU that opened that display, and no other: not one
    with display=headless, and not when nothing was noted (no fall-back for binds)."""
    from vmmcore.vm_builder import jail_binds_and_preload

    gpu = record("device", "virtio_gpu")
    record("display", "window")
    from vmm_display_window import x11

    monkeypatch.setattr(x11, "X11_SOCKET_DIR", str(tmp_path))
    (tmp_path / "X5").touch()
    monkeypatch.setenv("DISPLAY", ":5.0")
    monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.Xauthority there
    monkeypatch.delenv("XAUTHORITY", raising=False)
    socket = str(tmp_path / "X5")
    binds, preload = jail_binds_and_preload(gpu, {"display": {"window"}},
                                            {"display": "window"})
    assert binds == [(socket, socket, False)]
    assert preload == (*gpu.spec.sandbox_preload, "vmm_display_window.preload")
    gpu_only = ([], tuple(gpu.spec.sandbox_preload))
    assert jail_binds_and_preload(gpu, {"display": {"headless"}},
                                  {"display": "headless"}) == gpu_only
    assert jail_binds_and_preload(gpu, {}, {"display": "window"}) == gpu_only
