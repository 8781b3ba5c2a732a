"""The qcow2 disk format's contract with the core."""

from __future__ import annotations

from vmm_qcow2.plugin import PLUGIN

from vmmcore.registry import Registry


def test_registered():
    reg = Registry(fresh=True)
    rec = reg.get("disk_format", "qcow2")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.kind == "disk_format"
    assert rec.policy_path.name == "qcow2.policy"
    assert rec.status == "ok" and PLUGIN.factory == "vmm_qcow2.image:Qcow2Format"
    assert "qcow2" in reg.names("disk_format")


def test_magic_identifies_qcow2():
    assert PLUGIN.magic == b"QFI\xfb"


def test_open_disk_detects_qcow2(tmp_path):
    from vmm_qcow2.create import create_image

    from vmmcore.disk import detect_format, open_disk

    p = tmp_path / "d.qcow2"
    create_image(p, 1 << 20)
    assert detect_format(p) == "qcow2"
    with open_disk(p, read_only=True) as d:
        assert d.format_name == "qcow2" and d.size == 1 << 20
        caps = d.capabilities()
        assert caps.discard and caps.write_zeroes and caps.resize and caps.sparse
        assert len(d.fds()) == 1
