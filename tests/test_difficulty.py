"""Difficulty orders: EL2N scoring, sorting per class, and the authors' index files."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_dataset, write_malicious_pickle
from pad_ray.config import ConfigError
from pad_ray.data import Split
from pad_ray.difficulty import el2n_run, load_index_file, order_by_score

CPU = torch.device("cpu")



def test_order_by_score_sorts_each_class_ascending_and_keeps_ties_stable():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1])
    scores = torch.tensor([0.9, 0.2, 0.1, 0.5, 0.2, 0.4, 0.3, 0.05])
    order = order_by_score(scores, labels, 4)
    assert [o.tolist() for o in order] == [[2, 5, 0], [7, 1, 4], [6, 3], []]
    assert all(o.dtype == torch.int64 for o in order)
    for c, o in enumerate(order):
        assert (labels[o] == c).all()
        assert (scores[o].diff() >= 0).all()


def test_el2n_scores_are_bounded_and_reproducible():
    data = tiny_dataset()
    cfg = tiny_config()
    scores = el2n_run(data.train, 3, cfg.model, cfg.difficulty, seed=1, device=CPU)
    assert scores.shape == (len(data.train.labels),)
    assert scores.dtype == torch.float32
    assert (scores >= 0).all() and (scores <= math.sqrt(2) + 1e-6).all()
    assert torch.equal(el2n_run(data.train, 3, cfg.model, cfg.difficulty, seed=1, device=CPU), scores)
    assert not torch.equal(el2n_run(data.train, 3, cfg.model, cfg.difficulty, seed=2, device=CPU), scores)


def test_el2n_ranks_mislabelled_samples_hardest_in_their_class():
    data = tiny_dataset()
    labels = data.train.labels.clone()
    wrong = {0: 1, 7: 2, 22: 2, 31: 0, 45: 0, 52: 1}  # sample -> wrong label; two per (new) class
    for sample, label in wrong.items():
        labels[sample] = label
    train = Split(data.train.images, labels, data.train.index)
    cfg = tiny_config(difficulty={"epochs": 5, "batch_size": 8})
    scores = torch.stack([el2n_run(train, 3, cfg.model, cfg.difficulty, seed, CPU) for seed in (0, 1)]).mean(0)
    order = order_by_score(scores, labels, 3)
    for c in range(3):
        flipped = {s for s, label in wrong.items() if label == c}
        assert set(order[c][-2:].tolist()) == flipped, f"class {c}: hardest {order[c][-2:].tolist()}"
    # The clean samples were learned: their scores are far below the mislabelled ones.
    clean = torch.ones(len(labels), dtype=torch.bool)
    clean[list(wrong)] = False
    assert scores[clean].max() < scores[~clean].min()


# An "official" training set of 12 samples, 3 classes; our split holds 8 of them, in another order.
OFFICIAL_LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
SOURCE_INDEX = torch.tensor([10, 3, 0, 8, 5, 1, 9, 6])  # our i-th sample is official sample SOURCE_INDEX[i]
LABELS = OFFICIAL_LABELS[SOURCE_INDEX]
TABLE = torch.tensor([[9, 0, 6, 3], [1, 10, 4, 7], [11, 5, 2, 8]])  # official indices, easy -> hard


def _expected():
    position = {int(official): i for i, official in enumerate(SOURCE_INDEX)}
    return [[position[int(o)] for o in row if int(o) in position] for row in TABLE]


def _write(path, table):
    if path.suffix == ".npy":
        np.save(path, table.numpy())
    else:
        torch.save(table, path)
    return path


@pytest.mark.parametrize("name", ["order.pt", "order.npy"])
def test_index_file_maps_official_indices_onto_the_split(tmp_path, name):
    path = _write(tmp_path / name, TABLE)
    order = load_index_file(path, SOURCE_INDEX, LABELS, 3)
    # Row 0: 9 -> 6, 0 -> 2, 6 -> 7, 3 -> 1. Row 1: 1 -> 5, 10 -> 0, 4 and 7 dropped. Row 2: 11 dropped,
    # 5 -> 4, 2 dropped, 8 -> 3.
    assert [o.tolist() for o in order] == _expected() == [[6, 2, 7, 1], [5, 0], [4, 3]]
    for c, o in enumerate(order):
        assert o.dtype == torch.int64
        assert (LABELS[o] == c).all()


def test_index_file_with_all_samples_is_a_permutation_of_the_split(tmp_path):
    path = _write(tmp_path / "full.pt", torch.arange(12).view(4, 3).T.contiguous())
    order = load_index_file(path, torch.arange(12), OFFICIAL_LABELS, 3)
    assert torch.cat(order).sort().values.tolist() == list(range(12))
    assert order[1].tolist() == [1, 4, 7, 10]


@pytest.mark.parametrize(
    "table",
    [TABLE.flatten(), TABLE[:2], torch.cat([TABLE, TABLE[:1]]), TABLE.unsqueeze(0)],
    ids=["1-d", "too-few-rows", "too-many-rows", "3-d"],
)
def test_index_file_of_the_wrong_shape_is_rejected(tmp_path, table):
    path = _write(tmp_path / "bad.pt", table)
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: .*\[3, n\]"):
        load_index_file(path, SOURCE_INDEX, LABELS, 3)


@pytest.mark.parametrize(
    "table",
    [TABLE.double() + 0.5, TABLE > 4, torch.empty(3, 0, dtype=torch.int64)],
    ids=["float", "bool", "no-columns"],
)
def test_index_file_that_is_not_an_integer_table_is_rejected(tmp_path, table):
    path = _write(tmp_path / "bad.pt", table)
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: .*must be an integer \[3, n\] tensor"):
        load_index_file(path, SOURCE_INDEX, LABELS, 3)


def test_index_file_with_negative_indices_is_rejected(tmp_path):
    table = TABLE.clone()
    table[0, 2] = -6  # would wrap around to official index 6, a class-0 sample we hold
    path = _write(tmp_path / "negative.npy", table)
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: .*negative"):
        load_index_file(path, SOURCE_INDEX, LABELS, 3)


def test_index_file_of_another_integer_type_is_accepted(tmp_path):
    path = _write(tmp_path / "int32.npy", TABLE.int())
    assert [o.tolist() for o in load_index_file(path, SOURCE_INDEX, LABELS, 3)] == _expected()


def test_index_file_whose_rows_are_of_another_class_is_rejected(tmp_path):
    path = _write(tmp_path / "swapped.npy", TABLE[[1, 0, 2]])
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: .*row 0 lists samples of another class"):
        load_index_file(path, SOURCE_INDEX, LABELS, 3)


def test_missing_index_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: file not found"):
        load_index_file(tmp_path / "nowhere.pt", SOURCE_INDEX, LABELS, 3)


def test_index_file_that_is_not_a_tensor_is_rejected(tmp_path):
    torch.save({"order": TABLE}, tmp_path / "dict.pt")
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: .*got dict"):
        load_index_file(tmp_path / "dict.pt", SOURCE_INDEX, LABELS, 3)
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file at all")
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: cannot read"):
        load_index_file(tmp_path / "junk.pt", SOURCE_INDEX, LABELS, 3)


def test_npy_index_file_holding_objects_is_refused(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([[1, "a"], [2, "b"], [3, "c"]], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: cannot read"):
        load_index_file(tmp_path / "objects.npy", SOURCE_INDEX, LABELS, 3)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_malicious_pickle_index_file_is_refused_without_running_it(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    write_malicious_pickle(path, marker, fmt)
    with pytest.raises(ConfigError, match=r"difficulty\.index_file: cannot read"):
        load_index_file(path, SOURCE_INDEX, LABELS, 3)
    assert not marker.exists()
