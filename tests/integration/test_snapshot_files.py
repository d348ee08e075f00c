"""Files are state too: checkpoint.snapshot paths and the private /tmp are copied into the
image while the program is frozen and written back at restore, so memory and files match."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.core import Supervisor
from tests.conftest import SupervisorDirs
from tests.integration.supervising import python_program, running_supervisor, wait_for, wait_state

pytestmark = [pytest.mark.root, pytest.mark.criu]


def writer(path: str) -> str:
    """Opens `path` with "w" and keeps it open, writing a numbered line at each SIGUSR2."""
    return python_program(
        "import signal, sys, time\n"
        f"out = open({path!r}, 'w')\n"
        "n = 0\n"
        "def line(*_):\n"
        "    global n\n"
        "    n += 1; out.write(f'line {n}\\n'); out.flush()\n"
        "signal.signal(signal.SIGUSR2, line)\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(1)\n"
    )


async def write_lines(sv: Supervisor, count: int, path: Path) -> None:
    for _ in range(count):
        before = path.read_text()
        process = sv.programs.runners["writer"].process
        assert process is not None
        process.send_signal(signal.SIGUSR2)  # through the init to the program
        await wait_for(lambda before=before: path.read_text() != before)


@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot", "no-snapshot"])
async def test_a_file_changed_after_the_dump_is_put_back_from_the_snapshot(
    sv_dirs: SupervisorDirs, snapshot: bool
):
    data = sv_dirs.root / "data"
    data.mkdir()
    out = data / "out.txt"
    keys = f'snapshot = ["{data}"]\n' if snapshot else ""
    config = sv_dirs.write_config(
        f"[programs.writer]\ncommand = {writer(str(out))}\nstartsecs = 0.2\n"
        f'binds = ["{data}"]\nrestore_fallback = "fail"\n[programs.writer.checkpoint]\n{keys}'
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "writer", State.RUNNING)
        log = sv_dirs.stdout_log("writer")
        await wait_for(lambda: log.exists() and b"ready" in log.read_bytes())
        await write_lines(sv, 2, out)
        [entry] = await sv.operations.checkpoint_programs(["writer"], stop=False)
        assert entry["ok"]
        await write_lines(sv, 1, out)  # the file changes after the dump
        await sv.operations.stop_programs(["writer"])
        with capture_logs() as logs:
            result = await sv.operations.restore_program("writer", "latest")
        if not snapshot:
            # CRIU's rule: the file changed since the dump; the message names it and the key.
            assert result["state"] == "FATAL"
            assert f"File {str(out)[1:]} has bad size" in result["reason"]
            assert "list its path in checkpoint.snapshot" in result["reason"]
            return
        await wait_state(sv, "writer", State.RUNNING)
        assert out.read_text() == "line 1\nline 2\n", "the file as it was at the dump"
        assert [e for e in logs if e["event"] == "snapshot_written_back"]
        await write_lines(sv, 1, out)
        assert out.read_text() == "line 1\nline 2\nline 3\n", "memory and file agree"
