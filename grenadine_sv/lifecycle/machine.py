"""One program's lifecycle as a pure state machine: events in, actions out, no I/O.

The states and their meaning follow supervisord's. Every event that comes from
a process instance carries that instance's number, so a late event from an
instance that is already gone (a timer, a readiness probe, an exit) is ignored
instead of disturbing the next one.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

AutoRestart = Literal["always", "on-failure", "never"]

MAX_BACKOFF_SECONDS = 60.0


class State(StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


ACTIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.STOPPING})
RESTING_STATES = frozenset({State.STOPPED, State.EXITED, State.FATAL})


@dataclass(frozen=True)
class LifecyclePolicy:
    """How a program is restarted and stopped: supervisord's keys of the same names."""

    autorestart: AutoRestart = "on-failure"
    exitcodes: frozenset[int] = frozenset({0})
    startsecs: float = 1.0
    startretries: int = 3
    stopwaitsecs: float = 10.0
    has_ready_probe: bool = False


# Events --------------------------------------------------------------------


@dataclass(frozen=True)
class StartRequested:
    """A start asked for (command, autostart, deploy)."""

    now: float


@dataclass(frozen=True)
class StopRequested:
    """A stop asked for."""

    now: float
    # The process ends by other means (a checkpoint that stops it): no signal is sent.
    by_checkpoint: bool = False


@dataclass(frozen=True)
class StartRefused:
    """A start that cannot happen (a dependency did not come up); the program stays as it
    is, with the reason."""

    reason: str
    now: float


@dataclass(frozen=True)
class Spawned:
    """The instance's process was started, with its pid."""

    instance: int
    pid: int
    now: float


@dataclass(frozen=True)
class SpawnFailed:
    """The instance's process could not be started."""

    instance: int
    reason: str
    now: float
    # No retry: the failure would repeat (a pinned image that cannot be restored).
    fatal: bool = False


@dataclass(frozen=True)
class StopAborted:
    """A checkpoint meant to stop the program failed; the instance goes on running."""

    instance: int
    now: float


@dataclass(frozen=True)
class BecameReady:
    """The instance stayed up for startsecs, or its readiness probe passed."""

    instance: int
    now: float


@dataclass(frozen=True)
class ReadyFailed:
    """The instance's readiness probe failed or timed out."""

    instance: int
    reason: str
    now: float


@dataclass(frozen=True)
class Exited:
    """The instance's process ended, with its returncode."""

    instance: int
    returncode: int
    now: float


@dataclass(frozen=True)
class BackoffElapsed:
    """The wait before start attempt `attempt` is over."""

    attempt: int
    now: float


@dataclass(frozen=True)
class StopTimeout:
    """The instance outlived stopwaitsecs after its stop signal."""

    instance: int
    now: float


Event = (
    StartRequested
    | StartRefused
    | StopRequested
    | Spawned
    | SpawnFailed
    | BecameReady
    | ReadyFailed
    | Exited
    | BackoffElapsed
    | StopTimeout
    | StopAborted
)

# Actions -------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Start the instance's process."""

    instance: int


@dataclass(frozen=True)
class WatchReadiness:
    """Probe readiness (or wait startsecs) and report BecameReady / ReadyFailed."""

    instance: int
    startsecs: float
    use_probe: bool


@dataclass(frozen=True)
class ScheduleRetry:
    """Report BackoffElapsed for `attempt` after `delay` seconds."""

    attempt: int
    delay: float


@dataclass(frozen=True)
class SendStopSignal:
    """Send the instance its stop signal."""

    instance: int


@dataclass(frozen=True)
class ScheduleKill:
    """Report StopTimeout for the instance after `delay` seconds."""

    instance: int
    delay: float


@dataclass(frozen=True)
class Kill:
    """SIGKILL the instance."""

    instance: int


Action = Spawn | WatchReadiness | ScheduleRetry | SendStopSignal | ScheduleKill | Kill


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before start attempt number `attempt` (1-based) after a failure."""
    return min(float(2 ** max(attempt - 1, 0)), MAX_BACKOFF_SECONDS)


@dataclass
class ProgramMachine:
    """One program's lifecycle: `handle(event)` changes the state and returns the actions
    to carry out (spawn, watch readiness, schedule a retry, signal, kill); it does no I/O
    and reads no clock. Events carry the instance number they are about, so a late event
    from a previous instance changes nothing."""

    policy: LifecyclePolicy
    state: State = State.STOPPED
    instance: int = 0
    pid: int | None = None
    failures: int = 0
    since: float = 0.0
    started_at: float | None = None
    ready_at: float | None = None
    last_exit: int | None = None
    # The last exit was the end of a requested stop, not the program's doing.
    last_exit_requested: bool = False
    reason: str = ""
    restart_count: int = 0
    # STOPPING for a checkpoint that ends the instance itself.
    stopping_for_checkpoint: bool = False
    # A stop asked for meanwhile: carried out if that checkpoint fails.
    stop_after_checkpoint: bool = False
    history: list[tuple[float, State]] = field(default_factory=list)

    def handle(self, event: Event) -> list[Action]:
        match event:
            case StartRequested():
                return self._on_start(event)
            case StartRefused():
                return self._on_start_refused(event)
            case StopRequested():
                return self._on_stop(event)
            case Spawned():
                return self._on_spawned(event)
            case SpawnFailed():
                return self._on_spawn_failed(event)
            case BecameReady():
                return self._on_ready(event)
            case ReadyFailed():
                return self._on_ready_failed(event)
            case Exited():
                return self._on_exited(event)
            case BackoffElapsed():
                return self._on_backoff_elapsed(event)
            case StopTimeout():
                return self._on_stop_timeout(event)
            case StopAborted():
                return self._on_stop_aborted(event)

    # transitions -------------------------------------------------------------

    def _on_start(self, event: StartRequested) -> list[Action]:
        if self.state in ACTIVE_STATES:
            return []
        self.failures = 0
        self.reason = ""
        return self._spawn(event.now)

    def _on_start_refused(self, event: StartRefused) -> list[Action]:
        if self.state not in ACTIVE_STATES:
            self.reason = event.reason
        return []

    def _on_stop(self, event: StopRequested) -> list[Action]:
        if self.state == State.BACKOFF:
            self._enter(State.STOPPED, event.now)
            return []
        if self.stopping_for_checkpoint and not event.by_checkpoint:
            self.stop_after_checkpoint = True
            return []
        if self.state not in (State.STARTING, State.RUNNING):
            return []
        self._enter(State.STOPPING, event.now)
        self.stopping_for_checkpoint = event.by_checkpoint
        if event.by_checkpoint or self.pid is None:
            return []
        return [
            SendStopSignal(self.instance),
            ScheduleKill(self.instance, self.policy.stopwaitsecs),
        ]

    def _on_spawned(self, event: Spawned) -> list[Action]:
        if event.instance != self.instance:
            return []
        if self.state == State.STOPPING:
            # A stop came while the instance was being spawned.
            self.pid = event.pid
            return [
                SendStopSignal(self.instance),
                ScheduleKill(self.instance, self.policy.stopwaitsecs),
            ]
        if self.state != State.STARTING:
            return []
        self.pid = event.pid
        self.started_at = event.now
        return [
            WatchReadiness(
                self.instance,
                startsecs=self.policy.startsecs,
                use_probe=self.policy.has_ready_probe,
            )
        ]

    def _on_spawn_failed(self, event: SpawnFailed) -> list[Action]:
        if event.instance != self.instance:
            return []
        self.reason = event.reason
        self.pid = None
        if self.state == State.STOPPING:
            self._enter(State.STOPPED, event.now)
            return []
        if event.fatal:
            self._enter(State.FATAL, event.now)
            return []
        return self._start_failed(event.now)

    def _on_ready(self, event: BecameReady) -> list[Action]:
        if event.instance != self.instance or self.state != State.STARTING:
            return []
        # Failures are forgiven only once the instance has stayed up for startsecs (see
        # _on_exited): a program that dies right after getting ready still backs off.
        self.ready_at = event.now
        self.reason = ""
        self._enter(State.RUNNING, event.now)
        return []

    def _on_ready_failed(self, event: ReadyFailed) -> list[Action]:
        if event.instance != self.instance or self.state != State.STARTING:
            return []
        self.reason = event.reason
        # The instance is alive but never became ready: stop it; its exit then
        # counts as a failed start.
        return [
            SendStopSignal(self.instance),
            ScheduleKill(self.instance, self.policy.stopwaitsecs),
        ]

    def _on_exited(self, event: Exited) -> list[Action]:
        if event.instance != self.instance:
            return []
        self.pid = None
        self.last_exit = event.returncode
        self.last_exit_requested = self.state == State.STOPPING
        if self.state == State.STOPPING:
            self._enter(State.STOPPED, event.now)
            return []
        if self.state == State.STARTING:
            if not self.reason:
                self.reason = f"exited with {describe_returncode(event.returncode)} while starting"
            return self._start_failed(event.now)
        if self.state != State.RUNNING:
            return []
        expected = event.returncode in self.policy.exitcodes
        self.reason = "" if expected else f"exited with {describe_returncode(event.returncode)}"
        restart = self.policy.autorestart == "always" or (
            self.policy.autorestart == "on-failure" and not expected
        )
        self._enter(State.EXITED, event.now)
        if not restart:
            return []
        ran = event.now - (self.ready_at if self.ready_at is not None else event.now)
        if ran < self.policy.startsecs:
            self.reason = (
                f"exited with {describe_returncode(event.returncode)} {ran:.1f}s after it became"
                f" ready (less than startsecs = {self.policy.startsecs:g})"
            )
            return self._start_failed(event.now)
        self.failures = 0
        self.restart_count += 1
        return self._spawn(event.now)

    def _on_backoff_elapsed(self, event: BackoffElapsed) -> list[Action]:
        if self.state != State.BACKOFF or event.attempt != self.failures:
            return []
        self.restart_count += 1
        return self._spawn(event.now)

    def _on_stop_timeout(self, event: StopTimeout) -> list[Action]:
        if event.instance != self.instance or self.pid is None:
            return []
        if self.state not in (State.STOPPING, State.STARTING):
            return []
        return [Kill(self.instance)]

    def _on_stop_aborted(self, event: StopAborted) -> list[Action]:
        if event.instance != self.instance or not self.stopping_for_checkpoint or not self.pid:
            return []
        self.stopping_for_checkpoint = False
        if self.stop_after_checkpoint:
            self.stop_after_checkpoint = False
            return [
                SendStopSignal(self.instance),
                ScheduleKill(self.instance, self.policy.stopwaitsecs),
            ]
        self._enter(State.RUNNING, event.now)
        return []

    # helpers -----------------------------------------------------------------

    def _spawn(self, now: float) -> list[Action]:
        self.instance += 1
        self.pid = None
        self.started_at = None
        self.ready_at = None
        self._enter(State.STARTING, now)
        return [Spawn(self.instance)]

    def _start_failed(self, now: float) -> list[Action]:
        self.failures += 1
        if self.failures > self.policy.startretries:
            self._enter(State.FATAL, now)
            return []
        self._enter(State.BACKOFF, now)
        return [ScheduleRetry(self.failures, backoff_delay(self.failures))]

    def _enter(self, state: State, now: float) -> None:
        self.state = state
        self.since = now
        if state != State.STOPPING:
            self.stopping_for_checkpoint = self.stop_after_checkpoint = False
        if state in RESTING_STATES or state == State.BACKOFF:
            self.started_at = None
        self.history.append((now, state))
        del self.history[:-50]


def describe_returncode(returncode: int) -> str:
    """ "code 3", or "signal TERM" for a process killed by a signal."""
    if returncode < 0:
        return f"signal {signal_name(-returncode)}"
    return f"code {returncode}"


def signal_name(number: int) -> str:
    """`KILL` for 9 (as in `stopsignal`); the number itself for one Python does not name."""
    try:
        return signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return str(number)
