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
    assert rec.status == "not implemented yet"
    assert "qcow2" in reg.names("disk_format")


def test_magic_identifies_qcow2():
    assert PLUGIN.magic == b"QFI\xfb"
