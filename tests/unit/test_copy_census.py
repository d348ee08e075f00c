"""The periodic census of running programs' cgroups looks at every process again only when a
cgroup's processes changed since a look that found nothing to end, and one of them is outside
the instance's PID namespace. The /proc lookups are stood in for: these are fake pids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from grenadine_sv.sandbox.cgroup import ProgramCgroup
from grenadine_sv.supervisor import membership
from grenadine_sv.supervisor.membership import CopyCensus

NAMESPACE = 4026532000


@dataclass
class FakeCgroup:
    path: Path
    processes: list[int]

    @property
    def program(self) -> str:
        return self.path.name

    def pids(self) -> list[int]:
        return list(self.processes)


@dataclass
class FullCensus:
    """Stands in for end_all_but: records each full look, ends what `extras` names."""

    extras: dict[str, list[int]] = field(default_factory=dict)
    looked_at: list[str] = field(default_factory=list)

    def __call__(self, cgroup: ProgramCgroup, pid_ns_inode: int) -> list[int]:
        self.looked_at.append(cgroup.program)
        return self.extras.pop(cgroup.program, [])


@pytest.fixture
def namespaces(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """PID namespace by fake pid; a pid not in it is gone."""
    known: dict[int, int] = {}

    def pid_ns_inode(pid: int) -> int:
        if pid not in known:
            raise ProcessLookupError(pid)
        return known[pid]

    monkeypatch.setattr(membership, "read_pid_ns_inode", pid_ns_inode)
    return known


@pytest.fixture
def full_census(monkeypatch: pytest.MonkeyPatch, namespaces: dict[int, int]) -> FullCensus:
    recorder = FullCensus()
    monkeypatch.setattr(membership, "end_all_but", recorder)
    return recorder


def test_processes_all_in_the_instances_namespace_need_no_full_look(
    full_census: FullCensus, namespaces: dict[int, int]
) -> None:
    program = FakeCgroup(Path("p0"), [10, 11])
    namespaces.update({10: NAMESPACE, 11: NAMESPACE})
    census = CopyCensus()
    instances = [(cast(ProgramCgroup, program), NAMESPACE)]
    assert census.end_copies(instances) == {}
    program.processes.append(12)
    namespaces[12] = NAMESPACE
    assert census.end_copies(instances) == {}
    assert full_census.looked_at == []


@pytest.mark.parametrize(
    ("namespace_of_the_newcomer", "why"),
    [(NAMESPACE + 7, "another sandbox or a nested one"), (None, "gone before it was looked at")],
)
def test_a_process_outside_the_instances_namespace_gets_a_full_look(
    full_census: FullCensus,
    namespaces: dict[int, int],
    namespace_of_the_newcomer: int | None,
    why: str,
) -> None:
    program = FakeCgroup(Path("p0"), [10, 30])
    namespaces[10] = NAMESPACE
    if namespace_of_the_newcomer is not None:
        namespaces[30] = namespace_of_the_newcomer
    full_census.extras["p0"] = [30]
    assert CopyCensus().end_copies([(cast(ProgramCgroup, program), NAMESPACE)]) == {"p0": [30]}
    assert full_census.looked_at == ["p0"], why


def test_unchanged_cgroups_are_not_looked_into_again(full_census: FullCensus) -> None:
    quiet = FakeCgroup(Path("quiet"), [10, 11])
    forking = FakeCgroup(Path("forking"), [20])
    census = CopyCensus()
    instances = [(cast(ProgramCgroup, quiet), NAMESPACE), (cast(ProgramCgroup, forking), NAMESPACE)]
    assert census.end_copies(instances) == {}
    assert full_census.looked_at == ["quiet", "forking"]
    forking.processes.append(21)
    assert census.end_copies(instances) == {}
    assert full_census.looked_at == ["quiet", "forking", "forking"]
    assert census.end_copies(instances) == {}
    assert full_census.looked_at == ["quiet", "forking", "forking"]


def test_a_cgroup_where_copies_were_ended_is_looked_into_again(full_census: FullCensus) -> None:
    program = FakeCgroup(Path("p0"), [10, 30])
    full_census.extras["p0"] = [30]
    census = CopyCensus()
    instances = [(cast(ProgramCgroup, program), NAMESPACE)]
    assert census.end_copies(instances) == {"p0": [30]}
    program.processes.remove(30)
    assert census.end_copies(instances) == {}
    assert full_census.looked_at == ["p0", "p0"]


def test_a_new_instance_is_looked_into_even_with_the_same_pids(full_census: FullCensus) -> None:
    program = FakeCgroup(Path("p0"), [10])
    census = CopyCensus()
    census.end_copies([(cast(ProgramCgroup, program), NAMESPACE)])
    census.end_copies([(cast(ProgramCgroup, program), NAMESPACE + 1)])
    assert full_census.looked_at == ["p0", "p0"]


def test_the_census_slows_down_while_nothing_changes_and_speeds_up_on_a_change() -> None:
    cadence = membership.CensusCadence()
    one = [(Path("/cg/a"), 11)]
    restarted = [(Path("/cg/a"), 12)]

    waits = [cadence.after(one, ended=False) for _ in range(6)]
    assert waits == [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
    assert cadence.after(restarted, ended=False) == 2.0, "a new instance: a late copy may come"
    assert cadence.after(restarted, ended=False) == 4.0
    assert cadence.after(restarted, ended=True) == 2.0, "a copy was just ended"
    assert cadence.after([], ended=False) == 2.0, "the program stopped"
