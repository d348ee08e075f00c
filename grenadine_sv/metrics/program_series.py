"""The per-program counters, gauges and histograms, kept as plain numbers and turned into
metric families when scraped (prometheus-client's custom collector interface).

prometheus-client's labelled children hold an object and a lock per value, each histogram
bucket included: 34 KiB per program for the supervisor's series, where these hold a few
hundred bytes. Updates come from the event loop and scrapes from a worker thread; one lock
keeps a scrape from seeing half an update."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class Kind(Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class SeriesSpec:
    name: str
    """As prometheus-client names it: a counter's without `_total`."""
    documentation: str
    kind: Kind
    labels: Labels = ("program",)
    buckets: tuple[float, ...] = ()
    """A histogram's finite upper bounds, ascending (+Inf is added)."""


class HistogramValue:
    """Observations per bucket (not cumulative; the last is +Inf) and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0


class LabelledSeries:
    """One metric family: its value for each set of label values it has."""

    __slots__ = ("_bounds", "spec", "values")

    def __init__(self, spec: SeriesSpec) -> None:
        self.spec = spec
        self.values: dict[Labels, float | HistogramValue] = {}
        self._bounds = [floatToGoString(bound) for bound in spec.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]

    def zero(self, labels: Labels) -> None:
        if labels not in self.values:
            hist = self.spec.kind is Kind.HISTOGRAM
            self.values[labels] = HistogramValue(len(self.spec.buckets)) if hist else 0.0

    def add(self, labels: Labels, amount: float) -> None:
        number = self.values.get(labels, 0.0)
        assert isinstance(number, float)
        self.values[labels] = number + amount

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = float(value)

    def observe(self, labels: Labels, value: float) -> None:
        self.zero(labels)
        histogram = self.values[labels]
        assert isinstance(histogram, HistogramValue)
        histogram.counts[bisect_left(self.spec.buckets, value)] += 1
        histogram.total += value

    def family(self) -> Metric:
        spec = self.spec
        if spec.kind is Kind.HISTOGRAM:
            histograms = HistogramMetricFamily(spec.name, spec.documentation, labels=spec.labels)
            for labels, histogram in self.values.items():
                assert isinstance(histogram, HistogramValue)
                cumulative = accumulate(histogram.counts)
                buckets = [
                    (bound, float(n)) for bound, n in zip(self._bounds, cumulative, strict=True)
                ]
                histograms.add_metric(labels, buckets, histogram.total)
            return histograms
        family_type = CounterMetricFamily if spec.kind is Kind.COUNTER else GaugeMetricFamily
        family = family_type(spec.name, spec.documentation, labels=spec.labels)
        for labels, number in self.values.items():
            assert isinstance(number, float)
            family.add_metric(labels, number)
        return family


class ProgramSeries:
    """A collector for a registry: the families of `specs`, in that order."""

    def __init__(self, specs: Sequence[SeriesSpec]) -> None:
        self._series = {spec.name: LabelledSeries(spec) for spec in specs}
        self._lock = threading.Lock()

    def zero(self, name: str, *labels: str) -> None:
        with self._lock:
            self._series[name].zero(labels)

    def inc(self, name: str, *labels: str) -> None:
        with self._lock:
            self._series[name].add(labels, 1.0)

    def set(self, name: str, value: float, *labels: str) -> None:
        with self._lock:
            self._series[name].set(labels, value)

    def observe(self, name: str, value: float, *labels: str) -> None:
        with self._lock:
            self._series[name].observe(labels, value)

    def forget(self, program: str) -> None:
        """Drop every series whose first label (the program) is `program`."""
        with self._lock:
            for series in self._series.values():
                for labels in [labels for labels in series.values if labels[:1] == (program,)]:
                    del series.values[labels]

    def describe(self) -> Iterable[Metric]:
        return [LabelledSeries(series.spec).family() for series in self._series.values()]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return [series.family() for series in self._series.values()]
