"""Where a program's cgroup is: the cgroup v2 mount, this process's own cgroup, the state_dir."""

from __future__ import annotations

from pathlib import Path

from grenadine_sv.sandbox.cgroup import own_v2_path, subtree_for, v2_mount_point

HYBRID = (
    "35 24 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n"
    "36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec shared:10 - cgroup2 cgroup2 rw\n"
    "37 35 0:32 / /sys/fs/cgroup/pids rw,nosuid shared:11 - cgroup cgroup rw,pids\n"
)
PURE_V2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:9 - cgroup2 cgroup2 rw\n"


def test_the_v2_hierarchy_is_found_on_hybrid_and_pure_v2_hosts():
    assert v2_mount_point(HYBRID) == Path("/sys/fs/cgroup/unified")
    assert v2_mount_point(PURE_V2) == Path("/sys/fs/cgroup")
    assert v2_mount_point("35 24 0:30 / /proc rw - proc proc rw\n") is None


def test_own_cgroup_is_read_from_the_v2_line():
    text = "9:name=systemd:/\n8:pids:/\n0::/system.slice/grenadine-sv.service\n"
    assert own_v2_path(text) == "/system.slice/grenadine-sv.service"
    assert own_v2_path("0::/\n") == "/"
    assert own_v2_path("8:pids:/\n") == "/"


def test_a_systemd_unit_keeps_its_programs_in_its_own_delegated_subtree():
    mount = Path("/sys/fs/cgroup")
    state = Path("/var/lib/grenadine-sv")
    unit = subtree_for(mount, "/system.slice/grenadine-sv.service", state)
    assert unit.parent == mount / "system.slice" / "grenadine-sv.service"
    by_hand = subtree_for(mount, "/user.slice/user-0.slice/session-3.scope", state)
    assert by_hand.parent == mount / "grenadine-sv"


def test_each_state_dir_has_its_own_subtree():
    mount = Path("/sys/fs/cgroup/unified")
    one = subtree_for(mount, "/", Path("/var/lib/a"))
    assert one == subtree_for(mount, "/", Path("/var/lib/a"))
    assert one != subtree_for(mount, "/", Path("/var/lib/b"))
    assert one.name.startswith("sv-")
