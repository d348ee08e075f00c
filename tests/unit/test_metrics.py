"""Metrics: figures read from an image store (in memory, and once the real one), counters
and histograms, the exposition text, and the /metrics endpoint."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from grenadine_sv.criu import facts
from grenadine_sv.metrics.collector import CHECKPOINT_TRIGGERS, Metrics
from grenadine_sv.metrics.endpoint import CONTENT_TYPE, MetricsListenError, serve_metrics
from grenadine_sv.store import images
from grenadine_sv.testing import MemoryImageStore

IMAGE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Status:
    state: str
    restored_created: datetime | None = None

    def restored_image_created(self) -> datetime | None:
        return self.restored_created


@dataclass
class ProgramTable:
    states: dict[str, Status] = field(default_factory=dict)

    def __call__(self) -> Mapping[str, Status]:
        return self.states


def make_metrics(store: MemoryImageStore, table: ProgramTable | None = None) -> Metrics:
    return Metrics(
        store=store,
        programs=table or ProgramTable(),
        criu_version="4.2.1",
        version="0.1.0",
    )


# --- reading the exposition text -------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    text = metrics.render().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k[0] for k in samples)}"
    return samples[key]


def series_of(samples: Samples, program: str) -> set[str]:
    return {name for name, labels in samples if ("program", program) in labels}


@pytest.fixture
def store() -> MemoryImageStore:
    return MemoryImageStore()


# --- image figures ---------------------------------------------------------------------------


def test_image_figures_come_from_the_store(store: MemoryImageStore) -> None:
    old = store.add("memcached", memory_bytes=1000, image_bytes=4096)
    new = store.add("memcached", memory_bytes=3000, image_bytes=8192, minutes=5)
    store.add("redis", memory_bytes=7000, image_bytes=100)

    samples = scrape(make_metrics(store))

    assert value(samples, "grenadine_images", program="memcached") == 2
    assert (
        value(samples, "grenadine_image_bytes", program="memcached")
        == old.image_bytes + new.image_bytes
    )
    assert value(samples, "grenadine_latest_image_memory_bytes", program="memcached") == 3000
    assert value(samples, "grenadine_images", program="redis") == 1
    assert value(samples, "grenadine_latest_image_memory_bytes", program="redis") == 7000
    assert value(samples, "grenadine_state_dir_free_bytes") == store.free


def test_figures_are_read_at_each_scrape(store: MemoryImageStore) -> None:
    store.add("memcached", memory_bytes=1000, image_bytes=10)
    metrics = make_metrics(store)
    assert value(scrape(metrics), "grenadine_images", program="memcached") == 1

    newer = store.add("memcached", memory_bytes=2000, image_bytes=10, minutes=1)
    samples = scrape(metrics)
    assert value(samples, "grenadine_images", program="memcached") == 2
    assert value(samples, "grenadine_latest_image_memory_bytes", program="memcached") == 2000

    store.remove(newer)  # a prune
    samples = scrape(metrics)
    assert value(samples, "grenadine_images", program="memcached") == 1
    assert value(samples, "grenadine_latest_image_memory_bytes", program="memcached") == 1000


def test_a_new_supervisor_sees_the_images_already_there(store: MemoryImageStore) -> None:
    store.add("memcached", memory_bytes=1000, image_bytes=10)
    make_metrics(store).checkpoint_succeeded("memcached", "signal", 0.5, 0.05)

    restarted = make_metrics(store)

    assert value(scrape(restarted), "grenadine_images", program="memcached") == 1


def test_a_configured_program_without_images_has_zero_and_no_latest(
    store: MemoryImageStore,
) -> None:
    table = ProgramTable({"memcached": Status("RUNNING")})

    samples = scrape(make_metrics(store, table))

    assert value(samples, "grenadine_images", program="memcached") == 0
    assert value(samples, "grenadine_image_bytes", program="memcached") == 0
    latest = ("grenadine_latest_image_memory_bytes", frozenset({("program", "memcached")}))
    assert latest not in samples


def test_the_real_image_store_fits_the_collector(tmp_path: Path) -> None:
    """The in-memory store above stands for this one: the same figures, a dump in
    progress not counted."""
    store = images.ImageStore(tmp_path)
    dump = facts.DumpFacts(
        root_pid=1, comm="memcached", memory_bytes=4096, stdio_pipes={}, dump_stats={}
    )
    intent = images.DumpIntent(
        trigger="manual",
        criu_version="4.2.1",
        definition_digest="d" * 64,
        leave_running=True,
        source_pid=1,
        source_start_time=1,
        boot_id="b",
    )
    with store.begin("memcached", intent) as pending:
        (pending.criu_dir / "pages-1.img").write_bytes(b"\1" * 5000)
        pending.commit(dump)
    in_progress = store.begin("memcached", intent)
    (in_progress.criu_dir / "pages-1.img").write_bytes(b"\1" * 50_000)
    metrics = Metrics(store=store, programs=ProgramTable(), criu_version="4.2.1", version="0.1.0")

    samples = scrape(metrics)

    assert value(samples, "grenadine_images", program="memcached") == 1
    assert (
        value(samples, "grenadine_image_bytes", program="memcached") == store.usage("memcached")[1]
    )
    assert 5000 < value(samples, "grenadine_image_bytes", program="memcached") < 50_000
    assert value(samples, "grenadine_latest_image_memory_bytes", program="memcached") == 4096
    in_progress.abort()


class UnreadableStore(MemoryImageStore):
    def usage(self, program: str) -> tuple[int, int]:
        if program == "broken":
            raise PermissionError(13, "Permission denied", f"/state/images/{program}")
        return super().usage(program)


def test_an_unreadable_program_is_left_out_and_the_rest_is_scraped() -> None:
    store = UnreadableStore()
    store.add("broken", memory_bytes=1, image_bytes=1)
    store.add("memcached", memory_bytes=1000, image_bytes=10)
    metrics = Metrics(
        store=store,
        programs=ProgramTable(),
        criu_version="4.2.1",
        version="0.1.0",
    )

    samples = scrape(metrics)

    assert "grenadine_images" not in series_of(samples, "broken")
    assert value(samples, "grenadine_images", program="memcached") == 1


# --- program up ------------------------------------------------------------------------------


def test_the_age_of_the_image_a_program_runs_from_is_reported(store: MemoryImageStore) -> None:
    made = datetime.now(UTC) - timedelta(hours=2)
    table = ProgramTable({"web": Status("RUNNING", made), "cold": Status("RUNNING")})
    samples = scrape(make_metrics(store, table))
    age = value(samples, "grenadine_program_image_age_seconds", program="web")
    assert 7200 <= age < 7200 + 60
    assert "grenadine_program_image_age_seconds" not in series_of(samples, "cold")


def test_program_up_follows_the_program_table_at_scrape_time(store: MemoryImageStore) -> None:
    table = ProgramTable({"web": Status("RUNNING"), "cache": Status("BACKOFF")})
    metrics = make_metrics(store, table)

    samples = scrape(metrics)
    assert value(samples, "grenadine_program_up", program="web") == 1
    assert value(samples, "grenadine_program_up", program="cache") == 0

    table.states["cache"] = Status("RUNNING")
    del table.states["web"]
    samples = scrape(metrics)
    assert value(samples, "grenadine_program_up", program="cache") == 1
    assert "grenadine_program_up" not in series_of(samples, "web")


# --- counters and histograms ------------------------------------------------------------------


def test_build_info_names_both_versions(store: MemoryImageStore) -> None:
    samples = scrape(make_metrics(store))
    assert value(samples, "grenadine_build_info", version="0.1.0", criu_version="4.2.1") == 1


def test_added_program_starts_every_series_at_zero(store: MemoryImageStore) -> None:
    metrics = make_metrics(store)
    metrics.add_program("memcached")

    samples = scrape(metrics)

    assert value(samples, "grenadine_program_restarts_total", program="memcached") == 0
    for trigger in CHECKPOINT_TRIGGERS:
        labels = {"program": "memcached", "trigger": trigger}
        assert value(samples, "grenadine_checkpoints_total", **labels) == 0
        assert value(samples, "grenadine_checkpoint_failures_total", **labels) == 0
    for histogram in (
        "grenadine_checkpoint_duration_seconds",
        "grenadine_checkpoint_frozen_seconds",
        "grenadine_restore_duration_seconds",
        "grenadine_restore_memory_complete_seconds",
    ):
        assert value(samples, f"{histogram}_count", program="memcached") == 0
    assert value(samples, "grenadine_restores_total", program="memcached") == 0
    assert value(samples, "grenadine_restore_failures_total", program="memcached") == 0
    # Absent until a checkpoint succeeds, so an age alert does not fire on a fresh start.
    assert "grenadine_last_checkpoint_success_timestamp_seconds" not in series_of(
        samples, "memcached"
    )


def test_events_update_counters_and_histograms(store: MemoryImageStore) -> None:
    metrics = make_metrics(store)
    metrics.add_program("memcached")
    before = time.time()

    metrics.checkpoint_succeeded("memcached", "interval", 0.2, 0.04)
    metrics.checkpoint_succeeded("memcached", "interval", 3.0, 0.5)
    metrics.checkpoint_succeeded("memcached", "pre-deploy", 0.3, 0.02)
    metrics.checkpoint_failed("memcached", "signal")
    metrics.restore_succeeded("memcached", 1.5)
    metrics.restore_failed("memcached")
    metrics.restore_failed("memcached")
    metrics.program_restarted("memcached")
    metrics.restore_memory_complete("memcached", 0.75)
    after = time.time()

    samples = scrape(metrics)
    mc = {"program": "memcached"}
    assert value(samples, "grenadine_checkpoints_total", trigger="interval", **mc) == 2
    assert value(samples, "grenadine_checkpoints_total", trigger="pre-deploy", **mc) == 1
    assert value(samples, "grenadine_checkpoints_total", trigger="signal", **mc) == 0
    assert value(samples, "grenadine_checkpoint_failures_total", trigger="signal", **mc) == 1
    assert value(samples, "grenadine_checkpoint_duration_seconds_count", **mc) == 3
    assert value(samples, "grenadine_checkpoint_duration_seconds_sum", **mc) == pytest.approx(3.5)
    assert value(samples, "grenadine_checkpoint_duration_seconds_bucket", le="0.25", **mc) == 1
    assert value(samples, "grenadine_checkpoint_duration_seconds_bucket", le="0.5", **mc) == 2
    assert value(samples, "grenadine_checkpoint_duration_seconds_bucket", le="60.0", **mc) == 3
    assert value(samples, "grenadine_checkpoint_frozen_seconds_bucket", le="0.05", **mc) == 2
    assert value(samples, "grenadine_checkpoint_frozen_seconds_sum", **mc) == pytest.approx(0.56)
    stamp = value(samples, "grenadine_last_checkpoint_success_timestamp_seconds", **mc)
    assert before <= stamp <= after
    assert value(samples, "grenadine_restores_total", **mc) == 1
    assert value(samples, "grenadine_restore_duration_seconds_sum", **mc) == 1.5
    assert value(samples, "grenadine_restore_failures_total", **mc) == 2
    assert value(samples, "grenadine_program_restarts_total", **mc) == 1
    assert value(samples, "grenadine_restore_memory_complete_seconds_sum", **mc) == 0.75


def test_histogram_buckets_span_ten_milliseconds_to_a_minute(store: MemoryImageStore) -> None:
    metrics = make_metrics(store)
    metrics.add_program("memcached")
    bounds = {
        dict(labels)["le"]
        for name, labels in scrape(metrics)
        if name == "grenadine_checkpoint_duration_seconds_bucket"
    }
    finite = sorted(float(b) for b in bounds if b != "+Inf")
    assert finite[0] == 0.01
    assert finite[-1] == 60.0
    assert "+Inf" in bounds


def test_forgotten_program_loses_its_series(store: MemoryImageStore) -> None:
    metrics = make_metrics(store)
    for program in ("old", "kept"):
        metrics.add_program(program)
        metrics.checkpoint_succeeded(program, "manual", 0.1, 0.01)
        metrics.checkpoint_failed(program, "manual")
        metrics.restore_succeeded(program, 0.1)
        metrics.program_restarted(program)

    metrics.forget_program("old")

    samples = scrape(metrics)
    assert series_of(samples, "old") == set()
    assert value(samples, "grenadine_checkpoints_total", program="kept", trigger="manual") == 1


def test_exposition_has_the_design_names_and_no_created_series(store: MemoryImageStore) -> None:
    store.add("memcached", memory_bytes=1000, image_bytes=10)
    metrics = make_metrics(store, ProgramTable({"memcached": Status("RUNNING")}))
    metrics.add_program("memcached")
    metrics.checkpoint_succeeded("memcached", "signal", 0.1, 0.01)

    families = {f.name for f in text_string_to_metric_families(metrics.render().decode())}

    # The parser drops the _total suffix of counters.
    assert families == {
        "grenadine_build_info",
        "grenadine_program_up",
        "grenadine_program_restarts",
        "grenadine_checkpoints",
        "grenadine_checkpoint_failures",
        "grenadine_checkpoint_duration_seconds",
        "grenadine_checkpoint_frozen_seconds",
        "grenadine_last_checkpoint_success_timestamp_seconds",
        "grenadine_restores",
        "grenadine_restore_failures",
        "grenadine_restore_duration_seconds",
        "grenadine_restore_memory_complete_seconds",
        "grenadine_images",
        "grenadine_image_bytes",
        "grenadine_latest_image_memory_bytes",
        "grenadine_state_dir_free_bytes",
        "grenadine_program_image_age_seconds",
        "grenadine_uploads",
        "grenadine_upload_failures",
        "grenadine_upload_duration_seconds",
        "grenadine_upload_queue_length",
        "grenadine_remote_images",
        "grenadine_downloads",
        "grenadine_download_failures",
        "grenadine_download_duration_seconds",
    }


def test_uploads_and_downloads_are_counted_timed_and_failed(store: MemoryImageStore) -> None:
    metrics = make_metrics(store)
    metrics.add_program("redis")
    samples = scrape(metrics)
    assert value(samples, "grenadine_uploads_total", program="redis") == 0
    assert value(samples, "grenadine_upload_queue_length") == 0

    metrics.upload_queue_changed(3)
    metrics.upload_failed("redis")
    metrics.upload_succeeded("redis", 1.5)
    metrics.remote_images_seen("redis", 2)
    metrics.download_succeeded("redis", 0.5)
    metrics.download_failed("redis")

    samples = scrape(metrics)
    assert value(samples, "grenadine_upload_queue_length") == 3
    assert value(samples, "grenadine_upload_failures_total", program="redis") == 1
    assert value(samples, "grenadine_uploads_total", program="redis") == 1
    assert value(samples, "grenadine_upload_duration_seconds_sum", program="redis") == 1.5
    assert value(samples, "grenadine_remote_images", program="redis") == 2
    assert value(samples, "grenadine_downloads_total", program="redis") == 1
    assert value(samples, "grenadine_download_failures_total", program="redis") == 1

    metrics.forget_program("redis")
    assert series_of(scrape(metrics), "redis") == set()


def test_no_label_value_is_an_image_id(store: MemoryImageStore) -> None:
    ids = [store.add("memcached", memory_bytes=1, image_bytes=1, minutes=n).id for n in (0, 1)]
    metrics = make_metrics(store, ProgramTable({"memcached": Status("RUNNING")}))
    metrics.add_program("memcached")
    metrics.checkpoint_succeeded("memcached", "manual", 0.1, 0.01)
    metrics.restore_succeeded("memcached", 0.1)

    text = metrics.render().decode()
    label_values = {v for _, labels in scrape(metrics) for _, v in labels}

    assert not any(IMAGE_ID.fullmatch(v) for v in label_values)
    assert not any(id_ in text for id_ in ids)


def test_promtool_accepts_the_exposition(store: MemoryImageStore) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    store.add("memcached", memory_bytes=1000, image_bytes=10)
    metrics = make_metrics(store, ProgramTable({"memcached": Status("RUNNING")}))
    metrics.add_program("memcached")
    metrics.checkpoint_succeeded("memcached", "signal", 0.1, 0.01)

    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics.render(),
        capture_output=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# --- the endpoint ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_exchange(port: int, request: bytes, timeout: float = 30) -> HttpReply:
    """Send raw bytes, read until the server closes, split the reply."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = bytearray()
        with trio.fail_after(timeout):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, val = line.partition(":")
        headers[name.strip().lower()] = val.strip()
    return HttpReply(int(status_line.split(" ")[1]), headers, body)


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: test\r\n\r\n".encode()


@pytest.fixture
def endpoint_metrics(store: MemoryImageStore) -> Metrics:
    store.add("memcached", memory_bytes=1000, image_bytes=10)
    return make_metrics(store, ProgramTable({"memcached": Status("RUNNING")}))


async def test_endpoint_serves_metrics_on_port_zero(endpoint_metrics: Metrics) -> None:
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_metrics, endpoint_metrics, "127.0.0.1", 0)
        assert host == "127.0.0.1"
        assert port > 0

        reply = await http_exchange(port, get("/metrics"))

        assert reply.status == 200
        assert reply.headers["content-type"] == CONTENT_TYPE
        assert reply.headers["connection"] == "close"
        assert int(reply.headers["content-length"]) == len(reply.body)
        assert b'grenadine_images{program="memcached"} 1.0' in reply.body
        nursery.cancel_scope.cancel()


async def test_endpoint_answers_other_paths_and_methods(endpoint_metrics: Metrics) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, endpoint_metrics, "127.0.0.1", 0)

        index = await http_exchange(port, get("/"))
        missing = await http_exchange(port, get("/metricsx"))
        with_query = await http_exchange(port, get("/metrics?name[]=x"))
        head = await http_exchange(port, get("/metrics", "HEAD"))
        post = await http_exchange(port, get("/metrics", "POST"))
        garbage = await http_exchange(port, b"hello\r\n\r\n")

        assert index.status == 200
        assert b'href="/metrics"' in index.body
        assert missing.status == 404
        assert with_query.status == 200
        assert head.status == 200
        assert head.body == b""
        assert int(head.headers["content-length"]) > 0
        assert post.status == 405
        assert post.headers["allow"] == "GET, HEAD"
        assert garbage.status == 400
        nursery.cancel_scope.cancel()


async def test_endpoint_refuses_an_oversized_request_head(endpoint_metrics: Metrics) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, endpoint_metrics, "127.0.0.1", 0)
        request = b"GET /metrics HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"

        reply = await http_exchange(port, request)

        assert reply.status == 431
        nursery.cancel_scope.cancel()


async def test_endpoint_times_out_a_silent_client(
    endpoint_metrics: Metrics, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, endpoint_metrics, "127.0.0.1", 0)
        started = trio.current_time()

        reply = await http_exchange(port, b"GET /metrics HTTP/1.1\r\n")

        assert reply.status == 408
        assert trio.current_time() - started >= 10
        nursery.cancel_scope.cancel()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def test_a_taken_port_raises_with_the_address(
    endpoint_metrics: Metrics, taken_port: int
) -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(MetricsListenError) as info:
            await nursery.start(serve_metrics, endpoint_metrics, "127.0.0.1", taken_port)

    message = str(info.value)
    assert f"cannot listen on 127.0.0.1:{taken_port} for metrics" in message
    assert "Address already in use" in message


# --- contrib files name only metrics that exist --------------------------------------------

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def exported_series_names(store: MemoryImageStore) -> set[str]:
    store.add("memcached", memory_bytes=1, image_bytes=1)
    metrics = make_metrics(store, ProgramTable({"memcached": Status("RUNNING")}))
    metrics.add_program("memcached")
    metrics.checkpoint_succeeded("memcached", "signal", 0.1, 0.01)
    metrics.remote_images_seen("memcached", 1)
    return {name for name, _ in scrape(metrics)}


@pytest.mark.parametrize(
    "path",
    [
        CONTRIB / "grafana" / "grenadine-sv.json",
        CONTRIB / "prometheus" / "grenadine-rules.yml",
    ],
    ids=lambda p: p.name,
)
def test_contrib_file_names_only_exported_metrics(store: MemoryImageStore, path: Path) -> None:
    exported = exported_series_names(store)
    used = set(re.findall(r"\bgrenadine_[a-z_]+\b", path.read_text()))

    assert used, f"{path} names no grenadine metric"
    assert used <= exported, f"{path} names unknown series {sorted(used - exported)}"


def test_dashboard_covers_every_metric(store: MemoryImageStore) -> None:
    exported = exported_series_names(store)
    families = {
        name.removesuffix(suffix)
        for name in exported
        for suffix in HISTOGRAM_SERIES
        if name.endswith(suffix)
    } | {name for name in exported if not name.endswith(HISTOGRAM_SERIES)}
    dashboard = json.loads((CONTRIB / "grafana" / "grenadine-sv.json").read_text())
    text = json.dumps(dashboard)

    missing = {name for name in families if name not in text}

    assert missing == set()
