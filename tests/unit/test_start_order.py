"""Start order (graphlib.TopologicalSorter): each program after what it depends on, and
among those free to start, by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grenadine_sv.config.checks import start_order
from grenadine_sv.config.models import ProgramConfig


def programs(depends: dict[str, list[str]]) -> dict[str, ProgramConfig]:
    return {
        name: ProgramConfig.model_validate(
            {"name": name, "command": ["x"], "source": Path("/x.toml"), "depends_on": on}
        )
        for name, on in depends.items()
    }


@st.composite
def acyclic(draw: st.DrawFn) -> dict[str, list[str]]:
    names = draw(st.lists(st.sampled_from("abcdefgh"), unique=True, min_size=1))
    # A program may depend only on those drawn before it: no cycle.
    return {
        name: draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
        for i, name in enumerate(names)
    }


@given(acyclic())
def test_each_program_comes_after_its_dependencies_ties_by_name(depends: dict[str, list[str]]):
    order = start_order(programs(depends))
    assert sorted(order) == sorted(depends)
    for name, on in depends.items():
        assert all(order.index(d) < order.index(name) for d in on)
    # The smallest name among the programs free to start goes first, each time.
    placed: set[str] = set()
    for name in order:
        free = [n for n in depends if n not in placed and set(depends[n]) <= placed]
        assert name == min(free)
        placed.add(name)


def test_a_cycle_is_named():
    with pytest.raises(ValueError, match=r"dependency cycle: (a -> b -> a|b -> a -> b)"):
        start_order(programs({"a": ["b"], "b": ["a"], "c": []}))


def test_an_unknown_dependency_is_named():
    with pytest.raises(ValueError, match="'a' depends on unknown program 'z'"):
        start_order(programs({"a": ["z"]}))
