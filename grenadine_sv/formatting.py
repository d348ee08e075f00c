"""Human-readable tables for the command line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grenadine_sv.images import ImageMeta


def format_duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} days, {clock}" if days else clock


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1024
    return f"{value:.2f}TiB"


def describe_program(entry: Mapping[str, Any]) -> str:
    state = entry["state"]
    details: list[str] = []
    if entry.get("pid") is not None and state in ("RUNNING", "STARTING", "STOPPING"):
        details.append(f"pid {entry['pid']}")
    if entry.get("uptime_seconds") is not None:
        details.append(f"uptime {format_duration(entry['uptime_seconds'])}")
    if entry.get("reason") and state not in ("RUNNING",):
        details.append(str(entry["reason"]))
    checkpoint = entry.get("last_checkpoint")
    if checkpoint:
        details.append(f"last checkpoint {checkpoint['id'][:12]} ({checkpoint['created']})")
    return ", ".join(details)


def format_status(entries: Sequence[Mapping[str, Any]]) -> str:
    if not entries:
        return "no programs\n"
    width = max(len(str(e["name"])) for e in entries) + 2
    lines = [f"{e['name']:<{width}}{e['state']:<10}{describe_program(e)}".rstrip() for e in entries]
    return "\n".join(lines) + "\n"


def format_images(images: Sequence[ImageMeta]) -> str:
    header = ("IDX", "IMAGE_ID", "CTIME", "COMM", "MEM_SIZE", "PROGRAM", "TRIGGER", "SIZE")
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
            )
        )
    if len(rows) == 1:
        return "no images\n"
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n"
        for row in rows
    )


def format_ctime(created: datetime) -> str:
    return created.strftime("%Y-%m-%d %H:%M:%S %z")
