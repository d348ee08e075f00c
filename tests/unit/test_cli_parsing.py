"""The command line's parsing: exit codes for bad usage, -c anywhere, aliases, did-you-mean,
`logs -n` counting lines as `tail -n` does, and a closed pipe ending the command quietly."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import pytest

from grenadine_sv.cli.main import (
    DEFAULT_LOG_LINES,
    EXIT_USAGE,
    build_parser,
    command_word,
    main,
)
from grenadine_sv.cli.tailing import start_of_last_lines


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_config_is_accepted_before_and_after_the_command() -> None:
    assert parse("-c", "a.toml", "status").config == "a.toml"
    assert parse("status", "-c", "b.toml", "web").config == "b.toml"
    assert parse("status", "web", "--config", "c.toml").config == "c.toml"
    assert parse("status").config is None


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "a.toml", "status", "web"],
        ["--config", "checkpoint", "restore", "web", "latest", "--force"],
        ["checkpoint", "--all", "--json"],
        ["tail", "-n", "3", "web"],
        ["update"],
        ["prune", "web", "--keep", "2"],
        [],
    ],
)
def test_the_parser_of_one_command_reads_it_as_the_whole_parser_does(argv: list[str]) -> None:
    assert build_parser(only=command_word(argv)).parse_args(argv) == parse(*argv)


def test_the_command_word_skips_the_configuration_option() -> None:
    assert command_word(["-c", "status", "stop", "x"]) == "stop"
    assert command_word(["--config", "a.toml"]) is None
    assert command_word(["--version"]) is None
    assert command_word(["--", "stop"]) is None
    assert command_word(["stauts"]) == "stauts"


def test_an_unknown_command_builds_every_command_for_its_suggestion() -> None:
    assert {"status", "checkpoint", "tail"} <= set(_commands(build_parser(only="stauts")))
    assert set(_commands(build_parser(only="tail"))) == {"logs", "tail"}


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    assert parser._subparsers is not None
    [sub] = parser._subparsers._group_actions
    assert isinstance(sub, argparse._SubParsersAction)
    return list(sub.choices)


def test_tail_is_logs_and_lines_default_to_tails(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("tail", "web")
    assert (args.command, args.lines) == ("tail", DEFAULT_LOG_LINES)
    with pytest.raises(SystemExit):
        parse("logs", "--help")
    assert f"(default: {DEFAULT_LOG_LINES})" in capsys.readouterr().out


def test_a_mistyped_command_gets_a_suggestion_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["stauts"]) == EXIT_USAGE
    assert "did you mean 'status'?" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["prune", "--keep", "-1"], ["logs", "web", "-n", "x"]])
def test_bad_counts_are_usage_errors(argv: list[str]) -> None:
    assert main(argv) == EXIT_USAGE


@pytest.mark.parametrize(
    ("content", "lines", "shown"),
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 2, b"b\nc"),
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 0, b""),
        (b"", 3, b""),
        (b"\n\n\n", 1, b"\n"),
        (b"x" * 200_000 + b"\nlast\n", 1, b"last\n"),
        (b"x" * 200_000 + b"\nlast\n", 2, b"x" * 200_000 + b"\nlast\n"),
    ],
)
def test_last_lines_are_counted_like_tail(content: bytes, lines: int, shown: bytes) -> None:
    file = io.BytesIO(content)
    assert content[start_of_last_lines(file, lines) :] == shown
    done = subprocess.run(
        ["tail", "-n", str(lines)], input=content, capture_output=True, check=True
    )
    assert done.stdout == shown


@pytest.mark.parametrize("command", [["schema"], ["doctor", "--json"]])
def test_a_closed_pipe_ends_the_command_without_a_traceback(command: list[str]) -> None:
    pipeline = subprocess.run(
        f"{sys.executable} -m grenadine_sv {' '.join(command)} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert pipeline.stdout.strip() == "{"
    assert pipeline.stderr == ""
