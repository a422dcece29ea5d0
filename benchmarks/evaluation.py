"""Evaluation cost: K nets trained one after another (`pad_ray.evaluate.evaluate`) vs together (vmap).

    python3 benchmarks/evaluation.py [--quick]

A random synthetic set of CIFAR-10 shape (IPC 1 and IPC 10, soft labels), the ConvNet, the
evaluation protocol (SGD, momentum 0.9, weight decay 5e-4, DSA on every batch, lr x0.1 at half),
K = 5 nets, fewer epochs than the default 1000 (the cost is linear in epochs; s/epoch is given).

`evaluate` trains the K nets in turn. The vmap variant builds the same K seeded nets, stacks their
parameters (`torch.func.stack_module_state`) and takes every optimisation step for all K at once
with `vmap(grad(loss))` over a `functional_call` of one meta-device copy; each net keeps its own
generator, so its minibatch order and DSA draws are those `train_on` would use. Reported: time,
the largest parameter difference from the sequentially trained nets, and whether net 0 trained in
a group of K is bit-identical to net 0 trained alone (so a net's result would not depend on K).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "evaluation"
FULL_ROWS = [{"ipc": 1, "epochs": 300, "nets": 5, "width": 128}, {"ipc": 10, "epochs": 30, "nets": 5, "width": 128}]
QUICK_ROWS = [{"ipc": 1, "epochs": 20, "nets": 3, "width": 16}, {"ipc": 10, "epochs": 5, "nets": 3, "width": 16}]


def _problem(p: dict):
    import torch

    from pad_ray.config import EvalConfig, ModelConfig
    from pad_ray.data import Split
    from pad_ray.evaluate import SyntheticSet

    gen = torch.Generator().manual_seed(0)
    n = 10 * p["ipc"]
    synthetic = SyntheticSet(torch.randn(n, 3, 32, 32, generator=gen), torch.randn(n, 10, generator=gen), 0.01)
    held = Split(torch.randn(500, 3, 32, 32, generator=gen), torch.randint(0, 10, (500,), generator=gen),
                 torch.arange(500))
    return synthetic, held, ModelConfig(width=p["width"]), EvalConfig(num_nets=p["nets"], epochs=p["epochs"])


def train_vmapped(synthetic, model_cfg, cfg, seeds: list[int], device):
    """Train len(seeds) nets together; returns their stacked parameters {name: [K, ...]}."""
    import copy

    import torch
    from torch.func import functional_call, grad, stack_module_state, vmap

    from pad_ray.augment import DSA
    from pad_ray.models import seeded_model
    from pad_ray.matching import soft_cross_entropy
    from pad_ray.runtime import generator

    channels, size = synthetic.images.shape[1], synthetic.images.shape[-1]
    classes = synthetic.labels.shape[1]
    nets = [seeded_model(model_cfg, channels, classes, size, s).to(device) for s in seeds]
    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    images, labels = synthetic.images.to(device), synthetic.labels.to(device)

    def loss(p, b, x, y):
        return soft_cross_entropy(functional_call(base, (p, b), (x,)), y)

    step = vmap(grad(loss))
    leaves = list(params.values())
    optimizer = torch.optim.SGD(leaves, lr=synthetic.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dsa = DSA() if cfg.dsa else None
    gens = [generator(s) for s in seeds]
    for epoch in range(cfg.epochs):
        if epoch == cfg.epochs // 2:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        orders = [torch.randperm(len(images), generator=g).split(cfg.batch_size) for g in gens]
        for batches in zip(*orders):
            xs, ys = [], []
            for g, batch in zip(gens, batches):
                x = images[batch.to(device)]
                xs.append(dsa(x, g) if dsa is not None else x)
                ys.append(labels[batch.to(device)])
            grads = step(params, buffers, torch.stack(xs), torch.stack(ys))
            for leaf, name in zip(leaves, params):
                leaf.grad = grads[name]
            optimizer.step()
    return params


def child(p: dict) -> dict:
    import torch

    from pad_ray.evaluate import accuracy, evaluate, train_on
    from pad_ray.models import seeded_model
    from pad_ray.runtime import derive_seed

    dev = common.device()
    threads = common.set_threads(p["threads"]) if dev.type == "cpu" else None
    synthetic, held, model_cfg, cfg = _problem(p)
    seed = 11
    seeds = [derive_seed(seed, "eval", "convnet", k) for k in range(p["nets"])]

    # Warm-up: a process's first convolutions of each shape are slow (oneDNN primitive creation).
    evaluate(synthetic, held, held, 10, model_cfg, cfg.model_copy(update={"num_nets": 1, "epochs": 2}), seed, dev,
             models=("convnet",))
    train_vmapped(synthetic, model_cfg, cfg.model_copy(update={"epochs": 2}), seeds, dev)
    common.sync(dev)
    began = time.perf_counter()
    scores = evaluate(synthetic, held, held, 10, model_cfg, cfg, seed, dev, models=("convnet",))
    common.sync(dev)
    evaluate_s = time.perf_counter() - began

    # The same nets trained by train_on, kept, to compare the vmapped ones with.
    sequential = []
    began = time.perf_counter()
    for s in seeds:
        net = seeded_model(model_cfg, 3, 10, 32, s).to(dev)
        sequential.append(train_on(synthetic, net, cfg, s, dev))
    common.sync(dev)
    train_only_s = time.perf_counter() - began

    began = time.perf_counter()
    stacked = train_vmapped(synthetic, model_cfg, cfg, seeds, dev)
    common.sync(dev)
    vmap_s = time.perf_counter() - began
    alone = train_vmapped(synthetic, model_cfg, cfg, seeds[:1], dev)
    same_alone = all(torch.equal(stacked[k][0], alone[k][0]) for k in stacked)

    diffs, accs, vaccs = [], [], []
    for k, net in enumerate(sequential):
        for name, param in net.named_parameters():
            diffs.append(float((param.detach() - stacked[name][k]).abs().max()))
        trained = seeded_model(model_cfg, 3, 10, 32, seeds[k]).to(dev)
        with torch.no_grad():
            for name, param in trained.named_parameters():
                param.copy_(stacked[name][k])
        vaccs.append(accuracy(trained, held, dev))
        accs.append(accuracy(net, held, dev))
    return {**p, "device": str(dev), "threads": threads, "evaluate_s": evaluate_s,
            "evaluate_s_per_net_epoch": evaluate_s / p["nets"] / p["epochs"],
            "sequential_train_s": train_only_s, "vmap_train_s": vmap_s, "vmap_speedup": train_only_s / vmap_s,
            "max_param_diff": max(diffs), "bitwise_equal_to_sequential": max(diffs) == 0.0,
            "net0_same_in_group_and_alone": same_alone, "accuracy_sequential": accs, "accuracy_vmap": vaccs,
            "evaluate_val": scores.val["convnet"],
            "projected_default_eval_s": evaluate_s / p["epochs"] * 1000}


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0]).parse_args(argv)
    meta = common.machine()
    print(f"# {NAME} on {meta['cpu']} ({meta['usable_cores']} cores), load {meta['load_average_at_start']}",
          flush=True)
    rows = []
    for spec in QUICK_ROWS if args.quick else FULL_ROWS:
        row = common.run_child(__file__, {**spec, "threads": args.threads, "allocator": args.allocator},
                               timeout_s=1200, env=common.allocator_env(args.allocator))
        rows.append(row)
        print({k: row.get(k) for k in ("ipc", "evaluate_s", "sequential_train_s", "vmap_train_s", "max_param_diff",
                                       "net0_same_in_group_and_alone", "error")}, flush=True)
    print()
    print(common.table(rows, [("ipc", "IPC"), ("nets", "K"), ("epochs", "epochs"), ("evaluate_s", "evaluate s"),
                              ("evaluate_s_per_net_epoch", "s/net/epoch"),
                              ("projected_default_eval_s", "K nets x 1000 ep s"),
                              ("sequential_train_s", "train_on x K s"), ("vmap_train_s", "vmap s"),
                              ("vmap_speedup", "vmap speed-up"), ("max_param_diff", "max |dparam|"),
                              ("net0_same_in_group_and_alone", "net0 same alone"), ("error", "error")]))
    summary = {f"ipc{r['ipc']}_vmap_speedup": r.get("vmap_speedup") for r in rows}
    name = NAME if args.allocator == "default" else f"{NAME}-{args.allocator}"
    print(f"\nwrote {common.write_results(name, args.quick, meta, rows, summary)}")
    return 0


if __name__ == "__main__":
    common.entry(child, main)
