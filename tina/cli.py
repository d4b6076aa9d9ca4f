"""`tina` command line: pipeline, generate.

    tina pipeline --config configs/demo.yaml --out runs/demo [--seed 1] [--set train.steps=500]
        [--num-workers 2] [--address ADDR] [--no-ray]
    tina generate --checkpoint runs/demo/generator --class sneaker --class "T-shirt/top" --out m/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

from safetensors.torch import save_file

from tina.errors import TinaError


def _pipeline(args: argparse.Namespace) -> None:
    from tina.config import load_config
    from tina.pipeline import run_pipeline

    cfg = load_config(args.config, args.set, args.seed)
    command = "tina " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.no_ray:
        report = run_pipeline(cfg, args.out, command)
    else:  # the training stages as Ray Train runs, on --address or a local cluster (jobs/)
        from jobs.common import RayOptions
        from jobs.pipeline import run_ray_pipeline

        opts = RayOptions(address=args.address, num_workers=args.num_workers)
        report = run_ray_pipeline(cfg, args.out, opts, command)
    print(f"report written to {Path(args.out) / 'report.json'} "
          f"({report['timing']['pipeline_wall_s']:.0f} s)")


def _generate(args: argparse.Namespace) -> None:
    import json as _json

    from tina.generate import load_generator, prompt_seed

    ckpt = Path(args.checkpoint)
    meta_p = ckpt / "tina.json"
    if not meta_p.is_file():
        raise TinaError(f"{ckpt}: no tina.json here; pass the generator directory "
                        "(e.g. runs/demo/generator)")
    meta = _json.loads(meta_p.read_text())
    gen = load_generator(ckpt)
    model = gen.generate([args.classes], [args.seed], sampler=args.sampler, steps=args.steps,
                         guidance=args.guidance)[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [gen.label_space.canonical(n) if gen._lookup(n) >= 0 else n for n in args.classes]
    gen_id = hashlib.sha256((ckpt / "tina.safetensors").read_bytes()).hexdigest()[:16]
    info = {
        "format": "tina-model/1", "arch": meta["arch"]["name"],
        "convs": [{"in": m.in_channels, "out": m.out_channels, "stride": m.stride[0]}
                  for m in model.body if hasattr(m, "stride")],
        "n_params": sum(p.numel() for p in model.parameters()), "classes": names,
        "preprocessing": meta["preprocessing"], "generator_id": gen_id, "seed": args.seed,
        "prompt_seed": prompt_seed(args.seed, args.classes),
        "sampler": args.sampler or meta["sample"]["sampler"],
        "steps": args.steps if args.steps is not None else meta["sample"]["steps"],
        "guidance": args.guidance if args.guidance is not None else meta["sample"]["guidance"],
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"classes": json.dumps(names)})
    (out / "model.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out / 'model.safetensors'} ({info['n_params']} parameters, classes {names})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tina", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pipeline", help="generic -> zoo -> generator -> evaluation report")
    pp.add_argument("--config", required=True)
    pp.add_argument("--out", required=True)
    pp.add_argument("--seed", type=int, default=None, help="master seed (shifts every stage)")
    pp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set zoo.n_pmodels=40")
    pp.add_argument("--address", default=None,
                    help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    pp.add_argument("--num-workers", type=int, default=2,
                    help="Ray Train workers of the zoo and generator runs")
    pp.add_argument("--no-ray", action="store_true",
                    help="train every stage in this process instead of as Ray Train runs")
    pp.set_defaults(fn=_pipeline)
    pg = sub.add_parser("generate", help="generate a classifier for the named classes")
    pg.add_argument("--checkpoint", required=True, help="generator directory (tina.json)")
    pg.add_argument("--class", dest="classes", action="append", required=True,
                    help="a class name, in output order; repeat for each class")
    pg.add_argument("--out", required=True)
    pg.add_argument("--seed", type=int, default=0)
    pg.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
    pg.add_argument("--steps", type=int, default=None)
    pg.add_argument("--guidance", type=float, default=None)
    pg.set_defaults(fn=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out, a full disk: say which path, no traceback
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
