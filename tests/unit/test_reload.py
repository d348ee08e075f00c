"""What a reload changes, worked out from two configurations without running anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from grenadine_sv.config.models import ProgramConfig, SupervisorSettings
from grenadine_sv.lifecycle.reload import changed_settings, diff_programs


def program(name: str, **fields: Any) -> ProgramConfig:
    return ProgramConfig.model_validate(
        {"name": name, "command": ["/bin/true"], "source": Path("/etc/x.toml"), **fields}
    )


def programs(*defined: ProgramConfig) -> dict[str, ProgramConfig]:
    return {p.name: p for p in defined}


def test_each_program_lands_in_exactly_one_section() -> None:
    old = programs(
        program("same"),
        program("leaving"),
        program("new-command"),
        program("new-policy"),
    )
    new = programs(
        program("same"),
        program("arriving"),
        program("new-command", command=["/bin/false"]),
        program("new-policy", startretries=9),
    )
    diff = diff_programs(old, new)
    assert diff.summary() == {
        "added": ["arriving"],
        "removed": ["leaving"],
        "changed": ["new-command"],
        "updated": ["new-policy"],
        "unchanged": ["same"],
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"command": ["/bin/sleep", "1"]},
        {"directory": "/srv"},
        {"environment": {"A": "1"}},
        {"umask": "077"},
        {"user": "nobody"},
        {"binds": ["/srv"]},
        {"stopsignal": "INT"},
        {"stdout_logfile": "/var/log/other.log"},
        {"stderr_logfile_maxbytes": "1MiB"},
        {"log_timestamps": True},
    ],
)
def test_a_different_process_or_log_file_replaces_the_instance(fields: dict[str, Any]) -> None:
    diff = diff_programs(programs(program("p")), programs(program("p", **fields)))
    assert diff.changed == ("p",)


@pytest.mark.parametrize(
    "fields",
    [
        {"autorestart": "always"},
        {"startsecs": 5},
        {"ready": {"tcp": "127.0.0.1:80"}},
        {"checkpoint": {"on_signal": True}},
        {"depends_on": ["other"]},
    ],
)
def test_supervision_settings_are_taken_in_place(fields: dict[str, Any]) -> None:
    diff = diff_programs(programs(program("p")), programs(program("p", **fields)))
    assert (diff.changed, diff.updated) == ((), ("p",))


def test_a_program_moved_to_another_file_is_unchanged() -> None:
    moved = ProgramConfig.model_validate(
        {"name": "p", "command": ["/bin/true"], "source": Path("/etc/conf.d/p.toml")}
    )
    assert diff_programs(programs(program("p")), programs(moved)).unchanged == ("p",)


def test_changed_supervisor_settings_are_named_include_aside() -> None:
    running = SupervisorSettings()
    new = SupervisorSettings.model_validate(
        {
            "state_dir": "/srv/state",
            "include": ["conf.d/*.toml"],
            "log_level": "debug",
            "metrics": {"listen": ""},
        },
        context={"base_dir": Path("/etc")},
    )
    assert changed_settings(running, new) == ["state_dir", "log_level", "metrics.listen"]
    assert changed_settings(running, running) == []
