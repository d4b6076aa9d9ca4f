"""The whole pipeline with its training stages as Ray Train runs, ending in the same report.

    python -m jobs.pipeline --config configs/demo.yaml --out runs/demo [--num-workers 2]
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/demo.yaml \
        --out runs/demo --address auto

generic model (1 worker, jobs.train_generic) -> zoo, then the evaluation's fine-tuned references
(N workers each, jobs.build_zoo) -> image encoder (driver) -> generator (jobs.train_dit: N DDP
workers with GPUs; on CPU one worker with their CPUs, `RayOptions.for_generator`) -> evaluation
and report (driver): `tina.pipeline.run_pipeline` with `ray_stages(...)`, so everything but the
training stages is the plain pipeline's own code, and a re-run skips finished stages the same way.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from functools import partial
from pathlib import Path

from jobs.build_zoo import stage_references_ray, stage_zoo_ray
from jobs.common import RayOptions, add_args, config, init_ray, options
from jobs.train_dit import trainer_on_ray
from jobs.train_generic import stage_generic_ray
from tina.config import PipelineConfig
from tina.errors import run_reporting_user_errors
from tina.pipeline import Stages, run_pipeline


def ray_stages(opts: RayOptions, out: str | Path) -> Stages:
    """The pipeline's three training stages as Ray Train runs placed by `opts` (the generator's
    by `opts.for_generator()`)."""
    return Stages(generic=partial(stage_generic_ray, opts), zoo=partial(stage_zoo_ray, opts),
                  references=partial(stage_references_ray, opts),
                  generator=trainer_on_ray(opts.for_generator(), out))


def run_ray_pipeline(cfg: PipelineConfig, out: str | Path, opts: RayOptions,
                     command: str = "", config_path: str | Path | None = None) -> dict:
    """Join or start Ray, run every stage (training on Ray) and write report.json, report.md and
    plots under `out`; return the report (the schema of `tina.pipeline.run_pipeline`)."""
    init_ray(opts)
    return run_pipeline(cfg, out, command, stages=ray_stages(opts, out), config_path=config_path)


def main(argv: list[str] | None = None) -> None:
    args = add_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    command = "python -m jobs.pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_ray_pipeline(config(args), args.out, options(args), command, args.config)
    print(f"report written to {Path(args.out) / 'report.json'} "
          f"({report['timing']['pipeline_wall_s']:.0f} s)")


if __name__ == "__main__":
    raise SystemExit(run_reporting_user_errors(main))
