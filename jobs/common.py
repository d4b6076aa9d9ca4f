"""What every job shares: command-line flags, joining or starting Ray, Ray Train configs.

    python -m jobs.<name> --config configs/demo.yaml --out runs/demo [--address auto]
        [--num-workers 2] [--cpus-per-worker 1] [--use-gpu] [--storage-path DIR]

Without `--address` (and without RAY_ADDRESS) a job starts its own local Ray cluster; with one it
joins that cluster. Ray Train results and checkpoints go under `--storage-path` (default
`<out>/ray`; S3 or NFS on clusters).
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tina.config import PipelineConfig, load_config
from tina.data import data_root

# Worker start-up on a busy 2-core machine can exceed Ray's 60 s default; the driver's value is
# handed to the Train controller and the workers.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@dataclass
class RayOptions:
    """Where and how wide the Ray Train runs of a job go."""

    address: str | None = None  # None: RAY_ADDRESS, else a new local cluster
    num_workers: int = 2  # training workers per run (the generic model: 1 with all their CPUs)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # also each worker's torch threads (at least 1)
    storage_path: str | None = None  # Ray Train storage; None: <out>/ray
    max_failures: int = 1  # worker-group restarts allowed per run (FailureConfig)
    pid_dir: str | None = None  # if set, each generator-training worker writes rank<r>.json
    start_timeout_s: float = 300.0  # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S unless already set
    generator_workers: int | None = None  # the pipeline's generator run; None: see for_generator
    # start the dashboard with a new local cluster: off, as its processes take CPU from every
    # stage on a small machine; a joined cluster keeps its own
    dashboard: bool = False

    def for_generator(self) -> RayOptions:
        """The placement of the pipeline's generator run: `generator_workers` DDP workers sharing
        the CPUs of `num_workers` (so the run holds what the zoo run held).

        Unset, that is `num_workers` with GPUs but one worker without: on CPU the gloo all-reduce
        of the denoiser's gradients costs more than a second worker gains (two 1-CPU workers
        73.6 samples/s vs one 2-thread process 101.3: bench/results/ray_scaling.json).
        """
        return self.pooled(self.generator_workers or (self.num_workers if self.use_gpu else 1))

    def pooled(self, n: int) -> RayOptions:
        """`n` workers sharing the CPUs of `num_workers` x `cpus_per_worker`."""
        return replace(self, num_workers=n,
                       cpus_per_worker=self.num_workers * self.cpus_per_worker / n)

    def storage(self, out: str | Path) -> str:
        """Absolute storage path (Ray Train requires one; URIs pass through)."""
        if self.storage_path and "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path or Path(out) / "ray").resolve())


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every job takes (config, output, Ray placement)."""
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", required=True, help="output directory of the pipeline's artifacts")
    p.add_argument("--seed", type=int, default=None, help="master seed (shifts every stage)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=500")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers per run")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per training worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs per worker; also its torch threads")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train storage (default <out>/ray; s3://... or NFS on clusters)")
    p.add_argument("--max-failures", type=int, default=1,
                   help="worker-group restarts per run, resumed from the latest checkpoint")
    p.add_argument("--generator-workers", type=int, default=None,
                   help="DDP workers of the pipeline's generator run, sharing the CPUs of "
                        "--num-workers (default: --num-workers with --use-gpu, else 1)")
    p.add_argument("--dashboard", action="store_true",
                   help="start the Ray dashboard with a new local cluster (off: it costs CPU)")
    return p


def options(args: argparse.Namespace) -> RayOptions:
    """RayOptions from parsed `add_args` flags."""
    return RayOptions(address=args.address, num_workers=args.num_workers, use_gpu=args.use_gpu,
                      cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path,
                      max_failures=args.max_failures, generator_workers=args.generator_workers,
                      dashboard=args.dashboard)


def config(args: argparse.Namespace) -> PipelineConfig:
    """The resolved config of the flags (--config, --set, --seed)."""
    return load_config(args.config, args.set, args.seed)


def worker_config(cfg: PipelineConfig) -> dict:
    """The config as a dict for train_loop_config, its data root made absolute for the workers
    (the driver's config itself stays as given: its SHA-256 goes into the report)."""
    d = cfg.to_dict()
    d["data"]["root"] = str(data_root(cfg.data.root).resolve())
    return d


def local_cluster_args(dashboard: bool = False) -> dict:
    """`ray.init` keyword arguments of a new local cluster: without a dashboard, every worker
    runs `jobs.worker_setup` (Ray Train's placement-group cleaner would warn every second)."""
    if dashboard:
        return {}
    return {"include_dashboard": False,
            "runtime_env": {"worker_process_setup_hook":
                            "jobs.worker_setup.quiet_placement_group_cleaner"}}


def init_ray(opts: RayOptions) -> None:
    """Join `opts.address` or $RAY_ADDRESS, else start a local cluster; no-op when connected.

    "local" (not None) is what starts a fresh cluster: ray.init() without an address would
    attach to whatever cluster `ray start` left running on this machine.
    """
    import ray

    os.environ.setdefault(START_TIMEOUT_ENV, str(opts.start_timeout_s))
    if not ray.is_initialized():
        address = opts.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", **local_cluster_args(opts.dashboard))


def run_name(stage: str) -> str:
    """A fresh run name: Ray Train resumes a run whose name it has seen in the storage path."""
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def scaling(opts: RayOptions, num_workers: int | None = None):
    """ScalingConfig: `num_workers` (default opts') workers of opts.cpus_per_worker CPUs each."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=num_workers or opts.num_workers, use_gpu=opts.use_gpu,
                         resources_per_worker={"CPU": opts.cpus_per_worker})


def run_config(opts: RayOptions, out: str | Path, name: str, num_to_keep: int | None = None,
               callbacks: list | None = None):
    """RunConfig under opts.storage(out) with FailureConfig(opts.max_failures); every job's
    runs are configured here, so run-level callbacks (Tune's TuneReportCallback, tracking) are
    passed through `callbacks`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=name, storage_path=opts.storage(out),
                     failure_config=FailureConfig(max_failures=opts.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                     callbacks=callbacks)


def worker_threads(cpus: float) -> int:
    """Set this worker's torch threads to its CPU share (Ray caps OpenMP, not torch); return it."""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n
