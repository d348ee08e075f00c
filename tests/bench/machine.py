"""What the figures were measured on: hardware, kernel, versions, date, load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

from grenadine_sv.criu.binary import CriuNotFound, CriuVersionUnknown, criu_version, find_criu


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / (1 << 20), 1)
    return 0.0


def _filesystem_of(path: Path) -> str:
    """The type of the mount holding `path` (the longest mount point that prefixes it)."""
    best, fstype = "", "?"
    target = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mount_point = fields[1]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, f"{fields[2]} ({fields[0]})"
    return fstype


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _criu() -> str:
    try:
        return ".".join(str(part) for part in criu_version(find_criu()))
    except (CriuNotFound, CriuVersionUnknown) as exc:
        return f"unavailable ({exc})"


def machine_facts() -> dict[str, str]:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()} x {os.cpu_count()}",
        "memory": f"{_memory_gib()} GiB",
        "kernel": platform.release(),
        "criu": _criu(),
        "python": platform.python_version(),
        "grenadine-sv": _version("grenadine-sv"),
        "supervisor": _version("supervisor"),
        "/tmp filesystem": _filesystem_of(Path("/tmp")),
        "load average at start": load,
    }
