"""What survives a supervisor killed with SIGKILL: its programs' sandboxes.

Each program runs in its own cgroup (sandbox/cgroup.py), which the kernel keeps whatever the
supervisor managed to write: the next supervisor finds the survivors there first, keeps one
instance per program and ends any other copy. It also reads `state_dir/supervisor.json`,
where every running instance (pid, start time, PID namespace inode) is recorded, for
instances outside any cgroup (a host without cgroup v2), proving they are the same processes
(never trusting a pid or a name alone). It takes each survivor back: it checkpoints it and
restores it as its own child, so the program keeps its memory and its output is captured
again. An orphan that cannot be taken back that way is stopped cleanly and started anew.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import structlog
import trio

from grenadine_sv.config.loading import Config, ProgramConfig
from grenadine_sv.criu.client import task_condition
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox.cgroup import ProgramCgroup, ProgramCgroups
from grenadine_sv.sandbox.linux import (
    STAT_STATE,
    read_pid_ns_inode,
    read_start_time,
    resume_sandbox,
    stat_fields,
)
from grenadine_sv.store.images import ImageMeta, ImageStore
from grenadine_sv.supervisor.checkpoints import CheckpointService, kill_frozen_orphan
from grenadine_sv.supervisor.image_service import CheckpointError
from grenadine_sv.supervisor.membership import census, end_processes
from grenadine_sv.supervisor.runner import Launcher, ProgramRunner

log = structlog.get_logger()

STATE_FILE = "supervisor.json"
LOCK_FILE = "supervisor.lock"
# How long a new supervisor waits for a CRIU restore its killed predecessor left running.
RESTORER_WAIT_SECONDS = 300.0
# How long a new supervisor waits for a CRIU dump its killed predecessor left running.
LEFTOVER_CRIU_WAIT_SECONDS = 120.0
LOCK_POLL_SECONDS = 0.05


class StateDirBusy(Exception):
    pass


@dataclass(frozen=True)
class RecordedInstance:
    """A running instance as the state file records it, to find it again after a crash."""

    pid: int
    start_time: int
    pid_ns_inode: int
    definition_digest: str


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[IO[str]]:
    """Hold an exclusive lock on state_dir for the supervisor's lifetime.

    The supervisor's CRIU dumps hold the lock too: when a killed supervisor's CRIU still
    runs, this waits (bounded) for it to finish, so that its dump is complete, and its
    program frozen, before the next supervisor looks at either."""
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    handle = os.fdopen(fd, "r+")
    try:
        if not _try_lock(handle):
            holder = _recorded_holder(handle)
            if holder is None or _process_alive(holder):
                raise StateDirBusy(f"another supervisor is using {state_dir} (it holds {path})")
            log.warning(
                "waiting_for_criu_of_killed_supervisor",
                supervisor_pid=holder,
                bound_seconds=LEFTOVER_CRIU_WAIT_SECONDS,
            )
            if not _wait_for_lock(handle, LEFTOVER_CRIU_WAIT_SECONDS):
                raise StateDirBusy(
                    f"{path} is still held, {LEFTOVER_CRIU_WAIT_SECONDS:.0f} s after the "
                    f"supervisor that took it (pid {holder}) is gone: a process it started "
                    f"(CRIU) keeps it; find it with `fuser -v {path}`"
                )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield handle
    finally:
        handle.close()


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait_for_lock(handle: IO[str], bound: float) -> bool:
    """Poll for the lock (before the event loop does anything else) until `bound` seconds."""
    deadline = time.monotonic() + bound
    while not _try_lock(handle):
        if time.monotonic() > deadline:
            return False
        time.sleep(LOCK_POLL_SECONDS)
    return True


def _recorded_holder(handle: IO[str]) -> int | None:
    """The pid the lock's holder wrote into the lock file."""
    handle.seek(0)
    text = handle.read().strip()
    return int(text) if text.isdigit() else None


def _process_alive(pid: int) -> bool:
    try:
        state = stat_fields(pid)[STAT_STATE]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def write_state(state_dir: Path, instances: Mapping[str, RecordedInstance]) -> None:
    """Replace the state file atomically (a crash leaves the old or the new one)."""
    path = state_path(state_dir)
    temporary = path.with_name(f".{STATE_FILE}.tmp")
    document = {
        "supervisor_pid": os.getpid(),
        "programs": {name: asdict(instance) for name, instance in instances.items()},
    }
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle)
    os.replace(temporary, path)


def read_state(state_dir: Path) -> dict[str, RecordedInstance]:
    path = state_path(state_dir)
    try:
        document: Any = json.loads(path.read_text())
        return {
            str(name): RecordedInstance(
                pid=int(entry["pid"]),
                start_time=int(entry["start_time"]),
                pid_ns_inode=int(entry["pid_ns_inode"]),
                definition_digest=str(entry["definition_digest"]),
            )
            for name, entry in document["programs"].items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("state_file_unreadable", path=str(path), error=str(exc))
        return {}


def is_same_process(instance: RecordedInstance) -> bool:
    """True when the recorded pid still names the very process that was recorded."""
    try:
        return (
            read_start_time(instance.pid) == instance.start_time
            and read_pid_ns_inode(instance.pid) == instance.pid_ns_inode
            and instance.pid_ns_inode != read_pid_ns_inode(os.getpid())
        )
    except (OSError, ValueError):
        return False


def _running(pid: int, start_time: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X") and read_start_time(pid) == start_time
    except (OSError, ValueError, IndexError):
        return False


async def wait_for_restorer(cgroup: ProgramCgroup) -> None:
    """A CRIU restore a killed supervisor left running into this cgroup: let it finish, so
    that the instance it brings back is found here rather than started a second time."""
    restorer = await trio.to_thread.run_sync(cgroup.restorer)
    if restorer is None:
        return
    pid, start_time = restorer
    if _running(pid, start_time):
        log.warning("waiting_for_restore_in_progress", program=cgroup.program, criu_pid=pid)
        with trio.move_on_after(RESTORER_WAIT_SECONDS):
            while _running(pid, start_time):
                await trio.sleep(0.05)
    cgroup.clear_restorer()


async def cgroup_survivors(
    cgroups: ProgramCgroups, recorded: Mapping[str, RecordedInstance]
) -> dict[str, RecordedInstance]:
    """One instance per program found in the programs' cgroups (the recorded one if it is
    there, else the oldest); every other process found there is ended."""
    found: dict[str, RecordedInstance] = {}
    for cgroup in await trio.to_thread.run_sync(lambda: list(cgroups.existing())):
        await wait_for_restorer(cgroup)
        sandboxes, strays = await trio.to_thread.run_sync(census, cgroup)
        noted = recorded.get(cgroup.program)
        keep = next(
            (
                s
                for s in sandboxes
                if noted is not None and (s.root, s.start_time) == (noted.pid, noted.start_time)
            ),
            min(sandboxes, key=lambda s: s.start_time, default=None),
        )
        extras = [s.root for s in sandboxes if s is not keep] + strays
        if extras:
            log.warning("extra_copies_ended", program=cgroup.program, pids=extras)
            end_processes(extras)
        if keep is None:
            continue
        try:
            digest = cgroup.definition()
        except OSError:
            digest = None
        if digest is None and noted is not None and noted.pid == keep.root:
            digest = noted.definition_digest
        found[cgroup.program] = RecordedInstance(
            pid=keep.root,
            start_time=keep.start_time,
            pid_ns_inode=keep.pid_ns_inode,
            definition_digest=digest or "",
        )
    return found


async def find_orphans(
    state_dir: Path, cgroups: ProgramCgroups | None
) -> dict[str, RecordedInstance]:
    """The instances a killed supervisor may have left, by program: the one found in each
    program's cgroup, else the one the state file records (alive or not: check it)."""
    recorded = await trio.to_thread.run_sync(read_state, state_dir)
    found = await cgroup_survivors(cgroups, recorded) if cgroups is not None else {}
    return {**recorded, **found}


async def stop_orphan(
    name: str, instance: RecordedInstance, stop_signal: int, stop_wait: float
) -> None:
    """Stop a sandbox that is not our child: stop signal, grace period, SIGKILL."""
    try:
        pidfd = os.pidfd_open(instance.pid)
    except ProcessLookupError:
        return
    try:
        for sig, grace in ((stop_signal, stop_wait), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
            with trio.move_on_after(grace):
                await trio.lowlevel.wait_readable(pidfd)
                log.info("orphan_stopped", program=name, pid=instance.pid)
                return
        log.error("orphan_did_not_stop", program=name, pid=instance.pid)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


class Recovery:
    """Keeps the state file listing every live instance, and after a crash takes back the
    instances the previous supervisor left running."""

    def __init__(self, state_dir: Path, checkpoints: CheckpointService | None) -> None:
        self.state_dir = state_dir
        self.checkpoints = checkpoints
        self._recorded: dict[str, RecordedInstance] = {}
        # Orphans ended to be restored from their image, until their restore is over: a
        # supervisor killed before that leaves them in the state file for the next one.
        self._taking_back: dict[str, RecordedInstance] = {}
        self._changed = trio.Event()
        self._writes = trio.Lock()
        # Set by the supervisor once it runs, when the host has a usable cgroup v2 hierarchy.
        self.cgroups: ProgramCgroups | None = None

    async def keep_state_file(self) -> None:
        """Write the state file each time the recorded instances change, in a worker thread
        (a file write on every state change would stall the event loop). One writer, each
        write a snapshot taken after the previous write ended: the file only ever moves
        forward, and the last write is the last state."""
        while True:
            await self._changed.wait()
            # Only this loop replaces the event: a write_now elsewhere (take-back, shutdown)
            # that replaced it left this loop waiting on an event nothing would set again,
            # and the state file stopped following the programs.
            self._changed = trio.Event()
            await self.write_now()

    async def write_now(self) -> None:
        """Write the recorded instances as they are now (also at shutdown)."""
        async with self._writes:
            snapshot = {**self._taking_back, **self._recorded}
            try:
                await trio.to_thread.run_sync(write_state, self.state_dir, snapshot)
            except OSError as exc:
                log.error("state_file_write_failed", error=str(exc))

    def record_instances(self, runner: ProgramRunner, before: State, after: State) -> None:
        """A runner's state observer: keep the recorded instances (and, through
        keep_state_file, state_dir/supervisor.json) up to date."""
        process = runner.process
        name = runner.name
        alive = process is not None and process.returncode is None and runner.machine.pid
        if name in self._taking_back and (alive or after is not State.STARTING):
            del self._taking_back[name]
            self._changed.set()
        if alive and process is not None:
            entry = RecordedInstance(
                pid=process.pid,
                start_time=process.start_time,
                pid_ns_inode=process.pid_ns_inode,
                definition_digest=runner.config.definition_digest(),
            )
            if self._recorded.get(name) == entry:
                return
            self._recorded[name] = entry
        elif self._recorded.pop(name, None) is None:
            return
        self._changed.set()

    @property
    def image_store(self) -> ImageStore:
        if self.checkpoints is not None:
            return self.checkpoints.store
        return ImageStore(self.state_dir)

    async def take_back_orphans(self, config: Config) -> dict[str, Launcher]:
        """Sandboxes a killed supervisor left running: checkpoint each and restore it as our
        child (its memory kept, its output captured again); stop the others cleanly.
        Returns the launcher that restores each program taken back.

        A sandbox left frozen by a checkpoint that stops it is finished off when its image was
        listed (and restored from it when the checkpoint was such a take-back), else resumed
        and taken back like the others."""
        launchers: dict[str, Launcher] = {}
        recorded = await find_orphans(self.state_dir, self.cgroups)
        # Every instance found (some only in their cgroup) is in the state file before any
        # is ended: a supervisor killed during the take-back leaves the next one the
        # instance whose image it restores.
        self._taking_back = dict(recorded)
        if recorded:
            await self.write_now()
        for name, instance in recorded.items():
            launcher = await self._take_back(name, instance, config.programs.get(name))
            if launcher is None:
                del self._taking_back[name]
            else:
                launchers[name] = launcher
        if len(launchers) < len(recorded):
            await self.write_now()
        await self._remove_empty_cgroups()
        return launchers

    async def _take_back(
        self, name: str, instance: RecordedInstance, program: ProgramConfig | None
    ) -> Launcher | None:
        """Deal with one instance a killed supervisor left; the launcher that restores it as
        our child, or None when it is gone or was stopped."""
        bound = log.bind(program=name, pid=instance.pid)
        frozen_into = await trio.to_thread.run_sync(self._image_that_froze, name, instance)
        alive = await trio.to_thread.run_sync(is_same_process, instance)
        if frozen_into is not None:
            if alive:
                bound.warning("frozen_program_killed", image_id=frozen_into.id)
                await kill_frozen_orphan(instance.pid, instance.start_time)
            if frozen_into.trigger == "recovery" and program is not None:
                return self._restorer(frozen_into)
            return None
        if not alive:
            return None
        condition = task_condition(instance.pid)
        if condition is not None and condition.stopped and condition.tracer_pid == 0:
            resumed = await trio.to_thread.run_sync(resume_sandbox, instance.pid)
            bound.warning("frozen_program_resumed", processes=resumed)
        if (
            program is not None
            and self.checkpoints is not None
            and program.definition_digest() == instance.definition_digest
        ):
            try:
                image = await self.checkpoints.recover_orphan(
                    program, instance.pid, instance.start_time
                )
            except CheckpointError as exc:
                bound.warning("orphan_not_recovered", error=str(exc))
            else:
                bound.info("orphan_checkpointed", image_id=image.id)
                return self._restorer(image)
        stop_signal = program.stop_signal if program is not None else signal.SIGTERM
        stop_wait = program.stopwaitsecs if program is not None else 10.0
        bound.warning("orphan_stopping")
        await stop_orphan(name, instance, stop_signal, stop_wait)
        return None

    async def _remove_empty_cgroups(self) -> None:
        """The predecessor's programs' cgroups that nothing runs in any more (a program
        start makes its cgroup again)."""
        if self.cgroups is None:
            return
        removed = await trio.to_thread.run_sync(self.cgroups.remove_empty_programs)
        if removed:
            log.info("empty_cgroups_removed", programs=removed)

    def _image_that_froze(self, name: str, instance: RecordedInstance) -> ImageMeta | None:
        """The listed image a checkpoint that stops the program took of this very instance."""
        try:
            images = self.image_store.list(name)
        except ValueError:
            return None
        return next((m for m in images if m.froze(instance.pid, instance.start_time)), None)

    def _restorer(self, image: ImageMeta) -> Launcher:
        assert self.checkpoints is not None
        return partial(self.checkpoints.launch_with_fallback, image=image, occasion="recovery")
