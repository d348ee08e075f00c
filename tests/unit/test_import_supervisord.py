"""import-supervisord: supervisord configurations (Debian's, the example in supervisord's own
sample configuration, hand-written ones using every key) translated into tables that pass
grenadine-sv's validation; names, commands and environments compared with what supervisord's
own parser makes of the same file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import tomli_w
from supervisor import datatypes
from supervisor.options import EventListenerPoolConfig, ServerOptions

from grenadine_sv.cli.main import EXIT_OK, main
from grenadine_sv.config.loading import load_config
from grenadine_sv.config.supervisord import (
    Imported,
    import_supervisord,
    parse_environment,
    parse_size,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "supervisord"
DEBIAN = FIXTURES / "debian-supervisord.conf"
SAMPLE = Path(datatypes.__file__).with_name("skel") / "sample.conf"

HAND_WRITTEN = """
[supervisord]
childlogdir = %(here)s/childlogs
nodaemon = true

[inet_http_server]
port = 127.0.0.1:9001

[group:web]
programs = app, worker

[program:app]
command = /usr/bin/python3 -m http.server %(process_num)d ; a comment
process_name = %(program_name)s_%(process_num)02d
numprocs = 3
numprocs_start = 8000
directory = %(here)s
environment = GROUP="%(group_name)s",HOME_COPY="%(ENV_HOME)s",LIST="a,b",EMPTY=""
priority = 10
autostart = true
autorestart = unexpected
exitcodes = 0,2
startsecs = 5
startretries = 7
stopsignal = SIGINT
stopwaitsecs = 20
user = root
umask = 22
stdout_logfile = %(here)s/%(program_name)s-%(process_num)s.log
stdout_logfile_maxbytes = 2MB
stdout_logfile_backups = 3
stderr_logfile = NONE
redirect_stderr = false

[program:worker]
command = /bin/sleep 1000
priority = 20
autorestart = true
stdout_logfile = /dev/stdout
stderr_logfile_maxbytes = 1KB
stopasgroup = true

[program:cron]
command = /bin/sleep 2000
autostart = false
autorestart = false
stdout_logfile = %(here)s/cron.log
stderr_logfile = %(here)s/cron.log

[eventlistener:crashmail]
command = /usr/local/bin/crashmail
events = PROCESS_STATE_EXITED

[include]
files = conf.d/*.conf nothing-here/*.conf
"""

INCLUDED = """
[program:db]
command = /bin/sleep 3000
priority = 1
environment = A=1, B="two words"
"""


def write_hand_written(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "childlogs").mkdir()  # supervisord's parser wants childlogdir to exist
    (tmp_path / "conf.d" / "db.conf").write_text(INCLUDED)
    main_file = tmp_path / "supervisord.conf"
    main_file.write_text(HAND_WRITTEN)
    return main_file


def write_toml(imported: Imported, directory: Path) -> Path:
    """What import-supervisord writes, without the command line."""
    (directory / "conf.d").mkdir(parents=True)
    main_file = directory / "grenadine.toml"
    supervisor = {"state_dir": str(directory / "state"), **imported.supervisor}
    supervisor |= {"control_socket": str(directory / "ctl.sock"), "include": ["conf.d/*.toml"]}
    main_file.write_text(tomli_w.dumps({"supervisor": supervisor}))
    for name, table in imported.programs.items():
        text = tomli_w.dumps({"programs": {name: table}})
        (directory / "conf.d" / f"{name}.toml").write_text(text)
    return main_file


def supervisord_view(path: Path, home: str) -> dict[str, dict[str, object]]:
    """Each process as supervisord's own parser configures it."""
    options = ServerOptions()
    options.configfile = str(path)
    options.environ_expansions = {"ENV_HOME": home}
    options.process_config(do_usage=False)
    return {
        process.name: {"command": process.command, "environment": process.environment or {}}
        for group in options.process_group_configs
        if not isinstance(group, EventListenerPoolConfig)  # not translated, on purpose
        for process in group.process_configs
    }


def reasons(imported: Imported) -> dict[str, str]:
    return {f"{u.section} {u.key or ''}".strip(): u.reason for u in imported.untranslated}


def test_debians_configuration_keeps_its_log_dir_and_says_what_it_leaves_out(
    tmp_path: Path,
) -> None:
    imported = import_supervisord(DEBIAN, environ={})
    assert imported.programs == {}
    assert imported.supervisor == {"log_dir": "/var/log/supervisor"}
    left_out = reasons(imported)
    assert set(left_out) >= {
        "unix_http_server",
        "supervisord logfile",
        "supervisord pidfile",
        "rpcinterface:supervisor",
        "supervisorctl",
    }
    assert "state_dir/grenadine-sv.pid" in left_out["supervisord pidfile"]
    config = load_config(write_toml(imported, tmp_path / "out"))
    assert config.supervisor.log_dir == Path("/var/log/supervisor")


def test_debians_configuration_with_programs_in_its_conf_d(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "db.conf").write_text(INCLUDED)
    (conf_d / "web.conf").write_text("[program:web]\ncommand=/bin/sleep 10\n")
    main_file = tmp_path / "supervisord.conf"
    debian = DEBIAN.read_text()
    assert "files = /etc/supervisor/conf.d/*.conf" in debian
    main_file.write_text(debian.replace("/etc/supervisor/conf.d/*.conf", f"{conf_d}/*.conf"))
    imported = import_supervisord(main_file, environ={})
    assert sorted(imported.programs) == ["db", "web"]
    assert imported.origins["db"] == ((conf_d / "db.conf").resolve(), "program:db")
    assert load_config(write_toml(imported, tmp_path / "out")).start_order() == ["db", "web"]


def test_the_program_example_of_supervisords_sample_configuration(tmp_path: Path) -> None:
    sample = SAMPLE.read_text()
    block = re.search(r"^;\[program:theprogramname\].*?^;serverurl.*?$", sample, re.M | re.S)
    assert block is not None
    docs = tmp_path / "docs.conf"
    docs.write_text(re.sub(r"^;", "", block.group(0), flags=re.M) + "\n")
    imported = import_supervisord(docs, environ={})
    table = imported.programs["theprogramname"]
    assert table == {
        "command": "/bin/cat",
        "directory": "/tmp",
        "umask": "022",
        "user": "chrism",
        "autostart": True,
        "autorestart": "on-failure",
        "exitcodes": [0],
        "startsecs": 1,
        "startretries": 3,
        "stopwaitsecs": 10,
        "stopsignal": "QUIT",
        "stdout_logfile": "/a/path",
        "stdout_logfile_maxbytes": 1024 * 1024,
        "stdout_logfile_backups": 10,
        "environment": {"A": "1", "B": "2"},
    }
    left_out = reasons(imported)
    for key in ("redirect_stderr", "stopasgroup", "killasgroup", "serverurl", "stdout_syslog"):
        assert f"program:theprogramname {key}" in left_out
    config = load_config(write_toml(imported, tmp_path / "out"))
    assert config.programs["theprogramname"].stop_signal.name == "SIGQUIT"


def test_every_key_of_a_hand_written_configuration(tmp_path: Path) -> None:
    main_file = write_hand_written(tmp_path)
    home = "/home/someone"
    imported = import_supervisord(main_file, environ={"HOME": home})
    theirs = supervisord_view(main_file, home)
    assert (
        set(imported.programs)
        == set(theirs)
        == {
            "app_8000",
            "app_8001",
            "app_8002",
            "worker",
            "cron",
            "db",
        }
    )
    for name, view in theirs.items():
        assert imported.programs[name]["command"] == view["command"], name
        assert imported.programs[name].get("environment", {}) == view["environment"], name

    app = imported.programs["app_8001"]
    assert app["command"] == "/usr/bin/python3 -m http.server 8001"
    assert app["environment"] == {"GROUP": "web", "HOME_COPY": home, "LIST": "a,b", "EMPTY": ""}
    assert app["directory"] == str(tmp_path)
    assert app["stdout_logfile"] == f"{tmp_path}/app-8001.log"
    assert (app["exitcodes"], app["startsecs"], app["startretries"]) == ([0, 2], 5, 7)
    assert (app["stopsignal"], app["stopwaitsecs"], app["umask"]) == ("INT", 20, "022")
    assert (app["stdout_logfile_maxbytes"], app["stdout_logfile_backups"]) == (2 << 20, 3)
    assert app["autorestart"] == "on-failure"
    assert imported.programs["worker"]["autorestart"] == "always"
    assert imported.programs["worker"]["stderr_logfile_maxbytes"] == 1024
    assert imported.programs["cron"]["autorestart"] == "never"
    assert imported.programs["cron"]["autostart"] is False
    assert "stderr_logfile" not in imported.programs["cron"]
    assert imported.programs["db"]["environment"] == {"A": "1", "B": "two words"}
    # priority: 1 (db) < 10 (app) < 20 (worker) < 999 (cron), as start order
    assert imported.programs["app_8000"]["depends_on"] == ["db"]
    assert imported.programs["worker"]["depends_on"] == ["app_8000", "app_8001", "app_8002"]
    assert imported.programs["cron"]["depends_on"] == ["worker"]
    assert imported.programs["cron"]["on_dependency_stop"] == "ignore"
    assert "depends_on" not in imported.programs["db"]
    assert imported.supervisor == {"log_dir": f"{tmp_path}/childlogs"}

    left_out = reasons(imported)
    assert "event listeners" in left_out["eventlistener:crashmail"]
    assert "no groups" in left_out["group:web"]
    assert "no HTTP control server" in left_out["inet_http_server"]
    assert "always captured" in left_out["program:app stderr_logfile"]
    assert "/dev/stdout" in left_out["program:worker stdout_logfile"]
    assert "its own" in left_out["program:cron stderr_logfile"]
    assert '"nothing-here/*.conf" matches no file' in left_out["include files"]
    assert "supervisord nodaemon" in left_out

    config = load_config(write_toml(imported, tmp_path / "out"))
    order = config.start_order()
    assert order.index("db") < order.index("app_8000") < order.index("worker")
    assert order.index("worker") < order.index("cron")


@pytest.mark.parametrize(
    "value",
    ['A="1",B="2"', "A=1, B=2", 'KEY="a,b",OTHER=x', "PATH=/usr/bin:/bin", "S='single quoted'"],
)
def test_environment_is_read_as_supervisord_reads_it(value: str) -> None:
    assert parse_environment(value) == datatypes.dict_of_key_value_pairs(value)


@pytest.mark.parametrize("value", ["1024", "1KB", "50MB", "1GB", "0"])
def test_sizes_are_read_as_supervisord_reads_them(value: str) -> None:
    assert parse_size(value) == datatypes.byte_size(value)


def test_the_command_writes_toml_that_passes_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main_file = write_hand_written(tmp_path)
    out = tmp_path / "imported"
    assert main(["import-supervisord", str(main_file), "-o", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert f"wrote {out}/grenadine.toml and 6 programs in {out}/conf.d/" in printed
    assert "not translated: " in printed
    assert printed.rstrip().endswith("check: configuration valid: 6 programs")
    assert sorted(p.name for p in (out / "conf.d").iterdir()) == [
        "app_8000.toml",
        "app_8001.toml",
        "app_8002.toml",
        "cron.toml",
        "db.toml",
        "worker.toml",
    ]
    assert main(["-c", str(out / "grenadine.toml"), "check"]) == EXIT_OK
    # Nothing is overwritten unless asked.
    assert main(["import-supervisord", str(main_file), "-o", str(out)]) == 1
    assert "would overwrite" in capsys.readouterr().err
    assert main(["import-supervisord", str(main_file), "-o", str(out), "--force"]) == EXIT_OK
    shutil.rmtree(out)
