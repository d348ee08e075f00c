"""Pydantic models of the configuration's tables: what each key accepts.

The loader (grenadine_sv.config.loading) validates each file with these models, passing
{"base_dir": <directory of the file>} as validation context so relative paths
are resolved against the file that wrote them.
"""

import hashlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from grenadine_sv.config.units import (
    HOST_PORT_EXPECTED,
    check_program_name,
    check_size_form,
    parse_duration,
    parse_host_port,
    parse_positive_duration,
    parse_signal,
    parse_umask,
    split_command,
)

IMAGE_REF_PATTERN = r"[0-9a-f-]{1,64}|latest"
S3_URL_PATTERN = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\0]*)?"
AGE_RECIPIENT_PATTERN = r"age1[02-9ac-hj-np-z]{58}"
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
MIB = 1024 * 1024

# ProgramConfig's fields that the loader sets and users may not write.
LOADER_FIELDS = frozenset({"name", "source"})

# The fields whose change means a different process: reload restarts a program
# whose digest changed, and an image is restored only into an equal definition.
DIGEST_FIELDS = (
    "command",
    "directory",
    "environment",
    "umask",
    "user",
    "group",
    "binds",
    "stopsignal",
    "init",
    "private_tmp",
)
# Fields an image records and a restore compares with the definition it restores into
# (environment apart: store/definition.py hashes its values). Names a ProgramConfig lacks are
# skipped, so sandbox settings can be added here as they come.
RESTORE_COMPARED_FIELDS = (
    "command",
    "directory",
    "user",
    "group",
    "umask",
    "binds",
    "init",
    "private_tmp",
    "snapshot_paths",
)

_DURATION_JSON: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?(ms|s|m|h|d)\s*)+$"},
    ],
    "description": 'seconds, or a duration such as "90s", "15m", "1h30m", "500ms"',
}
_SIZE_JSON: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kmgtKMGT]i?B|B)?\s*$"},
    ],
    "description": 'bytes, or a size such as "50MB" (10**6) or "10KiB" (2**10)',
}


def _check_image_ref(ref: str) -> str:
    if not re.fullmatch(IMAGE_REF_PATTERN, ref):
        raise ValueError('expected an image id (hex digits and "-") or "latest"')
    return ref


def _check_command(words: list[str]) -> list[str]:
    if not words or not words[0]:
        raise ValueError("expected a non-empty command")
    if any("\0" in word for word in words):
        raise ValueError("expected a command without NUL characters")
    return words


def _check_variable_name(name: str) -> str:
    if not name or "=" in name or "\0" in name:
        raise ValueError('expected an environment variable name without "=" or NUL')
    return name


def _check_no_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError("expected a string without NUL characters")
    return text


def _check_host_port(value: str) -> str:
    parse_host_port(value)
    return value


def _check_listen(value: str) -> str:
    if value:
        parse_host_port(value)
    return value


def _reject_empty_path(value: object) -> object:
    if value == "":
        raise ValueError("expected a path, not an empty string")
    return value


def _normalized(path: Path) -> Path:
    """The path without ".", "..", repeated or trailing slashes ("//srv/" is "/srv")."""
    text = os.path.normpath(path)
    return Path("/" + text.lstrip("/") if text.startswith("//") else text)


def _resolve_path(path: Path, info: ValidationInfo) -> Path:
    if "\0" in str(path):
        raise ValueError("expected a path without NUL characters")
    context = info.context if isinstance(info.context, dict) else {}
    base_dir = Path(context.get("base_dir") or Path.cwd())
    return _normalized(base_dir / path)


def _check_absolute(path: Path) -> Path:
    if "\0" in str(path):
        raise ValueError("expected a path without NUL characters")
    if not path.is_absolute():
        raise ValueError("expected an absolute path")
    return _normalized(path)


def _check_binds(paths: list[Path]) -> list[Path]:
    if Path("/") in paths:
        raise ValueError('expected paths other than "/" (the sandbox always has the root)')
    repeated = sorted({str(path) for path in paths if paths.count(path) > 1})
    if repeated:
        raise ValueError(f"expected each path once ({', '.join(repeated)} is listed twice)")
    return paths


def _check_snapshot_path(path: Path) -> Path:
    for system in ("/", "/proc", "/sys", "/dev"):
        if path == Path(system) or (system != "/" and path.is_relative_to(system)):
            raise ValueError(f"expected a path of the program's files, not {system}")
    return path


def _check_socket_path(path: Path) -> Path:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"expected a socket path of at most {MAX_SOCKET_PATH_BYTES} bytes")
    return path


NonEmptyStr = Annotated[str, Field(min_length=1)]
StrictBool = Annotated[bool, Strict()]
Count = Annotated[int, Strict(), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_JSON)]
PositiveDuration = Annotated[
    float, BeforeValidator(parse_positive_duration), WithJsonSchema(_DURATION_JSON)
]
Size = Annotated[ByteSize, BeforeValidator(check_size_form), WithJsonSchema(_SIZE_JSON)]
SignalName = Annotated[
    str,
    BeforeValidator(parse_signal),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string"}, {"type": "integer", "minimum": 1}],
            "description": 'a signal name ("TERM", "SIGTERM") or number',
        }
    ),
]
Umask = Annotated[
    int,
    BeforeValidator(parse_umask),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": "^(0o)?[0-7]{1,4}$"},
                {"type": "integer", "minimum": 0, "maximum": 0o777},
            ],
            "description": 'an octal string such as "022", or an integer',
        }
    ),
]
Command = Annotated[
    list[str],
    BeforeValidator(split_command),
    AfterValidator(_check_command),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
                {"type": "string", "minLength": 1},
            ],
            "description": "a list of arguments, or a string split as a shell would (shlex)",
        }
    ),
]
HostPort = Annotated[
    str,
    AfterValidator(_check_host_port),
    WithJsonSchema({"type": "string", "description": HOST_PORT_EXPECTED.removeprefix("expected ")}),
]
ResolvedPath = Annotated[Path, BeforeValidator(_reject_empty_path), AfterValidator(_resolve_path)]
AbsolutePath = Annotated[Path, AfterValidator(_check_absolute)]
SocketPath = Annotated[ResolvedPath, AfterValidator(_check_socket_path)]
ProgramName = Annotated[str, AfterValidator(check_program_name)]
ImageRef = Annotated[
    str,
    AfterValidator(_check_image_ref),
    WithJsonSchema({"type": "string", "pattern": f"^({IMAGE_REF_PATTERN})$"}),
]
Binds = Annotated[list[AbsolutePath], AfterValidator(_check_binds)]
AccountName = Annotated[NonEmptyStr, AfterValidator(_check_no_nul)]
Environment = dict[
    Annotated[str, AfterValidator(_check_variable_name)],
    Annotated[str, AfterValidator(_check_no_nul)],
]
ExitCode = Annotated[int, Strict(), Field(ge=0, le=255)]

TABLE_CONFIG = ConfigDict(extra="forbid", frozen=True)


RestoreOccasion = Literal["supervisor-start", "crash", "start"]


class MetricsSettings(BaseModel):
    """[supervisor.metrics]: the Prometheus endpoint."""

    model_config = TABLE_CONFIG

    listen: Annotated[str, AfterValidator(_check_listen)] = "127.0.0.1:9847"
    """host:port of the /metrics endpoint; "" disables it"""

    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, IPv6 hosts without brackets; None when disabled."""
        return parse_host_port(self.listen) if self.listen else None


def _check_s3_url(url: str) -> str:
    if not re.fullmatch(S3_URL_PATTERN, url):
        raise ValueError('expected "s3://BUCKET" or "s3://BUCKET/PREFIX"')
    return url.rstrip("/")


def _check_age_recipient(recipient: str) -> str:
    if not re.fullmatch(AGE_RECIPIENT_PATTERN, recipient):
        raise ValueError('expected an age public key ("age1" and 58 more lowercase characters)')
    return recipient


class EncryptionSettings(BaseModel):
    """[supervisor.remote.encryption]: age keys for archives and uploads."""

    model_config = TABLE_CONFIG

    recipients: list[Annotated[str, AfterValidator(_check_age_recipient)]] = []
    """age public keys ("age1...") that exports and uploads are encrypted to"""
    identity_file: ResolvedPath | None = None
    """age identity file (AGE-SECRET-KEY-1... lines) that decrypts imports and downloads; 0600"""


class RemoteSettings(BaseModel):
    """[supervisor.remote]: an S3-compatible image store shared by hosts."""

    model_config = TABLE_CONFIG

    url: Annotated[str, AfterValidator(_check_s3_url)] | None = None
    """s3://BUCKET/PREFIX where images are stored; absent: no object store (export/import only)"""
    endpoint: NonEmptyStr | None = None
    """URL of an S3-compatible store ("http://127.0.0.1:8333"); default: AWS"""
    region: NonEmptyStr | None = None
    credentials_file: ResolvedPath | None = None
    """AWS-style credentials file ([default] aws_access_key_id, aws_secret_access_key), 0600;
    default: the AWS environment variables"""
    encryption: EncryptionSettings = EncryptionSettings()


class SupervisorSettings(BaseModel):
    """[supervisor]: settings of the supervisor itself (main file only)."""

    model_config = TABLE_CONFIG

    state_dir: ResolvedPath = Path("/var/lib/grenadine-sv")
    """images live in state_dir/images"""
    control_socket: SocketPath = Path("/run/grenadine-sv.sock")
    log_dir: ResolvedPath = Path("/var/log/grenadine-sv")
    include: list[Annotated[NonEmptyStr, AfterValidator(_check_no_nul)]] = []
    """globs of files with more [programs.*] tables, relative to this file"""
    criu: ResolvedPath | None = None
    """path of the criu binary; found automatically when absent"""
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_checkpoint_timeout: PositiveDuration = 60.0
    """at shutdown, how long the checkpoints of programs with checkpoint.on_stop may take;
    a program whose checkpoint is not done by then is stopped normally"""
    metrics: MetricsSettings = MetricsSettings()
    remote: RemoteSettings | None = None
    """an object store for images (optional)"""


class ReadyProbe(BaseModel):
    """When a started program counts as ready: a TCP port accepts, or a command succeeds."""

    model_config = TABLE_CONFIG

    tcp: HostPort | None = None
    """host:port that accepts connections once the program is ready"""
    command: Command | None = None
    """a command that exits 0 once the program is ready"""
    timeout: PositiveDuration = 10.0
    """how long the program has to become ready"""
    interval: PositiveDuration = 0.2
    """time between two attempts"""

    @model_validator(mode="after")
    def _exactly_one_probe(self) -> Self:
        if (self.tcp is None) == (self.command is None):
            raise ValueError('expected exactly one of "tcp" or "command"')
        return self


class CheckpointPolicy(BaseModel):
    """[programs.NAME.checkpoint]: when a program is checkpointed and what is kept."""

    model_config = TABLE_CONFIG

    on_signal: StrictBool = False
    """checkpoint when the supervisor receives SIGUSR1"""
    interval: PositiveDuration | None = None
    """periodic checkpoint"""
    pre_deploy: StrictBool = False
    """checkpoint before reload replaces the program"""
    leave_running: StrictBool = True
    keep: Annotated[int, Strict(), Field(ge=1)] = 5
    """images kept for this program"""
    rollback: StrictBool = False
    """restore the pre-deploy image when the new instance never gets ready"""
    tcp_established: StrictBool = False
    """let CRIU checkpoint established TCP connections (and restore them)"""
    network_lock: Literal["auto", "nftables", "iptables", "skip"] = "auto"
    """how CRIU keeps the peers of established connections out while the program is frozen
    or stopped; "auto": nftables if this CRIU has it, else iptables (doctor says which)"""
    file_locks: StrictBool = True
    """checkpoint and restore the program's fcntl/flock locks (sqlite, pid files)"""
    external_unix_sockets: StrictBool = False
    """allow unix sockets connected to a peer outside the sandbox (such as /dev/log)"""
    ghost_limit: Annotated[Size, Field(le=0xFFFFFFFF)] = ByteSize(1 << 20)
    """largest deleted-but-open file copied into the image"""
    skip_in_flight: StrictBool = True
    """drop TCP connections not yet accepted (their clients retry) rather than fail"""
    tcp_close: StrictBool = False
    """restore established TCP connections closed (their peers see a reset)"""
    snapshot: list[Annotated[AbsolutePath, AfterValidator(_check_snapshot_path)]] = []
    """files and directories copied into each image while the program is frozen, and
    written back at restore (the private /tmp always is)"""
    on_stop: StrictBool = False
    """when the supervisor stops (SIGTERM, shutdown), checkpoint the program instead of
    stopping it with its stop signal, so that a restart brings it back as it was"""
    upload: StrictBool = False
    """upload every new image to [supervisor.remote] (encrypted; queued, retried)"""
    remote_keep: Annotated[int, Strict(), Field(ge=1)] | None = None
    """images of this program kept in the object store (across hosts); default: all"""


class ProgramConfig(BaseModel):
    """[programs.NAME]: one supervised program."""

    model_config = TABLE_CONFIG
    _digest: str | None = PrivateAttr(default=None)

    name: SkipJsonSchema[ProgramName]
    command: Command
    directory: ResolvedPath = Path("/")
    environment: Environment = {}
    umask: Umask | None = None
    user: AccountName | None = None
    group: AccountName | None = None
    autostart: StrictBool = True
    autorestart: Literal["always", "on-failure", "never"] = "on-failure"
    exitcodes: list[ExitCode] = [0]
    """exit codes that count as a success (see autorestart)"""
    startsecs: Duration = 1.0
    """how long the program must stay up to count as started (without a ready probe)"""
    startretries: Count = 3
    stopsignal: SignalName = "TERM"
    stopwaitsecs: PositiveDuration = 10.0
    """time between stopsignal and SIGKILL"""
    depends_on: list[NonEmptyStr] = []
    """programs to start (and be ready) before this one, and to stop after it"""
    on_dependency_stop: Literal["restart", "stop", "ignore"] = "restart"
    """when a program it depends on stops or crashes: stop this one and start it again once
    the dependency runs again ("restart"), only stop it ("stop"), or leave it ("ignore")"""
    ready: ReadyProbe | None = None
    restore: ImageRef | None = None
    """start from this image id, or "latest", instead of from scratch"""
    restore_on: list[RestoreOccasion] = ["supervisor-start"]
    """when `restore` applies: when the supervisor starts ("supervisor-start"), when the
    supervisor restarts the program after an exit or a failed start ("crash"), when an
    operator starts or restarts it ("start"); other starts are cold"""
    restore_source: Literal["local", "remote", "newest"] = "local"
    """where restore = "latest" looks: this host's images, the object store's, or the newer"""
    restore_fallback: Literal["cold", "fail", "previous"] = "cold"
    """when the image cannot be restored: start from scratch ("cold"), not at all ("fail"), or
    from the next older image that restores ("previous", else from scratch)"""
    restore_mode: Literal["eager", "lazy"] = "eager"
    """"lazy": run as soon as CRIU has rebuilt the process, memory streamed in afterwards"""
    private_tmp: StrictBool = True
    """give the program its own /tmp (state_dir/tmp/NAME, emptied at each cold start, kept
    across restores); false shares the host's /tmp"""
    binds: Binds = []
    """host paths bound into the sandbox at the same path"""

    @field_validator("binds")
    @classmethod
    def _tmp_is_private_or_bound(cls, binds: list[Path], info: ValidationInfo) -> list[Path]:
        if info.data.get("private_tmp", True) and Path("/tmp") in binds:
            raise ValueError(
                'expected no "/tmp" while private_tmp = true gives the program its own /tmp'
                " (set private_tmp = false to share the host's /tmp)"
            )
        return binds

    init: StrictBool = True
    """run Debian's tini as PID 1 with the program as its child; false for a program that is
    itself an init"""
    stdout_logfile: ResolvedPath | None = None
    """default: log_dir/NAME.out.log"""
    stderr_logfile: ResolvedPath | None = None
    """default: log_dir/NAME.err.log"""
    stdout_logfile_maxbytes: Size = ByteSize(50 * MIB)
    """0: never rotate"""
    stdout_logfile_backups: Count = 10
    stderr_logfile_maxbytes: Size = ByteSize(50 * MIB)
    """0: never rotate"""
    stderr_logfile_backups: Count = 10
    log_timestamps: StrictBool = False
    """prefix each captured line with an ISO-8601 UTC timestamp"""
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    source: SkipJsonSchema[Path]
    """the file that defines this program (set by the loader)"""

    @property
    def stop_signal(self) -> signal.Signals:
        return signal.Signals["SIG" + self.stopsignal]

    def stdout_path(self, log_dir: Path) -> Path:
        return self.stdout_logfile or log_dir / f"{self.name}.out.log"

    def stderr_path(self, log_dir: Path) -> Path:
        return self.stderr_logfile or log_dir / f"{self.name}.err.log"

    def definition_digest(self) -> str:
        """sha256 (hex) of the fields that shape the running process (DIGEST_FIELDS)."""
        if self._digest is None:
            fields = self.model_dump(mode="json", include=set(DIGEST_FIELDS))
            canonical = json.dumps(
                {"digest_version": 1, **fields}, sort_keys=True, separators=(",", ":")
            )
            self._digest = hashlib.sha256(canonical.encode()).hexdigest()
        return self._digest
