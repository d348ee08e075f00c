"""Issue 11, item 6: smaller losses, each reproduced first (see tests/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grenadine_sv.config.loading import ConfigError, load_config
from grenadine_sv.store.images import ImageStore
from grenadine_sv.supervisor.output import RotatingLogFile
from tests.unit.test_images import make_image

MAIN = """
[supervisor]
state_dir = "{root}/state"
log_dir = "{root}/logs"
control_socket = "{root}/ctl.sock"
include = ["conf.d/**/*.toml"]
"""
PROGRAM = '[programs.{name}]\ncommand = ["/bin/true"]\n'


def write_main(root: Path) -> Path:
    main = root / "grenadine.toml"
    main.write_text(MAIN.format(root=root))
    (root / "conf.d").mkdir()
    (root / "conf.d" / "a.toml").write_text(PROGRAM.format(name="a"))
    return main


def test_a_deleted_log_file_is_created_again_at_its_path(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "counter.out.log"
    with RotatingLogFile(path, max_bytes=0, backups=0) as log:
        log.write(b"before\n")
        path.unlink()
        log.write(b"after\n")
        assert path.read_bytes() == b"after\n"


def test_an_image_being_restored_is_not_pruned(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    old = make_image(store, minutes=0)
    new = make_image(store, minutes=1)

    deleted = store.prune("memcached", 0, in_use={old.id})

    assert deleted == [new]
    assert store.list("memcached") == [old]


def test_images_json_prints_only_json_on_stdout(tmp_path: Path) -> None:
    main = write_main(tmp_path)
    broken = tmp_path / "state" / "images" / "a" / ("e" * 32)
    broken.mkdir(parents=True)
    (broken / "meta.json").write_text("{not json")

    result = subprocess.run(
        [sys.executable, "-m", "grenadine_sv", "-c", str(main), "images", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert "image_skipped" in result.stderr


def test_include_globs_through_a_symlink_loop_name_the_loop_once(tmp_path: Path) -> None:
    main = write_main(tmp_path)
    (tmp_path / "conf.d" / "again").symlink_to(tmp_path / "conf.d")

    with pytest.raises(ConfigError) as raised:
        load_config(main)

    lines = str(raised.value).splitlines()
    loop_lines = [line for line in lines if "symlink loop" in line]
    assert len(loop_lines) == 1
    assert f"{tmp_path}/conf.d/again -> {tmp_path}/conf.d" in loop_lines[0]
    assert len(lines) <= 3, lines


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_include_globs_refuse_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    main = write_main(tmp_path)
    odd = tmp_path / "conf.d" / "odd.toml"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to("/dev/zero")

    with pytest.raises(ConfigError) as raised:
        load_config(main)

    message = str(raised.value)
    assert str(odd) in message
    assert ("a FIFO" if kind == "fifo" else "a character device") in message
    assert "not a regular file" in message
