"""The host's mount table as a launch checks it (visibility.MountTable): read once while the
mounts stay as they are, and read again after any mount or unmount, so that a program whose
directory a new mount hides is refused, never started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

# Run in a mount namespace of its own, so that its mounts touch nothing else.
WATCHER = """
import subprocess, sys
from grenadine_sv.sandbox.visibility import MountTable

target = sys.argv[1]
table = MountTable()
print(target in table.points())
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
print(target in table.points())
print(target in table.points())
subprocess.run(["umount", target], check=True)
print(target in table.points())
"""


def test_a_mount_or_unmount_is_seen_at_the_next_look(tmp_path: Path) -> None:
    target = tmp_path / "mounted"
    target.mkdir()
    command = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", WATCHER]
    seen = subprocess.run(
        [*command, str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert seen.stdout.split() == ["False", "True", "True", "False"]
