"""Which configuration file a command reads (a path as a string: the commands answered by
the running supervisor do without pathlib)."""

from __future__ import annotations

import argparse
import os

DEFAULT_CONFIG_LOCATIONS = ("grenadine.toml", "/etc/grenadine-sv/grenadine.toml")


def default_config_path() -> str:
    from_env = os.environ.get("GRENADINE_SV_CONFIG")
    if from_env:
        return from_env
    for candidate in DEFAULT_CONFIG_LOCATIONS:
        if os.path.exists(candidate):
            return candidate
    return DEFAULT_CONFIG_LOCATIONS[-1]


def config_path_of(args: argparse.Namespace) -> str:
    """The file named by -c, else $GRENADINE_SV_CONFIG, else the first default that exists."""
    return os.fspath(args.config) if args.config is not None else default_config_path()
