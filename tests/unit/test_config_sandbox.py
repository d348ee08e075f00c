"""One validation boundary: whatever the configuration accepts, the sandbox can start.

`check` validates with the configuration models; `run` builds each program's SandboxSpec,
which refuses what the launcher cannot do. Every configuration that validates must yield a
spec, or `run` fails on a configuration `check` called valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import find, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from grenadine_sv.config.models import ProgramConfig, SupervisorSettings
from grenadine_sv.supervisor.cold_start import sandbox_spec

BASE_DIR = Path("/etc/grenadine-sv")

_paths = st.one_of(
    st.sampled_from(
        ["/", "//", "///", "/tmp", "/tmp/", "//tmp", "/srv/../", "/a/./b", "/..", "rel", "", "."]
    ),
    st.text(alphabet="/a.\0 ", max_size=8),
)
_words = st.text(alphabet="ab \0=/", max_size=5)


def mostly(usual: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> Any:
    """Usually a plain value, sometimes anything: so that many examples validate."""
    return st.one_of(usual, usual, usual, anything)


_program_fields = st.fixed_dictionaries(
    {"command": mostly(st.just("/bin/true"), st.one_of(_words, st.lists(_words, max_size=3)))},
    optional={
        "directory": mostly(st.just("/srv"), _paths),
        "environment": mostly(st.just({"A": "1"}), st.dictionaries(_words, _words, max_size=3)),
        "umask": mostly(st.just("022"), st.integers(-1, 0o1000) | st.text("0o78", max_size=5)),
        "user": mostly(st.just("root"), _words),
        "group": mostly(st.just("root"), _words),
        "binds": st.lists(_paths, max_size=4),
    },
)


def validated(model: Any, fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields, context={"base_dir": BASE_DIR})
    except ValidationError:
        return None


@settings(max_examples=400)
@given(_program_fields, _paths)
def test_every_program_that_validates_has_a_sandbox_spec(
    fields: dict[str, Any], state_dir: str
) -> None:
    program = validated(ProgramConfig, {"name": "p", "source": BASE_DIR / "x.toml", **fields})
    settings_ = validated(SupervisorSettings, {"state_dir": state_dir})
    if program is None or settings_ is None:
        return
    spec = sandbox_spec(program, settings_.state_dir / "sandbox-root")
    assert spec.binds == tuple(str(path) for path in program.binds)


def test_the_strategy_reaches_both_sides_of_the_boundary() -> None:
    """The property above is vacuous unless the strategy makes programs that validate with
    binds, and programs whose binds are refused."""

    def program(fields: dict[str, Any]) -> ProgramConfig | None:
        return validated(ProgramConfig, {"name": "p", "source": BASE_DIR / "x.toml", **fields})

    # Derandomized: the same search every run, so that its reach cannot fail by chance.
    budget = settings(max_examples=2000, database=None, derandomize=True)
    valid = find(_program_fields, lambda f: bool((p := program(f)) and p.binds), settings=budget)
    refused = find(
        _program_fields, lambda f: bool(f.get("binds")) and program(f) is None, settings=budget
    )
    # find() raises when no example exists; these state what it found.
    assert program(valid) is not None
    assert program(refused) is None
