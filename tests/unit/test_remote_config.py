"""[supervisor.remote] and the per-program upload/restore_source keys: what is accepted, and
the errors (file, key, expectation) for what cannot work."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pyrage
import pytest

from grenadine_sv.config.loading import ConfigError, load_config

RECIPIENT = str(pyrage.x25519.Identity.generate().to_public())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grenadine.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_configuration_without_remote_has_none(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[programs.p]\ncommand = ["/bin/true"]\n'))
    assert config.supervisor.remote is None
    program = config.programs["p"]
    assert (program.checkpoint.upload, program.checkpoint.remote_keep) == (False, None)
    assert program.restore_source == "local"


def test_full_remote_table_loads(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            f"""
            [supervisor.remote]
            url = "s3://images/fleet/"
            endpoint = "http://127.0.0.1:8333"
            region = "eu-west-1"
            credentials_file = "s3.ini"
            [supervisor.remote.encryption]
            recipients = ["{RECIPIENT}"]
            identity_file = "age.key"
            [programs.p]
            command = ["/bin/true"]
            restore = "latest"
            restore_source = "newest"
            [programs.p.checkpoint]
            upload = true
            remote_keep = 3
            """,
        )
    )
    remote = config.supervisor.remote
    assert remote is not None
    assert remote.url == "s3://images/fleet"
    assert remote.credentials_file == tmp_path / "s3.ini"
    assert remote.encryption.identity_file == tmp_path / "age.key"
    assert config.programs["p"].checkpoint.remote_keep == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[programs.p]\ncommand = ["/bin/true"]\ncheckpoint = { upload = true }\n',
            "programs.p.checkpoint.upload: expected [supervisor.remote] url to be set",
        ),
        (
            '[supervisor.remote]\nurl = "s3://images"\n'
            '[programs.p]\ncommand = ["/bin/true"]\ncheckpoint = { upload = true }\n',
            "programs.p.checkpoint.upload: expected [supervisor.remote.encryption] recipients",
        ),
        (
            '[programs.p]\ncommand = ["/bin/true"]\nrestore_source = "remote"\n',
            'programs.p.restore_source: expected "local" without [supervisor.remote] url',
        ),
        ('[supervisor.remote]\nurl = "http://images"\n', "supervisor.remote.url"),
        (
            '[supervisor.remote.encryption]\nrecipients = ["age1short"]\n',
            "supervisor.remote.encryption.recipients[0]",
        ),
        (
            '[programs.p]\ncommand = ["/bin/true"]\ncheckpoint = { remote_keep = 0 }\n',
            "programs.p.checkpoint.remote_keep",
        ),
    ],
)
def test_what_cannot_work_is_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text))
    assert message in str(raised.value)
    assert "grenadine.toml" in str(raised.value)
