"""Shared fixtures: a tiny in-memory dataset and its experts for fast unit tests, and the real MNIST."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from pad_ray.config import RunConfig, build_config
from pad_ray.data import Dataset, Split
from pad_ray.experts import train_expert
from pad_ray.runtime import derive_seed

# Tiny problems run faster on one thread, and two threads fight over 2 cores when tests run in parallel.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(tmp_path: Path | None = None, **sections) -> RunConfig:
    """A 3-class, 8x8 problem: every stage runs in well under a second."""
    raw = {
        "seed": 3,
        "device": "cpu",
        "data": {"dataset": "mnist", "zca": False},
        "model": {"width": 4, "depth": 2},
        "difficulty": {"seeds": 2, "epochs": 1, "batch_size": 16},
        "schedule": {"init_ratio": 0.5, "add_end_epoch": 2, "remove": [{"after_epoch": 3, "easiest_fraction": 0.2}]},
        "experts": {"num_experts": 2, "epochs": 5, "optimizer": "sgd", "batch_size": 8, "lr": 0.05},
        "distill": {"ipc": 2, "alpha": 0.2, "syn_steps": 3, "expert_epochs": 2, "min_start_epoch": 0,
                    "current_max_start_epoch": 2, "max_start_epoch": 3, "interval": 2, "batch_syn": 4,
                    "lr_img": 10, "lr_lr": 1e-5, "lr_y": 2, "threshold": 10.0, "iterations": 4, "eval_every": 2},
        "evaluate": {"num_nets": 2, "epochs": 3, "batch_size": 8},
    }
    if tmp_path is not None:
        raw["output_dir"] = str(tmp_path / "runs")
        raw["store_dir"] = str(tmp_path / "store")
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return build_config(raw, "tiny")


def tiny_dataset(seed: int = 0) -> Dataset:
    """Three separable classes of 8x8 one-channel images (class c brightens row band c)."""
    gen = torch.Generator().manual_seed(seed)

    def split(n_per_class: int, offset: int) -> Split:
        labels = torch.arange(3).repeat_interleave(n_per_class)
        images = 0.3 * torch.randn(len(labels), 1, 8, 8, generator=gen)
        for c in range(3):
            images[labels == c, :, 2 * c:2 * c + 3, :] += 1.0
        return Split(images, labels, torch.arange(len(labels)) + offset)

    return Dataset("tiny", split(20, 0), split(4, 60), split(10, 0), 3, ["a", "b", "c"], None, (0.0,), (1.0,))


@pytest.fixture(scope="session")
def tiny():
    cfg = tiny_config()
    data = tiny_dataset()
    order = [torch.nonzero(data.train.labels == c).flatten() for c in range(3)]
    trajectories = [
        train_expert(data.train, order, 3, cfg.model, cfg.experts, cfg.schedule,
                     derive_seed(cfg.seed, "expert", i), torch.device("cpu"))
        for i in range(cfg.experts.num_experts)
    ]
    return cfg, data, order, trajectories


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    assert (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(), f"real MNIST missing under {SHARED_DATA}"
    return SHARED_DATA


class _Payload:
    """Unpickling this creates a directory at `marker`: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_malicious_pickle(path: Path, marker: Path, fmt: str = "pickle") -> None:
    """A file that runs code when unpickled (written by torch.save or plain pickle)."""
    if fmt == "torch.save":
        torch.save(_Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))


@pytest.fixture
def sweep_home(tmp_path, mnist_root, monkeypatch):
    """Where sweeps write (PAD_RAY_HOME) and read (PAD_RAY_DATA), as sweeps/smoke.yaml expects."""
    monkeypatch.setenv("PAD_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PAD_RAY_DATA", str(mnist_root))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    return tmp_path / "home"
