"""What the launcher needs to start one program: a frozen, validated description, sent to it in
the wire format of `SandboxSpec.to_wire`."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from grenadine_sv.sandbox.mounts import (
    CGROUP_ROOT,
    DEFAULT_PATH,
    HOST_MOUNTS,
    OPTIONAL_HOST_MOUNTS,
)


class InvalidSandboxSpec(ValueError):
    """A sandbox spec that the launcher cannot use; the message says why.

    The configuration models accept only programs whose spec is valid (a property test
    holds them to it), so for a configured program this is a bug, which the runner reports
    as a failed start of that program."""


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    """One program's sandbox: what to run, as whom, where, and which host paths to bind in.

    ``root_anchor`` is an empty directory on the host onto which the launcher bind-mounts ``/``
    inside the program's own mount namespace; every program may share the same one.
    ``binds`` are host mount points to bind (non-recursively) at the same path inside.
    ``init`` is the absolute path of an init to run as PID 1 with the program as its child,
    or None to make the program itself PID 1. ``tmp`` is a host directory mounted as the
    program's /tmp, or None to bind the host's /tmp.
    ``cgroup`` is the program's cgroup (v2) directory, which the launcher joins before it forks
    the program, so that every process of the program is listed there.
    """

    name: str
    command: tuple[str, ...]
    directory: str = "/"
    environment: Mapping[str, str] = field(default_factory=dict)
    umask: int | None = None
    user: str | None = None
    group: str | None = None
    binds: tuple[str, ...] = ()
    root_anchor: str
    init: str | None = None
    tmp: str | None = None
    cgroup: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "binds", tuple(self.binds))
        object.__setattr__(self, "environment", MappingProxyType(dict(self.environment)))
        _check_spec(self)

    def to_wire(self) -> bytes:
        """The spec as the launcher (grenadine-launch) reads it: `field=value` strings, each
        ending in a NUL byte (no string of a valid spec holds one); a list is its field
        repeated, in order; a field that is None is absent. Also carries the mounts every
        sandbox has and the default PATH (`mounts`), which the launcher holds no copy of."""
        fields: list[tuple[str, str | None]] = [
            *(("arg", arg) for arg in self.command),
            ("directory", self.directory),
            *(("env", f"{key}={value}") for key, value in self.environment.items()),
            ("umask", None if self.umask is None else f"{self.umask:03o}"),
            ("user", self.user),
            ("group", self.group),
            *(("bind", path) for path in self.binds),
            ("root_anchor", self.root_anchor),
            ("init", self.init),
            ("tmp", self.tmp),
            ("cgroup", self.cgroup),
            *(("host_mount", path) for path in HOST_MOUNTS),
            *(("optional_mount", path) for path in OPTIONAL_HOST_MOUNTS),
            ("default_path", DEFAULT_PATH),
            ("cgroup_root", CGROUP_ROOT),
        ]
        return b"".join(
            os.fsencode(f"{key}={value}") + b"\0" for key, value in fields if value is not None
        )


def _check_spec(spec: SandboxSpec) -> None:
    if not isinstance(spec.name, str) or not spec.name:
        raise InvalidSandboxSpec("sandbox spec: name must be a non-empty string")
    where = f"sandbox spec for {spec.name!r}"
    if not spec.command or not all(isinstance(arg, str) for arg in spec.command):
        raise InvalidSandboxSpec(f"{where}: command must be a non-empty list of strings")
    if not spec.command[0]:
        raise InvalidSandboxSpec(f"{where}: command[0] (the program to run) must not be empty")
    _check_no_nul(where, "command", spec.command)
    _check_absolute(where, "directory", spec.directory)
    for key, value in spec.environment.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidSandboxSpec(f"{where}: environment keys and values must be strings")
        if not key or "=" in key:
            raise InvalidSandboxSpec(
                f"{where}: environment variable name {key!r} is empty or has '='"
            )
        _check_no_nul(where, "environment", (key, value))
    if spec.umask is not None and (
        isinstance(spec.umask, bool)
        or not isinstance(spec.umask, int)
        or not 0 <= spec.umask <= 0o777
    ):
        raise InvalidSandboxSpec(
            f"{where}: umask must be an integer from 0 to 0o777, got {spec.umask!r}"
        )
    for key, name in (("user", spec.user), ("group", spec.group)):
        if name is not None and (not isinstance(name, str) or not name or "\0" in name):
            raise InvalidSandboxSpec(f"{where}: {key} must be a non-empty name")
    for path in spec.binds:
        _check_absolute(where, "binds", path)
        if posixpath.normpath(path) == "/":
            raise InvalidSandboxSpec(
                f"{where}: binds may not contain '/' (the root is always there)"
            )
    if len(set(map(posixpath.normpath, spec.binds))) != len(spec.binds):
        raise InvalidSandboxSpec(f"{where}: binds lists the same path twice")
    _check_absolute(where, "root_anchor", spec.root_anchor)
    if spec.init is not None:
        _check_absolute(where, "init", spec.init)
    if spec.tmp is not None:
        _check_absolute(where, "tmp", spec.tmp)
        if "/tmp" in map(posixpath.normpath, spec.binds):
            raise InvalidSandboxSpec(f"{where}: binds may not contain /tmp with a private tmp")
    if spec.cgroup is not None:
        _check_absolute(where, "cgroup", spec.cgroup)
    if posixpath.normpath(spec.root_anchor) == "/":
        raise InvalidSandboxSpec(f"{where}: root_anchor must be an empty directory, not '/'")


def _check_absolute(where: str, key: str, path: object) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidSandboxSpec(f"{where}: {key} must be an absolute path, got {path!r}")
    if ".." in path.split("/"):
        raise InvalidSandboxSpec(f"{where}: {key} must not contain '..', got {path!r}")


def _check_no_nul(where: str, key: str, values: tuple[str, ...]) -> None:
    if any("\0" in value for value in values):
        raise InvalidSandboxSpec(f"{where}: {key} must not contain NUL characters")
