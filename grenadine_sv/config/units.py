"""Parsers for the value notations the configuration accepts.

Each parser takes a raw TOML value and returns the normalised value, or raises
ValueError whose message says what was expected (the caller adds what it got).
"""

import ipaddress
import math
import re
import shlex
import signal

DURATION_EXPECTED = 'expected a duration such as "10s" or a number of seconds'
POSITIVE_DURATION_EXPECTED = 'expected a duration greater than zero such as "10s" or "1h30m"'
SIZE_EXPECTED = 'expected a size in bytes such as 1048576, "50MB" or "10KiB"'
SIGNAL_EXPECTED = 'expected a signal name such as "TERM" or "SIGTERM", or a signal number'
UMASK_EXPECTED = 'expected an octal string such as "022" or an integer from 0 to 0o777'
HOST_PORT_EXPECTED = (
    'expected "host:port" with an IPv4 address, an [IPv6] address or a hostname,'
    " and a port from 1 to 65535"
)

PROGRAM_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
PROGRAM_NAME_EXPECTED = (
    'expected a program name of letters, digits, "_", "." and "-"'
    " starting with a letter or digit, at most 64 characters"
)

_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)\s*", re.ASCII)
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d)\s*)+", re.ASCII)
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE | re.ASCII)

_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_PORT = 65535


def check_program_name(name: str) -> str:
    """`name` if it can name a program (and so a directory of the image store)."""
    if not re.fullmatch(PROGRAM_NAME_PATTERN, name):
        raise ValueError(PROGRAM_NAME_EXPECTED)
    return name


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as "90s", "1h30m", "500ms"."""
    seconds = _duration_seconds(value)
    if seconds is None:
        raise ValueError(DURATION_EXPECTED)
    return seconds


def parse_positive_duration(value: object) -> float:
    """Like parse_duration, but zero is refused (intervals, timeouts)."""
    seconds = _duration_seconds(value)
    if seconds is None or seconds == 0:
        raise ValueError(POSITIVE_DURATION_EXPECTED)
    return seconds


def _duration_seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = _finite_float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = _finite_float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(
                _finite_float(amount) * _SECONDS_PER_UNIT[unit]
                for amount, unit in _DURATION_PART.findall(text)
            )
        else:
            return None
    else:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _finite_float(value: int | float | str) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


def check_size_form(value: object) -> object:
    """A size written in one of the accepted forms: a whole number of bytes, or a string
    such as "50MB" (10**6) or "10KiB" (2**10). pydantic.ByteSize converts it; it alone
    would also take forms this configuration does not document (".5MB", "1PB")."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _SIZE.fullmatch(value.strip()):
        return value
    raise ValueError(SIZE_EXPECTED)


def parse_signal(value: object) -> str:
    """The signal's name without "SIG" ("TERM") from "TERM", "SIGTERM", "term" or 15."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdecimal() and value.isascii():
        number = int(value.strip())
    if number is not None:
        try:
            return signal.Signals(number).name.removeprefix("SIG")
        except ValueError:
            raise ValueError(SIGNAL_EXPECTED) from None
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return signal.Signals[name].name.removeprefix("SIG")
        except KeyError:
            raise ValueError(SIGNAL_EXPECTED) from None
    raise ValueError(SIGNAL_EXPECTED)


def parse_umask(value: object) -> int:
    """A umask from an octal string ("022", "0o022") or an integer (TOML's 0o022 included)."""
    umask: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        umask = value
    elif isinstance(value, str):
        digits = value.strip().removeprefix("0o")
        if re.fullmatch(r"[0-7]{1,4}", digits):
            umask = int(digits, 8)
    if umask is None or not 0 <= umask <= 0o777:
        raise ValueError(UMASK_EXPECTED)
    return umask


def parse_host_port(value: str) -> tuple[str, int]:
    """(host, port) from "127.0.0.1:9847", "[::1]:9847" or "localhost:9847".

    The host of an IPv6 address is returned without its brackets.
    """
    host, colon, port_text = value.rpartition(":")
    if not colon or not port_text.isdecimal() or not port_text.isascii():
        raise ValueError(HOST_PORT_EXPECTED)
    port = int(port_text)
    if not 1 <= port <= _MAX_PORT:
        raise ValueError(HOST_PORT_EXPECTED)
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), port
        except ValueError:
            raise ValueError(HOST_PORT_EXPECTED) from None
    if _is_ipv4(host) or _is_hostname(host):
        return host, port
    raise ValueError(HOST_PORT_EXPECTED)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _is_hostname(host: str) -> bool:
    labels = host.split(".")
    return (
        0 < len(host) <= 253
        and all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdecimal()
    )


def split_command(value: object) -> object:
    """A command line string split as a shell would (shlex); other values pass unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return shlex.split(value)
    except ValueError as err:
        raise ValueError(f"expected a command line that can be split into words ({err})") from None
