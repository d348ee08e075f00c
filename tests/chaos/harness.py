"""The chaos harness: random operations through the real `grenadine-sv` command line against a
real supervisor, SIGKILLs of that supervisor at random moments (aimed inside CRIU's dumps, the
sealing of images, CRIU's restores and, for programs with restore_mode = "lazy", while CRIU's
lazy-pages daemon still serves a restored program's memory), then a new supervisor and the
invariants of issue 11 (a lazily restored program answers with its token and its ballast whole:
never a program silently missing memory):

- exactly one instance of every program that should run, none of one that should not (counted
  from /proc: command line, PID namespace, parent; and its cgroup when it has one);
- every image listed before a kill is still listed (unless the operation in flight could delete
  it) and verifies;
- a program restored or taken back answers with the token it had; never an older one unless a
  restore of an older image was asked for;
- nothing of a program runs outside supervision once recovery is over.

One *episode* is one seed: a fresh state directory, a supervisor, `iterations` operations.
Everything it starts is ended by pid, and its directory removed, when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grenadine_sv.control import client as control
from grenadine_sv.control import protocol
from grenadine_sv.criu.binary import find_criu
from grenadine_sv.store.images import ImageCorrupt, ImageMeta, ImageStore
from tests.chaos import kernel
from tests.chaos.remote_mode import (
    REMOTE_OPERATION,
    REMOTE_TARGETS,
    RemoteMode,
    RemoteObject,
    new_remote_mode,
    object_store_server,
)
from tests.conftest import free_port
from tests.integration.object_store import WeedServer

TOKEN_SERVICE = Path(__file__).resolve().with_name("token_service.py")
CLI = Path(sys.executable).with_name("grenadine-sv")

# Operations (the list). "usr1" is `kill -USR1 <supervisor pid>`; "none" runs nothing
# (a kill then lands wherever the supervisor is, or in the next supervisor's take-back).
OPERATIONS = (
    "start",
    "stop",
    "checkpoint",
    "checkpoint-stop",
    "restore",
    "reload-changed",
    "reload-unchanged",
    "prune",
    "rmi",
    "usr1",
    "none",
    "shutdown",
    "restart",
    "signal",
    "update",
    "clear",
)
# supervisorctl's verbs that change state (`python -m tests.chaos` runs them with the rest).
SUPERVISORCTL_VERBS = ("restart", "signal", "update", "clear")
# Operations that exist only once main has them (the command they need).
NEEDS_COMMAND = {
    "shutdown": "shutdown",
    "rmi": "rmi",
    "restart": "restart",
    "signal": "signal",
    "update": "update",
    "clear": "clear",
}
# What `signal` sends: the token service prints a line for HUP and ignores USR2; KILL is a
# crash, which the supervisor answers with a cold start (restore_on leaves out "crash").
SIGNALS = ("HUP", "USR2", "KILL")
# Where a kill is aimed. "anywhere" is a random delay into the operation; "recovery" kills the
# next supervisor again while it takes its programs back (inside its dump or restore).
KILL_TARGETS = ("dump", "sealing", "restore", "lazy", "anywhere", "recovery")
DUMPING_OPERATIONS = (
    "checkpoint",
    "checkpoint-stop",
    "usr1",
    "reload-changed",
    "update",
    "shutdown",
)
LANDINGS = ("dump", "sealing", "restore", "lazy", *REMOTE_TARGETS, "elsewhere")

KEEP = 3
REMOTE_KEEP = 1
# Triggers of images made by checkpoints that end the program once the image is listed.
STOPPING_TRIGGERS = ("manual", "shutdown")
KEEPER_COMM = "grenadine-keep"
# After any kill, the share of iterations that also kill the next supervisor in its take-back.
TAKE_BACK_KILL_SHARE = 0.25
SETTLE_POLL = 0.1
WATCH_POLL = 0.003
CLI_TIMEOUT = 180.0
TOKEN_LINE = re.compile(r"token=([0-9a-f]{32}) ballast=(\w+)")
TICK_LINE = re.compile(r"^tick (\d+) token=([0-9a-f]{32})$", re.MULTILINE)
# How long a program's output may take to show in its log (it prints every print_interval).
OUTPUT_BOUND = 10.0
IMAGE_TOKEN = re.compile(rb"CHAOSTOKEN:([0-9a-f]{32})")
# A program's own cgroup is one the harness is not in (the supervisor may make one per program).
OWN_CGROUP = kernel.cgroup_v2_path(os.getpid())


@dataclass
class Options:
    iterations: int = 12
    programs: int = 3
    operations: tuple[str, ...] = OPERATIONS
    kill_targets: tuple[str, ...] = KILL_TARGETS
    kill_share: float = 0.7
    # Phases of the next supervisor's take-back in which it may be killed again.
    take_back_targets: tuple[str, ...] = ("dump", "sealing", "restore")
    # Operations during which a kill may be aimed (all, unless a fix has not landed yet).
    kill_operations: tuple[str, ...] = OPERATIONS
    print_interval: float = 0.2
    ballast_mib: tuple[int, int] = (16, 48)
    # The share of programs restored lazily (restore_mode = "lazy"), drawn per episode.
    lazy_share: float = 0.5
    # A new supervisor must have every program back, supervised, within this many seconds.
    recovery_bound: float = 30.0
    keep_dir: bool = False
    # By hand a failing episode's directory is kept for a look; the CI test removes it.
    keep_failing_dir: bool = False
    # Remote mode (remote_mode.py): uploads to a real object store, `remote-restore`, kills
    # aimed at "upload" and "remote-restore"; rmi is left out (it may delete an image waiting
    # for upload, which the remote invariants forbid).
    remote: bool = False


@dataclass
class Tally:
    """What a run did, for the report."""

    episodes: int = 0
    iterations: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    """Where each kill landed: dump, sealing, restore, elsewhere."""
    kill_details: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    recovery_seconds: list[float] = field(default_factory=list)

    def merge(self, other: Tally) -> None:
        self.episodes += other.episodes
        self.iterations += other.iterations
        self.operations.update(other.operations)
        self.kills.update(other.kills)
        self.kill_details.update(other.kill_details)
        self.checks.update(other.checks)
        self.violations.extend(other.violations)
        self.recovery_seconds.extend(other.recovery_seconds)


class Violation(Exception):
    """An invariant that does not hold; the message says which, for which program, and how."""


@dataclass
class Expected:
    """What may be true of one program after an operation (and maybe a kill)."""

    tokens: set[str] = field(default_factory=set)
    fresh: bool = False
    """A token never seen before (a cold start) is allowed."""
    running: bool | None = True
    """None: either (only after an operation whose outcome a kill left open)."""
    why: str = ""


@dataclass
class Program:
    name: str
    port: int
    ballast_mib: int
    on_stop: bool = False
    lazy: bool = False
    generation: int = 0
    token: str | None = None
    seen: list[str] = field(default_factory=list)


class Episode:
    def __init__(
        self,
        seed: int,
        options: Options,
        log: Callable[[str], None],
        object_store: WeedServer | None = None,
    ) -> None:
        self.seed = seed
        self.options = options
        self.rng = random.Random(seed)
        self.log = log
        self.tally = Tally(episodes=1)
        self.root = Path(tempfile.mkdtemp(prefix="gsv-chaos-", dir="/tmp"))
        self.run_id = f"chaos{seed}x{os.getpid()}"
        self.config = self.root / "grenadine.toml"
        self.state_dir = self.root / "state"
        self.socket = self.root / "ctl.sock"
        self.store = ImageStore(self.state_dir)
        self.criu_binary = find_criu(None).resolve()
        self.programs = {
            f"p{i}": Program(f"p{i}", free_port(), self.rng.randint(*options.ballast_mib))
            for i in range(options.programs)
        }
        features = cli_features()
        self.operations = [
            o
            for o in options.operations
            if NEEDS_COMMAND.get(o, o) in features or o not in NEEDS_COMMAND
        ]
        self.remote: RemoteMode | None = None
        self.keep = KEEP
        if object_store is not None:
            # Uploaded images leave the host soon: remote restores then download them.
            self.keep = REMOTE_KEEP
            self.remote = new_remote_mode(object_store, self.root, seed)
            # A remote restore is twice as likely as any other operation: remote mode is for it.
            self.operations = [o for o in self.operations if o != "rmi"] + [REMOTE_OPERATION] * 2
        for p in self.programs.values():
            p.on_stop = "shutdown" in features and self.rng.random() < 0.5
            p.lazy = "restore_mode" in features and self.rng.random() < options.lazy_share
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.exited_before_kill = False
        self.generation = 0
        self.criu_seen: dict[int, int] = {}
        # Stdio keepers the supervisors started (they outlive a killed supervisor).
        self.keepers_seen: dict[int, int] = {}
        self.image_tokens: dict[str, str] = {}
        # How long each phase lasted when last seen: a kill waits a random part of it.
        self.phase_seconds = dict.fromkeys(("dump", "sealing", "restore", "lazy"), 0.02)
        self.iteration = 0
        self.history: list[str] = []

    # running -----------------------------------------------------------------

    def run(self) -> Tally:
        try:
            self.write_config()
            self.start_supervisor()
            self.settle(started=time.monotonic(), expected=self.cold_expectations())
            for iteration in range(1, self.options.iterations + 1):
                self.iteration = iteration
                self.one_iteration()
                self.tally.iterations += 1
            if self.remote is not None:
                self.remote.check_at_end(self)
        except Violation as exc:
            message = f"seed {self.seed}, iteration {self.iteration}: {exc}"
            self.tally.violations.append(message)
            self.log(f"VIOLATION {message}")
            self.log("  history: " + " | ".join(self.history[-8:]))
            for line in self.supervisor_log_tail():
                self.log(f"  {line}")
        finally:
            self.clean_up()
        return self.tally

    def one_iteration(self) -> None:
        operation = self.choose_operation()
        killable = operation in self.options.kill_operations or operation == REMOTE_OPERATION
        kill = killable and self.rng.random() < self.options.kill_share
        target = self.choose_target(operation) if kill else None
        self.tally.operations[operation] += 1
        before = {p.name: p.token for p in self.programs.values()}
        images_before = {m.id: m for m in self.store.list()}
        started = time.monotonic()
        outcome = self.perform(operation, target)
        target_name = f" {outcome.program.name}" if outcome.program is not None else ""
        self.history.append(f"{operation}{target_name} -> {outcome.summary}")
        if target is None and outcome.landing is None:
            self.check(outcome.expected, images_before, outcome.may_vanish, started=None)
            return
        self.log(
            f"  iteration {self.iteration}: {operation}, kill aimed at {target}, "
            f"landed {outcome.landing}"
        )
        recovery_started = time.monotonic()
        self.start_supervisor()
        if target == "recovery" or (
            "recovery" in self.options.kill_targets and self.rng.random() < TAKE_BACK_KILL_SHARE
        ):
            self.kill_during_recovery()
        del before, started
        self.check(
            outcome.expected,
            images_before,
            outcome.may_vanish,
            started=recovery_started,
            fresh_if_new_image=outcome.fresh_if_new_image,
        )

    def choose_operation(self) -> str:
        allowed = list(self.operations)
        running = [p for p in self.programs.values() if p.token is not None]
        stopped = [p for p in self.programs.values() if p.token is None]
        if not stopped:
            allowed = [o for o in allowed if o != "start"]
        if not running:
            allowed = [
                o for o in allowed if o not in ("stop", "checkpoint", "checkpoint-stop", "signal")
            ]
        if not self.store.list():
            allowed = [o for o in allowed if o not in ("restore", "rmi")]
        if REMOTE_OPERATION in allowed and (self.remote is None or not self.remote.objects()):
            allowed = [o for o in allowed if o != REMOTE_OPERATION]
        return self.rng.choice(allowed or ["none"])

    def choose_target(self, operation: str) -> str:
        # Weighted towards CRIU's calls, the moments the issue is about.
        weights = {"anywhere": 1, "recovery": 1}
        if operation in DUMPING_OPERATIONS:
            weights |= {"dump": 2, "sealing": 3}
        if operation == "restore":
            weights["restore"] = 3
            if any(p.lazy for p in self.programs.values()):
                # While CRIU's lazy-pages daemon still serves the restored program's memory.
                weights["lazy"] = 2
        if self.remote is not None and operation in DUMPING_OPERATIONS:
            weights["upload"] = 3
        if operation == REMOTE_OPERATION:
            weights |= {"remote-restore": 3, "restore": 2}
        allowed = [
            t
            for t in weights
            if t in self.options.kill_targets or (self.remote is not None and t in REMOTE_TARGETS)
        ] or ["anywhere"]
        return self.rng.choices(allowed, [weights.get(t, 1) for t in allowed])[0]

    # the supervisor ------------------------------------------------------------

    def write_config(self) -> None:
        tables = [
            f'[supervisor]\nstate_dir = "{self.state_dir}"\nlog_dir = "{self.root}/logs"\n'
            f'control_socket = "{self.socket}"\nlog_format = "json"\n\n'
            '[supervisor.metrics]\nlisten = ""\n'
        ]
        for p in self.programs.values():
            command = [
                sys.executable,
                "-I",
                "-S",
                "-u",
                os.fspath(TOKEN_SERVICE),
                "--port",
                str(p.port),
                "--name",
                p.name,
                "--run",
                self.run_id,
                "--ballast-mib",
                str(p.ballast_mib),
                "--print-interval",
                str(self.options.print_interval),
            ]
            tables.append(
                f"[programs.{p.name}]\ncommand = {json.dumps(command)}\n"
                f'environment = {{ CHAOS_GENERATION = "{p.generation}" }}\n'
                f'ready = {{ tcp = "127.0.0.1:{p.port}", timeout = "20s" }}\n'
                "stopwaitsecs = 2\n"
                + ('restore_mode = "lazy"\n' if p.lazy else "")
                + f"[programs.{p.name}.checkpoint]\non_signal = true\nkeep = {self.keep}\n"
                "pre_deploy = true\n"
                + ("on_stop = true\n" if p.on_stop else "")
                + (self.remote.checkpoint_keys() if self.remote is not None else "")
            )
        if self.remote is not None:
            tables.append(self.remote.supervisor_tables())
        temporary = self.config.with_suffix(".tmp")
        temporary.write_text("\n".join(tables))
        os.replace(temporary, self.config)

    def start_supervisor(self) -> None:
        self.generation += 1
        with (self.root / f"supervisor-{self.generation}.log").open("wb") as stderr:
            self.supervisor = subprocess.Popen(
                [os.fspath(CLI), "-c", os.fspath(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.options.recovery_bound
        # Answering, not only accepting: it answers once its image store is recovered.
        while control.answering_pid(self.socket) != self.supervisor.pid:
            if self.supervisor.poll() is not None:
                raise Violation(
                    f"supervisor {self.generation} exited with {self.supervisor.returncode} "
                    "before it listened"
                )
            if time.monotonic() > deadline:
                raise Violation(f"supervisor {self.generation} did not listen in time")
            time.sleep(0.05)

    @property
    def supervisor_pid(self) -> int:
        assert self.supervisor is not None
        return self.supervisor.pid

    def wait_for_exit(self) -> None:
        """After `shutdown`: the supervisor has exited by itself."""
        assert self.supervisor is not None
        try:
            self.supervisor.wait(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Violation("the supervisor did not exit after `shutdown` answered") from None

    def kill_supervisor(self) -> None:
        """SIGKILL the supervisor, by its pid (it is our child: reaped here)."""
        assert self.supervisor is not None
        self.exited_before_kill = self.supervisor.poll() is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.supervisor.pid, signal.SIGKILL)
        self.supervisor.wait()

    def kill_during_recovery(self) -> None:
        """Kill the new supervisor while it takes its programs back (inside its CRIU calls),
        then start another one."""
        for _ in range(2):
            target = self.rng.choice(self.options.take_back_targets)
            landing = self.watch_and_kill((target,), None, 20.0, 0.0)
            if landing is None:
                return
            self.log(f"  iteration {self.iteration}: killed again during take-back: {landing}")
            self.tally.kills[landing] += 1
            self.tally.kill_details[f"{landing} (take-back)"] += 1
            self.start_supervisor()

    # operations ------------------------------------------------------------------

    def plan(self, operation: str, target: str | None = None) -> tuple[list[str] | None, Outcome]:
        """The command line of `operation` on a random program, and what it may change. A kill
        aimed at a lazy restore's serving restores a lazily restored program, if one has
        images."""
        running = [p for p in self.programs.values() if p.token is not None]
        stopped = [p for p in self.programs.values() if p.token is None]
        outcome = Outcome(self.expect_unchanged())
        args: list[str] | None = None
        program: Program | None = None
        if operation == "start":
            program = self.rng.choice(stopped)
            args = ["start", program.name]
            outcome.expected[program.name] = Expected(fresh=True, why="started")
        elif operation == "stop":
            program = self.rng.choice(running)
            args = ["stop", program.name]
        elif operation in ("checkpoint", "checkpoint-stop"):
            program = self.rng.choice(running)
            args = ["checkpoint", program.name]
            if operation == "checkpoint-stop":
                args.append("--stop")
            outcome.may_vanish |= self.retention_victims(program.name)
        elif operation == "restore":
            with_images = sorted({m.program for m in self.store.list()})
            if target == "lazy":
                with_images = [n for n in with_images if self.programs[n].lazy] or with_images
            program = self.programs[self.rng.choice(with_images)]
            listed = self.store.list(program.name)
            image = listed[0] if self.rng.random() < 0.5 else self.rng.choice(listed)
            self.token_of(image)
            outcome.image = image
            ref = "latest" if image is listed[0] and self.rng.random() < 0.5 else image.id[:12]
            args = ["restore", program.name, ref, "--json"]
            if program.token is not None:
                # A RUNNING program is checkpointed first (pre-restore): retention may follow.
                outcome.may_vanish |= self.retention_victims(program.name) - {image.id}
        elif operation in ("reload-changed", "reload-unchanged", "update"):
            if operation != "reload-unchanged":
                program = self.rng.choice(list(self.programs.values()))
                program.generation += 1
                outcome.may_vanish |= self.retention_victims(program.name)
            self.write_config()
            # `update` is supervisorctl's name for reload.
            args = ["update" if operation == "update" else "reload", "--json"]
        elif operation in ("restart", "signal", "clear"):
            args, program = self.plan_supervisorctl_verb(operation, outcome)
        elif operation in ("prune", "usr1", "shutdown", "rmi"):
            args, program = self.plan_supervisor_wide(operation, outcome)
        elif operation == REMOTE_OPERATION:
            assert self.remote is not None
            args = self.remote.plan_restore(self, outcome)
            program = outcome.program
        outcome.program = program
        return args, outcome

    def plan_supervisorctl_verb(
        self, operation: str, outcome: Outcome
    ) -> tuple[list[str], Program]:
        """restart, signal, clear: one program, chosen at random."""
        if operation == "signal":
            program = self.rng.choice([p for p in self.programs.values() if p.token is not None])
            outcome.signal = self.rng.choice(SIGNALS)
            # Both orders supervisorctl users type: signal SIG NAME, signal NAME SIG.
            words = [outcome.signal, program.name]
            args = ["signal", *(words if self.rng.random() < 0.5 else words[::-1])]
        else:
            program = self.rng.choice(list(self.programs.values()))
            args = [operation, program.name]
        outcome.output_before = self.output_of(program.name)
        return args, program

    def plan_supervisor_wide(
        self, operation: str, outcome: Outcome
    ) -> tuple[list[str] | None, Program | None]:
        """prune, USR1, shutdown, rmi: what they may delete."""
        running = [p for p in self.programs.values() if p.token is not None]
        args: list[str] | None = None
        program: Program | None = None
        if operation == "prune":
            keep = self.rng.randint(0, self.keep)
            name = self.rng.choice([None, *self.programs])
            args = ["prune", "--keep", str(keep)] + ([name] if name else [])
            for victim in (name,) if name else tuple(self.programs):
                outcome.may_vanish |= self.prune_victims(victim, keep)
        elif operation == "rmi":
            # One image, a corrupt one as well: gone once rmi answers, or either way if killed.
            image = self.rng.choice(self.store.list())
            args = ["rmi", image.program, image.id[:12], "--force"]
            outcome.may_vanish.add(image.id)
            outcome.image = image
        elif operation == "usr1":
            for p in running:
                outcome.may_vanish |= self.retention_victims(p.name)
        elif operation == "shutdown":
            args = ["shutdown"]
            for p in running:
                if p.on_stop:
                    outcome.may_vanish |= self.retention_victims(p.name)
        return args, program

    def perform(self, operation: str, target: str | None) -> Outcome:
        running = [p for p in self.programs.values() if p.token is not None]
        args, outcome = self.plan(operation, target)
        program = outcome.program
        images_before = {m.id for m in self.store.list()}
        process = self.run_cli(args) if args is not None else None
        if operation == "usr1":
            os.kill(self.supervisor_pid, signal.SIGUSR1)
        landing = None
        if target in REMOTE_TARGETS:
            assert self.remote is not None
            landing = self.remote.watch_and_kill(self, target, process) or self.kill_now()
        elif target not in (None, "recovery"):
            landing = self.watch_and_kill(
                (target,) if target != "anywhere" else (), process, 30.0, self.rng.uniform(0, 1.5)
            )
            if landing is None:
                # Not seen (the operation ended first): the kill lands after it.
                landing = self.kill_now()
        elif target == "recovery":
            landing = self.kill_after(process, operation, images_before)
        result = self.finish_cli(process)
        if operation == "usr1" and landing is None:
            self.wait_for_signal_round(running, images_before)
        if operation == "shutdown" and landing is None:
            self.wait_for_exit()
            self.start_supervisor()
        outcome.landing = landing
        outcome.summary = f"exit {result.returncode}" if result is not None else "sent"
        if landing is not None:
            self.tally.kills[landing] += 1
            self.tally.kill_details[f"{landing} ({operation})"] += 1
            outcome.summary += f", killed in {landing}"
            self.expect_after_kill(operation, program, outcome)
        else:
            self.expect_after(operation, program, outcome, result, images_before)
        return outcome

    def run_cli(self, args: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [os.fspath(CLI), "-c", os.fspath(self.config), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish_cli(self, process: subprocess.Popen[str] | None) -> CliResult | None:
        if process is None:
            return None
        try:
            stdout, stderr = process.communicate(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise Violation(f"`{process.args!r}` did not answer in {CLI_TIMEOUT:g} s") from None
        return CliResult(process.returncode, stdout, stderr)

    def kill_now(self) -> str:
        label = kernel.observe(self.supervisor_pid, self.state_dir, self.criu_binary).label
        self.kill_supervisor()
        return label

    def kill_after(
        self, process: subprocess.Popen[str] | None, operation: str, images_before: set[str]
    ) -> str | None:
        """For a take-back kill: let the operation finish, then kill the supervisor."""
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=CLI_TIMEOUT)
        elif operation == "usr1":
            self.wait_for_signal_round(
                [p for p in self.programs.values() if p.token is not None], images_before
            )
        return self.kill_now()

    def watch_and_kill(
        self,
        targets: tuple[str, ...],
        process: subprocess.Popen[str] | None,
        timeout: float,
        anywhere_delay: float,
    ) -> str | None:
        """Poll what the supervisor's CRIU calls are doing; SIGKILL the supervisor at a random
        moment inside one of `targets` (or after `anywhere_delay` when none is given). Returns
        where the kill landed, or None when the operation ended without such a moment."""
        deadline = time.monotonic() + timeout
        if not targets:
            end = time.monotonic() + anywhere_delay
            while time.monotonic() < end and (process is None or process.poll() is None):
                time.sleep(0.01)
            return self.kill_now()
        entered: dict[str, float] = {}
        delays = {t: self.rng.uniform(0, 0.8 * self.phase_seconds[t]) for t in targets}
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            phase = kernel.observe(self.supervisor_pid, self.state_dir, self.criu_binary)
            now = time.monotonic()
            label = phase.label
            for pid in phase.criu:
                self.criu_seen.setdefault(pid, kernel.start_time(pid) or 0)
            for t in list(entered):
                if t != label:
                    self.phase_seconds[t] = now - entered.pop(t)
            if label in targets:
                entered.setdefault(label, now)
                if now - entered[label] >= delays[label]:
                    self.kill_supervisor()
                    self.phase_seconds[label] = max(self.phase_seconds[label], now - entered[label])
                    return label
            done = process is not None and process.poll() is not None
            if label == "elsewhere" and (done or process is None):
                quiet_since = quiet_since or now
                if now - quiet_since > (1.0 if done else 3.0):
                    return None
            else:
                quiet_since = None
            time.sleep(WATCH_POLL)
        return None

    def wait_for_signal_round(self, running: list[Program], images_before: set[str]) -> None:
        """Until every running program has a new image, CRIU is idle and the listing has not
        changed for half a second (retention prunes after each checkpoint)."""
        deadline = time.monotonic() + 60
        wanted = {p.name for p in running}
        listing: set[str] = set()
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            images = self.store.list()
            now = time.monotonic()
            if {m.id for m in images} != listing:
                listing = {m.id for m in images}
                stable_since = now
            new = {m.program for m in images if m.id not in images_before}
            phase = kernel.observe(self.supervisor_pid, self.state_dir, self.criu_binary)
            if wanted <= new and phase.label == "elsewhere" and now - stable_since > 0.5:
                return
            time.sleep(0.05)

    # what to expect ----------------------------------------------------------------

    def expect_unchanged(self) -> dict[str, Expected]:
        return {
            p.name: Expected({p.token}, why="untouched")
            if p.token is not None
            else Expected(running=False, why="stopped")
            for p in self.programs.values()
        }

    def cold_expectations(self) -> dict[str, Expected]:
        return {p: Expected(fresh=True, why="first start") for p in self.programs}

    def expect_after(
        self,
        operation: str,
        program: Program | None,
        outcome: Outcome,
        result: CliResult | None,
        images_before: set[str],
    ) -> None:
        """An operation that ran to its end: exactly what it said it did."""
        ok = result is None or result.returncode == 0
        if operation == REMOTE_OPERATION:
            assert self.remote is not None
            self.remote.expect(self, outcome, ok)
            return
        if operation == "shutdown":
            for p in self.programs.values():
                if p.on_stop and p.token is not None:
                    self.check_new_image_token(p.name, images_before, {p.token})
                outcome.expected[p.name] = Expected(fresh=True, why="shut down, started anew")
            return
        if operation == "rmi" and ok and outcome.image is not None:
            gone = outcome.image
            self.tally.checks["rmi removed the image"] += 1
            if any(m.id == gone.id for m in self.store.list(gone.program)):
                raise Violation(f"rmi said it removed image {gone.id} of {gone.program}")
        if program is None:
            return
        name = program.name
        old = {program.token} if program.token is not None else set()
        if operation == "start":
            outcome.expected[name] = Expected(fresh=True, why="started")
        elif operation == "stop":
            outcome.expected[name] = (
                Expected(running=False, why="stopped") if ok else Expected(old, why="stop failed")
            )
        elif operation == "checkpoint-stop" and ok:
            outcome.expected[name] = Expected(running=False, why="checkpoint --stop")
        elif operation == "restore":
            image = outcome.image
            assert image is not None
            if ok:
                restored = Expected({self.token_of(image)}, why=f"restored {image.id[:12]}")
                outcome.expected[name] = restored
            else:
                outcome.expected[name] = Expected(
                    old,
                    fresh=True,
                    why=f"restore of {image.id[:12]} failed",
                )
        elif operation in ("reload-changed", "update") and program.token is None:
            # The README's contract: a reload leaves a program the operator stopped stopped.
            outcome.expected[name] = Expected(running=False, why="definition changed while stopped")
        elif operation in ("reload-changed", "update"):
            outcome.expected[name] = Expected(fresh=True, why="definition changed")
        elif operation == "restart":
            # Cold: restore_on leaves out "start", so never the token it had.
            outcome.expected[name] = (
                Expected(fresh=True, why="restarted")
                if ok
                else Expected(old, fresh=True, why="restart failed")
            )
        elif operation == "signal":
            self.expect_after_signal(program, outcome, ok)
        elif operation == "clear" and ok:
            self.check_cleared(program, outcome.output_before)
        if operation in ("checkpoint", "checkpoint-stop") and ok:
            self.check_new_image_token(name, images_before, old)

    def expect_after_kill(
        self,
        operation: str,
        program: Program | None,
        outcome: Outcome,
    ) -> None:
        """A kill left the operation's outcome open: what a new supervisor may show. Every
        program autostarts, so each must run; a stopped one starts cold."""
        for p in self.programs.values():
            if p.token is None:
                outcome.expected[p.name] = Expected(fresh=True, why="was stopped: autostart")
            elif operation == "shutdown" and (self.exited_before_kill or not p.on_stop):
                # Stopped (or being stopped) by the shutdown: a new supervisor starts it anew.
                outcome.expected[p.name] = Expected({p.token}, fresh=True, why="shut down")
            elif operation == "shutdown":
                outcome.expected[p.name] = Expected(
                    {p.token}, why="killed during shutdown, no new image listed"
                )
                outcome.fresh_if_new_image.add(p.name)
            else:
                outcome.expected[p.name] = Expected({p.token}, why="running: taken back")
        if program is None:
            return
        name = program.name
        old = {program.token} if program.token is not None else set()
        if operation == "stop":
            outcome.expected[name] = Expected(old, fresh=True, why="killed during stop")
        elif operation == "checkpoint-stop":
            # Fresh only once the image is durable and listed (case 3).
            outcome.expected[name] = Expected(
                old,
                why="killed during checkpoint --stop, no new image listed",
            )
            outcome.fresh_if_new_image.add(name)
        elif operation == "restore":
            image = outcome.image
            assert image is not None
            outcome.expected[name] = Expected(
                old | {self.token_of(image)},
                fresh=True,
                why=f"killed during restore of {image.id[:12]}",
            )
        elif operation in ("reload-changed", "update", "restart") or (
            operation == "signal" and outcome.signal == "KILL"
        ):
            outcome.expected[name] = Expected(old, fresh=True, why=f"killed during {operation}")
        elif operation == REMOTE_OPERATION:
            assert self.remote is not None
            self.remote.expect(self, outcome, None)

    def expect_after_signal(self, program: Program, outcome: Outcome, ok: bool) -> None:
        """HUP reaches the same instance (it prints a line), USR2 changes nothing, KILL is a
        crash: a cold start, never the token it had."""
        name = program.name
        if outcome.signal == "KILL":
            outcome.expected[name] = Expected(fresh=True, why="killed by signal KILL")
            if ok:
                self.tally.checks["crash restarted cold"] += 1
            return
        if ok and outcome.signal == "HUP":
            wanted = f"hup token={program.token}"
            hups = outcome.output_before.count(wanted)
            self.wait_for_output(
                name, lambda text: text.count(wanted) > hups, "the program printed hup"
            )
            self.tally.checks["signal handled"] += 1

    def check_cleared(self, program: Program, before: str) -> None:
        """After `clear`: the ticks printed before are gone, and the ticks go on being
        captured (the keeper's pipe survives the truncation)."""
        token = program.token
        if token is None:
            return
        # The instance's newest line before the clear (an older instance, or this token's
        # earlier life before a restore, may have printed higher numbers).
        printed = [int(n) for n, t in TICK_LINE.findall(before) if t == token]
        last = printed[-1] if printed else -1

        def cleared(text: str) -> bool:
            ticks = [int(n) for n, t in TICK_LINE.findall(text) if t == token]
            return bool(ticks) and min(ticks) > last

        self.wait_for_output(program.name, cleared, "output cleared, then captured again")
        self.tally.checks["output captured after clear"] += 1

    def output_of(self, name: str) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.root / "logs" / f"{name}.out.log").read_text(errors="replace")
        return ""

    def wait_for_output(self, name: str, holds: Callable[[str], bool], what: str) -> None:
        deadline = time.monotonic() + OUTPUT_BOUND
        while not holds(self.output_of(name)):
            if time.monotonic() > deadline:
                tail = self.output_of(name)[-300:]
                raise Violation(f"{name}: not within {OUTPUT_BOUND:g} s: {what}; log ends {tail!r}")
            time.sleep(SETTLE_POLL)

    def retention_victims(self, program: str) -> set[str]:
        """Images a new checkpoint of `program` may delete: retention keeps `keep`, the new one
        among them (a new pre-deploy image unprotects the one before it)."""
        return {m.id for m in self.store.list(program)[self.keep - 1 :]}

    def prune_victims(self, program: str, keep: int) -> set[str]:
        images = self.store.list(program)
        protected = next((m for m in images if m.trigger == "pre-deploy"), None)
        return {m.id for m in [m for m in images if m is not protected][keep:]}

    def token_of(self, image: ImageMeta) -> str:
        """The token an image holds, read from its memory pages (cached by image id)."""
        known = self.image_tokens.get(image.id)
        if known is not None:
            return known
        found: set[bytes] = set()
        for pages in sorted(self.store.criu_dir(image).glob("pages-*.img")):
            found.update(IMAGE_TOKEN.findall(pages.read_bytes()))
        if len(found) != 1:
            raise Violation(f"image {image.id} of {image.program} holds tokens {found}")
        token = found.pop().decode()
        self.image_tokens[image.id] = token
        return token

    def check_new_image_token(self, name: str, images_before: set[str], tokens: set[str]) -> None:
        for image in self.store.list(name):
            if image.id not in images_before and image.trigger in STOPPING_TRIGGERS:
                self.tally.checks["image holds the token"] += 1
                if self.token_of(image) not in tokens:
                    raise Violation(
                        f"{name}: image {image.id} holds token {self.token_of(image)}, "
                        f"the program had {tokens}"
                    )

    # invariants ------------------------------------------------------------------------

    def check(
        self,
        expected: dict[str, Expected],
        images_before: dict[str, ImageMeta],
        may_vanish: set[str],
        started: float | None,
        fresh_if_new_image: set[str] | None = None,
    ) -> None:
        """The invariants, once the supervisor has settled (bounded by recovery_bound)."""
        for name in fresh_if_new_image or ():
            new = [
                m
                for m in self.store.list(name)
                if m.id not in images_before and m.trigger in STOPPING_TRIGGERS
            ]
            if new:
                expected[name].fresh = True
                expected[name].why += f"; image {new[0].id[:12]} listed"
        self.settle(started or time.monotonic(), expected)
        self.check_images(images_before, may_vanish, killed=started is not None)
        if self.remote is not None:
            self.remote.check(self, killed=started is not None)

    def settle(self, started: float, expected: dict[str, Expected]) -> None:
        """Wait until every program is as expected; past the bound, say what is wrong."""
        deadline = started + self.options.recovery_bound
        while True:
            problems, tokens = self.examine(expected)
            if not problems:
                break
            if time.monotonic() > deadline:
                raise Violation("; ".join(problems))
            time.sleep(SETTLE_POLL)
        self.tally.recovery_seconds.append(time.monotonic() - started)
        for pid in kernel.children(self.supervisor_pid):
            if kernel.comm(pid) == KEEPER_COMM:
                self.keepers_seen.setdefault(pid, kernel.start_time(pid) or 0)
        running = sum(1 for t in tokens.values() if t is not None)
        self.tally.checks["one supervised instance"] += running
        self.tally.checks["no instance of a stopped program"] += len(tokens) - running
        self.tally.checks["ballast whole"] += running
        for name, token in tokens.items():
            p = self.programs[name]
            want = expected[name]
            self.tally.checks["token"] += 1
            if token is None:
                p.token = None
                continue
            if token not in want.tokens and not (want.fresh and token not in p.seen):
                older = " (an older one)" if token in p.seen else ""
                raise Violation(
                    f"{name} answers token {token[:12]}{older}; expected "
                    f"{sorted(t[:12] for t in want.tokens)}{' or a new one' if want.fresh else ''}"
                    f" ({want.why})"
                )
            if token not in p.seen:
                p.seen.append(token)
            p.token = token

    def examine(self, expected: dict[str, Expected]) -> tuple[list[str], dict[str, str | None]]:
        """Problems seen now, and each program's token (None when it does not run)."""
        problems: list[str] = []
        tokens: dict[str, str | None] = {}
        try:
            status = {
                e["name"]: e for e in control.request(self.socket, "status", {}, timeout=10.0)
            }
        except (protocol.ControlError, protocol.SupervisorNotRunning, OSError, ValueError) as exc:
            return [f"status not answered: {exc}"], tokens
        for name, want in expected.items():
            problem, token = self.examine_program(name, want, status.get(name, {}))
            if problem:
                problems.append(f"{name}: {problem}")
            else:
                tokens[name] = token
        return problems, tokens

    def examine_program(
        self, name: str, want: Expected, entry: dict[str, Any]
    ) -> tuple[str, str | None]:
        """(what is wrong, "" when nothing; the token it answers, None when it does not run)."""
        found = kernel.sandboxes(self.run_id, name)
        state, pid = entry.get("state"), entry.get("pid")
        where = ", ".join(s.describe() for s in found) or "none"
        should_run = want.running
        if should_run is None:
            should_run = bool(found) or state == "RUNNING"
        if not should_run:
            if found:
                return f"should not run, but {len(found)} instance(s) do: {where}", None
            return "", None
        if len(found) != 1:
            return f"{len(found)} instances run ({where}); status says {state} pid {pid}", None
        sandbox = found[0]
        root = sandbox.root
        if root is None or state != "RUNNING" or pid != root.pid:
            return f"status says {state} pid {pid}, the kernel shows {where}", None
        if root.ppid != self.supervisor_pid:
            return f"{where} is not a child of the supervisor (pid {self.supervisor_pid})", None
        if any(m.state in ("T", "t") for m in sandbox.members):
            return f"frozen: {where}", None
        cgroups = {m.cgroup for m in sandbox.members} - {"", "/", OWN_CGROUP}
        for cgroup in cgroups:
            members = kernel.cgroup_members(cgroup)
            pids = sorted(m.pid for m in sandbox.members)
            if members is not None and sorted(members) != pids:
                return f"cgroup {cgroup} holds {sorted(members)}, the sandbox is {pids}", None
        answer = query_token(self.programs[name].port)
        if answer is None:
            return f"no token answered on port {self.programs[name].port}", None
        token, ballast = answer
        if ballast != "ok":
            return f"ballast {ballast} (memory not whole)", None
        return "", token

    def check_images(
        self, before: dict[str, ImageMeta], may_vanish: set[str], killed: bool
    ) -> None:
        now = {m.id: m for m in self.store.list()}
        for image_id, image in before.items():
            if image_id in may_vanish:
                continue
            if image_id not in now:
                raise Violation(f"image {image_id} of {image.program} was listed and is gone")
            if not killed:
                continue
            self.tally.checks["image verifies"] += 1
            try:
                self.store.verify(now[image_id])
            except (ImageCorrupt, OSError) as exc:
                raise Violation(
                    f"image {image_id} listed before the kill no longer verifies: {exc}"
                ) from exc

    # the end ----------------------------------------------------------------------------

    def supervisor_log_tail(self) -> list[str]:
        lines: list[str] = []
        for generation in (self.generation - 1, self.generation):
            path = self.root / f"supervisor-{generation}.log"
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                lines.append(f"supervisor {generation}:")
                lines.extend(text[-12:])
        return lines

    def clean_up(self) -> None:
        """End everything this episode started, by pid, and remove its directory."""
        supervisor = self.supervisor
        if supervisor is not None and supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(timeout=60)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait()
        for name in self.programs:
            for instance in kernel.instances(self.run_id, name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(instance.pid, signal.SIGKILL)
        for pid, began in (self.criu_seen | self.keepers_seen).items():
            if began and kernel.start_time(pid) == began:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(kernel.instances(self.run_id, n) for n in self.programs):
            if time.monotonic() > deadline:
                self.log("  leftover instances would not die")
                break
            time.sleep(0.05)
        if self.remote is not None:
            self.remote.clean_up()
        if self.options.keep_dir or (self.tally.violations and self.options.keep_failing_dir):
            self.log(f"  kept {self.root} (the supervisors' logs, state_dir and images)")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Outcome:
    expected: dict[str, Expected]
    may_vanish: set[str] = field(default_factory=set)
    landing: str | None = None
    program: Program | None = None
    image: ImageMeta | None = None
    summary: str = ""
    fresh_if_new_image: set[str] = field(default_factory=set)
    remote: RemoteObject | None = None
    """The object a remote restore restores from."""
    signal: str = ""
    """What `signal` sent."""
    output_before: str = ""
    """The program's captured stdout before `signal` or `clear`."""


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


_FEATURES: set[str] = set()


def cli_features() -> set[str]:
    """The commands `grenadine-sv --help` lists (aliases too), and "restore_mode" when the
    configuration has it: operations that need them run only once main has them."""
    if not _FEATURES:
        listing = subprocess.run(
            [os.fspath(CLI), "--help"], capture_output=True, text=True, check=False
        ).stdout
        # `    reload (update)   re-read ...`: a command and its alias.
        for command, alias in re.findall(
            r"^    ([a-z][a-z-]*)(?: \(([a-z-]+)\))? ", listing, re.MULTILINE
        ):
            _FEATURES.update(name for name in (command, alias) if name)
        schema = subprocess.run(
            [os.fspath(CLI), "schema"], capture_output=True, text=True, check=False
        ).stdout
        if "restore_mode" in schema:
            _FEATURES.add("restore_mode")
    return _FEATURES


def query_token(port: int) -> tuple[str, str] | None:
    """(token, ballast state) as the program on `port` answers, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
    except OSError:
        return None
    match = TOKEN_LINE.search(data.decode(errors="replace"))
    return (match.group(1), match.group(2)) if match else None


def run_episodes(
    first_seed: int,
    options: Options,
    *,
    minutes: float | None,
    episodes: int | None,
    keep_going: bool,
    log: Callable[[str], None],
) -> tuple[Tally, list[int]]:
    """Episodes with seeds first_seed, first_seed + 1, ... for `minutes` (or `episodes`)."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(object_store_server()) if options.remote else None
        return _run_episodes(
            first_seed,
            options=options,
            minutes=minutes,
            episodes=episodes,
            keep_going=keep_going,
            log=log,
            server=server,
        )


def checked_run(first_seed: int, options: Options, episodes: int) -> tuple[Tally, str]:
    """A run as CI plays it: every episode to its end, then AssertionError (with the report and
    the log's tail) if any broke an invariant or ended early. Returns the tally and report."""
    lines: list[str] = []
    tally, failed = run_episodes(
        first_seed, options, minutes=None, episodes=episodes, keep_going=True, log=lines.append
    )
    report = format_report(tally, failed, 0.0)
    assert not failed, report + "\n" + "\n".join(lines[-60:])
    assert tally.iterations == episodes * options.iterations, report
    return tally, report


def _run_episodes(
    first_seed: int,
    *,
    options: Options,
    minutes: float | None,
    episodes: int | None,
    keep_going: bool,
    log: Callable[[str], None],
    server: WeedServer | None,
) -> tuple[Tally, list[int]]:
    total = Tally()
    failed: list[int] = []
    began = time.monotonic()
    seed = first_seed
    while True:
        if episodes is not None and total.episodes >= episodes:
            break
        if minutes is not None and time.monotonic() - began >= minutes * 60:
            break
        log(f"episode seed {seed}")
        tally = Episode(seed, options, log, server).run()
        total.merge(tally)
        log(
            f"episode seed {seed}: {tally.iterations} iterations, "
            f"{sum(tally.kills.values())} kills ("
            + ", ".join(f"{label} {tally.kills.get(label, 0)}" for label in LANDINGS)
            + f"), {sum(tally.checks.values())} checks, "
            f"{len(tally.violations)} violations; so far {total.iterations} iterations, "
            f"{sum(total.kills.values())} kills ("
            + ", ".join(f"{label} {total.kills.get(label, 0)}" for label in LANDINGS)
            + ")"
        )
        if tally.violations:
            failed.append(seed)
            if not keep_going:
                break
        seed += 1
    return total, failed


def format_report(tally: Tally, failed: list[int], seconds: float) -> str:
    lines = [
        f"chaos: {tally.episodes} episodes, {tally.iterations} iterations in {seconds:.0f} s",
        "operations: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.operations.items())),
        f"kills: {sum(tally.kills.values())}; landed: "
        + ", ".join(f"{label} {tally.kills.get(label, 0)}" for label in LANDINGS),
        "take-back kills: "
        + (
            ", ".join(f"{k} {v}" for k, v in sorted(tally.kill_details.items()) if "take-back" in k)
            or "none"
        ),
        "kills by operation: "
        + ", ".join(
            f"{k} {v}" for k, v in sorted(tally.kill_details.items()) if "take-back" not in k
        ),
        "invariant checks: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.checks.items())),
    ]
    if tally.recovery_seconds:
        lines.append(f"settle time: max {max(tally.recovery_seconds):.1f} s")
    lines.append(f"violations: {len(tally.violations)}")
    lines.extend(f"  {v}" for v in tally.violations)
    if failed:
        lines.append("failing seeds: " + " ".join(str(s) for s in failed))
    return "\n".join(lines)
