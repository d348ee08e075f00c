"""`doctor` on this machine, on fake CRIU binaries, and as an unprivileged user."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from grenadine_sv.criu import binary as criu_binary
from grenadine_sv.criu.binary import (
    MIN_CRIU_VERSION,
    CriuNotFound,
    CriuVersionUnknown,
    criu_version,
    find_criu,
)
from grenadine_sv.host.doctor import run_doctor

CAP_SYS_RESOURCE_BIT = 24
LINE = re.compile(r"^(OK|WARN|FAIL)  [^:]+: .+ — .+$")


def doctor_report(criu_path: Path | None = None) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    exit_code = run_doctor(as_json=True, out=out, criu_path=criu_path)
    return exit_code, json.loads(out.getvalue())


def by_check(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {entry["check"]: entry for entry in report["checks"]}


def host_has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    cap_eff = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(cap_eff, 16) >> CAP_SYS_RESOURCE_BIT & 1)


def working_criu_or_skip() -> Path:
    try:
        path = find_criu()
        version = criu_version(path)
    except (CriuNotFound, CriuVersionUnknown) as exc:
        pytest.skip(f"no usable CRIU here ({exc})")
    if version < MIN_CRIU_VERSION:
        pytest.skip(f"CRIU at {path} is {version}, older than 4.2: run contrib/install-criu")
    return path


def write_fake_criu(
    directory: Path, version_output: str, check_exit: int, check_output: str
) -> Path:
    path = directory / "criu"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then\n'
        f"  printf '%s' '{version_output}'\n"
        "  exit 0\n"
        "fi\n"
        f"printf '%s' '{check_output}' >&2\n"
        f"exit {check_exit}\n"
    )
    path.chmod(0o755)
    return path


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU and namespaces need root")


@pytest.mark.root
@pytest.mark.criu
@root_only
def test_doctor_on_this_host_says_checkpoints_can_work():
    working_criu_or_skip()

    exit_code, report = doctor_report()

    checks = by_check(report)
    failed = [entry for entry in report["checks"] if entry["status"] == "FAIL"]
    assert failed == []
    assert exit_code == 0
    assert report["ok"] is True
    version = tuple(int(part) for part in report["criu_version"].split("."))
    assert version >= MIN_CRIU_VERSION
    assert checks["criu"]["status"] == "OK"
    assert checks["criu check"] == {
        "check": "criu check",
        "status": "OK",
        "finding": "passed",
        "advice": "the kernel has what CRIU needs",
    }
    assert checks["PID and mount namespaces"]["status"] == "OK"
    cap_sys_resource = checks["capability CAP_SYS_RESOURCE"]
    if host_has_cap_sys_resource():
        assert cap_sys_resource["status"] == "OK"
    else:
        assert cap_sys_resource["status"] == "WARN"
        assert cap_sys_resource["advice"] == (
            "programs running as another user (e.g. memcached -u nobody) cannot be "
            "checkpointed; run them as root"
        )


@pytest.mark.root
@pytest.mark.criu
@root_only
def test_text_report_has_one_line_per_check_and_a_verdict():
    working_criu_or_skip()
    _, report = doctor_report()
    out = io.StringIO()

    exit_code = run_doctor(as_json=False, out=out)

    lines = out.getvalue().splitlines()
    assert exit_code == 0
    assert len(lines) == len(report["checks"]) + 1
    for line in lines[:-1]:
        assert LINE.match(line), line
    assert lines[-1] == "checkpoint and restore can work on this host"


def test_old_criu_fails_and_points_to_install_criu(tmp_path):
    fake = write_fake_criu(
        tmp_path,
        "Version: 3.17.1\n",
        1,
        "Error (criu/vdso.c:617): vdso: Unexpected rt vDSO area bounds\n",
    )

    exit_code, report = doctor_report(criu_path=fake)

    checks = by_check(report)
    assert exit_code == 1
    assert report["ok"] is False
    assert report["criu_version"] == "3.17.1"
    assert checks["criu"]["status"] == "FAIL"
    assert "older than 4.2.0" in checks["criu"]["finding"]
    assert "contrib/install-criu" in checks["criu"]["advice"]
    assert checks["criu check"]["status"] == "FAIL"
    assert "Unexpected rt vDSO area bounds" in checks["criu check"]["finding"]
    assert checks["soft-dirty tracking"]["status"] == "WARN"
    assert checks["lazy restore"]["status"] == "WARN"


def test_missing_configured_criu_fails_with_the_install_advice(tmp_path):
    exit_code, report = doctor_report(criu_path=tmp_path / "nowhere" / "criu")

    checks = by_check(report)
    assert exit_code == 1
    assert report["criu_version"] is None
    assert checks["criu"]["status"] == "FAIL"
    assert "contrib/install-criu" in checks["criu"]["advice"]
    assert checks["criu check"]["finding"] == "not run: no usable criu"


def test_git_build_version_is_read(tmp_path):
    fake = write_fake_criu(tmp_path, "Version: 4.2\nGitID: v4.2-5-gdeadbeef\n", 0, "")
    assert criu_version(fake) == (4, 2, 0)


def test_binary_that_prints_no_version_is_reported(tmp_path):
    fake = write_fake_criu(tmp_path, "usage: criu ...\n", 0, "")
    with pytest.raises(CriuVersionUnknown, match="did not report a version"):
        criu_version(fake)


class TestFindCriu:
    @pytest.fixture(autouse=True)
    def _isolated(self, tmp_path, monkeypatch):
        monkeypatch.delenv(criu_binary.CRIU_ENV_VAR, raising=False)
        monkeypatch.setattr(criu_binary, "INSTALLED_CRIU", tmp_path / "not-installed" / "criu")
        empty = tmp_path / "empty-path"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))

    def test_configured_path_comes_first(self, tmp_path, monkeypatch):
        configured = write_fake_criu(tmp_path, "Version: 4.2.1\n", 0, "")
        other = tmp_path / "other"
        other.mkdir()
        monkeypatch.setenv(criu_binary.CRIU_ENV_VAR, str(write_fake_criu(other, "", 0, "")))
        assert find_criu(configured) == configured

    def test_a_configured_path_that_does_not_exist_is_an_error(self, tmp_path):
        with pytest.raises(CriuNotFound, match="contrib/install-criu"):
            find_criu(tmp_path / "criu")

    def test_environment_variable_before_the_installed_path(self, tmp_path, monkeypatch):
        installed_dir = tmp_path / "installed"
        installed_dir.mkdir()
        monkeypatch.setattr(
            criu_binary, "INSTALLED_CRIU", write_fake_criu(installed_dir, "", 0, "")
        )
        from_env = write_fake_criu(tmp_path, "", 0, "")
        monkeypatch.setenv(criu_binary.CRIU_ENV_VAR, str(from_env))
        assert find_criu() == from_env

    def test_environment_variable_naming_nothing_is_an_error(self, tmp_path, monkeypatch):
        monkeypatch.setenv(criu_binary.CRIU_ENV_VAR, str(tmp_path / "criu"))
        with pytest.raises(CriuNotFound, match="GRENADINE_SV_CRIU"):
            find_criu()

    def test_installed_path_before_path(self, tmp_path, monkeypatch):
        installed_dir = tmp_path / "installed"
        installed_dir.mkdir()
        installed = write_fake_criu(installed_dir, "", 0, "")
        monkeypatch.setattr(criu_binary, "INSTALLED_CRIU", installed)
        monkeypatch.setenv("PATH", str(tmp_path))
        write_fake_criu(tmp_path, "", 0, "")
        assert find_criu() == installed

    def test_path_is_the_last_resort(self, tmp_path, monkeypatch):
        on_path = write_fake_criu(tmp_path, "", 0, "")
        monkeypatch.setenv("PATH", str(tmp_path))
        assert find_criu() == on_path

    def test_nothing_found_says_to_run_install_criu(self):
        with pytest.raises(CriuNotFound, match="run contrib/install-criu"):
            find_criu()


def run_as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    command = [
        setpriv,
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--inh-caps=-all",
        sys.executable,
        "-c",
        code,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, cwd="/")


@pytest.mark.root
@root_only
def test_unprivileged_user_is_told_what_fails():
    if run_as_nobody("import grenadine_sv.host.doctor").returncode != 0:
        pytest.skip("user nobody cannot import grenadine_sv from this checkout")
    code = (
        "import sys\n"
        "from grenadine_sv.host.doctor import run_doctor\n"
        "sys.exit(run_doctor(as_json=True, out=sys.stdout))\n"
    )

    result = run_as_nobody(code)

    report = json.loads(result.stdout)
    checks = by_check(report)
    assert result.returncode == 1, result.stderr
    assert report["ok"] is False
    assert checks["root"]["status"] == "FAIL"
    assert checks["capability CAP_SYS_ADMIN"]["status"] == "FAIL"
    assert checks["capability CAP_SYS_PTRACE"]["status"] == "FAIL"
    assert checks["PID and mount namespaces"]["status"] == "FAIL"
