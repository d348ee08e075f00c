"""The supervisor's /metrics endpoint, scraped by a real Prometheus server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest
import trio

from grenadine_sv.lifecycle.machine import State
from tests.conftest import SupervisorDirs, free_port
from tests.integration.prometheus_server import PrometheusLauncher, value_of
from tests.integration.supervising import TICKER, running_supervisor, wait_state

pytestmark = [pytest.mark.root, pytest.mark.criu]


@pytest.fixture
def prometheus() -> PrometheusLauncher:
    with PrometheusLauncher() as launcher:
        yield launcher  # type: ignore[misc]


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return bytes(response.read())


async def test_prometheus_sees_what_happened_to_a_supervised_program(
    sv_dirs: SupervisorDirs, prometheus: PrometheusLauncher
):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n",
        metrics_listen=f"127.0.0.1:{port}",
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "ticker", State.RUNNING)
        server = await prometheus.start(f"127.0.0.1:{port}", job="grenadine")
        await server.wait_for('up{job="grenadine"}', lambda r: value_of(r) == 1)
        await server.wait_for('grenadine_program_up{program="ticker"}', lambda r: value_of(r) == 1)
        await server.wait_for(
            'grenadine_images{program="ticker"}', lambda r: value_of(r) == 0, timeout=30
        )
        await sv.operations.checkpoint_programs(["ticker"], stop=False)
        await sv.operations.checkpoint_programs(["ticker"], stop=True)
        await sv.operations.restore_program("ticker", "latest")
        await server.wait_for(
            'grenadine_images{program="ticker"}', lambda r: value_of(r) == 2, timeout=30
        )
        checkpoints = 'sum(grenadine_checkpoints_total{program="ticker",trigger="manual"})'
        await server.wait_for(checkpoints, lambda r: value_of(r) == 2)
        await server.wait_for(
            'grenadine_restores_total{program="ticker"}', lambda r: value_of(r) == 1
        )
        image_bytes = await trio.to_thread.run_sync(
            server.query, 'grenadine_image_bytes{program="ticker"}'
        )
        assert (value_of(image_bytes) or 0) > 0
        frozen = await trio.to_thread.run_sync(
            server.query, 'grenadine_checkpoint_frozen_seconds_count{program="ticker"}'
        )
        assert value_of(frozen) == 2

        text = await trio.to_thread.run_sync(scrape, port)
        if shutil.which("promtool") is not None:
            check = subprocess.run(
                ["promtool", "check", "metrics"], input=text, capture_output=True, check=False
            )
            assert check.returncode == 0, check.stdout + check.stderr


def test_a_taken_metrics_port_is_a_configuration_error_and_starts_nothing(
    sv_dirs: SupervisorDirs,
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = sv_dirs.write_config(
            f"[programs.ticker]\ncommand = {TICKER}\n", metrics_listen=f"127.0.0.1:{port}"
        )
        result = subprocess.run(
            [sys.executable, "-m", "grenadine_sv", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert "supervisor.metrics.listen" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert not sv_dirs.stdout_log("ticker").exists()
