"""Builds the compiled helpers (grenadine_sv/helpers/*.c) next to the package's modules.

Everything else about the package is declared in pyproject.toml; this file only adds the
`build_helpers` step to `build`, so that a wheel, an sdist install and an editable install
(where the executables are built in place, in the source tree) all carry them."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.dist import Distribution

HELPERS_PACKAGE = Path("grenadine_sv", "helpers")
CFLAGS = ("-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE")


class BuildHelpers(Command):
    """Compile each grenadine_sv/helpers/NAME.c into the executable grenadine_sv/helpers/NAME.

    The .h files there are the code the helpers share (each NAME.c is a whole program that
    includes them): they are sources too, and every build compiles every helper anew."""

    description = "compile grenadine-sv's helper executables with the system's C compiler"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _sources(self) -> list[Path]:
        return sorted(HELPERS_PACKAGE.glob("*.c"))

    def _target_dir(self) -> Path:
        if self.editable_mode or self.build_lib is None:
            return HELPERS_PACKAGE
        return Path(self.build_lib, HELPERS_PACKAGE)

    def run(self) -> None:
        compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or "cc"]
        if shutil.which(compiler[0]) is None:
            raise SystemExit(
                "grenadine-sv needs a C compiler to build its helpers (the sandbox launcher and"
                " the stdio keeper): apt-get install gcc libc6-dev, or set CC"
            )
        target_dir = self._target_dir()
        target_dir.mkdir(parents=True, exist_ok=True)
        for source in self._sources():
            target = target_dir / source.stem
            command = [*compiler, *CFLAGS, "-o", str(target), str(source)]
            self.announce(" ".join(command), level=2)
            subprocess.run(command, check=True)

    def get_outputs(self) -> list[str]:
        return [str(self._target_dir() / source.stem) for source in self._sources()]

    def get_source_files(self) -> list[str]:
        return [str(source) for source in sorted(HELPERS_PACKAGE.glob("*.[ch]"))]

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class DistributionWithExecutables(Distribution):
    """Its wheels hold machine code, so they are tagged for a platform, not "any"."""

    def has_ext_modules(self) -> bool:
        return True


build.sub_commands.append(("build_helpers", None))
setup(cmdclass={"build_helpers": BuildHelpers}, distclass=DistributionWithExecutables)
