"""The command line's human output and exit codes, from replies shaped like the supervisor's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from grenadine_sv.cli.exit_codes import EXIT_FAILED, EXIT_OK
from grenadine_sv.cli.formatting import (
    format_checkpoints,
    format_duration,
    format_images,
    format_moment,
    format_prune,
    format_reload,
    format_restore,
    format_status,
)
from grenadine_sv.cli.remote import format_result, operation_exit_code
from grenadine_sv.store.images import ImageMeta

IMAGE_ID = "77bf8f2f3b0a4c1d9e8f7a6b5c4d3e2f"
OTHER_ID = "1fb3c0de1fb3c0de1fb3c0de1fb3c0de"


def status_entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "memcached",
        "state": "RUNNING",
        "pid": 32008,
        "uptime_seconds": 3725.4,
        "restarts": 0,
        "exit_status": None,
        "reason": "",
        "last_checkpoint": None,
    }
    return entry | changes


def image_json(**changes: Any) -> dict[str, Any]:
    image: dict[str, Any] = {
        "id": IMAGE_ID,
        "program": "memcached",
        "created": "2026-11-27T05:46:25.123456Z",
        "trigger": "manual",
        "comm": "memcached",
        "memory_bytes": int(2.25 * 1024 * 1024),
        "image_bytes": int(2.37 * 1024 * 1024),
        "dump_stats": {"frozen_time": 52_345, "freezing_time": 600},
        "leave_running": True,
    }
    return image | changes


def restore_reply(**changes: Any) -> dict[str, Any]:
    return {"image": IMAGE_ID, "fallback": None} | status_entry(uptime_seconds=0.01) | changes


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00:00"), (59.9, "0:00:59"), (3725, "1:02:05"), (86400 + 61, "1 day, 0:01:01")],
)
def test_duration_reads_like_supervisorctl(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert format_duration(3 * 86400) == "3 days, 0:00:00"


def test_moments_are_shown_in_utc_with_their_zone_without_fractions() -> None:
    assert format_moment("2026-11-27T05:46:25.9+00:00") == "2026-11-27 05:46:25 UTC"
    tokyo = datetime(2026, 11, 27, 14, 46, 25, tzinfo=timezone(timedelta(hours=9)))
    assert format_moment(tokyo) == "2026-11-27 05:46:25 UTC"


def test_status_line_has_supervisorctl_columns_and_short_last_checkpoint() -> None:
    checkpoint = {"id": IMAGE_ID, "created": "2026-11-27T05:46:25.5+00:00", "trigger": "signal"}
    text = format_status(
        [
            status_entry(last_checkpoint=checkpoint),
            status_entry(
                name="counter", state="FATAL", pid=None, uptime_seconds=None, reason="no such file"
            ),
        ]
    )
    assert text.splitlines() == [
        "memcached  RUNNING   pid 32008, uptime 1:02:05, "
        "last checkpoint 77bf8f2f3b0a at 2026-11-27 05:46:25 UTC (signal)",
        "counter    FATAL     no such file",
    ]


def test_status_of_nothing_says_so() -> None:
    assert format_status([]) == "no programs\n"


def test_a_stopped_program_shows_no_pid_nor_the_exit_of_its_stop() -> None:
    line = format_status(
        [
            status_entry(
                state="STOPPED", pid=4, uptime_seconds=None, exit_status=-15, exit_requested=True
            )
        ]
    )
    assert line == "memcached  STOPPED\n"


def test_checkpoint_line_gives_sizes_and_frozen_seconds() -> None:
    text = format_checkpoints([{"program": "memcached", "ok": True, "image": image_json()}])
    assert text == (
        "memcached: checkpoint 77bf8f2f3b0a (2.37MiB image, 2.25MiB memory, frozen 0.052s)\n"
    )


def test_checkpoint_with_stop_and_without_stats() -> None:
    image = image_json(dump_stats={}, leave_running=False)
    text = format_checkpoints([{"program": "m", "ok": True, "image": image}])
    assert text == "m: checkpoint 77bf8f2f3b0a (2.37MiB image, 2.25MiB memory, program stopped)\n"


def test_failed_checkpoint_entry_is_named_and_fails_the_command() -> None:
    results = [
        {"program": "a", "ok": True, "image": image_json()},
        {"program": "b", "ok": False, "error": "criu said no"},
    ]
    assert format_checkpoints(results).splitlines()[1] == "b: checkpoint failed: criu said no"
    assert operation_exit_code("checkpoint", results) == EXIT_FAILED
    assert operation_exit_code("checkpoint", results[:1]) == EXIT_OK


def test_restore_success() -> None:
    reply = restore_reply()
    assert format_restore(reply) == "memcached: restored from 77bf8f2f3b0a, RUNNING pid 32008\n"
    assert operation_exit_code("restore", reply) == EXIT_OK


def test_restore_that_fell_back_to_a_cold_start_fails_the_command() -> None:
    reply = restore_reply(fallback="checksum mismatch in pages-1.img")
    assert format_restore(reply) == (
        "memcached: restore from 77bf8f2f3b0a failed (checksum mismatch in pages-1.img); "
        "started cold as restore_fallback says, RUNNING pid 32008\n"
    )
    assert operation_exit_code("restore", reply) == EXIT_FAILED


def test_restore_with_fallback_fail_leaves_the_program_fatal() -> None:
    reply = restore_reply(state="FATAL", pid=None, reason="restore failed: bad image")
    assert format_restore(reply) == (
        "memcached: restore from 77bf8f2f3b0a failed (restore failed: bad image), FATAL\n"
    )
    assert operation_exit_code("restore", reply) == EXIT_FAILED


def reload_summary(**changes: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "added": [],
        "removed": [],
        "changed": [],
        "updated": [],
        "unchanged": ["quiet"],
        "pre_deploy_images": {},
        "rolled_back": [],
    }
    return summary | changes


def test_reload_lists_each_change() -> None:
    summary = reload_summary(
        added=["x"],
        removed=["z"],
        changed=["y", "w"],
        updated=["v"],
        pre_deploy_images={"y": OTHER_ID},
    )
    assert format_reload(summary).splitlines() == [
        "removed: z",
        "added: x",
        "changed: y (pre-deploy image 1fb3c0de1fb3)",
        "changed: w",
        "updated: v",
    ]
    assert operation_exit_code("reload", summary) == EXIT_OK


def test_reload_without_differences() -> None:
    assert format_reload(reload_summary()) == "no changes\n"


def test_supervisor_settings_a_reload_kept_are_named() -> None:
    summary = reload_summary(
        updated=["v"], supervisor_settings_kept=["state_dir", "metrics.listen"]
    )
    assert format_reload(summary).splitlines() == [
        "updated: v",
        "not applied until a restart: [supervisor] state_dir, metrics.listen",
    ]
    assert operation_exit_code("reload", summary) == EXIT_OK


def test_a_rolled_back_deploy_is_shown_and_fails_the_command() -> None:
    summary = reload_summary(changed=["y"], pre_deploy_images={"y": OTHER_ID}, rolled_back=["y"])
    assert format_reload(summary).splitlines()[-1] == (
        "rolled back: y (new instance never got ready; restored 1fb3c0de1fb3)"
    )
    assert operation_exit_code("reload", summary) == EXIT_FAILED


def test_prune_counts_and_names_deleted_images() -> None:
    text = format_prune({"memcached": [IMAGE_ID, OTHER_ID], "counter": [OTHER_ID], "idle": []})
    assert text.splitlines() == [
        "memcached: deleted 2 images (77bf8f2f3b0a, 1fb3c0de1fb3)",
        "counter: deleted 1 image (1fb3c0de1fb3)",
        "idle: nothing to delete",
    ]


@pytest.mark.parametrize(
    ("command", "states", "code"),
    [
        ("start", ["RUNNING", "RUNNING"], EXIT_OK),
        ("start", ["RUNNING", "FATAL"], EXIT_FAILED),
        ("restart", ["BACKOFF"], EXIT_FAILED),
        ("stop", ["STOPPED", "EXITED"], EXIT_OK),
        ("stop", ["RUNNING"], EXIT_FAILED),
        ("status", ["RUNNING", "STOPPED", "EXITED", "BACKOFF"], EXIT_OK),
        ("status", ["RUNNING", "FATAL"], EXIT_FAILED),
    ],
)
def test_lifecycle_commands_fail_when_a_program_did_not_get_there(
    command: str, states: list[str], code: int
) -> None:
    reply = [status_entry(name=f"p{i}", state=s) for i, s in enumerate(states)]
    assert operation_exit_code(command, reply) == code
    assert format_result(command, reply) == format_status(reply)


def test_every_remote_command_has_a_human_form() -> None:
    assert format_result("prune", {"m": []}) == "m: nothing to delete\n"
    assert format_result("reload", reload_summary()) == "no changes\n"
    assert format_result("ping", {"pid": 1}) == '{\n  "pid": 1\n}\n'


def test_images_table_has_the_seeds_columns_then_ours() -> None:
    def meta(program: str, minutes: int, image_id: str) -> ImageMeta:
        return ImageMeta(
            id=image_id,
            program=program,
            created=datetime(2026, 11, 27, 5, minutes, tzinfo=UTC),
            trigger="signal",
            comm=program[:15],
            root_pid=1,
            memory_bytes=1_880_000,
            image_bytes=2048,
            criu_version="4.2.1",
            definition_digest="0" * 64,
            stdio_pipes={},
            dump_stats={},
            leave_running=True,
            checksums={},
            file_sizes={},
            grenadine_version="0",
        )

    text = format_images(
        [meta("counter", 2, OTHER_ID), meta("memcached", 1, IMAGE_ID)],
        {OTHER_ID: None, IMAGE_ID: "criu/pages-1.img is missing"},
    )
    header, first, second, note = text.splitlines()
    assert header.split() == [
        "IDX",
        "IMAGE_ID",
        "CTIME",
        "COMM",
        "MEM_SIZE",
        "PROGRAM",
        "TRIGGER",
        "SIZE",
        "CHECK",
    ]
    assert first.split() == [
        "0",
        OTHER_ID,
        "2026-11-27",
        "05:02:00",
        "+0000",
        "counter",
        "1.79MiB",
        "counter",
        "signal",
        "2.00KiB",
        "ok",
    ]
    assert second.split()[0] == "0"  # IDX counts per program
    assert second.split()[-1] == "CORRUPT"
    assert note == f"{IMAGE_ID[:12]} is corrupt: criu/pages-1.img is missing"
    assert format_images([]) == "no images\n"


def test_status_shows_restarts_last_exit_and_a_failed_checkpoint() -> None:
    failure = {"at": "2026-11-27T06:00:00+00:00", "trigger": "interval", "error": "no space"}
    line = format_status(
        [status_entry(restarts=2, exit_status=-9, last_checkpoint_failure=failure)]
    )
    assert line == (
        "memcached  RUNNING   pid 32008, uptime 1:02:05, restarts 2, last exit signal KILL, "
        "last checkpoint FAILED at 2026-11-27 06:00:00 UTC (interval): no space\n"
    )
    exited = format_status(
        [status_entry(state="EXITED", pid=None, uptime_seconds=None, exit_status=3)]
    )
    assert exited == "memcached  EXITED    last exit code 3\n"


def test_reload_says_what_failed_and_what_it_left_stopped() -> None:
    summary = reload_summary(
        added=["new"], changed=["manual"], left_stopped=["manual"], failed={"new": "FATAL: boom"}
    )
    assert format_reload(summary).splitlines() == [
        "added: new",
        "changed: manual",
        "left stopped: manual (stopped by hand before the reload)",
        "failed: new (FATAL: boom)",
    ]
    assert operation_exit_code("reload", summary) == EXIT_FAILED


def test_checkpoint_all_names_the_programs_it_skipped() -> None:
    results = [
        {"program": "memcached", "ok": True, "image": image_json()},
        {"program": "idle", "ok": True, "skipped": "STOPPED, not RUNNING"},
    ]
    assert format_checkpoints(results).splitlines()[1] == "idle: skipped (STOPPED, not RUNNING)"
    assert operation_exit_code("checkpoint", results) == EXIT_OK
