"""A throwaway systemd, booted as PID 1 of a `systemd-nspawn` container, to run the shipped unit.

The development and CI machines do not run systemd, so the unit file in contrib/systemd/ is tried
in a container: systemd-nspawn boots this host's own /usr on an empty tmpfs root
(`--volatile=yes`), with the checkout and its Python bound in read-only and the test's directory
bound on /etc/grenadine-sv. Everything the container writes (state_dir, images, journal) lives in
its tmpfs and is gone when it stops. It shares the host's network, so the test reaches its
programs on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
UNIT_FILE = REPO_ROOT / "contrib" / "systemd" / "grenadine-sv.service"
UNIT_NAME = "grenadine-sv.service"
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def nspawn_available() -> bool:
    return shutil.which("systemd-nspawn") is not None and Path("/lib/systemd/systemd").exists()


def python_trees() -> list[Path]:
    """Directories the supervisor's interpreter needs: its virtual environment and its base."""
    trees = [Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
    return [tree for tree in dict.fromkeys(trees) if not tree.is_relative_to("/usr")]


def _own_cgroups() -> list[Path]:
    """This process's cgroup in the v2 hierarchy and in systemd's named v1 one (hybrid hosts)."""
    found: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            for mount in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
                if (mount / "cgroup.controllers").exists():
                    found.append(mount / relative)
                    break
        elif controllers == "name=systemd":
            found.append(Path("/sys/fs/cgroup/systemd") / relative)
    return found


class SystemdContainer:
    """One booted container; `run` executes a command in it, `stop` powers it off."""

    def __init__(self, name: str, config_dir: Path, log: Path) -> None:
        self.name = name
        self.config_dir = config_dir
        self.log = log
        # systemd-nspawn outside systemd creates its cgroups next to its own: give it a parent
        # of its own so that stopping the container can remove everything it made.
        self.cgroups = [parent / f"gsv-test-{name}" for parent in _own_cgroups()]
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def boot(self, drop_in: str) -> None:
        drop_in_file = self.config_dir / "override.conf"
        drop_in_file.write_text(drop_in)
        binds = [REPO_ROOT, *python_trees()]
        command = [
            "systemd-nspawn",
            "--directory=/",
            "--volatile=yes",
            "--register=no",
            "--keep-unit",
            "--capability=all",
            f"--machine={self.name}",
            "--console=passive",
            *(f"--bind-ro={tree}" for tree in binds),
            f"--bind={self.config_dir}:/etc/grenadine-sv",
            f"--bind-ro={UNIT_FILE}:/etc/systemd/system/{UNIT_NAME}",
            f"--bind-ro={drop_in_file}:/etc/systemd/system/{UNIT_NAME}.d/override.conf",
            "--boot",
            "systemd.firstboot=off",
            "systemd.unit=basic.target",
        ]
        for cgroup in self.cgroups:
            cgroup.mkdir()
        enter = "".join(f'echo $$ > "{cgroup}/cgroup.procs"; ' for cgroup in self.cgroups)
        # CRIU in the container suspends the seccomp filters of the tasks it dumps, which
        # nspawn's own filter forbids: the container runs without one.
        environment = {**os.environ, "SYSTEMD_SECCOMP": "0"}
        with self.log.open("wb") as output:
            self.nspawn = subprocess.Popen(
                ["sh", "-c", enter + 'exec "$@"', "sh", *command],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited: {self.log.read_text()[-2000:]}")
            self.leader = self._leader()
            if self.leader is not None and self._state() in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise AssertionError(f"the container did not boot in {BOOT_TIMEOUT}s: {self.log}")

    def _leader(self) -> int | None:
        assert self.nspawn is not None
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            first = children.read_text().split()
            return int(first[0]) if first else None
        return None

    def _state(self) -> str:
        result = self.run(["systemctl", "is-system-running"], check=False)
        return result.stdout.strip()

    def run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.leader is not None
        return subprocess.run(
            ["nsenter", "--target", str(self.leader), "--all", *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def main_pid(self) -> int:
        """The unit's MainPID, as the container sees it (0 when not running)."""
        shown = self.run(["systemctl", "show", "--property=MainPID", "--value", UNIT_NAME])
        return int(shown.stdout.strip())

    def journal(self) -> str:
        return self.run(["journalctl", "--unit", UNIT_NAME, "--no-pager", "--output=cat"]).stdout

    def stop(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            # SIGTERM asks systemd-nspawn to power the container off.
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait()
        for cgroup in self.cgroups:
            _remove_cgroup_tree(cgroup)


def _remove_cgroup_tree(top: Path) -> None:
    if not top.exists():
        return
    for directory, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(directory)


@contextlib.contextmanager
def systemd_container(name: str, config_dir: Path, drop_in: str) -> Iterator[SystemdContainer]:
    container = SystemdContainer(name, config_dir, config_dir / "nspawn.log")
    try:
        container.boot(drop_in)
        yield container
    finally:
        container.stop()
