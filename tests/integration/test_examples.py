"""The examples' demo.sh scripts, run as a user would: each must pass and leave nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.criu]

REPO = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT = 90.0
# After a timeout the demo gets SIGTERM (its EXIT trap stops its supervisor), then SIGKILL.
CLEANUP_TIMEOUT = 40.0
EXAMPLES_WORK = Path("/tmp/grenadine-sv-examples")


@pytest.fixture(autouse=True)
def _needs_the_command() -> None:
    if not (REPO / ".venv" / "bin" / "grenadine-sv").exists():
        pytest.skip("the demos run .venv/bin/grenadine-sv: run contrib/bootstrap setup")


def run_demo(script: Path) -> tuple[int, str]:
    """Run `script` in its own process group; return its exit code and its output."""
    demo = subprocess.Popen(
        [script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = demo.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGTERM)
        try:
            output, _ = demo.communicate(timeout=CLEANUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            output, _ = demo.communicate()
        pytest.fail(f"{script} did not finish within {DEMO_TIMEOUT}s:\n{output}")
    return demo.returncode, output


def port_is_free(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize(
    ("example", "ports"),
    [
        pytest.param("memcached", [21211], id="memcached"),
        pytest.param("python-counter", [8712], id="python-counter"),
        pytest.param("deploy-rollback", [8713, 8714], id="deploy-rollback"),
        pytest.param("reboot-survival", [8715], id="reboot-survival"),
    ],
)
def test_demo_passes_and_cleans_up(example: str, ports: list[int]) -> None:
    if not all(port_is_free(port) for port in ports):
        pytest.skip(f"the {example} demo needs ports {ports}, and one is in use")

    code, output = run_demo(REPO / "examples" / example / "demo.sh")

    assert code == 0, output
    assert output.rstrip().endswith("demo passed"), output
    assert all(port_is_free(port) for port in ports), "a demo's program is still listening"
    assert not (EXAMPLES_WORK / example).exists()
    # deploy-rollback deploys by copying release-N.toml over this file, then removes it.
    assert not (REPO / "examples" / "deploy-rollback" / "grenadine.toml").exists()
