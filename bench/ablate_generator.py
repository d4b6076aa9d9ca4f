"""Generator ablations on a finished demo run, scored on its `val` tasks (never test).

    python bench/ablate_generator.py --run runs/demo --out /tmp/abl \
        --set dit.preset=tina-xs --set train.steps=1500 [--rebuild-zoo --set zoo.epochs=1.0]

Reuses the run's generic model and splits; with --rebuild-zoo, fine-tunes a new zoo with the
overridden zoo recipe (else loads the run's zoo); trains a generator with the overrides; prints one
JSON line: final loss, val finetuned - generic (with --rebuild-zoo), and tina - generic for DDIM-1
(close to the conditional mean) and DDIM-20, plus the command, commit, nproc and CPU model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from tina.config import load_config
from tina.data import load_split
from tina.encoders import build_encoder
from tina.generate import prompt_seed
from tina.pipeline import git_commit, machine, stage_generator, stage_generic
from tina.scoring import accuracy, batched_logits, logits_of
from tina.tasks import LabelSpace, Splits
from tina.zoo import ZooStore, build_zoo, finetune_pmodel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished `tina pipeline` output directory")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--rebuild-zoo", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    run, out = Path(args.run), Path(args.out)
    cfg = load_config(args.config, args.set)
    train, val = (load_split(cfg.data.dataset, s) for s in ("train", "val"))
    space = LabelSpace(train.classes, cfg.data.held_out)
    splits = Splits.from_json(json.loads((run / "splits.json").read_text()))
    generic, has_row = stage_generic(cfg, run, train, val, space)
    store = ZooStore(out / "zoo" if args.rebuild_zoo else run / "zoo")
    if args.rebuild_zoo:
        build_zoo(store, splits.zoo, generic, cfg.arch.name, train, val, cfg.zoo,
                  cfg.data.dataset, progress=False)
    entries, flats = store.load()
    gen, hist = stage_generator(cfg, out, space, generic, has_row, build_encoder(cfg.encoder),
                                entries, flats, train.images.shape[1])
    tasks = splits.val
    images = [val.task(t) for t in tasks]
    generic_acc = statistics.mean(
        float(accuracy(logits_of(generic, v.images)[:, list(t)], v.labels))
        for v, t in zip(images, tasks, strict=True))
    res = {"command": "python " + " ".join(sys.argv), "git_commit": git_commit(), **machine(),
           "overrides": args.set, "final_loss": statistics.mean(hist["loss"][-100:])}
    if args.rebuild_zoo:
        ft = statistics.mean(
            float(accuracy(logits_of(finetune_pmodel(generic, cfg.arch.name, t, train, cfg.zoo,
                                                     seed=7 + i), v.images), v.labels))
            for i, (v, t) in enumerate(zip(images, tasks, strict=True)))
        res["val_finetuned_minus_generic"] = ft - generic_acc
    names = [[val.classes[c] for c in t] for t in tasks]
    cond = gen.text_conditioning(names)
    seeds = [prompt_seed(0, n) for n in names]
    for steps in (1, 20):
        flat = gen.sample(cond, seeds, steps=steps, use_ema=False, guidance=1.0)
        acc = statistics.mean(
            float(accuracy(batched_logits(gen.template, gen.layout, flat[i:i + 1], v.images)[0],
                           v.labels)) for i, v in enumerate(images))
        res[f"val_tina_ddim{steps}_minus_generic"] = acc - generic_acc
    print(json.dumps(res))


if __name__ == "__main__":
    main()
