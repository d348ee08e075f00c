"""The compatibility table: each daemon test records how far its program got, and
`python -m tests.integration.compat REPORT` prints the table (contrib/bootstrap compat).

A test records into the JSON lines file named by $GRENADINE_SV_COMPAT_REPORT, when set.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT_VARIABLE = "GRENADINE_SV_COMPAT_REPORT"
STEPS = ("checkpoint", "restore", "fresh supervisor")


@dataclass
class CompatRow:
    program: str
    version: str
    notes: str
    passed: list[str] = field(default_factory=list)

    def passed_step(self, step: str) -> None:
        assert step in STEPS, step
        self.passed.append(step)

    def write(self) -> None:
        path = os.environ.get(REPORT_VARIABLE)
        if path:
            with open(path, "a") as report:
                report.write(json.dumps(asdict(self)) + "\n")


def table(rows: list[CompatRow]) -> str:
    lines = [
        "| program | version | checkpoint | restore | fresh supervisor | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        marks = ["yes" if step in row.passed else "**no**" for step in STEPS]
        lines.append(f"| {row.program} | {row.version} | {' | '.join(marks)} | {row.notes} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = [CompatRow(**json.loads(line)) for line in Path(argv[1]).read_text().splitlines()]
    print(table(sorted(rows, key=lambda row: row.program.lower())))
    return 0 if all(len(row.passed) == len(STEPS) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
