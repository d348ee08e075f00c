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
