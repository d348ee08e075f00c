"""End to end: the real `grenadine-sv` command, a supervisor process and the CLI talking to it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from grenadine_sv.control.client import request
from grenadine_sv.control.protocol import ControlError, SupervisorNotRunning
from grenadine_sv.criu.binary import CriuNotFound, find_criu
from grenadine_sv.host.warnings import host_capabilities
from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import wait_until

pytestmark = pytest.mark.root

GRENADINE_SV = Path(sys.executable).with_name("grenadine-sv")
MEMCACHED = "/usr/bin/memcached"
COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
STATUS_LINE = re.compile(r"^(\S+)\s+RUNNING\s+pid (\d+), uptime \d+:\d\d:\d\d")

# Waits for SIGTERM; prints nothing.
IDLE = json.dumps(
    [
        sys.executable,
        "-c",
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "signal.pause()\n",
    ]
)


@pytest.fixture
def needs_criu() -> None:
    try:
        find_criu()
    except CriuNotFound as exc:
        pytest.skip(str(exc))


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if there is no such live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def running_line(line: str) -> tuple[str, int]:
    """(name, pid) of a `name  RUNNING  pid N, uptime H:MM:SS` status line."""
    found = STATUS_LINE.match(line)
    assert found, f"not a RUNNING status line: {line!r}"
    return found.group(1), int(found.group(2))


def is_alive(pid: int) -> bool:
    return process_start_time(pid) is not None


@dataclass
class SupervisorProcess:
    """A `grenadine-sv -c CONFIG` subprocess, and the CLI pointed at the same file."""

    dirs: SupervisorDirs
    process: subprocess.Popen[bytes] | None = None
    # Every program instance seen, (pid, start time): ended at teardown if still alive.
    seen: set[tuple[int, int]] = field(default_factory=set)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with (
            (self.dirs.root / "supervisor.out").open("wb") as stdout,
            (self.dirs.root / "supervisor.err").open("wb") as stderr,
        ):
            self.process = subprocess.Popen(
                [GRENADINE_SV, "-c", self.dirs.config], stdout=stdout, stderr=stderr
            )
        wait_until(self._answers, START_TIMEOUT, "the supervisor answers status")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the supervisor exited early:\n{self.log()}")
        try:
            request(self.dirs.socket, "status", {}, timeout=5.0)
        except (SupervisorNotRunning, ControlError, OSError):
            return False
        return True

    def log(self) -> str:
        return (self.dirs.root / "supervisor.err").read_text(errors="replace")

    def cli(self, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        """Run `grenadine-sv -c CONFIG ARGS`; check its exit code unless `code` is None."""
        done = run_cli("-c", str(self.dirs.config), *args)
        if code is not None:
            assert done.returncode == code, (
                f"grenadine-sv {' '.join(args)} exited {done.returncode}, not {code}\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr}\nsupervisor: {self.log()[-3000:]}"
            )
        return done

    def status(self) -> dict[str, dict[str, object]]:
        entries = json.loads(self.cli("status", "--json").stdout)
        for entry in entries:
            pid = entry["pid"]
            if isinstance(pid, int) and (started := process_start_time(pid)) is not None:
                self.seen.add((pid, started))
        return {entry["name"]: entry for entry in entries}

    def wait_running(self, *names: str) -> dict[str, int]:
        """Wait until these programs are RUNNING; return their pids."""

        def running() -> bool:
            entries = {e["name"]: e for e in request(self.dirs.socket, "status", {}, 5.0)}
            # A program is listed once the supervisor has added it (after taking back orphans).
            return all(entries.get(n, {}).get("state") == "RUNNING" for n in names)

        wait_until(running, START_TIMEOUT, f"{', '.join(names)} RUNNING")
        entries = self.status()
        return {name: int(str(entries[name]["pid"])) for name in names}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bound; then end any program instance left behind."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, started in self.seen:
            if process_start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def supervisor(sv_dirs: SupervisorDirs) -> Iterator[SupervisorProcess]:
    """Write the configuration with sv_dirs.write_config, then call .start()."""
    process = SupervisorProcess(sv_dirs)
    try:
        yield process
    finally:
        process.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRENADINE_SV, *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def memcached_program(name: str, port: int, checkpoint: str = "") -> str:
    return f"""
[programs.{name}]
command = ["{MEMCACHED}", "-u", "root", "-l", "127.0.0.1", "-p", "{port}", "-m", "16"]
ready = {{ tcp = "127.0.0.1:{port}", timeout = "10s" }}

[programs.{name}.checkpoint]
{checkpoint}
"""


def memcached(port: int, command: str) -> str:
    """Send one memcached text command (\\r\\n added) and return the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(command.replace("\n", "\r\n").encode() + b"\r\nquit\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    return reply.decode()


def memcached_set(port: int, key: str, value: str) -> None:
    assert memcached(port, f"set {key} 0 0 {len(value)}\n{value}") == "STORED\r\n"


def memcached_get(port: int, key: str) -> str | None:
    reply = memcached(port, f"get {key}")
    found = re.match(rf"VALUE {key} 0 \d+\r\n(.*)\r\nEND\r\n", reply)
    return found.group(1) if found else None


# lifecycle ---------------------------------------------------------------------------


def test_status_shows_programs_like_supervisorctl(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(
        f"[programs.alpha]\ncommand = {IDLE}\nstartsecs = 0\n\n"
        f"[programs.beta_long_name]\ncommand = {IDLE}\nstartsecs = 0\n"
    )
    supervisor.start()
    pids = supervisor.wait_running("alpha", "beta_long_name")

    lines = supervisor.cli("status").stdout.splitlines()
    assert [running_line(line) for line in lines] == [
        ("alpha", pids["alpha"]),
        ("beta_long_name", pids["beta_long_name"]),
    ]
    assert lines[0].index("RUNNING") == lines[1].index("RUNNING")  # aligned columns
    assert supervisor.cli("status", "alpha").stdout.startswith("alpha ")
    entries = json.loads(supervisor.cli("status", "beta_long_name", "--json").stdout)
    assert [(e["name"], e["state"], e["pid"]) for e in entries] == [
        ("beta_long_name", "RUNNING", pids["beta_long_name"])
    ]


def test_stop_start_restart_and_an_unknown_program(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n")
    supervisor.start()
    first = supervisor.wait_running("idle")["idle"]

    assert supervisor.cli("stop", "idle").stdout.split() == ["idle", "STOPPED"]
    assert not is_alive(first)
    started = supervisor.cli("start", "idle").stdout
    second = running_line(started)[1]
    assert second != first
    assert is_alive(second)
    supervisor.status()
    restarted = supervisor.cli("restart", "all").stdout
    third = running_line(restarted)[1]
    assert third != second
    assert not is_alive(second)
    supervisor.status()

    unknown = supervisor.cli("start", "nosuch", code=None)
    assert unknown.returncode == 2
    assert "no such program: nosuch" in unknown.stderr
    assert unknown.stdout == ""


def test_sigterm_stops_every_program_and_exits_0(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(
        f"[programs.one]\ncommand = {IDLE}\nstartsecs = 0\n\n"
        f"[programs.two]\ncommand = {IDLE}\nstartsecs = 0\n"
    )
    supervisor.start()
    pids = supervisor.wait_running("one", "two")
    assert supervisor.process is not None

    os.kill(supervisor.pid, signal.SIGTERM)
    assert supervisor.process.wait(STOP_TIMEOUT) == 0
    assert [pid for pid in pids.values() if is_alive(pid)] == []
    assert not sv_dirs.socket.exists()
    gone = supervisor.cli("status", code=3)
    assert "no supervisor is running" in gone.stderr


# checkpoints ---------------------------------------------------------------------------


@pytest.mark.criu
@pytest.mark.usefixtures("needs_criu")
def test_checkpoint_images_restore_and_prune(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    sv_dirs.write_config(memcached_program("cache", port, "keep = 10"))
    supervisor.start()
    supervisor.wait_running("cache")

    memcached_set(port, "k", "first")
    made = supervisor.cli("checkpoint", "cache").stdout
    assert re.fullmatch(
        r"cache: checkpoint [0-9a-f]{12} \(\S+MiB image, \S+MiB memory, frozen \d+\.\d{3}s\)\n",
        made,
    ), made
    memcached_set(port, "k", "second")
    supervisor.cli("checkpoint", "cache")
    memcached_set(port, "k", "third")

    table = supervisor.cli("images", "cache").stdout.splitlines()
    assert table[0].split() == [
        "IDX",
        "IMAGE_ID",
        "CTIME",
        "COMM",
        "MEM_SIZE",
        "PROGRAM",
        "TRIGGER",
        "SIZE",
        "CHECK",
    ]
    rows = [line.split() for line in table[1:]]
    # CTIME is three words: date, time, +0000
    assert [(r[0], r[5], r[7], r[8], r[10]) for r in rows] == [
        ("0", "memcached", "cache", "manual", "ok"),
        ("1", "memcached", "cache", "manual", "ok"),
    ]
    assert all(re.fullmatch(r"\d+\.\d\dMiB", r[i]) for r in rows for i in (6, 9)), rows
    newest_id, oldest_id = rows[0][1], rows[1][1]
    assert made.split()[2] == oldest_id[:12]

    # A RUNNING program's memory is checkpointed before a restore replaces it.
    by_idx = supervisor.cli("restore", "cache", "1").stdout
    assert re.fullmatch(
        r"cache: checkpoint ([0-9a-f]{12}) of its running memory first\n"
        rf"cache: restored from {oldest_id[:12]}, RUNNING pid \d+\n",
        by_idx,
    ), by_idx
    assert memcached_get(port, "k") == "first"
    saved = ImageStore(sv_dirs.state_dir).resolve("cache", "latest")
    assert (saved.id[:12], saved.trigger) == (by_idx.split()[2], "pre-restore")
    supervisor.status()
    by_prefix = supervisor.cli("restore", "cache", newest_id[:8], "--force").stdout
    assert by_prefix.startswith(f"cache: restored from {newest_id[:12]}, RUNNING pid ")
    assert memcached_get(port, "k") == "second"
    supervisor.status()
    restored = supervisor.cli("restore", "cache", saved.id, "--force").stdout
    assert restored.startswith(f"cache: restored from {saved.id[:12]}, RUNNING pid ")
    assert memcached_get(port, "k") == "third"
    supervisor.status()
    newest_id, oldest_id = saved.id, newest_id
    status = supervisor.cli("status", "cache").stdout
    assert re.search(
        rf"last checkpoint {newest_id[:12]} at [\d-]+ [\d:]+ UTC \(pre-restore\)$", status
    )

    pruned = supervisor.cli("prune", "cache", "--keep", "1").stdout
    assert pruned == f"cache: deleted 2 images ({oldest_id[:12]}, {rows[1][1][:12]})\n"
    assert [i["id"] for i in json.loads(supervisor.cli("images", "--json").stdout)] == [newest_id]
    assert supervisor.cli("prune", "cache", "--keep", "1").stdout == "cache: nothing to delete\n"


@pytest.mark.criu
@pytest.mark.usefixtures("needs_criu")
def test_usr1_checkpoints_programs_with_on_signal_and_restore_keeps_the_data(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    sv_dirs.write_config(
        memcached_program("memcached", port, "on_signal = true")
        + f"\n[programs.bystander]\ncommand = {IDLE}\nstartsecs = 0\n"
    )
    supervisor.start()
    supervisor.wait_running("memcached", "bystander")
    memcached_set(port, "foo", "grenadine!")

    os.kill(supervisor.pid, signal.SIGUSR1)
    store = ImageStore(sv_dirs.state_dir)
    wait_until(lambda: len(store.list()) == 1, 30.0, "one image after SIGUSR1")
    listed = json.loads(supervisor.cli("images", "--json").stdout)
    assert [(i["program"], i["trigger"], i["comm"]) for i in listed] == [
        ("memcached", "signal", "memcached")
    ]

    assert supervisor.cli("stop", "memcached").stdout.split()[:2] == ["memcached", "STOPPED"]
    with pytest.raises(ConnectionRefusedError):
        memcached_get(port, "foo")
    restored = supervisor.cli("restore", "memcached", "0").stdout
    assert restored.startswith(f"memcached: restored from {listed[0]['id'][:12]}, RUNNING pid ")
    supervisor.status()
    assert memcached_get(port, "foo") == "grenadine!"


@pytest.mark.criu
@pytest.mark.usefixtures("needs_criu")
def test_reload_applies_an_edited_file(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    cache = memcached_program("cache", port, "pre_deploy = true")
    sv_dirs.write_config(cache + f"\n[programs.old]\ncommand = {IDLE}\nstartsecs = 0\n")
    supervisor.start()
    before = supervisor.wait_running("cache", "old")
    assert supervisor.cli("reload").stdout == "no changes\n"

    sv_dirs.write_config(
        cache.replace('"-m", "16"', '"-m", "17"')
        + f"\n[programs.new]\ncommand = {IDLE}\nstartsecs = 0\n"
    )
    lines = supervisor.cli("reload").stdout.splitlines()
    image_id = ImageStore(sv_dirs.state_dir).resolve("cache", "latest").id
    assert lines == [
        "removed: old",
        "added: new",
        f"changed: cache (pre-deploy image {image_id[:12]})",
    ]
    after = supervisor.wait_running("cache", "new")
    assert after["cache"] != before["cache"]
    assert not is_alive(before["old"])
    assert "old" not in supervisor.status()


# commands that need no supervisor -------------------------------------------------------


def test_commands_exit_3_when_no_supervisor_runs(sv_dirs: SupervisorDirs) -> None:
    sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\n")
    for args in (["status"], ["stop", "idle"], ["reload"], ["checkpoint", "idle"]):
        done = run_cli("-c", str(sv_dirs.config), *args)
        assert done.returncode == 3, (args, done)
        assert f"nothing listens on {sv_dirs.socket}" in done.stderr


def test_check_names_the_file_and_key_of_an_invalid_setting(sv_dirs: SupervisorDirs) -> None:
    sv_dirs.write_config(f'[programs.idle]\ncommand = {IDLE}\nstartsecs = "soon"\n')
    invalid = run_cli("-c", str(sv_dirs.config), "check")
    assert invalid.returncode == 2
    assert str(sv_dirs.config) in invalid.stderr
    assert "programs.idle.startsecs" in invalid.stderr

    sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\n")
    valid = run_cli("-c", str(sv_dirs.config), "check")
    assert (valid.returncode, valid.stderr) == (0, "")
    assert valid.stdout.startswith("configuration valid: 1 programs")
    assert run_cli("no-such-command").returncode == 2


def test_schema_and_doctor_print_json() -> None:
    schema = run_cli("schema")
    assert schema.returncode == 0
    properties = json.loads(schema.stdout)["properties"]
    assert {"supervisor", "programs"} <= properties.keys()

    doctor = run_cli("doctor", "--json")
    assert doctor.returncode in (0, 1)
    report = json.loads(doctor.stdout)
    assert report["ok"] is (doctor.returncode == 0)
    assert {"criu", "root"} <= {check["check"] for check in report["checks"]}


def test_check_warns_about_another_user_on_a_host_without_cap_sys_resource(
    sv_dirs: SupervisorDirs,
) -> None:
    sv_dirs.write_config(f'[programs.idle]\ncommand = {IDLE}\nuser = "nobody"\n')
    checked = run_cli("-c", str(sv_dirs.config), "check")
    assert checked.returncode == 0
    # Every warning goes to stderr, as the host's other warnings do: stdout is the verdict.
    assert checked.stdout.startswith("configuration valid: 1 programs")
    assert "warning" not in checked.stdout
    warned = (
        f"grenadine-sv: warning: {sv_dirs.config}: programs.idle.user: 'nobody' cannot be"
        " checkpointed"
    )
    if "CAP_SYS_RESOURCE" in host_capabilities():
        assert "warning:" not in checked.stderr
    else:
        assert warned in checked.stderr
        strict = run_cli("-c", str(sv_dirs.config), "check", "--strict")
        assert strict.returncode == 2
        assert "1 warnings, and --strict" in strict.stderr
