"""`home-agent --help` and each subcommand's help are written for users: an example per subcommand, every
--config names its default, and --exit-at-end says it covers stdin too."""

from __future__ import annotations

import argparse

import pytest

from agent.cli import build_parser

SUBCOMMANDS = ("run", "check-config", "action", "devices", "transcribe", "anomaly-score")


def subparser(name: str) -> argparse.ArgumentParser:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser: argparse.ArgumentParser = actions[0].choices[name]
    return parser


def test_top_level_help_has_an_example_of_every_subcommand() -> None:
    text = build_parser().format_help()
    assert "argument parsing only" not in text
    for name in SUBCOMMANDS:
        assert f"  home-agent {name}" in text, name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_help_shows_an_example(name: str) -> None:
    assert f"home-agent {name}" in subparser(name).format_help()


@pytest.mark.parametrize("name", ["run", "check-config", "action"])
def test_config_help_shows_its_default(name: str) -> None:
    text = " ".join(subparser(name).format_help().split())
    assert "--config CONFIG the agent's configuration file (default: /etc/home-agent/config.toml)" in text


def test_exit_at_end_help_covers_stdin() -> None:
    text = " ".join(subparser("run").format_help().split())
    assert "--exit-at-end with a file or stdin audio source" in text
