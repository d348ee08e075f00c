"""The progress line of a checkpoint that takes more than a second, on a real terminal (a
pty) against a real dump: time so far, how long the program has been frozen, the MiB written
and the throughput, redrawn in place and erased at the end; nothing in a pipe."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time

import pytest

from tests.conftest import SupervisorDirs
from tests.integration.supervising import python_program, wait_until
from tests.integration.test_cli import GRENADINE_SV, SupervisorProcess, needs_criu, supervisor

__all__ = ["needs_criu", "supervisor"]

pytestmark = [pytest.mark.root, pytest.mark.criu]

# 1.5 GiB of memory that is not zero: its dump takes more than a second (about 1 GiB/s here).
BALLAST_MIB = 1536
BIG = python_program(
    "import os, signal, sys\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    f"ballast = bytearray(os.urandom(1 << 20)) * {BALLAST_MIB}\n"
    "print('ready', flush=True)\n"
    "while True: signal.pause()\n"
)
DRAWN = re.compile(
    r"\r\x1b\[Kcheckpoint big: (?P<elapsed>[0-9.]+)s, frozen (?P<frozen>[0-9.]+)s, "
    r"(?P<written>[0-9.]+) MiB written, [0-9.]+ MiB/s"
)
READ_BOUND_SECONDS = 120.0


def run_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run the command with stderr on a pty; (exit code, stdout, what the terminal got)."""
    leader, follower = pty.openpty()
    command = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL, text=True
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + READ_BOUND_SECONDS
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
    stdout, _ = command.communicate(timeout=READ_BOUND_SECONDS)
    return command.returncode, stdout, shown.decode(errors="replace")


@pytest.mark.usefixtures("needs_criu")
def test_a_long_checkpoint_shows_time_frozen_written_and_throughput_on_a_terminal(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(f"[programs.big]\ncommand = {BIG}\nstartsecs = 0\n")
    supervisor.start()
    supervisor.wait_running("big")
    log = sv_dirs.stdout_log("big")
    wait_until(lambda: log.exists() and "ready" in log.read_text(), 60.0, "the ballast filled")
    code, stdout, terminal = run_on_a_terminal(
        [str(GRENADINE_SV), "-c", str(sv_dirs.config), "checkpoint", "big"]
    )
    assert code == 0, (stdout, terminal)
    assert stdout.startswith("big: checkpoint "), stdout
    assert ", frozen " in stdout  # the final figure, from CRIU's stats
    lines = [m.groupdict() for m in DRAWN.finditer(terminal)]
    assert lines, f"no progress line with the frozen time on the terminal: {terminal!r}"
    for line in lines:
        assert float(line["elapsed"]) >= 1.0  # not before a quiet second
        assert float(line["frozen"]) <= float(line["elapsed"])
    assert float(lines[-1]["written"]) > 0
    assert terminal.endswith("\r\x1b[K"), terminal  # erased: the terminal is left clean

    # In a pipe: the same command prints no progress at all.
    piped = supervisor.cli("checkpoint", "big")
    assert piped.stderr == ""
    assert piped.stdout.startswith("big: checkpoint ")
