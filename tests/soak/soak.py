"""Soak run: a real supervisor with 30 programs that crash, are checkpointed and restored, for
minutes; its fd count and memory are sampled and compared from start to end.

    .venv/bin/python -m tests.soak.soak --minutes 10

Not part of the test suite (root, CRIU and minutes of wall time needed). Exit status 0 when
the supervisor survived and neither its fds nor its memory grew; 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from grenadine_sv.control import client as control
from grenadine_sv.control import protocol
from grenadine_sv.sandbox.cgroup import ProgramCgroups
from tests.conftest import free_port

PYTHON = sys.executable
COUNTER_SERVICE = Path(__file__).resolve().parents[2] / "examples" / "python-counter" / "counter.py"
TICKERS = 10
CRASHERS = 10
SERVERS = 10
# Figures are taken as "start" once this share of the run has passed: the first rounds of
# checkpoints and restores allocate caches and thread pools that are not leaks.
WARM_UP_SHARE = 0.2
SAMPLE_SECONDS = 5.0
REQUEST_TIMEOUT = 120.0
# Allowed growth from the warmed-up start to the end, by the least-squares trend.
FD_SLACK = 3
RSS_SLACK_SHARE = 0.10

TICKER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "state = bytearray(2 << 20)\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1; state[n % len(state)] = n % 256; print('tick', n, flush=True); time.sleep(0.2)\n"
)
CRASHER = (
    "import random, sys, time\n"
    "time.sleep(random.uniform(1, 6))\n"
    "print('crashing', flush=True)\n"
    "sys.exit(1)\n"
)


def python_code(code: str) -> list[str]:
    return [PYTHON, "-u", "-c", code]


def program_table(name: str, argv: list[str], extra: str = "", checkpoint: str = "") -> str:
    command = json.dumps(argv)
    table = f"[programs.{name}]\ncommand = {command}\nstopwaitsecs = 2\n{extra}"
    if checkpoint:
        table += f"[programs.{name}.checkpoint]\n{checkpoint}"
    return table + "\n"


def write_config(root: Path, metrics_port: int, server_ports: list[int]) -> Path:
    tables = [
        f'[supervisor]\nstate_dir = "{root}/state"\nlog_dir = "{root}/logs"\n'
        f'control_socket = "{root}/ctl.sock"\nlog_format = "json"\n\n'
        f'[supervisor.metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    ]
    for i in range(TICKERS):
        tables.append(
            program_table(
                f"ticker{i}",
                python_code(TICKER),
                "startsecs = 0.5\n",
                "on_signal = true\nkeep = 2\n",
            )
        )
    for i in range(CRASHERS):
        tables.append(
            program_table(
                f"crasher{i}",
                python_code(CRASHER),
                "startsecs = 0.5\nautorestart = 'always'\n",
                "on_signal = true\nkeep = 1\n",
            )
        )
    for i, port in enumerate(server_ports):
        tables.append(
            program_table(
                f"server{i}",
                [PYTHON, "-u", os.fspath(COUNTER_SERVICE), "--port", str(port)],
                f'ready = {{ tcp = "127.0.0.1:{port}" }}\n',
                'interval = "15s"\nkeep = 2\n',
            )
        )
    config = root / "grenadine.toml"
    config.write_text("\n".join(tables))
    return config


@dataclass
class Sample:
    elapsed: float
    fds: int
    rss_kib: int
    threads: int
    zombie_children: int


def sample(pid: int, began: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    zombies = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        for child in children:
            try:
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                continue
            zombies += state == "Z"
    return Sample(
        elapsed=time.monotonic() - began,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss_kib=int(fields["VmRSS"].split()[0]),
        threads=int(fields["Threads"]),
        zombie_children=zombies,
    )


def metric_totals(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total"):
                totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


class Soak:
    def __init__(self, root: Path, minutes: float, seed: int) -> None:
        self.root = root
        self.duration = minutes * 60
        self.random = random.Random(seed)
        self.metrics_port = free_port()
        self.server_ports = [free_port() for _ in range(SERVERS)]
        self.config = write_config(root, self.metrics_port, self.server_ports)
        self.socket = root / "ctl.sock"
        self.actions: Counter[str] = Counter()
        self.status_seconds: list[float] = []
        self.supervisor_pid = 0

    def request(self, command: str, **args: Any) -> Any:
        began = time.monotonic()
        try:
            return control.request(self.socket, command, args, timeout=REQUEST_TIMEOUT)
        except protocol.ControlError as exc:
            self.actions[f"{command} refused"] += 1
            print(f"  {command} {args}: {exc}", file=sys.stderr)
            return None
        except TimeoutError:
            # Counted, not fatal: on a loaded machine a request can wait behind a signal round.
            self.actions[f"{command} timed out"] += 1
            print(f"  {command} {args}: no answer in {REQUEST_TIMEOUT:g} s", file=sys.stderr)
            return None
        finally:
            if command == "status":
                self.status_seconds.append(time.monotonic() - began)

    def run(self) -> int:
        stderr = (self.root / "supervisor.log").open("wb")
        supervisor = subprocess.Popen(
            [PYTHON, "-m", "grenadine_sv", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        self.supervisor_pid = supervisor.pid
        try:
            return self._drive(supervisor)
        finally:
            if supervisor.poll() is None:
                supervisor.send_signal(signal.SIGTERM)
                try:
                    supervisor.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    supervisor.kill()
                    supervisor.wait()
                    end_what_a_killed_supervisor_left(self.root)
            stderr.close()

    def _drive(self, supervisor: subprocess.Popen[bytes]) -> int:
        deadline = time.monotonic() + 60
        while control.answering_pid(self.socket) != supervisor.pid:
            if supervisor.poll() is not None or time.monotonic() > deadline:
                print("the supervisor did not start; see supervisor.log", file=sys.stderr)
                return 1
            time.sleep(0.2)
        began = time.monotonic()
        samples = [sample(supervisor.pid, began)]
        warm_up_at = began + self.duration * WARM_UP_SHARE
        warmed: Sample | None = None
        next_sample = began + SAMPLE_SECONDS
        while (now := time.monotonic()) < began + self.duration:
            if supervisor.poll() is not None:
                print(f"the supervisor exited with {supervisor.returncode}", file=sys.stderr)
                return 1
            self._one_step()
            if now >= next_sample:
                samples.append(sample(supervisor.pid, began))
                next_sample += SAMPLE_SECONDS
                if warmed is None and now >= warm_up_at:
                    warmed = samples[-1]
            time.sleep(self.random.uniform(0.2, 0.6))
        end = sample(supervisor.pid, began)
        samples.append(end)
        totals = metric_totals(self.metrics_port)
        statuses = self.request("status") or []
        supervisor.send_signal(signal.SIGTERM)
        exit_code = supervisor.wait(timeout=120)
        leftovers = [e["pid"] for e in statuses if e.get("pid") and _alive(e["pid"])]
        return self._report(
            samples,
            start=warmed or samples[0],
            end=end,
            totals=totals,
            exit_code=exit_code,
            leftovers=leftovers,
        )

    def _one_step(self) -> None:
        """One random action, like an operator (and cron jobs) would do."""
        choice = self.random.random()
        if choice < 0.25:
            os.kill(self.supervisor_pid, signal.SIGUSR1)
            self.actions["SIGUSR1"] += 1
        elif choice < 0.45:
            name = f"server{self.random.randrange(SERVERS)}"
            self.request("restore", name=name, image="latest")
            self.actions["restore"] += 1
        elif choice < 0.55:
            name = f"ticker{self.random.randrange(TICKERS)}"
            self.request("checkpoint", names=[name], stop=True)
            self.request("restore", name=name, image="latest")
            self.actions["checkpoint --stop + restore"] += 1
        elif choice < 0.65:
            self.request("restart", names=[f"ticker{self.random.randrange(TICKERS)}"])
            self.actions["restart"] += 1
        elif choice < 0.70:
            self.request("prune", keep=1)
            self.actions["prune"] += 1
        else:
            self.request("status")
            self.actions["status"] += 1

    def _report(
        self,
        samples: list[Sample],
        *,
        start: Sample,
        end: Sample,
        totals: dict[str, float],
        exit_code: int,
        leftovers: list[int],
    ) -> int:
        print(f"soak: {len(samples)} samples over {end.elapsed:.0f} s, 30 programs")
        print(f"{'t (s)':>7} {'fds':>5} {'RSS (KiB)':>10} {'threads':>8} {'zombies':>8}")
        for s in samples:
            print(
                f"{s.elapsed:7.0f} {s.fds:5d} {s.rss_kib:10d} {s.threads:8d} {s.zombie_children:8d}"
            )
        print("actions:", dict(self.actions))
        causes = failed_checkpoint_causes(self.root / "supervisor.log")
        print(f"failed checkpoints by cause ({sum(causes.values())}):")
        for cause, count in causes.most_common():
            print(f"  {count:6d}  {cause}")
        for name in sorted(totals):
            print(f"  {name} {totals[name]:.0f}")
        if self.status_seconds:
            print(f"status latency: max {max(self.status_seconds) * 1000:.0f} ms")
        state_files = sum(1 for _ in (self.root / "state").rglob("*"))
        print(f"files under state_dir at the end: {state_files}")
        # Judged on the trend, not on two samples: the fds and RSS of one sample move with the
        # programs that happen to be restarting and the dumps in flight at that moment.
        after = [x for x in samples if x.elapsed >= start.elapsed]
        fd_growth, rss_growth = growth_after(start, after)
        print(
            f"after warm-up (t={start.elapsed:.0f} s) to end: fds {start.fds} -> {end.fds}, "
            f"RSS {start.rss_kib} -> {end.rss_kib} KiB; by the trend fds {fd_growth:+d}, "
            f"RSS {rss_growth:+.1%}"
        )
        print(f"supervisor exit status {exit_code}; programs left running: {leftovers or 'none'}")
        failed = (
            exit_code != 0
            or leftovers
            or fd_growth > FD_SLACK
            or rss_growth > RSS_SLACK_SHARE
            or end.zombie_children > 0
        )
        print(f"RSS trend after warm-up: {rss_slope(after) * 60:+.0f} KiB per minute")
        for first, last, window_slope in rss_slope_by_window(samples, start.elapsed):
            minutes = f"{first / 60:5.0f} to {last / 60:5.0f} min"
            print(f"  {minutes}: {window_slope * 60:+.0f} KiB per minute")
        limits = f"limits: fds +{FD_SLACK}, RSS +{RSS_SLACK_SHARE:.0%}, no zombie, exit 0"
        print("verdict:", "FAILED" if failed else "within", limits)
        return 1 if failed else 0


# Variable parts of a failure message: pids, image ids, paths, figures.
_VARIABLE = (
    (re.compile(r"[0-9a-f]{32}"), "ID"),
    (re.compile(r"(?<![\w.])/[^\s:;,)]+"), "PATH"),
    (re.compile(r"\d+(\.\d+)?"), "N"),
)


def failure_cause(message: str) -> str:
    """A failure message with its variable parts replaced, so that equal causes count together."""
    for pattern, replacement in _VARIABLE:
        message = pattern.sub(replacement, message)
    return message


def failed_checkpoint_causes(log_path: Path) -> Counter[str]:
    """How many checkpoints failed, by cause, from the supervisor's JSON log: every
    `checkpoint_failed` line, and the policy-driven checkpoints that were skipped."""
    causes: Counter[str] = Counter()
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return causes
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("event") == "checkpoint_failed":
            program = re.sub(r"\d+$", "", str(entry.get("program", "")))
            causes[f"{program}: {failure_cause(str(entry.get('error', '?')))}"] += 1
    return causes


def slope(samples: list[Sample], value: Callable[[Sample], float]) -> float:
    """Least-squares trend of `value` per second."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(x.elapsed for x in samples) / n
    mean_v = sum(value(x) for x in samples) / n
    spread = sum((x.elapsed - mean_t) ** 2 for x in samples)
    covariance = sum((x.elapsed - mean_t) * (value(x) - mean_v) for x in samples)
    return covariance / spread if spread else 0.0


def growth_after(start: Sample, samples: list[Sample]) -> tuple[int, float]:
    """The fds gained and the RSS share gained from `start` to the last of `samples`, by
    their least-squares trends."""
    span = samples[-1].elapsed - start.elapsed if samples else 0.0
    fds = round(slope(samples, lambda x: x.fds) * span)
    return fds, rss_slope(samples) * span / start.rss_kib


def rss_slope(samples: list[Sample]) -> float:
    """Least-squares RSS trend in KiB per second."""
    return slope(samples, lambda x: x.rss_kib)


def rss_slope_by_window(
    samples: list[Sample], warmed_at: float, windows: int = 4
) -> list[tuple[float, float, float]]:
    """The RSS trend in each of `windows` equal spans after warm-up, as (start s, end s, KiB
    per second): a leak keeps the same slope in every span, a warm-up that levels off does not."""
    after = [x for x in samples if x.elapsed >= warmed_at]
    if len(after) < 2 * windows:
        return []
    span = (after[-1].elapsed - warmed_at) / windows
    trends = []
    for i in range(windows):
        first, last = warmed_at + i * span, warmed_at + (i + 1) * span
        window = [x for x in after if first <= x.elapsed <= last]
        trends.append((first, last, rss_slope(window)))
    return trends


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def end_what_a_killed_supervisor_left(root: Path) -> None:
    """A supervisor killed (it did not stop on SIGTERM) leaves its programs and its stdio
    keeper running, as it should for the next one to take back: the run ends them, by its
    cgroups and by the keeper's pid in its log."""
    cgroups = ProgramCgroups.for_state_dir(root / "state")
    for cgroup in cgroups.existing():
        cgroup.kill()
    deadline = time.monotonic() + 30
    while any(cgroup.pids() for cgroup in cgroups.existing()) and time.monotonic() < deadline:
        time.sleep(0.1)
    cgroups.remove_empty()
    with contextlib.suppress(OSError, ValueError):
        for line in (root / "logs" / "grenadine-sv.log").read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "stdio_keeper_started":
                with contextlib.suppress(OSError):
                    if b"grenadine-keep" in Path(f"/proc/{event['pid']}/cmdline").read_bytes():
                        os.kill(event["pid"], signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the soak run needs root (namespaces, CRIU)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="gsv-soak-", dir="/tmp"))
    try:
        return Soak(root, args.minutes, args.seed).run()
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
