"""Peak memory of one distillation iteration on both gradient paths, fitted to `pad_ray.plan`'s model.

    python3 benchmarks/memory_model.py [--quick] [--constants-only]

Each row runs two outer iterations (`plan_steps` + the gradient path, as `distill_iteration.py` does)
in a fresh process and records its peak (max RSS on the CPU, max reserved on CUDA). The rows vary
what the model says memory depends on: the inner steps N, the synthetic batch, and the network's
activations and parameters (the CIFAR-10 ConvNet at width 128 and 64, and the depth-4 Tiny ImageNet
ConvNet on 64x64 images). Memory does not depend on time, so the rows use small N and batches.

The fit (`pad_ray.plan.fit_memory`) goes with the rows to `results/memory_model[-cuda].json`, and
into `pad_ray/plan_constants.json` under this device kind with this benchmark's name and date; the
same file takes the expert throughput of `results/experts[-cuda].json` (`--constants-only` rewrites
it from the results already there, without measuring).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "memory_model"
CONSTANTS = common.REPO / "pad_ray" / "plan_constants.json"
SHAPES = {  # channels, size, classes, width, depth
    "cifar10": (3, 32, 10, 128, 3),
    "cifar10-width64": (3, 32, 10, 64, 3),
    "tinyimagenet": (3, 64, 200, 128, 4),
}
FULL_ROWS = [  # shape, path, batch, N
    ("cifar10", "unrolled", 10, 4), ("cifar10", "unrolled", 10, 12), ("cifar10", "unrolled", 40, 4),
    ("cifar10", "unrolled", 40, 8), ("cifar10", "unrolled", 100, 6), ("cifar10-width64", "unrolled", 20, 8),
    ("tinyimagenet", "unrolled", 8, 3),
    ("cifar10", "constant_memory", 10, 4), ("cifar10", "constant_memory", 10, 16),
    ("cifar10", "constant_memory", 40, 4), ("cifar10", "constant_memory", 80, 3),
    ("cifar10", "constant_memory", 100, 4),
    ("cifar10-width64", "constant_memory", 40, 4), ("tinyimagenet", "constant_memory", 8, 3),
]
QUICK_ROWS = [("cifar10-width64", "unrolled", 4, 2), ("cifar10-width64", "unrolled", 4, 4),
              ("cifar10-width64", "constant_memory", 4, 2), ("cifar10-width64", "constant_memory", 8, 2)]


def child(p: dict) -> dict:
    import torch

    from pad_ray.augment import DSA
    from pad_ray.matching import GRADIENT_PATHS, plan_steps
    from pad_ray.models import ConvNet, FlatParams

    dev = common.device()
    if dev.type == "cpu":
        common.set_threads(p["threads"])
    channels, size, classes, width, depth = SHAPES[p["shape"]]
    torch.manual_seed(0)
    net = FlatParams(ConvNet(channels, classes, size, width, depth).to(dev))
    images_count = max(p["batch"], classes)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(images_count, channels, size, size, generator=gen).to(dev)
    labels = torch.randn(images_count, classes, generator=gen).to(dev)
    start = net.flatten()
    target = start + 0.01 * torch.randn(start.shape, generator=gen).to(dev)
    dsa = DSA()
    for _ in range(2):  # the second iteration meets the first one's allocator state, as a trial's do
        plan = plan_steps(images_count, p["batch"], p["steps"], (size, size), dsa, gen)
        GRADIENT_PATHS[p["path"]](net, images, labels, torch.tensor(0.01, device=dev), start, target, plan, dsa,
                                  0.25, "depth")
    common.sync(dev)
    return {**p, "device": dev.type, "params": net.size, "images": images_count,
            "image_floats": channels * size * size, "classes": classes,
            "peak_bytes": common.peak_memory_bytes(dev), "width": width, "depth": depth}


def _with_activations(row: dict) -> dict:
    from pad_ray.config import ModelConfig
    from pad_ray.plan import convnet_shape

    channels, size, classes, width, depth = SHAPES[row["shape"]]
    net = convnet_shape(channels, size, classes, ModelConfig(width=width, depth=depth))
    assert net.params == row["params"], (net, row)  # the plan's layer walk is the ConvNet's
    return {**row, "activations": net.activations}


def write_constants() -> Path:
    """plan_constants.json from the results of this benchmark and of experts.py, per device kind."""
    from pad_ray.config import ModelConfig
    from pad_ray.plan import convnet_shape

    out = json.loads(CONSTANTS.read_text()) if CONSTANTS.exists() else {}
    out = {"memory": out.get("memory", {}), "experts": out.get("experts", {})}
    for device, suffix in (("cpu", ""), ("cuda", "-cuda")):
        memory = common.RESULTS / f"{NAME}{suffix}.json"
        if memory.is_file():
            fit = json.loads(memory.read_text())["summary"]["fit"]
            out["memory"][device] = fit
        experts = common.RESULTS / f"experts{suffix}.json"
        if experts.is_file():
            found = json.loads(experts.read_text())
            bare = next(r for r in found["rows"] if r.get("mode") == "bare" and "steady_images_per_s" in r)
            # The rate as forward GFLOP/s, so that it carries over to other networks by their FLOPs.
            net = convnet_shape(3, 32, 10, ModelConfig(width=bare["width"], depth=3))
            out["experts"][device] = {
                "gflop_per_s": round(bare["steady_images_per_s"] * net.flops / 1e9, 2),
                "source": f"benchmarks/experts.py, {found['machine']['date_utc']}, bare loop, "
                          f"{bare['steady_images_per_s']:.0f} img/s on {found['machine']['cpu']} "
                          f"({'SGD, 1 thread' if device == 'cpu' else 'SGD'})"}
    CONSTANTS.write_text(json.dumps(out, indent=2) + "\n")
    return CONSTANTS


def main(argv: list[str] | None = None) -> int:
    parser = common.parse_args(__doc__.splitlines()[0])
    parser.add_argument("--constants-only", action="store_true")
    args = parser.parse_args(argv)
    if args.constants_only:
        print(f"wrote {write_constants()}")
        return 0
    from pad_ray.plan import fit_memory

    meta = common.machine()
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), cuda: {meta['cuda']}, "
          f"load {meta['load_average_at_start']}", flush=True)
    rows = []
    for shape, path, batch, steps in QUICK_ROWS if args.quick else FULL_ROWS:
        row = common.run_child(__file__, {"shape": shape, "path": path, "batch": batch, "steps": steps,
                                          "threads": args.threads}, timeout_s=1800)
        if "error" in row:
            raise SystemExit(f"{shape} {path} batch {batch} N {steps}: {row['error']}")
        rows.append(_with_activations(row))
        print(f"{shape} {path} batch {batch} N {steps}: peak {row['peak_bytes'] / common.GB:.2f} GB", flush=True)
    device = rows[0]["device"]
    fit = fit_memory(rows, device, f"benchmarks/memory_model.py, {meta['date_utc']}, {meta['cpu']}"
                     + (f", {meta['cuda']}" if meta["cuda"] else ""))
    for row in rows:
        row["model_bytes"] = fit.peak_bytes(row["path"], _net(row), row["steps"], row["batch"], row["images"],
                                            row["image_floats"], row["classes"])
        row["model_error"] = row["model_bytes"] / row["peak_bytes"] - 1
        row["peak_gb"], row["model_gb"] = row["peak_bytes"] / common.GB, row["model_bytes"] / common.GB
    summary = {"fit": {k: v for k, v in vars(fit).items() if k != "device"}}
    columns = [("shape", "shape"), ("path", "path"), ("batch", "batch"), ("steps", "N"), ("peak_gb", "peak GB"),
               ("model_gb", "model GB"), ("model_error", "error")]
    common.report(NAME, args.quick, meta, rows, columns, summary)
    if not args.quick:
        print(f"wrote {write_constants()}")
    return 0


def _net(row: dict):
    from pad_ray.plan import NetShape

    return NetShape(row["params"], row["activations"], 0)


if __name__ == "__main__":
    common.entry(child, main)
