"""`tina` command line: pipeline, generate, serve, request.

    tina pipeline --config configs/demo.yaml --out runs/demo [--seed 1] [--set train.steps=500]
        [--num-workers 2] [--generator-workers N] [--address ADDR] [--no-ray] [--dashboard]
    tina generate --checkpoint runs/demo/generator --class sneaker --class "T-shirt/top" --out m/
    tina serve --checkpoint runs/demo/generator [--port 8000] [--set max_batch_size=16]
    tina request --url http://127.0.0.1:8000 --classes "sneaker,bag" --out model.safetensors
    tina request --url http://127.0.0.1:8000 --classes "sneaker,bag" --classify photo.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

from safetensors.torch import save_file

from tina.errors import TinaError, run_reporting_user_errors


def _pipeline(args: argparse.Namespace) -> None:
    from tina.config import load_config
    from tina.pipeline import run_pipeline

    cfg = load_config(args.config, args.set, args.seed)
    command = "tina " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.no_ray:
        report = run_pipeline(cfg, args.out, command, config_path=args.config)
    else:  # the training stages as Ray Train runs, on --address or a local cluster (jobs/)
        from jobs.common import RayOptions
        from jobs.pipeline import run_ray_pipeline

        opts = RayOptions(address=args.address, num_workers=args.num_workers,
                          generator_workers=args.generator_workers, dashboard=args.dashboard)
        report = run_ray_pipeline(cfg, args.out, opts, command, config_path=args.config)
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
    gen = load_generator(ckpt)  # validates the checkpoint: a damaged one is a CheckpointError
    meta = _json.loads(meta_p.read_text())
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
        "residual_scale": meta["sample"].get("residual_scale", 1.0),
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"classes": json.dumps(names)})
    (out / "model.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out / 'model.safetensors'} ({info['n_params']} parameters, classes {names})")


def _serve(args: argparse.Namespace) -> None:
    import time

    import ray
    from ray import serve

    from tina.config import serve_config_from_args
    from tina.errors import ConfigError
    from tina.serve import build_app

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (a ServeConfig field)")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    settings = {**overrides, "checkpoint": args.checkpoint}
    app = build_app(settings)  # checks the settings and the checkpoint before Ray starts
    # the proxy's own end-to-end timeout backs up the app's request_timeout_s (504 JSON)
    proxy_timeout_s = serve_config_from_args(settings).request_timeout_s + 10
    ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "request_timeout_s": proxy_timeout_s})
        serve.run(app, route_prefix="/")
        print(f"serving {args.checkpoint} at http://{args.host}:{args.port} "
              "(docs at /docs; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _request(args: argparse.Namespace) -> None:
    from tina.client import TinaClient

    classes = [c.strip() for c in (args.classes or "").split(",") if c.strip()] + args.cls
    if not classes:
        raise TinaError("give the prompt: --classes \"a,b,c\" or --class NAME (repeated)")
    client = TinaClient(args.url, timeout_s=args.timeout)
    opts = dict(seed=args.seed, sampler=args.sampler, steps=args.steps, guidance=args.guidance)
    if args.classify:
        res = client.classify(args.classify, classes=classes, **opts)
        if args.json:
            print(json.dumps(res, indent=2))
        for path, p in zip(args.classify, res["predictions"], strict=True):
            print(f"{path}: {p['label']} ({max(p['probabilities']):.3f})")
        return
    model = client.generate(classes, **opts)
    if args.json:
        print(json.dumps(model.metadata, indent=2))
    if args.out:
        path = model.save(args.out)
        print(f"wrote {path} and {path.with_suffix('.json')} (model {model.model_id}, "
              f"classes {model.classes})")
    elif not args.json:
        print(f"model {model.model_id}: classes {model.classes}, "
              f"{model.metadata['n_params']} parameters (--out FILE saves it)")


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
                    help="Ray Train workers of the zoo run (1 CPU each)")
    pp.add_argument("--generator-workers", type=int, default=None,
                    help="DDP workers of the generator run, sharing the zoo run's CPUs "
                         "(default: 1 on CPU, where DDP measured slower; see README)")
    pp.add_argument("--no-ray", action="store_true",
                    help="train every stage in this process instead of as Ray Train runs")
    pp.add_argument("--dashboard", action="store_true",
                    help="start the Ray dashboard with the local cluster (off: it costs CPU)")
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
    ps = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve (Ctrl-C stops)")
    ps.add_argument("--checkpoint", required=True, help="generator directory (tina.json)")
    ps.add_argument("--host", default="127.0.0.1")
    ps.add_argument("--port", type=int, default=8000)
    ps.add_argument("--address", default=None, help="join this Ray cluster (default: local)")
    ps.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local cluster")
    ps.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a tina.config.ServeConfig field, e.g. --set max_batch_size=8")
    ps.set_defaults(fn=_serve)
    pr = sub.add_parser("request", help="ask a running endpoint for a model or predictions")
    pr.add_argument("--url", default="http://127.0.0.1:8000")
    pr.add_argument("--classes", default=None, help='comma-separated class names, "a,b,c"')
    pr.add_argument("--class", dest="cls", action="append", default=[],
                    help="one class name or description (repeat; after --classes)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
    pr.add_argument("--steps", type=int, default=None)
    pr.add_argument("--guidance", type=float, default=None)
    pr.add_argument("--out", default=None, help="write the model here (.safetensors + .json)")
    pr.add_argument("--classify", nargs="+", default=None, metavar="IMAGE",
                    help="PNG/JPEG files to classify with the prompt's model")
    pr.add_argument("--json", action="store_true", help="print the JSON answer")
    pr.add_argument("--timeout", type=float, default=120.0, help="seconds")
    pr.set_defaults(fn=_request)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_user_errors(lambda: args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
