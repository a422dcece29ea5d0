"""Running a sweep file again: the same sweep resumes, an edited one is refused unless told what to do.

Tune restores an experiment with the search space, searcher and scheduler it was first started with,
whatever the file says now, so an edit would be ignored silently (after training the experts it asked
for). The driver therefore records, in the sweep's Tune folder (`<storage_path>/<name>/`), a fingerprint
of the resolved sweep and the MLflow parent run, and compares it at every later start before any work:
the same sweep resumes into the same parent run; a changed one stops with the keys that changed, unless
`--resume` (go on with the sweep as first started, ignoring the edits) or `--fresh` (move the old folder
aside to `<name>.replaced-<time>` and start a new sweep: nothing is deleted).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from pad_ray import files
from pad_ray.config import ConfigError, describe_errors
from pad_ray.sweep_config import SweepConfig

RECORD = "pad_ray_sweep.json"
Rerun = Literal["fresh", "resume"] | None


@dataclass(frozen=True)
class Plan:
    sweep: SweepConfig  # what runs: the file's sweep, or the recorded one under --resume
    parent_run_id: str | None  # the MLflow parent run of an earlier start, to log into again
    move_aside: str | None  # the folder --fresh moves away before the new sweep starts


# Read only once every trial has ended, so a change asks nothing of the trials Tune restores: not an edit.
AFTER_THE_TRIALS = {"controls"}


def fingerprint(sweep: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(_compared(sweep), sort_keys=True).encode()).hexdigest()


def _compared(sweep: SweepConfig) -> dict[str, Any]:
    return sweep.model_dump(mode="json", exclude=AFTER_THE_TRIALS)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    before, after = _flat(old), _flat(new)
    return sorted(key for key in before.keys() | after.keys() if before.get(key, ...) != after.get(key, ...))


def plan(sweep: SweepConfig, folder: str, rerun: Rerun, restorable: bool) -> Plan:
    """What this start does with the sweep in `folder` (`restorable`: Tune has saved its state there).
    Reads only: a refused start has written nothing."""
    record_path = f"{folder}/{RECORD}"
    record = files.read_json(record_path) if files.exists(record_path) else None
    if rerun == "fresh":
        return Plan(sweep, None, folder if files.is_dir(folder) else None)
    if record is None and not restorable:
        if rerun == "resume":
            raise ConfigError(f"--resume: there is no sweep {sweep.name!r} in {folder} to resume; "
                              "run without --resume to start it")
        return Plan(sweep, None, None)
    if record is None:  # Tune state that no fingerprint describes: its space cannot be compared
        if rerun == "resume":
            return Plan(sweep, None, None)
        raise ConfigError(f"sweep {sweep.name!r} in {folder} has no record of the sweep it was started from; "
                          "pass --resume to continue it or --fresh to start a new sweep")
    # Read with this version's defaults: a key added to the schema since the record was written, which
    # the user never set, is not an edit.
    try:
        recorded = SweepConfig.model_validate(record["sweep"])
    except ValidationError as exc:
        raise ConfigError(f"sweep {sweep.name!r} in {folder} was started by a pad_ray whose sweep schema differs "
                          f"({describe_errors(exc, SweepConfig)[0]}); pass --fresh to start a new sweep") from None
    if fingerprint(recorded) == fingerprint(sweep):
        return Plan(sweep, record["parent_run_id"], None)
    changed = changed_keys(_compared(recorded), _compared(sweep))
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    if rerun != "resume":
        raise ConfigError(f"sweep {sweep.name!r} in {folder} was started from a different sweep (changed: {shown}); "
                          "pass --resume to continue it as it was started, or --fresh to start a new sweep "
                          "(the old folder is moved aside)")
    print(f"pad_ray.sweep: --resume: continuing sweep {sweep.name!r} as it was started; ignoring the changes "
          f"to {shown}", file=sys.stderr)
    return Plan(recorded, record["parent_run_id"], None)


def move_aside(folder: str) -> str:
    target = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    files.move(folder, target)
    print(f"pad_ray.sweep: --fresh: moved the earlier sweep to {target}", file=sys.stderr)
    return target


def write_record(folder: str, sweep: SweepConfig, parent_run_id: str) -> None:
    files.write_json(f"{folder}/{RECORD}", {"fingerprint": fingerprint(sweep), "sweep": sweep.model_dump(mode="json"),
                                            "parent_run_id": parent_run_id})
