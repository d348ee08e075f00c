"""A program started from scratch: its SandboxSpec (the configuration as the sandbox
launcher takes it) and a new sandbox with fresh output pipes (`launch_cold`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import trio

from grenadine_sv.config.loading import ProgramConfig
from grenadine_sv.sandbox import (
    SandboxSpec,
    spawn_sandbox,
)
from grenadine_sv.sandbox.cgroup import ProgramCgroup
from grenadine_sv.sandbox.init import TINI
from grenadine_sv.sandbox.private_tmp import empty_private_tmp, private_tmp_dir
from grenadine_sv.supervisor.instance import LaunchedInstance, RunnerContext
from grenadine_sv.supervisor.output import (
    open_output_pipe,
)


def sandbox_spec(
    config: ProgramConfig,
    root_anchor: Path,
    cgroup: ProgramCgroup | None = None,
    tmp: Path | None = None,
) -> SandboxSpec:
    environment = dict(os.environ)
    environment.update(config.environment)
    environment["GRENADINE_SV_PROGRAM"] = config.name
    return SandboxSpec(
        name=config.name,
        command=tuple(config.command),
        directory=str(config.directory),
        environment=environment,
        umask=config.umask,
        user=config.user,
        group=config.group,
        binds=tuple(str(path) for path in config.binds),
        root_anchor=str(root_anchor),
        init=TINI if config.init else None,
        tmp=str(tmp) if tmp is not None else None,
        cgroup=str(cgroup.path) if cgroup is not None else None,
    )


class ColdStartable(Protocol):
    """What launch_cold needs of a program's runner (runner.ProgramRunner)."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> ProgramConfig: ...

    @property
    def context(self) -> RunnerContext: ...

    @property
    def cgroup(self) -> ProgramCgroup | None: ...


async def launch_cold(runner: ColdStartable) -> LaunchedInstance:
    """Start the program from scratch in a fresh sandbox."""
    tmp = None
    if runner.config.private_tmp:
        tmp = private_tmp_dir(runner.context.state_dir, runner.name)
        await trio.to_thread.run_sync(
            empty_private_tmp, tmp, limiter=runner.context.preparation_threads
        )
    spec = sandbox_spec(runner.config, runner.context.root_anchor, runner.cgroup, tmp)
    stdout_fd, stdout_stream = open_output_pipe()
    stderr_fd, stderr_stream = open_output_pipe()
    context = runner.context
    pipes = (("stdout", stdout_stream.fileno()), ("stderr", stderr_stream.fileno()))
    held: tuple[str, ...] = ()
    try:
        held = context.keep_pipes(runner.name, pipes)
        process = await spawn_sandbox(spec, stdout_fd, stderr_fd, context.sandbox_server)
    except BaseException:
        context.release_pipes(held)
        await stdout_stream.aclose()
        await stderr_stream.aclose()
        raise
    finally:
        os.close(stdout_fd)
        os.close(stderr_fd)
    return LaunchedInstance(process, stdout_stream, stderr_stream, held)
