"""The harness's own logic, with no VM: the direct-KVM probe's override, the `vmm run`
wrapper's status/timing protocol (on the direct path, with stand-in commands), markers."""

from __future__ import annotations

import sys

import harness


def test_direct_kvm_override(monkeypatch):
    monkeypatch.setenv("VMM_E2E_DIRECT", "1")
    assert harness.has_direct_kvm() is True
    monkeypatch.setenv("VMM_E2E_DIRECT", "0")
    assert harness.has_direct_kvm() is False


def test_direct_kvm_probe_says_no_on_kvm_pvm(monkeypatch):
    monkeypatch.delenv("VMM_E2E_DIRECT", raising=False)
    from pathlib import Path
    if Path("/sys/module/kvm_pvm").exists():
        assert harness.has_direct_kvm() is False


def test_parse_markers():
    m = harness.parse_markers("noise\r\nE2E: init=1.5\nxx E2E: cpus=2 online=0-1\nE2E: poweroff\n")
    assert m == {"init": "1.5", "cpus": "2", "online": "0-1", "poweroff": ""}


def test_run_vmm_direct_status_output_and_times(monkeypatch):
    monkeypatch.setenv("VMM_E2E_DIRECT", "1")
    code = "import time; print('E2E: init=0.1', flush=True); time.sleep(0.3); print('bye'); raise SystemExit(3)"
    res = harness.run_vmm([sys.executable, "-c", code], timeout=30)
    assert res.status == 3 and not res.nested
    assert "bye" in res.output and "E2E-VMM-TIME" not in res.output
    assert res.markers.get("init") == "0.1"
    assert res.to_init is not None and res.to_init <= res.elapsed
    assert res.elapsed >= 0.3


def test_run_vmm_direct_timeout_kills(monkeypatch):
    monkeypatch.setenv("VMM_E2E_DIRECT", "1")
    res = harness.run_vmm([sys.executable, "-c", "import time; time.sleep(60)"], timeout=2)
    assert res.status is None
    assert res.to_init is None
    assert 2 <= res.elapsed < 10
