"""The command line's side of export/import: the progress line, and what stays unloaded."""

from __future__ import annotations

import io
import subprocess
import sys

from grenadine_sv.cli.progress import TerminalProgress


def test_progress_rewrites_one_line_and_ends_it() -> None:
    stream = io.StringIO()
    progress = TerminalProgress("export redis", stream)
    progress(0, 4 << 20)
    progress(4 << 20, 4 << 20)
    progress.done()
    text = stream.getvalue()
    assert text.startswith("\rexport redis: 0.0 of 4.0 MiB (0%)")
    assert "\rexport redis: 4.0 of 4.0 MiB (100%)" in text
    assert text.endswith("\n")
    assert text.count("\n") == 1


def test_nothing_is_drawn_without_progress() -> None:
    stream = io.StringIO()
    TerminalProgress("import", stream).done()
    assert stream.getvalue() == ""


def test_s3_client_is_loaded_only_with_an_object_store() -> None:
    code = (
        "import sys\n"
        "import grenadine_sv.supervisor.build, grenadine_sv.cli.main, grenadine_sv.cli.transfer\n"
        "import grenadine_sv.store.archive\n"
        "print(sorted(m for m in ('boto3', 'botocore') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_import_refuses_a_state_dir_others_can_write(tmp_path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    state_dir.chmod(0o777)
    config = tmp_path / "grenadine.toml"
    config.write_text(f'[supervisor]\nstate_dir = "{state_dir}"\n')
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"not read: the state_dir is refused first")

    done = subprocess.run(
        [sys.executable, "-m", "grenadine_sv", "-c", str(config), "import", str(archive)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    assert "import of" in done.stderr
    assert str(state_dir) in done.stderr
    assert list(state_dir.iterdir()) == []
