"""The README's exit-code table, proven command by command: every command of `grenadine-sv`
in every situation that gives it one of its codes (0 done, 1 the supervisor answered but it did
not happen, 2 bad usage or invalid configuration, 3 no supervisor running).

One supervisor serves the whole table; a case that needs more (a FATAL program, an invalid
file, an image) sets it up and undoes it around its own command."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from grenadine_sv.cli.exit_codes import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE
from grenadine_sv.criu.binary import CriuNotFound, find_criu
from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, require_root
from tests.integration.test_cli import IDLE, SupervisorProcess, run_cli

pytestmark = pytest.mark.root

PROGRAMS = (
    f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n\n"
    f"[programs.later]\ncommand = {IDLE}\nautostart = false\n"
)
BROKEN = '\n[programs.broken]\ncommand = ["/nonexistent/binary"]\nautostart = false\n'
INVALID = '\n[programs.bad]\nstartsecs = "soon"\n'
SUPERVISORD_CONF = "[program:web]\ncommand = /bin/sleep 1000\n"


@dataclass(frozen=True)
class Table:
    """The running supervisor the cases share, and a second configuration whose socket
    nothing listens on."""

    supervisor: SupervisorProcess
    dead_config: Path

    @property
    def dirs(self) -> SupervisorDirs:
        return self.supervisor.dirs

    @property
    def store(self) -> ImageStore:
        return ImageStore(self.dirs.state_dir)


@pytest.fixture(scope="module")
def table() -> Iterator[Table]:
    require_root()
    root = Path(tempfile.mkdtemp(prefix="gsv-", dir="/tmp"))
    dirs = SupervisorDirs(root)
    supervisor = SupervisorProcess(dirs)
    try:
        dirs.write_config(PROGRAMS)
        dead = root / "dead"
        dead.mkdir()
        SupervisorDirs(dead).write_config(PROGRAMS)
        supervisor.start()
        supervisor.wait_running("idle")
        yield Table(supervisor, SupervisorDirs(dead).config)
    finally:
        supervisor.stop()
        shutil.rmtree(root, ignore_errors=True)


# Situations: each a context around the case's command, yielding words that replace the
# placeholders in its arguments.
Situation = Callable[[Table], contextlib.AbstractContextManager[dict[str, str]]]


@contextlib.contextmanager
def running(table: Table) -> Iterator[dict[str, str]]:
    """The shared supervisor as it is: idle RUNNING, later STOPPED."""
    yield {"CONFIG": str(table.dirs.config), "ROOT": str(table.dirs.root)}


@contextlib.contextmanager
def not_running(table: Table) -> Iterator[dict[str, str]]:
    """A configuration whose control socket nothing listens on."""
    yield {"CONFIG": str(table.dead_config), "ROOT": str(table.dead_config.parent)}


@contextlib.contextmanager
def invalid_file(table: Table) -> Iterator[dict[str, str]]:
    """The supervisor's own file made invalid (for reload, reread and avail too)."""
    good = table.dirs.config.read_text()
    table.dirs.config.write_text(good + INVALID)
    try:
        yield {"CONFIG": str(table.dirs.config), "ROOT": str(table.dirs.root)}
    finally:
        table.dirs.config.write_text(good)


@contextlib.contextmanager
def with_broken_program(table: Table) -> Iterator[dict[str, str]]:
    """A program `broken` whose command does not exist (a start ends FATAL), removed after."""
    good = table.dirs.config.read_text()
    table.dirs.config.write_text(good + BROKEN)
    table.supervisor.cli("reload")
    try:
        yield {"CONFIG": str(table.dirs.config), "ROOT": str(table.dirs.root)}
    finally:
        table.dirs.config.write_text(good)
        table.supervisor.cli("reload", code=None)


@contextlib.contextmanager
def fatal_program(table: Table) -> Iterator[dict[str, str]]:
    with with_broken_program(table) as words:
        table.supervisor.cli("start", "broken", code=EXIT_FAILED)
        yield words


@contextlib.contextmanager
def with_image(table: Table) -> Iterator[dict[str, str]]:
    """A checkpoint of idle (CRIU), removed after; IMAGE is its id."""
    try:
        find_criu()
    except CriuNotFound as exc:
        pytest.skip(str(exc))
    done = table.supervisor.cli("checkpoint", "idle", "--json")
    image_id = str(json.loads(done.stdout)[0]["image"]["id"])
    try:
        yield {"CONFIG": str(table.dirs.config), "ROOT": str(table.dirs.root), "IMAGE": image_id}
    finally:
        for image in table.store.list("idle"):
            table.supervisor.cli("rmi", "idle", image.id, "--force", code=None)
        table.supervisor.wait_running("idle")


@contextlib.contextmanager
def with_corrupt_image(table: Table) -> Iterator[dict[str, str]]:
    """An image of idle with one byte of its memory flipped."""
    with with_image(table) as words:
        image = table.store.resolve("idle", words["IMAGE"])
        pages = next(table.store.criu_dir(image).glob("pages-*.img"))
        data = bytearray(pages.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pages.write_bytes(bytes(data))
        yield words


@contextlib.contextmanager
def with_archive(table: Table) -> Iterator[dict[str, str]]:
    """An exported image of idle at ROOT/idle.tar, its image removed from the store."""
    with with_image(table) as words:
        archive = table.dirs.root / "idle.tar"
        table.supervisor.cli("export", "idle", words["IMAGE"], "-o", str(archive), "--no-encrypt")
        table.supervisor.cli("rmi", "idle", words["IMAGE"])
        try:
            yield words | {"ARCHIVE": str(archive)}
        finally:
            archive.unlink(missing_ok=True)


@contextlib.contextmanager
def supervisord_file(table: Table) -> Iterator[dict[str, str]]:
    """A supervisord.conf at ROOT/supervisord.conf; OUT a directory to write into."""
    source = table.dirs.root / "supervisord.conf"
    source.write_text(SUPERVISORD_CONF)
    out = table.dirs.root / "imported"
    try:
        yield {"CONFIG": str(table.dirs.config), "ROOT": str(table.dirs.root), "OUT": str(out)}
    finally:
        source.unlink()
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def already_imported(table: Table) -> Iterator[dict[str, str]]:
    with supervisord_file(table) as words:
        run_cli("import-supervisord", f"{words['ROOT']}/supervisord.conf", "-o", words["OUT"])
        yield words


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    situation: Situation
    code: int
    says: str = ""
    """A fragment of what the command prints (stdout or stderr)."""

    @property
    def id(self) -> str:
        return f"{' '.join(self.args)} [{self.situation.__name__}] -> {self.code}"


def case(args: str, situation: Situation, code: int, says: str = "") -> Case:
    return Case(tuple(args.split()), situation, code, says)


UNKNOWN = "no such program: nosuch"
NO_SUPERVISOR = "no supervisor is running"
INVALID_SAYS = "programs.bad.startsecs"

CASES = [
    # status
    case("status", running, EXIT_OK, "idle "),
    case("status nosuch", running, EXIT_USAGE, UNKNOWN),
    case("status --json nosuch", running, EXIT_USAGE, UNKNOWN),
    case("status", fatal_program, EXIT_FAILED, "broken "),
    case("status idle", fatal_program, EXIT_OK, "idle "),
    case("status", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("status --bogus", running, EXIT_USAGE, "unrecognized arguments: --bogus"),
    # start, stop, restart
    case("start idle", running, EXIT_OK, "RUNNING"),
    case("start nosuch", running, EXIT_USAGE, UNKNOWN),
    case("start broken", with_broken_program, EXIT_FAILED, "FATAL"),
    case("start idle", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("start", running, EXIT_USAGE, "the following arguments are required"),
    case("stop later", running, EXIT_OK, "STOPPED"),
    case("stop nosuch", running, EXIT_USAGE, UNKNOWN),
    case("stop idle", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("restart later", running, EXIT_OK, "RUNNING"),
    case("stop later", running, EXIT_OK, "STOPPED"),
    case("restart nosuch", running, EXIT_USAGE, UNKNOWN),
    case("restart broken", with_broken_program, EXIT_FAILED, "FATAL"),
    case("restart idle", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    # checkpoint, restore
    case("checkpoint later", running, EXIT_FAILED, "later is STOPPED, not RUNNING"),
    case("checkpoint nosuch", running, EXIT_USAGE, UNKNOWN),
    case("checkpoint", running, EXIT_USAGE, "name programs (or all), or give --all"),
    case("checkpoint --all idle", running, EXIT_USAGE, "name programs (or all), or give --all"),
    case("checkpoint idle", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("restore idle IMAGE", with_image, EXIT_OK, "idle: restored from"),
    case("restore idle IMAGE", with_corrupt_image, EXIT_FAILED, "as restore_fallback says"),
    case("restore nosuch latest", running, EXIT_USAGE, UNKNOWN),
    case("restore idle no-such-image", with_image, EXIT_USAGE, "no-such-image"),
    case("restore idle latest", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    # images, prune, rmi
    case("images", running, EXIT_OK, "no images"),
    case("images nosuch", running, EXIT_USAGE, UNKNOWN),
    case("images", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("prune idle --keep 1", running, EXIT_OK, "nothing to delete"),
    case("prune nosuch", running, EXIT_USAGE, UNKNOWN),
    case("prune idle --keep -1", running, EXIT_USAGE, "expected 0 or more"),
    case("prune", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("rmi idle IMAGE", with_image, EXIT_OK, "idle: removed image"),
    case("rmi nosuch 0", running, EXIT_USAGE, UNKNOWN),
    case("rmi idle no-such-image", with_image, EXIT_USAGE, "no-such-image"),
    case("rmi idle 0", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    # export, import (this process, no supervisor needed)
    case("export idle IMAGE -o ROOT/out.tar --no-encrypt", with_image, EXIT_OK, ""),
    case("export nosuch latest --no-encrypt", running, EXIT_USAGE, UNKNOWN),
    case("export idle no-such-image --no-encrypt", with_image, EXIT_USAGE, "no-such-image"),
    case("export idle IMAGE", with_image, EXIT_USAGE, "--no-encrypt"),
    case("import ARCHIVE", with_archive, EXIT_OK, "restore it with"),
    case("import ROOT/no-such-archive", running, EXIT_USAGE, "no-such-archive"),
    case("import CONFIG", running, EXIT_FAILED, "not an image archive"),
    # reload (update), reread, avail
    case("reload", running, EXIT_OK, "no changes"),
    case("update", running, EXIT_OK, "no changes"),
    case("reload", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("update", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("reload", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("reread", running, EXIT_OK, "no changes"),
    case("reread", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("reread", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("avail", running, EXIT_OK, "in use"),
    case("avail", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("avail", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    # signal, clear, pid
    case("signal WINCH idle", running, EXIT_OK, "idle: WINCH sent"),
    case("signal idle WINCH", running, EXIT_OK, "idle: WINCH sent"),
    case("signal WINCH later", running, EXIT_FAILED, "later: not signalled (STOPPED)"),
    case("signal WINCH nosuch", running, EXIT_USAGE, UNKNOWN),
    case("signal idle", running, EXIT_USAGE, "give a signal"),
    case("signal NOSUCHSIG idle", running, EXIT_USAGE, "give a signal"),
    case("signal WINCH idle", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("clear idle", running, EXIT_OK, "idle: logs cleared"),
    case("clear nosuch", running, EXIT_USAGE, UNKNOWN),
    case("clear idle", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("pid", running, EXIT_OK, ""),
    case("pid idle", running, EXIT_OK, ""),
    case("pid later", running, EXIT_FAILED, "later is STOPPED"),
    case("pid nosuch", running, EXIT_USAGE, UNKNOWN),
    case("pid", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    case("shutdown", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    # logs (tail), maintail
    case("logs idle", running, EXIT_OK, ""),
    case("tail idle -n 1", running, EXIT_OK, ""),
    case("logs nosuch", running, EXIT_USAGE, UNKNOWN),
    case("tail nosuch", running, EXIT_USAGE, UNKNOWN),
    case("logs idle -n -1", running, EXIT_USAGE, "expected 0 or more"),
    case("logs idle", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("maintail", running, EXIT_OK, ""),
    case("maintail -n lots", running, EXIT_USAGE, "expected a whole number"),
    case("maintail", invalid_file, EXIT_USAGE, INVALID_SAYS),
    # ctl runs one command with that command's code
    case("ctl status idle", running, EXIT_OK, "idle "),
    case("ctl status nosuch", running, EXIT_USAGE, UNKNOWN),
    case("ctl status", not_running, EXIT_NOT_RUNNING, NO_SUPERVISOR),
    # what needs no supervisor: check, doctor, schema, import-supervisord, run
    case("check", running, EXIT_OK, "configuration valid"),
    case("check", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("check --strict", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("doctor", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("schema", running, EXIT_OK, '"properties"'),
    case("run", invalid_file, EXIT_USAGE, INVALID_SAYS),
    case("import-supervisord ROOT/supervisord.conf -o OUT", supervisord_file, EXIT_OK, "wrote"),
    case(
        "import-supervisord ROOT/supervisord.conf -o OUT",
        already_imported,
        EXIT_FAILED,
        "would overwrite",
    ),
    case("import-supervisord ROOT/no-such.conf -o OUT", supervisord_file, EXIT_USAGE, "no-such"),
    # the command itself
    case("stauts", running, EXIT_USAGE, "did you mean 'status'?"),
]


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_exit_code(table: Table, row: Case) -> None:
    with row.situation(table) as words:
        args = [substitute(arg, words) for arg in row.args]
        done = run_cli("-c", words["CONFIG"], *args)
    assert done.returncode == row.code, (
        f"grenadine-sv {' '.join(args)} exited {done.returncode}, not {row.code}\n"
        f"stdout: {done.stdout}\nstderr: {done.stderr}"
    )
    assert row.says in done.stdout + done.stderr, (row.says, done.stdout, done.stderr)
    if "--json" in args and row.code != EXIT_OK:
        assert json.loads(done.stdout)["exit_code"] == row.code


def substitute(arg: str, words: dict[str, str]) -> str:
    """ROOT/x -> the directory/x, IMAGE -> the image id, ..."""
    for placeholder, value in words.items():
        arg = arg.replace(placeholder, value)
    return arg


def test_every_command_has_a_row() -> None:
    """A command added to the parser without a row here fails this."""
    from grenadine_sv.cli.main import build_parser

    parser = build_parser()
    commands = {
        name
        for action in parser._subparsers._group_actions  # type: ignore[union-attr]
        for name in getattr(action, "choices", {})
    }
    covered = {c.args[0] for c in CASES}
    assert commands - covered == set()
