"""The compact per-program series expose what prometheus-client's own labelled metrics would
for the same events: same names, samples, bucket bounds and values."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from grenadine_sv.metrics.program_series import Kind, ProgramSeries, SeriesSpec

BUCKETS = (0.01, 0.25, 1.0, 60.0)
SPECS = (
    SeriesSpec("demo_events", "Events", Kind.COUNTER, ("program", "trigger")),
    SeriesSpec("demo_seconds", "Durations", Kind.HISTOGRAM, buckets=BUCKETS),
    SeriesSpec("demo_stamp", "A gauge", Kind.GAUGE),
)


def exposition(registry: CollectorRegistry) -> list[str]:
    """Sorted lines, without the `_created` series that the supervisor turns off."""
    lines = generate_latest(registry).decode().splitlines()
    return sorted(line for line in lines if "_created" not in line)


def test_the_exposition_matches_prometheus_clients_own_metrics() -> None:
    theirs = CollectorRegistry(auto_describe=False)
    events = Counter("demo_events", "Events", ["program", "trigger"], registry=theirs)
    seconds = Histogram("demo_seconds", "Durations", ["program"], buckets=BUCKETS, registry=theirs)
    stamp = Gauge("demo_stamp", "A gauge", ["program"], registry=theirs)
    series = ProgramSeries(SPECS)
    ours = CollectorRegistry(auto_describe=False)
    ours.register(series)

    rng = random.Random(7)
    # Values on the bucket bounds go into that bucket (le is "less than or equal").
    observations = [*BUCKETS, 0.0, 1e9, *(rng.uniform(0, 100) for _ in range(200))]
    for number, observed in enumerate(observations):
        program = f"p{number % 3}"
        seconds.labels(program=program).observe(observed)
        series.observe("demo_seconds", observed, program)
        trigger = rng.choice(("signal", "manual"))
        events.labels(program=program, trigger=trigger).inc()
        series.inc("demo_events", program, trigger)
    stamp.labels(program="p1").set(12)
    series.set("demo_stamp", 12, "p1")
    events.labels(program="idle", trigger="signal")
    series.zero("demo_events", "idle", "signal")

    assert exposition(ours) == exposition(theirs)


def test_a_forgotten_program_loses_every_series_and_the_others_keep_theirs() -> None:
    series = ProgramSeries(SPECS)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(series)
    for program in ("old", "kept"):
        series.inc("demo_events", program, "signal")
        series.observe("demo_seconds", 0.5, program)
        series.set("demo_stamp", 1, program)

    series.forget("old")

    lines = [line for line in exposition(registry) if not line.startswith("#")]
    assert lines
    assert all('program="kept"' in line for line in lines)


def test_a_zeroed_histogram_has_every_bucket_at_zero() -> None:
    series = ProgramSeries(SPECS)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(series)
    series.zero("demo_seconds", "fresh")
    samples = [line for line in exposition(registry) if line.startswith("demo_seconds")]
    assert len(samples) == len(BUCKETS) + 1 + 2  # the buckets, +Inf, _count and _sum
    assert all(line.endswith(" 0.0") for line in samples)
