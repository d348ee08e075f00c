"""Real daemons from Debian's packages, unmodified, each holding state in memory: checkpointed,
stopped, restored (with `restore`, then by a fresh supervisor with restore = "latest"), and
checked for that state. Each test records a row of docs/COMPATIBILITY.md (tests/integration/
compat.py; `contrib/bootstrap compat` prints the table)."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.core import Supervisor
from tests.conftest import SupervisorDirs, free_port
from tests.integration.compat import CompatRow
from tests.integration.services import ping, pong_client
from tests.integration.supervising import (
    PYTHON,
    children_of,
    running_supervisor,
    wait_state,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]

DAEMONS = Path(__file__).with_name("daemons")
START_TIMEOUT = 90.0


def version_of(argv: list[str], pick: Callable[[str], str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    return pick(done.stdout + done.stderr)


def require(command: str) -> str:
    found = shutil.which(command)
    if found is None:
        pytest.skip(f"{command} is not installed (contrib/bootstrap setup installs it)")
    return found


@pytest.fixture
def row(request: pytest.FixtureRequest) -> Iterator[CompatRow]:
    marker = request.node.get_closest_marker("compat")
    assert marker is not None, "a daemon test names its program with @pytest.mark.compat"
    recorded = CompatRow(program=marker.args[0], version="", notes=marker.kwargs["notes"])
    yield recorded
    recorded.write()


def http_get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return str(answer.read().decode())


@dataclass
class Daemon:
    """A program table and how to give the program state and check it kept it."""

    name: str
    table: str
    """The [programs.NAME] keys (not restore), then any [programs.NAME.checkpoint] keys."""
    put_state: Callable[[], object]
    check_state: Callable[[object], None]
    """Gets what put_state returned; fails unless the program has that state."""
    prompt_stop: bool = True
    running: Callable[[int], None] = lambda pid: None
    """Told the pid of each instance once it is RUNNING, before put_state or check_state."""

    def config(self, sv_dirs: SupervisorDirs, *, restore_latest: bool = False) -> Path:
        restore = 'restore = "latest"\nrestore_fallback = "fail"\n' if restore_latest else ""
        head, _, checkpoint = self.table.partition("[checkpoint]\n")
        program = f"[programs.{self.name}]\n{head}{restore}"
        return sv_dirs.write_config(program + f"[programs.{self.name}.checkpoint]\n{checkpoint}")


@asynccontextmanager
async def supervising(
    config: Path, name: str, running: Callable[[int], None] = lambda pid: None
) -> AsyncIterator[Supervisor]:
    async with running_supervisor(config) as sv:
        running(await wait_state(sv, name, State.RUNNING, timeout=START_TIMEOUT))
        yield sv


async def stop_promptly(sv: Supervisor, daemon: Daemon) -> None:
    runner = sv.programs.runners[daemon.name]
    with capture_logs() as logs:
        assert await runner.stop(runner.stop_timeout_bound()) == State.STOPPED
    if daemon.prompt_stop:
        assert not [entry for entry in logs if entry["event"] == "stop_timeout_kill"]
        assert runner.machine.last_exit != -9, "stopped by SIGKILL after stopwaitsecs"


async def checkpoint_stop_restore_fresh(
    sv_dirs: SupervisorDirs, daemon: Daemon, row: CompatRow
) -> None:
    """Checkpoint (leave running), stop, `restore` and check; then a fresh supervisor with
    restore = "latest" brings the same image back, checked again."""
    async with supervising(daemon.config(sv_dirs), daemon.name, daemon.running) as sv:
        state = daemon.put_state()
        [entry] = await sv.operations.checkpoint_programs([daemon.name], stop=False)
        assert entry["ok"], entry
        row.passed_step("checkpoint")
        await stop_promptly(sv, daemon)
        restored = await sv.operations.restore_program(daemon.name, "latest")
        assert restored["fallback"] is None, restored["fallback"]
        daemon.running(await wait_state(sv, daemon.name, State.RUNNING, timeout=START_TIMEOUT))
        daemon.check_state(state)
        row.passed_step("restore")
        await stop_promptly(sv, daemon)
    config = daemon.config(sv_dirs, restore_latest=True)
    with capture_logs() as logs:
        async with supervising(config, daemon.name, daemon.running):
            assert [entry for entry in logs if entry["event"] == "restore_done"]
            daemon.check_state(state)
            row.passed_step("fresh supervisor")


# redis -------------------------------------------------------------------------------------


@pytest.mark.compat("redis", notes='`--save ""`: no RDB file; a key and a counter in memory')
async def test_redis(sv_dirs: SupervisorDirs, row: CompatRow):
    redis = require("redis-server")
    row.version = version_of([redis, "--version"], lambda out: out.split()[2].removeprefix("v="))
    port = free_port()

    def redis_says(*words: str) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(f"*{len(words)}\r\n".encode())
            for word in words:
                conn.sendall(f"${len(word)}\r\n{word}\r\n".encode())
            return conn.recv(4096)

    def put() -> object:
        assert redis_says("SET", "greeting", "hello") == b"+OK\r\n"
        for _ in range(3):
            redis_says("INCR", "hits")
        return None

    def check(_: object) -> None:
        assert redis_says("GET", "greeting") == b"$5\r\nhello\r\n"
        assert redis_says("GET", "hits") == b"$1\r\n3\r\n"

    command = json.dumps([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", ""])
    daemon = Daemon(
        "redis",
        f'command = {command}\nready = {{ tcp = "127.0.0.1:{port}" }}\n',
        put,
        check,
    )
    await checkpoint_stop_restore_fresh(sv_dirs, daemon, row)


# nginx -------------------------------------------------------------------------------------

NGINX_CONF = """
user root;
worker_processes 2;
pid /tmp/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path /tmp/client_body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "$connection\\n"; }}
    }}
}}
"""


@pytest.mark.compat(
    "nginx (master + 2 workers)",
    notes='`user root;` (workers as www-data need CAP_SYS_RESOURCE); `-g "daemon off;"`;'
    " the connection counter lives in shared memory",
)
async def test_nginx_master_and_workers(sv_dirs: SupervisorDirs, row: CompatRow):
    nginx = require("nginx")
    row.version = version_of([nginx, "-v"], lambda out: out.strip().split("/")[-1].split()[0])
    port = free_port()
    conf_dir = sv_dirs.root / "nginx"
    conf_dir.mkdir()
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(port=port))
    instance: dict[str, int] = {}

    def master_and_two_workers() -> None:
        [master] = children_of(instance["pid"])
        assert len(children_of(master)) == 2, "a master and two workers"

    def put() -> object:
        for _ in range(20):
            number = int(http_get(port))
        master_and_two_workers()
        return number

    def check(last: object) -> None:
        assert isinstance(last, int)
        assert int(http_get(port)) > last, "the connection counter went on, not from 1"
        master_and_two_workers()

    command = json.dumps([nginx, "-c", str(conf), "-g", "daemon off;"])
    daemon = Daemon(
        "nginx",
        f'command = {command}\nbinds = ["{conf_dir}"]\nready = {{ tcp = "127.0.0.1:{port}" }}\n',
        put,
        check,
        running=lambda pid: instance.update(pid=pid),
    )
    await checkpoint_stop_restore_fresh(sv_dirs, daemon, row)


# node --------------------------------------------------------------------------------------

NODE_COUNTER = (
    "let hits = 0;"
    "require('http').createServer((req, res) => res.end(String(++hits)))"
    ".listen(Number(process.argv[1]), '127.0.0.1');"
)


def counting(port: int, times: int) -> Callable[[], object]:
    def put() -> object:
        for _ in range(times):
            count = int(http_get(port))
        return count

    return put


def next_count(port: int) -> Callable[[object], None]:
    def check(last: object) -> None:
        assert int(http_get(port)) == last + 1  # type: ignore[operator]

    return check


def http_counter(name: str, argv: list[str], port: int, hits: int, ready: str = "") -> Daemon:
    """A service that answers each HTTP request on `port` with its count of requests so far:
    `hits` requests before the checkpoint, then the count goes on from there."""
    return Daemon(
        name,
        f'command = {json.dumps(argv)}\nready = {{ tcp = "127.0.0.1:{port}"{ready} }}\n',
        counting(port, hits),
        next_count(port),
    )


@pytest.mark.compat(
    "node", notes="the `nodejs` package; no SIGTERM handler: stops at once under the init"
)
async def test_node(sv_dirs: SupervisorDirs, row: CompatRow):
    node = require("node")
    row.version = version_of([node, "--version"], lambda out: out.strip().removeprefix("v"))
    port = free_port()
    daemon = http_counter("node", [node, "-e", NODE_COUNTER, str(port)], port, 3)
    await checkpoint_stop_restore_fresh(sv_dirs, daemon, row)


# OpenJDK -----------------------------------------------------------------------------------


@pytest.mark.compat(
    "OpenJDK (`java Counter.java`)",
    notes="default flags; its hsperfdata file lives in the program's private /tmp",
)
async def test_openjdk_single_source_http_service(sv_dirs: SupervisorDirs, row: CompatRow):
    java = require("java")
    row.version = version_of(
        [java, "-version"], lambda out: out.splitlines()[0].split('"')[1] if '"' in out else out
    )
    port = free_port()
    command = [java, str(DAEMONS / "Counter.java"), str(port)]
    daemon = http_counter("java", command, port, 3, ready=', timeout = "60s"')
    await checkpoint_stop_restore_fresh(sv_dirs, daemon, row)


# python http.server, prefork -------------------------------------------------------------

PREFORK = """
import mmap, os, signal, socket, struct, sys, time
hits = mmap.mmap(-1, 8)  # shared by the workers: MAP_SHARED | MAP_ANONYMOUS
server = socket.create_server(('127.0.0.1', int(sys.argv[1])))
workers = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            conn, _ = server.accept()
            if not conn.recv(1024):  # a readiness probe: connected, asked nothing
                conn.close()
                continue
            count = struct.unpack('q', hits[:8])[0] + 1
            hits[:8] = struct.pack('q', count)
            body = str(count).encode()
            conn.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(body) + body)
            conn.close()
    workers.append(pid)
def stop(*_):
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(3600)
"""


@pytest.mark.compat(
    "forking Python service (prefork)",
    notes="a parent and two workers sharing a counter in shared anonymous memory",
)
async def test_forking_service(sv_dirs: SupervisorDirs, row: CompatRow):
    row.version = f"Python {sys.version.split()[0]}"
    port = free_port()
    daemon = http_counter("prefork", [PYTHON, "-c", PREFORK, str(port)], port, 4)
    await checkpoint_stop_restore_fresh(sv_dirs, daemon, row)


@pytest.mark.compat(
    "`python3 -m http.server`",
    notes="no SIGTERM handler: stops at once under the init (state: none but its socket)",
)
async def test_python_http_server(sv_dirs: SupervisorDirs, row: CompatRow):
    row.version = f"Python {sys.version.split()[0]}"
    port = free_port()
    command = json.dumps([PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(port)])

    def check(_: object) -> None:
        assert "Directory listing" in http_get(port)

    daemon = Daemon(
        "httpserver",
        f'command = {command}\ndirectory = "/usr/share"\nready = {{ tcp = "127.0.0.1:{port}" }}\n',
        lambda: None,
        check,
    )
    await checkpoint_stop_restore_fresh(sv_dirs, daemon, row)


# sqlite in WAL mode ------------------------------------------------------------------------


@pytest.mark.compat(
    "Python + sqlite (WAL), stopped cleanly",
    notes="database in the private /tmp, held open with its locks (`checkpoint.file_locks`,"
    " on by default)",
)
async def test_python_sqlite_wal_service_stopped_cleanly(sv_dirs: SupervisorDirs, row: CompatRow):
    from tests.integration.services import ask, sqlite_counter

    row.version = f"Python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}"
    port = free_port()
    command = sqlite_counter("/tmp/counter.db", port)

    def put() -> object:
        for _ in range(3):
            rows, served = ask(port)
        return rows, served

    def check(last: object) -> None:
        rows, served = last  # type: ignore[misc]
        assert ask(port) == (rows + 1, served + 1)

    daemon = Daemon(
        "sqlite",
        f'command = {command}\nready = {{ tcp = "127.0.0.1:{port}" }}\n',
        put,
        check,
    )
    await checkpoint_stop_restore_fresh(sv_dirs, daemon, row)


# a TCP client ------------------------------------------------------------------------------


@pytest.mark.compat(
    "TCP client, established connection",
    notes="`checkpoint.tcp_established = true`; checkpointed with `--stop` (a clean stop would"
    " close the connection)",
)
async def test_tcp_client_keeps_its_connection(sv_dirs: SupervisorDirs, row: CompatRow):
    row.version = f"Python {sys.version.split()[0]}"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        daemon = Daemon(
            "client",
            f"command = {pong_client(port)}\nstartsecs = 0.2\n"
            "[checkpoint]\ntcp_established = true\n",
            lambda: None,
            lambda _: None,
        )
        async with running_supervisor(daemon.config(sv_dirs)) as sv:
            await wait_state(sv, "client", State.RUNNING)
            peer, _ = listener.accept()
            peer.settimeout(10)
            assert [ping(peer) for _ in range(3)] == [1, 2, 3]
            [entry] = await sv.operations.checkpoint_programs(["client"], stop=True)
            assert entry["ok"], entry
            row.passed_step("checkpoint")
            await sv.operations.restore_program("client", "latest")
            await wait_state(sv, "client", State.RUNNING)
            assert ping(peer) == 4, "the same connection and count"
            row.passed_step("restore")
            # The supervisor exits with the program checkpointed and stopped...
            [entry] = await sv.operations.checkpoint_programs(["client"], stop=True)
            assert entry["ok"], entry
        with peer:
            # ... and the next one restores it, its connection still open.
            async with supervising(daemon.config(sv_dirs, restore_latest=True), "client"):
                assert ping(peer) == 5
                row.passed_step("fresh supervisor")
