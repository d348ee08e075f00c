"""What a reload changes: the difference between two sets of program definitions, and
the [supervisor] settings it leaves as they are."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from grenadine_sv.config.loading import ProgramConfig, SupervisorSettings


@dataclass(frozen=True)
class ProgramDiff:
    """The programs of two configurations, by what a reload does with each."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    # The process itself is defined differently: the running instance is replaced.
    changed: tuple[str, ...]
    # Only supervision settings differ (policies, probes): taken without a restart.
    updated: tuple[str, ...]
    unchanged: tuple[str, ...]

    def summary(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "updated": list(self.updated),
            "unchanged": list(self.unchanged),
        }


def diff_programs(
    old: Mapping[str, ProgramConfig], new: Mapping[str, ProgramConfig]
) -> ProgramDiff:
    kept = sorted(old.keys() & new.keys())
    changed = [n for n in kept if _needs_new_instance(old[n], new[n])]
    rest = [n for n in kept if n not in changed]
    updated = [n for n in rest if _settings(old[n]) != _settings(new[n])]
    return ProgramDiff(
        added=tuple(sorted(new.keys() - old.keys())),
        removed=tuple(sorted(old.keys() - new.keys())),
        changed=tuple(changed),
        updated=tuple(updated),
        unchanged=tuple(n for n in rest if n not in updated),
    )


LOG_FIELDS = frozenset(
    {
        "stdout_logfile",
        "stderr_logfile",
        "stdout_logfile_maxbytes",
        "stdout_logfile_backups",
        "stderr_logfile_maxbytes",
        "stderr_logfile_backups",
        "log_timestamps",
    }
)


def _needs_new_instance(old: ProgramConfig, new: ProgramConfig) -> bool:
    if old.definition_digest() != new.definition_digest():
        return True
    return old.model_dump(include=set(LOG_FIELDS)) != new.model_dump(include=set(LOG_FIELDS))


def _settings(program: ProgramConfig) -> dict[str, object]:
    return program.model_dump(mode="json", exclude={"source"})


# [supervisor] keys a reload applies; the others need a restart of the supervisor.
RELOADED_SETTINGS = frozenset({"include"})


def changed_settings(running: SupervisorSettings, new: SupervisorSettings) -> list[str]:
    """The [supervisor] keys that differ and that a reload cannot apply, as written."""
    before = running.model_dump()
    after = new.model_dump()
    keys: list[str] = []
    for key in before:
        if key in RELOADED_SETTINGS or before[key] == after[key]:
            continue
        if isinstance(before[key], dict):
            keys += [f"{key}.{sub}" for sub in before[key] if before[key][sub] != after[key][sub]]
        else:
            keys.append(key)
    return keys
