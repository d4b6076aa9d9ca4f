"""Steady-state throughput of the zoo and of generator training: Ray Train with 1 and 2 workers
(1 CPU each) against one plain process with 2 threads and no Ray.

    python -m bench.ray_scaling [--window-s 60] [--quick] [--generic runs/demo/generic] \
        [--out bench/results/ray_scaling.json]

Zoo: the demo's recipe (configs/demo.yaml: cnn-400, 3 epochs over at most 20k images, lr 1e-2)
through the real job (jobs.build_zoo's TorchTrainer, tasks sharded by rank) and through
tina.zoo.build_zoo in this process. Each p-model's completion time is its parameter file's mtime
(the store writes it last, atomically) and its worker the manifest shard that lists it.
Generator: the demo's generator (tina-s, batch 64) trained by tina.train.train_generator, in a
Ray Train worker loop (Placement + prepare_model, as jobs.train_dit) and in this process, on the
zoo this bench built (the 2-worker one); each optimizer step is an item, timed by
train_generator's per-step hook (train.checkpoint_every=1, no state saved).

Steady state: the window starts when the first item of *every* worker has finished (start-up,
data loading and the first item are `startup_s`, reported apart) and lasts --window-s seconds;
throughput = items finished inside it / window (p-models/s; steps x global batch / s). Each run
is sized (zoo: tasks from the plain process's per-item time; training: a collective stop after
the window) so that every worker is still busy when the window ends; "complete" says so.
The generic model is --generic (default runs/demo/generic when present) or trained here for one
epoch (its accuracy does not change the cost of a p-model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tina.config import PipelineConfig, from_dict, load_config
from tina.data import dataset_info, load_split
from tina.pipeline import git_commit, machine
from tina.tasks import LabelSpace, make_splits
from tina.zoo import ZooStore, build_zoo

# --quick: seconds, not minutes, per configuration on a busy machine (a smoke test of the bench)
QUICK = ["zoo.epochs=0.05", "zoo.max_train_images=2000", "dit.preset=tina-xs",
         "train.batch_size=16"]
STOP_EVERY = 10  # training steps between the (collective) checks whether the window is over


class _Stop(Exception):
    """Raised from the step clock to end a training run once its window is over."""


def steady(stamps: dict[str, list[float]], launch: float, window_s: float) -> dict:
    """Throughput over the window that starts when every worker finished its first item.

    Args:
        stamps: worker -> completion times (time.time() seconds) of its items.
        launch: when the run was started; window_s: window length in seconds.
    Returns:
        {"rate" (items/s in the window), "items", "startup_s" (launch -> window start),
        "complete" (every worker finished an item after the window ended: it was busy all
        through), "workers"}.
    """
    start = max(min(t) for t in stamps.values())
    end = start + window_s
    items = sum(start < x <= end for t in stamps.values() for x in t)
    return {"rate": items / window_s, "items": items, "startup_s": round(start - launch, 2),
            "complete": all(max(t) >= end for t in stamps.values()), "workers": len(stamps)}


# ----------------------------------------------------------------------------- zoo

def zoo_stamps(zoo_dir: Path) -> dict[str, list[float]]:
    """writer -> completion times of its p-models (parameter file mtimes)."""
    out: dict[str, list[float]] = {}
    for shard in sorted(zoo_dir.glob("manifest-*.jsonl")):
        writer = shard.stem.removeprefix("manifest-")
        for line in shard.read_text().splitlines():
            path = zoo_dir / json.loads(line)["file"]
            out.setdefault(writer, []).append(path.stat().st_mtime_ns / 1e9)
    return out


def zoo_process(cfg: PipelineConfig, generic, tasks, train, val, work: Path,
                window_s: float) -> tuple[dict, float]:
    """tina.zoo.build_zoo in this process (2 threads) until one item past the window; returns
    (steady(...), median seconds per p-model)."""
    torch.set_num_threads(2)
    store, launch = ZooStore(work / "zoo_process"), time.time()
    done: list[float] = []
    for i in range(len(tasks)):
        build_zoo(store, tasks, generic, cfg.arch.name, train, val, cfg.zoo, cfg.data.dataset,
                  indices=[i], progress=False)
        done.append(time.time())
        if done[-1] > done[0] + window_s:
            break
    gaps = [b - a for a, b in zip(done, done[1:], strict=False)]
    per_item = statistics.median(gaps) if gaps else done[0] - launch
    return steady(zoo_stamps(store.root), launch, window_s), per_item


def zoo_ray(cfg: PipelineConfig, generic, tasks, workers: int, work: Path,
            window_s: float) -> dict:
    """jobs.build_zoo's trainer with `workers` workers x 1 CPU over `tasks`."""
    from jobs.build_zoo import zoo_trainer
    from jobs.common import RayOptions, run_name

    opts = RayOptions(num_workers=workers, cpus_per_worker=1.0, max_failures=0,
                      storage_path=str(work / "ray"))
    out = work / f"zoo_workers_{workers}"
    ZooStore(out / "zoo")
    launch = time.time()
    zoo_trainer(cfg, out, generic, tasks, opts, run_name(f"bench-zoo-{workers}")).fit()
    return steady(zoo_stamps(out / "zoo"), launch, window_s)


# ----------------------------------------------------------------------------- generator

def _train_loop(config: dict) -> None:
    """A Ray Train worker: train_generator until the collective stop after the window; rank 0
    hands back its step times in a checkpoint (stamps.json)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from jobs.common import worker_threads
    from tina.train import Placement, train_generator

    worker_threads(1.0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def stop(over: bool) -> bool:  # every rank stops at the same step (DDP): any rank's call
        flag = torch.tensor([float(over)])
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    stamps = _StepClock(config["run_s"], stop)
    place = Placement(rank, world, ray.train.torch.get_device(), ray.train.torch.prepare_model)
    try:
        train_generator(from_dict(config["cfg"]), **vars(config["inputs"]), progress=False,
                        place=place, on_checkpoint=stamps)
    except _Stop:
        pass
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "stamps.json").write_text(json.dumps(stamps.times))
        ray.train.report({"steps": len(stamps.times)},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


class _StepClock:
    """train_generator's on_checkpoint hook at every step (train.checkpoint_every=1): records
    the step's end time; every STOP_EVERY steps asks `stop(past the window)` and ends the run."""

    def __init__(self, run_s: float, stop=lambda over: over):
        self.run_s, self.stop, self.times = run_s, stop, []

    def __call__(self, state, make_generator) -> None:
        self.times.append(time.time())
        if state.step % STOP_EVERY == 0 and self.stop(self.times[-1] > self.times[0]
                                                       + self.run_s):
            raise _Stop


def train_process(cfg: PipelineConfig, inputs, window_s: float) -> dict:
    """train_generator in this process with 2 threads until just past the window."""
    from tina.train import train_generator

    torch.set_num_threads(2)
    stamps, launch = _StepClock(window_s), time.time()
    try:
        train_generator(cfg, **vars(inputs), progress=False, on_checkpoint=stamps)
    except _Stop:
        pass
    return _train_result(steady({"0": stamps.times}, launch, window_s), cfg, 1)


def train_ray(cfg: PipelineConfig, inputs, workers: int, work: Path, window_s: float) -> dict:
    """The worker loop above on `workers` Ray Train workers x 1 CPU (DDP)."""
    from ray.train.torch import TorchTrainer

    from jobs.common import RayOptions, run_config, run_name, scaling, worker_config

    opts = RayOptions(num_workers=workers, cpus_per_worker=1.0, max_failures=0,
                      storage_path=str(work / "ray"))
    loop = {"cfg": worker_config(cfg), "inputs": inputs, "run_s": window_s}
    launch = time.time()
    result = TorchTrainer(_train_loop, train_loop_config=loop, scaling_config=scaling(opts),
                          run_config=run_config(opts, work, run_name(f"bench-dit-{workers}"))
                          ).fit()
    with result.checkpoint.as_directory() as d:
        stamps = json.loads((Path(d) / "stamps.json").read_text())
    # DDP steps in lockstep: rank 0's first step ends after every rank's first step
    return _train_result(steady({"rank0": stamps}, launch, window_s), cfg, workers)


def _train_result(s: dict, cfg: PipelineConfig, workers: int) -> dict:
    # an item is one optimizer step of the global batch (every rank steps together)
    return s | {"rate": s["rate"] * cfg.train.batch_size, "steps": s.pop("items"),
                "workers": workers}


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml", help="the zoo and generator recipe")
    p.add_argument("--window-s", type=float, default=60.0, help="steady-state window (seconds)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a 5 s window and a lighter recipe (QUICK); figures not valid")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the recipe")
    p.add_argument("--generic", default="runs/demo/generic",
                   help="a generic model folder to reuse (else one is trained for 1 epoch)")
    p.add_argument("--out", default="bench/results/ray_scaling.json")
    args = p.parse_args(argv)
    window = 5.0 if args.quick else args.window_s
    command = "python -m bench.ray_scaling " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = os.getloadavg()
    torch.set_num_threads(1)  # data and generic model; each measured part sets its own
    overrides = (QUICK if args.quick else []) + args.set
    cfg = load_config(args.config, overrides)
    info = dataset_info(cfg.data.dataset, cfg.data.root, cfg.data.image_size)
    train, val = (load_split(cfg.data.dataset, s, root=cfg.data.root,
                             image_size=cfg.data.image_size) for s in ("train", "val"))
    space = LabelSpace(info.classes, cfg.data.held_out)
    with tempfile.TemporaryDirectory(prefix="tina-ray-scaling-") as work:
        try:
            result = measure(cfg, args, overrides, Path(work), window, train, val, space)
        finally:
            import ray
            ray.shutdown()  # the local cluster measure() started, if it still runs
    result |= {"command": command, "git_commit": git_commit(), "machine": machine(),
               "load_avg_1m": {"start": load_start[0], "end": os.getloadavg()[0]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("zoo", "train", "ratios")}, default=str)[:2000])


def measure(cfg: PipelineConfig, args: argparse.Namespace, overrides: list[str], work: Path,
            window: float, train, val, space) -> dict:
    """Every run of the bench under `work`; the result without the provenance fields."""
    generic, generic_from = _generic(cfg, Path(args.generic), train, val, space, work)

    zoo = {}
    splits = make_splits(space, cfg.data.forbidden_pairs, cfg.zoo.k, 1000, cfg.eval, cfg.seed)
    s, per_item = zoo_process(cfg, generic, splits.zoo, train, val, work, window)
    zoo["process_2_threads"] = s
    # each worker must outlast the window: size its share from the plain process's pace,
    # allowing 1 CPU to be up to 1.4x faster than 2 threads on these tiny ops
    per_worker = math.ceil(1.4 * (window + 2 * per_item) / per_item) + 2

    import ray

    from jobs.common import RayOptions, init_ray
    init_ray(RayOptions())
    for n in (1, 2):
        zoo[f"workers_{n}"] = zoo_ray(cfg, generic, splits.zoo[: n * per_worker], n, work,
                                      window)

    from jobs.tune_dit import load_inputs
    # every step calls on_checkpoint (the step clock); no val scoring; a far horizon
    gen_cfg = load_config(args.config, overrides + ["train.steps=1000000",
                                                    "train.checkpoint_every=1",
                                                    "train.val_every=0"])
    (work / "zoo_workers_2" / "generic").symlink_to(generic_from)
    inputs, _ = load_inputs(gen_cfg, work / "zoo_workers_2")
    train_res = {f"workers_{n}": train_ray(gen_cfg, inputs, n, work, window) for n in (1, 2)}
    ray.shutdown()  # the plain process runs alone, as the zoo's did (before Ray started)
    train_res["process_2_threads"] = train_process(gen_cfg, inputs, window)

    def table(runs: dict, unit: str, note: str) -> dict:
        return ({k: round(v["rate"], 4) for k, v in runs.items()}
                | {"startup_s": {k: v["startup_s"] for k, v in runs.items()},
                   "unit": unit, "runs": runs, "note": note})

    recipe = f" with {overrides}" if overrides else ""
    return {
        "zoo": table(zoo, "p-models/s", f"zoo recipe of {args.config}{recipe}; generic: "
                     f"{generic_from}; {per_worker} tasks per Ray worker"),
        "train": table(train_res, "samples/s", f"generator of {args.config}{recipe} (batch "
                       f"{gen_cfg.train.batch_size}) on the bench's own zoo of "
                       f"{inputs.zoo_flats.shape[0]} p-models (the 2-worker run's)"),
        "window_s": window, "quick": args.quick, "overrides": overrides,
        "ratios": {"zoo_workers_2_over_workers_1": _ratio(zoo, "workers_2", "workers_1"),
                   "zoo_workers_2_over_process": _ratio(zoo, "workers_2", "process_2_threads")},
    }


def _ratio(runs: dict, a: str, b: str) -> float | None:
    return round(runs[a]["rate"] / runs[b]["rate"], 3) if runs[b]["rate"] else None


def _generic(cfg: PipelineConfig, given: Path, train, val, space, work: Path):
    """(generic model, its folder): `given` when it holds one, else trained for 1 epoch here."""
    from tina.pipeline import stage_generic

    if (given / "model.safetensors").is_file():
        folder = given.resolve()
    else:
        cfg = dataclasses.replace(cfg, generic=dataclasses.replace(cfg.generic, max_epochs=1))
        folder = work / "generic_run" / "generic"
    return stage_generic(cfg, folder.parent, train, val, space)[0], folder


if __name__ == "__main__":
    main()
