"""What every sandbox has besides the program's binds: the host mounts the launcher binds into
its root, the cgroup mounts it binds too, and the PATH a program without one is searched in.

The launcher (grenadine-launch) holds none of these: `SandboxSpec.to_wire` sends them."""

from __future__ import annotations

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_MOUNTS = ("/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/tmp", "/sys")
# Bound only where the host has them.
OPTIONAL_HOST_MOUNTS = ("/dev/mqueue",)
