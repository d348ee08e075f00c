"""Invalid configurations: every problem names its file, its key path, and what was expected."""

import math
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grenadine_sv.config.loading import Config, ConfigError, load_config

MAIN = "grenadine.toml"
INCLUDE_CONF_D = '[supervisor]\ninclude = ["conf.d/*.toml"]\n'


def load_error(tmp_path: Path, files: dict[str, str]) -> ConfigError:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as caught:
        load_config(MAIN)
    return caught.value


def one_program(body: str, name: str = "a") -> dict[str, str]:
    return {MAIN: f'[programs.{name}]\ncommand = "/bin/true"\n' + textwrap.dedent(body)}


INVALID = {
    "unknown key with a suggestion": (
        one_program("startsec = 1\n"),
        ['grenadine.toml: programs.a.startsec: unknown key, did you mean "startsecs"?'],
    ),
    "unknown key without a suggestion": (
        one_program("frobnicate = 1\n"),
        ["grenadine.toml: programs.a.frobnicate: unknown key"],
    ),
    "unknown top-level table": (
        {MAIN: '[program.a]\ncommand = "x"\n'},
        ['grenadine.toml: program: unknown key, did you mean "programs"?'],
    ),
    "unknown supervisor key": (
        {MAIN: '[supervisor]\nstatedir = "/x"\n'},
        ['grenadine.toml: supervisor.statedir: unknown key, did you mean "state_dir"?'],
    ),
    "unknown checkpoint key": (
        one_program("checkpoint = { keeep = 2 }\n"),
        ['grenadine.toml: programs.a.checkpoint.keeep: unknown key, did you mean "keep"?'],
    ),
    "users may not set source": (
        one_program('source = "/etc/x.toml"\n'),
        ["grenadine.toml: programs.a.source: unknown key"],
    ),
    "users may not set name": (
        one_program('name = "b"\n'),
        ["grenadine.toml: programs.a.name: unknown key"],
    ),
    "bad duration in an included file": (
        {
            MAIN: INCLUDE_CONF_D,
            "conf.d/memcached.toml": '[programs.memcached]\ncommand = "x"\nstartsecs = "soon"\n',
        },
        [
            "conf.d/memcached.toml: programs.memcached.startsecs: expected a duration such as"
            ' "10s" or a number of seconds, got "soon"'
        ],
    ),
    "negative duration": (
        one_program("startsecs = -1\n"),
        ["grenadine.toml: programs.a.startsecs: expected a duration", "got -1"],
    ),
    "zero stopwaitsecs": (
        one_program("stopwaitsecs = 0\n"),
        ["grenadine.toml: programs.a.stopwaitsecs: expected a duration greater than zero"],
    ),
    "bad autorestart": (
        one_program('autorestart = "sometimes"\n'),
        [
            'grenadine.toml: programs.a.autorestart: expected "always", "on-failure" or'
            ' "never", got "sometimes"'
        ],
    ),
    "bad restore_mode": (
        one_program('restore_mode = "postcopy"\n'),
        ['grenadine.toml: programs.a.restore_mode: expected "eager" or "lazy", got "postcopy"'],
    ),
    "empty command list": (
        {MAIN: "[programs.a]\ncommand = []\n"},
        ["grenadine.toml: programs.a.command: expected a non-empty command, got []"],
    ),
    "empty command string": (
        {MAIN: '[programs.a]\ncommand = "  "\n'},
        ['grenadine.toml: programs.a.command: expected a non-empty command, got "  "'],
    ),
    "unbalanced quote in command": (
        {MAIN: '[programs.a]\ncommand = "echo \'hi"\n'},
        ["grenadine.toml: programs.a.command: expected a command line that can be split"],
    ),
    "command argument not a string": (
        {MAIN: '[programs.a]\ncommand = ["/bin/echo", 3]\n'},
        ["grenadine.toml: programs.a.command[1]: expected a string, got 3"],
    ),
    "missing command": (
        {MAIN: "[programs.a]\nautostart = false\n"},
        ["grenadine.toml: programs.a.command: required key is missing"],
    ),
    "program name with ..": (
        {MAIN: '[programs."../x"]\ncommand = "x"\n'},
        ['grenadine.toml: programs."../x": expected a program name', 'got "../x"'],
    ),
    "program name with a slash": (
        {MAIN: '[programs."a/b"]\ncommand = "x"\n'},
        ['grenadine.toml: programs."a/b": expected a program name', 'got "a/b"'],
    ),
    "restore id escaping the image store": (
        one_program('restore = "../../etc"\n'),
        [
            'grenadine.toml: programs.a.restore: expected an image id (hex digits and "-") or'
            ' "latest", got "../../etc"'
        ],
    ),
    "unknown dependency": (
        {MAIN: '[programs.web]\ncommand = "x"\ndepends_on = ["dbb"]\n[programs.db]\ncommand="x"'},
        [
            'grenadine.toml: programs.web.depends_on: expected names of defined programs, got "dbb"'
            ' (no such program, did you mean "db"?)'
        ],
    ),
    "self dependency": (
        one_program('depends_on = ["a"]\n'),
        ['grenadine.toml: programs.a.depends_on: expected names of other programs, got "a"'],
    ),
    "dependency cycle": (
        {
            MAIN: """
            [programs.c]
            command = "x"
            depends_on = ["a"]
            [programs.b]
            command = "x"
            depends_on = ["c"]
            [programs.a]
            command = "x"
            depends_on = ["b"]
            """
        },
        [
            "grenadine.toml: programs.a.depends_on: expected no dependency cycle,"
            " got a -> b -> c -> a"
        ],
    ),
    "dependency cycle across files": (
        {
            MAIN: INCLUDE_CONF_D + '[programs.a]\ncommand = "x"\ndepends_on = ["b"]\n',
            "conf.d/b.toml": '[programs.b]\ncommand = "x"\ndepends_on = ["a"]\n',
        },
        ["grenadine.toml: programs.a.depends_on: expected no dependency cycle, got a -> b -> a"],
    ),
    "program defined in two files": (
        {
            MAIN: INCLUDE_CONF_D,
            "conf.d/one.toml": '[programs.x]\ncommand = "x"\n',
            "conf.d/two.toml": '[programs.x]\ncommand = "y"\n',
        },
        ['conf.d/two.toml: programs.x: program "x" is already defined in conf.d/one.toml'],
    ),
    "supervisor table in an included file": (
        {
            MAIN: INCLUDE_CONF_D,
            "conf.d/one.toml": '[supervisor]\nlog_dir = "/x"\n[programs.x]\ncommand = "x"\n',
        },
        ["conf.d/one.toml: supervisor: expected only [programs.*] tables", "grenadine.toml"],
    ),
    "metrics listen without a port": (
        {MAIN: '[supervisor.metrics]\nlisten = "localhost"\n'},
        ['grenadine.toml: supervisor.metrics.listen: expected "host:port"', 'got "localhost"'],
    ),
    "metrics listen with port out of range": (
        {MAIN: '[supervisor.metrics]\nlisten = "127.0.0.1:70000"\n'},
        ["grenadine.toml: supervisor.metrics.listen: expected", 'got "127.0.0.1:70000"'],
    ),
    "metrics listen with an unbracketed IPv6 address": (
        {MAIN: '[supervisor.metrics]\nlisten = "::1:9847"\n'},
        ["grenadine.toml: supervisor.metrics.listen: expected", 'got "::1:9847"'],
    ),
    "bad signal name": (
        one_program('stopsignal = "SIGFOO"\n'),
        ["grenadine.toml: programs.a.stopsignal: expected a signal name", 'got "SIGFOO"'],
    ),
    "bad signal number": (
        one_program("stopsignal = 0\n"),
        ["grenadine.toml: programs.a.stopsignal: expected a signal name", "got 0"],
    ),
    "negative startretries": (
        one_program("startretries = -1\n"),
        ["grenadine.toml: programs.a.startretries: expected a value >= 0, got -1"],
    ),
    "two programs with one log file": (
        {
            MAIN: """
            [supervisor]
            log_dir = "logs"
            [programs.a]
            command = "x"
            stdout_logfile = "logs/b.err.log"
            [programs.b]
            command = "x"
            """
        },
        ["grenadine.toml: programs.b.stderr_logfile: expected a log file of its own", '"a"'],
    ),
    "TOML syntax error": (
        {MAIN: '[programs.a]\ncommand = "x\nautostart = true\n'},
        ["grenadine.toml: line 2, column 13: invalid TOML: Illegal character"],
    ),
    "TOML syntax error in an included file": (
        {MAIN: INCLUDE_CONF_D, "conf.d/x.toml": "[programs.a]\nautostart = tru\n"},
        ["conf.d/x.toml: line 2, column 13: invalid TOML"],
    ),
    "ready with both tcp and command": (
        one_program('ready = { tcp = "127.0.0.1:80", command = ["true"] }\n'),
        [
            'grenadine.toml: programs.a.ready: expected exactly one of "tcp" or "command",'
            ' got { tcp = "127.0.0.1:80", command = ["true"] }'
        ],
    ),
    "ready with neither tcp nor command": (
        one_program('ready = { timeout = "5s" }\n'),
        ['grenadine.toml: programs.a.ready: expected exactly one of "tcp" or "command"'],
    ),
    "ready tcp not host:port": (
        one_program('ready = { tcp = "11211" }\n'),
        ['grenadine.toml: programs.a.ready.tcp: expected "host:port"'],
    ),
    "keep zero": (
        one_program("checkpoint = { keep = 0 }\n"),
        ["grenadine.toml: programs.a.checkpoint.keep: expected a value >= 1, got 0"],
    ),
    "interval zero": (
        one_program('[programs.a.checkpoint]\ninterval = "0s"\n'),
        [
            "grenadine.toml: programs.a.checkpoint.interval: expected a duration greater than"
            ' zero such as "10s" or "1h30m", got "0s"'
        ],
    ),
    "relative bind": (
        one_program('binds = ["/srv", "data"]\n'),
        ['grenadine.toml: programs.a.binds[1]: expected an absolute path, got "data"'],
    ),
    # Regression: these passed `check`, then the sandbox refused them and `run` crashed.
    "the root as a bind": (
        one_program('binds = ["/"]\n'),
        [
            'grenadine.toml: programs.a.binds: expected paths other than "/" (the sandbox'
            ' always has the root), got ["/"]'
        ],
    ),
    "the root as a bind, written //": (
        one_program('binds = ["//"]\n'),
        ['grenadine.toml: programs.a.binds: expected paths other than "/"'],
    ),
    "the same bind twice": (
        one_program('binds = ["/tmp", "/tmp/"]\n'),
        [
            "grenadine.toml: programs.a.binds: expected each path once (/tmp is listed twice),"
            ' got ["/tmp", "/tmp/"]'
        ],
    ),
    "user with NUL": (
        one_program('user = "a\\u0000b"\n'),
        ["grenadine.toml: programs.a.user: expected a string without NUL characters"],
    ),
    "bool written as a string": (
        one_program('autostart = "yes"\n'),
        ['grenadine.toml: programs.a.autostart: expected true or false, got "yes"'],
    ),
    "integer written as a bool": (
        one_program("startretries = true\n"),
        ["grenadine.toml: programs.a.startretries: expected an integer, got true"],
    ),
    "environment value not a string": (
        one_program("environment = { LANG = 1 }\n"),
        ["grenadine.toml: programs.a.environment.LANG: expected a string, got 1"],
    ),
    "environment variable name with =": (
        one_program('environment = { "A=B" = "1" }\n'),
        ['grenadine.toml: programs.a.environment."A=B": expected an environment variable name'],
    ),
    "bad size": (
        one_program('stdout_logfile_maxbytes = "50XB"\n'),
        ["grenadine.toml: programs.a.stdout_logfile_maxbytes: expected a size", 'got "50XB"'],
    ),
    "bad umask": (
        one_program('umask = "0999"\n'),
        ['grenadine.toml: programs.a.umask: expected an octal string such as "022"'],
    ),
    "exit code out of range": (
        one_program("exitcodes = [0, 256]\n"),
        ["grenadine.toml: programs.a.exitcodes[1]: expected a value <= 255, got 256"],
    ),
    "bad log level": (
        {MAIN: '[supervisor]\nlog_level = "verbose"\n'},
        ['grenadine.toml: supervisor.log_level: expected "debug", "info", "warning" or "error"'],
    ),
    "include not a list": (
        {MAIN: '[supervisor]\ninclude = "conf.d/*.toml"\n'},
        ['grenadine.toml: supervisor.include: expected an array, got "conf.d/*.toml"'],
    ),
    "checkpoint not a table": (
        one_program("checkpoint = 5\n"),
        ["grenadine.toml: programs.a.checkpoint: expected a table, got 5"],
    ),
    "program not a table": (
        {MAIN: "programs.a = 5\n"},
        ["grenadine.toml: programs.a: expected a table, got 5"],
    ),
    "control socket path too long": (
        {MAIN: f'[supervisor]\ncontrol_socket = "/{"s" * 120}"\n'},
        ["grenadine.toml: supervisor.control_socket: expected a socket path of at most 107"],
    ),
}


@pytest.mark.parametrize(("files", "expected"), INVALID.values(), ids=INVALID.keys())
def test_invalid_configuration_names_file_and_key(tmp_path, monkeypatch, files, expected):
    monkeypatch.chdir(tmp_path)

    error = load_error(tmp_path, files)

    message = str(error)
    for fragment in expected:
        assert fragment in message
    assert message == "\n".join(error.problems)


def test_every_problem_of_every_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    error = load_error(
        tmp_path,
        {
            MAIN: INCLUDE_CONF_D + '[programs.a]\ncommand = "x"\nstartsecs = "x"\nkeep = 1\n',
            "conf.d/b.toml": '[programs.b]\ncommand = []\nautorestart = "no"\n',
        },
    )

    assert sorted(error.problems) == sorted(
        [
            "grenadine.toml: programs.a.startsecs: expected a duration such as"
            ' "10s" or a number of seconds, got "x"',
            "grenadine.toml: programs.a.keep: unknown key",
            "conf.d/b.toml: programs.b.command: expected a non-empty command, got []",
            'conf.d/b.toml: programs.b.autorestart: expected "always", "on-failure"'
            ' or "never", got "no"',
        ]
    )


def test_missing_file_is_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError) as caught:
        load_config("nowhere/grenadine.toml")

    assert caught.value.problems == ["nowhere/grenadine.toml: no such configuration file"]


def test_files_are_named_absolute_when_the_main_file_was(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / MAIN).write_text(INCLUDE_CONF_D)
    (tmp_path / "conf.d/a.toml").write_text('[programs.a]\ncommand = "x"\nkeep = 1\n')

    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / MAIN)

    assert caught.value.problems == [f"{tmp_path}/conf.d/a.toml: programs.a.keep: unknown key"]


def test_files_outside_the_current_directory_are_named_relative_to_it(tmp_path, monkeypatch):
    (tmp_path / "etc/conf.d").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "etc" / MAIN).write_text(INCLUDE_CONF_D)
    (tmp_path / "etc/conf.d/a.toml").write_text('[programs.a]\ncommand = "x"\nkeep = 1\n')
    monkeypatch.chdir(tmp_path / "cwd")

    with pytest.raises(ConfigError) as caught:
        load_config("../etc/grenadine.toml")

    assert caught.value.problems == ["../etc/conf.d/a.toml: programs.a.keep: unknown key"]


# Keys whose values the property test draws at random, as dotted TOML keys of [programs.p].
RANDOM_KEYS = [
    "command",
    "startsecs",
    "stopwaitsecs",
    "startretries",
    "autorestart",
    "stopsignal",
    "umask",
    "restore",
    "stdout_logfile_maxbytes",
    "environment.LANG",
    "checkpoint.keep",
    "checkpoint.interval",
    "ready.tcp",
]
MEANINGFUL_STRINGS = [
    "10s",
    "1h30m",
    "0s",
    "500ms",
    "TERM",
    "SIGKILL",
    "022",
    "50MB",
    "10KiB",
    "latest",
    "0123-abc",
    "always",
    "127.0.0.1:80",
    "[::1]:0",
    "",
    "../x",
]
SCALARS = st.one_of(
    st.sampled_from(MEANINGFUL_STRINGS),
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(
            f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c
            for c in value
        )
        return f'"{escaped}"'
    assert isinstance(value, list)
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(RANDOM_KEYS), VALUES, min_size=1, max_size=3))
def test_random_values_give_a_config_or_name_their_key(values):
    with tempfile.TemporaryDirectory() as directory:
        main = Path(directory) / MAIN
        lines = ["[programs.p]"]
        if "command" not in values:
            lines.append('command = ["/bin/true"]')
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        main.write_text("\n".join(lines) + "\n")

        outcome = load_or_error(main)

    if isinstance(outcome, ConfigError):
        assert outcome.problems
        for problem in outcome.problems:
            assert problem.startswith(f"{main}: ")
            assert any(f"programs.p.{key}" in problem for key in values), problem
    else:
        assert outcome.programs["p"].name == "p"


def load_or_error(path: Path) -> Config | ConfigError:
    try:
        return load_config(path)
    except ConfigError as error:
        return error
