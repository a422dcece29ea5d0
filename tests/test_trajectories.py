"""The content-addressed store (expert trajectories, difficulty orders) and the safe file helpers."""

import os
import pickle

import numpy as np
import pytest
import torch

from conftest import tiny_config
from pad_ray import files
from pad_ray.data import prepare
from pad_ray.trajectories import DifficultyCache, TrajectoryStore


class _Payload:
    """Unpickling this creates a directory at `marker`: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _trajectory(seed, epochs=5, size=37):
    return np.random.default_rng(seed).standard_normal((epochs + 1, size))


def _leftovers(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_store_round_trip_is_read_only_memory_mapped(tmp_path):
    cfg = tiny_config(tmp_path)
    store = TrajectoryStore(cfg.store_dir, cfg)
    assert store.missing(3) == [0, 1, 2]
    first, third = _trajectory(0), _trajectory(2)
    store.save(0, first)
    store.save(2, third)
    assert store.missing(3) == [1]
    assert store.missing(1) == []
    loaded = store.load(2)
    assert isinstance(loaded, np.memmap)
    assert loaded.dtype == np.float32 and loaded.shape == third.shape
    np.testing.assert_array_equal(loaded, third.astype(np.float32))
    assert not loaded.flags.writeable
    with pytest.raises(ValueError):
        loaded[0, 0] = 1.0
    np.testing.assert_array_equal(store.load(0), first.astype(np.float32))
    with pytest.raises(files.IntegrityError):
        store.load(1)
    assert files.read_json(store.dir / "identity.json") == store.identity
    assert _leftovers(tmp_path) == []


def test_saving_again_replaces_the_expert(tmp_path):
    cfg = tiny_config(tmp_path)
    store = TrajectoryStore(cfg.store_dir, cfg)
    store.save(0, _trajectory(0))
    store.save(0, _trajectory(1, epochs=3))
    np.testing.assert_array_equal(store.load(0), _trajectory(1, epochs=3).astype(np.float32))
    assert files.read_json(store.dir / "expert_00000.json")["shape"] == [4, 37]
    assert _leftovers(tmp_path) == []


def _key(tmp_path, **sections):
    cfg = tiny_config(tmp_path, **sections)
    return TrajectoryStore(cfg.store_dir, cfg).dir


def test_same_settings_share_a_directory(tmp_path):
    assert _key(tmp_path) == _key(tmp_path)
    assert _key(tmp_path).parent == tmp_path / "store" / "experts"
    # More experts extend the same set; where the data lives does not change what it holds.
    assert _key(tmp_path, experts={"num_experts": 7}) == _key(tmp_path)
    assert _key(tmp_path, data={"root": "/somewhere/else"}) == _key(tmp_path)
    # Nor do the distillation and evaluation settings.
    assert _key(tmp_path, distill={"lr_img": 3}, evaluate={"num_nets": 9}) == _key(tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"schedule": {"init_ratio": 0.75}},
        {"schedule": {"remove": []}},
        {"experts": {"optimizer": "gsam"}},
        {"experts": {"lr": 0.02}},
        {"experts": {"epochs": 6}},
        {"seed": 4},
        {"model": {"width": 8}},
        {"difficulty": {"epochs": 2}},
        {"data": {"val_fraction": 0.1}},
        {"data": {"train_per_class": 30}},
        {"data": {"zca": True}},
    ],
    ids=lambda change: str(change),
)
def test_settings_that_change_the_experts_change_the_directory(tmp_path, change):
    assert _key(tmp_path, **change) != _key(tmp_path)


def test_store_identity_follows_the_training_split(tmp_path, mnist_root):
    # The test subset never changes the training split, so it never changes the store directory.
    def train_index(test_size):
        return prepare("mnist", mnist_root, val_fraction=0.1, zca=False, seed=3, train_per_class=20,
                       test_size=test_size).train.index

    base = {"root": str(mnist_root), "train_per_class": 20, "val_fraction": 0.1}
    assert torch.equal(train_index(None), train_index(50))
    assert _key(tmp_path, data={**base, "test_size": None}) == _key(tmp_path, data={**base, "test_size": 50})
    assert not torch.equal(train_index(None), prepare("mnist", mnist_root, val_fraction=0.1, zca=False, seed=4,
                                                      train_per_class=20).train.index)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte, os.remove], ids=["truncated", "altered", "deleted"])
def test_damaged_expert_is_missing_and_never_loaded(tmp_path, damage):
    cfg = tiny_config(tmp_path)
    store = TrajectoryStore(cfg.store_dir, cfg)
    store.save(0, _trajectory(0))
    store.save(1, _trajectory(1))
    damage(store.dir / "expert_00001.npy")
    assert store.is_valid(0)
    assert not store.is_valid(1)
    assert store.missing(2) == [1]
    with pytest.raises(files.IntegrityError):
        store.load(1)
    store.save(1, _trajectory(1))  # retraining repairs it
    assert store.missing(2) == []


def test_expert_without_a_readable_sidecar_is_missing(tmp_path):
    cfg = tiny_config(tmp_path)
    store = TrajectoryStore(cfg.store_dir, cfg)
    store.save(0, _trajectory(0))
    store.save(1, _trajectory(1))
    (store.dir / "expert_00000.json").unlink()
    (store.dir / "expert_00001.json").write_text("{not json")
    assert store.missing(2) == [0, 1]
    with pytest.raises(files.IntegrityError):
        store.load(0)


def _order():
    return [torch.tensor([5, 0, 9]), torch.tensor([2, 7]), torch.tensor([1, 3, 8, 4, 6])]


def test_difficulty_cache_round_trip(tmp_path):
    cfg = tiny_config(tmp_path)
    cache = DifficultyCache(cfg.store_dir, cfg)
    assert cache.load() is None
    cache.save(_order())
    loaded = DifficultyCache(cfg.store_dir, tiny_config(tmp_path)).load()
    assert [o.tolist() for o in loaded] == [o.tolist() for o in _order()]
    assert all(o.dtype == torch.int64 for o in loaded)
    assert _leftovers(tmp_path) == []
    # Other scoring settings are another cache entry.
    other = tiny_config(tmp_path, difficulty={"epochs": 3})
    assert DifficultyCache(other.store_dir, other).load() is None
    # The schedule and the experts do not affect the difficulty order.
    same = tiny_config(tmp_path, schedule={"init_ratio": 0.9}, experts={"optimizer": "gsam"})
    assert DifficultyCache(same.store_dir, same).path == cache.path


@pytest.mark.parametrize("target", ["npz", "json"])
def test_corrupted_difficulty_cache_reads_as_absent(tmp_path, target):
    cfg = tiny_config(tmp_path)
    cache = DifficultyCache(cfg.store_dir, cfg)
    cache.save(_order())
    if target == "npz":
        _flip_last_byte(cache.path)
    else:
        cache.path.with_suffix(".json").write_text("{truncated")
    assert cache.load() is None


def test_difficulty_from_an_index_file_is_keyed_by_its_content(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(torch.arange(6).view(3, 2), first)
    torch.save(torch.arange(6).view(3, 2).flip(1), second)

    def path(index_file, **difficulty):
        cfg = tiny_config(tmp_path, difficulty={"index_file": str(index_file), **difficulty})
        return DifficultyCache(cfg.store_dir, cfg).path

    assert path(first) != path(second)
    assert path(first) == path(first, epochs=7, seeds=9)  # EL2N settings are unused with a file
    copy = tmp_path / "copy.pt"
    copy.write_bytes(first.read_bytes())
    assert path(copy) == path(first)


def test_load_torch_reads_a_plain_checkpoint(tmp_path):
    state = {"step": 3, "weights": torch.arange(4.0), "nested": {"lr": 0.5, "names": ["a", "b"]}}
    files.save_torch(tmp_path / "ckpt.pt", state)
    loaded = files.load_torch(tmp_path / "ckpt.pt")
    assert loaded["step"] == 3 and loaded["nested"] == {"lr": 0.5, "names": ["a", "b"]}
    assert torch.equal(loaded["weights"], state["weights"])
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_load_torch_refuses_a_malicious_pickle_without_running_it(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    if fmt == "torch.save":
        torch.save(_Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(files.IntegrityError, match="unreadable checkpoint"):
        files.load_torch(path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    if fmt == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_load_torch_rejects_a_damaged_or_missing_file(tmp_path):
    files.save_torch(tmp_path / "ckpt.pt", {"w": torch.ones(100)})
    _truncate(tmp_path / "ckpt.pt")
    with pytest.raises(files.IntegrityError):
        files.load_torch(tmp_path / "ckpt.pt")
    with pytest.raises(files.IntegrityError):
        files.load_torch(tmp_path / "absent.pt")


def test_load_arrays_round_trip_and_checksum(tmp_path):
    path = tmp_path / "a.npz"
    digest = files.save_arrays(path, x=np.arange(5), y=np.eye(2, dtype=np.float32))
    assert digest == files.sha256(path)
    arrays = files.load_arrays(path, digest)
    np.testing.assert_array_equal(arrays["x"], np.arange(5))
    np.testing.assert_array_equal(arrays["y"], np.eye(2))
    with pytest.raises(files.IntegrityError, match="checksum"):
        files.load_arrays(path, "0" * 64)
    with pytest.raises(files.IntegrityError, match="missing"):
        files.load_arrays(tmp_path / "absent.npz")


def test_load_arrays_refuses_an_object_array(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, fine=np.arange(3), bad=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(files.IntegrityError, match="not a plain-array file"):
        files.load_arrays(path)
    with pytest.raises(files.IntegrityError, match="not a plain-array file"):
        files.load_arrays(path, files.sha256(path))  # a matching checksum does not make it safe


def test_load_array_checks_the_checksum(tmp_path):
    path = tmp_path / "a.npy"
    digest = files.save_array(path, np.arange(10, dtype=np.float32))
    np.testing.assert_array_equal(files.load_array(path, digest, mmap=False), np.arange(10))
    with pytest.raises(files.IntegrityError, match="checksum"):
        files.load_array(path, "f" * 64)
