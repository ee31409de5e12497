"""Each command-line option is written once (issue 22): an options dataclass's fields are its command's
options (clients/cli_options.py), no field lacks an option and no option lacks a field, and `--help`
still lists every option with its help text and default."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from clip_triton.clients import cli as client_cli
from clip_triton.clients.cli import Connection
from clip_triton.exporter import cli
from clip_triton.exporter.build import BuildOptions, ExportOptions
from clip_triton.exporter.parity.run import ParityOptions
from clip_triton.exporter.stages.deploy import DeployOptions
from clip_triton.exporter.stages.repository import RepositoryOptions

# command: (its options dataclass, the parameters it takes besides that dataclass's fields)
COMMANDS: dict[str, tuple[type, set[str]]] = {
    "repository": (RepositoryOptions, {"export", "out", "force", "quiet"}),
    "deploy": (DeployOptions, {"repository", "out", "force", "quiet"}),
    "build": (BuildOptions, {"quiet"}),
    "export": (ExportOptions, {"out", "force", "quiet"}),
    "parity": (ParityOptions, {"export", "repository", "url", "out", "report", "markdown", "ort_providers",
                               "check_runtime", "quiet"}),
    "embed": (Connection, {"images", "text", "out", "shard_size", "json_out", "skip_invalid", "quiet"}),
    "classify": (Connection, {"images", "labels", "top", "template", "json_out", "quiet"}),
    "search": (Connection, {"images", "query", "top", "no_cache", "json_out", "skip_invalid", "quiet"}),
}
runner = CliRunner()


def _params(command: str) -> dict[str, Any]:
    group = typer.main.get_command(cli.app)
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_is_an_option_and_every_option_a_field(command: str) -> None:
    cls, others = COMMANDS[command]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    params = _params(command)
    missing = fields.keys() - params.keys()
    assert not missing, f"{cls.__name__} fields without a `{command}` option: {missing}"
    assert params.keys() - fields.keys() == others, f"`{command}` options that are no {cls.__name__} field"
    for name, field in fields.items():  # the option is the field's declaration: help, default
        param = params[name]
        assert param.help == field.metadata["help"], name
        default = None if field.default is dataclasses.MISSING else field.default
        assert param.default == default and param.required == (name == "out"), name  # --model: check_source


def test_build_shares_the_export_parity_and_repository_declarations() -> None:
    build = {f.name: f for f in dataclasses.fields(BuildOptions)}
    for cls in (ExportOptions, ParityOptions):
        for field in dataclasses.fields(cls):
            assert build[field.name].metadata == field.metadata and build[field.name].default == field.default
    # Every repository option is build's too, declared once (issue 27: --triton-release, --min-driver, ...);
    # build's --runtime may be auto and its --max-batch is the export's.
    for field in dataclasses.fields(RepositoryOptions):
        if field.name not in ("runtime", "max_batch"):
            assert build[field.name].metadata == field.metadata and build[field.name].default == field.default
    assert {"triton_release", "min_driver", "python_deps", "device"} <= build.keys()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_option(command: str) -> None:
    result = runner.invoke(cli.app, [command, "--help"], terminal_width=250, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for param in _params(command).values():
        for flag in (*param.opts, *param.secondary_opts):
            if flag.startswith("-"):
                assert flag in result.output, f"`{command} --help` lacks {flag}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # node_selector is a default_factory field: absent, it is the factory's [] (the option's None)
        (["deploy", "--repository", "r", "--pvc", "m"], DeployOptions(pvc="m")),
        (
            ["deploy", "--repository", "r", "--pvc", "m", "--node-selector", "a=b", "--cpu", "--gpu-count", "2"],
            DeployOptions(pvc="m", node_selector=["a=b"], cpu=True, gpu_count=2),
        ),
        (["repository", "--export", "e"], RepositoryOptions()),
        (
            ["repository", "--export", "e", "--no-dynamic-batching", "--max-chars", "9"],
            RepositoryOptions(dynamic_batching=False, max_chars=9),
        ),
        (
            ["build", "--model", "M", "--random-weights", "--samples", "3", "--precision", "fp16"],
            BuildOptions(model="M", out=Path("o"), random_weights=True, samples=3, precision="fp16"),
        ),
    ],
)
def test_the_command_receives_the_dataclass(monkeypatch: pytest.MonkeyPatch, args: list[str], expected: Any) -> None:
    seen = []
    monkeypatch.setattr(cli, "write_deploy", lambda repo, out, opts, **kw: seen.append(opts))
    monkeypatch.setattr(cli, "write_repository", lambda export, out, opts, **kw: seen.append(opts))
    monkeypatch.setattr(cli, "run_build", lambda opts, **kw: seen.append(opts))
    result = runner.invoke(cli.app, [*args, "--out", "o"])
    assert result.exit_code == 0, result.output
    assert seen == [expected]


def test_client_commands_build_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    class Built(Exception):
        pass

    def client(self: Connection) -> None:
        raise Built(self)

    monkeypatch.setattr(client_cli.Connection, "client", client)
    result = runner.invoke(
        cli.app, ["embed", "--text", "hi", "--url", "h:1", "--header", "k=v", "--ssl", "--batch-size", "4"]
    )
    assert isinstance(result.exception, Built), result.output
    assert result.exception.args[0] == Connection(url="h:1", header=["k=v"], ssl=True, batch_size=4)
