"""Which configuration file a command reads."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_CONFIG_LOCATIONS = (Path("grenadine.toml"), Path("/etc/grenadine-sv/grenadine.toml"))


def default_config_path() -> Path:
    from_env = os.environ.get("GRENADINE_SV_CONFIG")
    if from_env:
        return Path(from_env)
    for candidate in DEFAULT_CONFIG_LOCATIONS:
        if candidate.exists():
            return candidate
    return DEFAULT_CONFIG_LOCATIONS[-1]


def config_path_of(args: argparse.Namespace) -> Path:
    """The file named by -c, else $GRENADINE_SV_CONFIG, else the first default that exists."""
    return Path(args.config) if args.config is not None else default_config_path()
