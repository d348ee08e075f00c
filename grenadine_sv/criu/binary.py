"""Which CRIU binary to use, and its version."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from grenadine_sv.criu.version import UnreadableOutputError, parse_criu_version

MIN_CRIU_VERSION = (4, 2, 0)
INSTALLED_CRIU = Path("/usr/local/sbin/criu")
CRIU_ENV_VAR = "GRENADINE_SV_CRIU"
INSTALL_ADVICE = "run contrib/install-criu to install CRIU >= 4.2"
VERSION_TIMEOUT_SECONDS = 10.0


class CriuNotFound(Exception):
    pass


class CriuVersionUnknown(Exception):
    pass


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _checked(path: Path, origin: str) -> Path:
    if not _is_executable(path):
        raise CriuNotFound(
            f"{origin} names {path}, which is not an executable file; {INSTALL_ADVICE}"
        )
    return path


def find_criu(configured: Path | None = None) -> Path:
    """The CRIU to use: `configured`, then $GRENADINE_SV_CRIU, then /usr/local/sbin/criu, then PATH.

    A path given explicitly (argument or environment) must work: it is never skipped silently.
    """
    if configured is not None:
        return _checked(configured, "the configuration")
    from_env = os.environ.get(CRIU_ENV_VAR)
    if from_env:
        return _checked(Path(from_env), f"${CRIU_ENV_VAR}")
    if _is_executable(INSTALLED_CRIU):
        return INSTALLED_CRIU
    on_path = shutil.which("criu")
    if on_path is not None:
        return Path(on_path)
    raise CriuNotFound(f"no criu at {INSTALLED_CRIU} nor on PATH; {INSTALL_ADVICE}")


def criu_version(path: Path) -> tuple[int, int, int]:
    """The version `path --version` reports, e.g. (4, 2, 1)."""
    try:
        result = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CriuVersionUnknown(f"cannot run {path} --version: {exc}") from exc
    try:
        return parse_criu_version(result.stdout)
    except UnreadableOutputError as exc:
        raise CriuVersionUnknown(
            f"{path} --version (exit {result.returncode}) did not report a version: {exc}"
        ) from exc
