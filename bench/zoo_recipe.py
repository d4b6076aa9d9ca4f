"""Zoo fine-tuning recipes on `val` tasks (never test): the gain over the generic model, how well
the zoo's residuals transfer to new class sets, and the seconds per p-model: what issue 2's
`finetuned - generic` bar, its `tina - generic` bar and the time budget trade.

    python bench/zoo_recipe.py --run runs/demo --tasks 10 --transfer 30 \
        --recipe '{"epochs": 3}' --recipe '{"epochs": 2, "batch_size": 32, "lr": 0.02}'

Reuses the run's generic model and splits. Each recipe (ZooConfig fields over the config's) fine-
tunes one p-model per val task with `tina.zoo.finetune_pmodel` (seeds 10**6 + i), one thread as
in the zoo; gain = mean over tasks of (p-model - generic restricted to the task) on validation
images. Transfer: the first `--transfer` zoo tasks are fine-tuned too, and the mean of their
residuals (p-model minus its generic start, rows in prompt order) is added to each val task's
generic start; transfer = that model's mean accuracy minus the generic one's. A generator fit to
the zoo predicts about this mean for a class set it has not seen, so a recipe whose transfer is
far below 0 spreads its p-models in directions no name can predict (seed 0: 2 epochs of batch 32
at lr 2e-2, transfer -0.074, gave tina - generic -0.014 on ood; 3 epochs of batch 128 at lr 1e-2,
transfer -0.011, gave +0.002). Writes bench/results/zoo_recipe.json with the command, commit,
nproc and CPU model.
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

from tina.backbones import ParamLayout, SmallCNN
from tina.config import ZooConfig, load_config
from tina.data import ImageSet, load_split
from tina.pipeline import git_commit, machine, stage_generic
from tina.scoring import accuracy, logits_of
from tina.tasks import LabelSpace, Splits, Task
from tina.zoo import finetune_pmodel, init_pmodel


def transfer(generic: SmallCNN, arch: str, zoo_tasks: list[Task], tasks: list[Task],
             data: list[ImageSet], base: list[float], train: ImageSet, zoo: ZooConfig) -> float:
    """Mean over `tasks` of (generic start + mean zoo residual) minus the generic accuracy.

    The zoo tasks' p-models use seeds 0..N-1; data[i] holds task i's validation images and
    base[i] the generic model's accuracy on them.
    """
    flat: torch.Tensor | None = None

    def flat_of(m: torch.nn.Module) -> torch.Tensor:
        return ParamLayout(m).flatten(dict(m.named_parameters())).detach()

    for i, t in enumerate(zoo_tasks):
        r = flat_of(finetune_pmodel(generic, arch, t, train, zoo, i)) - flat_of(
            init_pmodel(generic, arch, t))
        flat = r if flat is None else flat + r
    mean_residual = flat / len(zoo_tasks)
    accs = []
    for t, d in zip(tasks, data, strict=True):
        m = init_pmodel(generic, arch, t)
        m.load_state_dict(ParamLayout(m).unflatten(flat_of(m) + mean_residual))
        accs.append(float(accuracy(logits_of(m.eval(), d.images), d.labels)))
    return statistics.fmean(accs) - statistics.fmean(base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a `tina pipeline` output with a generic model")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set arch.name=cnn-200")
    p.add_argument("--tasks", type=int, default=10, help="the first N val tasks")
    p.add_argument("--transfer", type=int, default=0,
                   help="also fine-tune the first N zoo tasks and score their mean residual")
    p.add_argument("--recipe", action="append", required=True,
                   help="JSON object of ZooConfig fields, e.g. '{\"epochs\": 2}'")
    p.add_argument("--out", default="bench/results/zoo_recipe.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    run, cfg = Path(args.run), load_config(args.config, args.set)
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
        if args.transfer:
            rows[-1]["transfer"] = transfer(generic, cfg.arch.name, splits.zoo[: args.transfer],
                                            tasks, data, base, train, zoo)
        print(json.dumps(rows[-1]), flush=True)
    res = {"command": "python " + " ".join(sys.argv), "git_commit": git_commit(), **machine(),
           "run": str(run), "val_tasks": len(tasks), "generic_val_acc": statistics.fmean(base),
           "recipes": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
