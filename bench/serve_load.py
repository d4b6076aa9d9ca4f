"""Load test of the Tina endpoint (issue 4, item 6): batched vs unbatched, autoscaling, one user.

    python bench/serve_load.py [--checkpoint runs/demo/generator] [--quick]
        [--out bench/results/serve_load.json] [--cpus 4] [--threads 1] [--clients 32]

Starts its own local Ray cluster (`ray.init(num_cpus=...)`) and serves the checkpoint on
127.0.0.1 only, with the sampler and steps of its report (tina.json's "sample" section: the
endpoint's defaults, so requests leave them unset). Every request is POST /v1/models with a
distinct (prompt, seed): a random 2..K_max-class prompt of the label space and a seed used once, so
no request hits the generator's cache (`cache_hits` is read back and must be 0). An error is a
non-2xx answer, a timeout, or a body whose safetensors do not hold K head rows and K classes.

Phases, each on a fresh deployment of `tina.serve.build_app`:
- `batched` / `unbatched`: `--clients` closed-loop clients (each sends its next request when the
  previous one is answered) for `--duration-s`; autoscaling off, one generator replica; the same
  code, threads, sampler, steps and max_ongoing_requests, only max_batch_size differing
  (`--max-batch-size` vs 1). Each gives rps (answered requests / wall s), p50_ms, p99_ms, errors
  and the generator's batch-size histogram over the phase (GET /v1/stats, before and after).
- `single_user`: one client sending sequential requests to the batched deployment (what one user
  sees on it: a lone request waits batch_wait_timeout_s for company, then samples alone).
- `autoscaling`: min 1 / max `--max-replicas` generator replicas with small upscale/downscale
  delays; `replicas_timeline` holds the RUNNING generator replicas from `serve.status()` once a
  second: idle, under load for `--autoscale-load-s`, then idle until back at min_replicas (or
  `--autoscale-idle-s` passed).
Writes the JSON with the command, git commit, nproc and CPU model; prints a summary. `--quick` is
a smoke run (short phases; its figures are not the benchmark's). ~5 min on 2 cores.

Why these defaults (measured on a busy 2-core machine, a tina-s generator, DDIM 50 steps):
- `--threads 2`: sampling 16 prompts in one batch makes each model ~1.9x cheaper than alone with
  one torch thread, ~3x with two (a batch of 1 leaves the second thread idle); the sampler's
  compute is the ceiling of both phases.
- `--batch-wait-timeout-s 0.25`: Ray Serve 2.60 forms the next batch `batch_wait_timeout_s` after
  its first request even while the sampler is still busy with the previous one (the finished
  batch then waits on the `max_concurrent_batches` semaphore). The clients of one batch come back
  spread over ~0.1 s, so at 0.05 s each returning group became a batch of its own and stayed so
  (batch sizes 2-16, mean 6.3); at 0.25-0.3 s they were all 16. A lone request waits that long.
- `--max-batch-size 16` for 32 clients: two groups of 16 alternate, so the sampler never waits
  for a group's round trip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
from safetensors.torch import load as load_safetensors

from tina.client import read_metadata
from tina.pipeline import git_commit, machine

APP = "tina-bench"


# ---------------------------------------------------------------------------------------------
# Requests and the closed-loop clients
# ---------------------------------------------------------------------------------------------

class Prompts:
    """Distinct request bodies: a random 2..k_max-class prompt and a seed never used before."""

    def __init__(self, classes: list[str], k_max: int, seed: int = 0) -> None:
        self.classes, self.k_max = classes, min(k_max, len(classes))
        self.rng, self.next_seed, self.lock = random.Random(seed), 0, threading.Lock()

    def next(self) -> dict[str, Any]:
        with self.lock:
            k = self.rng.randint(2, self.k_max)
            body = {"classes": self.rng.sample(self.classes, k), "seed": self.next_seed}
            self.next_seed += 1
        return body


def one_request(session: requests.Session, url: str, body: dict, timeout_s: float
                ) -> tuple[float, str | None]:
    """POST /v1/models -> (latency_ms, None) or (latency_ms, error kind)."""
    t0 = time.perf_counter()
    try:
        r = session.post(url + "/v1/models", json=body, timeout=timeout_s)
    except requests.Timeout:
        return (time.perf_counter() - t0) * 1e3, "timeout"
    except requests.RequestException as e:
        return (time.perf_counter() - t0) * 1e3, type(e).__name__
    ms = (time.perf_counter() - t0) * 1e3
    if not 200 <= r.status_code < 300:
        return ms, f"http_{r.status_code}"
    k = len(body["classes"])
    try:  # the product is the safetensors file: K classes in its metadata, K rows in its head
        classes = read_metadata(r.content)["classes"]
        rows = load_safetensors(r.content)["fc.weight"].shape[0]
    except Exception:  # any unparsable body is the error being counted
        return ms, "bad_body"
    return ms, None if len(classes) == k and rows == k else "wrong_k"


@dataclass
class LoadResult:
    """What one load phase measured (latencies of answered requests only)."""

    clients: int
    duration_s: float  # wall time from the first request to the last answer
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0


def run_load(url: str, prompts: Prompts, clients: int, duration_s: float, timeout_s: float
             ) -> LoadResult:
    """`clients` threads, each sending its next request as soon as the previous one is
    answered, until `duration_s` has passed (requests in flight then are still awaited; each
    client sends at least one)."""
    lat: list[float] = []
    kinds: Counter[str] = Counter()
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + duration_s

    def client() -> None:
        with requests.Session() as s:
            while True:
                ms, err = one_request(s, url, prompts.next(), timeout_s)
                with lock:
                    if err is None:
                        lat.append(ms)
                    else:
                        kinds[err] += 1
                if time.perf_counter() >= deadline:
                    return

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    res = LoadResult(clients=clients, duration_s=round(wall, 2), ok=len(lat),
                     errors=sum(kinds.values()), error_kinds=dict(kinds))
    res.requests = res.ok + res.errors
    if lat:
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
        res.rps = round(len(lat) / wall, 2)
        res.p50_ms, res.p99_ms = round(q[49], 1), round(q[98], 1)
        res.mean_ms = round(statistics.fmean(lat), 1)
    return res


def single_user(url: str, prompts: Prompts, n: int, timeout_s: float) -> dict[str, Any]:
    """One client, `n` sequential requests: p50/p99 latency."""
    lat, errors = [], 0
    with requests.Session() as s:
        for _ in range(n):
            ms, err = one_request(s, url, prompts.next(), timeout_s)
            if err is None:
                lat.append(ms)
            else:
                errors += 1
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"requests": n, "errors": errors, "p50_ms": round(q[49], 1),
            "p99_ms": round(q[98], 1), "mean_ms": round(statistics.fmean(lat), 1)}


# ---------------------------------------------------------------------------------------------
# Deployments and server-side figures
# ---------------------------------------------------------------------------------------------

def deploy(cfg: dict[str, Any], url: str) -> None:
    """(Re)deploy the app with ServeConfig fields `cfg`; return once /readyz answers 200."""
    from ray import serve

    from tina.serve import build_app

    serve.run(build_app(cfg), name=APP, route_prefix="/")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("the bench deployment did not become ready within 120 s")


def generator_stats(url: str) -> dict[str, Any]:
    """GET /v1/stats: the (single) generator replica's batch sizes and cache counters."""
    r = requests.get(url + "/v1/stats", timeout=30)
    r.raise_for_status()
    return r.json()


def stats_delta(before: dict, after: dict) -> dict[str, Any]:
    """Batch-size histogram {size: batches} and cache counters between two /v1/stats reads."""
    b0 = {int(k): v for k, v in before["batch_sizes"].items()}
    hist = {int(k): v - b0.get(int(k), 0) for k, v in after["batch_sizes"].items()}
    hist = {k: v for k, v in sorted(hist.items()) if v}
    n = sum(hist.values())
    return {"batch_size_histogram": {str(k): v for k, v in hist.items()},
            "batches": n,
            "mean_batch_size": round(sum(k * v for k, v in hist.items()) / n, 2) if n else 0.0,
            "cache_hits": after["cache_hits"] - before["cache_hits"],
            "cache_misses": after["cache_misses"] - before["cache_misses"]}


def generator_replicas() -> dict[str, int]:
    """{replica state: count} of the Generator deployment from serve.status() (RUNNING,
    STARTING, STOPPING, ...)."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "Generator" not in app.deployments:
        return {}
    states = app.deployments["Generator"].replica_states
    return {str(getattr(k, "value", k)): v for k, v in states.items() if v}


def fixed_phase(url: str, cfg: dict, prompts: Prompts, args: argparse.Namespace,
                warmup: bool = True) -> dict[str, Any]:
    """Deploy `cfg`, warm up with one round of requests, then measure one load phase."""
    deploy(cfg, url)
    if warmup:  # first calls pay for lazy imports and allocator growth
        run_load(url, prompts, args.clients, 0.0, args.timeout_s)
    before = generator_stats(url)
    res = run_load(url, prompts, args.clients, args.duration_s, args.timeout_s)
    return asdict(res) | stats_delta(before, generator_stats(url))


def autoscaling_phase(url: str, cfg: dict, prompts: Prompts, args: argparse.Namespace
                      ) -> dict[str, Any]:
    """Idle, load, idle; RUNNING generator replicas once a second throughout."""
    deploy(cfg, url)
    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def sample(phase: str) -> int:
        states = generator_replicas()
        timeline.append({"t_s": round(time.monotonic() - t0, 1), "phase": phase,
                         "running": states.get("RUNNING", 0), "states": states})
        return timeline[-1]["running"]

    for _ in range(3):
        sample("idle")
        time.sleep(1)
    result: dict[str, LoadResult] = {}
    loader = threading.Thread(target=lambda: result.setdefault("load", run_load(
        url, prompts, args.clients, args.autoscale_load_s, args.timeout_s)))
    load_start = time.monotonic() - t0
    loader.start()
    while loader.is_alive():
        sample("load")
        time.sleep(1)
    load_end = time.monotonic() - t0
    idle_deadline, tail = time.monotonic() + args.autoscale_idle_s, 3
    while time.monotonic() < idle_deadline and tail > 0:  # back at min, then 3 s more
        if sample("after") <= cfg["min_replicas"]:
            tail -= 1
        time.sleep(1)
    lo = cfg["min_replicas"]
    peak = max(p["running"] for p in timeline)
    up = next((p["t_s"] for p in timeline if p["running"] > lo), None)
    back = next((p["t_s"] for p in timeline if p["phase"] == "after" and up is not None
                 and p["t_s"] > up and p["running"] <= lo), None)
    return {"min_replicas": cfg["min_replicas"], "max_replicas": cfg["max_replicas"],
            "target_ongoing_requests": cfg["target_ongoing_requests"],
            "upscale_delay_s": cfg["upscale_delay_s"],
            "downscale_delay_s": cfg["downscale_delay_s"],
            "load_window_s": [round(load_start, 1), round(load_end, 1)],
            "peak_running": peak,
            "rose_under_load": any(p["running"] > lo for p in timeline if p["phase"] == "load"),
            "returned_after": back is not None,
            "first_above_min_t_s": up, "back_at_min_t_s": back,
            "load": asdict(result["load"]), "replicas_timeline": timeline}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue's done-when names, from the phases that ran."""
    out: dict[str, Any] = {
        "errors": sum(r["errors"] for r in (res.get("batched"), res.get("unbatched"),
                                            res.get("single_user")) if r)
        + (res["autoscaling"]["load"]["errors"] if "autoscaling" in res else 0),
        "cache_hits": sum(res[k]["cache_hits"] for k in ("batched", "unbatched") if k in res)}
    for k in ("batched", "unbatched"):
        if k in res:
            out |= {f"{k}_{m}": res[k][m] for m in ("rps", "p50_ms", "p99_ms",
                                                    "mean_batch_size")}
    if "batched" in res and "unbatched" in res and res["unbatched"]["rps"]:
        out["batched_over_unbatched_rps"] = round(res["batched"]["rps"]
                                                  / res["unbatched"]["rps"], 2)
    if "single_user" in res:
        out |= {"single_user_p50_ms": res["single_user"]["p50_ms"],
                "single_user_p99_ms": res["single_user"]["p99_ms"]}
    if "autoscaling" in res:
        a = res["autoscaling"]
        out |= {"replicas_peak": a["peak_running"],
                "replicas_rose_and_fell": a["rose_under_load"] and a["returned_after"]}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/demo/generator",
                   help="generator directory (default: the one `make demo` writes)")
    p.add_argument("--out", default="bench/results/serve_load.json")
    p.add_argument("--quick", action="store_true", help="smoke run: short phases")
    p.add_argument("--cpus", type=float, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of the generator replica (batched/unbatched)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration-s", type=float, help="each of batched/unbatched (30; quick 8)")
    p.add_argument("--max-batch-size", type=int, default=16, help="of the batched phase")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.25,
                   help="see the module docstring: below the re-arrival spread of a batch's "
                        "clients, batches stay fragmented")
    p.add_argument("--single-user-requests", type=int, help="40; quick 10")
    p.add_argument("--max-replicas", type=int, default=3, help="of the autoscaling phase")
    p.add_argument("--autoscale-load-s", type=float, help="60; quick 30")
    p.add_argument("--autoscale-idle-s", type=float,
                   help="at most this long after the load for the return to min_replicas "
                        "(120; quick 90)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--phases", default="batched,unbatched,autoscaling",
                   help="comma-separated subset (batched includes single_user)")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    for name, full, quick in (("duration_s", 30.0, 8.0), ("single_user_requests", 40, 10),
                              ("autoscale_load_s", 60.0, 30.0),
                              ("autoscale_idle_s", 120.0, 90.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "tina.json").is_file():
        sys.exit(f"{ckpt}: no generator checkpoint (tina.json) here; run `make demo` first or "
                 "pass --checkpoint DIR")
    meta = json.loads((ckpt / "tina.json").read_text())
    report = ckpt.parent / "report.json"
    sample = meta["sample"]
    if report.is_file():  # the report's sampler settings are what tina.json's "sample" holds
        r = json.loads(report.read_text())
        assert (r["sampler"], r["steps"]) == (sample["sampler"], sample["steps"]), (r, sample)
    prompts = Prompts(meta["label_space"]["classes"], meta["arch"]["k_max"])

    import ray
    from ray import serve

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    t_start = time.perf_counter()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # the same code, threads, sampler, steps and queue limits in both fixed phases; only
        # max_batch_size differs. max_ongoing_requests >= clients lets every client's request
        # reach the replica, where @serve.batch gathers them (Serve's default of 5 would cap it).
        common = {"checkpoint": str(ckpt), "threads": args.threads, "num_cpus": 0.5,
                  "batch_wait_timeout_s": args.batch_wait_timeout_s,
                  "max_ongoing_requests": max(args.clients, 2 * args.max_batch_size),
                  "max_queued_requests": 4 * args.clients, "request_timeout_s": args.timeout_s}
        fixed = common | {"autoscaling": False, "num_replicas": 1}
        batched_cfg = fixed | {"max_batch_size": args.max_batch_size}
        unbatched_cfg = fixed | {"max_batch_size": 1}
        auto_cfg = common | {  # one thread per replica: replicas x threads <= cores
            "threads": 1, "autoscaling": True, "max_batch_size": args.max_batch_size,
            "min_replicas": 1, "max_replicas": args.max_replicas,
            "target_ongoing_requests": max(1.0, args.clients / (2 * args.max_replicas)),
            "upscale_delay_s": 2.0, "downscale_delay_s": 5.0}
        res: dict[str, Any] = {}
        if "batched" in phases:
            print(f"batched: {args.clients} clients, {args.duration_s:.0f} s ...", flush=True)
            res["batched"] = fixed_phase(url, batched_cfg, prompts, args)
            print("single user ...", flush=True)
            res["single_user"] = single_user(url, prompts, args.single_user_requests,
                                             args.timeout_s)
        if "unbatched" in phases:
            print(f"unbatched: {args.clients} clients, {args.duration_s:.0f} s ...", flush=True)
            res["unbatched"] = fixed_phase(url, unbatched_cfg, prompts, args)
        if "autoscaling" in phases:
            print(f"autoscaling: {args.autoscale_load_s:.0f} s of load, then idle ...",
                  flush=True)
            res["autoscaling"] = autoscaling_phase(url, auto_cfg, prompts, args)
    finally:
        serve.shutdown()
        ray.shutdown()

    out = {
        "command": "python " + " ".join(sys.argv), "git_commit": git_commit(), **machine(),
        "quick": args.quick, "wall_s": round(time.perf_counter() - t_start, 1),
        "checkpoint": str(ckpt), "checkpoint_sha256": _sha256(ckpt / "tina.safetensors"),
        "sampler": sample["sampler"], "steps": sample["steps"], "guidance": sample["guidance"],
        "endpoint": "POST /v1/models (safetensors), 127.0.0.1", "ray_num_cpus": args.cpus,
        "config": {"batched": batched_cfg, "unbatched": unbatched_cfg, "autoscaling": auto_cfg},
        "summary": summary(res), **res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"] | {"wall_s": out["wall_s"]}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
