"""backend=virglrenderer initialises at start-up where the device runs (plugin API 1.5's
on_device_sandboxed), so a jail or a process where it cannot work stops `vmm run` with
the reason before the guest runs, never on the guest's first 3D command.

The broken environments are the reviewer's: a jail without a bind Mesa needs (glvnd's
EGL vendor list, the library directory) or with ``__EGL_VENDOR_LIBRARY_FILENAMES``
pointing nowhere (set in the device process only, so the host probe still passes), and
two virgl GPUs in one process (--disable-sandbox).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from vmm_virtio_gpu.factory import create
from vmm_virtio_gpu.plugin import PLUGIN
from vmm_virtio_gpu.virgl import VirglUnavailable, check_virglrenderer

from vmmcore.errors import VmmError
from vmmcore.sandbox.jail import JailConfig
from vmmcore.sandbox.testing import PciVirtioRig
from vmmcore.virtio.pci_transport import VirtioPciDevice
from vmmcore.vm_builder import _bind_mount

NAME = "virtio_gpu0"
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                               reason="`vmm run` needs read-write access to /dev/kvm")


@pytest.fixture(scope="module", autouse=True)
def virgl_works_on_this_host():
    pytest.importorskip("vmm_display_headless", reason="every GPU here shows on the "
                        "headless display plugin (vmm-display-headless), not installed")
    try:
        check_virglrenderer()
    except VirglUnavailable as e:
        pytest.skip(f"virglrenderer cannot initialise here: {e}")


def _options() -> dict:
    opts = {o.name: o.default_value() for o in PLUGIN.options}
    opts.update(backend="virglrenderer", width=64, height=64)
    return opts


def _policies(opts: dict) -> list[str]:
    """The policies vm_builder.jail_policies compiles for this GPU (headless display)."""
    import vmm_display_headless
    from vmm_display_headless.plugin import PLUGIN as HEADLESS

    here = Path(sys.modules[PLUGIN.factory.split(":")[0]].__file__).parent
    return [str(here / PLUGIN.policy), *(str(here / n) for n in PLUGIN.sandbox_policies(opts)),
            str(Path(vmm_display_headless.__file__).parent / HEADLESS.policy)]


def _start_jailed(keep_bind: Callable[[str], bool], env: dict[str, str]) -> None:
    """A virgl GPU's device process with the plugin's binds that keep_bind accepts and
    env set inside it; returns once started (raises as ProxyDevice does)."""
    opts = _options()
    model = create(opts, SimpleNamespace(name=NAME, index=0, mem_size=8 << 20))

    def build(mem):
        os.environ.update(env)                  # in the device process, before its jail
        return VirtioPciDevice(model, mem, label=NAME)

    binds = [_bind_mount(b) for b in PLUGIN.sandbox_binds(opts)]
    jail = JailConfig(binds=[b for b in binds if keep_bind(b[0])],
                      preload=PLUGIN.sandbox_preload)
    try:
        with PciVirtioRig(build, sandboxed=True, policies=_policies(opts), jail=jail,
                          keep_fds=model.keep_fds(), label=NAME, timeout=30) as rig:
            assert rig.device.ping()["pid"] == 1
    except VmmError as e:
        if "cannot start the device process" in str(e):
            pytest.skip(str(e))
        raise
    finally:
        model.shutdown()


#: (binds kept, environment inside the device process, the reason expected or None)
JAILS: dict[str, tuple[Callable[[str], bool], dict[str, str], str | None]] = {
    "complete": (lambda path: True, {}, None),
    "no-egl-vendor-bind": (lambda path: "egl_vendor" not in path, {},
                           "EGL has no surfaceless display"),
    "egl-vendor-env": (lambda path: True, {"__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent"},
                       "EGL has no surfaceless display"),
    "no-library-bind": (lambda path: not path.startswith("/usr/lib"), {},
                        "cannot load libvirglrenderer.so.1"),
}


def _start_in_a_fresh_process(case: str) -> str:
    """_start_jailed(JAILS[case]) from a new interpreter: in this one an earlier test
    may have loaded Mesa and glvnd's vendors already, which the device process would
    inherit instead of looking for them in its jail. Returns its one-line outcome."""
    res = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(__file__))
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and lines, res
    if lines[-1].startswith("skip: "):
        pytest.skip(lines[-1][6:])
    return lines[-1]


@pytest.mark.parametrize("case", JAILS)
def test_a_jail_where_virgl_cannot_start_fails_at_start_up(case):
    """Before: the device process started, and segfaulted on the guest's first 3D
    command (glvnd without vendors). Now: the ProxyDevice never comes up, and says why."""
    outcome = _start_in_a_fresh_process(case)
    why = JAILS[case][2]
    if why is None:
        assert outcome == "started"
        return
    assert outcome.startswith(f"device {NAME} failed to start: virtio-gpu "
                              f"backend=virglrenderer: {why}"), outcome
    assert outcome.endswith("use backend=2d"), outcome


def _main(case: str) -> None:
    """The fresh process of _start_in_a_fresh_process: prints started, skip: or why."""
    keep_bind, env, _ = JAILS[case]
    try:
        _start_jailed(keep_bind, env)
        print("started")
    except VmmError as e:
        print(e)
    except pytest.skip.Exception as e:
        print(f"skip: {e}")


def test_in_process_the_hook_initialises_virglrenderer_on_its_thread():
    gpu = create(_options(), SimpleNamespace(name=NAME, index=0, mem_size=8 << 20))
    try:
        assert gpu.renderer.lib is None             # the factory only probed
        gpu.on_device_sandboxed()
        assert gpu.renderer.lib is not None and gpu.renderer._thread.is_alive()
    finally:
        gpu.shutdown()


def vmm_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmcore.cli", "run", *args],
                          capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})


@needs_kvm
def test_two_virgl_gpus_in_one_process_fail_at_start_up():
    res = vmm_run("--disable-sandbox", "--gpu", "backend=virglrenderer",
                  "--gpu", "backend=virglrenderer")
    assert res.returncode == 1, res
    # virglrenderer itself prints "gl_version ..." on stderr while the first initialises
    assert res.stderr.splitlines()[-1] == (
        "vmm: error: device virtio_gpu1 failed to start: virtio-gpu backend=virglrenderer: "
        "another virgl GPU already uses virglrenderer in this process, which allows one per "
        "process (the sandbox gives each GPU its own: drop --disable-sandbox, or use "
        "backend=2d for the others)"), res.stderr


@needs_kvm
def test_vmm_run_on_a_host_without_egl_stops_naming_the_device():
    res = vmm_run("--gpu", "backend=virglrenderer",
                  env={"__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent"})
    assert res.returncode == 1, res
    assert res.stderr.startswith("vmm: error: device virtio_gpu0: virtio-gpu "
                                 "backend=virglrenderer: EGL has no surfaceless display")
    assert res.stderr.count("\n") == 1, res.stderr


if __name__ == "__main__":
    _main(sys.argv[1])
