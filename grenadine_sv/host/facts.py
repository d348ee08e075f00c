"""Read what the host says about CRIU: version strings, capability masks, `criu check` output.

Pure functions over text; the doctor gathers the text.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from grenadine_sv.criu.version import UnreadableOutputError, parse_version_number


class Status(enum.StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Verdict:
    status: Status
    finding: str


# Bit numbers from linux/capability.h.
CAPABILITY_NAMES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

_CAP_EFF_LINE = re.compile(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", re.MULTILINE)
# "Error (criu/cr-check.c:1901): Unknown feature list" -> "Unknown feature list"
_CRIU_LOG_PREFIX = re.compile(r"^(?:\(\s*[\d.]+\)\s*)?(Error|Warn)\s*\([^)]*\):\s*")
_CRIU_ERROR = re.compile(r"\bError\s*\(")
DIRTY_TRACKING_OFF = "Dirty tracking is OFF"


def parse_cap_eff(proc_status: str) -> str:
    """The CapEff mask (hex) from the text of /proc/<pid>/status."""
    match = _CAP_EFF_LINE.search(proc_status)
    if match is None:
        raise UnreadableOutputError("no 'CapEff:' line in /proc/self/status")
    return match.group(1)


def decode_capabilities(cap_eff_hex: str) -> set[str]:
    """Names of the capabilities set in a mask such as '000001fffeffffff'."""
    try:
        mask = int(cap_eff_hex.strip(), 16)
    except ValueError:
        raise UnreadableOutputError(
            f"expected a hexadecimal capability mask, got {cap_eff_hex!r}"
        ) from None
    names: set[str] = set()
    bit = 0
    while mask >> bit:
        if (mask >> bit) & 1:
            names.add(CAPABILITY_NAMES[bit] if bit < len(CAPABILITY_NAMES) else f"CAP_{bit}")
        bit += 1
    return names


def parse_kernel_version(release: str) -> tuple[int, int]:
    """'6.18.44-fc-v669' -> (6, 18)."""
    major, minor, _ = parse_version_number(release)
    return major, minor


def criu_message_lines(output: str) -> list[str]:
    """CRIU's output lines with the 'Error (file.c:line): ' prefix removed, blank lines dropped."""
    return [_CRIU_LOG_PREFIX.sub("", line).strip() for line in output.splitlines() if line.strip()]


def _first_error(output: str) -> str:
    lines = output.splitlines()
    errors = [line for line in lines if _CRIU_ERROR.search(line)]
    messages = criu_message_lines("\n".join(errors or lines))
    if not messages:
        return "no output"
    # CRIU sometimes ends a line with ':' and puts what to do on the next one.
    if messages[0].endswith(":") and len(messages) > 1:
        return f"{messages[0]} {messages[1]}"
    return messages[0]


def interpret_criu_check(returncode: int, output: str) -> Verdict:
    """Verdict on plain `criu check`: 0 and 'Looks good.' passes; anything else fails."""
    if returncode == 0 and "Looks good" in output:
        return Verdict(Status.OK, "passed")
    if returncode == 0:
        return Verdict(Status.WARN, f"exit 0 without 'Looks good': {_first_error(output)}")
    return Verdict(Status.FAIL, f"failed (exit {returncode}): {_first_error(output)}")


def soft_dirty_available(returncode: int, output: str) -> bool:
    """From `criu check --feature mem_dirty_track` or `criu check --all` output."""
    if DIRTY_TRACKING_OFF in output:
        return False
    return returncode == 0


def feature_supported(returncode: int, output: str, feature: str) -> bool:
    """From `criu check --feature NAME`, which prints 'NAME is supported' and exits 0."""
    return returncode == 0 and f"{feature} is supported" in output


def filesystem_type_of(path: str, mounts: str) -> str | None:
    """The filesystem type of the mount holding the absolute path `path`, from the text of
    /proc/self/mounts (the last mount on the longest matching mount point); None if no
    mount point matches."""
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # Spaces and other special characters are octal escapes in /proc/self/mounts.
        mount_point = fields[1].encode().decode("unicode_escape")
        inside = mount_point in ("/", path) or path.startswith(mount_point + "/")
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fields[2])
    return None if best is None else best[1]
