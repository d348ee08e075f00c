"""A CRIU killed at a deadline (the shutdown checkpoints' bound) ends its dump at once, even
when a child it forked still holds its end of the RPC socket.

CRIU's feature probes fork children that stop themselves; one such child outlived a CRIU
killed by the deadline, kept the socket open, and the dump's thread waited for an answer
forever: a supervisor that never exited after SIGTERM. A fake `criu` (a script) does the
same here, deterministically; the real one did it about once in four shutdowns with
shutdown_checkpoint_timeout = "10ms" (tests/integration/test_rewinds.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.criu]

FAKE_CRIU = """#!{python}
import os, signal, sys, time
# Like a CRIU feature probe: a child that keeps CRIU's end of the RPC socket and stops itself.
child = os.fork()
if child == 0:
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
marker = os.environ["FAKE_CRIU_CHILD"]
with open(marker + ".tmp", "w") as out:
    out.write(str(child))
os.rename(marker + ".tmp", marker)
time.sleep(600)  # never answers the dump request
"""

# Stands for a lazy-pages daemon serving another program: a `criu` of the supervisor's own,
# in a session of its own, which the cleanup after a failed dump must leave alone.
FAKE_DAEMON = """#!{python}
import time
time.sleep(600)
"""

# Runs in its own interpreter: it becomes a child subreaper, as the supervisor is.
PROBE = """
import json, os, subprocess, sys, threading, time
from pathlib import Path
from grenadine_sv.criu.client import Criu, CriuError, DumpRequest
from grenadine_sv.sandbox import become_subreaper

become_subreaper()
fake, images, marker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
daemon = subprocess.Popen([sys.argv[4]], start_new_session=True)
os.environ["FAKE_CRIU_CHILD"] = str(marker)
criu = Criu(fake)
outcome = {}

def dump():
    try:
        criu.dump(DumpRequest(pid=os.getpid(), images_dir=images, leave_running=True))
    except CriuError as exc:
        outcome["error"] = str(exc)

worker = threading.Thread(target=dump, daemon=True)
worker.start()
deadline = time.monotonic() + 30
while not marker.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
child = int(marker.read_text())
while not open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0] == "T":
    time.sleep(0.01)
killed = criu.kill_running()
worker.join(30)
daemon_alive = daemon.poll() is None
daemon.kill()
daemon.wait()
print(json.dumps({
    "killed": killed,
    "returned": not worker.is_alive(),
    "error": outcome.get("error"),
    "child_left": os.path.exists(f"/proc/{child}"),
    "daemon_alive": daemon_alive,
}))
"""


def test_a_killed_criu_whose_child_holds_the_socket_ends_the_dump(tmp_path: Path) -> None:
    """...and the cleanup ends that child, not a lazy-pages daemon serving another program."""
    fake = tmp_path / "criu"
    fake.write_text(FAKE_CRIU.format(python=sys.executable))
    fake.chmod(0o755)
    daemon = tmp_path / "daemon" / "criu"
    daemon.parent.mkdir()
    daemon.write_text(FAKE_DAEMON.format(python=sys.executable))
    daemon.chmod(0o755)
    images = tmp_path / "images"
    images.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(fake), str(images), str(tmp_path / "child"), str(daemon)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outcome = json.loads(result.stdout)
    assert outcome["killed"] == 1
    assert outcome["returned"], "the dump still waits for the killed CRIU's answer"
    assert "killed by SIGKILL" in outcome["error"]
    assert not outcome["child_left"], "CRIU's stopped child was left running"
    assert outcome["daemon_alive"], "a lazy-pages daemon (its own session) was ended too"
