"""The command line stays quick: its client path loads none of the heavy libraries, and `run`
loads only what the configuration needs, then keeps the collector off what it loaded.

lint-imports guards the imports statically; this runs the real command in a fresh
interpreter and looks at what it loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("trio", "pydantic", "structlog", "prometheus_client")
# Standard modules the client path does without: a few ms of every command each (pathlib
# with urllib.parse; shutil, which argparse imports for the terminal's width, with bz2/lzma).
AVOIDED = ("pathlib", "shutil")

PROBE = """
import sys
from grenadine_sv.cli.main import main
code = main(["-c", sys.argv[1], "status"])
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(code, ",".join(heavy))
"""


def run_probe(probe: str, config: Path) -> subprocess.CompletedProcess[str]:
    """Run `probe` in a fresh interpreter with the configuration's path as its argument."""
    return subprocess.run(
        [sys.executable, "-c", probe, str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def status_probe(tmp_path: Path, modules: tuple[str, ...]) -> tuple[str, str]:
    """`status` against no supervisor: its exit code, and which of `modules` it loaded."""
    config = tmp_path / "grenadine.toml"
    socket_path = tmp_path / "control.sock"
    config.write_text(f'[supervisor]\ncontrol_socket = "{socket_path}"\n')
    result = run_probe(PROBE.format(heavy=modules), config)
    code, loaded = result.stdout.split()[0], result.stdout.strip().partition(" ")[2]
    assert code == "3", result.stderr  # EXIT_NOT_RUNNING: the request really was tried
    return code, loaded


def test_status_without_a_supervisor_loads_no_heavy_library(tmp_path: Path) -> None:
    assert status_probe(tmp_path, HEAVY) == ("3", "")


def test_status_loads_neither_pathlib_nor_shutil(tmp_path: Path) -> None:
    assert status_probe(tmp_path, AVOIDED) == ("3", "")


RUN_PROBE = """
import sys
from grenadine_sv.cli.main import main
code = main(["-c", sys.argv[1], "run"])
print(code, "structlog" in sys.modules, sys.modules.get("rich") is not None)
"""


def test_run_does_not_load_rich_through_structlog(tmp_path: Path) -> None:
    # rich is installed here (import-linter needs it); structlog would import it at once.
    config = tmp_path / "grenadine.toml"
    config.write_text("[supervisor]\nno_such_key = 1\n")  # run stops at the configuration
    result = run_probe(RUN_PROBE, config)
    assert result.stdout.split() == ["2", "True", "False"], result.stderr


BUILD_PROBE = """
import sys
from pathlib import Path
from grenadine_sv.config.loading import load_config
from grenadine_sv.supervisor.build import build_supervisor
supervisor = build_supervisor(load_config(Path(sys.argv[1])))
optional = ("prometheus_client", "h11", "grenadine_sv.supervisor.remote")
print(",".join(m for m in optional if m in sys.modules) or "-")
"""


def _libraries_a_supervisor_loads(tmp_path: Path, listen: str) -> str:
    config = tmp_path / "grenadine.toml"
    config.write_text(
        f'[supervisor]\nstate_dir = "{tmp_path / "state"}"\nlog_dir = "{tmp_path / "logs"}"\n'
        f'[supervisor.metrics]\nlisten = "{listen}"\n'
    )
    return run_probe(BUILD_PROBE, config).stdout.strip()


def test_a_supervisor_loads_metrics_and_object_store_code_only_when_configured(
    tmp_path: Path,
) -> None:
    assert _libraries_a_supervisor_loads(tmp_path, "") == "-"
    assert _libraries_a_supervisor_loads(tmp_path, "127.0.0.1:9847") == "prometheus_client"


HEAP_PROBE = """
import gc, sys
import trio
seen = []
trio.run = lambda *args, **kwargs: seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
from grenadine_sv.cli.main import main
code = main(["-c", sys.argv[1], "run"])
print(code, seen, gc.isenabled())
"""


def test_run_moves_the_start_up_heap_out_of_the_collectors_way(tmp_path: Path) -> None:
    # What imports and the configuration allocated is frozen before the event loop starts
    # (no full collection walks it again), and the collector runs from then on.
    config = tmp_path / "grenadine.toml"
    config.write_text(
        f'[supervisor]\nstate_dir = "{tmp_path / "state"}"\nlog_dir = "{tmp_path / "logs"}"\n'
        f'control_socket = "{tmp_path / "control.sock"}"\n'
    )
    result = run_probe(HEAP_PROBE, config)
    assert result.stdout.split(" ", 1) == ["0", "[(True, True)] True\n"], result.stderr


def test_run_stopped_by_its_configuration_leaves_the_collector_on(tmp_path: Path) -> None:
    config = tmp_path / "grenadine.toml"
    config.write_text("[supervisor]\nno_such_key = 1\n")
    result = run_probe(HEAP_PROBE, config)
    assert result.stdout.split(" ", 1) == ["2", "[] True\n"], result.stderr
