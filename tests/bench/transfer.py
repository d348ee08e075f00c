"""Export/import on real images: compression ratio and throughput (on demand, never in CI).

    python -m tests.bench.transfer [--heap-mib 1024] [--memcached-mib 256]

Checkpoints memcached filled with cache entries and a Python process holding a heap of
ordinary objects, then times `export` (zstd + age, and plain tar) and `import` of each image
through the real command line. Needs root and CRIU, like the integration tests.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyrage

from grenadine_sv.store.images import ImageStore
from tests.bench.procs import wait_until

GRENADINE_SV = Path(sys.executable).with_name("grenadine-sv")
PAYLOADS = Path(__file__).resolve().parent / "payloads"
MIB = 1 << 20


def config(root: Path, port: int, heap_mib: int, memcached_mib: int, key: Path) -> Path:
    identity = pyrage.x25519.Identity.from_str(key.read_text().strip())
    path = root / "grenadine.toml"
    path.write_text(
        f"""
[supervisor]
state_dir = "{root / "state"}"
log_dir = "{root / "logs"}"
control_socket = "{root / "ctl.sock"}"
log_format = "json"
[supervisor.metrics]
listen = ""
[supervisor.remote.encryption]
recipients = ["{identity.to_public()}"]
identity_file = "{key}"

[programs.memcached]
command = ["/usr/bin/memcached", "-u", "root", "-l", "127.0.0.1", "-p", "{port}",
           "-m", "{memcached_mib + 64}"]
ready = {{ tcp = "127.0.0.1:{port}", timeout = "10s" }}

[programs.heap]
command = ["{sys.executable}", "-u", "{PAYLOADS / "python_heap.py"}", "{heap_mib}"]
startsecs = 0
"""
    )
    return path


def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [GRENADINE_SV, "-c", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"grenadine-sv {' '.join(args)} failed: {done.stderr}")
    return done


def fill_memcached(port: int, mebibytes: int) -> int:
    """Cache entries like a web application's: JSON-ish text with varying fields."""
    rng = random.Random(7)
    written = items = 0
    with socket.create_connection(("127.0.0.1", port)) as conn:
        while written < mebibytes * MIB:
            batch = []
            for _ in range(1000):
                value = (
                    f'{{"user":{rng.randrange(10**6)},"name":"user-{rng.getrandbits(40):x}",'
                    f'"cart":[{",".join(str(rng.randrange(10**4)) for _ in range(20))}],'
                    f'"token":"{rng.randbytes(32).hex()}","locale":"en_GB","seen":'
                    f"{time.time():.3f}}}"
                ).encode()
                batch.append(b"set k%d 0 0 %d noreply\r\n%s\r\n" % (items, len(value), value))
                written += len(value)
                items += 1
            conn.sendall(b"".join(batch))
        conn.sendall(b"version\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += conn.recv(4096)
    return items


def measure(config_a: Path, config_b: Path, program: str, work: Path) -> list[str]:
    rows = []
    for label, extra in (
        ("zstd + age", []),
        ("tar, no encryption", ["--compress", "none", "--no-encrypt"]),
    ):
        archive = work / f"{program}.archive"
        began = time.monotonic()
        cli(config_a, "export", program, "latest", "-o", str(archive), *extra)
        export_seconds = time.monotonic() - began
        size = archive.stat().st_size
        images_b = work / "b" / "state" / "images" / program
        shutil.rmtree(images_b, ignore_errors=True)
        began = time.monotonic()
        cli(config_b, "import", str(archive))
        import_seconds = time.monotonic() - began
        image_bytes = sum(ImageStore(work / "a" / "state").list(program)[0].file_sizes.values())
        export_rate = image_bytes / MIB / export_seconds
        import_rate = image_bytes / MIB / import_seconds
        rows.append(
            f"| {program} | {label} | {image_bytes / MIB:.0f} MiB | {size / MIB:.1f} MiB | "
            f"{image_bytes / size:.2f} | {export_seconds:.1f} s ({export_rate:.0f} MiB/s) | "
            f"{import_seconds:.1f} s ({import_rate:.0f} MiB/s) |"
        )
        archive.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heap-mib", type=int, default=1024)
    parser.add_argument("--memcached-mib", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gsv-bench-transfer-", dir="/var/tmp"))
    supervisor = None
    try:
        key = work / "age-key.txt"
        key.write_text(f"{pyrage.x25519.Identity.generate()}\n")
        os.chmod(key, 0o600)
        port = 23000 + os.getpid() % 1000
        (work / "a").mkdir()
        (work / "b").mkdir()
        config_a = config(work / "a", port, args.heap_mib, args.memcached_mib, key)
        config_b = config(work / "b", port, args.heap_mib, args.memcached_mib, key)
        supervisor = subprocess.Popen(
            [GRENADINE_SV, "-c", str(config_a)],
            stdout=subprocess.DEVNULL,
            stderr=(work / "supervisor.err").open("wb"),
        )
        log = work / "a" / "logs" / "heap.out.log"
        wait_until(lambda: log.exists() and "ready" in log.read_text(), 600, "the heap is built")
        wait_until(
            lambda: "RUNNING" in cli(config_a, "status", "memcached").stdout, 60, "memcached"
        )
        items = fill_memcached(port, args.memcached_mib)
        print(f"memcached: {items} items; heap: {log.read_text().strip()}", flush=True)
        cli(config_a, "checkpoint", "memcached", "heap")
        print("| image | archive | image files | archive | ratio | export | import |")
        print("|---|---|---|---|---|---|---|")
        for program in ("memcached", "heap"):
            for row in measure(config_a, config_b, program, work):
                print(row, flush=True)
    finally:
        if supervisor is not None:
            supervisor.terminate()
            supervisor.wait(120)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
