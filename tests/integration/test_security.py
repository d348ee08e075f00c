"""Nobody let in: the control socket refuses other users, state and images are private, the
supervisor will not use a state_dir others can write, /metrics is local and tells no secrets."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import trio

from grenadine_sv.config.loading import load_config
from grenadine_sv.config.models import MetricsSettings
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import TICKER, running_supervisor, wait_state

pytestmark = [pytest.mark.root, pytest.mark.criu]

GRENADINE_SV = [sys.executable, "-m", "grenadine_sv"]
# The system's interpreter: the project's venv need not be readable by other users.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def reachable_by_others(sv_dirs: SupervisorDirs) -> SupervisorDirs:
    """Let other users traverse the test's root directory, so that what keeps them out of the
    socket and the state is the supervisor's own modes, not the temporary directory's."""
    os.chmod(sv_dirs.root, 0o711)
    return sv_dirs


async def as_nobody(code: str, *args: str) -> dict[str, int]:
    """Run Python `code` as user nobody; it prints one JSON object."""
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    result = await trio.run_process(
        ["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "-c", code, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    answer: dict[str, int] = json.loads(result.stdout)
    return answer


CONNECT_AS_NOBODY = """
import json, os, socket, sys
path = sys.argv[1]
found = os.stat(path).st_mode  # the path itself is reachable
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    client.connect(path)
    client.sendall(b'{"command": "ping"}\\n')
    print(json.dumps({"answered": len(client.recv(4096))}))
except OSError as exc:
    print(json.dumps({"refused": exc.errno}))
"""

OPEN_AS_NOBODY = """
import json, sys
results = {}
for path in sys.argv[1:]:
    try:
        open(path, "rb").close()
        results[path] = 0
    except OSError as exc:
        results[path] = exc.errno
print(json.dumps(results))
"""


async def test_an_unprivileged_user_cannot_use_the_control_socket(
    reachable_by_others: SupervisorDirs,
):
    dirs = reachable_by_others
    config = dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.1\n")
    async with running_supervisor(config) as sv:
        await wait_state(sv, "ticker", State.RUNNING)
        st = dirs.socket.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        answer = await as_nobody(CONNECT_AS_NOBODY, str(dirs.socket))
        assert answer == {"refused": errno.EACCES}
        assert sv.programs.runners["ticker"].state == State.RUNNING


async def test_state_and_images_are_private_and_unreadable_by_others(
    reachable_by_others: SupervisorDirs,
):
    dirs = reachable_by_others
    config = dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.1\n")
    store = ImageStore(dirs.state_dir)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "ticker", State.RUNNING)
        await sv.operations.checkpoint_programs(["ticker"], stop=True)
        await sv.operations.restore_program("ticker", "latest")
        await wait_state(sv, "ticker", State.RUNNING)
        [image] = store.list("ticker")
        assert stat.S_IMODE(dirs.state_dir.stat().st_mode) == 0o700
        image_dir = store.criu_dir(image).parent
        checked = 0
        for path in [dirs.state_dir, *dirs.state_dir.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.name == "supervisor.lock":
                continue  # holds the supervisor's pid, nothing else
            parts = path.relative_to(dirs.state_dir).parts
            if parts[:1] == ("tmp",) and len(parts) == 2:
                # A program's private /tmp is 1777 like /tmp, behind state_dir/tmp (0700).
                assert mode == 0o1777, f"{path} is {mode:o}"
                continue
            if parts[:1] == ("tmp",) and len(parts) > 2:
                continue  # the program's own files, as it made them
            if parts[:1] == ("images",) and parts[3:4] == ("files",) and len(parts) > 4:
                continue  # their copies in the image, behind files/ (0700)
            if path.is_dir():
                assert mode == 0o700, f"{path} is {mode:o}"
            else:
                assert mode == 0o600, f"{path} is {mode:o}"
            checked += 1
        assert checked > 10
        # What holds memory cannot be opened by another user, even by its full path.
        pages = next(store.criu_dir(image).glob("pages-*.img"))
        meta = image_dir / "meta.json"
        answer = await as_nobody(OPEN_AS_NOBODY, str(pages), str(meta))
        assert answer == {str(pages): errno.EACCES, str(meta): errno.EACCES}


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o703], ids=oct)
def test_supervisor_refuses_a_state_dir_other_users_can_write(sv_dirs: SupervisorDirs, mode: int):
    config = sv_dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\n")
    sv_dirs.state_dir.mkdir()
    os.chmod(sv_dirs.state_dir, mode)
    result = subprocess.run(
        [*GRENADINE_SV, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "writable by other users" in result.stderr
    assert f"chmod 700 {sv_dirs.state_dir}" in result.stderr
    # Nothing was started and nothing was written into it.
    assert not sv_dirs.socket.exists()
    assert list(sv_dirs.state_dir.iterdir()) == []
    assert stat.S_IMODE(sv_dirs.state_dir.stat().st_mode) == mode


def test_metrics_listen_on_loopback_unless_configured_otherwise(sv_dirs: SupervisorDirs):
    assert MetricsSettings().listen == "127.0.0.1:9847"
    config = sv_dirs.write_config("")
    # Without a [supervisor.metrics] table the default applies.
    config.write_text(config.read_text().replace('[supervisor.metrics]\nlisten = ""\n', ""))
    assert "[supervisor.metrics]" not in config.read_text()
    assert load_config(config).supervisor.metrics.address() == ("127.0.0.1", 9847)


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* shows them) with a listener on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A":
                found.append(address)
    return found


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return bytes(response.read()).decode()


SECRET_IN_ENV = "env-s3cr3t-7f2a"
SECRET_IN_ARGV = "argv-s3cr3t-91c4"


async def test_metrics_expose_no_environment_or_command_line(sv_dirs: SupervisorDirs):
    port = free_port()
    command = [*json.loads(TICKER), f"--password={SECRET_IN_ARGV}"]
    config = sv_dirs.write_config(
        f"[programs.ticker]\ncommand = {json.dumps(command)}\nstartsecs = 0.1\n"
        f'environment = {{ API_TOKEN = "{SECRET_IN_ENV}" }}\n',
        metrics_listen=f"127.0.0.1:{port}",
    )
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "ticker", State.RUNNING)
        # The secrets are really there, in the program's environment and command line.
        assert SECRET_IN_ENV.encode() in Path(f"/proc/{pid}/environ").read_bytes()
        assert SECRET_IN_ARGV.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        await sv.operations.checkpoint_programs(["ticker"], stop=False)
        assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only
        text = await trio.to_thread.run_sync(scrape, port)
    assert 'grenadine_program_up{program="ticker"} 1.0' in text
    assert "grenadine_latest_image_memory_bytes" in text
    for secret in (SECRET_IN_ENV, SECRET_IN_ARGV, "API_TOKEN", "--password", "-u -c"):
        assert secret not in text
