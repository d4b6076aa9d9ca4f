"""Zoo fine-tuning recipes on `val` tasks (never test): the gain over the generic model and the
seconds per p-model, which is what issue 2's `finetuned - generic` bar and the time budget trade.

    python bench/zoo_recipe.py --run runs/demo --tasks 10 \
        --recipe '{"epochs": 3}' --recipe '{"epochs": 2, "batch_size": 32, "lr": 0.02}'

Reuses the run's generic model and splits. Each recipe (ZooConfig fields over the config's) fine-
tunes one p-model per val task with `tina.zoo.finetune_pmodel` (seeds 10**6 + i), one thread as
in the zoo; gain = mean over tasks of (p-model - generic restricted to the task) on validation
images. Writes bench/results/zoo_recipe.json with the command, commit, nproc and CPU model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tina.config import load_config
from tina.data import load_split
from tina.pipeline import git_commit, machine, stage_generic
from tina.scoring import accuracy, logits_of
from tina.tasks import LabelSpace, Splits
from tina.zoo import finetune_pmodel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a `tina pipeline` output with a generic model")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--tasks", type=int, default=10, help="the first N val tasks")
    p.add_argument("--recipe", action="append", required=True,
                   help="JSON object of ZooConfig fields, e.g. '{\"epochs\": 2}'")
    p.add_argument("--out", default="bench/results/zoo_recipe.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    run, cfg = Path(args.run), load_config(args.config)
    train, val = (load_split(cfg.data.dataset, s) for s in ("train", "val"))
    space = LabelSpace(train.classes, cfg.data.held_out)
    splits = Splits.from_json(json.loads((run / "splits.json").read_text()))
    generic, _ = stage_generic(cfg, run, train, val, space)
    tasks = splits.val[: args.tasks]
    data = [val.task(t) for t in tasks]
    base = [float(accuracy(logits_of(generic, d.images)[:, list(t)], d.labels))
            for t, d in zip(tasks, data, strict=True)]
    rows = []
    for spec in args.recipe:
        zoo = dataclasses.replace(cfg.zoo, **json.loads(spec))
        gains, secs = [], []
        for i, (t, d) in enumerate(zip(tasks, data, strict=True)):
            t0 = time.perf_counter()
            m = finetune_pmodel(generic, cfg.arch.name, t, train, zoo, 10**6 + i)
            secs.append(time.perf_counter() - t0)
            gains.append(float(accuracy(logits_of(m, d.images), d.labels)) - base[i])
        rows.append({"recipe": dataclasses.asdict(zoo), "gain_mean": statistics.fmean(gains),
                     "gain_sd": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                     "s_per_pmodel_median": statistics.median(secs)})
        print(json.dumps(rows[-1]), flush=True)
    res = {"command": "python " + " ".join(sys.argv), "git_commit": git_commit(), **machine(),
           "run": str(run), "val_tasks": len(tasks), "generic_val_acc": statistics.fmean(base),
           "recipes": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
