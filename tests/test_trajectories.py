"""The content-addressed store (expert trajectories, difficulty orders) and the safe file helpers."""

import io
import os

import fsspec
import numpy as np
import pytest
import torch
from fsspec.core import url_to_fs

from conftest import tiny_config, write_malicious_pickle
from pad_ray import files, trajectories
from pad_ray.data import prepare
from pad_ray.trajectories import DifficultyCache, TrajectoryStore



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
    # Nor do the distillation and evaluation settings, the run's seed among them: repeats of a
    # config share their experts.
    assert _key(tmp_path, distill={"lr_img": 3}, evaluate={"num_nets": 9}, seed=11) == _key(tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"schedule": {"init_ratio": 0.75}},
        {"schedule": {"remove": []}},
        {"experts": {"optimizer": "gsam"}},
        {"experts": {"lr": 0.02}},
        {"experts": {"epochs": 6}},
        {"data": {"seed": 4}},
        {"experts": {"seed": 4}},
        {"model": {"width": 8}},
        {"difficulty": {"epochs": 2}},
        {"data": {"val_fraction": 0.1}},
        {"data": {"train_per_class": 30}},
        {"data": {"zca": True}},
        {"augment": {"strategy": "crop_scale_rotate"}},
    ],
    ids=lambda change: str(change),
)
def test_settings_that_change_the_experts_change_the_directory(tmp_path, change):
    assert _key(tmp_path, **change) != _key(tmp_path)


def test_the_default_augmentation_keeps_the_keys_of_stores_that_predate_its_key(tmp_path):
    cfg = tiny_config(tmp_path)
    assert "augment" not in TrajectoryStore(cfg.store_dir, cfg).identity
    # Experts trained without DSA do not depend on its strategy.
    plain = {"experts": {"dsa": False}}
    assert _key(tmp_path, augment={"strategy": "crop"}, **plain) == _key(tmp_path, **plain)
    # EL2N does not augment: the scores are shared.
    other = tiny_config(tmp_path, augment={"strategy": "crop"})
    assert DifficultyCache(other.store_dir, other).path == DifficultyCache(cfg.store_dir, cfg).path


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
    # The split's seed draws another split and seeds the EL2N runs.
    other = tiny_config(tmp_path, data={"seed": 4})
    assert DifficultyCache(other.store_dir, other).load() is None
    # The schedule, the experts (their seed too) and the distillation seed do not affect the order.
    same = tiny_config(tmp_path, schedule={"init_ratio": 0.9}, experts={"optimizer": "gsam", "seed": 4}, seed=11)
    assert DifficultyCache(same.store_dir, same).path == cache.path


def test_a_new_model_layout_scores_again(tmp_path, monkeypatch):
    # EL2N trains the agent model: scores of an older parameter layout are not this layout's.
    cfg = tiny_config(tmp_path)
    before = DifficultyCache(cfg.store_dir, cfg).path
    monkeypatch.setattr(trajectories, "MODEL_LAYOUT", trajectories.MODEL_LAYOUT + 1)
    assert DifficultyCache(cfg.store_dir, cfg).path != before


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
    write_malicious_pickle(path, marker, fmt)
    with pytest.raises(files.IntegrityError, match="unreadable checkpoint"):
        files.load_torch(path)
    assert not marker.exists()


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


# The same store on shared storage given as a URI. `memory://` is fsspec's in-memory filesystem: a
# real backend taking the remote path (one write per object, reads into memory), unlike local disk.

@pytest.fixture
def memory_root():
    """A store root on the in-memory filesystem, emptied afterwards (it is process-global)."""
    memory = fsspec.filesystem("memory")
    memory.store.clear()
    yield "memory://pad-store"
    memory.store.clear()


def _put(location, data):
    """Write an object behind the store's back (a damaged or hostile one)."""
    fs, path = url_to_fs(location)
    fs.pipe_file(path, data)


def _get(location):
    fs, path = url_to_fs(location)
    return fs.cat_file(path)


def _memory_objects():
    return sorted(fsspec.filesystem("memory").store)


def _memory_store(tmp_path, root, **sections):
    cfg = tiny_config(tmp_path, **sections).model_copy(update={"store_dir": root})
    return cfg, TrajectoryStore(cfg.store_dir, cfg)


def test_uri_store_round_trip(tmp_path, memory_root):
    _, store = _memory_store(tmp_path, memory_root)
    assert store.dir == f"memory:///pad-store/experts/{store.key}"
    assert store.missing(3) == [0, 1, 2]
    first, third = _trajectory(0), _trajectory(2)
    store.save(0, first)
    store.save(2, third)
    assert store.missing(3) == [1]
    loaded = store.load(2)
    assert loaded.dtype == np.float32 and loaded.shape == third.shape
    np.testing.assert_array_equal(loaded, third.astype(np.float32))
    # Read into memory, but read-only like the memory map a local store gives.
    assert not isinstance(loaded, np.memmap) and not loaded.flags.writeable
    np.testing.assert_array_equal(store.load(0), first.astype(np.float32))
    assert files.load_array(store._paths(0)[0], store.info(0)["sha256"], mmap=False).flags.writeable
    with pytest.raises(files.IntegrityError, match="missing"):
        store.load(1)
    assert files.read_json(files.join(store.dir, "identity.json")) == store.identity
    assert store.info(0) == {"sha256": files.sha256(store._paths(0)[0]), "shape": [6, 37], "resumed_at": []}
    # Exactly the objects of the layout, under the root, and nothing on local disk.
    names = [f"/pad-store/experts/{store.key}/{name}" for name in
             ("expert_00000.json", "expert_00000.npy", "expert_00002.json", "expert_00002.npy", "identity.json")]
    assert _memory_objects() == names
    assert not (tmp_path / "store").exists()


def test_uri_store_partial_checkpoints(tmp_path, memory_root):
    _, store = _memory_store(tmp_path, memory_root)
    assert store.load_partial(0) is None
    state = {"run": {"epoch": 2, "weights": torch.arange(3.0)}, "resumed_at": [1]}
    store.save_partial(0, state)
    assert files.exists(store.partial_path(0))
    loaded = store.load_partial(0)
    assert loaded["resumed_at"] == [1] and torch.equal(loaded["run"]["weights"], state["run"]["weights"])
    # A damaged checkpoint is no checkpoint: the expert restarts rather than resume from it.
    _put(store.partial_path(0), _get(store.partial_path(0))[:-50])
    assert store.load_partial(0) is None
    # Finishing the expert removes its checkpoint.
    store.save_partial(0, state)
    store.save(0, _trajectory(0), resumed_at=[1])
    assert not files.exists(store.partial_path(0))
    assert store.load_partial(0) is None
    assert store.info(0)["resumed_at"] == [1]


def _damage_object(location, how):
    data = _get(location)
    if how == "truncated":
        _put(location, data[: len(data) // 2])
    elif how == "altered":
        _put(location, data[:-1] + bytes([data[-1] ^ 0x01]))
    else:
        files.remove(location)


@pytest.mark.parametrize("how", ["truncated", "altered", "deleted"])
def test_uri_store_damaged_expert_is_missing_and_never_loaded(tmp_path, memory_root, how):
    _, store = _memory_store(tmp_path, memory_root)
    store.save(0, _trajectory(0))
    store.save(1, _trajectory(1))
    _damage_object(store._paths(1)[0], how)
    assert store.is_valid(0) and not store.is_valid(1)
    assert store.missing(2) == [1]
    with pytest.raises(files.IntegrityError):
        store.load(1)
    store.save(1, _trajectory(1))  # retraining repairs it
    assert store.missing(2) == []
    np.testing.assert_array_equal(store.load(1), _trajectory(1).astype(np.float32))


def test_uri_difficulty_cache_round_trip(tmp_path, memory_root):
    cfg = tiny_config(tmp_path).model_copy(update={"store_dir": memory_root})
    cache = DifficultyCache(cfg.store_dir, cfg)
    assert cache.load() is None
    cache.save(_order())
    loaded = DifficultyCache(memory_root, cfg).load()
    assert [o.tolist() for o in loaded] == [o.tolist() for o in _order()]
    assert all(o.dtype == torch.int64 for o in loaded)
    _damage_object(cache.path, "altered")
    assert cache.load() is None


def test_uri_load_torch_refuses_a_malicious_pickle_without_running_it(tmp_path, memory_root):
    marker = tmp_path / "pwned"
    location = files.join(memory_root, "ckpt.pt")
    write_malicious_pickle(tmp_path / "evil.pkl", marker)
    _put(location, (tmp_path / "evil.pkl").read_bytes())
    with pytest.raises(files.IntegrityError, match="unreadable checkpoint"):
        files.load_torch(location)
    assert not marker.exists()
    with pytest.raises(files.IntegrityError, match="missing"):
        files.load_torch(f"{memory_root}/absent.pt")


def test_uri_load_arrays_refuses_an_object_array(memory_root):
    buffer = io.BytesIO()
    np.savez(buffer, fine=np.arange(3), bad=np.array([{"a": 1}, None], dtype=object))
    location = files.join(memory_root, "objects.npz")
    _put(location, buffer.getvalue())
    with pytest.raises(files.IntegrityError, match="not a plain-array file"):
        files.load_arrays(location)
    with pytest.raises(files.IntegrityError, match="not a plain-array file"):
        files.load_arrays(location, files.sha256(location))  # a matching checksum does not make it safe


class _Exploding:
    """An array whose conversion fails, so `np.savez` dies after writing the entries before it."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_failed_write_leaves_the_previous_object_whole(tmp_path, memory_root, where):
    location = files.join(tmp_path if where == "local" else memory_root, "a.npz")
    digest = files.save_arrays(location, x=np.arange(5))
    with pytest.raises(RuntimeError, match="boom"):
        files.save_arrays(location, x=np.arange(7), y=_Exploding())
    np.testing.assert_array_equal(files.load_arrays(location, digest)["x"], np.arange(5))
    fresh = files.join(tmp_path if where == "local" else memory_root, "never.npz")
    with pytest.raises(RuntimeError, match="boom"):
        files.save_arrays(fresh, x=np.arange(7), y=_Exploding())
    assert not files.exists(fresh)
    assert _leftovers(tmp_path) == []


def test_file_uri_and_plain_path_name_the_same_store(tmp_path):
    cfg = tiny_config(tmp_path)
    plain = TrajectoryStore(str(tmp_path / "store"), cfg)
    uri = TrajectoryStore(f"file://{tmp_path / 'store'}", cfg)
    as_path = TrajectoryStore(tmp_path / "store", cfg)
    assert uri.dir == plain.dir == as_path.dir == tmp_path / "store" / "experts" / plain.key
    assert uri.partial_path(0) == plain.partial_path(0)
    uri.save(0, _trajectory(0))
    loaded = plain.load(0)
    assert isinstance(loaded, np.memmap)  # local disk stays memory-mapped whichever way it is named
    np.testing.assert_array_equal(loaded, _trajectory(0).astype(np.float32))
    assert plain.missing(2) == uri.missing(2) == [1]
    assert DifficultyCache(f"file://{tmp_path / 'store'}", cfg).path == DifficultyCache(cfg.store_dir, cfg).path


def test_remote_names_are_canonical(memory_root):
    assert files.join("memory://pad-store/", "a", "b.npy") == files.join("memory:///pad-store", "a", "b.npy")
    assert files.join("memory://pad-store", "a") == "memory:///pad-store/a"
