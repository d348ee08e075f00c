"""No silent rewinds: when a program is restored from an image is a choice (restore_on), and
it shows in the command's output, in status, in the log and in a metric; a restore or a
checkpoint --stop leaves the programs that depend on it alone; programs with
checkpoint.on_stop are checkpointed when the supervisor stops and come back as they were."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import urllib.request

import pytest

from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import wait_until
from tests.integration.test_cli import (
    IDLE,
    SupervisorProcess,
    is_alive,
    memcached,
    memcached_get,
    memcached_program,
    memcached_set,
    needs_criu,
    supervisor,
)
from tests.integration.test_cli_contract import log_events

__all__ = ["needs_criu", "supervisor"]

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.usefixtures("needs_criu")]

# 400 MiB of touched memory, then waits for SIGTERM: its dump takes far longer than 10 ms.
BIG_AND_IDLE = (
    "import signal, sys\n"
    "ballast = bytearray(400 << 20)\n"
    "for i in range(0, len(ballast), 4096): ballast[i] = 1\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "signal.pause()\n"
)
SHUTDOWN_BOUND = 90.0
RESTORED = re.compile(r"restored from ([0-9a-f]{12}) of [\d-]+ [\d:]+ UTC \(([a-z-]+)\)")


def pinned(port: int, restore_on: str, checkpoint: str = "") -> str:
    """memcached restored from its latest image on the occasions `restore_on` lists."""
    return memcached_program("cache", port, checkpoint).replace(
        "[programs.cache.checkpoint]",
        f'restore = "latest"\nrestore_on = {restore_on}\n\n[programs.cache.checkpoint]',
    )


def memcached_serves(port: int) -> bool:
    """STARTING comes before memcached listens: refused until then."""
    try:
        return memcached(port, "version").startswith("VERSION")
    except ConnectionRefusedError:
        return False


def origin(supervisor: SupervisorProcess, name: str) -> tuple[str, str] | None:
    found = RESTORED.search(supervisor.cli("status", name).stdout)
    return (found.group(1), found.group(2)) if found else None


def image_age_metric(port: int, program: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(
        rf'^grenadine_program_image_age_seconds{{program="{program}"}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else None


def test_by_default_only_a_supervisor_start_restores_and_it_says_so(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port, metrics_port = free_port(), free_port()
    sv_dirs.write_config(
        pinned(port, '["supervisor-start"]'), metrics_listen=f"127.0.0.1:{metrics_port}"
    )
    supervisor.start()
    supervisor.wait_running("cache")
    assert origin(supervisor, "cache") is None  # no image yet: started cold
    memcached_set(port, "k1", "before")
    image = supervisor.cli("checkpoint", "cache").stdout.split()[2]
    memcached_set(port, "k2", "after")

    # An operator's restart and a crash start cold: nothing is rewound behind their back.
    restarted = supervisor.cli("restart", "cache").stdout
    assert "restored from" not in restarted
    assert memcached_get(port, "k1") is None
    pid = supervisor.wait_running("cache")["cache"]
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: supervisor.status()["cache"]["restarts"] == 1, 20.0, "restarted after a crash"
    )
    supervisor.wait_running("cache")
    assert origin(supervisor, "cache") is None
    assert image_age_metric(metrics_port, "cache") is None
    skipped = [e for e in log_events(supervisor) if e.get("event") == "restore_not_on"]
    assert [e["occasion"] for e in skipped] == ["start", "crash"]

    # A new supervisor restores it, and says so everywhere.
    memcached_set(port, "k1", "before")
    supervisor.cli("checkpoint", "cache")
    image = supervisor.cli("images", "cache").stdout.splitlines()[1].split()[1][:12]
    supervisor.stop()
    supervisor.start()
    supervisor.wait_running("cache")
    assert memcached_get(port, "k1") == "before"
    assert origin(supervisor, "cache") == (image, "supervisor-start")
    age = image_age_metric(metrics_port, "cache")
    assert age is not None
    assert age >= 0
    done = [e for e in log_events(supervisor) if e.get("event") == "restore_done"]
    assert [(e["image_id"][:12], e["occasion"]) for e in done][-1:] == [(image, "supervisor-start")]


def test_restore_on_start_and_crash_is_visible_in_the_output_and_status(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    sv_dirs.write_config(pinned(port, '["start", "crash"]'))
    supervisor.start()
    supervisor.wait_running("cache")
    memcached_set(port, "k1", "before")
    image = supervisor.cli("checkpoint", "cache").stdout.split()[2]
    memcached_set(port, "k2", "after")

    restarted = supervisor.cli("restart", "cache").stdout
    assert RESTORED.search(restarted), restarted
    assert RESTORED.search(restarted).groups() == (image, "start")  # type: ignore[union-attr]
    assert (memcached_get(port, "k1"), memcached_get(port, "k2")) == ("before", None)

    pid = supervisor.wait_running("cache")["cache"]
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: (
            origin(supervisor, "cache") == (image, "crash")
            and supervisor.status()["cache"]["state"] == "RUNNING"
        ),
        20.0,
        "restored after the crash",
    )
    assert memcached_get(port, "k1") == "before"


def test_a_restore_or_checkpoint_stop_leaves_dependents_alone(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    sv_dirs.write_config(
        memcached_program("cache", port)
        + f'\n[programs.web]\ncommand = {IDLE}\nstartsecs = 0\ndepends_on = ["cache"]\n'
    )
    supervisor.start()
    web = supervisor.wait_running("cache", "web")["web"]
    supervisor.cli("checkpoint", "cache")
    supervisor.cli("restore", "cache", "latest", "--force")
    supervisor.cli("checkpoint", "--stop", "cache")
    supervisor.cli("restore", "cache", "latest")
    supervisor.wait_running("cache")
    assert supervisor.status()["web"]["pid"] == web
    assert supervisor.status()["web"]["restarts"] == 0


def test_shutdown_checkpoints_on_stop_programs_and_a_late_one_is_stopped_normally(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    big = json.dumps([sys.executable, "-c", BIG_AND_IDLE])
    cache = pinned(port, '["supervisor-start"]', "on_stop = true")
    sv_dirs.write_config(cache)
    supervisor.start()
    supervisor.wait_running("cache")
    memcached_set(port, "k", "kept")
    assert supervisor.cli("shutdown").stdout == f"shut down (pid {supervisor.pid})\n"
    assert supervisor.process is not None
    assert supervisor.process.wait(5) == 0
    events = log_events(supervisor)
    [done] = [e for e in events if e.get("event") == "shutdown_checkpoint_done"]
    [image] = ImageStore(sv_dirs.state_dir).list("cache")
    assert (done["program"], done["image_id"], image.trigger) == ("cache", image.id, "shutdown")
    supervisor.start()
    supervisor.wait_running("cache")
    assert memcached_get(port, "k") == "kept"
    assert origin(supervisor, "cache") == (image.id[:12], "supervisor-start")

    # Past shutdown_checkpoint_timeout, CRIU is killed: the program is stopped normally.
    supervisor.stop()
    sv_dirs.write_config(
        f"[programs.big]\ncommand = {big}\nstartsecs = 0\nstopwaitsecs = 3\n"
        "[programs.big.checkpoint]\non_stop = true\n",
        extra_supervisor='shutdown_checkpoint_timeout = "10ms"',
    )
    supervisor.start()
    pid = supervisor.wait_running("big")["big"]
    supervisor.process.send_signal(signal.SIGTERM)
    # A bound for a loaded machine: the killed dump, the resume, then the stop.
    assert supervisor.process.wait(SHUTDOWN_BOUND) == 0
    events = [e for e in log_events(supervisor) if e.get("program") in ("big", None)]
    names = [e["event"] for e in events]
    assert "shutdown_checkpoint_timeout" in names
    assert "shutdown_checkpoint_failed" in names or "shutdown_checkpoint_skipped" in names
    assert "shutdown_checkpoint_done" not in names
    assert ImageStore(sv_dirs.state_dir).list("big") == []
    assert not is_alive(pid)


def test_shutdown_waits_for_a_starting_on_stop_program_and_checkpoints_it(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    """A program still STARTING at shutdown already has state (memcached serves before its
    probe passes): it is checkpointed once ready, not stopped unsaved."""
    port = free_port()
    ready_flag = sv_dirs.root / "ready"
    program = pinned(port, '["supervisor-start"]', "on_stop = true").replace(
        f'ready = {{ tcp = "127.0.0.1:{port}", timeout = "10s" }}',
        f'ready = {{ command = ["test", "-e", "{ready_flag}"], timeout = "120s" }}',
    )
    sv_dirs.write_config(program)
    supervisor.start()
    try:
        wait_until(lambda: supervisor.status().get("cache", {}).get("state") == "STARTING", 30)
        wait_until(lambda: memcached_serves(port), 30, "memcached serves")
        memcached_set(port, "k", "set while starting")
        assert supervisor.process is not None
        supervisor.process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: any(
                e.get("event") == "shutdown_checkpoints_waiting" for e in log_events(supervisor)
            ),
            30,
            "the shutdown waits for the starting program",
        )
        ready_flag.touch()
        assert supervisor.process.wait(SHUTDOWN_BOUND) == 0
    finally:
        # Without the flag the shutdown waits for the probe and the teardown kills it.
        ready_flag.touch()
    [image] = ImageStore(sv_dirs.state_dir).list("cache")
    assert image.trigger == "shutdown"
    supervisor.start()
    supervisor.wait_running("cache")
    assert memcached_get(port, "k") == "set while starting"
