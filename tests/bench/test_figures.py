"""The pure parts of the benchmark suite: summaries, ratios, targets, tables, configurations.

Part of the default test run (fast, no root): the benchmarks themselves run on demand."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from tests.bench.grenadine import GrenadineSupervisor, ProgramSpec, toml_value
from tests.bench.report import format_value, json_report, markdown_report, markdown_table
from tests.bench.settings import FULL, QUICK
from tests.bench.stats import Comparison, Summary, Target, pairwise_ratios, ratio
from tests.bench.supervisord import Supervisord


def comparison(**changes: object) -> Comparison:
    fields: dict[str, object] = {
        "case": "1. checkpoint 256 MiB",
        "metric": "wall time",
        "unit": "s",
        "ours_label": "checkpoint cmd",
        "baseline_label": "criu dump",
        "ours": (1.2, 1.0, 3.0),
        "baseline": (1.0, 1.0, 1.0),
        "target": Target("<=", 1.10),
    }
    fields.update(changes)
    return Comparison(**fields)  # type: ignore[arg-type]


def test_summary_is_median_min_and_max() -> None:
    assert Summary.of([3.0, 1.0, 2.0, 10.0]) == Summary(2.5, 1.0, 10.0, 4)
    with pytest.raises(ValueError, match="zero runs"):
        Summary.of([])


def test_ratio_of_zero_baseline_is_one_when_equal_and_infinite_otherwise() -> None:
    assert ratio(0.0, 0.0) == 1.0
    assert math.isinf(ratio(0.01, 0.0))
    assert ratio(3.0, 2.0) == 1.5


def test_ratios_pair_each_run_with_its_own_baseline_run() -> None:
    assert pairwise_ratios([2.0, 6.0], [1.0, 3.0]) == [2.0, 2.0]
    with pytest.raises(ValueError, match="each run needs"):
        pairwise_ratios([1.0], [1.0, 2.0])


def test_target_is_judged_on_the_median_ratio() -> None:
    missed = comparison()
    assert missed.ratio_summary() == Summary(1.2, 1.0, 3.0, 3)
    assert missed.met() is False
    assert comparison(ours=(1.0, 1.1, 5.0)).met() is True
    assert comparison(target=None).met() is None


def test_inverse_comparison_is_a_speed_up() -> None:
    speed_up = comparison(
        ours=(0.5, 1.0),
        baseline=(10.0, 10.0),
        target=Target(">=", 10.0),
        inverse=True,
        ours_label="restore",
        baseline_label="cold start",
    )
    assert speed_up.ratios() == [20.0, 10.0]
    assert speed_up.ratio_label == "cold start / restore"
    assert speed_up.met() is True


def test_values_are_shown_in_readable_units() -> None:
    assert format_value(0.5, "s") == "0.5 s"
    assert format_value(0.0004, "s") == "0.4 ms"
    assert format_value(3 * (1 << 20), "B") == "3.0 MiB"
    assert format_value(280e6, "B/s") == "280 MB/s"
    assert format_value(math.inf, "s") == "inf"


def test_table_row_shows_median_range_ratio_target_and_verdict() -> None:
    table = markdown_table([comparison()])
    row = table.splitlines()[2]
    assert row.startswith("| 1. checkpoint 256 MiB | wall time |")
    assert "checkpoint cmd: 1.2 s [1 s, 3 s]" in row
    assert "1.20 [1.00, 3.00] (checkpoint cmd / criu dump)" in row
    assert row.endswith("| <= 1.1 | **no** |")


def test_reports_carry_machine_settings_and_notes() -> None:
    machine = {"kernel": "6.18", "criu": "4.2.1"}
    settings = {"mode": "full", "runs": 3}
    text = markdown_report([comparison(note="why")], machine, settings)
    assert "kernel 6.18, criu 4.2.1" in text
    assert "median of 3 run(s)" in text
    assert "- 1. checkpoint 256 MiB, wall time: why" in text
    document = json.loads(json_report([comparison(baseline=(0.0, 1.0, 1.0))], machine, settings))
    [entry] = document["comparisons"]
    assert entry["ratios"] == [None, 1.0, 3.0]  # infinite ratios are null in JSON
    assert entry["met"] is False
    assert document["settings"]["runs"] == 3


def test_quick_settings_run_each_case_once_at_the_smallest_size() -> None:
    assert QUICK.runs == 1
    assert QUICK.sizes_mib == (min(FULL.sizes_mib),)
    assert FULL.sizes_mib == (16, 256, 1024, 4096)  # the scaling table: 16 MiB to 4 GiB
    assert FULL.with_runs(3).runs == 3
    with pytest.raises(ValueError, match="--runs"):
        FULL.with_runs(0)


def test_grenadine_configuration_is_valid_toml_with_the_programs() -> None:
    program = ProgramSpec(
        name="svc",
        command=("/bin/sh", "-c", "echo 'a \"b\"'"),
        settings={"startsecs": 0.2, "ready": {"tcp": "127.0.0.1:1", "timeout": "5s"}},
        checkpoint={"on_signal": True, "keep": 2},
    )
    sv = GrenadineSupervisor(Path("/tmp/gsvb-x"), [program])
    parsed = tomllib.loads(sv.config_text())
    assert parsed["supervisor"]["control_socket"] == "/tmp/gsvb-x/ctl.sock"
    assert parsed["programs"]["svc"]["command"] == list(program.command)
    assert parsed["programs"]["svc"]["ready"] == {"tcp": "127.0.0.1:1", "timeout": "5s"}
    assert parsed["programs"]["svc"]["checkpoint"] == {"on_signal": True, "keep": 2}
    with pytest.raises(TypeError):
        toml_value(object())


def test_supervisord_gets_the_same_programs_and_start_settings(tmp_path: Path) -> None:
    program = ProgramSpec(name="idle", command=("/bin/sh", "-c", "trap 'exit 0' TERM; wait"))
    text = Supervisord(tmp_path, [program]).config_text()
    assert "[program:idle]" in text
    assert "command = /bin/sh -c 'trap '\"'\"'exit 0'\"'\"' TERM; wait'" in text
    assert "startsecs = 1" in text
    assert "stopsignal = TERM" in text
