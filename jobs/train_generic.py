"""The generic model as a one-worker Ray Train run (one model: nothing to split over workers).

    python -m jobs.train_generic --config configs/demo.yaml --out runs/demo

The worker trains with `tina.zoo.train_generic` and hands the model back as a Ray Train
checkpoint (model.safetensors + model.json); the driver copies it to <out>/generic.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from jobs.common import (
    RayOptions,
    add_args,
    config,
    init_ray,
    options,
    run_config,
    run_name,
    scaling,
    worker_config,
    worker_threads,
)
from tina.backbones import SmallCNN
from tina.config import PipelineConfig, from_dict
from tina.data import ImageSet, dataset_info, load_split
from tina.errors import run_reporting_user_errors
from tina.pipeline import save_model, stage_generic
from tina.tasks import LabelSpace
from tina.zoo import train_generic


def _train_loop(config: dict) -> None:
    import ray.train

    cfg = from_dict(config["cfg"])
    worker_threads(config["cpus"])
    load = dict(root=cfg.data.root, download=False, image_size=cfg.data.image_size)
    train, val = (load_split(cfg.data.dataset, s, **load) for s in ("train", "val"))
    space = LabelSpace(train.classes, cfg.data.held_out)
    model, meta = train_generic(cfg.arch.name, train, val, space.seen_ids, cfg.generic,
                                progress=False)
    meta |= {"arch": cfg.arch.name, "classes": space.classes}
    with tempfile.TemporaryDirectory() as d:
        save_model(model, Path(d) / "model.safetensors", meta)
        ray.train.report({"best_val_acc": meta["best_val_acc"], "epochs": meta["epochs"],
                          "train_s": meta["train_s"]},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def generic_trainer(cfg: PipelineConfig, out: str | Path, opts: RayOptions,
                    name: str | None = None):
    """A one-worker TorchTrainer that trains the generic model of `cfg` with the CPUs of
    opts.num_workers workers (one model, one data stream: nothing to shard)."""
    from ray.train.torch import TorchTrainer

    one = opts.pooled(1)
    return TorchTrainer(_train_loop,
                        train_loop_config={"cfg": worker_config(cfg),
                                           "cpus": one.cpus_per_worker},
                        scaling_config=scaling(one),
                        run_config=run_config(opts, out, name or run_name("generic")))


def run_generic(cfg: PipelineConfig, out: str | Path, opts: RayOptions) -> Path:
    """Train the generic model on Ray unless <out>/generic holds it; return that directory."""
    target = Path(out) / "generic"
    if not (target / "model.safetensors").is_file():
        init_ray(opts)
        result = generic_trainer(cfg, out, opts).fit()
        result.checkpoint.to_directory(str(target))
    return target


def stage_generic_ray(opts: RayOptions, cfg: PipelineConfig, out: Path, train: ImageSet,
                      val: ImageSet, space: LabelSpace) -> tuple[SmallCNN, torch.Tensor]:
    """`tina.pipeline.stage_generic` with the training as a Ray Train run."""
    run_generic(cfg, out, opts)
    return stage_generic(cfg, out, train, val, space)  # loads what the run wrote


def main(argv: list[str] | None = None) -> None:
    args = add_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    cfg = config(args)
    dataset_info(cfg.data.dataset, cfg.data.root, cfg.data.image_size)  # fail early: no data
    print(f"generic model in {run_generic(cfg, args.out, options(args))}")


if __name__ == "__main__":
    raise SystemExit(run_reporting_user_errors(main))
