"""Checks across programs: dependencies and log files. Pure functions over validated models."""

import difflib
import heapq
from collections.abc import Callable, Mapping
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from grenadine_sv.config.errors import Problem, key_path
from grenadine_sv.config.models import ProgramConfig, RemoteSettings

PathDisplay = Callable[[Path], str]


def program_problems(
    programs: Mapping[str, ProgramConfig], log_dir: Path, display: PathDisplay = str
) -> list[Problem]:
    """Everything wrong between programs that no single program's table can show."""
    return [
        *_table_key_problems(programs),
        *_dependency_problems(programs),
        *_cycle_problems(programs),
        *_log_path_problems(programs, log_dir, display),
    ]


def start_order(programs: Mapping[str, ProgramConfig]) -> list[str]:
    """Names in dependency order; among programs free to start, by name.

    Raises ValueError on a dependency cycle or an unknown dependency (a configuration that
    validated has neither: program_problems reports every cycle).
    """
    for name, program in programs.items():
        unknown = [d for d in program.depends_on if d not in programs]
        if unknown:
            raise ValueError(f"program {name!r} depends on unknown program {unknown[0]!r}")
    sorter = TopologicalSorter({name: p.depends_on for name, p in programs.items()})
    try:
        sorter.prepare()
    except CycleError as exc:
        raise ValueError(f"dependency cycle: {' -> '.join(exc.args[1])}") from None
    ready = list(sorter.get_ready())
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        sorter.done(name)
        for freed in sorter.get_ready():
            heapq.heappush(ready, freed)
    return order


def _depends_key(name: str) -> str:
    return key_path(["programs", name, "depends_on"])


def _table_key_problems(programs: Mapping[str, ProgramConfig]) -> list[Problem]:
    return [
        Problem(
            program.source,
            key_path(["programs", key]),
            f'expected the program named by this key, got program "{program.name}"',
        )
        for key, program in programs.items()
        if key != program.name
    ]


def _dependency_problems(programs: Mapping[str, ProgramConfig]) -> list[Problem]:
    problems = []
    for name, program in programs.items():
        for dependency in program.depends_on:
            if dependency == name:
                message = f'expected names of other programs, got "{name}" (the program itself)'
            elif dependency not in programs:
                message = f'expected names of defined programs, got "{dependency}" (no such program'
                close = difflib.get_close_matches(dependency, list(programs), n=1)
                message += f', did you mean "{close[0]}"?)' if close else ")"
            else:
                continue
            problems.append(Problem(program.source, _depends_key(name), message))
    return problems


def _cycle_problems(programs: Mapping[str, ProgramConfig]) -> list[Problem]:
    return [
        Problem(
            programs[cycle[0]].source,
            _depends_key(cycle[0]),
            "expected no dependency cycle, got " + " -> ".join(cycle),
        )
        for cycle in find_cycles(
            {
                name: [d for d in program.depends_on if d in programs and d != name]
                for name, program in programs.items()
            }
        )
    ]


def find_cycles(graph: Mapping[str, list[str]]) -> list[list[str]]:
    """Cycles of a dependency graph found by one depth-first search (at least one if the
    graph has any), each written from its smallest name back to it: ["a", "b", "a"]."""
    cycles: list[list[str]] = []
    seen_cycles: set[tuple[str, ...]] = set()
    finished: set[str] = set()
    for root in sorted(graph):
        if root in finished:
            continue
        path: list[str] = [root]
        on_path = {root}
        stack = [iter(sorted(graph[root]))]
        while stack:
            following = next(stack[-1], None)
            if following is None:
                stack.pop()
                finished.add(path[-1])
                on_path.discard(path.pop())
            elif following in on_path:
                cycle = path[path.index(following) :]
                start = cycle.index(min(cycle))
                rotated = (*cycle[start:], *cycle[:start])
                if rotated not in seen_cycles:
                    seen_cycles.add(rotated)
                    cycles.append([*rotated, rotated[0]])
            elif following not in finished:
                path.append(following)
                on_path.add(following)
                stack.append(iter(sorted(graph[following])))
    return cycles


def _log_path_problems(
    programs: Mapping[str, ProgramConfig], log_dir: Path, display: PathDisplay
) -> list[Problem]:
    problems = []
    writers: dict[Path, tuple[str, str]] = {}
    for name, program in programs.items():
        for stream, path in (
            ("stdout", program.stdout_path(log_dir)),
            ("stderr", program.stderr_path(log_dir)),
        ):
            if path in writers:
                other_name, other_stream = writers[path]
                other_file = display(programs[other_name].source)
                problems.append(
                    Problem(
                        program.source,
                        key_path(["programs", name, f"{stream}_logfile"]),
                        f'expected a log file of its own, got "{path}" (also the {other_stream}'
                        f' log of program "{other_name}" in {other_file})',
                    )
                )
            else:
                writers[path] = (name, stream)
    return problems


def remote_problems(
    programs: Mapping[str, ProgramConfig], remote: RemoteSettings | None
) -> list[Problem]:
    """Programs that upload or restore remotely need an object store, and uploads a key."""
    has_store = remote is not None and remote.url is not None
    has_recipients = remote is not None and bool(remote.encryption.recipients)
    problems = []
    for name, program in programs.items():
        if program.checkpoint.upload and not has_store:
            problems.append(
                Problem(
                    program.source,
                    key_path(["programs", name, "checkpoint", "upload"]),
                    "expected [supervisor.remote] url to be set (uploads go to an object store)",
                )
            )
        elif program.checkpoint.upload and not has_recipients:
            problems.append(
                Problem(
                    program.source,
                    key_path(["programs", name, "checkpoint", "upload"]),
                    "expected [supervisor.remote.encryption] recipients to be set "
                    "(images hold process memory: nothing is uploaded unencrypted)",
                )
            )
        if program.restore_source != "local" and not has_store:
            problems.append(
                Problem(
                    program.source,
                    key_path(["programs", name, "restore_source"]),
                    f'expected "local" without [supervisor.remote] url, '
                    f'got "{program.restore_source}"',
                )
            )
    return problems
