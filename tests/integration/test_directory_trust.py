"""Directories trusted like sshd's StrictModes: another user (`nobody`) plants, swaps, pre-creates.

Each planting is done as `nobody` (setpriv); the supervisor runs as root. Every case was
reproduced on the commit before the fix (see tests/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grenadine_sv.control.protocol import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.store.images import ImageStore
from grenadine_sv.store.trust import UntrustedPath, check_trusted_dir
from tests.conftest import SupervisorDirs
from tests.integration.supervising import (
    TICKER,
    running_supervisor,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.root]

NOBODY = 65534
GRENADINE_SV = [sys.executable, "-m", "grenadine_sv"]
TOKEN = "token-7f3a"
# Prints a secret token, then ticks.
TOKEN_PRINTER = json.dumps(
    [
        "/usr/bin/python3",
        "-u",
        "-c",
        f"import time\nprint('{TOKEN}')\nwhile True: print('tick'); time.sleep(0.2)\n",
    ]
)


def as_nobody(*command: str) -> None:
    """Run `command` as user nobody (uid and gid 65534, no supplementary groups)."""
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        check=True,
        capture_output=True,
        timeout=30,
    )


def public_dir(root: Path) -> Path:
    """A root-owned sticky directory everyone can create entries in, like /tmp."""
    public = root / "public"
    public.mkdir()
    os.chmod(public, 0o1777)
    os.chmod(root, 0o755)
    return public


def start_supervisor(config: Path) -> subprocess.CompletedProcess[str]:
    """Run the supervisor command expecting it to refuse to start (it would run on)."""
    return subprocess.run(
        [*GRENADINE_SV, "-c", str(config)], capture_output=True, text=True, timeout=60, check=False
    )


def config_with(sv_dirs: SupervisorDirs, state_dir: Path, log_dir: Path, programs: str) -> Path:
    text = sv_dirs.write_config(programs).read_text()
    text = text.replace(str(sv_dirs.state_dir), str(state_dir))
    text = text.replace(str(sv_dirs.log_dir), str(log_dir))
    sv_dirs.config.write_text(text)
    return sv_dirs.config


def test_state_dir_under_a_directory_of_another_user_is_refused(sv_dirs: SupervisorDirs):
    public = public_dir(sv_dirs.root)
    as_nobody("mkdir", str(public / "theirs"))
    state_dir = public / "theirs" / "state"
    config = config_with(sv_dirs, state_dir, sv_dirs.log_dir, "")

    result = start_supervisor(config)

    assert result.returncode == 1
    assert f"{public / 'theirs'} is owned by uid {NOBODY}" in result.stderr
    assert not state_dir.exists()


def test_unit_trust_rule_accepts_sticky_root_dirs_above_only(tmp_path: Path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    below = sticky / "ours"
    below.mkdir(mode=0o700)
    check_trusted_dir(below)  # /tmp-like above the last component is fine
    with pytest.raises(UntrustedPath, match="writable by other users"):
        check_trusted_dir(sticky)  # but not as the directory used itself
    os.chown(below, NOBODY, NOBODY)
    with pytest.raises(UntrustedPath, match=f"owned by uid {NOBODY}"):
        check_trusted_dir(below)


async def test_state_dir_swapped_by_another_user_is_refused_before_a_restore(
    sv_dirs: SupervisorDirs,
):
    # At start the parent is root's; later it is handed to nobody (a mistake or a compromise),
    # who swaps state_dir for a directory of their own holding an image they made.
    area = sv_dirs.root / "area"
    area.mkdir(mode=0o755)
    os.chmod(sv_dirs.root, 0o755)
    state_dir = area / "state"
    config = config_with(
        sv_dirs,
        state_dir,
        sv_dirs.log_dir,
        f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n",
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "ticker", State.RUNNING)
        (made,) = await sv.operations.checkpoint_programs(["ticker"], stop=False)
        image_id = made["image"]["id"]
        planted = sv_dirs.root / "planted"
        shutil.copytree(state_dir / "images", planted)  # stands for an image nobody crafted
        for path in [planted, *planted.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        os.chmod(sv_dirs.root, 0o711)
        os.chown(area, NOBODY, NOBODY)
        as_nobody("mv", str(state_dir), str(area / "stolen"))
        as_nobody("mkdir", "-m", "700", str(state_dir))
        as_nobody("cp", "-a", str(planted), str(state_dir / "images"))

        with pytest.raises(ControlError, match=f"owned by uid {NOBODY}"):
            await sv.operations.restore_program("ticker", image_id)
        with pytest.raises(ControlError, match=f"owned by uid {NOBODY}"):
            await sv.operations.checkpoint_programs(["ticker"], stop=False)
        assert sv.programs.runners["ticker"].state == State.RUNNING
        # Nothing of ours went into the other user's directory.
        assert sorted(p.name for p in state_dir.iterdir()) == ["images"]
        os.chown(area, 0, 0)  # so that the supervisor can shut down and the test clean up


def test_images_owned_by_another_user_are_not_listed(sv_dirs: SupervisorDirs):
    from tests.unit.test_images import make_image

    store = ImageStore(sv_dirs.state_dir)
    ours = make_image(store, minutes=0)
    theirs = make_image(store, minutes=1)
    for path in [store.root / "memcached" / theirs.id, *(store.root / "memcached").rglob("*")]:
        if theirs.id in str(path):
            os.chown(path, NOBODY, NOBODY)

    assert store.list("memcached") == [ours]


def test_log_dir_others_can_write_with_a_planted_symlink_is_refused(sv_dirs: SupervisorDirs):
    log_dir = sv_dirs.root / "logs"
    log_dir.mkdir()
    os.chmod(log_dir, 0o777)  # an administrator's mistake
    os.chmod(sv_dirs.root, 0o755)
    target = sv_dirs.root / "root-owned.conf"
    target.write_text("important\n")
    as_nobody("ln", "-s", str(target), str(log_dir / "printer.out.log"))
    config = config_with(
        sv_dirs, sv_dirs.state_dir, log_dir, f"[programs.printer]\ncommand = {TOKEN_PRINTER}\n"
    )

    result = start_supervisor(config)

    assert result.returncode == 1
    assert f"log_dir {log_dir} is writable by other users (mode 777)" in result.stderr
    assert target.read_text() == "important\n"


@pytest.mark.parametrize("planted", ["printer.out.log", "printer.err.log"])
def test_a_log_file_another_user_pre_created_is_refused(sv_dirs: SupervisorDirs, planted: str):
    """Either of a program's files, the first of its directory or one after it (each
    directory is walked once for all its files)."""
    log_dir = sv_dirs.root / "logs"
    log_dir.mkdir()
    os.chmod(sv_dirs.root, 0o755)
    os.chmod(log_dir, 0o777)
    as_nobody("sh", "-c", f"umask 0; : > {log_dir / planted}")
    os.chmod(log_dir, 0o755)  # closed again, the file stays theirs, 0666
    config = config_with(
        sv_dirs, sv_dirs.state_dir, log_dir, f"[programs.printer]\ncommand = {TOKEN_PRINTER}\n"
    )

    result = start_supervisor(config)

    assert result.returncode == 1
    assert f"log file {log_dir / planted} is owned by uid {NOBODY}" in result.stderr
    assert TOKEN not in (log_dir / planted).read_text()


async def test_a_log_file_left_world_readable_is_made_private(sv_dirs: SupervisorDirs):
    sv_dirs.log_dir.mkdir(mode=0o750)
    log = sv_dirs.stdout_log("printer")
    log.touch()
    os.chmod(log, 0o666)
    config = sv_dirs.write_config(f"[programs.printer]\ncommand = {TOKEN_PRINTER}\n")
    async with running_supervisor(config) as sv:
        await wait_state(sv, "printer", State.RUNNING)
        await wait_for(lambda: TOKEN in log.read_text())
        assert os.stat(log).st_mode & 0o777 == 0o640
