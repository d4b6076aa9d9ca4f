"""The Ray jobs (jobs/) on the shared local Ray cluster, 2 workers per run, on tests/tiny.yaml and
the real data: the pipeline as Ray Train runs, the sharded zoo, DDP generator training with
checkpoints, resume from a given checkpoint, and a worker killed mid-run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.build_zoo import load_generic, run_build_zoo
from jobs.common import RayOptions
from jobs.pipeline import run_ray_pipeline
from jobs.train_dit import VAL_FILE, dit_trainer
from tina.config import load_config
from tina.encoders import build_encoder
from tina.generate import load_generator
from tina.pipeline import generator_inputs
from tina.tasks import LabelSpace, Splits
from tina.zoo import REFERENCE, ZooStore

TINY = Path(__file__).parent / "tiny.yaml"
# the generator run keeps checkpoints at steps 6, 12, 18, 24 and scores val at 12 and 24
# ray.train.report blocks until the Train controller polls the worker (a queue of one result),
# and the controller polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): the tiny
# runs here report every few steps, so they poll faster (the driver's value reaches the
# controller at fit time)
POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
RAY_SET = ["train.steps=24", "train.checkpoint_every=6", "train.val_every=12",
           "train.val_tasks=2", "train.val_sample_steps=3"]


@pytest.fixture(scope="module")
def ray_run(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tests/tiny.yaml through jobs.pipeline (zoo: 2 workers; generic, generator: 1 of 2 CPUs)."""
    out = tmp_path_factory.mktemp("ray_pipeline")
    cfg = load_config(TINY, RAY_SET)
    opts = RayOptions(address=ray_cluster["address"], num_workers=2,
                      storage_path=str(out / "ray"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*POLL)
        report = run_ray_pipeline(cfg, out, opts, command="pytest ray pipeline",
                                  config_path=TINY)
    return {"out": out, "cfg": cfg, "opts": opts, "report": report}


def _checkpoints(run_dir: Path) -> list[dict]:
    """val.json of every checkpoint of a train_dit run, with its path, sorted by step."""
    found = [json.loads((d / VAL_FILE).read_text()) | {"path": d}
             for d in run_dir.glob("checkpoint_*") if (d / VAL_FILE).is_file()]
    return sorted(found, key=lambda c: (c["start_step"], c["checkpoint_step"]))


def _registered(run_dir: Path) -> int:
    """Checkpoints Ray Train's controller has registered for a run (its snapshot file)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    try:
        snapshot = json.loads((run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0
    return len(snapshot["checkpoint_results"])


def test_ray_pipeline_writes_the_report_of_the_plain_pipeline(ray_run: dict,
                                                              tiny_run: Path) -> None:
    plain = json.loads((tiny_run / "report.json").read_text())
    report = json.loads((ray_run["out"] / "report.json").read_text())
    assert set(report) == set(plain)
    assert set(report["splits"]) == set(plain["splits"])
    assert set(report["timing"]["stages_s"]) == set(plain["timing"]["stages_s"])
    assert report["n_zoo"] == 12 and report["command"] == "pytest ray pipeline"
    assert 0.0 <= report["splits"]["ood"]["tina"]["mean"] <= 1.0


def test_zoo_workers_write_one_manifest_shard_each_merged_into_every_task_once(
        ray_run: dict) -> None:
    zoo = ray_run["out"] / "zoo"
    shards = sorted(p.name for p in zoo.glob("manifest-*.jsonl"))
    assert shards == ["manifest-rank0.jsonl", "manifest-rank1.jsonl"]
    for rank in (0, 1):  # task i went to rank i % 2
        ids = [json.loads(line)["id"] for line in
               (zoo / f"manifest-rank{rank}.jsonl").read_text().splitlines()]
        assert ids and all(int(i[3:]) % 2 == rank for i in ids)
    merged = [json.loads(line)["id"] for line in (zoo / "manifest.jsonl").read_text().splitlines()]
    assert merged == [f"pm-{i:05d}" for i in range(12)]
    flat = load_file(str(zoo / "params" / "pm-00003.safetensors"))["params"]
    assert flat.shape == (414,) and bool(torch.isfinite(flat).all())


def test_the_zoo_run_also_fine_tunes_every_evaluation_reference(ray_run: dict) -> None:
    """One Ray run (one worker-group start-up) fills both stores, sharded the same way."""
    out = ray_run["out"]
    splits = Splits.from_json(json.loads((out / "splits.json").read_text()))
    ref = out / REFERENCE.folder
    merged = [json.loads(line)["id"] for line in (ref / "manifest.jsonl").read_text().splitlines()]
    assert merged == sorted(REFERENCE.ids(len(splits.reference_tasks())))
    shards = sorted(p.name for p in ref.glob("manifest-*.jsonl"))
    assert shards == ["manifest-rank0.jsonl", "manifest-rank1.jsonl"]
    runs = [p.name for p in (out / "ray").iterdir()]
    assert any(n.startswith("zoo-") for n in runs)
    assert not any(n.startswith(f"{REFERENCE.folder}-") for n in runs)


def test_a_resubmitted_zoo_job_skips_every_finished_pmodel(ray_run: dict) -> None:
    out, cfg = ray_run["out"], ray_run["cfg"]
    params = sorted((out / "zoo" / "params").iterdir())
    before = [p.stat().st_mtime_ns for p in params]
    splits = Splits.from_json(json.loads((out / "splits.json").read_text()))
    summary = run_build_zoo(cfg, out, load_generic(cfg, out), splits.zoo, ray_run["opts"])
    assert summary["written"] == 0 and summary["skipped"] == 12
    assert [p.stat().st_mtime_ns for p in params] == before
    assert len((out / "zoo" / "manifest.jsonl").read_text().splitlines()) == 12


def test_the_generator_job_writes_its_best_val_checkpoint_in_the_generator_format(
        ray_run: dict) -> None:
    out = ray_run["out"]
    gen = load_generator(out / "generator")
    model = gen.generate([["Trouser", "digit 5", "Bag"]], [0])[0]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    hist = json.loads((out / "generator" / "train_history.json").read_text())
    assert len(hist["loss"]) == 24
    val = hist["val"]
    assert [h["step"] for h in val["history"]] == [12, 24]
    best = max(val["history"], key=lambda h: max(h["raw"], h["ema"]))
    assert val["step"] == best["step"] and val["score"] == max(best["raw"], best["ema"])
    ckpts = _checkpoints(Path(hist["ray_run"]))
    assert [c["checkpoint_step"] for c in ckpts] == [6, 12, 18, 24]
    # the weights written are those of the best val step
    best_dir = next(c["path"] for c in ckpts if c["checkpoint_step"] == val["step"]) / "best"
    assert load_file(str(best_dir / "tina.safetensors")).keys() == load_file(
        str(out / "generator" / "tina.safetensors")).keys()
    for k, v in load_file(str(best_dir / "tina.safetensors")).items():
        assert torch.equal(v, load_file(str(out / "generator" / "tina.safetensors"))[k]), k


def test_a_killed_worker_resumes_at_the_step_after_the_latest_checkpoint(
        ray_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from the pipeline run's step-6 checkpoint (a given checkpoint: the run begins at
    step 6), kill rank 1 with SIGKILL after this run's 2nd reported checkpoint; the second
    attempt must resume at the step after the latest reported checkpoint and end at
    train.steps."""
    out = ray_run["out"]
    steps, every = 150, 10
    cfg = load_config(TINY, RAY_SET + [f"train.steps={steps}", f"train.checkpoint_every={every}",
                                       "train.val_every=0"])
    hist = json.loads((out / "generator" / "train_history.json").read_text())
    given = next(c for c in _checkpoints(Path(hist["ray_run"])) if c["checkpoint_step"] == 6)
    splits = Splits.from_json(json.loads((out / "splits.json").read_text()))
    generic = load_generic(cfg, out)
    has_row = torch.tensor(json.loads((out / "generic" / "model.json").read_text())["has_row"])
    entries, flats = ZooStore(out / "zoo").load()
    space = LabelSpace(json.loads((out / "generic" / "model.json").read_text())["classes"],
                       cfg.data.held_out)
    inputs = generator_inputs(cfg, space, generic, has_row, build_encoder(cfg.encoder), entries,
                              flats, 1)
    pids = tmp_path / "pids"
    monkeypatch.setenv(*POLL)
    opts = RayOptions(address=ray_run["opts"].address, num_workers=2, max_failures=1,
                      storage_path=str(tmp_path / "ray"), pid_dir=str(pids))
    trainer = dit_trainer(cfg, inputs, splits, tmp_path, opts, name="kill-test",
                          resume_from=str(given["path"]))
    results: list = []
    fit = threading.Thread(target=lambda: results.append(trainer.fit()))
    fit.start()
    run_dir = tmp_path / "ray" / "kill-test"
    # Kill once the controller has registered 2 checkpoints: results the workers reported but
    # the controller has not polled yet die with the worker group.
    deadline = time.monotonic() + 180
    while _registered(run_dir) < 2 and fit.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = json.loads((pids / "rank1.json").read_text())["pid"]
    os.kill(killed, signal.SIGKILL)
    fit.join(timeout=240)
    assert not fit.is_alive() and results, "the run did not finish"
    # what Ray Train registered as reported checkpoints, with their metrics
    reported = sorted((m["start_step"], m["step"]) for _, m in results[0].best_checkpoints)
    first = [step for start, step in reported if start == 6]  # began at the given checkpoint
    second = [(start, step) for start, step in reported if start > 6]
    assert len(first) >= 2 and all(step % every == 0 for step in first)
    assert second, "no second attempt: the kill came after the run had ended"
    latest = max(first)
    assert {start for start, _ in second} == {latest}  # resumed at the step after it
    assert min(step for _, step in second) == latest + every
    assert max(step for _, step in second) == steps
    assert results[0].metrics["step"] == steps and results[0].metrics["start_step"] == latest
    assert json.loads((pids / "rank1.json").read_text())["pid"] != killed


def test_the_ray_pipeline_is_recorded_in_mlflow_with_a_registered_generator(ray_run: dict
                                                                            ) -> None:
    import mlflow
    from mlflow import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]  # the session's private store (conftest)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")  # named after the config file
    runs = client.search_runs([exp.experiment_id],
                              f"attributes.run_name = '{ray_run['out'].name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["train.steps"] == "24" and run.data.params["zoo.k"] == "10"
    loss = client.get_metric_history(run.info.run_id, "generator.loss")
    assert [m.step for m in loss] == list(range(24))
    assert len(client.get_metric_history(run.info.run_id, "generator.val.raw")) == 2
    assert "acc.ood.tina" in run.data.metrics
    art = {a.path for folder in ("generator", "report", "zoo")
           for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"generator/tina.safetensors", "generator/tina.json", "report/report.json",
            "zoo/manifest.jsonl"} <= art
    (version,) = client.search_model_versions("name = 'tina-tiny'")
    assert version.run_id == run.info.run_id
    model = mlflow.pyfunc.load_model(f"models:/tina-tiny/{version.version}")
    (out,) = model.predict([{"classes": ["Sandal", "digit 3"], "seed": 7}])
    gen = load_generator(ray_run["out"] / "generator")
    want = gen.generate([["Sandal", "digit 3"]], [7])[0]
    got = torch.tensor(out["params"] if isinstance(out, dict) else out.params)
    assert torch.equal(got, torch.cat([v.reshape(-1) for v in want.state_dict().values()]))


def test_the_generator_run_holds_the_zoo_runs_cpus() -> None:
    # on CPU one worker with every CPU (DDP measured slower); with GPUs DDP over num_workers
    cpu = RayOptions(num_workers=4, cpus_per_worker=0.5).for_generator()
    assert (cpu.num_workers, cpu.cpus_per_worker) == (1, 2.0)
    gpu = RayOptions(num_workers=4, use_gpu=True).for_generator()
    assert (gpu.num_workers, gpu.cpus_per_worker) == (4, 1.0)
    two = RayOptions(num_workers=2, generator_workers=2).for_generator()
    assert (two.num_workers, two.cpus_per_worker) == (2, 1.0)


@pytest.mark.parametrize("job", ["pipeline", "train_generic", "build_zoo", "train_dit", "tune_dit"])
def test_a_job_run_as_a_command_reports_a_user_error_in_one_line(job: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    r = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--config", str(missing), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: config file {missing} not found; "
                                             "see configs/ for examples"]


def test_the_local_cluster_runs_the_worker_setup_hook() -> None:
    """init_ray's own cluster (a subprocess: this session's cluster is already up) has no
    dashboard, so every worker silences Ray Train's PlacementGroupCleaner, which would otherwise
    warn every second that the State API is unreachable."""
    code = """
import logging, ray
from jobs.common import RayOptions, init_ray
init_ray(RayOptions())
@ray.remote
def level():
    name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    return logging.getLogger(name).level
print("LEVEL", ray.get(level.remote()))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, env=env, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("LEVEL"))
    assert line.split()[1] == str(logging.ERROR)
