"""Loading valid configurations: values, includes, paths, digests, start order, schema."""

import signal
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from grenadine_sv.config.field_docs import attribute_docstrings
from grenadine_sv.config.loading import (
    Config,
    ProgramConfig,
    SupervisorSettings,
    config_json_schema,
    load_config,
)

DESIGN_EXAMPLE = """
[supervisor]
state_dir = "/var/lib/grenadine-sv"
control_socket = "/run/grenadine-sv.sock"
log_dir = "/var/log/grenadine-sv"
include = ["conf.d/*.toml"]

[supervisor.metrics]
listen = "127.0.0.1:9847"

[programs.memcached]
command = ["/usr/bin/memcached", "-u", "root", "-p", "11211"]
directory = "/"
environment = { LANG = "C.UTF-8" }
autostart = true
autorestart = "on-failure"
startsecs = 1
startretries = 3
stopsignal = "TERM"
stopwaitsecs = 10
depends_on = []
ready = { tcp = "127.0.0.1:11211", timeout = "10s" }
restore = "latest"
restore_fallback = "cold"

[programs.memcached.checkpoint]
on_signal = true
interval = "15m"
pre_deploy = true
leave_running = true
keep = 5
rollback = true
"""


@pytest.fixture
def write(tmp_path, monkeypatch):
    """write(relative_path, toml_text) -> absolute path; the test runs in tmp_path."""
    monkeypatch.chdir(tmp_path)

    def write_file(relative: str, text: str) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return write_file


def program(name: str = "p", **fields: object) -> ProgramConfig:
    table = {"command": ["/bin/true"], **fields, "name": name, "source": Path("/etc/g.toml")}
    return ProgramConfig.model_validate(table, context={"base_dir": Path("/etc")})


def test_design_example_loads_with_its_values(write):
    main = write("grenadine.toml", DESIGN_EXAMPLE)

    config = load_config("grenadine.toml")

    assert config.path == main
    assert config.files == [main]
    assert config.supervisor.state_dir == Path("/var/lib/grenadine-sv")
    assert config.supervisor.control_socket == Path("/run/grenadine-sv.sock")
    assert config.supervisor.metrics.address() == ("127.0.0.1", 9847)
    memcached = config.programs["memcached"]
    assert memcached.name == "memcached"
    assert memcached.source == main
    assert memcached.command == ["/usr/bin/memcached", "-u", "root", "-p", "11211"]
    assert memcached.environment == {"LANG": "C.UTF-8"}
    assert memcached.stop_signal is signal.SIGTERM
    assert memcached.stopwaitsecs == 10.0
    assert memcached.ready is not None
    assert memcached.ready.tcp == "127.0.0.1:11211"
    assert memcached.ready.command is None
    assert memcached.ready.timeout == 10.0
    assert memcached.restore == "latest"
    assert memcached.checkpoint.interval == 900.0
    assert memcached.checkpoint.on_signal
    assert memcached.checkpoint.rollback
    assert memcached.checkpoint.keep == 5


def test_defaults_of_a_minimal_program(write):
    write("grenadine.toml", '[programs.p]\ncommand = ["/bin/true"]\n')

    config = load_config("grenadine.toml")

    assert config.supervisor == SupervisorSettings()
    assert config.supervisor.log_dir == Path("/var/log/grenadine-sv")
    assert config.supervisor.metrics.listen == "127.0.0.1:9847"
    p = config.programs["p"]
    assert p.directory == Path("/")
    assert (p.autostart, p.autorestart, p.exitcodes) == (True, "on-failure", [0])
    assert (p.startsecs, p.startretries, p.stopsignal) == (1.0, 3, "TERM")
    assert p.stdout_logfile_maxbytes == 50 * 1024 * 1024
    assert p.stdout_path(Path("/logs")) == Path("/logs/p.out.log")
    assert p.stderr_path(Path("/logs")) == Path("/logs/p.err.log")
    assert p.ready is None
    assert p.restore is None
    assert p.restore_mode == "eager"
    assert not p.checkpoint.on_signal
    assert p.checkpoint.interval is None
    assert p.checkpoint.leave_running


def test_empty_listen_disables_metrics(write):
    write("grenadine.toml", '[supervisor.metrics]\nlisten = ""\n')

    assert load_config("grenadine.toml").supervisor.metrics.address() is None


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("[::1]:9847", ("::1", 9847)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("metrics.example.org:65535", ("metrics.example.org", 65535)),
    ],
)
def test_metrics_listen_forms(write, listen, address):
    write("grenadine.toml", f'[supervisor.metrics]\nlisten = "{listen}"\n')

    assert load_config("grenadine.toml").supervisor.metrics.address() == address


def test_includes_are_relative_to_the_including_file_and_sorted(write, tmp_path):
    main = write(
        "etc/grenadine.toml",
        """
        [supervisor]
        include = ["conf.d/*.toml", "more/none-*.toml"]
        [programs.first]
        command = "/bin/true"
        """,
    )
    zeta = write("etc/conf.d/zeta.toml", '[programs.zeta]\ncommand = "/bin/true"\n')
    alpha = write("etc/conf.d/alpha.toml", '[programs.alpha]\ncommand = "/bin/true"\n')
    write("etc/conf.d/ignored.txt", "not toml at all [")

    config = load_config(main)

    assert config.files == [main, alpha, zeta]
    assert list(config.programs) == ["first", "alpha", "zeta"]
    assert config.programs["zeta"].source == zeta
    assert config.programs["first"].source == main


def test_relative_paths_resolve_against_the_defining_file(write, tmp_path):
    write(
        "etc/grenadine.toml",
        """
        [supervisor]
        state_dir = "state"
        log_dir = "../logs"
        control_socket = "run/ctl.sock"
        criu = "bin/criu"
        include = ["conf.d/*.toml"]
        """,
    )
    write(
        "etc/conf.d/app.toml",
        """
        [programs.app]
        command = ["./app"]
        directory = "app"
        stdout_logfile = "out/app.log"
        stderr_logfile = "/abs/err.log"
        binds = ["/srv/data", "/srv/../tmp"]
        private_tmp = false
        """,
    )

    config = load_config("etc/grenadine.toml")

    assert config.path == tmp_path / "etc/grenadine.toml"
    assert config.supervisor.state_dir == tmp_path / "etc/state"
    assert config.supervisor.log_dir == tmp_path / "logs"
    assert config.supervisor.control_socket == tmp_path / "etc/run/ctl.sock"
    assert config.supervisor.criu == tmp_path / "etc/bin/criu"
    app = config.programs["app"]
    assert app.directory == tmp_path / "etc/conf.d/app"
    assert app.stdout_path(config.supervisor.log_dir) == tmp_path / "etc/conf.d/out/app.log"
    assert app.stderr_path(config.supervisor.log_dir) == Path("/abs/err.log")
    assert app.binds == [Path("/srv/data"), Path("/tmp")]
    assert app.command == ["./app"]


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("0", 0.0),
        ("2.5", 2.5),
        ('"90s"', 90.0),
        ('"15m"', 900.0),
        ('"1h"', 3600.0),
        ('"1h30m"', 5400.0),
        ('"500ms"', 0.5),
        ('"1m 30s"', 90.0),
        ('"2d"', 172800.0),
        ('"12"', 12.0),
    ],
)
def test_durations(write, written, seconds):
    write("grenadine.toml", f'[programs.p]\ncommand = "x"\nstartsecs = {written}\n')

    assert load_config("grenadine.toml").programs["p"].startsecs == seconds


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("0", 0),
        ("1234", 1234),
        ('"100"', 100),
        ('"50MB"', 50_000_000),
        ('"10KiB"', 10_240),
        ('"1GB"', 1_000_000_000),
        ('"2GiB"', 2 * 1024**3),
        ('"1.5 KiB"', 1536),
        ('"3kb"', 3000),
    ],
)
def test_sizes(write, written, size):
    write("grenadine.toml", f'[programs.p]\ncommand = "x"\nstderr_logfile_maxbytes = {written}\n')

    assert load_config("grenadine.toml").programs["p"].stderr_logfile_maxbytes == size


@pytest.mark.parametrize(
    ("written", "name", "number"),
    [
        ('"TERM"', "TERM", signal.SIGTERM),
        ('"SIGTERM"', "TERM", signal.SIGTERM),
        ('"term"', "TERM", signal.SIGTERM),
        ('"sigint"', "INT", signal.SIGINT),
        ("9", "KILL", signal.SIGKILL),
        ('"1"', "HUP", signal.SIGHUP),
        ('"IOT"', "ABRT", signal.SIGABRT),
    ],
)
def test_stop_signals(write, written, name, number):
    write("grenadine.toml", f'[programs.p]\ncommand = "x"\nstopsignal = {written}\n')

    p = load_config("grenadine.toml").programs["p"]

    assert p.stopsignal == name
    assert p.stop_signal is number


@pytest.mark.parametrize(
    ("written", "umask"),
    [('"022"', 0o022), ('"0o027"', 0o027), ('"0"', 0), ("0o077", 0o077), ("18", 18)],
)
def test_umask(write, written, umask):
    write("grenadine.toml", f'[programs.p]\ncommand = "x"\numask = {written}\n')

    assert load_config("grenadine.toml").programs["p"].umask == umask


def test_command_string_is_split_like_a_shell(write):
    write(
        "grenadine.toml",
        """[programs.p]\ncommand = "/usr/bin/env 'A B=c d' \\"e f\\" g\\\\ h"\n""",
    )

    assert load_config("grenadine.toml").programs["p"].command == [
        "/usr/bin/env",
        "A B=c d",
        "e f",
        "g h",
    ]


def test_ready_command_probe(write):
    write(
        "grenadine.toml",
        """
        [programs.p]
        command = "x"
        ready = { command = "redis-cli ping", interval = "100ms", timeout = 3 }
        """,
    )

    ready = load_config("grenadine.toml").programs["p"].ready

    assert ready is not None
    assert ready.command == ["redis-cli", "ping"]
    assert ready.tcp is None
    assert (ready.interval, ready.timeout) == (0.1, 3.0)


def test_digest_is_equal_for_equal_definitions():
    assert program(environment={"A": "1"}).definition_digest() == (
        program(environment={"A": "1"}).definition_digest()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"command": ["/bin/false"]},
        {"directory": "/tmp"},
        {"environment": {"A": "2"}},
        {"umask": "077"},
        {"user": "nobody"},
        {"group": "nogroup"},
        {"binds": ["/srv"]},
        {"stopsignal": "INT"},
    ],
)
def test_digest_changes_with_the_process_definition(change):
    assert program(**change).definition_digest() != program().definition_digest()


@pytest.mark.parametrize(
    "change",
    [
        {"checkpoint": {"on_signal": True, "interval": "1h", "keep": 2}},
        {"autostart": False},
        {"depends_on": ["q"]},
        {"ready": {"tcp": "127.0.0.1:80"}},
        {"restore": "latest", "restore_fallback": "fail", "restore_mode": "lazy"},
        {"stdout_logfile": "/x.log", "stdout_logfile_maxbytes": 0, "log_timestamps": True},
    ],
)
def test_digest_ignores_what_does_not_shape_the_process(change):
    assert program(**change).definition_digest() == program().definition_digest()


def test_digest_ignores_the_file_that_defines_the_program():
    moved = program().model_copy(update={"source": Path("/elsewhere.toml")})

    assert moved.definition_digest() == program().definition_digest()


def test_start_order_follows_dependencies_then_names(write):
    write(
        "grenadine.toml",
        """
        [programs.web]
        command = "x"
        depends_on = ["db", "cache"]
        [programs.zz]
        command = "x"
        [programs.db]
        command = "x"
        [programs.cache]
        command = "x"
        depends_on = ["db"]
        [programs.aa]
        command = "x"
        depends_on = ["web"]
        """,
    )

    assert load_config("grenadine.toml").start_order() == ["db", "cache", "web", "aa", "zz"]


def test_config_built_directly_is_checked_too():
    with pytest.raises(ValidationError, match=r"a -> b -> a"):
        Config(
            path=Path("/etc/g.toml"),
            files=[Path("/etc/g.toml")],
            supervisor=SupervisorSettings(),
            programs={"a": program("a", depends_on=["b"]), "b": program("b", depends_on=["a"])},
        )


def test_json_schema_describes_the_toml_document():
    schema = config_json_schema()

    assert {"supervisor", "programs"} <= schema["properties"].keys()
    assert schema["additionalProperties"] is False
    programs = schema["properties"]["programs"]
    assert "pattern" in programs["propertyNames"]
    program_schema = schema["$defs"]["ProgramConfig"]
    assert "startsecs" in program_schema["properties"]
    assert "name" not in program_schema["properties"]
    assert "source" not in program_schema["properties"]
    assert program_schema["required"] == ["command"]


def test_json_schema_describes_each_key_by_the_docstring_under_its_field():
    schema = config_json_schema()

    startsecs = schema["$defs"]["ProgramConfig"]["properties"]["startsecs"]
    assert startsecs["description"] == (
        "how long the program must stay up to count as started (without a ready probe)"
    )
    # A nested table's key: the description sits beside the reference.
    remote = schema["$defs"]["SupervisorSettings"]["properties"]["remote"]
    assert remote["description"] == "an object store for images (optional)"


def test_attribute_docstrings_pairs_each_annotated_field_with_the_string_under_it():
    class Table:
        documented: int = 1
        """the first
        of two lines"""
        undocumented: str = ""
        plain = 2
        """not a field: it has no annotation"""

    assert attribute_docstrings(Table) == {"documented": "the first\nof two lines"}
