"""A minimal container for one program (PID + mount namespaces) that CRIU can dump and restore."""

from grenadine_sv.sandbox.linux import become_subreaper
from grenadine_sv.sandbox.process import (
    LauncherServer,
    SandboxError,
    SandboxProcess,
    spawn_sandbox,
)
from grenadine_sv.sandbox.spec import SandboxSpec

__all__ = [
    "LauncherServer",
    "SandboxError",
    "SandboxProcess",
    "SandboxSpec",
    "become_subreaper",
    "spawn_sandbox",
]
