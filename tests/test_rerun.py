"""What a second start of a sweep does with the record the first one left: `rerun.plan` alone, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from pad_ray import files, rerun
from pad_ray.config import ConfigError
from pad_ray.sweep_config import load_sweep
from test_sweep import SMOKE


@pytest.fixture
def started(sweep_home):
    """The smoke sweep as its first start recorded it, in its folder under PAD_RAY_HOME."""
    sweep = load_sweep(SMOKE)
    folder = sweep_home / "sweeps" / sweep.name
    rerun.write_record(str(folder), sweep, "parent-1")
    return sweep, folder


def _rewrite_record(folder: Path, edit) -> None:
    record = files.read_json(f"{folder}/{rerun.RECORD}")
    edit(record["sweep"])
    files.write_json(f"{folder}/{rerun.RECORD}", record)


def test_the_same_sweep_resumes_into_its_parent_run(started):
    sweep, folder = started
    assert rerun.plan(sweep, str(folder), None, restorable=True) == rerun.Plan(sweep, "parent-1", None)


def test_a_record_from_before_a_schema_key_existed_is_the_same_sweep(started):
    """A key that a later pad_ray adds with a default (here reuse_actors) is not an edit of an old sweep."""
    sweep, folder = started
    _rewrite_record(folder, lambda recorded: recorded.pop("reuse_actors"))
    assert rerun.plan(sweep, str(folder), None, restorable=True).parent_run_id == "parent-1"
    # Set away from its default, the same key is an edit like any other.
    _rewrite_record(folder, lambda recorded: recorded.update(reuse_actors=False))
    with pytest.raises(ConfigError, match=r"changed: reuse_actors\)"):
        rerun.plan(sweep, str(folder), None, restorable=True)


def test_an_edited_sweep_is_refused_with_its_changed_keys_unless_resumed(started):
    sweep, folder = started
    edited = sweep.model_copy(update={"max_failures": 3})
    with pytest.raises(ConfigError, match=r"changed: max_failures\); pass --resume"):
        rerun.plan(edited, str(folder), None, restorable=True)
    resumed = rerun.plan(edited, str(folder), "resume", restorable=True)
    assert resumed.sweep == sweep and resumed.parent_run_id == "parent-1"


def test_controls_are_not_an_edit_since_no_trial_reads_them(started):
    """More random subsets for a finished sweep's controls: the same sweep, resumed with the new setting."""
    sweep, folder = started
    more = sweep.model_copy(update={"controls": sweep.controls.model_copy(update={"random_subsets": 5})})
    assert rerun.plan(more, str(folder), None, restorable=True) == rerun.Plan(more, "parent-1", None)


def test_a_record_this_schema_cannot_read_asks_for_fresh(started):
    sweep, folder = started
    _rewrite_record(folder, lambda recorded: recorded.update(retired_key=1))
    refusal = r"sweep schema differs \(retired_key: unknown key; allowed: .*\); pass --fresh to"
    with pytest.raises(ConfigError, match=refusal):
        rerun.plan(sweep, str(folder), None, restorable=True)
    assert rerun.plan(sweep, str(folder), "fresh", restorable=True).move_aside == str(folder)
