"""The ConvNet's 2x2 pooling (`pad_ray.pooling`) against `F.avg_pool2d`: alone, and in the steps that use it.

    python3 benchmarks/pooling.py [--quick] [--threads T]

Each row runs in its own child process, which builds the same ConvNet twice, once with `nn.AvgPool2d` in
place of pad_ray's pooling, and times the two alternately on the same inputs (one warm-up each, then rounds
of one of each); a row reports the median of each and library / pad_ray. Rows: the pooling's forward and
backward alone on the first block's maps; an evaluation net's training (`evaluate.train_on`, epochs of
the preset's set size and batch); and one outer distillation iteration on the unrolled path (`unrolled_gradients`
with DSA and the depth mask). Shapes are those of the MNIST presets (width 32, 28x28, padded to 32) and of the
CIFAR-10 ConvNet (width 128, 32x32). Every row also checks that both give the same floats.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "pooling"
# (what, channels, image size, width, images, N or epochs)
ROWS = [("pool", 1, 28, 32, 100, 0), ("pool", 3, 32, 128, 100, 0),
        ("evaluation", 1, 28, 32, 10, 100), ("evaluation", 1, 28, 32, 100, 20), ("evaluation", 3, 32, 128, 10, 100),
        ("iteration", 1, 28, 32, 100, 30), ("iteration", 3, 32, 128, 10, 20)]
QUICK_ROWS = [("pool", 1, 28, 8, 10, 0), ("evaluation", 1, 28, 8, 10, 2), ("iteration", 1, 28, 8, 10, 2)]


def _nets(channels: int, size: int, width: int):
    import torch
    from torch import nn

    from pad_ray.models import ConvNet
    from pad_ray.pooling import AvgPool2x2

    torch.manual_seed(0)
    fast = ConvNet(channels, 10, size, width=width)
    library = ConvNet(channels, 10, size, width=width)
    library.load_state_dict(fast.state_dict())
    for i, layer in enumerate(library.features):
        if isinstance(layer, AvgPool2x2):
            library.features[i] = nn.AvgPool2d(kernel_size=2, stride=2)
    return fast, library


def _workload(p: dict, net):
    """A function that runs the row's work once on `net` (for a "pool" row, on its first pooling layer) and
    returns what it computed."""
    import torch

    from pad_ray.augment import dsa_if
    from pad_ray.config import EvalConfig
    from pad_ray.evaluate import SyntheticSet, train_on
    from pad_ray.matching import plan_steps, unrolled_gradients
    from pad_ray.models import FlatParams

    gen = torch.Generator().manual_seed(1)
    n, c, size, width = p["images"], p["channels"], p["size"], p["width"]
    if p["what"] == "pool":
        pooled = 32 if size == 28 else size  # the first block's maps: 28x28 inputs are padded to 32
        x = torch.randn(n, width, pooled, pooled, generator=gen, requires_grad=True)
        grad = torch.randn(n, width, pooled // 2, pooled // 2, generator=gen)
        pool = net.features[3]  # conv, norm, ReLU, then the first block's pooling
        return lambda: torch.autograd.grad(pool(x), x, grad)[0]
    images, labels = torch.randn(n, c, size, size, generator=gen), torch.randn(n, 10, generator=gen)
    if p["what"] == "evaluation":
        synthetic, cfg = SyntheticSet(images, labels, 0.01), EvalConfig(epochs=p["steps"], batch_size=128)
        initial = {k: v.clone() for k, v in net.state_dict().items()}

        def train():
            net.load_state_dict(initial)
            trained = train_on(synthetic, net, cfg, 0, torch.device("cpu"))
            return torch.cat([q.detach().flatten() for q in trained.parameters()])
        return train
    flat = FlatParams(net)
    start = flat.flatten()
    target = start + 0.01 * torch.randn(flat.size, generator=gen)
    dsa = dsa_if(True, "color_crop_cutout_scale_rotate")

    def iteration():
        plan = plan_steps(n, n, p["steps"], (size, size), dsa, torch.Generator().manual_seed(2))
        out = unrolled_gradients(flat, images, labels, torch.tensor(0.01), start, target, plan, dsa, 0.1, "depth")
        return out.grad_images
    return iteration


def child(p: dict) -> dict:
    import torch

    from pad_ray.runtime import keep_freed_memory_in_heap

    common.set_threads(p["threads"])
    keep_freed_memory_in_heap()  # as every CPU stage of pad_ray runs
    fast, library = _nets(p["channels"], p["size"], p["width"])
    runs = {"fast": _workload(p, fast), "library": _workload(p, library)}
    same = torch.equal(runs["fast"](), runs["library"]())  # also the warm-up
    times: dict[str, list[float]] = {"fast": [], "library": []}
    for _ in range(p["rounds"]):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    return {"fast_s": statistics.median(times["fast"]), "library_s": statistics.median(times["library"]),
            "same_floats": same}


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0]).parse_args(argv)
    meta = common.machine()
    threads = args.threads or meta["usable_cores"]
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), {threads} threads, "
          f"load {meta['load_average_at_start']}", flush=True)
    rows = []
    for what, channels, size, width, images, steps in (QUICK_ROWS if args.quick else ROWS):
        rounds = {"pool": 50, "evaluation": 5, "iteration": 5}[what] if not args.quick else 2
        payload = {"what": what, "channels": channels, "size": size, "width": width, "images": images,
                   "steps": steps, "threads": threads, "rounds": rounds}
        row = {k: payload[k] for k in ("what", "size", "width", "images", "steps", "rounds")}
        row.update(common.run_child(__file__, payload, env=common.allocator_env(args.allocator)))
        if "error" not in row:
            row["library_over_fast"] = row["library_s"] / row["fast_s"]
        rows.append(row)
        print(row, flush=True)
    done = [r for r in rows if "error" not in r]
    summary = {"all_same_floats": all(r["same_floats"] for r in done) if done else None,
               "min_library_over_fast": min((r["library_over_fast"] for r in done), default=None)}
    common.report(NAME, args.quick, meta, rows,
                  [("what", "what"), ("size", "image"), ("width", "width"), ("images", "images"),
                   ("steps", "N or epochs"), ("rounds", "rounds"), ("library_s", "F.avg_pool2d s"),
                   ("fast_s", "pad_ray s"), ("library_over_fast", "library / pad_ray"),
                   ("same_floats", "same floats"), ("error", "error")], summary)
    return 0


if __name__ == "__main__":
    common.entry(child, main)
