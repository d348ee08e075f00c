"""export piped into import between two supervisors (two state_dirs as two hosts), with real
memcached images and age encryption; the refusals an import owes its user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyrage
import pytest

from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.test_cli import (
    COMMAND_TIMEOUT,
    GRENADINE_SV,
    SupervisorProcess,
    memcached_get,
    memcached_program,
    memcached_set,
    run_cli,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]


def encryption_table(dirs: SupervisorDirs, identity: pyrage.x25519.Identity) -> str:
    key_file = dirs.root / "age-key.txt"
    key_file.write_text(f"# test key\n{identity}\n")
    os.chmod(key_file, 0o600)
    return (
        "[supervisor.remote.encryption]\n"
        f'recipients = ["{identity.to_public()}"]\n'
        f'identity_file = "{key_file}"\n'
    )


@pytest.fixture
def supervisor(sv_dirs: SupervisorDirs) -> Iterator[SupervisorProcess]:
    process = SupervisorProcess(sv_dirs)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def host_b() -> Iterator[SupervisorProcess]:
    root = Path(tempfile.mkdtemp(prefix="gsv-b-", dir="/tmp"))
    process = SupervisorProcess(SupervisorDirs(root))
    try:
        yield process
    finally:
        process.stop()
        shutil.rmtree(root, ignore_errors=True)


def pipe_export_into_import(
    a: SupervisorProcess, b: SupervisorProcess, *export_args: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    exporter = subprocess.Popen(
        [GRENADINE_SV, "-c", str(a.dirs.config), "export", *export_args, "-o", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert exporter.stdout is not None
    try:
        imported = subprocess.run(
            [GRENADINE_SV, "-c", str(b.dirs.config), "import", "-"],
            stdin=exporter.stdout,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    finally:
        exporter.stdout.close()
        _, export_err = exporter.communicate(timeout=COMMAND_TIMEOUT)
    assert exporter.returncode == 0, export_err.decode()
    return imported, export_err.decode()


def test_export_piped_into_import_restores_the_data_on_the_other_host(
    supervisor: SupervisorProcess, host_b: SupervisorProcess
) -> None:
    port = free_port()
    identity = pyrage.x25519.Identity.generate()
    program = memcached_program("cache", port)
    for side in (supervisor, host_b):
        side.dirs.write_config(program, extra_supervisor=encryption_table(side.dirs, identity))
    supervisor.start()
    supervisor.wait_running("cache")
    value = uuid.uuid4().hex
    memcached_set(port, "moved", value)
    supervisor.cli("checkpoint", "cache", "--stop")
    image = ImageStore(supervisor.dirs.state_dir).list("cache")[0]

    imported, export_report = pipe_export_into_import(supervisor, host_b, "cache", "latest")
    assert imported.returncode == 0, imported.stderr
    assert f"exported image {image.id} of cache to -" in export_report
    assert f"imported image {image.id} of cache" in imported.stderr
    assert f"grenadine-sv restore cache {image.id}" in imported.stdout
    assert ImageStore(host_b.dirs.state_dir).list("cache") == [image]
    supervisor.stop()

    host_b.start()
    host_b.cli("restore", "cache", image.id)
    host_b.wait_running("cache")
    assert memcached_get(port, "moved") == value

    again, _ = pipe_export_into_import(supervisor, host_b, "cache", image.id)
    assert again.returncode == 1
    assert "already has image" in again.stderr


def test_import_refuses_an_unknown_program_and_a_changed_definition(
    supervisor: SupervisorProcess, host_b: SupervisorProcess
) -> None:
    port = free_port()
    supervisor.dirs.write_config(memcached_program("cache", port))
    supervisor.start()
    supervisor.wait_running("cache")
    supervisor.cli("checkpoint", "cache")
    archive = supervisor.dirs.root / "cache.tar.zst"
    refused = supervisor.cli("export", "cache", "latest", "-o", str(archive), code=2)
    assert "--no-encrypt" in refused.stderr
    assert not archive.exists()
    supervisor.cli("export", "cache", "latest", "-o", str(archive), "--no-encrypt")
    assert archive.stat().st_mode & 0o777 == 0o600

    host_b.dirs.write_config(memcached_program("other", port))
    unknown = run_cli("-c", str(host_b.dirs.config), "import", str(archive))
    assert unknown.returncode == 1
    assert "program 'cache'" in unknown.stderr
    assert "does not define" in unknown.stderr

    host_b.dirs.write_config(memcached_program("cache", free_port()))
    changed = run_cli("-c", str(host_b.dirs.config), "import", str(archive))
    assert changed.returncode == 1
    assert "another definition" in changed.stderr
    assert "command: " in changed.stderr
    assert ImageStore(host_b.dirs.state_dir).list("cache") == []

    forced = run_cli(
        "-c", str(host_b.dirs.config), "import", str(archive), "--allow-changed-definition"
    )
    assert forced.returncode == 0, forced.stderr
    assert len(ImageStore(host_b.dirs.state_dir).list("cache")) == 1
