"""CRIU's version: read from `criu --version`, compared as numbers."""

from __future__ import annotations

import re

_VERSION_NUMBER = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_CRIU_VERSION_LINE = re.compile(r"^Version:[ \t]*(\S+)", re.MULTILINE)


class UnreadableOutputError(ValueError):
    """A command's output does not have the shape this module expects."""


def parse_version_number(text: str) -> tuple[int, int, int]:
    """'4.2.1' -> (4, 2, 1); '4.2' -> (4, 2, 0); trailing text such as '-rc1' is ignored."""
    match = _VERSION_NUMBER.match(text.strip())
    if match is None:
        raise UnreadableOutputError(f"expected a version such as 4.2.1, got {text.strip()!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def format_version(version: tuple[int, int, int]) -> str:
    return ".".join(str(part) for part in version)


def parse_criu_version(text: str) -> tuple[int, int, int]:
    """The version in `criu --version` output ("Version: 4.2.1", maybe followed by "GitID: ...")."""
    match = _CRIU_VERSION_LINE.search(text)
    if match is None:
        raise UnreadableOutputError(f"no 'Version:' line in criu --version output {text.strip()!r}")
    return parse_version_number(match.group(1))
