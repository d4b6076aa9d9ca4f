"""Seconds per fine-tuned p-model: PyTorch's own conv2d (one nn.Module at a time) against
`tina.zoo.finetune_pmodels`, which trains `pmodels_per_batch` p-models as one stacked network.

    python bench/finetune_speed.py --config configs/demo.yaml --tasks 16 --epochs 0.5

Real training images of the config's dataset, its architecture and recipe (epochs shortened by
--epochs: the cost per step does not depend on how many steps are taken), one thread as in each
zoo worker. Reports milliseconds per p-model per step and the projected seconds per p-model of the
configured recipe, for the one-at-a-time loop and each --per-batch value. Writes
bench/results/finetune_speed.json with the command, commit, nproc and CPU model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tina.backbones import build_model
from tina.config import load_config
from tina.data import ImageSet, load_split, to_float
from tina.pipeline import git_commit, machine
from tina.zoo import _batches, finetune_pmodels, init_pmodel


def one_module(generic, arch: str, task: tuple[int, ...], train: ImageSet, zoo, seed: int):
    """The recipe on one nn.Module with PyTorch's conv2d (the loop before tina.stacked)."""
    gen = torch.Generator().manual_seed(seed)
    data = train.task(task)
    keep = torch.randperm(len(data), generator=gen)[: zoo.max_train_images]
    data = ImageSet(data.images[keep], data.labels[keep], data.classes)
    model = init_pmodel(generic, arch, task)
    frozen = [c.weight for c in model.convs()[: zoo.frozen_convs]]  # generic weights, as tina.zoo
    opt = torch.optim.Adam([p for p in model.parameters() if all(p is not f for f in frozen)],
                           lr=zoo.lr)
    steps = 0
    for idx in _batches(len(data), zoo.batch_size, gen, zoo.epochs):
        loss = F.cross_entropy(model(to_float(data.images[idx])), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set zoo.frozen_convs=0")
    p.add_argument("--tasks", type=int, default=16, help="p-models per measurement")
    p.add_argument("--epochs", type=float, default=0.5, help="shortened recipe for the timing")
    p.add_argument("--per-batch", type=int, action="append", default=None,
                   help="pmodels_per_batch values to time (default: 1, 4, 8, 16)")
    p.add_argument("--out", default="bench/results/finetune_speed.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    train = load_split(cfg.data.dataset, "train", root=cfg.data.root)
    n, k = len(train.classes), cfg.zoo.k
    tasks = [tuple((i + j) % n for j in range(k)) for i in range(args.tasks)]
    generic = build_model(cfg.arch.name, train.images.shape[1], n)
    zoo = dataclasses.replace(cfg.zoo, epochs=args.epochs)
    images = min(min(len(train.task(t)) for t in tasks), cfg.zoo.max_train_images or 10**12)
    full_steps = round(cfg.zoo.epochs * images / cfg.zoo.batch_size)
    rows = []
    t0 = time.perf_counter()
    steps = [one_module(generic, cfg.arch.name, t, train, zoo, i) for i, t in enumerate(tasks)]
    ms = (time.perf_counter() - t0) / sum(steps) * 1e3
    rows.append({"method": "nn.Module, conv2d", "pmodels_per_batch": 1, "ms_per_pmodel_step": ms,
                 "s_per_pmodel_projected": ms * full_steps / 1e3})
    print(json.dumps(rows[-1]), flush=True)
    for b in args.per_batch or [1, 4, 8, 16]:
        z = dataclasses.replace(zoo, pmodels_per_batch=b)
        t0 = time.perf_counter()
        finetune_pmodels(generic, cfg.arch.name, tasks, train, z, list(range(len(tasks))))
        ms = (time.perf_counter() - t0) / sum(steps) * 1e3
        rows.append({"method": "tina.zoo.finetune_pmodels", "pmodels_per_batch": b,
                     "ms_per_pmodel_step": ms, "s_per_pmodel_projected": ms * full_steps / 1e3})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["ms_per_pmodel_step"]
    for r in rows:
        r["speedup"] = base / r["ms_per_pmodel_step"]
    res = {"command": "python " + " ".join(sys.argv), "git_commit": git_commit(), **machine(),
           "arch": cfg.arch.name, "batch_size": cfg.zoo.batch_size,
           "frozen_convs": cfg.zoo.frozen_convs, "tasks": len(tasks),
           "recipe_steps": full_steps, "timed_epochs": args.epochs,
           "best_speedup": max(r["speedup"] for r in rows[1:]),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
