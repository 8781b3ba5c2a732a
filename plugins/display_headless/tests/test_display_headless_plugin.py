"""The headless display's contract with the core."""

from __future__ import annotations

from vmm_display_headless.plugin import PLUGIN

from vmmcore.registry import Registry


def test_registered():
    rec = Registry(fresh=True).get("display", "headless")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.kind == "display"
    assert rec.policy_path.name == "headless.policy"
