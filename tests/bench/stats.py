"""Figures of a benchmark: summaries of repeated runs, per-run ratios, targets. Pure code."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Summary:
    median: float
    minimum: float
    maximum: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("cannot summarise zero runs")
        return cls(statistics.median(values), min(values), max(values), len(values))


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, where 0 / 0 is 1 (equal) and x / 0 is infinite."""
    if denominator == 0:
        return 1.0 if numerator == 0 else math.inf
    return numerator / denominator


def pairwise_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """The ratio of each run to the baseline run alternating with it."""
    if len(numerators) != len(denominators):
        raise ValueError(
            f"{len(numerators)} runs against {len(denominators)} baseline runs: "
            "each run needs the baseline run it alternated with"
        )
    return [ratio(n, d) for n, d in zip(numerators, denominators, strict=True)]


@dataclass(frozen=True)
class Target:
    """A bound on the median ratio, such as "<= 1.10"."""

    op: Literal["<=", ">="]
    bound: float

    def met_by(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"


@dataclass(frozen=True)
class Comparison:
    """One measured figure of grenadine-sv against its baseline, over alternating runs.

    The ratio of each run is `ours / baseline`, or `baseline / ours` when `inverse` (a speed-up:
    how many times faster ours is)."""

    case: str
    metric: str
    unit: str
    ours_label: str
    baseline_label: str
    ours: tuple[float, ...]
    baseline: tuple[float, ...]
    target: Target | None = None
    inverse: bool = False
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio_label(self) -> str:
        if self.inverse:
            return f"{self.baseline_label} / {self.ours_label}"
        return f"{self.ours_label} / {self.baseline_label}"

    def ratios(self) -> list[float]:
        if self.inverse:
            return pairwise_ratios(self.baseline, self.ours)
        return pairwise_ratios(self.ours, self.baseline)

    def ratio_summary(self) -> Summary:
        return Summary.of(self.ratios())

    def met(self) -> bool | None:
        """Whether the median ratio meets the target; None when there is no target."""
        if self.target is None:
            return None
        return self.target.met_by(self.ratio_summary().median)
