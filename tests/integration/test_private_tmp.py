"""Each program's private /tmp: its own, emptied at a cold start, kept across a restore, and
bound by name so two JVMs (each PID 2 of its sandbox) no longer share /tmp/hsperfdata_root."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import pytest

from grenadine_sv.config.errors import ConfigError
from grenadine_sv.config.loading import load_config
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox.private_tmp import private_tmp_dir
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import python_program, running_supervisor, wait_for, wait_state

pytestmark = [pytest.mark.root]

JAVA = shutil.which("java")
COUNTER_JAVA = Path(__file__).with_name("daemons") / "Counter.java"

# Writes /tmp/marker, prints the names in /tmp it sees, then idles until SIGTERM.
TMP_WRITER = python_program(
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "open('/tmp/marker', 'w').write(str(os.getpid()))\n"
    "print('sees', sorted(os.listdir('/tmp')), flush=True)\n"
    "while True: time.sleep(1)\n"
)


async def test_the_program_has_its_own_tmp_emptied_at_each_cold_start(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(f"[programs.writer]\ncommand = {TMP_WRITER}\nstartsecs = 0.2\n")
    tmp = private_tmp_dir(sv_dirs.state_dir, "writer")
    log = sv_dirs.stdout_log("writer")
    async with running_supervisor(config) as sv:
        await wait_state(sv, "writer", State.RUNNING)
        await wait_for(lambda: log.exists() and b"sees" in log.read_bytes())
        assert b"sees ['marker']" in log.read_bytes(), "nothing of the host's /tmp is seen"
        assert (tmp / "marker").is_file()
        assert not Path("/tmp/marker").exists()
        assert tmp.stat().st_mode & 0o7777 == 0o1777
        (tmp / "left-over").write_text("from the previous instance")

        await sv.operations.stop_programs(["writer"])
        await sv.operations.start_programs(["writer"])
        await wait_state(sv, "writer", State.RUNNING)
        await wait_for(lambda: log.read_bytes().count(b"sees") == 2)
        assert log.read_bytes().count(b"sees ['marker']") == 2, "emptied before the restart"
        assert not (tmp / "left-over").exists()


async def test_binds_below_tmp_are_mounted_on_top_and_private_tmp_false_shares(
    sv_dirs: SupervisorDirs,
):
    shared = sv_dirs.root / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("x")
    lister = python_program(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"print('sees', sorted(os.listdir({str(shared)!r})), os.path.isdir('/tmp/.X11-unix'),"
        " flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    config = sv_dirs.write_config(
        f'[programs.private]\ncommand = {lister}\nstartsecs = 0.2\nbinds = ["{shared}"]\n'
        f"[programs.shared]\ncommand = {lister}\nstartsecs = 0.2\nprivate_tmp = false\n"
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "private", State.RUNNING)
        await wait_state(sv, "shared", State.RUNNING)
        for name in ("private", "shared"):
            log = sv_dirs.stdout_log(name)
            await wait_for(lambda log=log: log.exists() and b"sees" in log.read_bytes())
        assert b"sees ['from-host']" in sv_dirs.stdout_log("private").read_bytes()
        assert b"sees ['from-host']" in sv_dirs.stdout_log("shared").read_bytes()
        # The private /tmp holds only the mount point of the bind, the host's stays apart.
        tmp = private_tmp_dir(sv_dirs.state_dir, "private")
        assert [p.name for p in tmp.iterdir()] == [sv_dirs.root.name]
        assert not private_tmp_dir(sv_dirs.state_dir, "shared").exists()


def test_binding_tmp_itself_with_a_private_tmp_is_a_configuration_error(
    sv_dirs: SupervisorDirs,
):
    sv_dirs.write_config(f'[programs.p]\ncommand = {TMP_WRITER}\nbinds = ["/tmp"]\n')
    with pytest.raises(ConfigError) as error:
        load_config(sv_dirs.config)
    assert str(sv_dirs.config) in str(error.value)
    assert "programs.p" in str(error.value)
    assert "private_tmp = false" in str(error.value)
    sv_dirs.write_config(
        f'[programs.p]\ncommand = {TMP_WRITER}\nbinds = ["/tmp"]\nprivate_tmp = false\n'
    )
    load_config(sv_dirs.config)


def http_count(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
        return int(answer.read())


@pytest.mark.criu
@pytest.mark.skipif(JAVA is None, reason="OpenJDK (default-jre-headless) is not installed")
async def test_two_jvms_with_default_flags_checkpoint_and_restore_independently(
    sv_dirs: SupervisorDirs,
):
    ports = {"jvm1": free_port(), "jvm2": free_port()}
    programs = "".join(
        f'[programs.{name}]\ncommand = ["{JAVA}", "{COUNTER_JAVA}", "{port}"]\n'
        f'ready = {{ tcp = "127.0.0.1:{port}", timeout = "60s" }}\n'
        for name, port in ports.items()
    )
    config = sv_dirs.write_config(programs)
    async with running_supervisor(config) as sv:
        for name in ports:
            await wait_state(sv, name, State.RUNNING, timeout=90)
        for name, port in ports.items():
            assert http_count(port) == 1
            hsperfdata = private_tmp_dir(sv_dirs.state_dir, name) / "hsperfdata_root"
            assert [p.name for p in hsperfdata.iterdir()] == ["2"], "each JVM is PID 2"

        # One after the other: the second JVM's exit must not take the first one's file.
        for name in ports:
            [entry] = await sv.operations.checkpoint_programs([name], stop=True)
            assert entry["ok"]
            await wait_state(sv, name, State.STOPPED)
        for name, port in ports.items():
            result = await sv.operations.restore_program(name, "latest")
            assert result["fallback"] is None, result
            await wait_state(sv, name, State.RUNNING)
            assert http_count(port) == 2, f"{name} kept its count"
