"""`check`'s warnings about programs this host cannot run or checkpoint as configured."""

from __future__ import annotations

from pathlib import Path

from grenadine_sv.config.models import ProgramConfig
from grenadine_sv.host.warnings import program_warnings


def program(name: str, **fields: object) -> ProgramConfig:
    return ProgramConfig.model_validate(
        {"name": name, "command": ["true"], "source": Path("/etc/grenadine.toml"), **fields}
    )


def test_another_user_without_cap_sys_resource_is_named_with_file_and_key():
    programs = {"pg": program("pg", user="postgres"), "redis": program("redis", user="root")}
    [warning] = program_warnings(programs, {"CAP_SYS_ADMIN"}, init_present=True)
    assert warning.startswith("/etc/grenadine.toml: programs.pg.user: 'postgres'")
    assert "CAP_SYS_RESOURCE" in warning


def test_no_warning_with_cap_sys_resource_or_without_a_user():
    programs = {"pg": program("pg", user="postgres"), "plain": program("plain")}
    assert program_warnings(programs, {"CAP_SYS_RESOURCE"}, init_present=True) == []
    assert program_warnings({"plain": programs["plain"]}, set(), init_present=True) == []


def test_a_missing_init_is_named_unless_the_program_opts_out():
    programs = {"a": program("a"), "b": program("b", init=False)}
    [warning] = program_warnings(programs, {"CAP_SYS_RESOURCE"}, init_present=False)
    assert warning.startswith(
        "/etc/grenadine.toml: programs.a.init: /usr/bin/tini-static is missing"
    )


def test_a_directory_on_a_mount_the_sandbox_lacks_is_named_with_its_fix():
    programs = {
        "web": program("web", directory="/srv/web"),
        "bound": program("bound", directory="/srv/web", binds=["/srv"]),
    }
    [warning] = program_warnings(
        programs, {"CAP_SYS_RESOURCE"}, init_present=True, host_mounts=["/", "/srv"]
    )
    assert warning == (
        "/etc/grenadine.toml: the directory /srv/web is on the host mount /srv, which the sandbox"
        " does not include (its root is the host's / without the mounts below it):"
        ' add "/srv" to programs.web.binds'
    )
