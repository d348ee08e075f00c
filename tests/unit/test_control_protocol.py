"""The control socket's wire format, on both ends: what a request line may be."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from grenadine_sv.control.protocol import ProtocolError, decode_request, encode


def test_a_request_is_a_command_with_optional_arguments() -> None:
    assert decode_request(b'{"command": "status"}') == ("status", {})
    assert decode_request(b'{"command": "stop", "args": {"names": ["a"]}}') == (
        "stop",
        {"names": ["a"]},
    )


def test_what_the_client_encodes_the_server_decodes() -> None:
    line = encode({"command": "restore", "args": {"name": "web", "image": "latest"}})
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode_request(line.rstrip(b"\n")) == ("restore", {"name": "web", "image": "latest"})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"status", "not a JSON object"),
        (b"\xff\xfe", "not a JSON object"),
        (b'["status"]', "must be a JSON object"),
        (b'{"args": {}}', 'needs "command"'),
        (b'{"command": 3}', 'needs "command"'),
        (b'{"command": "stop", "args": ["a"]}', '"args" (an object)'),
        (b"[" * 100_000, "not a JSON object"),
    ],
)
def test_anything_else_is_refused_with_a_reason(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode_request(line)


def test_replies_carry_values_json_cannot_by_their_text() -> None:
    assert json.loads(encode({"ok": True, "result": Path("/x")})) == {"ok": True, "result": "/x"}
