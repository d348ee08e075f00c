"""`grenadine-sv doctor`: can CRIU checkpoint and restore here, and what will not work?

Needs no configuration file and no running supervisor. Each check runs real commands (with
timeouts) and reads /proc; the interpretation of what they print lives in `hostcheck`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from grenadine_sv.criu.binary import (
    INSTALL_ADVICE,
    MIN_CRIU_VERSION,
    CriuNotFound,
    CriuVersionUnknown,
    criu_version,
    find_criu,
)
from grenadine_sv.criu.options import probe_network_locks
from grenadine_sv.criu.version import UnreadableOutputError, format_version, parse_version_number
from grenadine_sv.host.facts import (
    Status,
    decode_capabilities,
    feature_supported,
    filesystem_type_of,
    interpret_criu_check,
    parse_cap_eff,
    parse_kernel_version,
    soft_dirty_available,
)
from grenadine_sv.sandbox.init import TINI

COMMAND_TIMEOUT_SECONDS = 30.0
CAP_SYS_RESOURCE_ADVICE = (
    "programs running as another user (e.g. memcached -u nobody) cannot be checkpointed; "
    "run them as root"
)
REQUIRED_CAPABILITIES = {
    "CAP_SYS_ADMIN": "CRIU needs it for namespaces and mounts",
    "CAP_SYS_PTRACE": "CRIU needs it to seize the processes it dumps",
    "CAP_CHECKPOINT_RESTORE": "CRIU needs it to give restored processes their PIDs",
}
# CAP_CHECKPOINT_RESTORE exists from Linux 5.9; before it, CAP_SYS_ADMIN covers its uses.
CHECKPOINT_RESTORE_CAP_KERNEL = (5, 9)
OLDEST_KERNEL_FOR_CRIU = (3, 11)
PRIVILEGE_ADVICE = "run grenadine-sv as root with full capabilities (e.g. a privileged container)"
# Where CRIU run as root caches its kernel probes (criu.kdat), only when it is a tmpfs.
CRIU_CACHE_DIR = Path("/run")
CRIU_CACHE_NAME = "criu.kdat"

# Runs in a child: new PID + mount namespaces, / made private, a fresh proc mounted by PID 1.
# That is what the sandbox does before it starts a program.
_NAMESPACE_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_void_p)
CLONE_NEWNS, CLONE_NEWPID, MS_REC, MS_PRIVATE = 0x00020000, 0x20000000, 0x4000, 0x40000
def fail(step):
    os.write(2, f"{step}: {os.strerror(ctypes.get_errno())}\\n".encode())
    os._exit(1)
if libc.unshare(CLONE_NEWNS | CLONE_NEWPID) != 0:
    fail("unshare(CLONE_NEWPID | CLONE_NEWNS)")
if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
    fail("making / private in the new mount namespace")
pid = os.fork()
if pid == 0:
    if os.getpid() != 1:
        os.write(2, b"the first child of the new PID namespace is not PID 1\\n")
        os._exit(1)
    if libc.mount(b"proc", sys.argv[1].encode(), b"proc", 0, None) != 0:
        fail("mounting proc inside the new PID namespace")
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Status
    finding: str
    advice: str


@dataclass(frozen=True)
class CriuFound:
    path: Path
    version: tuple[int, int, int]


@dataclass(frozen=True)
class CommandOutput:
    returncode: int
    output: str


class CommandFailedToRun(Exception):
    pass


def run_command(argv: list[str]) -> CommandOutput:
    """Run `argv` with stdout and stderr together; raise CommandFailedToRun if it cannot finish."""
    try:
        result = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailedToRun(
            f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT_SECONDS:.0f} s"
        ) from exc
    except OSError as exc:
        raise CommandFailedToRun(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    return CommandOutput(result.returncode, result.stdout)


def check_criu_binary(configured: Path | None) -> tuple[CheckResult, CriuFound | None]:
    name = "criu"
    try:
        path = find_criu(configured)
    except CriuNotFound as exc:
        return CheckResult(name, Status.FAIL, "not found", str(exc)), None
    try:
        version = criu_version(path)
    except CriuVersionUnknown as exc:
        return CheckResult(name, Status.FAIL, str(exc), INSTALL_ADVICE), None
    found = CriuFound(path, version)
    if version < MIN_CRIU_VERSION:
        finding = (
            f"{format_version(version)} at {path}, older than {format_version(MIN_CRIU_VERSION)}"
        )
        advice = f"older CRIU fails on recent kernels; {INSTALL_ADVICE}"
        return CheckResult(name, Status.FAIL, finding, advice), found
    finding = f"{format_version(version)} at {path}"
    return CheckResult(name, Status.OK, finding, "recent enough"), found


def check_criu_check(criu: CriuFound | None) -> CheckResult:
    name = "criu check"
    if criu is None:
        return CheckResult(name, Status.FAIL, "not run: no usable criu", INSTALL_ADVICE)
    try:
        result = run_command([str(criu.path), "check"])
    except CommandFailedToRun as exc:
        return CheckResult(name, Status.FAIL, str(exc), "find out why criu does not answer")
    verdict = interpret_criu_check(result.returncode, result.output)
    advice = {
        Status.OK: "the kernel has what CRIU needs",
        Status.WARN: f"run `{criu.path} check` and read its output",
        Status.FAIL: f"checkpoints will fail until `{criu.path} check` passes",
    }[verdict.status]
    return CheckResult(name, verdict.status, verdict.finding, advice)


def check_pycriu(criu: CriuFound | None) -> CheckResult:
    name = "pycriu"
    install = f"run contrib/install-criu --venv {sys.prefix}"
    try:
        pycriu = importlib.import_module("pycriu")
    except Exception as exc:  # a broken install can raise anything at import time
        finding = f"cannot be imported by {sys.executable}: {exc}"
        return CheckResult(name, Status.FAIL, finding, install)
    version_text = getattr(pycriu, "__version__", None)
    if not hasattr(pycriu, "criu") or not isinstance(version_text, str):
        finding = f"the pycriu at {pycriu.__file__} is not CRIU's"
        return CheckResult(name, Status.FAIL, finding, f"pip uninstall pycriu, then {install}")
    try:
        version = parse_version_number(version_text)
    except UnreadableOutputError as exc:
        return CheckResult(name, Status.WARN, str(exc), install)
    if criu is not None and version != criu.version:
        finding = f"{version_text}, but CRIU is {format_version(criu.version)}"
        return CheckResult(name, Status.WARN, finding, f"{install} to match them")
    return CheckResult(name, Status.OK, version_text, "the supervisor can drive CRIU")


def check_root() -> CheckResult:
    uid = os.geteuid()
    if uid == 0:
        return CheckResult("root", Status.OK, "running as root", "CRIU can run")
    return CheckResult("root", Status.FAIL, f"running as uid {uid}", PRIVILEGE_ADVICE)


def check_capabilities(kernel: tuple[int, int] | None) -> list[CheckResult]:
    try:
        capabilities = decode_capabilities(parse_cap_eff(Path("/proc/self/status").read_text()))
    except (OSError, UnreadableOutputError) as exc:
        return [CheckResult("capabilities", Status.FAIL, f"unknown: {exc}", PRIVILEGE_ADVICE)]
    results = []
    for capability, needed_for in REQUIRED_CAPABILITIES.items():
        name = f"capability {capability}"
        if capability in capabilities:
            results.append(CheckResult(name, Status.OK, "present", needed_for))
        elif (
            capability == "CAP_CHECKPOINT_RESTORE"
            and kernel is not None
            and kernel < CHECKPOINT_RESTORE_CAP_KERNEL
        ):
            finding = "not in kernels before 5.9"
            results.append(CheckResult(name, Status.OK, finding, "CAP_SYS_ADMIN covers it"))
        else:
            advice = f"{needed_for}; {PRIVILEGE_ADVICE}"
            results.append(CheckResult(name, Status.FAIL, "missing", advice))
    name = "capability CAP_SYS_RESOURCE"
    if "CAP_SYS_RESOURCE" in capabilities:
        advice = "programs running as another user can be checkpointed"
        results.append(CheckResult(name, Status.OK, "present", advice))
    else:
        results.append(CheckResult(name, Status.WARN, "missing", CAP_SYS_RESOURCE_ADVICE))
    return results


def check_namespaces() -> CheckResult:
    name = "PID and mount namespaces"
    with tempfile.TemporaryDirectory(prefix="grenadine-sv-doctor-") as proc_dir:
        try:
            result = run_command([sys.executable, "-c", _NAMESPACE_PROBE, proc_dir])
        except CommandFailedToRun as exc:
            return CheckResult(name, Status.FAIL, str(exc), "programs cannot be sandboxed")
    if result.returncode != 0:
        finding = result.output.strip().splitlines()[-1] if result.output.strip() else "failed"
        advice = f"programs cannot be sandboxed; {PRIVILEGE_ADVICE} (check seccomp and AppArmor)"
        return CheckResult(name, Status.FAIL, finding, advice)
    finding = "created, with / private and a fresh /proc"
    return CheckResult(name, Status.OK, finding, "programs can be sandboxed")


def _criu_feature(criu: CriuFound, feature: str) -> CommandOutput:
    return run_command([str(criu.path), "check", "--feature", feature])


def check_soft_dirty(criu: CriuFound | None) -> CheckResult:
    name = "soft-dirty tracking"
    unavailable = "incremental (pre-dump) checkpoints are unavailable; full dumps are used"
    if criu is None:
        return CheckResult(name, Status.WARN, "not checked: no usable criu", unavailable)
    try:
        result = _criu_feature(criu, "mem_dirty_track")
    except CommandFailedToRun as exc:
        return CheckResult(name, Status.WARN, str(exc), unavailable)
    if soft_dirty_available(result.returncode, result.output):
        return CheckResult(name, Status.OK, "on", "incremental (pre-dump) checkpoints can work")
    return CheckResult(name, Status.WARN, "off in this kernel", unavailable)


def check_lazy_restore(criu: CriuFound | None) -> CheckResult:
    name = "lazy restore"
    unavailable = "a restore copies all memory before the program runs again"
    if criu is None:
        return CheckResult(name, Status.WARN, "not checked: no usable criu", unavailable)
    try:
        result = _criu_feature(criu, "uffd-noncoop")
    except CommandFailedToRun as exc:
        return CheckResult(name, Status.WARN, str(exc), unavailable)
    if feature_supported(result.returncode, result.output, "uffd-noncoop"):
        advice = "a restored program can run before all its memory is copied"
        return CheckResult(name, Status.OK, "supported (userfaultfd, uffd-noncoop)", advice)
    return CheckResult(name, Status.WARN, "not supported (no uffd-noncoop)", unavailable)


def check_criu_cache(
    mounts_file: Path = Path("/proc/self/mounts"), cache_dir: Path = CRIU_CACHE_DIR
) -> CheckResult:
    """CRIU (run as root) keeps what it probed of the kernel in /run/criu.kdat, and only on
    a tmpfs; elsewhere every CRIU run probes again. It writes criu.kdat.tmp first (O_EXCL)
    and renames it: one left by a CRIU killed in between keeps every later run from saving
    the cache."""
    name = "criu kernel cache"
    try:
        fs_type = filesystem_type_of(str(cache_dir), mounts_file.read_text())
    except OSError as exc:
        return CheckResult(name, Status.WARN, f"cannot read {mounts_file}: {exc.strerror}", "")
    slower = "every CRIU run (dump, restore, lazy-pages) probes the kernel again, tens of ms each"
    if fs_type != "tmpfs":
        finding = f"{cache_dir} is not a tmpfs ({fs_type or 'no mount found'}): CRIU keeps no cache"
        advice = f"{slower} (more on a loaded host): mount a tmpfs on {cache_dir}"
        return CheckResult(name, Status.WARN, finding, advice)
    cache, left = cache_dir / CRIU_CACHE_NAME, cache_dir / f"{CRIU_CACHE_NAME}.tmp"
    if not cache.exists() and left.exists():
        finding = f"{left} was left by a CRIU run stopped while it saved the cache"
        advice = f"no CRIU run can save it until that file is gone, so {slower}: remove {left}"
        return CheckResult(name, Status.WARN, finding, advice)
    return CheckResult(name, Status.OK, f"{cache_dir} is a tmpfs", "")


def check_init() -> CheckResult:
    name = "sandbox init"
    if not os.access(TINI, os.X_OK):
        advice = "programs with init = true cannot start: apt-get install tini"
        return CheckResult(name, Status.WARN, f"{TINI} is missing", advice)
    try:
        result = run_command([TINI, "--version"])
    except CommandFailedToRun as exc:
        return CheckResult(name, Status.WARN, str(exc), "programs with init = true may not start")
    version = result.output.strip() or "version unknown"
    advice = "forwards signals to each program; an upgrade of tini makes existing images unusable"
    return CheckResult(name, Status.OK, f"{TINI} ({version})", advice)


def check_network_lock(criu: CriuFound | None) -> CheckResult:
    name = "network lock"
    if criu is None:
        return CheckResult(name, Status.WARN, "not checked: no usable criu", "")
    locks = probe_network_locks(criu.path)
    chosen = locks.choose("auto")
    if chosen is None:
        advice = (
            "checkpoint.tcp_established cannot work: install iptables, or set"
            ' checkpoint.network_lock = "skip" (peers may see resets)'
        )
        return CheckResult(name, Status.WARN, "neither nftables (in CRIU) nor iptables", advice)
    works = [
        lock for lock, ok in (("nftables", locks.nftables), ("iptables", locks.iptables)) if ok
    ]
    finding = f"{' and '.join(works)} work{'s' if len(works) == 1 else ''}"
    return CheckResult(name, Status.OK, finding, f'network_lock = "auto" uses {chosen}')


def check_kernel(release: str, kernel: tuple[int, int] | None) -> CheckResult:
    name = "kernel"
    if kernel is None:
        return CheckResult(name, Status.WARN, f"{release}: version not understood", "")
    if kernel < OLDEST_KERNEL_FOR_CRIU:
        return CheckResult(name, Status.FAIL, release, "CRIU needs Linux 3.11 or later")
    if kernel < CHECKPOINT_RESTORE_CAP_KERNEL:
        advice = "Linux 5.9 or later is recommended (newer CRIU features need it)"
        return CheckResult(name, Status.WARN, release, advice)
    return CheckResult(name, Status.OK, release, "recent enough for CRIU")


def run_checks(criu_path: Path | None = None) -> tuple[list[CheckResult], CriuFound | None]:
    release = os.uname().release
    try:
        kernel: tuple[int, int] | None = parse_kernel_version(release)
    except UnreadableOutputError:
        kernel = None
    criu_result, criu = check_criu_binary(criu_path)
    results = [
        criu_result,
        check_criu_check(criu),
        check_pycriu(criu),
        check_root(),
        *check_capabilities(kernel),
        check_namespaces(),
        check_init(),
        check_network_lock(criu),
        check_soft_dirty(criu),
        check_lazy_restore(criu),
        check_criu_cache(),
        check_kernel(release, kernel),
    ]
    return results, criu


def format_check_line(result: CheckResult) -> str:
    line = f"{result.status.value:<4}  {result.check}: {result.finding}"
    return f"{line} — {result.advice}" if result.advice else line


def run_doctor(as_json: bool, out: TextIO, criu_path: Path | None = None) -> int:
    """Report on this host; 0 when checkpoint and restore can work here (no FAIL), else 1."""
    results, criu = run_checks(criu_path)
    ok = all(result.status is not Status.FAIL for result in results)
    if as_json:
        report = {
            "ok": ok,
            "criu_path": str(criu.path) if criu else None,
            "criu_version": format_version(criu.version) if criu else None,
            "checks": [
                {
                    "check": r.check,
                    "status": r.status.value,
                    "finding": r.finding,
                    "advice": r.advice,
                }
                for r in results
            ],
        }
        json.dump(report, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        for result in results:
            out.write(format_check_line(result) + "\n")
        failed = sum(result.status is Status.FAIL for result in results)
        if ok:
            out.write("checkpoint and restore can work on this host\n")
        else:
            lines = "the FAIL line is" if failed == 1 else f"the {failed} FAIL lines are"
            out.write(f"checkpoint and restore will not work here until {lines} fixed\n")
    return 0 if ok else 1
