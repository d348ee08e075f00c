"""Which host paths a sandbox does not see: its root is the host's / without the mounts below it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grenadine_sv.sandbox.visibility import (
    MountTable,
    hidden_from_sandbox,
    hiding_mount,
    host_executable,
    mount_points,
)

MOUNTINFO_LINE = "22 1 254:0 / {point} rw,relatime shared:1 - ext4 /dev/vda rw\n"
HOST = ["/", "/proc", "/sys", "/dev", "/home", "/srv", "/srv/data", "/mnt/with space"]


def test_mount_points_reads_mountinfo_and_unescapes_spaces() -> None:
    text = (
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 22 0:36 / /mnt/with\\040space rw shared:20 - tmpfs tmpfs rw\n"
    )
    assert mount_points(text) == ("/", "/mnt/with space")


@pytest.mark.parametrize(
    ("path", "binds", "hidden_by"),
    [
        ("/usr/bin/python3", [], None),  # on the root mount itself
        ("/home/app", [], "/home"),
        ("/home/app", ["/home"], None),
        ("/home", [], "/home"),
        ("/srv/data/db", ["/srv"], "/srv/data"),  # binds are not recursive
        ("/srv/data/db", ["/srv", "/srv/data"], None),
        ("/srv/app", ["/srv/app"], None),  # a bind below the mount shows that directory
        ("/dev/null", [], None),  # the launcher's own mounts
        ("/sys/fs/cgroup/x", [], None),
        ("/homework", [], None),  # a sibling of a mount, not below it
        ("/mnt/with space/x", [], "/mnt/with space"),
    ],
)
def test_hiding_mount(path: str, binds: list[str], hidden_by: str | None) -> None:
    assert hiding_mount(path, HOST, binds) == hidden_by


def hidden(
    *,
    host_mounts: list[str],
    command: str = "true",
    directory: str = "/",
    search_path: str = os.defpath,
    binds: tuple[str, ...] | list[str] = (),
) -> str | None:
    return hidden_from_sandbox(
        "web",
        command=command,
        directory=directory,
        search_path=search_path,
        binds=binds,
        host_mounts=host_mounts,
    )


def test_the_message_names_the_path_the_mount_and_the_fix(tmp_path: Path) -> None:
    message = hidden(directory=str(tmp_path), host_mounts=["/", str(tmp_path)])
    assert message == (
        f"the directory {tmp_path} is on the host mount {tmp_path}, which the sandbox does not"
        " include (its root is the host's / without the mounts below it):"
        f' add "{tmp_path}" to programs.web.binds'
    )


def test_an_executable_found_on_a_hidden_mount_is_named(tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    search_path = f"{tool.parent}:/usr/bin"
    assert host_executable("tool", "/", search_path) == str(tool)
    mounts = ["/", str(tmp_path)]
    message = hidden(command="tool", search_path=search_path, host_mounts=mounts)
    assert message is not None
    assert message.startswith(f"the executable {tool} is on the host mount {tmp_path},")
    bound = [str(tmp_path)]
    assert hidden(command="tool", search_path=search_path, binds=bound, host_mounts=mounts) is None


def test_a_symlink_into_a_hidden_mount_is_followed(tmp_path: Path) -> None:
    target = tmp_path / "mounted" / "app"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    mounts = ["/", str(tmp_path / "mounted")]
    message = hidden(directory=str(link), host_mounts=mounts)
    assert message is not None
    assert f"the directory {target} is on the host mount {tmp_path / 'mounted'}" in message


def test_a_mount_table_is_read_again_only_when_the_kernel_says_it_changed(
    tmp_path: Path,
) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO_LINE.format(point="/"))
    table = MountTable(str(mountinfo))
    try:
        assert table.points() == ("/",)
        # A plain file is never marked changed: what it says now is not read.
        mountinfo.write_text(MOUNTINFO_LINE.format(point="/srv"))
        assert table.points() == ("/",)
    finally:
        table.close()


def test_a_mount_table_that_cannot_be_read_is_empty_and_read_again(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    table = MountTable(str(mountinfo))
    try:
        assert table.points() == ()
        mountinfo.write_text(MOUNTINFO_LINE.format(point="/"))
        assert table.points() == ("/",)
    finally:
        table.close()
