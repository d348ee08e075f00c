"""What the doctor concludes from the texts CRIU and /proc give it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grenadine_sv.criu.version import (
    UnreadableOutputError,
    format_version,
    parse_criu_version,
    parse_version_number,
)
from grenadine_sv.host.doctor import check_criu_cache
from grenadine_sv.host.facts import (
    CAPABILITY_NAMES,
    Status,
    decode_capabilities,
    feature_supported,
    filesystem_type_of,
    interpret_criu_check,
    parse_cap_eff,
    parse_kernel_version,
    soft_dirty_available,
)

# This project's CI host: everything up to CAP_CHECKPOINT_RESTORE except CAP_SYS_RESOURCE.
HOST_CAP_EFF = "000001fffeffffff"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Version: 4.2.1\n", (4, 2, 1)),
        ("Version: 4.2\n", (4, 2, 0)),
        ("Version: 4.2\nGitID: v4.2-12-g0123abcd\n", (4, 2, 0)),
        ("Version: 3.17.1\n", (3, 17, 1)),
        ("Version: 4.3-rc1\nGitID: v4.3-rc1\n", (4, 3, 0)),
        ("Warn: something first\nVersion: 10.0.12\n", (10, 0, 12)),
    ],
)
def test_criu_version_is_read_from_the_version_line(text, expected):
    assert parse_criu_version(text) == expected


@pytest.mark.parametrize("text", ["", "criu: command not found\n", "GitID: v4.2\n", "Version: \n"])
def test_criu_output_without_a_version_is_an_error(text):
    with pytest.raises(UnreadableOutputError):
        parse_criu_version(text)


def test_versions_compare_as_numbers():
    assert parse_version_number("4.10") > parse_version_number("4.2.1")
    assert parse_version_number("4.2") >= (4, 2, 0)
    assert parse_version_number("4.1.1") < (4, 2, 0)


@given(st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)))
def test_format_then_parse_gives_the_version_back(version):
    assert parse_version_number(format_version(version)) == version


def test_host_cap_eff_lacks_only_cap_sys_resource():
    capabilities = decode_capabilities(HOST_CAP_EFF)
    assert set(CAPABILITY_NAMES) - capabilities == {"CAP_SYS_RESOURCE"}
    assert {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_CHECKPOINT_RESTORE"} <= capabilities


@pytest.mark.parametrize(
    ("bit", "name"),
    [
        (19, "CAP_SYS_PTRACE"),
        (21, "CAP_SYS_ADMIN"),
        (24, "CAP_SYS_RESOURCE"),
        (40, "CAP_CHECKPOINT_RESTORE"),
    ],
)
def test_single_bits_decode_to_their_names(bit, name):
    assert decode_capabilities(f"{1 << bit:016x}") == {name}


def test_empty_mask_and_unknown_bits():
    assert decode_capabilities("0000000000000000") == set()
    assert decode_capabilities(f"{1 << 45:x}") == {"CAP_45"}


def test_a_mask_that_is_not_hex_is_an_error():
    with pytest.raises(UnreadableOutputError):
        decode_capabilities("not-hex")


def test_cap_eff_is_found_in_proc_status():
    status = (
        "Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n"
        f"CapEff:\t{HOST_CAP_EFF}\nCapBnd:\t000001ffffffffff\n"
    )
    assert parse_cap_eff(status) == HOST_CAP_EFF


def test_proc_status_without_cap_eff_is_an_error():
    with pytest.raises(UnreadableOutputError):
        parse_cap_eff("Name:\tpython3\n")


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.18.44-fc-v669", (6, 18)),
        ("6.1.0-28-amd64", (6, 1)),
        ("5.4.0", (5, 4)),
        ("4.19", (4, 19)),
    ],
)
def test_kernel_release_gives_major_and_minor(release, expected):
    assert parse_kernel_version(release) == expected


def test_criu_check_that_looks_good_passes():
    verdict = interpret_criu_check(0, "Looks good.\n")
    assert verdict.status is Status.OK


def test_criu_check_warnings_before_looks_good_still_pass():
    output = (
        "Warn  (criu/kerndat.c:1470): CRIU was built without libnftables support\nLooks good.\n"
    )
    assert interpret_criu_check(0, output).status is Status.OK


def test_old_criu_on_a_new_kernel_fails_with_its_reason():
    output = (
        "Error (criu/vdso.c:617): vdso: Unexpected rt vDSO area bounds\n"
        "Error (criu/cr-check.c:1700): Failed to check vdso\n"
    )
    verdict = interpret_criu_check(1, output)
    assert verdict.status is Status.FAIL
    assert "vdso: Unexpected rt vDSO area bounds" in verdict.finding
    assert "criu/vdso.c" not in verdict.finding
    assert "exit 1" in verdict.finding


def test_criu_check_without_privileges_names_the_missing_capability():
    output = (
        "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: \n"
        "setcap cap_checkpoint_restore+eip /usr/local/sbin/criu"
    )
    verdict = interpret_criu_check(1, output)
    assert verdict.status is Status.FAIL
    assert "CAP_CHECKPOINT_RESTORE capability: setcap" in verdict.finding


def test_criu_check_exiting_zero_without_looks_good_is_a_warning():
    verdict = interpret_criu_check(0, "")
    assert verdict.status is Status.WARN
    assert "no output" in verdict.finding


def test_timestamped_log_lines_lose_their_prefix():
    verdict = interpret_criu_check(1, "(00.002) Error (criu/cr-check.c:1901): Unknown feature x\n")
    assert verdict.finding == "failed (exit 1): Unknown feature x"


DIRTY_OFF = "Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work.\n"


def test_soft_dirty_off_from_the_feature_check():
    assert not soft_dirty_available(1, DIRTY_OFF)


def test_soft_dirty_off_from_check_all_which_exits_zero():
    output = DIRTY_OFF + "Looks good but some kernel features are missing\n"
    assert not soft_dirty_available(0, output)


def test_soft_dirty_on():
    assert soft_dirty_available(0, "mem_dirty_track is supported\n")
    assert soft_dirty_available(0, "Looks good.\n")


def test_soft_dirty_unknown_failure_counts_as_off():
    assert not soft_dirty_available(1, "Error (criu/cr-check.c:1901): Unknown feature\n")


def test_feature_supported_needs_exit_zero_and_the_sentence():
    assert feature_supported(0, "uffd-noncoop is supported\n", "uffd-noncoop")
    assert not feature_supported(1, "Error (criu/cr-check.c:1): UFFD is not supported\n", "uffd")
    assert not feature_supported(0, "mem_dirty_track is supported\n", "uffd-noncoop")


# /proc/self/mounts of this project's development VM (shortened), and of a systemd host.
VM_MOUNTS = """/dev/vda / ext4 rw,relatime,discard 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /run/user/0 tmpfs rw,nosuid,nodev 0 0
"""
SYSTEMD_MOUNTS = """/dev/sda1 / ext4 rw,relatime 0 0
tmpfs /run tmpfs rw,nosuid,nodev,noexec,relatime,size=812360k,mode=755 0 0
tmpfs /run/lock tmpfs rw,nosuid,nodev,noexec,relatime,size=5120k 0 0
"""


@pytest.mark.parametrize(
    ("mounts", "path", "expected"),
    [
        (VM_MOUNTS, "/run", "ext4"),  # /run/user/0 is a tmpfs, not /run
        (SYSTEMD_MOUNTS, "/run", "tmpfs"),
        (SYSTEMD_MOUNTS + "/dev/sdb1 /run xfs rw 0 0\n", "/run", "xfs"),  # mounted over
        ("/dev/sdc1 /srv/my\\040data ext4 rw 0 0\n", "/srv/my data/x", "ext4"),
        ("proc /proc proc rw 0 0\n", "/run", None),
    ],
)
def test_the_filesystem_of_a_path_is_that_of_its_deepest_mount(mounts, path, expected):
    assert filesystem_type_of(path, mounts) == expected


def test_doctor_warns_when_criu_cannot_cache_its_kernel_probes(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(VM_MOUNTS)
    result = check_criu_cache(mounts)
    assert result.status is Status.WARN
    assert "/run is not a tmpfs (ext4)" in result.finding
    assert "mount a tmpfs on /run" in result.advice
    mounts.write_text(SYSTEMD_MOUNTS.replace(" /run ", f" {tmp_path} "))
    assert check_criu_cache(mounts, tmp_path).status is Status.OK


def test_doctor_names_a_cache_file_left_half_written_by_a_stopped_criu(tmp_path):
    """CRIU creates criu.kdat.tmp with O_EXCL before renaming it to criu.kdat: one that a
    killed CRIU left makes every later run give up saving the cache."""
    mounts = tmp_path / "mounts"
    mounts.write_text(SYSTEMD_MOUNTS.replace(" /run ", f" {tmp_path} "))
    (tmp_path / "criu.kdat.tmp").write_bytes(b"half")
    result = check_criu_cache(mounts, tmp_path)
    assert result.status is Status.WARN
    assert f"{tmp_path}/criu.kdat.tmp was left" in result.finding
    assert f"remove {tmp_path}/criu.kdat.tmp" in result.advice
    (tmp_path / "criu.kdat").write_bytes(b"saved by a later run")
    assert check_criu_cache(mounts, tmp_path).status is Status.OK
