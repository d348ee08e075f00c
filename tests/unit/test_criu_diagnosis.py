"""CRIU failures read from real CRIU 4.2.1 logs (excerpts in criu_logs/, each taken from a
failed `criu dump` on the development VM, paths shortened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from grenadine_sv.criu.client import CriuError
from grenadine_sv.criu.diagnosis import advice_for, cause_lines
from grenadine_sv.criu.options import NetworkLocks

LOGS = Path(__file__).with_name("criu_logs")


def causes(name: str) -> list[str]:
    return cause_lines((LOGS / f"{name}.log").read_text())


def test_other_user_without_cap_sys_resource_names_the_rlimit_first_not_libgpg_error():
    lines = causes("other-user")
    assert lines[0] == "Can't get rlimit 0: Operation not permitted"
    assert not any("libgpg-error" in line for line in lines)
    assert not any("RLIMIT_NOFILE for self" in line for line in lines)
    assert "Dumping FAILED." not in lines
    [advice] = advice_for(lines)
    assert "CAP_SYS_RESOURCE" in advice
    assert 'user = "root"' in advice


def test_a_missing_iptables_shows_the_shells_line_before_exited_status():
    lines = causes("iptables-missing")
    assert lines[:3] == [
        "sh: 1: iptables: not found",
        "exited, status=127",
        "Iptables configuration failed",
    ]
    assert advice_for(lines) == [
        'CRIU\'s iptables network lock failed: set checkpoint.network_lock = "auto" or'
        ' "nftables" (grenadine-sv doctor says which works here)'
    ]


@pytest.mark.parametrize(
    ("log", "first_cause", "key"),
    [
        (
            "file-locks",
            "Some file locks are hold by dumping tasks!",
            "checkpoint.file_locks = true",
        ),
        ("connected-tcp", "inet: Connected TCP socket", "checkpoint.tcp_established = true"),
        ("ghost-file", "Can't dump ghost file /srv/app/ghost", "checkpoint.ghost_limit"),
        (
            "external-unix-socket",
            "unix: External socket is used.",
            "checkpoint.external_unix_sockets = true",
        ),
    ],
)
def test_each_failure_names_its_cause_first_and_the_key_to_change(
    log: str, first_cause: str, key: str
):
    lines = causes(log)
    assert lines[0].startswith(first_cause)
    [advice] = advice_for(lines)
    assert key in advice


def test_the_error_message_puts_the_cause_before_the_advice_and_the_log():
    lines = causes("file-locks")
    error = CriuError("dump", "; ".join(lines), Path("/var/lib/grenadine-sv/dump.log"))
    message = str(error)
    assert message.startswith("criu dump failed: Some file locks are hold by dumping tasks!")
    assert message.index("to fix: ") < message.index("(full log: /var/lib/grenadine-sv/dump.log)")
    assert "--file-locks" in message  # CRIU's own words stay, after ours come the key
    assert error.advice == [
        "the program holds file locks (sqlite, a pid file): set checkpoint.file_locks = true"
    ]


def test_restore_failures_of_changed_or_missing_files_point_at_snapshot_and_private_tmp():
    bad_size = "File srv/app/data.log has bad size 488 (expect 235)"
    missing = "Can't open file tmp/hsperfdata_root/1 on restore"
    [size_advice] = advice_for([bad_size])
    [missing_advice] = advice_for([missing])
    assert "checkpoint.snapshot" in size_advice
    assert "private_tmp" in missing_advice


def test_a_log_without_criu_error_lines_gives_no_cause():
    assert cause_lines("(00.000010) Version: 4.2.1\n(00.000020) libgpg-error.so mapped\n") == []


@pytest.mark.parametrize(
    ("nftables", "iptables", "setting", "chosen"),
    [
        (True, True, "auto", "nftables"),
        (False, True, "auto", "iptables"),
        (False, False, "auto", None),
        (True, False, "iptables", "iptables"),
        (False, False, "skip", "skip"),
    ],
)
def test_network_lock_auto_takes_what_works_here(
    nftables: bool, iptables: bool, setting: str, chosen: str | None
):
    locks = NetworkLocks(nftables=nftables, iptables=iptables)
    assert locks.choose(setting) == chosen  # type: ignore[arg-type]
