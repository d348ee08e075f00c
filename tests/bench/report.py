"""The results of a run: a Markdown table for people and a JSON file for tools. Pure code."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from tests.bench.stats import Comparison, Summary

MIB = 1 << 20


def format_value(value: float, unit: str) -> str:
    if math.isinf(value):
        return "inf"
    match unit:
        case "s":
            return f"{value:.3g} s" if value >= 0.001 else f"{value * 1000:.3g} ms"
        case "B":
            return f"{value / MIB:.1f} MiB"
        case "B/s":
            return f"{value / 1e6:.0f} MB/s"
        case "CPU s":
            return f"{value:.3g} CPU s"
    return f"{value:.3g} {unit}"


def format_summary(summary: Summary, unit: str) -> str:
    if summary.runs == 1:
        return format_value(summary.median, unit)
    low, high = format_value(summary.minimum, unit), format_value(summary.maximum, unit)
    return f"{format_value(summary.median, unit)} [{low}, {high}]"


def format_ratio(summary: Summary) -> str:
    def one(value: float) -> str:
        return "inf" if math.isinf(value) else f"{value:.2f}"

    if summary.runs == 1:
        return one(summary.median)
    return f"{one(summary.median)} [{one(summary.minimum)}, {one(summary.maximum)}]"


def verdict(comparison: Comparison) -> str:
    met = comparison.met()
    if met is None:
        return "-"
    return "yes" if met else "**no**"


def markdown_table(comparisons: Sequence[Comparison]) -> str:
    lines = [
        "| case | metric | grenadine-sv | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        ours = f"{c.ours_label}: {format_summary(Summary.of(c.ours), c.unit)}"
        baseline = f"{c.baseline_label}: {format_summary(Summary.of(c.baseline), c.unit)}"
        ratio = f"{format_ratio(c.ratio_summary())} ({c.ratio_label})"
        target = str(c.target) if c.target is not None else "-"
        lines.append(
            f"| {c.case} | {c.metric} | {ours} | {baseline} | {ratio} | {target} | {verdict(c)} |"
        )
    return "\n".join(lines) + "\n"


def markdown_report(
    comparisons: Sequence[Comparison], machine: Mapping[str, Any], settings: Mapping[str, Any]
) -> str:
    about = ", ".join(f"{key} {value}" for key, value in machine.items())
    runs = settings.get("runs")
    parts = [
        "## grenadine-sv benchmarks\n",
        f"{about}.\n",
        f"Mode {settings.get('mode')}: each figure is the median of {runs} run(s) "
        "[min, max], each run alternating with its baseline run; "
        "a ratio is computed per pair of runs.\n",
        markdown_table(comparisons),
    ]
    notes = [f"- {c.case}, {c.metric}: {c.note}" for c in comparisons if c.note]
    if notes:
        parts.append("Notes:\n\n" + "\n".join(notes) + "\n")
    return "\n".join(parts)


def _finite(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else value


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    def summary(values: Sequence[float]) -> dict[str, Any]:
        return {
            k: _finite(v) if isinstance(v, float) else v
            for k, v in asdict(Summary.of(values)).items()
        }

    ratios = comparison.ratios()
    return {
        "case": comparison.case,
        "metric": comparison.metric,
        "unit": comparison.unit,
        "ours_label": comparison.ours_label,
        "baseline_label": comparison.baseline_label,
        "ours": list(comparison.ours),
        "baseline": list(comparison.baseline),
        "ratio_label": comparison.ratio_label,
        "ratios": [_finite(r) for r in ratios],
        "ours_summary": summary(comparison.ours),
        "baseline_summary": summary(comparison.baseline),
        "ratio_summary": summary(ratios),
        "target": str(comparison.target) if comparison.target is not None else None,
        "met": comparison.met(),
        "note": comparison.note,
        "details": comparison.details,
    }


def json_report(
    comparisons: Sequence[Comparison], machine: Mapping[str, Any], settings: Mapping[str, Any]
) -> str:
    document = {
        "machine": dict(machine),
        "settings": dict(settings),
        "comparisons": [comparison_json(c) for c in comparisons],
    }
    return json.dumps(document, indent=2, allow_nan=False) + "\n"
