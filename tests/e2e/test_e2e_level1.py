"""The LEVEL-1 host works: it boots, reaches this host's Python and checkout over 9p, has a
working /dev/kvm from kvm-amd, returns the command's exit status and output, and a hung
guest is killed at the timeout.

These tests use the level-1 host whatever the machine's /dev/kvm is: they test the harness
that the nested `vmm run` scenarios stand on.
"""

from __future__ import annotations

import sys
import textwrap

import harness

KVM_PROBE = textwrap.dedent("""
    import fcntl, os, sys
    print("python", sys.version.split()[0], sys.executable)
    print("kvm-exists", os.path.exists("/dev/kvm"))
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    print("api-version", fcntl.ioctl(fd, 0xAE00))          # KVM_GET_API_VERSION
    vm = fcntl.ioctl(fd, 0xAE01, 0)                        # KVM_CREATE_VM
    print("create-vm", "ok" if vm >= 0 else vm)
    vcpu = fcntl.ioctl(vm, 0xAE41, 0)                      # KVM_CREATE_VCPU
    print("create-vcpu", "ok" if vcpu >= 0 else vcpu)
    print("modules", " ".join(sorted(m for m in os.listdir("/sys/module")
                                     if m.startswith("kvm"))))
""")


def test_level1_has_working_kvm(level1, e2e_timing):
    res = harness.run_level1([sys.executable, "-c", KVM_PROBE], timeout=120)
    e2e_timing("level-1 boot+run+poweroff", res.elapsed)
    if "level1-ready" in res.markers:
        e2e_timing("level-1 /init ready (uptime)", float(res.markers["level1-ready"]))
    assert res.status == 0, res.describe()
    lines = dict(line.split(" ", 1) for line in res.output.splitlines() if " " in line)
    assert lines.get("kvm-exists") == "True", res.describe()
    assert lines.get("api-version") == "12", res.describe()
    assert lines.get("create-vm") == "ok", res.describe()
    assert lines.get("create-vcpu") == "ok", res.describe()
    assert "kvm_amd" in lines.get("modules", ""), res.describe()
    assert res.markers.get("kvm") == "yes"
    assert not res.timed_out and res.qemu_status == 0


def test_level1_sees_checkout_and_returns_status(level1, e2e_timing, tmp_path):
    # tmp_path is under /tmp, which level 1 covers with a tmpfs: the harness binds it back.
    (tmp_path / "hello").write_text("from the host\n")
    script = textwrap.dedent(f"""
        python3 -S -c 'import vmmcore, sys; print("vmmcore", vmmcore.__file__)'
        cat {tmp_path}/hello
        touch /etc/vmm-e2e-probe 2>/dev/null && echo root=writable || echo root=readonly
        touch /tmp/x && echo tmp=writable
        echo "cwd=$(pwd)"
        exit 7
    """)
    res = harness.run_level1(script, timeout=120, binds=[str(tmp_path)], keep_workdir=False)
    e2e_timing("level-1 boot+run+poweroff", res.elapsed)
    assert res.status == 7, res.describe()
    assert f"vmmcore {harness.REPO}/vmmcore/__init__.py" in res.output, res.describe()
    assert "from the host" in res.output, res.describe()
    assert "root=readonly" in res.output
    assert "tmp=writable" in res.output
    assert f"cwd={harness.REPO}" in res.output


def test_level1_timeout_kills_qemu(level1, e2e_timing):
    res = harness.run_level1("echo started; sleep 600", timeout=12, keep_workdir=False)
    e2e_timing("level-1 killed at timeout", res.elapsed)
    assert res.timed_out, res.describe()
    assert res.status is None and res.qemu_status is None
    assert res.elapsed < 20
    assert "started" in res.output
