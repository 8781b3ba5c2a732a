"""`vmm plugins list/info` and `vmm run --device` against plugins installed with pip.

The fixture distributions in tests/fixtures are pip-installed into the running
interpreter's environment (and uninstalled afterwards), as a user installs a third-party
plugin; every check runs the real CLI in a subprocess, so nothing is cached in-process.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fixtures.plugin_env import BROKEN, THIRDPARTY, pip_installed

from vmmcore.plugin_api import API_VERSION

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())


def vmm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "vmmcore.cli", *args], capture_output=True,
                         text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"vmm {' '.join(args)} -> {res.returncode}\n{res.stderr}")
    return res


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    with pip_installed(THIRDPARTY, BROKEN, workdir=tmp_path_factory.mktemp("pip")):
        yield


@pytest.fixture(scope="module")
def listing(installed):
    return {(p["kind"], p["name"]): p for p in json.loads(vmm("plugins", "list", "--json").stdout)}


def test_pip_installed_plugin_is_listed(listing):
    p = listing[("device", "fixture_echo")]
    assert p["status"] == "ok" and p["implemented"] and p["error"] is None
    assert (p["distribution"], p["version"], p["api_version"]) == (
        "vmm-fixture-thirdparty", "2.3.4", "1.0")
    assert p["policy"].endswith("fixture_echo.policy") and Path(p["policy"]).is_file()
    assert p["summary"] == "test fixture: echoes what it is given"
    h = listing[("hooks", "fixture_hooks")]
    assert h["status"] == "ok" and h["hooks"] == ["vmm_kernel_cmdline"]


@pytest.mark.parametrize("kind,name,reason", [
    ("device", "fixture_broken_import",
     "cannot be loaded: ModuleNotFoundError: No module named 'vmm_fixture_no_such_module'"),
    ("device", "fixture_broken_api",
     f"needs plugin API 99.0; this vmm provides {API_VERSION}"),
    ("device", "fixture_not_a_spec",
     "entry point vmm_fixture_broken.not_a_spec:PLUGIN gives dict, not a "
     "vmmcore.plugin_api.PluginSpec"),
    ("hooks", "fixture_broken_hooks", "implements unknown hook(s): vmm_no_such_hook"),
])
def test_broken_fixture_plugins_are_listed_as_broken(listing, kind, name, reason):
    p = listing[(kind, name)]
    assert p["status"] == "broken" and not p["implemented"]
    assert p["error"] == reason
    assert p["distribution"] == "vmm-fixture-broken"


def test_table_and_help_survive_broken_plugins(installed):
    out = vmm("plugins", "list").stdout
    header, *rows = out.splitlines()
    assert header.split()[:6] == ["NAME", "KIND", "VERSION", "DISTRIBUTION", "STATUS", "POLICY"]
    row = next(r for r in rows if r.startswith("fixture_echo "))
    assert row.split()[:6] == ["fixture_echo", "device", "2.3.4", "vmm-fixture-thirdparty",
                               "ok", "fixture_echo.policy"]
    row = next(r for r in rows if r.startswith("fixture_broken_import "))
    assert "broken" in row and "ModuleNotFoundError" in row
    assert "plugins" in vmm("--help").stdout
    devices_only = json.loads(vmm("plugins", "list", "--json", "--kind", "device").stdout)
    assert {p["kind"] for p in devices_only} == {"device"}


def test_info_lists_every_option(installed):
    out = vmm("plugins", "info", "fixture_echo").stdout
    assert "fixture_echo: device plugin from vmm-fixture-thirdparty 2.3.4" in out
    assert "status:       ok" in out
    for name, typ, default in [("tag", "str", "(required)"), ("loud", "bool", "false"),
                               ("count", "int", "1"), ("buffer", "size", "4K"),
                               ("log", "path", "-"), ("mode", "enum", "safe")]:
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert line.split()[1:3] == [typ, default], line
    assert "An int from 1 to 8. [an int from 1 to 8]" in out
    data = json.loads(vmm("plugins", "info", "fixture-echo", "--json").stdout)
    assert [o["name"] for o in data["options"]] == [
        "tag", "loud", "count", "buffer", "log", "image", "mode"]
    assert data["options"][6]["choices"] == ["fast", "safe"]
    broken = vmm("plugins", "info", "fixture_broken_api").stdout
    assert "status:       broken: needs plugin API 99.0" in broken


def test_info_unknown_name(installed):
    res = vmm("plugins", "info", "fixture_ecco", check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("vmm: error: no plugin named 'fixture_ecco' "
                                 "(closest installed: fixture_echo")
    assert res.stderr.count("\n") == 1


def test_pip_installed_plugin_is_selectable(installed, tmp_path):
    code = ("from vmmcore.device_options import DeviceArgs, collect_devices\n"
            "[d] = collect_devices(DeviceArgs([('--device', "
            f"'fixture_echo:tag=hi,buffer=1M,image={tmp_path},mode=fast')]))\n"
            "print(d.name, d.options['buffer'], d.options['mode'], d.options['image'])\n"
            "from vmmcore.registry import get_registry\n"
            "print(get_registry().hook_manager().hook.vmm_kernel_cmdline(config=None))\n")
    res = python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"fixture_echo 1048576 fast {tmp_path}", "[['fixture=1']]"]


@pytest.mark.parametrize("args,message", [
    (["--device", "fixture_ecoh:tag=a"],
     "unknown device 'fixture_ecoh' (closest installed: fixture_echo"),
    (["--device", "fixture_echo:tag=a,volume=11"],
     "--device fixture_echo: unknown option 'volume' (valid options: buffer, count, image, "
     "log, loud, mode, tag)"),
    (["--device", "fixture_echo:tag=a,count=10"],
     "--device fixture_echo: count='10' is not valid: expected an int from 1 to 8"),
    (["--device", "fixture_echo:loud=1"],
     "--device fixture_echo: missing required option 'tag' (tag=VALUE, a string)"),
    (["--device", "fixture_broken_api"],
     "--device fixture_broken_api: the plugin is broken: needs plugin API 99.0; "
     f"this vmm provides {API_VERSION}"),
    (["--device", "fixture_broken_import"],
     "--device fixture_broken_import: the plugin is broken: cannot be loaded: "
     "ModuleNotFoundError"),
])
def test_vmm_run_rejects_with_one_line_and_status_2(installed, args, message):
    res = vmm("run", *args, check=False)
    assert res.returncode == 2, res
    assert res.stdout == "" and res.stderr.count("\n") == 1
    assert res.stderr.startswith("vmm: error: " + message), res.stderr


# -- the plugins in plugins/ -------------------------------------------------------------------


def _meta(plugin_dir: Path) -> tuple[str, str, str, str]:
    project = tomllib.loads((plugin_dir / "pyproject.toml").read_text())["project"]
    # one named driver; a plugin may also have lifecycle hooks in the "vmm" group
    [(group, eps)] = [(g, e) for g, e in project["entry-points"].items() if g != "vmm"]
    [name] = eps
    return project["name"], project["version"], group, name


@pytest.mark.parametrize("plugin_dir", PLUGINS, ids=[p.name for p in PLUGINS])
def test_every_plugin_in_the_tree_is_listed(plugin_dir, listing):
    dist, version, group, name = _meta(plugin_dir)
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (scripts/dev-install installs every plugin)")
    kind = {"vmm.devices": "device", "vmm.disk_formats": "disk_format",
            "vmm.displays": "display"}[group]
    p = listing[(kind, name)]
    assert (p["distribution"], p["version"]) == (dist, version)
    assert p["status"] in ("ok", "not implemented yet"), p["error"]
    assert p["policy"] and Path(p["policy"]).is_file()


def test_plugin_layout():
    """Each plugin is its own distribution: pyproject, package vmm_NAME, policy, README, tests."""
    assert {p.name for p in PLUGINS} >= {"virtio_rng", "virtio_blk", "raw", "qcow2",
                                          "virtio_gpu", "virtio_wl", "display_headless"}
    for p in PLUGINS:
        pkg = p / f"vmm_{p.name}"
        assert (pkg / "__init__.py").is_file() and (pkg / "plugin.py").is_file(), p
        assert list(pkg.glob("*.policy")), p
        assert (p / "README.md").is_file() and list((p / "tests").glob("test_*.py")), p
