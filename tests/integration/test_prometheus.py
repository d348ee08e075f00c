"""A real Prometheus scrapes the /metrics endpoint and sees the image store's figures; the
contrib/ configuration, rules and dashboard queries are accepted by Prometheus's own tools."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from grenadine_sv.metrics.endpoint import serve_metrics
from grenadine_sv.testing import MemoryImageStore
from tests.integration.prometheus_server import PrometheusLauncher, value_of
from tests.unit.test_metrics import CONTRIB, ProgramTable, Status, make_metrics

# Values Grafana gives the dashboard's variables, for running its queries here.
DASHBOARD_VARIABLES = {
    "$instance": ".*",
    "$program": ".*",
    "$window": "1h",
    "$__rate_interval": "1m",
}


@pytest.fixture
def prometheus() -> Iterator[PrometheusLauncher]:
    with PrometheusLauncher() as launcher:
        yield launcher


async def test_prometheus_scrapes_the_endpoint(
    prometheus: PrometheusLauncher,
) -> None:
    store = MemoryImageStore()
    for n in range(3):
        store.add("memcached", memory_bytes=1000, image_bytes=10, minutes=n)
    metrics = make_metrics(store, ProgramTable({"memcached": Status("RUNNING")}))
    metrics.add_program("memcached")
    metrics.checkpoint_succeeded("memcached", "signal", 0.2, 0.03)

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        server = await prometheus.start(f"{host}:{port}", job="grenadine")

        await server.wait_for('up{job="grenadine"}', lambda r: value_of(r) == 1)
        images = await server.wait_for(
            'grenadine_images{program="memcached"}', lambda r: value_of(r) is not None
        )
        assert value_of(images) == 3
        checkpoints = await trio.to_thread.run_sync(
            server.query, 'sum(grenadine_checkpoints_total{program="memcached"})'
        )
        assert value_of(checkpoints) == 1
        up = await trio.to_thread.run_sync(server.query, "grenadine_program_up")
        assert value_of(up) == 1
        nursery.cancel_scope.cancel()


def dashboard_queries() -> list[str]:
    dashboard = json.loads((CONTRIB / "grafana" / "grenadine-sv.json").read_text())
    queries = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                queries.append(node["expr"])
            for child in node.values():
                visit(child)
        elif isinstance(node, list):
            for child in node:
                visit(child)

    visit(dashboard["panels"])
    return queries


async def test_prometheus_accepts_every_dashboard_query(prometheus: PrometheusLauncher) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    # No target needs to answer: Prometheus parses and evaluates the queries all the same.
    server = await prometheus.start("127.0.0.1:9", job="grenadine-sv")

    for query in queries:
        expr = query
        for variable, replacement in DASHBOARD_VARIABLES.items():
            expr = expr.replace(variable, replacement)
        assert "$" not in expr, f"unhandled dashboard variable in {query!r}"
        await trio.to_thread.run_sync(server.query, expr)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "grenadine-rules.yml"),
        ("test", "rules", "grenadine-rules.test.yml"),
    ],
    ids=" ".join,
)
def test_promtool_accepts_the_contrib_files(args: tuple[str, ...]) -> None:
    *command, name = args
    result = promtool(*command, str(CONTRIB / "prometheus" / name))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
