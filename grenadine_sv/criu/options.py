"""The CRIU options a program's `[programs.NAME.checkpoint]` table controls, and which network
lock this host can use."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

NetworkLock = Literal["nftables", "iptables", "skip"]
NetworkLockSetting = Literal["auto", "nftables", "iptables", "skip"]
FEATURE_TIMEOUT_SECONDS = 10.0
DEFAULT_GHOST_LIMIT = 1 << 20
# The state of each established TCP connection CRIU dumped in repair mode (and locked).
TCP_STREAM_IMAGES = "tcp-stream-*.img"


@dataclass(frozen=True)
class CriuOptions:
    """Options passed to CRIU on both dump and restore (each side uses those it knows)."""

    file_locks: bool = True
    tcp_established: bool = False
    network_lock: NetworkLock = "skip"
    external_unix_sockets: bool = False
    ghost_limit: int = DEFAULT_GHOST_LIMIT
    skip_in_flight: bool = True
    tcp_close: bool = False

    def locks_connections(self) -> bool:
        """Whether CRIU puts established TCP connections in repair mode, the only thing its
        network lock holds (with `tcp_close` it neither dumps nor locks them)."""
        return self.tcp_established and not self.tcp_close

    def for_dump(self) -> CriuOptions:
        """The options a dump runs with: no network lock when no connection is locked. CRIU
        would still build its nftables table, chains and rules while the program is frozen
        (0.2 to 0.8 s measured), and the restore would spend 0.2 s deleting it."""
        return self if self.locks_connections() else replace(self, network_lock="skip")

    def for_restore(self, images_dir: Path) -> CriuOptions:
        """The options a restore of `images_dir` runs with: the network lock only when the
        image holds locked connections (CRIU's tcp-stream images), for CRIU to lift it."""
        if any(images_dir.glob(TCP_STREAM_IMAGES)):
            return self
        return replace(self, network_lock="skip")


@dataclass(frozen=True)
class NetworkLocks:
    """Which of CRIU's network locks work here: its nftables lock needs a CRIU built with
    libnftables, its iptables lock runs the `iptables` command."""

    nftables: bool
    iptables: bool

    def choose(self, setting: NetworkLockSetting) -> NetworkLock | None:
        """The lock for a setting; None when "auto" finds none that works here."""
        if setting != "auto":
            return setting
        if self.nftables:
            return "nftables"
        if self.iptables:
            return "iptables"
        return None


def probe_network_locks(criu_binary: Path) -> NetworkLocks:
    """Ask CRIU whether its nftables lock works, and look for iptables (blocking)."""
    try:
        result = subprocess.run(
            [str(criu_binary), "check", "--feature", "network_lock_nftables"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=FEATURE_TIMEOUT_SECONDS,
            check=False,
        )
        nftables = result.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        nftables = False
    return NetworkLocks(nftables=nftables, iptables=shutil.which("iptables") is not None)


def apply_options(opts: Any, options: CriuOptions) -> None:
    """Set `options` on a pycriu request's opts (a criu_opts message)."""
    import pycriu

    opts.file_locks = options.file_locks
    opts.tcp_established = options.tcp_established
    opts.network_lock = {
        "nftables": pycriu.rpc_pb2.NFTABLES,
        "iptables": pycriu.rpc_pb2.IPTABLES,
        "skip": pycriu.rpc_pb2.SKIP,
    }[options.network_lock]
    opts.ext_unix_sk = options.external_unix_sockets
    opts.ghost_limit = options.ghost_limit
    opts.tcp_skip_in_flight = options.skip_in_flight
    opts.tcp_close = options.tcp_close
