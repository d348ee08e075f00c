"""The compiled helper executables (built from this directory's NAME.c by setup.py's
`build_helpers` step into NAME, next to this file)."""

from __future__ import annotations

import os

HELPERS_DIR = os.path.dirname(os.path.abspath(__file__))


class HelperMissing(Exception):
    """A helper executable was not built: the message says how to build it."""


def helper_path(name: str) -> str:
    """The path of the helper `name`, which must have been built and be executable."""
    path = os.path.join(HELPERS_DIR, name)
    if not os.access(path, os.X_OK):
        raise HelperMissing(
            f"grenadine-sv's helper {path} is missing: it is compiled when the package is"
            " installed, which needs a C compiler (apt-get install gcc libc6-dev, then"
            " reinstall grenadine-sv, or run contrib/bootstrap setup in a checkout)"
        )
    return path
