"""The vmm_cli_options hook: plugins add `vmm run` options without loading on `vmm --help`."""

import click
from click.testing import CliRunner

from vmmcore import cli
from vmmcore.errors import ConfigError
from vmmcore.hookspecs import hookimpl
from vmmcore.registry import get_registry


class GreetingPlugin:
    def __init__(self) -> None:
        self.seen: dict = {}
        self.asked = 0

    @hookimpl
    def vmm_cli_options(self, command):
        self.asked += 1
        return [click.Option(["--greeting"], default="none", help="A plugin's option."),
                click.Option(["--cpus"], help="clashes with the core's -c/--cpus")]

    @hookimpl
    def vmm_configure(self, config):
        self.seen.update(config.plugin_options)
        raise ConfigError("stop here")      # before KVM: this test is about options


def test_plugin_options_reach_the_config_and_help_stays_plugin_free(monkeypatch):
    pm = get_registry().hook_manager()
    plugin = GreetingPlugin()
    pm.register(plugin)
    monkeypatch.setattr(cli.run, "params", list(cli.run.params))
    monkeypatch.setattr(cli.run, "_plugin_options_added", False, raising=False)
    try:
        runner = CliRunner()
        assert runner.invoke(cli.main, ["--help"]).exit_code == 0
        assert plugin.asked == 0
        result = runner.invoke(cli.main, ["run", "--help"])
        assert "--greeting" in result.output and plugin.asked == 1
        runner.invoke(cli.main, ["run", "--greeting", "hello"])
        assert plugin.seen == {"greeting": "hello"}
        assert plugin.asked == 1            # added once per process
    finally:
        pm.unregister(plugin)
