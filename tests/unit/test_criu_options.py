"""Which network lock CRIU is asked for: only when established connections are locked."""

from __future__ import annotations

from pathlib import Path

import pytest

from grenadine_sv.criu.options import CriuOptions


@pytest.mark.parametrize(
    ("tcp_established", "tcp_close", "expected"),
    [
        (False, False, "skip"),
        (True, True, "skip"),  # --tcp-close: connections neither dumped nor locked
        (True, False, "nftables"),
    ],
)
def test_a_dump_takes_the_network_lock_only_for_connections_it_repairs(
    tcp_established: bool, tcp_close: bool, expected: str
):
    options = CriuOptions(
        tcp_established=tcp_established, tcp_close=tcp_close, network_lock="nftables"
    )
    dumped = options.for_dump()
    assert dumped.network_lock == expected
    assert dumped.tcp_established == tcp_established
    assert dumped.tcp_close == tcp_close


def test_a_restore_lifts_the_lock_only_when_the_image_holds_locked_connections(tmp_path: Path):
    options = CriuOptions(tcp_established=True, network_lock="iptables")
    (tmp_path / "inventory.img").write_bytes(b"")
    (tmp_path / "inetsk.img").write_bytes(b"")  # a listening socket: nothing locked
    assert options.for_restore(tmp_path).network_lock == "skip"
    (tmp_path / "tcp-stream-2c5a.img").write_bytes(b"")
    assert options.for_restore(tmp_path).network_lock == "iptables"
    assert options.for_restore(tmp_path) == options
