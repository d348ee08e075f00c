"""SandboxSpec: validation when built, and the JSON form the launcher reads."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grenadine_sv.sandbox import SandboxSpec
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


def test_json_carries_every_field_to_the_launcher() -> None:
    built = spec(
        command=("memcached", "-p", "11211"),
        directory="/srv",
        environment={"LANG": "C.UTF-8", "SECRET": "x=y"},
        umask=0o022,
        user="nobody",
        group="nogroup",
        binds=("/data", "/data/cache"),
    )
    document = json.loads(built.to_json())
    assert SandboxSpec(**document) == built


def test_json_is_an_object_with_plain_lists_for_the_launcher() -> None:
    document = json.loads(spec(binds=("/data",)).to_json())
    assert document["command"] == ["/bin/true"]
    assert document["binds"] == ["/data"]
    assert document["environment"] == {}
    assert document["umask"] is None


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
def test_any_valid_spec_survives_the_json_round_trip(fields: dict[str, Any]) -> None:
    built = spec(**fields)
    assert SandboxSpec(**json.loads(built.to_json())) == built
