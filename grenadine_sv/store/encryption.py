"""age encryption of image archives (through pyrage): keys from the configuration, and
streaming encrypt/decrypt between file objects."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

AGE_MAGIC = b"age-encryption.org/v1"
SECRET_KEY_PREFIX = "AGE-SECRET-KEY-1"


class EncryptionKeyError(Exception):
    """A key or key file from the configuration cannot be used; the message says which."""


class DecryptionFailed(Exception):
    """An archive could not be decrypted or failed age's authentication."""


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that others can read or write, naming it and the key that set it."""
    try:
        st = path.stat()
    except OSError as exc:
        raise EncryptionKeyError(f"{what} {path} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise EncryptionKeyError(f"{what} {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise EncryptionKeyError(
            f"{what} {path} has mode {mode:04o}: it holds a secret and must be 0600 "
            f"(chmod 600 {path})"
        )
    if st.st_uid != os.geteuid():
        raise EncryptionKeyError(f"{what} {path} belongs to uid {st.st_uid}, not to this user")


def parse_recipients(recipients: Sequence[str]) -> list[Any]:
    import pyrage

    parsed = []
    for text in recipients:
        try:
            parsed.append(pyrage.x25519.Recipient.from_str(text))
        except pyrage.RecipientError as exc:
            raise EncryptionKeyError(
                f"[supervisor.remote.encryption] recipients: {text!r} is not an age public key "
                f"({exc})"
            ) from exc
    return parsed


def load_identities(identity_file: Path) -> list[Any]:
    """The age identities in `identity_file` (which must be 0600), as pyrage objects."""
    import pyrage

    what = "[supervisor.remote.encryption] identity_file"
    check_private_file(identity_file, what)
    identities = []
    for number, line in enumerate(identity_file.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            identities.append(pyrage.x25519.Identity.from_str(text))
        except pyrage.IdentityError as exc:
            raise EncryptionKeyError(
                f"{what} {identity_file} line {number} is not an age identity "
                f"(expected {SECRET_KEY_PREFIX}...): {exc}"
            ) from exc
    if not identities:
        raise EncryptionKeyError(f"{what} {identity_file} holds no age identity")
    return identities


def encrypt_stream(source: BinaryIO, sink: BinaryIO, recipients: Sequence[Any]) -> None:
    """Encrypt everything `source` yields into `sink` (age streams in 64 KiB chunks)."""
    import pyrage

    pyrage.encrypt_io(source, sink, list(recipients))


def decrypt_stream(source: BinaryIO, sink: BinaryIO, identities: Sequence[Any]) -> None:
    """Decrypt `source` into `sink`; DecryptionFailed says whether the key did not match or
    the data failed authentication (altered or truncated)."""
    import pyrage

    try:
        pyrage.decrypt_io(source, sink, list(identities))
    except pyrage.DecryptError as exc:
        raise DecryptionFailed(
            f"it could not be decrypted with the identity_file's keys ({exc}): it was "
            "encrypted to other recipients"
        ) from exc
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise DecryptionFailed(
            f"it failed age authentication ({exc}): it was altered or truncated after it was "
            "encrypted"
        ) from exc
