"""--device NAME:key=value and crosvm's spellings: parsing, mapping, every error message.

The registry here is built from PluginSpecs in memory, so these tests need no installed
plugin; tests/test_plugins_cli.py covers plugins installed with pip.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import vmmcore.registry as registry_mod
from vmmcore.cli import main
from vmmcore.config import DeviceConfig
from vmmcore.device_options import DeviceArgs, collect_devices, device_options, split_pairs
from vmmcore.errors import ConfigError
from vmmcore.plugin_api import Bool, Enum, Int, PluginSpec, Size, Str
from vmmcore.plugin_api import Path as PathOpt
from vmmcore.registry import PluginRecord, canonical


class FakeRegistry:
    """The part of vmmcore.registry.Registry that device_options uses, from specs."""

    def __init__(self, *records: PluginRecord) -> None:
        self.records = {r.name: r for r in records}

    def get(self, kind, name):
        return self.records.get(canonical(name)) if kind == "device" else None

    def names(self, kind):
        return sorted(self.records) if kind == "device" else []

    def closest(self, kind, name, n=3):
        import difflib

        return difflib.get_close_matches(canonical(name), self.names(kind), n=n, cutoff=0.5)

    def fill_distributions(self, records):
        pass

    def hook_manager(self):
        """No hook plugins: a bare manager with the core's hook specifications."""
        import pluggy

        from vmmcore import hookspecs

        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        return pm


def rec(spec: PluginSpec | None = None, name: str | None = None, error: str | None = None):
    return PluginRecord(name=name or spec.name, kind="device", group="vmm.devices",
                        target="x:PLUGIN", distribution="vmm-x", version="9.9",
                        spec=None if error else spec, error=error)


def _no_odd(options):
    if options["count"] == 3:
        raise ValueError("count=3 is unlucky")


ECHO = PluginSpec("echo", "device", "1.0", "echo", factory="x:Y", validate=_no_odd, options=(
    Str("tag", required=True, help="t"), Bool("loud"), Int("count", default=1, min=1, max=8),
    Size("buffer", default=4096, min=512, max=1 << 20), PathOpt("log"),
    PathOpt("image", must_exist=True), Enum("mode", ("fast", "safe"), default="safe")))
BLK = PluginSpec("virtio_blk", "device", "1.0", "blk", factory="x:Y", positional="path",
                 options=(PathOpt("path", required=True, must_exist=True), Bool("ro"),
                          Size("block_size", default=512, min=512)))
GPU = PluginSpec("virtio_gpu", "device", "1.0", "gpu", factory="x:Y", options=(
    Int("width", default=1280, min=1), Int("height", default=1024, min=1),
    Bool("window_keyboard"), Bool("window_mouse")))
LATER = PluginSpec("later", "device", "1.0", "not yet", options=(Int("n", default=1),))


@pytest.fixture
def reg():
    return FakeRegistry(rec(ECHO), rec(BLK), rec(GPU), rec(LATER),
                        rec(name="wreck", error="cannot be loaded: ImportError: no libfoo"))


def collect(reg, *items, keyboard=False, mouse=False, **kw):
    pairs = [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
    return collect_devices(DeviceArgs(pairs, keyboard, mouse), registry=reg, **kw)


def err(reg, *items, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        collect(reg, *items, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- splitting --------------------------------------------------------------------------------


def test_split_pairs():
    assert split_pairs("a=1,b=x=y,c", "w") == [("a", "1"), ("b", "x=y"), ("c", None)]
    assert split_pairs('path="a,b.img",id=\\x', "w") == [("path", "a,b.img"), ("id", "\\x")]
    assert split_pairs('a="say \\"hi\\""', "w") == [("a", 'say "hi"')]
    assert split_pairs("", "w") == []
    assert split_pairs("a=", "w") == [("a", "")]
    with pytest.raises(ConfigError, match=r"^w: empty item in 'a=1,,b=2' \(expected key=value,...\)$"):
        split_pairs("a=1,,b=2", "w")
    with pytest.raises(ConfigError, match="^w: unterminated quote in"):
        split_pairs('a="x', "w")


# -- --device ---------------------------------------------------------------------------------


def test_device_with_every_type(reg, tmp_path):
    [d] = collect(reg, "--device", f"echo:tag=t1,loud=yes,count=0x8,buffer=64K,log=~/l,"
                                   f"image={tmp_path},mode=fast")
    assert d == DeviceConfig("echo", {"tag": "t1", "loud": True, "count": 8, "buffer": 65536,
                                      "log": Path.home() / "l", "image": tmp_path,
                                      "mode": "fast"})


def test_device_defaults_and_name_spelling(reg):
    [d] = collect(reg, "--device", "Echo:tag=x")
    assert d.name == "echo"
    assert d.options == {"tag": "x", "loud": False, "count": 1, "buffer": 4096, "log": None,
                         "image": None, "mode": "safe"}
    [d] = collect(reg, "--device", "echo:tag=x,loud")          # a bare bool key is true
    assert d.options["loud"] is True


def test_unknown_device_lists_closest(reg):
    assert err(reg, "--device", "ecoh") == (
        "unknown device 'ecoh' (closest installed: echo); see `vmm plugins list`")
    assert err(reg, "--device", "qqqqqqqq") == (
        "unknown device 'qqqqqqqq' (installed devices: echo, later, virtio_blk, virtio_gpu, "
        "wreck); see `vmm plugins list`")
    assert err(FakeRegistry(), "--device", "x") == (
        "unknown device 'x' (installed devices: none); see `vmm plugins list`")


def test_unknown_key_lists_valid_keys(reg):
    assert err(reg, "--device", "echo:tag=1,colour=red") == (
        "--device echo: unknown option 'colour' "
        "(valid options: buffer, count, image, log, loud, mode, tag)")
    assert err(reg, "--device", "echo:=3").startswith("--device echo: empty option name")


@pytest.mark.parametrize("item,expected", [
    ("loud=maybe", "loud='maybe' is not valid: expected a bool (true/false/1/0/yes/no)"),
    ("count=many", "count='many' is not valid: expected an int from 1 to 8"),
    ("count=9", "count='9' is not valid: expected an int from 1 to 8"),
    ("buffer=4X", "buffer='4X' is not valid: expected a size (bytes, or with K/M/G/T suffix) "
                  "from 512 to 1M"),
    ("buffer=2M", "buffer='2M' is not valid: expected a size (bytes, or with K/M/G/T suffix) "
                  "from 512 to 1M"),
    ("mode=slow", "mode='slow' is not valid: expected one of fast, safe"),
    ("image=/no/such/file", "image='/no/such/file' is not valid: expected an existing path; "
                            "/no/such/file does not exist"),
    ("log=", "log='' is not valid: expected a path"),
])
def test_bad_values_name_the_expected_type(reg, item, expected):
    assert err(reg, "--device", f"echo:tag=t,{item}") == f"--device echo: {expected}"


def test_missing_required_duplicate_and_valueless(reg):
    assert err(reg, "--device", "echo") == (
        "--device echo: missing required option 'tag' (tag=VALUE, a string)")
    assert err(reg, "--device", "echo:tag=a,tag=b") == "--device echo: option 'tag' given twice"
    assert err(reg, "--device", "echo:tag") == (
        "--device echo: option 'tag' needs a value (tag=VALUE, a string)")
    assert err(reg, "--device", ":tag=a") == "--device ':tag=a': expected NAME[:key=value,...]"


def test_plugin_validate_hook(reg):
    assert err(reg, "--device", "echo:tag=a,count=3") == "--device echo: count=3 is unlucky"


def test_broken_plugin(reg):
    assert err(reg, "--device", "wreck") == (
        "--device wreck: the plugin is broken: cannot be loaded: ImportError: no libfoo")


def test_not_implemented_yet_comes_after_validation(reg):
    assert err(reg, "--device", "later:n=x") == (
        "--device later: n='x' is not valid: expected an int")
    assert err(reg, "--device", "later") == (
        "device later (plugin vmm-x 9.9) is not implemented yet: its options are known but "
        "its device model is still to come")
    [d] = collect(reg, "--device", "later:n=4", require_implemented=False)
    assert d.options == {"n": 4}


# -- crosvm spellings ------------------------------------------------------------------------


def test_block_disk_rwdisk(reg, tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 512)
    devs = collect(reg, "--block", f"path={img},ro=true", "--block", f"{img},block_size=4K",
                   "--disk", str(img), "--rwdisk", f"{img},block_size=1K")
    assert [d.name for d in devs] == ["virtio_blk"] * 4
    assert [d.options["ro"] for d in devs] == [True, False, True, False]
    assert [d.options["block_size"] for d in devs] == [512, 4096, 512, 1024]
    assert all(d.options["path"] == img for d in devs)


def test_block_errors(reg, tmp_path):
    assert err(reg, "--block", "ro=true") == (
        "--block: missing required option 'path' (path=VALUE, an existing path)")
    assert err(reg, "--disk", f"{tmp_path},ro=false") == (
        "--disk: option 'ro' is set by --disk itself; use --block to choose it")
    assert err(reg, "--rwdisk", f"{tmp_path},ro") == (
        "--rwdisk: option 'ro' is set by --rwdisk itself; use --block to choose it")
    assert err(reg, "--disk", "path=x") == "--disk 'path=x': expected PATH[,key=value,...]"
    assert err(reg, "--disk", "/no/disk") == (
        "--disk: path='/no/disk' is not valid: expected an existing path; "
        "/no/disk does not exist")
    assert err(reg, "--block", f"{tmp_path},bogus=1") == (
        "--block: unknown option 'bogus' (valid options: block_size, path, ro)")


def test_gpu_and_display_window_flags(reg):
    [g] = collect(reg, "--gpu", "width=800,height=600")
    assert g == DeviceConfig("virtio_gpu", {"width": 800, "height": 600,
                                            "window_keyboard": False, "window_mouse": False})
    [g] = collect(reg, "--gpu", "width=800", keyboard=True, mouse=True)
    assert g.options["window_keyboard"] and g.options["window_mouse"]
    [g] = collect(reg, "--device", "virtio-gpu", keyboard=True)
    assert g.options["window_keyboard"] and not g.options["window_mouse"]
    assert err(reg, keyboard=True) == (
        "--display-window-keyboard needs a GPU: add --gpu (or --device virtio_gpu)")
    assert err(reg, mouse=True) == (
        "--display-window-mouse needs a GPU: add --gpu (or --device virtio_gpu)")
    assert err(reg, "--gpu", "width=0") == (
        "--gpu: width='0' is not valid: expected an int >= 1")


def test_spelling_without_its_plugin():
    assert err(FakeRegistry(), "--gpu", "width=1") == (
        "--gpu needs the virtio_gpu device plugin, which is not installed "
        "(see `vmm plugins list`)")


# -- the click decorator ------------------------------------------------------------------------


@click.command()
@click.option("-x", is_flag=True)
@device_options
def probe(x, device_args):
    click.echo(repr(device_args))


def test_decorator_keeps_command_line_order():
    res = CliRunner().invoke(probe, ["--rwdisk", "a", "--device", "d1", "--disk", "b",
                                     "--gpu", "width=1", "--block", "c", "--device", "d2",
                                     "--display-window-mouse"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == repr(DeviceArgs(
        [("--rwdisk", "a"), ("--device", "d1"), ("--disk", "b"), ("--gpu", "width=1"),
         ("--block", "c"), ("--device", "d2")], False, True))


def test_decorator_with_no_device_options():
    res = CliRunner().invoke(probe, ["-x"])
    assert res.output.strip() == repr(DeviceArgs([], False, False))


# -- through `vmm run`: one line, exit status 2, nothing started ---------------------------------


def test_vmm_run_reports_device_errors_with_status_2(reg, monkeypatch):
    monkeypatch.setattr(registry_mod, "_default", reg)
    started = []
    # `vmm run` imports vmmcore.vm_runner only after validation: a stand-in records
    # whether anything would have started.
    fake = types.ModuleType("vmmcore.vm_runner")
    fake.run_vm = lambda config: started.append(config) or 0
    monkeypatch.setitem(sys.modules, "vmmcore.vm_runner", fake)
    runner = CliRunner()
    for args, message in [
        (["--device", "ecoh"], "unknown device 'ecoh' (closest installed: echo)"),
        (["--device", "echo:tag=a,colour=red"], "unknown option 'colour'"),
        (["--device", "echo:tag=a,count=x"], "expected an int from 1 to 8"),
        (["--device", "echo"], "missing required option 'tag'"),
        (["--device", "later"], "is not implemented yet"),
        (["--display-window-mouse"], "needs a GPU"),
    ]:
        res = runner.invoke(main, ["run", *args])
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmm: error: ") and message in lines[0]
    assert started == []
    res = runner.invoke(main, ["run", "--device", "echo:tag=ok", "--gpu", "width=640"])
    assert res.exit_code == 0, res.output
    assert [d.name for d in started[0].devices] == ["echo", "virtio_gpu"]
