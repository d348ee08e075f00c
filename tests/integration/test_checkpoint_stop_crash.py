"""`checkpoint --stop` never loses both the program and its image, whenever the supervisor dies.

Each test SIGKILLs a supervisor it started, by pid, at a condition seen from outside (the
dump's directory appears, CRIU's statistics file appears), or builds the state a kill would
leave, then starts a new supervisor and checks what survived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from grenadine_sv.control.server import ControlError
from grenadine_sv.criu.client import task_condition
from grenadine_sv.criu.facts import ImageFactsError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox.linux import pids_in_pid_namespace, read_pid_ns_inode
from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import (
    COUNTER_SERVICE,
    children_of,
    hit,
    pid_alive,
    python_program,
    running_supervisor,
    wait_state,
    wait_until,
)
from tests.integration.supervisor_processes import GRENADINE_SV, Processes, running_pid

pytestmark = [pytest.mark.root, pytest.mark.criu]

# Enough memory that dumping and sealing take a while (hundreds of ms) on this machine.
BALLAST_MIB = 300


def ballast_counter(port: int) -> str:
    """The example counter service, holding BALLAST_MIB of touched memory besides its count."""
    return python_program(
        "import runpy, sys\n"
        f"ballast = b'x' * ({BALLAST_MIB} << 20)\n"
        f"sys.argv = ['counter', '--port', '{port}']\n"
        f"runpy.run_path({os.fspath(COUNTER_SERVICE)!r}, run_name='__main__')\n"
    )


def counter_config(sv_dirs: SupervisorDirs, port: int) -> Path:
    # Without a private /tmp there is no file snapshot, whose copy needs the supervisor at
    # CRIU's post-dump point: CRIU then finishes a dump on its own after the supervisor died
    # (with a snapshot, CRIU resumes the program instead, and recovery checkpoints it).
    return sv_dirs.write_config(
        f"[programs.counter]\ncommand = {ballast_counter(port)}\nprivate_tmp = false\n"
        f'ready = {{ tcp = "127.0.0.1:{port}", timeout = 60 }}\n'
        'restore = "latest"\n'
    )


def start_counted(
    processes: Processes, config: Path, port: int
) -> tuple[subprocess.Popen[bytes], int]:
    """A supervisor running the counter, hit three times; returns it and the counter's pid."""
    first = processes.supervisor(config)
    wait_until(lambda: running_pid(config, "counter") is not None, 60, "counter running")
    pid = running_pid(config, "counter") or 0
    processes.pids.add(pid)
    assert [hit(port) for _ in range(3)] == [1, 2, 3]
    return first, pid


def next_supervisor(processes: Processes, config: Path, old_pid: int) -> int:
    """After the first supervisor was killed: the next one, once the counter runs again
    other than as `old_pid`; returns the counter's pid."""
    processes.supervisor(config)
    wait_until(lambda: running_pid(config, "counter") not in (None, old_pid), 120, "counter back")
    pid = running_pid(config, "counter") or 0
    processes.pids.add(pid)
    return pid


def partial_dirs(sv_dirs: SupervisorDirs) -> list[Path]:
    program_dir = sv_dirs.state_dir / "images" / "counter"
    try:
        return [p for p in program_dir.iterdir() if p.name.startswith(".partial-")]
    except FileNotFoundError:
        return []


def poll_fast(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_until with a short step: the conditions below last a fraction of a second."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        time.sleep(0.001)


def inside_dump(sv_dirs: SupervisorDirs) -> bool:
    """CRIU has begun (its log exists) and not finished (no statistics yet)."""
    return any(
        (p / "criu" / "dump.log").exists() and not (p / "criu" / "stats-dump").exists()
        for p in partial_dirs(sv_dirs)
    )


def inside_seal(sv_dirs: SupervisorDirs) -> bool:
    return any((p / "criu" / "stats-dump").exists() for p in partial_dirs(sv_dirs))


@pytest.mark.parametrize("kill_when", [inside_dump, inside_seal], ids=["dump", "seal"])
def test_supervisor_killed_during_checkpoint_stop_keeps_the_image_and_the_state(
    sv_dirs: SupervisorDirs, processes: Processes, kill_when: Callable[[SupervisorDirs], bool]
) -> None:
    port = free_port()
    config = counter_config(sv_dirs, port)
    first, old_pid = start_counted(processes, config, port)

    request = subprocess.Popen(
        [*GRENADINE_SV, "-c", str(config), "checkpoint", "--stop", "counter"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes.started.append(request)
    poll_fast(lambda: kill_when(sv_dirs), 60, kill_when.__name__)
    processes.pids.update(children_of(first.pid))  # CRIU, which outlives its supervisor
    first.kill()
    first.wait()
    request.wait(timeout=30)

    next_supervisor(processes, config, old_pid)
    store = ImageStore(sv_dirs.state_dir)
    images = store.list("counter")
    # The dump the killed supervisor made is listed, verifies, and the program came back
    # from it with the count it had: neither the program's state nor its image was lost.
    assert [image.trigger for image in images] == ["manual"]
    store.verify(images[0])
    assert hit(port) == 4
    assert partial_dirs(sv_dirs) == []
    # Exactly one instance: the dumped one is gone.
    assert not pid_alive(old_pid)


def set_stopped(root_pid: int, stopped: bool) -> None:
    for pid in pids_in_pid_namespace(read_pid_ns_inode(root_pid)):
        os.kill(pid, signal.SIGSTOP if stopped else signal.SIGCONT)


def test_frozen_program_whose_image_is_listed_is_ended_by_the_next_supervisor(
    sv_dirs: SupervisorDirs, processes: Processes
) -> None:
    """The state of a supervisor killed after listing the image and before killing the
    frozen tree (a window of microseconds) is built here: the image of a normal checkpoint
    marked as one that stops the program, its instance frozen as CRIU leaves it."""
    port = free_port()
    config = counter_config(sv_dirs, port)
    first, old_pid = start_counted(processes, config, port)
    checkpoint = subprocess.run(
        [*GRENADINE_SV, "-c", str(config), "checkpoint", "counter"],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert checkpoint.returncode == 0, checkpoint.stderr
    assert hit(port) == 4  # after the image: taking the instance back would keep this hit
    first.kill()
    first.wait()
    (image,) = ImageStore(sv_dirs.state_dir).list("counter")
    meta_path = sv_dirs.state_dir / "images" / "counter" / image.id / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert (meta["source_pid"], meta["leave_running"]) == (old_pid, True)
    meta["leave_running"] = False
    meta_path.write_text(json.dumps(meta))
    set_stopped(old_pid, True)

    next_supervisor(processes, config, old_pid)
    wait_until(lambda: not pid_alive(old_pid), 15, "frozen instance ended")
    # Restored from the listed image (3 hits), not the frozen instance resumed (4 hits).
    assert hit(port) == 4


def test_frozen_program_whose_dump_was_not_listed_is_resumed_and_taken_back(
    sv_dirs: SupervisorDirs, processes: Processes
) -> None:
    """A sandbox left stopped with no listed image of it (a dump that did not complete):
    the next supervisor resumes it and takes it back with its memory."""
    port = free_port()
    config = counter_config(sv_dirs, port)
    first, old_pid = start_counted(processes, config, port)
    first.kill()
    first.wait()
    set_stopped(old_pid, True)

    new_pid = next_supervisor(processes, config, old_pid)
    assert hit(port) == 4
    condition = task_condition(new_pid)
    assert condition is not None
    assert not condition.stopped


async def test_checkpoint_stop_whose_image_cannot_be_sealed_resumes_the_program(
    sv_dirs: SupervisorDirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sealing fails here on purpose (a disk error cannot be made to strike just then).
    def unreadable(_criu_dir: Path, **_: object) -> None:
        raise ImageFactsError("stats-dump: simulated read error")

    monkeypatch.setattr("grenadine_sv.supervisor.checkpoints.read_dump_facts", unreadable)
    port = free_port()
    config = counter_config(sv_dirs, port)
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "counter", State.RUNNING, 60)
        assert await trio.to_thread.run_sync(hit, port) == 1
        with pytest.raises(ControlError, match="the program was resumed"):
            await sv.operations.checkpoint_programs(["counter"], stop=True)
        assert sv.programs.runners["counter"].state == State.RUNNING
        assert sv.programs.runners["counter"].machine.pid == pid
        condition = task_condition(pid)
        assert condition is not None
        assert not condition.stopped
        assert await trio.to_thread.run_sync(hit, port) == 2
        assert store.list("counter") == []
        assert partial_dirs(sv_dirs) == []
