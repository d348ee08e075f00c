"""What the supervisor quotes from a CRIU log when CRIU fails (criu.client.error_lines)."""

from __future__ import annotations

from pathlib import Path

from grenadine_sv.criu.client import error_lines
from grenadine_sv.criu.diagnosis import ERROR_LINES_SHOWN

FAILED_DUMP_LOG = """\
(00.000012) Version: 4.2.1 (gitid 0)
(00.000120) Error (criu/kerndat.c:1051): Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.004213) Dumping task (pid: 4242)
(00.005100) 4242: Error (criu/files-ext.c:96): Can't dump file 7 of type [1f] (io_uring)
(00.005130) Error (criu/cr-dump.c:1681): Dump files (pid: 4242) failed with -1
(00.005200) Error (criu/cr-dump.c:1681): Dump files (pid: 4242) failed with -1
(00.006000) Error (criu/cr-dump.c:2100): Dumping FAILED.
"""


def test_the_cause_comes_first_without_prefixes_repeats_or_noise(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(FAILED_DUMP_LOG)
    assert error_lines(log) == [
        "Can't dump file 7 of type [1f] (io_uring)",
        "Dump files (pid: 4242) failed with -1",
    ]


def test_a_long_log_is_cut_to_the_first_few(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text("".join(f"(00.1) Error (criu/x.c:{n}): problem {n}\n" for n in range(50)))
    lines = error_lines(log)
    assert len(lines) == ERROR_LINES_SHOWN
    assert lines[0] == "problem 0"


def test_a_missing_or_clean_log_has_no_lines(tmp_path: Path) -> None:
    assert error_lines(tmp_path / "absent.log") == []
    clean = tmp_path / "clean.log"
    clean.write_text("(00.000012) Version: 4.2.1\n(00.1) Dumping finished successfully\n")
    assert error_lines(clean) == []
