"""The p-model zoo as a Ray Train run: zoo tasks sharded over workers by world rank.

    python -m jobs.build_zoo --config configs/demo.yaml --out runs/demo --num-workers 2

In the pipeline the same run then fine-tunes the evaluation's `finetuned` references
(tina.zoo.REFERENCE: the zoo's recipe on the val, ood and unseen tasks) into <out>/finetuned
(`stage_zoo_ray`; `stage_references_ray` fills them alone when only they are missing).
Worker r fine-tunes tasks i with i % world_size == r (`tina.zoo.build_zoo`) and writes its own
p-model files and its own manifest shard `manifest-rank<r>.jsonl`, so no two writers share a
file; the driver merges the shards into manifest.jsonl after the run. A re-submitted job skips
finished p-models. Needs <out>/generic (jobs.train_generic).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

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
from tina.backbones import SmallCNN, build_model
from tina.config import PipelineConfig, from_dict
from tina.data import ImageSet, dataset_info, load_split
from tina.errors import TinaError, run_reporting_user_errors
from tina.tasks import LabelSpace, Splits, Task, make_splits
from tina.zoo import REFERENCE, ZOO, StoreKind, ZooEntry, ZooStore, build_zoo

# at most this many progress reports per run (the same number on every worker: report is a
# collective)
REPORTS = 10


def _train_loop(config: dict) -> None:
    import ray.train

    cfg = from_dict(config["cfg"])
    worker_threads(config["cpus"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    load = dict(root=cfg.data.root, download=False, image_size=cfg.data.image_size)
    train, val = (load_split(cfg.data.dataset, s, **load) for s in ("train", "val"))
    generic = build_model(cfg.arch.name, train.images.shape[1], len(train.classes))
    generic.load_state_dict(config["generic"])
    generic.eval()
    for part in config["parts"]:
        _fill_store(cfg, part, generic, train, val, rank, world)


def _fill_store(cfg: PipelineConfig, part: dict, generic: SmallCNN, train: ImageSet,
                val: ImageSet, rank: int, world: int) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    tasks = [tuple(t) for t in part["tasks"]]
    kind = StoreKind(**part["kind"])
    store = ZooStore(part["zoo_dir"])
    mine = list(range(rank, len(tasks), world))
    per_rank = math.ceil(len(tasks) / world)
    # whole stacked batches per chunk: a chunk of 9 would fine-tune 8 together and 1 alone
    b = cfg.zoo.pmodels_per_batch
    chunk = b * max(1, math.ceil(per_rank / REPORTS / b))
    counts = torch.zeros(2, dtype=torch.float64, device=ray.train.torch.get_device())
    t0 = time.perf_counter()
    for c in range(math.ceil(per_rank / chunk)):
        idx = mine[c * chunk:(c + 1) * chunk]
        new = build_zoo(store, tasks, generic, cfg.arch.name, train, val, cfg.zoo,
                        cfg.data.dataset, indices=idx, writer=f"rank{rank}",
                        head_only=cfg.arch.head_only, progress=False, kind=kind)
        step = torch.tensor([len(new), len(idx) - len(new)], dtype=torch.float64,
                            device=counts.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(step)  # every worker's counts, so the kept (rank 0) metrics are global
        counts += step
        elapsed = time.perf_counter() - t0
        ray.train.report({"store": kind.folder, "chunk": c + 1, "written": int(counts[0]),
                          "skipped": int(counts[1]),
                          "pmodels_per_s": float(counts[0]) / max(elapsed, 1e-9),
                          "elapsed_s": elapsed})


Parts = Sequence[tuple[StoreKind, list[Task]]]


def zoo_trainer(cfg: PipelineConfig, out: str | Path, generic: SmallCNN, tasks: list[Task],
                opts: RayOptions, name: str | None = None, kind: StoreKind = ZOO,
                then: Parts = ()):
    """A TorchTrainer of opts.num_workers workers that fine-tunes `tasks` into <out>/<folder>
    (<out>/zoo for the zoo, <out>/finetuned for the references), then each (kind, tasks) of
    `then` into its own folder: one worker-group start-up and dataset load for all of them."""
    from ray.train.torch import TorchTrainer

    state = {k: v.detach().cpu() for k, v in generic.state_dict().items()}
    parts = [{"kind": asdict(k), "tasks": [list(t) for t in ts],
              "zoo_dir": str((Path(out) / k.folder).resolve())}
             for k, ts in [(kind, tasks), *then]]
    loop_cfg = {"cfg": worker_config(cfg), "cpus": opts.cpus_per_worker, "generic": state,
                "parts": parts}
    return TorchTrainer(_train_loop, train_loop_config=loop_cfg, scaling_config=scaling(opts),
                        run_config=run_config(opts, out, name or run_name(kind.folder)))


def run_build_zoo(cfg: PipelineConfig, out: str | Path, generic: SmallCNN, tasks: list[Task],
                  opts: RayOptions, name: str | None = None, kind: StoreKind = ZOO,
                  then: Parts = ()) -> dict:
    """Build (or finish) the zoo (or with `kind=REFERENCE`, the references), then the stores of
    `then`, in one Ray run, and merge their manifests.

    Returns:
        {"written", "skipped" (p-models of `kind` found finished), "run_s" (wall seconds,
        worker start-up included), "ray_run" (the run's storage path)}. Per-chunk progress and
        throughput went through ray.train.report (Result.metrics stays empty: those reports
        carry no checkpoint).
    """
    init_ray(opts)
    stores = [ZooStore(Path(out) / k.folder) for k, _ in [(kind, tasks), *then]]  # folders
    # exist before the workers race to create them
    before = {e.id for e in stores[0].entries()}
    t0 = time.perf_counter()
    result = zoo_trainer(cfg, out, generic, tasks, opts, name, kind, then).fit()
    run_s = time.perf_counter() - t0
    for store in stores:
        store.merge()
    ids = kind.ids(len(tasks))
    return {"written": len(ids & {e.id for e in stores[0].entries()} - before),
            "skipped": len(ids & before), "run_s": run_s, "ray_run": result.path}


def stage_zoo_ray(opts: RayOptions, cfg: PipelineConfig, out: Path, splits: Splits,
                  generic: SmallCNN, train: ImageSet,
                  val: ImageSet) -> tuple[list[ZooEntry], torch.Tensor]:
    """`tina.pipeline.stage_zoo` with the fine-tuning as a Ray Train run (none when the store
    already holds every task's p-model, as on a pipeline re-run). The same run then fine-tunes
    the evaluation's references, which `stage_references_ray` finds finished."""
    return _stage_on_ray(opts, cfg, out, generic, [(ZOO, splits.zoo),
                                                   (REFERENCE, splits.reference_tasks())])


def stage_references_ray(opts: RayOptions, cfg: PipelineConfig, out: Path, splits: Splits,
                         generic: SmallCNN, train: ImageSet,
                         val: ImageSet) -> tuple[list[ZooEntry], torch.Tensor]:
    """`tina.pipeline.stage_references` as a Ray Train run of this job (none when the zoo's run
    already fine-tuned them): the evaluation's fine-tuning, in parallel like the zoo's."""
    return _stage_on_ray(opts, cfg, out, generic, [(REFERENCE, splits.reference_tasks())])


def _stage_on_ray(opts: RayOptions, cfg: PipelineConfig, out: Path, generic: SmallCNN,
                  parts: Parts) -> tuple[list[ZooEntry], torch.Tensor]:
    """Fill every (kind, tasks) store not yet complete in one Ray run; load the first."""
    todo = [(k, ts) for k, ts in parts
            if not {e.id for e in ZooStore(out / k.folder).entries()} >= k.ids(len(ts))]
    if todo:
        (kind, tasks), *then = todo
        run_build_zoo(cfg, out, generic, tasks, opts, kind=kind, then=then)
    store = ZooStore(out / parts[0][0].folder)
    store.merge()
    return store.load()


def load_generic(cfg: PipelineConfig, out: str | Path) -> SmallCNN:
    """<out>/generic/model.safetensors as a module. Raises TinaError when it is missing."""
    path = Path(out) / "generic" / "model.safetensors"
    if not path.is_file():
        raise TinaError(f"{path} not found: run `python -m jobs.train_generic` with the same "
                        "--config and --out first")
    meta = json.loads(path.with_suffix(".json").read_text())
    info = dataset_info(cfg.data.dataset, cfg.data.root, cfg.data.image_size)
    model = build_model(cfg.arch.name, info.in_channels, len(meta["classes"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    args = add_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    cfg = config(args)
    generic = load_generic(cfg, args.out)
    info = dataset_info(cfg.data.dataset, cfg.data.root, cfg.data.image_size)
    splits = make_splits(LabelSpace(info.classes, cfg.data.held_out), cfg.data.forbidden_pairs,
                         cfg.zoo.k, cfg.zoo.n_pmodels, cfg.eval, cfg.seed)
    metrics = run_build_zoo(cfg, args.out, generic, splits.zoo, options(args))
    print(f"zoo in {Path(args.out) / 'zoo'}: {metrics}")


if __name__ == "__main__":
    raise SystemExit(run_reporting_user_errors(main))
