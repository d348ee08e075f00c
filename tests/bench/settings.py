"""How big and how often: the full suite, and the quick one (each case once, smallest size)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class ProfileTarget:
    """Record the supervisor of one case with this py-spy into this file."""

    py_spy: str
    output: Path


@dataclass(frozen=True)
class Settings:
    mode: Literal["quick", "full"]
    runs: int
    """Alternating runs of each figure and of its baseline."""
    sizes_mib: tuple[int, ...]
    """Touched memory of the program checkpointed in cases 1 and 4."""
    warm_documents: int
    """Corpus size of the service of case 2 (250k documents: about 300 MB, seconds of warm-up)."""
    supervised_programs: int
    idle_seconds: float
    """Window over which the supervisors' idle CPU is measured (case 3)."""
    many_programs: int
    many_mib: int
    """Touched memory of each of the programs of case 5."""
    lazy_sizes_mib: tuple[int, ...] = (64,)
    """Memory of the service restored eager and lazy in case 6."""
    py_spy: str | None = None
    """With a profile_dir: the py-spy that records each case's supervisor."""
    profile_dir: str | None = None

    def profile(self, label: str) -> ProfileTarget | None:
        """Where the supervisor of the case `label` is profiled, when profiling."""
        if self.py_spy is None or self.profile_dir is None:
            return None
        return ProfileTarget(self.py_spy, Path(self.profile_dir) / f"profile-{label}.txt")

    def with_profiling(self, py_spy: str, directory: Path) -> Settings:
        return replace(self, py_spy=py_spy, profile_dir=str(directory))

    def with_runs(self, runs: int | None) -> Settings:
        if runs is None:
            return self
        if runs < 1:
            raise ValueError(f"--runs must be 1 or more, got {runs}")
        return replace(self, runs=runs)

    def with_sizes(self, sizes: tuple[int, ...] | None) -> Settings:
        if sizes is None:
            return self
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--sizes must be positive MiB counts, got {sizes}")
        return replace(self, sizes_mib=sizes)

    def with_lazy_sizes(self, sizes: tuple[int, ...] | None) -> Settings:
        if sizes is None:
            return self
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--lazy-sizes must be positive MiB counts, got {sizes}")
        return replace(self, lazy_sizes_mib=sizes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Settings(
    mode="full",
    runs=5,
    sizes_mib=(16, 256, 1024, 4096),
    warm_documents=250_000,
    supervised_programs=50,
    idle_seconds=30.0,
    many_programs=50,
    many_mib=16,
    lazy_sizes_mib=(16, 64, 256, 1024, 4096),
)

QUICK = Settings(
    mode="quick",
    runs=1,
    sizes_mib=(16,),
    warm_documents=20_000,
    supervised_programs=50,
    idle_seconds=3.0,
    many_programs=50,
    many_mib=4,
    lazy_sizes_mib=(64,),
)
