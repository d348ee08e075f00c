"""Human-readable output for the command line: one function per kind of supervisor reply.

Each takes the JSON-shaped result the control socket returned (what `--json` prints as is)
and returns the text to print, ending with a newline.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

SHORT_ID_LENGTH = 12
MICROSECONDS = 1_000_000
# Reload sections in the order they are printed; "unchanged" programs are not listed.
RELOAD_SECTIONS = ("removed", "added", "changed", "updated")

__all__ = [
    "format_bytes",
    "format_checkpoints",
    "format_duration",
    "format_images",
    "format_prune",
    "format_reload",
    "format_removed",
    "format_restore",
    "format_status",
    "print_json",
    "short_id",
]


def format_bytes(n: int) -> str:
    """Human-readable size with binary units, as in the seed's MEM_SIZE column: "1.79MiB"."""
    if n < 0:
        raise ValueError(f"a size cannot be negative, got {n}")
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.2f}{unit}"


def short_id(image_id: str) -> str:
    return image_id[:SHORT_ID_LENGTH]


def format_duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    if not days:
        return clock
    return f"{days} day{'s' if days > 1 else ''}, {clock}"


def format_moment(created: datetime | str) -> str:
    """`2026-11-27 05:46:25 UTC`: in UTC, and saying so."""
    moment = datetime.fromisoformat(created) if isinstance(created, str) else created
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


# status, start, stop, restart -------------------------------------------------


def describe_program(entry: Mapping[str, Any]) -> str:
    """What follows the state in a status line, as supervisorctl: `pid 42, uptime 0:01:02`."""
    state = entry["state"]
    details: list[str] = []
    if entry.get("pid") is not None and state in ("RUNNING", "STARTING", "STOPPING"):
        details.append(f"pid {entry['pid']}")
    if entry.get("uptime_seconds") is not None:
        details.append(f"uptime {format_duration(entry['uptime_seconds'])}")
    if entry.get("reason"):
        details.append(str(entry["reason"]))
    if entry.get("restarts"):
        details.append(f"restarts {entry['restarts']}")
    if entry.get("exit_status") is not None and not entry.get("exit_requested"):
        details.append(f"last exit {describe_exit(int(entry['exit_status']))}")
    origin = entry.get("restored_from")
    if origin and state in ("STARTING", "RUNNING", "STOPPING"):
        instead = (
            f", instead of {short_id(origin['instead_of'])}" if origin.get("instead_of") else ""
        )
        details.append(
            f"restored from {short_id(origin['id'])} of {format_moment(origin['created'])} "
            f"({origin['occasion']}{instead})"
        )
    if entry.get("depends_on"):
        details.append(
            f"depends on {', '.join(entry['depends_on'])} "
            f"(on_dependency_stop {entry.get('on_dependency_stop')})"
        )
    checkpoint = entry.get("last_checkpoint")
    if checkpoint:
        details.append(
            f"last checkpoint {short_id(checkpoint['id'])} at "
            f"{format_moment(checkpoint['created'])} ({checkpoint['trigger']})"
        )
    failure = entry.get("last_checkpoint_failure")
    if failure:
        details.append(
            f"last checkpoint FAILED at {format_moment(failure['at'])} "
            f"({failure['trigger']}): {failure['error']}"
        )
    return ", ".join(details)


def describe_exit(returncode: int) -> str:
    """`code 3`, or `signal KILL` for a process a signal ended (a negative returncode)."""
    if returncode >= 0:
        return f"code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name.removeprefix('SIG')}"
    except ValueError:
        return f"signal {-returncode}"


# ANSI colours of states on a terminal (supervisorctl users read FATAL in red).
STATE_COLOURS = {"FATAL": "\033[31m", "BACKOFF": "\033[33m", "RUNNING": "\033[32m"}
RESET = "\033[0m"


def format_status(entries: Sequence[Mapping[str, Any]], colours: bool = False) -> str:
    if not entries:
        return "no programs\n"
    width = max(len(str(e["name"])) for e in entries) + 2
    lines = []
    for e in entries:
        state = f"{e['state']:<10}"
        colour = STATE_COLOURS.get(e["state"]) if colours else None
        if colour:
            state = f"{colour}{e['state']}{RESET}{' ' * (10 - len(e['state']))}"
        lines.append(f"{e['name']:<{width}}{state}{describe_program(e)}".rstrip())
    return "\n".join(lines) + "\n"


# checkpoint, restore ----------------------------------------------------------


def describe_image(image: Mapping[str, Any]) -> str:
    """`2.37MiB image, 2.25MiB memory, frozen 0.052s` (CRIU reports frozen_time in µs)."""
    parts = [
        f"{format_bytes(int(image['image_bytes']))} image",
        f"{format_bytes(int(image['memory_bytes']))} memory",
    ]
    frozen = image.get("dump_stats", {}).get("frozen_time")
    if frozen is not None:
        parts.append(f"frozen {frozen / MICROSECONDS:.3f}s")
    if image.get("leave_running") is False:
        parts.append("program stopped")
    return ", ".join(parts)


def format_checkpoints(results: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for result in results:
        if result.get("skipped"):
            lines.append(f"{result['program']}: skipped ({result['skipped']})")
        elif result.get("ok") and result.get("image"):
            image = result["image"]
            lines.append(
                f"{result['program']}: checkpoint {short_id(image['id'])} ({describe_image(image)})"
            )
        else:
            lines.append(f"{result['program']}: checkpoint failed: {result.get('error')}")
    return "".join(line + "\n" for line in lines)


def restore_succeeded(result: Mapping[str, Any]) -> bool:
    return not result.get("fallback") and result.get("state") == "RUNNING"


def format_restore(result: Mapping[str, Any]) -> str:
    name = result["name"]
    image = short_id(str(result["image"]))
    now = result["state"] if result.get("pid") is None else f"{result['state']} pid {result['pid']}"
    saved = ""
    if result.get("saved"):
        saved = f"{name}: checkpoint {short_id(str(result['saved']))} of its running memory first\n"
    if result.get("fallback"):
        instead = result.get("restored_from")
        did = f"restored the previous image {short_id(str(instead))}" if instead else "started cold"
        return saved + (
            f"{name}: restore from {image} failed ({result['fallback']}); "
            f"{did} as restore_fallback says, {now}\n"
        )
    if result.get("state") != "RUNNING":
        reason = f" ({result['reason']})" if result.get("reason") else ""
        return saved + f"{name}: restore from {image} failed{reason}, {now}\n"
    warning = f"warning: {result['warning']}\n" if result.get("warning") else ""
    return f"{saved}{warning}{name}: restored from {image}, {now}\n"


# reload, prune ----------------------------------------------------------------


def format_reload(summary: Mapping[str, Any]) -> str:
    pre_deploy: Mapping[str, str] = summary.get("pre_deploy_images") or {}
    lines: list[str] = []
    for section in RELOAD_SECTIONS:
        for name in summary.get(section) or []:
            line = f"{section}: {name}"
            if section == "changed" and name in pre_deploy:
                line += f" (pre-deploy image {short_id(pre_deploy[name])})"
            lines.append(line)
    for name in summary.get("left_stopped") or []:
        lines.append(f"left stopped: {name} (stopped by hand before the reload)")
    for name, why in (summary.get("failed") or {}).items():
        lines.append(f"failed: {name} ({why})")
    for name in summary.get("rolled_back") or []:
        line = f"rolled back: {name}"
        if name in pre_deploy:
            line += f" (new instance never got ready; restored {short_id(pre_deploy[name])})"
        lines.append(line)
    kept: Sequence[str] = summary.get("supervisor_settings_kept") or []
    if kept:
        lines.append(f"not applied until a restart: [supervisor] {', '.join(kept)}")
    if not lines:
        return "no changes\n"
    return "".join(line + "\n" for line in lines)


def format_prune(deleted: Mapping[str, Sequence[str]]) -> str:
    if not deleted:
        return "no programs\n"
    lines = []
    for program, ids in deleted.items():
        if not ids:
            lines.append(f"{program}: nothing to delete")
            continue
        noun = "image" if len(ids) == 1 else "images"
        shown = ", ".join(short_id(image_id) for image_id in ids)
        lines.append(f"{program}: deleted {len(ids)} {noun} ({shown})")
    return "".join(line + "\n" for line in lines)


def format_removed(removed: Mapping[str, Sequence[str]]) -> str:
    return "".join(
        f"{program}: removed image {short_id(image_id)}\n"
        for program, ids in removed.items()
        for image_id in ids
    )


def format_reread(summary: Mapping[str, Any]) -> str:
    """What `reload` would do, without having done it."""
    lines = [
        f"{name}: would be {section}"
        for section in RELOAD_SECTIONS
        for name in summary.get(section) or []
    ]
    kept = summary.get("supervisor_settings_kept") or []
    if kept:
        lines.append(f"[supervisor] {', '.join(kept)}: need a restart of the supervisor")
    return "".join(line + "\n" for line in lines) or "no changes\n"


def format_avail(entries: Sequence[Mapping[str, Any]]) -> str:
    """supervisorctl's `avail`: each program of the file, in use or not, auto or manual."""
    if not entries:
        return "no programs\n"
    width = max(len(str(e["name"])) for e in entries) + 2
    lines = []
    for e in entries:
        use = "removed" if e.get("removed") else "in use" if e["in_use"] else "avail"
        auto = "auto" if e["autostart"] else "manual"
        lines.append(f"{e['name']:<{width}}{use:<9}{auto:<8}{e.get('state') or ''}".rstrip())
    return "".join(line + "\n" for line in lines)


def format_signalled(results: Sequence[Mapping[str, Any]]) -> str:
    return "".join(
        f"{r['program']}: {r['signal']} sent\n"
        if r["sent"]
        else f"{r['program']}: not signalled ({r['state']})\n"
        for r in results
    )


def format_cleared(names: Sequence[str]) -> str:
    return "".join(f"{name}: logs cleared\n" for name in names)


# images -----------------------------------------------------------------------


class ImageRow(Protocol):
    """What the image table shows of an image (store.images.ImageMeta has it)."""

    @property
    def id(self) -> str: ...
    @property
    def program(self) -> str: ...
    @property
    def created(self) -> datetime: ...
    @property
    def comm(self) -> str: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def image_bytes(self) -> int: ...
    @property
    def trigger(self) -> str: ...


def format_images(
    images: Sequence[ImageRow], corrupt: Mapping[str, str | None] | None = None
) -> str:
    """The seed's columns, then ours; an image known to be corrupt says CORRUPT, and why
    below the table."""
    corrupt = corrupt or {}
    header = ("IDX", "IMAGE_ID", "CTIME", "COMM", "MEM_SIZE", "PROGRAM", "TRIGGER", "SIZE", "CHECK")
    rows: list[tuple[str, ...]] = [header]
    index: dict[str, int] = {}
    for image in images:
        idx = index.get(image.program, 0)
        index[image.program] = idx + 1
        rows.append(
            (
                str(idx),
                image.id,
                format_ctime(image.created),
                image.comm,
                format_bytes(image.memory_bytes),
                image.program,
                image.trigger,
                format_bytes(image.image_bytes),
                "CORRUPT" if corrupt.get(image.id) else "ok",
            )
        )
    if len(rows) == 1:
        return "no images\n"
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = "".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n"
        for row in rows
    )
    notes = "".join(
        f"{short_id(image_id)} is corrupt: {why}\n" for image_id, why in corrupt.items() if why
    )
    return table + notes


def format_remote_images(images: Sequence[Mapping[str, Any]]) -> str:
    """`images --remote`: entries with program, id, created (datetime), trigger, size."""
    header = ("PROGRAM", "IMAGE_ID", "CTIME", "TRIGGER", "SIZE")
    rows: list[tuple[str, ...]] = [header]
    for image in images:
        rows.append(
            (
                image["program"],
                image["id"],
                format_ctime(image["created"]),
                image["trigger"],
                format_bytes(image["size"]),
            )
        )
    if len(rows) == 1:
        return "no images in the object store\n"
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n"
        for row in rows
    )


def format_ctime(created: datetime) -> str:
    return created.strftime("%Y-%m-%d %H:%M:%S %z")


def print_json(data: Any, out: TextIO) -> None:
    """What --json prints: the reply as it came, indented."""
    json.dump(data, out, indent=2, default=str)
    out.write("\n")
