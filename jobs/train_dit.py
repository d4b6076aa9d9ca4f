"""DDP training of the generator as a Ray Train run: checkpoints, resume, val-selected weights.

    python -m jobs.train_dit --config configs/demo.yaml --out runs/demo --num-workers 2 \
        --set train.checkpoint_every=250 --set train.val_every=500 [--max-failures 1]

Needs <out>/generic and <out>/zoo (jobs.train_generic, jobs.build_zoo); writes <out>/generator.
Every worker runs the one loop `tina.train.train_generator` with its rank, its share of the
global batch and `prepare_model` (DDP; bf16 autocast on GPU). At checkpoint steps rank 0 hands
Ray Train a checkpoint directory: `state/` (tina.train_state: weights, EMA, optimizer, step, RNG,
loss history), `best/` (the best generator so far, the tina.safetensors + tina.json format) and
`val.json` ({"step": best val step, "score", "use_ema", "history", "start_step",
"checkpoint_step"}); the other ranks report the same metrics without one. A restarted worker group
resumes from `ray.train.get_checkpoint()` at the next step. At val steps the raw and EMA weights
are scored on the first train.val_tasks `val` tasks (never test); the best (step, weights) is
what the job writes as <out>/generator.

Ray Train V2's `report` blocks until the controller has polled the previous result (every
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): progress goes out every 50 steps and
checkpoints every train.checkpoint_every steps, so keep both well above 2 s of training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
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
from tina.config import PipelineConfig, from_dict
from tina.data import ImageSet, load_split
from tina.errors import run_reporting_user_errors
from tina.evaluate import score_on_val
from tina.generate import Generator
from tina.tasks import Splits, Task
from tina.train import GeneratorInputs, Placement, train_generator
from tina.train_state import TrainState

VAL_FILE = "val.json"  # in each checkpoint: the best so far, the val history, the attempt's start


class CheckpointHandOff:
    """The checkpoint hook of one worker: rank 0 scores on val when due, keeps the best generator
    in `workdir/best` and reports state + best as a Ray Train checkpoint; other ranks report the
    same metrics without a checkpoint (report is a collective)."""

    def __init__(self, cfg: PipelineConfig, rank: int, start: int, tasks: list[Task],
                 val: ImageSet | None, workdir: Path, best: dict):
        self.cfg, self.rank, self.start, self.tasks, self.val = cfg, rank, start, tasks, val
        self.workdir, self.best = workdir, best

    def _val_due(self, step: int) -> bool:
        every = self.cfg.train.val_every
        return step == self.cfg.train.steps or (every > 0 and step % every == 0)

    def _score(self, step: int, gen: Generator) -> dict:
        if not self.tasks:  # nothing to choose with: the latest weights, configured EMA use
            better, use_ema, score, out = True, self.cfg.sample.use_ema, None, {}
        else:
            s = score_on_val(gen, self.tasks, self.val, self.cfg.train.val_sample_steps,
                             self.cfg.eval.seeds[0], self.cfg.sample.guidance)
            use_ema, score = s["ema"] >= s["raw"], max(s["raw"], s["ema"])
            better = self.best["score"] is None or score > self.best["score"]
            out = {"val_raw": s["raw"], "val_ema": s["ema"]}
            self.best["history"].append({"step": step, **s})
        if better:
            gen.meta["sample"]["use_ema"] = use_ema
            gen.save(self.workdir / "best")
            self.best |= {"score": score, "step": step, "use_ema": use_ema}
        return out

    def __call__(self, state: TrainState, make_generator: Callable[[], Generator]) -> None:
        import ray.train

        metrics = {"step": state.step, "start_step": self.start, "pid": os.getpid(),
                   "loss": statistics.fmean(state.loss[-50:])}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        if self._val_due(state.step):
            metrics |= self._score(state.step, make_generator())
        metrics |= {"best_step": self.best["step"], "best_val": self.best["score"]}
        with tempfile.TemporaryDirectory() as tmp:
            state.save(Path(tmp) / "state")
            if (self.workdir / "best").is_dir():
                shutil.copytree(self.workdir / "best", Path(tmp) / "best")
            (Path(tmp) / VAL_FILE).write_text(json.dumps(
                # "step" is the best val step; the checkpoint's own is "checkpoint_step"
                self.best | {"start_step": self.start, "checkpoint_step": state.step,
                             "pid": os.getpid()}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["cfg"])
    worker_threads(config["cpus"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["pid_dir"]:  # where operators (and the kill test) find each training process
        Path(config["pid_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(config["pid_dir"]) / f"rank{rank}.json").write_text(
            json.dumps({"pid": os.getpid(), "rank": rank}))
    workdir = Path(tempfile.mkdtemp(prefix="tina-dit-"))
    resume, best = None, {"score": None, "step": None, "use_ema": None, "history": []}
    # a restart within this run resumes from the run's latest checkpoint, a new run from the
    # checkpoint it was given (TorchTrainer's resume_from_checkpoint is deprecated in Train V2)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config["resume_from"]:
        ckpt = ray.train.Checkpoint(config["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = TrainState.load(Path(d) / "state")
            saved = json.loads((Path(d) / VAL_FILE).read_text())
            best = {k: saved[k] for k in best}
            if (Path(d) / "best").is_dir():
                shutil.copytree(Path(d) / "best", workdir / "best")
    start = resume.step if resume is not None else 0

    t0 = time.perf_counter()

    def report(step: int, metrics: dict) -> None:
        # global samples/s of this attempt since its first step (start-up excluded)
        rate = (step + 1 - start) * cfg.train.batch_size / (time.perf_counter() - t0)
        ray.train.report(metrics | {"step": step + 1, "start_step": start,
                                    "samples_per_s": rate})

    place = Placement(rank, world, ray.train.torch.get_device(), ray.train.torch.prepare_model)
    hand_off = CheckpointHandOff(cfg, rank, start, [tuple(t) for t in config["val_tasks"]],
                                 config["val"], workdir, best)
    try:
        train_generator(cfg, **vars(config["inputs"]), report=report, progress=False,
                        place=place, resume=resume, on_checkpoint=hand_off)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def val_subset(cfg: PipelineConfig, tasks: list[Task]) -> ImageSet | None:
    """The `val` images of the classes of `tasks` (label-space labels), or None without tasks."""
    if not tasks:
        return None
    val = load_split(cfg.data.dataset, "val", root=cfg.data.root, image_size=cfg.data.image_size)
    keep = sorted({c for t in tasks for c in t})
    idx = torch.cat([val.class_indices(c) for c in keep])
    return ImageSet(val.images[idx].clone(), val.labels[idx].clone(), val.classes)


def dit_trainer(cfg: PipelineConfig, inputs: GeneratorInputs, splits: Splits | None,
                out: str | Path, opts: RayOptions, name: str | None = None,
                resume_from: str | None = None, callbacks: list | None = None):
    """A TorchTrainer of opts.num_workers DDP workers that trains the generator of `cfg`.

    Args:
        inputs: tina.pipeline.generator_inputs(...); splits: val tasks come from splits.val.
        resume_from: path (or URI) of a checkpoint of this job to continue from, at its next
            step (e.g. a `checkpoint_*` folder of an earlier run).
        callbacks: RunConfig callbacks, e.g. [ray.tune.integration.ray_train.TuneReportCallback()]
            in a Tune driver function; the metrics are rank 0's: "loss", "step", and at val
            steps "val_raw", "val_ema", "best_val", "best_step".
    Returns:
        ray.train.torch.TorchTrainer; `.fit()` returns a Result whose `checkpoint` holds
        `best/` (read it with `best_generator`).
    """
    from ray.train.torch import TorchTrainer

    tasks = list(splits.val[: cfg.train.val_tasks]) if splits is not None else []
    loop_cfg = {"cfg": worker_config(cfg), "cpus": opts.cpus_per_worker, "inputs": inputs,
                "val_tasks": [list(t) for t in tasks], "val": val_subset(cfg, tasks),
                "pid_dir": opts.pid_dir, "resume_from": resume_from}
    return TorchTrainer(_train_loop, train_loop_config=loop_cfg, scaling_config=scaling(opts),
                        run_config=run_config(opts, out, name or run_name("generator"),
                                              callbacks=callbacks))


def best_generator(checkpoint) -> tuple[Generator, dict]:
    """A train_dit checkpoint -> (its best Generator, without an encoder; history
    {"loss", "val"})."""
    with checkpoint.as_directory() as d:
        gen = Generator.from_checkpoint(Path(d) / "best")
        loss = json.loads((Path(d) / "state" / "state.json").read_text())["loss"]
        val = json.loads((Path(d) / VAL_FILE).read_text())
    return gen, {"loss": loss, "val": val}


def run_train_dit(cfg: PipelineConfig, inputs: GeneratorInputs, splits: Splits | None,
                  out: str | Path, opts: RayOptions, name: str | None = None,
                  resume_from: str | None = None) -> tuple[Generator, dict]:
    """Fit `dit_trainer` and return the best generator and its history
    {"loss", "val", "train_s" (wall seconds of the run, start-up included), "steps_per_s",
    "ray_run" (the run's storage path)}."""
    init_ray(opts)
    t0 = time.perf_counter()
    result = dit_trainer(cfg, inputs, splits, out, opts, name, resume_from).fit()
    train_s = time.perf_counter() - t0
    gen, hist = best_generator(result.checkpoint)
    return gen, hist | {"train_s": train_s, "steps_per_s": cfg.train.steps / train_s,
                        "ray_run": result.path}


def trainer_on_ray(opts: RayOptions, out: str | Path, resume_from: str | None = None):
    """A `tina.pipeline.GeneratorTrainer` that trains through this job."""
    def train(cfg: PipelineConfig, inputs: GeneratorInputs,
              splits: Splits | None) -> tuple[Generator, dict]:
        return run_train_dit(cfg, inputs, splits, out, opts, resume_from=resume_from)
    return train


def main(argv: list[str] | None = None) -> None:
    from jobs.build_zoo import load_generic
    from tina.data import dataset_info
    from tina.encoders import build_encoder
    from tina.pipeline import stage_generator
    from tina.tasks import LabelSpace, make_splits
    from tina.zoo import ZooStore

    p = add_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--resume-from", default=None,
                   help="a checkpoint_* folder of an earlier train_dit run to continue from")
    p.add_argument("--pid-dir", default=None, help="each worker writes rank<r>.json (its pid)")
    args = p.parse_args(argv)
    opts = options(args)
    opts.pid_dir = args.pid_dir
    cfg, out = config(args), Path(args.out)
    info = dataset_info(cfg.data.dataset, cfg.data.root, cfg.data.image_size)
    space = LabelSpace(info.classes, cfg.data.held_out)
    splits = make_splits(space, cfg.data.forbidden_pairs, cfg.zoo.k, cfg.zoo.n_pmodels, cfg.eval,
                         cfg.seed)
    generic = load_generic(cfg, out)
    has_row = json.loads((out / "generic" / "model.json").read_text())["has_row"]
    entries, flats = ZooStore(out / "zoo").load()
    gen, hist = stage_generator(cfg, out, space, generic, torch.tensor(has_row),
                                build_encoder(cfg.encoder), entries, flats, info.in_channels,
                                splits, trainer_on_ray(opts, out, args.resume_from))
    print(f"generator in {out / 'generator'} (best val step {hist['val']['step']})")


if __name__ == "__main__":
    raise SystemExit(run_reporting_user_errors(main))
