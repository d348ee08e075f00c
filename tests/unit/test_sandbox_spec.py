"""SandboxSpec: validation when built, and the wire form the launcher reads."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grenadine_sv.sandbox import SandboxSpec
from grenadine_sv.sandbox.mounts import (
    CGROUP_ROOT,
    DEFAULT_PATH,
    HOST_MOUNTS,
    OPTIONAL_HOST_MOUNTS,
)
from grenadine_sv.sandbox.spec import InvalidSandboxSpec


def spec(**fields: Any) -> SandboxSpec:
    defaults: dict[str, Any] = {"name": "web", "command": ("/bin/true",), "root_anchor": "/run/a"}
    return SandboxSpec(**(defaults | fields))


def test_defaults_run_as_the_caller_in_the_root_directory() -> None:
    built = spec()
    assert (built.directory, built.umask, built.user, built.group) == ("/", None, None, None)
    assert built.binds == ()
    assert dict(built.environment) == {}


def test_lists_become_tuples_and_the_environment_a_private_read_only_copy() -> None:
    environment = {"A": "1"}
    built = spec(command=["sh", "-c", "true"], binds=["/data"], environment=environment)
    environment["A"] = "changed"
    assert built.command == ("sh", "-c", "true")
    assert built.binds == ("/data",)
    assert built.environment == {"A": "1"}
    with pytest.raises(TypeError):
        built.environment["B"] = "2"  # type: ignore[index]


LISTS = {"arg": "command", "bind": "binds"}
SINGLES = ("directory", "user", "group", "root_anchor", "init", "tmp", "cgroup")
SHARED = ("host_mount", "optional_mount", "default_path", "cgroup_root")


def entries(wire: bytes) -> list[tuple[str, str]]:
    """The wire spec's (field, value) pairs, in order."""
    assert wire.endswith(b"\0")
    pairs = []
    for entry in wire[:-1].split(b"\0"):
        key, equals, value = os.fsdecode(entry).partition("=")
        assert equals, entry
        pairs.append((key, value))
    return pairs


def from_wire(wire: bytes, name: str) -> SandboxSpec:
    """The spec the launcher reads from `wire` (its name is not sent)."""
    fields: dict[str, Any] = {"name": name, "command": [], "binds": [], "environment": {}}
    for key, value in entries(wire):
        if key in LISTS:
            fields[LISTS[key]].append(value)
        elif key == "env":
            variable, _, variable_value = value.partition("=")
            fields["environment"][variable] = variable_value
        elif key == "umask":
            fields["umask"] = int(value, 8)
        elif key in SINGLES:
            assert key not in fields, f"{key} given twice"
            fields[key] = value
        else:
            assert key in SHARED, key
    return SandboxSpec(**fields)


def test_the_wire_carries_every_field_to_the_launcher() -> None:
    built = spec(
        command=("memcached", "-p", "11211"),
        directory="/srv",
        environment={"LANG": "C.UTF-8", "SECRET": "x=y"},
        umask=0o022,
        user="nobody",
        group="nogroup",
        binds=("/data", "/data/cache"),
        init="/usr/bin/tini",
        tmp="/run/tmp/web",
        cgroup="/sys/fs/cgroup/grenadine/web",
    )
    assert from_wire(built.to_wire(), "web") == built
    assert ("umask", "022") in entries(built.to_wire())


def test_none_fields_are_absent_and_lists_repeat_their_field_in_order() -> None:
    pairs = entries(spec(command=("sh", "-c", "x"), binds=("/b", "/a")).to_wire())
    keys = [key for key, _ in pairs]
    for absent in ("umask", "user", "group", "init", "tmp", "cgroup"):
        assert absent not in keys
    assert [value for key, value in pairs if key == "arg"] == ["sh", "-c", "x"]
    assert [value for key, value in pairs if key == "bind"] == ["/b", "/a"]


def test_the_wire_carries_the_mounts_and_path_every_sandbox_has() -> None:
    pairs = entries(spec().to_wire())
    assert [value for key, value in pairs if key == "host_mount"] == list(HOST_MOUNTS)
    assert [value for key, value in pairs if key == "optional_mount"] == list(OPTIONAL_HOST_MOUNTS)
    assert ("default_path", DEFAULT_PATH) in pairs
    assert ("cgroup_root", CGROUP_ROOT) in pairs


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name must be a non-empty string"),
        ({"command": ()}, "command must be a non-empty list"),
        ({"command": ("",)}, r"command\[0\]"),
        ({"command": ("a\0b",)}, "NUL"),
        ({"directory": "srv"}, "directory must be an absolute path"),
        ({"directory": "/srv/../etc"}, "must not contain '..'"),
        ({"environment": {"A=B": "1"}}, "environment variable name 'A=B'"),
        ({"environment": {"": "1"}}, "environment variable name ''"),
        ({"umask": 0o1000}, "umask must be an integer from 0 to 0o777"),
        ({"umask": -1}, "umask"),
        ({"umask": True}, "umask"),
        ({"user": ""}, "user must be a non-empty name"),
        ({"group": ""}, "group must be a non-empty name"),
        ({"binds": ("data",)}, "binds must be an absolute path"),
        ({"binds": ("/",)}, "binds may not contain '/'"),
        ({"binds": ("/data", "/data/")}, "binds lists the same path twice"),
        ({"root_anchor": "run/a"}, "root_anchor must be an absolute path"),
        ({"root_anchor": "/"}, "root_anchor must be an empty directory"),
    ],
)
def test_invalid_fields_are_refused_when_built(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSandboxSpec, match=message):
        spec(**fields)


def test_errors_name_the_program() -> None:
    with pytest.raises(InvalidSandboxSpec, match="sandbox spec for 'web': directory"):
        spec(directory="relative")


def test_invalid_spec_is_a_value_error() -> None:
    assert issubclass(InvalidSandboxSpec, ValueError)


_text = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]))
_path_part = st.text(
    st.characters(exclude_characters="/\0", exclude_categories=["Cs"]), min_size=1
).filter(lambda part: part not in (".", ".."))
_path = st.lists(_path_part, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
_valid_fields = st.fixed_dictionaries(
    {
        "command": st.lists(_text, min_size=1).filter(lambda command: command[0] != ""),
        "environment": st.dictionaries(_text.filter(lambda key: key and "=" not in key), _text),
        "directory": _path,
        "umask": st.none() | st.integers(0, 0o777),
        "user": st.none() | _text.filter(bool),
        "group": st.none() | _text.filter(bool),
        "binds": st.lists(_path, unique=True, max_size=3),
    }
)


@given(_valid_fields)
def test_any_valid_spec_survives_the_wire_round_trip(fields: dict[str, Any]) -> None:
    built = spec(**fields)
    assert from_wire(built.to_wire(), built.name) == built
