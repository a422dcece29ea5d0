"""Difficulty: each class's training samples ordered easy -> hard.

EL2N (Paul et al. 2021): train K short runs of the agent model, score every sample by
||softmax(f(x)) - onehot(y)||_2, average over the runs; a higher score is a harder sample.
Or load the authors' per-class index files: an int64 [C, n] tensor of global indices, easy first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pad_ray.config import ConfigError, DifficultyConfig, ModelConfig
from pad_ray.data import Split
from pad_ray.models import seeded_model
from pad_ray.runtime import generator, keep_freed_memory_in_heap


def el2n_run(train: Split, num_classes: int, model: ModelConfig, cfg: DifficultyConfig, seed: int,
             device: torch.device) -> torch.Tensor:
    """EL2N scores [N] from one run of `cfg.epochs` epochs (plain SGD with momentum, no augmentation)."""
    if torch.device(device).type == "cpu":
        keep_freed_memory_in_heap()  # reuse freed activation buffers instead of re-faulting them (runtime)
    images, labels = train.images.to(device), train.labels.to(device)
    net = seeded_model(model, images.shape[1], num_classes, images.shape[-1], seed).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9)
    gen = generator(seed)
    net.train()
    for _ in range(cfg.epochs):
        for batch in torch.randperm(len(labels), generator=gen).split(cfg.batch_size):
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(images[batch]), labels[batch]).backward()
            optimizer.step()
    net.eval()
    scores = []
    with torch.no_grad():
        for batch in torch.arange(len(labels), device=device).split(1024):
            probs = F.softmax(net(images[batch]), dim=1)
            scores.append((probs - F.one_hot(labels[batch], num_classes)).norm(dim=1))
    return torch.cat(scores).cpu()


def order_by_score(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Per class, the sample indices sorted by ascending score (easy first); stable for ties."""
    order = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        ranking = torch.argsort(scores[members], stable=True)
        order.append(members[ranking])
    return order


def load_index_file(path: str | Path, source_index: torch.Tensor, labels: torch.Tensor,
                    num_classes: int) -> list[torch.Tensor]:
    """Read an authors'-format [C, n] index file and map it onto our training split.

    The file holds indices into the full official training set; `source_index[i]` is the official
    index of our i-th training sample. Samples we do not hold (validation, subsets) are dropped while
    the easy -> hard order is kept. Accepts `.npy` or a tensor `.pt` (loaded with weights_only=True).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"difficulty.index_file: file not found: {path}")
    try:
        if path.suffix == ".npy":
            table = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"difficulty.index_file: cannot read {path} as an integer tensor (.npy, or .pt saved "
                          f"by torch.save): {detail}") from None
    if (not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != num_classes
            or table.shape[1] == 0 or table.dtype.is_floating_point or table.dtype.is_complex
            or table.dtype == torch.bool):
        shape = f"{tuple(table.shape)} {table.dtype}" if isinstance(table, torch.Tensor) else type(table).__name__
        raise ConfigError(f"difficulty.index_file: {path} must be an integer [{num_classes}, n] tensor, got {shape}")
    # Unsigned tables too: a uint64 above 2**63 wraps to a negative value, which is refused below.
    table = table.to(torch.int64)
    if (table < 0).any():
        raise ConfigError(f"difficulty.index_file: {path} holds negative indices")
    # Positions by binary search, not a table as long as the largest index: a damaged file may hold
    # an index of 2**40.
    official, position = torch.sort(source_index.to(torch.int64))
    order = []
    for c, row in enumerate(table):
        slot = torch.searchsorted(official, row).clamp(max=len(official) - 1)
        local = position[slot[official[slot] == row]]
        if (labels[local] != c).any():
            raise ConfigError(f"difficulty.index_file: {path} row {c} lists samples of another class")
        order.append(local)
    return order
