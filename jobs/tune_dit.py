"""Ray Tune over the generator's training and sampling settings, ASHA early stopping, val objective.

    python -m jobs.tune_dit --config configs/demo.yaml --out runs/demo --num-samples 16 \
        [--max-concurrent 2] [--space-file space.yaml] [--space 'dit.depth={choice: [4, 6]}']
    python -m jobs.train_dit --config runs/demo/tune/best.yaml --out runs/demo-tuned
    tina pipeline --config runs/demo/tune/best.yaml --out runs/demo-tuned

Needs <out>/generic and <out>/zoo (jobs.train_generic and jobs.build_zoo, or a pipeline run);
writes <out>/tune/best.yaml (the full config with the best trial's values: what train_dit and
`tina pipeline` load) and <out>/tune/trials.json (every trial: values, steps run, val scores).

Each trial is a driver function (Ray Train V2's Tune pattern; `Tuner(trainer)` is deprecated): it
builds the train_dit `TorchTrainer` of the trial's config and fits it, with a
`TuneReportCallback` in its RunConfig that forwards rank 0's val-step results. The objective
"val_acc" is max(val_raw, val_ema): the mean accuracy of models generated for the first
train.val_tasks `val` tasks (the score train_dit selects its checkpoint by; never test). ASHA
stops trials at rungs of training steps ("step": the val steps, train.val_every; a config that
scores val only at the end gets 4), and jobs.run_reaper frees a stopped trial's workers. The
search space and its overrides: jobs/tune_space.py. Trials run at most `max_concurrent` at a time,
bounded so that trials x (driver + workers) CPUs fit the cluster: otherwise drivers could hold
every CPU while their trainers wait for workers (a deadlock on a 2-CPU machine).

Guidance scale and sampler steps are sampling settings: the training of a trial does not depend on
them; they change only how its val score is computed (sample.guidance; train.val_sample_steps
is set to sample.steps), and the best ones become the sampler defaults in best.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from jobs.common import (
    RayOptions,
    add_args,
    config,
    init_ray,
    options,
    run_name,
    worker_config,
)
from jobs.tune_space import SEARCH_SPACE, check_space, distribution, parse_space, tuned_config
from tina.config import PipelineConfig, from_dict
from tina.errors import ConfigError, TinaError, run_reporting_user_errors
from tina.tasks import Splits
from tina.train import GeneratorInputs

METRIC = "val_acc"  # max(val_raw, val_ema) of a val step; to maximize
HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node (1 unit)


def with_rungs(cfg: PipelineConfig, rungs: int = 4) -> PipelineConfig:
    """`cfg` scoring val at `rungs` evenly spaced steps when it scores only at the end (ASHA
    needs intermediate scores); val steps must be checkpoint steps (tina.train)."""
    tc = cfg.train
    if tc.val_every > 0:
        return cfg
    ckpt = tc.checkpoint_every or max(1, tc.steps // rungs)
    every = max(ckpt, tc.steps // rungs // ckpt * ckpt)
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, val_every=every,
                                                              checkpoint_every=ckpt))


def trial_plan(opts: RayOptions, driver_cpus: float | None,
               max_concurrent: int | None) -> tuple[float, int]:
    """(CPUs of each trial's driver, trials at a time) for the connected Ray cluster.

    Trials x (driver + workers) never exceed ray.cluster_resources() (GPUs likewise). A driver
    only builds its trainer and waits on it (as Train's own controller, which takes 0 CPUs):
    `driver_cpus=None` gives it 1 CPU when the cluster has one to spare beside one trial's
    workers, else 0. Raises ConfigError when one trial's workers do not fit the cluster.
    """
    import ray

    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    workers = opts.num_workers * opts.cpus_per_worker
    if driver_cpus is None:
        driver_cpus = 1.0 if cpus >= workers + 1 else 0.0
    per_trial = driver_cpus + workers
    fit = math.floor(cpus / per_trial + 1e-9) if per_trial > 0 else 1
    if opts.use_gpu:
        fit = min(fit, math.floor(gpus / opts.num_workers + 1e-9))
    if fit < 1:
        raise ConfigError(
            f"one trial needs {per_trial:g} CPUs (driver {driver_cpus:g} + {opts.num_workers} "
            f"workers x {opts.cpus_per_worker:g})" + (f" and {opts.num_workers} GPUs"
                                                       if opts.use_gpu else "")
            + f"; the cluster has {cpus:g} CPUs, {gpus:g} GPUs: lower --num-workers, "
            "--cpus-per-worker or --driver-cpus")
    return driver_cpus, min(fit, max_concurrent or fit)


def _val_callback():
    """A TuneReportCallback that forwards only val-step results (Tune checks that its metric is
    in every result), with METRIC added. Built inside a trial (its constructor needs the
    session)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]  # rank 0's: the only rank that scores val
            if "val_raw" in m:
                super().after_report(run_context, [m | {METRIC: max(m["val_raw"],
                                                                     m["val_ema"])}],
                                     checkpoint)

    return ValReport()


def _trial(values: dict, *, base: dict, inputs: GeneratorInputs, splits: Splits, out: str,
           opts: RayOptions, registry, env: dict[str, str]) -> None:
    """The driver function of one trial: fit train_dit's trainer on the trial's config."""
    import ray
    import ray.tune

    # Ray Train takes its settings (worker start timeout, controller polling) from the
    # environment of the process that calls fit(): this trial actor's, not the Tune driver's
    os.environ.update(env)

    from jobs.run_reaper import RegisterRun
    from jobs.train_dit import dit_trainer

    cfg = tuned_config(from_dict(base), values)
    meta = inputs.meta | {"config": cfg.to_dict(), "config_sha256": cfg.sha256()}
    trial = ray.tune.get_context().get_trial_id()
    trainer = dit_trainer(cfg, dataclasses.replace(inputs, meta=meta), splits, out, opts,
                          name=run_name(f"generator-{trial}"),
                          callbacks=[_val_callback(), RegisterRun(registry, trial)])
    try:
        trainer.fit()
    except ray.exceptions.ActorDiedError:
        # the trial ended (ASHA) and jobs.run_reaper killed its controller: nothing to report,
        # and this (reused) trial actor must end cleanly to take the next trial
        if not ray.get(registry.reaped.remote(trial)):
            raise


def load_inputs(cfg: PipelineConfig, out: Path) -> tuple[GeneratorInputs, Splits]:
    """The generator's inputs (generic model and zoo of <out>) and the splits of `cfg`.

    Raises TinaError when <out> lacks the generic model or the zoo."""
    from jobs.build_zoo import load_generic
    from tina.data import dataset_info
    from tina.encoders import build_encoder
    from tina.pipeline import generator_inputs
    from tina.tasks import LabelSpace, make_splits
    from tina.zoo import ZooStore

    info = dataset_info(cfg.data.dataset, cfg.data.root, cfg.data.image_size)
    space = LabelSpace(info.classes, cfg.data.held_out)
    splits = make_splits(space, cfg.data.forbidden_pairs, cfg.zoo.k, cfg.zoo.n_pmodels, cfg.eval,
                         cfg.seed)
    generic = load_generic(cfg, out)
    if not (out / "zoo").is_dir():
        raise TinaError(f"{out / 'zoo'} not found: run `python -m jobs.build_zoo` with the same "
                        "--config and --out first")
    entries, flats = ZooStore(out / "zoo").load()
    has_row = torch.tensor(json.loads((out / "generic" / "model.json").read_text())["has_row"])
    return generator_inputs(cfg, space, generic, has_row, build_encoder(cfg.encoder), entries,
                            flats, info.in_channels), splits


def run_tune(cfg: PipelineConfig, out: str | Path, opts: RayOptions, space: dict[str, Any],
             num_samples: int, max_concurrent: int | None = None,
             driver_cpus: float | None = None, best_config: str | Path | None = None,
             reduction_factor: int = 2, seed: int | None = None) -> dict:
    """Tune `cfg`'s generator on <out>'s generic model and zoo; write the best config as YAML.

    Returns:
        {"best": {"values", "val_acc", "trial_id", "config"}, "trials": [{"trial_id", "values",
        "steps" (the last step it reported), "val_acc" (its best), "stopped_early", "error"}],
        "max_concurrent", "driver_cpus", "tune_run"}; also written to <out>/tune/trials.json.
    Raises:
        ConfigError: bad search space, or a trial that cannot fit the cluster.
        TinaError: missing generic model or zoo; every trial failed.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from jobs.run_reaper import ReapRuns, RunRegistry

    out = Path(out).resolve()
    cfg = with_rungs(cfg)
    check_space(cfg, space)
    init_ray(opts)
    driver_cpus, concurrent = trial_plan(opts, driver_cpus, max_concurrent)
    inputs, splits = load_inputs(cfg, out)
    registry = RunRegistry.remote()
    trainable = tune.with_resources(
        # worker_config: the data root made absolute (Tune runs each trial in its own directory)
        tune.with_parameters(_trial, base=worker_config(cfg), inputs=inputs, splits=splits,
                             out=str(out), opts=opts, registry=registry,
                             env={k: v for k, v in os.environ.items()
                                  if k.startswith("RAY_TRAIN_")}),
        # Tune rejects an empty request: a driver without a CPU share runs on the head node
        {"CPU": driver_cpus} if driver_cpus > 0 else {HEAD_NODE: 0.001})
    asha = ASHAScheduler(time_attr="step", max_t=cfg.train.steps,
                         grace_period=cfg.train.val_every, reduction_factor=reduction_factor)
    name = run_name("tune")
    tuner = tune.Tuner(
        trainable, param_space={k: distribution(k, v) for k, v in space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=asha, num_samples=num_samples,
            # TuneConfig(max_concurrent_trials=n) is ignored beside a search_alg that is not a
            # Searcher (a warning, then every trial starts): the default random search takes
            # the bound itself, as Tune builds it from max_concurrent_trials without a seed
            search_alg=tune.search.BasicVariantGenerator(max_concurrent=concurrent,
                                                         random_state=seed),
            # a trial's driver process (torch, tina and the val images loaded) takes the next
            # trial: only the Train workers start anew
            reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=opts.storage(out),
                                  callbacks=[ReapRuns(registry)]))
    try:
        grid = tuner.fit()
    finally:
        ray.kill(registry)
    trials = []
    for r in grid:
        hist = r.metrics_dataframe
        scored = hist is not None and METRIC in hist
        trials.append({
            "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
            "values": {k: r.config[k] for k in space}, "steps": (r.metrics or {}).get("step"),
            "val_acc": float(hist[METRIC].max()) if scored else None,
            "stopped_early": r.error is None and (r.metrics or {}).get("step",
                                                                       0) < cfg.train.steps,
            "error": None if r.error is None else str(r.error).strip().splitlines()[-1]})
    if all(t["val_acc"] is None for t in trials):
        raise TinaError(f"no trial reported a val score (errors: "
                        f"{[t['error'] for t in trials]}); see {opts.storage(out)}/{name}")
    best = max((t for t in trials if t["val_acc"] is not None), key=lambda t: t["val_acc"])
    best_cfg = tuned_config(cfg, best["values"])
    path = Path(best_config) if best_config else out / "tune" / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# jobs.tune_dit: best of {len(trials)} trials, {METRIC}="
                    f"{best['val_acc']:.4f} (trial {best['trial_id']}, Tune run {name})\n"
                    + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    summary = {"best": best | {"config": str(path)}, "trials": trials,
               "max_concurrent": concurrent, "driver_cpus": driver_cpus,
               "tune_run": str(Path(opts.storage(out)) / name)}
    (out / "tune").mkdir(exist_ok=True)
    (out / "tune" / "trials.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = add_args(argparse.ArgumentParser(description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--num-samples", type=int, default=8, help="trials to run")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at a time (default: as many as the cluster's CPUs fit)")
    p.add_argument("--driver-cpus", type=float, default=None,
                   help="CPUs reserved per trial's driver (default: 1 if one is spare, else 0)")
    p.add_argument("--space-file", default=None,
                   help="YAML search space entries (see jobs/tune_space.py)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=YAML",
                   help="a search space entry, e.g. 'train.lr={loguniform: [1e-4, 1e-3]}'")
    p.add_argument("--best-config", default=None, help="where to write the best config "
                   "(default <out>/tune/best.yaml)")
    args = p.parse_args(argv)
    space = parse_space(SEARCH_SPACE, args.space, args.space_file)
    summary = run_tune(config(args), args.out, options(args), space, args.num_samples,
                       args.max_concurrent, args.driver_cpus, args.best_config, seed=args.seed)
    best = summary["best"]
    print(f"best {METRIC}={best['val_acc']:.4f} with {best['values']}; config in {best['config']}")


if __name__ == "__main__":
    raise SystemExit(run_reporting_user_errors(main))
