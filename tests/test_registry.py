"""The plugin API's option schema and the entry-point registry (no pip, no KVM)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.plugin_env import device_spec_source, make_dist, unique

from vmmcore.plugin_api import (
    API_VERSION,
    Bool,
    Enum,
    Int,
    Option,
    OptionValueError,
    PluginSpec,
    Size,
    Str,
    api_compatible,
    format_size,
    load_factory,
)
from vmmcore.plugin_api import Path as PathOpt
from vmmcore.registry import Registry, canonical

# -- option schema ------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("yes", True),
                                        ("YES", True), ("false", False), ("0", False),
                                        ("no", False), ("No", False)])
def test_bool_spellings(text, value):
    assert Bool("ro").parse(text) is value


@pytest.mark.parametrize("text", ["maybe", "", "2", "on"])
def test_bool_rejects(text):
    with pytest.raises(OptionValueError, match=r"a bool \(true/false/1/0/yes/no\)"):
        Bool("ro").parse(text)


def test_int_bounds_and_prefixes():
    o = Int("n", default=1, min=1, max=8)
    assert o.parse("8") == 8
    assert o.parse("0x4") == 4
    for bad in ("0", "9", "x", "1.5", ""):
        with pytest.raises(OptionValueError, match="an int from 1 to 8"):
            o.parse(bad)
    assert Int("m").parse("-3") == -3
    assert Int("m").expected == "an int"
    assert Int("m", min=0).expected == "an int >= 0"
    assert Int("m", max=5).expected == "an int <= 5"


@pytest.mark.parametrize("text,value", [("512", 512), ("4K", 4096), ("4k", 4096),
                                        ("1M", 1 << 20), ("2G", 2 << 30), ("1T", 1 << 40),
                                        ("4KiB", 4096), ("8MB", 8 << 20), (" 64K ", 65536)])
def test_size_suffixes(text, value):
    assert Size("s").parse(text) == value


def test_size_rejects_and_bounds():
    o = Size("s", default=512, min=512, max=64 << 10)
    for bad in ("1.5K", "K", "4X", "-1", "", "128K", "256"):
        with pytest.raises(OptionValueError, match="a size"):
            o.parse(bad)
    assert "from 512 to 64K" in o.expected
    assert format_size(3 << 30) == "3G" and format_size(1536) == "1536"


def test_str_enum_path(tmp_path):
    assert Str("id").parse("a b") == "a b"
    e = Enum("mode", ("fast", "safe"))
    assert e.parse("fast") == "fast"
    with pytest.raises(OptionValueError, match="one of fast, safe"):
        e.parse("slow")
    p = PathOpt("log")
    assert p.parse("~/x") == Path.home() / "x"
    assert p.parse(str(tmp_path / "nope")) == tmp_path / "nope"     # need not exist
    must = PathOpt("img", must_exist=True)
    assert must.parse(str(tmp_path)) == tmp_path
    with pytest.raises(OptionValueError, match="an existing path; .* does not exist"):
        must.parse(str(tmp_path / "nope"))
    with pytest.raises(OptionValueError):
        p.parse("")


def test_schema_declaration_errors():
    with pytest.raises(ValueError, match="type 'float'"):
        Option("x", "float")
    with pytest.raises(ValueError, match="must match"):
        Option("Bad-Name", "str")
    with pytest.raises(ValueError, match="needs choices"):
        Option("x", "enum")
    with pytest.raises(OptionValueError):           # default outside its own bounds
        Int("x", default=0, min=1)
    with pytest.raises(ValueError, match="required option has no default"):
        Option("x", "str", default="a", required=True)
    with pytest.raises(ValueError, match="declared twice"):
        PluginSpec("p", "device", "1.0", "s", options=(Bool("a"), Bool("a")))
    with pytest.raises(ValueError, match="kind 'gadget'"):
        PluginSpec("p", "gadget", "1.0", "s")
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        PluginSpec("p", "device", "one", "s")
    with pytest.raises(ValueError, match="positional"):
        PluginSpec("p", "device", "1.0", "s", positional="path")
    with pytest.raises(ValueError, match="module:attribute"):
        PluginSpec("p", "device", "1.0", "s", factory="nocolon")


def test_describe_is_json_ready():
    d = Size("s", default=4096, min=512, help="h").describe()
    assert d == {"name": "s", "type": "size", "required": False, "default": 4096, "help": "h",
                 "expected": "a size (bytes, or with K/M/G/T suffix) >= 512", "min": 512}


def test_api_compatibility():
    major, minor = (int(x) for x in API_VERSION.split("."))
    assert api_compatible(API_VERSION)
    assert api_compatible(f"{major}.0")
    assert not api_compatible(f"{major}.{minor + 1}")
    assert not api_compatible(f"{major + 1}.0")
    assert api_compatible("1.2", "1.3") and not api_compatible("2.0", "1.9")


def test_load_factory_and_not_implemented():
    spec = PluginSpec("p", "device", "1.0", "s", factory="pathlib:PurePath.joinpath")
    from pathlib import PurePath

    assert load_factory(spec) is PurePath.joinpath
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        load_factory(PluginSpec("p", "device", "1.0", "s"))


def test_canonical_names():
    assert canonical(" Virtio-Blk ") == "virtio_blk"


# -- registry over made-up distributions ---------------------------------------------------


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def _device(site, name, options="()", dist=None, **kw):
    pkg = unique()
    make_dist(site, dist or f"dist-{pkg}", {"vmm.devices": {name: f"{pkg}.spec:PLUGIN"}},
              {f"{pkg}/__init__.py": "", f"{pkg}/spec.py": device_spec_source(name, options, **kw),
               f"{pkg}/dev.policy": "read: 1\n"})
    return pkg


def test_registry_loads_a_plugin_with_metadata(site):
    pkg = _device(site, "t_good", "(Int('n', default=2),)", dist="vmm-t-good")
    reg = Registry(fresh=True)
    assert "t_good" in reg.names("device")
    assert pkg + ".spec" not in sys.modules         # names() imports nothing
    rec = reg.get("device", "t-good")               # '-' and '_' are the same
    assert rec is not None and not rec.broken and rec.implemented
    assert rec.status == "ok" and rec.summary == "test plugin t_good"
    assert rec.policy_path == site / pkg / "dev.policy"
    [listed] = [r for r in reg.records(("device",)) if r.name == "t_good"]
    assert (listed.distribution, listed.version) == ("vmm-t-good", "1.0")
    j = listed.to_json(with_options=True)
    assert j["kind"] == "device" and j["api_version"] == "1.0" and j["options"][0]["name"] == "n"
    assert reg.get("device", "t_absent") is None


def test_registry_not_implemented(site):
    _device(site, "t_later", factory=None)
    rec = Registry(fresh=True).get("device", "t_later")
    assert not rec.broken and not rec.implemented and rec.status == "not implemented yet"


@pytest.mark.parametrize("kw,reason", [
    ({"api": "99.0"}, f"needs plugin API 99.0; this vmm provides {API_VERSION}"),
    ({"api": "1.99"}, f"needs plugin API 1.99; this vmm provides {API_VERSION}"),
    ({"policy": "'missing.policy'"}, "its seccomp policy file .*missing.policy is missing"),
    ({"policy": None}, "a device plugin must declare its seccomp policy file"),
    ({"kind": "display"}, "declares kind 'display' but it is in group vmm.devices"),
    ({"options": "(Int('n', default=0, min=1),)"}, "cannot be loaded: OptionValueError"),
])
def test_registry_marks_broken_plugins(site, kw, reason):
    options = kw.pop("options", "()")
    _device(site, "t_bad", options, **kw)
    rec = Registry(fresh=True).get("device", "t_bad")
    assert rec.broken and rec.status == "broken" and not rec.implemented
    assert rec.spec is None
    import re

    assert re.search(reason, rec.error), rec.error


def test_registry_survives_import_error_and_wrong_objects(site):
    pkg = unique()
    make_dist(site, "vmm-t-broken", {"vmm.devices": {
        "t_import": f"{pkg}.boom:PLUGIN", "t_dict": f"{pkg}.obj:PLUGIN",
        "t_attr": f"{pkg}.obj:MISSING", "t_named": f"{pkg}.named:PLUGIN"}},
        {f"{pkg}/__init__.py": "", f"{pkg}/boom.py": "raise RuntimeError('boom\\nsecond line')\n",
         f"{pkg}/obj.py": "PLUGIN = {}\n",
         f"{pkg}/named.py": device_spec_source("other_name"), f"{pkg}/dev.policy": ""})
    reg = Registry(fresh=True)
    recs = {r.name: r for r in reg.records(("device",))}
    assert recs["t_import"].error == "cannot be loaded: RuntimeError: boom"
    assert "gives dict, not a vmmcore.plugin_api.PluginSpec" in recs["t_dict"].error
    assert recs["t_attr"].error.startswith("cannot be loaded: AttributeError")
    assert "its spec is named 'other_name' but its entry point 't_named'" in recs["t_named"].error


def test_registry_accepts_a_callable_returning_a_spec(site):
    pkg = unique()
    make_dist(site, "vmm-t-call", {"vmm.devices": {"t_call": f"{pkg}.spec:get"}},
              {f"{pkg}/__init__.py": "", f"{pkg}/dev.policy": "",
               f"{pkg}/spec.py": device_spec_source("t_call") + "\ndef get():\n    return PLUGIN\n"})
    assert not Registry(fresh=True).get("device", "t_call").broken


def test_same_name_from_two_distributions_is_broken(site):
    _device(site, "t_twice", dist="vmm-t-one")
    _device(site, "t_twice", dist="vmm-t-two")
    rec = Registry(fresh=True).get("device", "t_twice")
    assert rec.broken and "provided by several entry points" in rec.error


def test_closest_names(site):
    _device(site, "t_virtio_thing")
    reg = Registry(fresh=True)
    assert "t_virtio_thing" in reg.closest("device", "t_virtio_thign")
    assert reg.closest("device", "zzzzzzzzzzzz") == []


# -- hook plugins ---------------------------------------------------------------------------


def _hooks(site, body):
    pkg = unique()
    make_dist(site, f"dist-{pkg}", {"vmm": {"t_hooks": f"{pkg}.hooks"}},
              {f"{pkg}/__init__.py": "", f"{pkg}/hooks.py": body})


def test_hook_plugin_is_registered_and_called(site):
    _hooks(site, """
        from vmmcore.plugin_api import hookimpl
        VMM_API_VERSION = "1.0"
        '''Adds a kernel parameter.'''

        @hookimpl
        def vmm_kernel_cmdline(config):
            return ["hooked=1"]
        """)
    reg = Registry(fresh=True)
    pm = reg.hook_manager()
    assert pm.hook.vmm_kernel_cmdline(config=None) == [["hooked=1"]]
    rec = reg.get("hooks", "t_hooks")
    assert rec.status == "ok" and rec.hooks == ("vmm_kernel_cmdline",)
    assert rec.to_json()["hooks"] == ["vmm_kernel_cmdline"]


@pytest.mark.parametrize("body,reason", [
    ("x = 1\n", "does not declare VMM_API_VERSION"),
    ("VMM_API_VERSION = '7.0'\n", "needs plugin API 7.0"),
    ("VMM_API_VERSION = 'new'\n", "is not MAJOR.MINOR"),
    ("from vmmcore.plugin_api import hookimpl\nVMM_API_VERSION = '1.0'\n"
     "@hookimpl\ndef vmm_bogus(vm):\n    pass\n", "implements unknown hook\\(s\\): vmm_bogus"),
    ("from vmmcore.plugin_api import hookimpl\nVMM_API_VERSION = '1.0'\n"
     "@hookimpl\ndef vmm_vm_started(vm, extra_arg):\n    pass\n", "PluginValidationError"),
])
def test_broken_hook_plugins(site, body, reason):
    _hooks(site, body)
    reg = Registry(fresh=True)
    recs = {r.name: r for r in reg.records(("hooks",))}
    import re

    assert recs["t_hooks"].broken and re.search(reason, recs["t_hooks"].error)
    assert "t_hooks" not in [n for n, _ in reg.hook_manager().list_name_plugin()]


# -- laziness --------------------------------------------------------------------------------


def test_help_imports_no_plugin_code_and_no_stevedore():
    code = ("import sys\nfrom vmmcore.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('vmm_', 'stevedore',"
            " 'pluggy', 'vmmcore.registry')))\n"
            "print('LOADED', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "LOADED []" in out, out


def test_run_help_loads_hook_plugins_only():
    """`vmm run --help` shows plugins' own options (vmm_cli_options), so it loads the hook
    plugins — but no device model, disk format or display (their factories)."""
    code = ("import sys\nfrom vmmcore.cli import main\n"
            "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = sorted(m for m in sys.modules if m.startswith('vmm_')"
            " and m.count('.') and not m.endswith(('.hooks', '.plugin')))\n"
            "print('LOADED', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "LOADED []" in out, out
    assert "--device NAME[:KEY=VALUE,...]" in out and "--rwdisk" in out
