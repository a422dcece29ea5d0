import json
import typing
from pathlib import Path

import pytest

from pad_ray.config import (PRESET_DIR, PRESETS, ConfigError, DataConfig, build_config, load_config, to_dict,
                            with_absolute_paths)
from pad_ray.data import DATASETS

# Every preset resolved by the Python dicts that the preset files replaced, recorded once; an entry changes
# only with its own preset file (mnist-ipc1/10/50: the searches of BENCHMARKS.md section 6).
RESOLVED = json.loads((Path(__file__).with_name("fixtures") / "presets_resolved.json").read_text())


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw, "run.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = build_config({"preset": name})
    assert cfg.distill.max_start_epoch + cfg.distill.expert_epochs <= cfg.experts.epochs


def test_the_preset_files_are_exactly_the_former_presets():
    assert sorted(PRESETS) == sorted(RESOLVED)


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_each_preset_file_resolves_to_its_former_config(name):
    assert to_dict(build_config({"preset": name, "data": {"root": "x"}})) == RESOLVED[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_file_says_what_it_is_and_how_to_run_it(name):
    header = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[:2]
    assert all(line.startswith("# ") for line in header)
    assert f"preset: {name}" in header[1] and "pad-ray run" in header[1]


def test_table7_values_reach_the_config():
    cfg = build_config({"preset": "cifar100-ipc10"})
    d = cfg.distill
    assert (cfg.schedule.init_ratio, cfg.schedule.add_end_epoch) == (0.75, 40)
    assert (d.alpha, d.syn_steps, d.expert_epochs, d.batch_syn, d.lr_y, d.lr_img) == (0.25, 80, 2, 1000, 10, 1000)
    assert (d.min_start_epoch, d.current_max_start_epoch, d.max_start_epoch) == (0, 20, 40)
    assert d.expansion_end_iteration == 100 * (40 - 20)
    assert build_config({"preset": "tinyimagenet-ipc10"}).model.depth == 4
    assert build_config({"preset": "cifar10-ipc1"}).distill.threshold == 1.1


def test_syn_lr_starts_at_the_experts_lr_unless_the_config_gives_one():
    # The released code has one lr_teacher for training the experts and for the initial syn_lr.
    assert build_config({"preset": "smoke", "experts": {"lr": 0.03}}).distill.lr_teacher == 0.03
    given = {"preset": "smoke", "experts": {"lr": 0.03}, "distill": {"lr_teacher": 0.02}}
    assert build_config(given).distill.lr_teacher == 0.02
    mnist = build_config({"preset": "mnist-ipc10"})
    assert mnist.distill.lr_teacher == mnist.experts.lr == 0.1


def test_mnist_ipc10_and_ipc50_share_one_expert_set_and_ipc1_keeps_its_own():
    # BENCHMARKS.md section 6: IPC 1 scores 5 points lower on the whole-split experts, so it keeps its own.
    from pad_ray.trajectories import expert_identity

    ipc1, ipc10, ipc50 = (expert_identity(build_config({"preset": f"mnist-ipc{n}"})) for n in (1, 10, 50))
    assert ipc10 == ipc50 and ipc1 != ipc10


def test_file_values_override_the_preset():
    cfg = build_config({"preset": "cifar10-ipc10", "distill": {"alpha": 0.5}, "experts": {"optimizer": "sgd"}})
    assert cfg.distill.alpha == 0.5 and cfg.distill.syn_steps == 80 and cfg.experts.optimizer == "sgd"


def test_config_accepts_exactly_the_loadable_datasets():
    assert typing.get_args(DataConfig.model_fields["dataset"].annotation) == DATASETS
    for name in ("fashionmnist", "kmnist", "svhn"):
        assert build_config({"preset": "smoke", "data": {"dataset": name}}).data.dataset == name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"preset": "smoke", "distill": {"alpah": 0.1}}, "run.yaml: distill.alpah: unknown key; did you mean 'alpha'?"),
        ({"preset": "smoke", "bogus": 1}, "run.yaml: bogus: unknown key"),
        ({"preset": "smoke", "distill": {"ipc": "ten"}}, "run.yaml: distill.ipc: Input should be a valid integer"),
        ({"preset": "smoke", "distill": {"ipc": 0}}, "run.yaml: distill.ipc: Input should be greater than or equal to 1"),
        ({"preset": "smoke", "distill": {"alpha": 1.0}}, "run.yaml: distill.alpha: Input should be less than 1"),
        ({"preset": "smoke", "distill": {"alpha": -0.1}}, "run.yaml: distill.alpha"),
        ({"preset": "smoke", "schedule": {"init_ratio": 0}}, "run.yaml: schedule.init_ratio: Input should be greater than 0"),
        ({"preset": "smoke", "schedule": {"init_ratio": 1.5}}, "run.yaml: schedule.init_ratio"),
        ({"preset": "smoke", "schedule": {"add_end_epoch": 50}}, "schedule.add_end_epoch: 50 is beyond experts.epochs (6)"),
        ({"preset": "smoke", "distill": {"max_start_epoch": 5}}, "exceeds experts.epochs"),
        ({"preset": "smoke", "schedule": {"remove": [{"after_epoch": 9, "easiest_fraction": 0.1}]}}, "never happens"),
        ({"preset": "smok"}, "run.yaml: preset: unknown preset 'smok'; did you mean 'smoke'?"),
        ({"data": {"dataset": "mnist"}}, "run.yaml: distill: required key is missing"),
        ({"preset": "smoke", "data": {"dataset": "imagenet"}}, "run.yaml: data.dataset: Input should be"),
        ({"preset": "smoke", "distill": {"selection": "random"}}, "run.yaml: distill.selection"),
        ({"preset": "smoke", "evaluate": {"models": []}}, "run.yaml: evaluate.models: Tuple should have at least 1"),
        ({"preset": "smoke", "data": {"seed": "one"}}, "run.yaml: data.seed: Input should be a valid integer"),
        ({"preset": "smoke", "augment": {"strategy": "crop_mirror"}},
         "run.yaml: augment.strategy: unknown family 'mirror': families joined by '_', from color, crop"),
        ([1, 2], "run.yaml: expected a mapping"),
    ],
)
def test_bad_configs_give_one_line_naming_the_key(raw, expected):
    assert expected in _error(raw)


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("preset: smoke\ndistill: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: YAML syntax error at line 3"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("preset: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(path)
    assert not (tmp_path / "pwned").exists()


def test_absolute_paths_keep_uris_and_resolve_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(build_config({"preset": "smoke", "store_dir": "s3://bucket/store", "output_dir": "runs"}))
    assert cfg.store_dir == "s3://bucket/store"
    assert cfg.output_dir == str(tmp_path / "runs") and cfg.data.root == str((tmp_path / "../shared/data").resolve())


@pytest.mark.parametrize(("base", "ipc", "expected"), [
    ("cifar10-ipc10", 50, "cifar10-ipc50"),
    ("cifar10-ipc10-released", 50, "cifar10-ipc50-released"),
    ("cifar100-ipc1-released", 10, "cifar100-ipc10-released"),
    ("smoke", 10, "smoke"),
])
def test_a_swept_ipc_takes_the_preset_of_the_same_family(base, ipc, expected):
    from pad_ray.sweep_config import SweepConfig, trial_config

    sweep = SweepConfig.model_validate({"name": "s", "base": {"preset": base}, "space": {"ipc": {"kind": "grid", "values": [ipc]}}})
    cfg = trial_config(sweep, {"ipc": ipc})
    assert cfg.preset == expected and cfg.distill.ipc == ipc
    if expected.endswith("-released"):
        assert cfg.distill.selection == "loss"
