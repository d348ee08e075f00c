"""A real Prometheus server for tests: it scrapes one target every second and answers queries.

    @pytest.fixture
    def prometheus() -> Iterator[PrometheusLauncher]:
        with PrometheusLauncher() as launcher:
            yield launcher

    async def test_x(prometheus: PrometheusLauncher) -> None:
        server = await prometheus.start("127.0.0.1:9847")
        await server.wait_for('up{job="grenadine"}', lambda r: value_of(r) == 1)

Every server is ended by its pid and its directory removed when the launcher exits.
Prometheus 2.42 is ready within a second, but hands its first targets to the scrape manager
only about 5 s after it starts (its discovery manager batches updates): allow for that.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import trio

from tests.conftest import free_port

PROMETHEUS = Path("/usr/bin/prometheus")
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 5.0
POLL_SECONDS = 0.2
LAUNCH_ATTEMPTS = 3
LOG_TAIL_CHARS = 3000

QueryResult = list[dict[str, Any]]


class PrometheusFailed(Exception):
    """Prometheus did not start, or a query failed."""


def value_of(result: QueryResult) -> float | None:
    """The value of a one-series instant-vector result; None when there is no series."""
    if not result:
        return None
    if len(result) > 1:
        raise AssertionError(f"expected one series, got {len(result)}: {result}")
    return float(result[0]["value"][1])


def scrape_config(target: str, job: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}],
    }


class PrometheusServer:
    """A running Prometheus; `stop` ends it (by pid) and removes its directory."""

    def __init__(self, directory: Path, target: str, job: str) -> None:
        self.directory = directory
        self.target = target
        self.job = job
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        config_path = directory / "prometheus.yml"
        # JSON is YAML: Prometheus reads it as its configuration.
        config_path.write_text(json.dumps(scrape_config(target, job), indent=2))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return "(no log)"

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Block until /-/ready answers 200; raise PrometheusFailed if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusFailed(
                    f"prometheus exited with status {self.process.returncode} before it was "
                    f"ready; its log ends with:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(
                    f"{self.url}/-/ready", timeout=HTTP_TIMEOUT_SECONDS
                ) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(POLL_SECONDS)
        raise PrometheusFailed(
            f"prometheus was not ready within {timeout}s; its log ends with:\n{self.log_tail()}"
        )

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/{path} and return its `data`."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(
                f"{self.url}/api/v1/{path}{query}", timeout=HTTP_TIMEOUT_SECONDS
            ) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:
            raise PrometheusFailed(
                f"prometheus answered {exc.code} to {path} {params}: {exc.read()!r}"
            ) from exc
        if body.get("status") != "success":
            raise PrometheusFailed(f"prometheus query {path} {params} failed: {body}")
        return body["data"]

    def query(self, expr: str) -> QueryResult:
        """The instant-vector result of `expr` now: [{"metric": {...}, "value": [t, "v"]}]."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusFailed(f"{expr!r} is a {data['resultType']}, not an instant vector")
        result: QueryResult = data["result"]
        return result

    def target_health(self) -> list[dict[str, Any]]:
        """Each active target's health and last scrape error (to explain a failed wait)."""
        targets = self.api("targets")["activeTargets"]
        return [
            {"scrapeUrl": t["scrapeUrl"], "health": t["health"], "lastError": t["lastError"]}
            for t in targets
        ]

    async def wait_for(
        self,
        expr: str,
        predicate: Callable[[QueryResult], bool],
        timeout: float = 30.0,
    ) -> QueryResult:
        """Poll `expr` (off the event loop, so a target served by this loop can be scraped)
        until `predicate` holds for its result; fail the test after `timeout` seconds."""
        result: QueryResult = []
        with trio.move_on_after(timeout):
            while True:
                result = await trio.to_thread.run_sync(self.query, expr)
                if predicate(result):
                    return result
                await trio.sleep(POLL_SECONDS)
        health = await trio.to_thread.run_sync(self.target_health)
        raise AssertionError(
            f"{expr!r} did not satisfy the condition within {timeout}s; last result {result}, "
            f"targets {health}"
        )

    def stop(self) -> None:
        """End Prometheus by its pid, wait for it, and remove its directory."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def launch_prometheus(target: str, *, job: str = "grenadine") -> PrometheusServer:
    """Start Prometheus scraping `target` ("host:port") every second; return once it is ready.

    Blocks; from trio call it through `PrometheusLauncher.start`. Its port is chosen free just
    before it starts, so a lost race is retried with another port."""
    if not PROMETHEUS.exists():
        pytest.skip(f"{PROMETHEUS} is not installed (Debian package prometheus)")
    failure: PrometheusFailed | None = None
    for _ in range(LAUNCH_ATTEMPTS):
        server = PrometheusServer(Path(tempfile.mkdtemp(prefix="gsv-prom-")), target, job)
        try:
            server.wait_ready()
        except PrometheusFailed as exc:
            server.stop()
            failure = exc
            if "address already in use" not in str(exc):
                raise
            continue
        except BaseException:
            server.stop()
            raise
        return server
    assert failure is not None
    raise failure


class PrometheusLauncher:
    """Starts Prometheus servers for one test and stops every one of them on exit."""

    def __init__(self) -> None:
        self.servers: list[PrometheusServer] = []

    async def start(self, target: str, *, job: str = "grenadine") -> PrometheusServer:
        server = await trio.to_thread.run_sync(lambda: launch_prometheus(target, job=job))
        self.servers.append(server)
        return server

    def start_blocking(self, target: str, *, job: str = "grenadine") -> PrometheusServer:
        server = launch_prometheus(target, job=job)
        self.servers.append(server)
        return server

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        while self.servers:
            self.servers.pop().stop()
