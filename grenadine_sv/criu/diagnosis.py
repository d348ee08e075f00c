"""What a CRIU log says went wrong, cause first, and what to change in our configuration.

CRIU logs its errors as ``(00.037781)      1: Error (criu/file-lock.c:110): message``; a
command it ran logs its own output (``sh: 1: iptables: not found``) just before CRIU's
``exited, status=N`` line. Libraries CRIU loads put "error" in plenty of harmless lines
(``libgpg-error.so``), so only CRIU's own error lines count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ERROR_LINES_SHOWN = 6

# Logged as an error by every run on hosts without CAP_SYS_RESOURCE, and harmless.
_HARMLESS_ERRORS = ("Can't setup RLIMIT_NOFILE for self",)
# CRIU's summary line says nothing the action name does not.
_SUMMARY_ERROR = re.compile(r"^(Dumping|Restoring) FAILED\.?$")
_TIMESTAMP = re.compile(r"^\(\s*[0-9.]+\)\s*(?:[0-9]+:\s*)?")
_ERROR = re.compile(r"^Error \((?P<where>[^)]*)\):\s*(?P<message>.*)$")
_EXITED = re.compile(r"exited, status=\d+")


@dataclass(frozen=True)
class Advice:
    """When CRIU's message matches `pattern`, what the user can do."""

    pattern: re.Pattern[str]
    text: str


ADVICE: tuple[Advice, ...] = (
    Advice(
        re.compile(r"file locks are hold by dumping tasks|--file-locks"),
        "the program holds file locks (sqlite, a pid file): set checkpoint.file_locks = true",
    ),
    Advice(
        re.compile(r"Iptables configuration failed|iptables.*not found"),
        'CRIU\'s iptables network lock failed: set checkpoint.network_lock = "auto" or'
        ' "nftables" (grenadine-sv doctor says which works here)',
    ),
    Advice(
        re.compile(r"nft.*(failed|error)|Nftables based locking", re.IGNORECASE),
        'CRIU\'s nftables network lock failed: set checkpoint.network_lock = "iptables" (with'
        ' iptables installed) or "skip"',
    ),
    Advice(
        re.compile(r"Connected TCP socket"),
        "the program has established TCP connections: set checkpoint.tcp_established = true"
        " (or close them before checkpointing)",
    ),
    Advice(
        re.compile(r"In-flight connection"),
        "connections were being accepted: set checkpoint.skip_in_flight = true",
    ),
    Advice(
        re.compile(r"External socket|external unix|name-less external socket"),
        "the program has a unix socket connected outside its sandbox (such as /dev/log):"
        " set checkpoint.external_unix_sockets = true",
    ),
    Advice(
        re.compile(r"Can't dump ghost file (?P<path>\S+) of (?P<size>\d+) size"),
        "the program holds a deleted file open that is larger than checkpoint.ghost_limit:"
        " raise checkpoint.ghost_limit above its size",
    ),
    Advice(
        re.compile(r"holds fd \d+, an io_uring instance"),
        "the program uses io_uring, which CRIU cannot checkpoint: configure it not to"
        " (many programs have an option for their I/O method), or do not checkpoint it",
    ),
    Advice(
        re.compile(r"Can't get rlimit"),
        "the program runs as a user other than root and this host lacks CAP_SYS_RESOURCE,"
        ' which CRIU then needs: run it as root (user = "root", or the program\'s own option'
        " such as `user root;`), or grant grenadine-sv CAP_SYS_RESOURCE",
    ),
    Advice(
        re.compile(r"File (?P<path>\S+) has bad size"),
        "a file the program had open changed after the checkpoint (CRIU saves memory, not file"
        " contents): list its path in checkpoint.snapshot so the image keeps a copy, or"
        " checkpoint again",
    ),
    Advice(
        re.compile(r"has bad build-ID"),
        "an executable or library the program maps was upgraded after the checkpoint"
        " (a package upgrade): this image cannot be restored; start the program afresh",
    ),
    Advice(
        re.compile(r"Can't open file (?P<path>\S+) on restore"),
        "a file the program had open is gone: keep it (private_tmp = true keeps /tmp,"
        " checkpoint.snapshot keeps listed paths in the image) or checkpoint again",
    ),
)


def cause_lines(log_text: str) -> list[str]:
    """CRIU's own error messages, first (the cause) first, each once, without timestamps or
    source locations, and with the line that explains an ``exited, status=N``."""
    messages: dict[str, None] = {}
    previous = ""
    for raw in log_text.splitlines():
        line = _TIMESTAMP.sub("", raw.strip())
        match = _ERROR.match(line)
        if match is None:
            if line:
                previous = line
            continue
        message = match.group("message").strip()
        if _EXITED.search(message) and previous and not _ERROR.match(previous):
            messages.setdefault(previous, None)
        previous = line
        if not message or any(harmless in message for harmless in _HARMLESS_ERRORS):
            continue
        if _SUMMARY_ERROR.match(message):
            continue
        messages.setdefault(message, None)
    return list(messages)[:ERROR_LINES_SHOWN]


def advice_for(lines: Iterable[str]) -> list[str]:
    """What to do, in our configuration's words, for the causes in `lines` (each once)."""
    found: dict[str, None] = {}
    for line in lines:
        for advice in ADVICE:
            if advice.pattern.search(line):
                found.setdefault(advice.text, None)
    return list(found)
