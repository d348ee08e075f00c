"""Reading what a command shows on a terminal (a pty), for the tests of terminal output."""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import Any


def read_terminal(leader: int, command: subprocess.Popen[Any], bound: float) -> bytes:
    """Everything written to the pty whose leader end is `leader` until its writers close it
    or `command` has exited with nothing more to read; at most `bound` seconds. Closes
    `leader`."""
    shown = b""
    deadline = time.monotonic() + bound
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if command.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    return shown
