"""The raw disk format's contract with the core."""

from __future__ import annotations

from vmm_raw.plugin import PLUGIN

from vmmcore.registry import Registry


def test_registered():
    reg = Registry(fresh=True)
    rec = reg.get("disk_format", "raw")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.kind == "disk_format"
    assert rec.policy_path.name == "raw.policy"
    assert rec.status == "ok" and PLUGIN.factory == "vmm_raw.raw:RawFormat"
    assert "raw" in reg.names("disk_format")


def test_raw_has_no_magic():
    assert PLUGIN.magic is None      # raw is what format=auto falls back to
