"""tina.tracking against a real `mlflow server` on 127.0.0.1 and a real local SQLite store, with
the tiny pipeline run's real artifacts; the registered generator is loaded back in a fresh process
and must give exactly the parameters `tina generate` writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tina.cli import main as tina_main
from tina.config import load_config
from tina.tracking import PipelineRun, register_generator, resolve_store

TINY = Path(__file__).parent / "tiny.yaml"
PROMPT = ["sneaker", "digit 3", "Bag"]  # a lower-case spelling and a held-out class
SEED = 7
# a fresh process, outside the checkout, that gets tina only from the model's own code_paths
LOAD_AND_PREDICT = """
import json, sys, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
import tina  # already imported by the model's code
reqs = [{"classes": json.loads(sys.argv[2]), "seed": int(sys.argv[3])},
        {"classes": json.loads(sys.argv[2]), "seed": int(sys.argv[3]) + 1}]
print(json.dumps({"tina": tina.__file__, "out": [o.model_dump() for o in model.predict(reqs)]}))
"""


@pytest.fixture(autouse=True, scope="module")
def _no_telemetry() -> Iterator[None]:
    # MLflow 3 sends usage telemetry unless told not to; tests never reach outside the machine
    before = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    yield
    if before is None:
        del os.environ["MLFLOW_DISABLE_TELEMETRY"]
    else:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = before


@pytest.fixture(scope="module")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated SQLite store (a fresh one migrates for seconds): copy it, never use it."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlruns.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, store_template: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts); yields its URL."""
    home = tmp_path_factory.mktemp("mlflow_server")
    shutil.copy(store_template, home / "mlruns.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlruns.db'}",
         "--artifacts-destination", str(home / "artifacts")],
        cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: the uvicorn worker stops with it
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(home / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server not healthy: "
                                   f"{(home / 'server.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


@pytest.fixture(scope="module")
def logged(mlflow_server: str, tiny_run: Path) -> dict:
    """The tiny run logged through tina.tracking to the server, its generator registered."""
    # a system metrics sample every 0.5 s: this run lasts a few seconds
    cfg = load_config(TINY, ["tracking.enabled=true", "tracking.system_metrics_interval_s=0.5"])
    report = json.loads((tiny_run / "report.json").read_text())
    losses = json.loads((tiny_run / "generator" / "train_history.json").read_text())["loss"]
    with PipelineRun.from_config(cfg, config_path=TINY, run_name="tiny",
                                 uri=mlflow_server) as run:
        run.log_config(cfg)
        report_step = run.metric_logger("generator")
        for step, loss in enumerate(losses):  # as train_generator's report callback is called
            report_step(step, {"loss": loss, "lr": cfg.train.lr})
        run.log_report(report)
        artifacts = run.log_outputs(tiny_run)
        name, version = run.register_generator(tiny_run / "generator")
    return {"url": mlflow_server, "run_id": run.run_id, "experiment": run.experiment,
            "name": name, "version": version, "artifacts": artifacts, "losses": losses,
            "report": report, "cfg": cfg}


def test_the_run_holds_named_params_metric_series_system_metrics_and_artifacts(
        logged: dict) -> None:
    client = MlflowClient(logged["url"])
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == logged["experiment"] == "tiny"
    cfg, params = logged["cfg"], run.data.params
    assert params["train.lr"] == str(cfg.train.lr) and params["dit.width"] == "32"
    assert params["zoo.n_pmodels"] == "12" and json.loads(params["data.held_out"]) == [
        "Shirt", "Sandal", "digit 3", "digit 7"]
    assert run.data.tags["config_sha256"] == cfg.sha256()

    history = client.get_metric_history(run.info.run_id, "generator.loss")
    assert len(history) == len(logged["losses"]) >= 2
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(len(history)))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == logged["losses"]
    metrics = run.data.metrics
    assert metrics["stage_s.zoo"] == logged["report"]["timing"]["stages_s"]["zoo"]
    assert metrics["acc.ood.tina"] == logged["report"]["splits"]["ood"]["tina"]["mean"]
    assert "system/cpu_utilization_percentage" in metrics  # MLflow's monitor, through psutil

    def listed(folder: str) -> set[str]:
        return {a.path for a in client.list_artifacts(run.info.run_id, folder)}

    assert {"generator/tina.safetensors", "generator/tina.json"} <= listed("generator")
    assert listed("zoo") == {"zoo/manifest.jsonl"}
    assert {"report/report.json", "report/report.md", "report/methods.png"} <= listed("report")
    assert "config/config.json" in listed("config")
    assert set(logged["artifacts"]) <= set().union(
        *(listed(f) for f in ("generator", "zoo", "report", "config", "environment")))
    env = json.loads(Path(client.download_artifacts(
        run.info.run_id, "environment/environment.json")).read_text())
    assert env["git_commit"] and env["machine"]["nproc"] >= 1
    assert any(p.lower().startswith("mlflow==") for p in env["packages"])


def test_the_registered_generator_gives_exactly_the_parameters_of_tina_generate(
        logged: dict, tiny_run: Path, tmp_path: Path) -> None:
    client = MlflowClient(logged["url"])
    mv = client.get_model_version(logged["name"], str(logged["version"]))
    assert mv.status == "READY" and mv.run_id == logged["run_id"]
    uri = f"models:/{logged['name']}/{logged['version']}"
    # one thread, as this test process runs: the same float reduction order as the CLI here
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "MLFLOW_TRACKING_URI": logged["url"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", LOAD_AND_PREDICT, uri, json.dumps(PROMPT),
                             str(SEED)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    argv = ["generate", "--checkpoint", str(tiny_run / "generator"), "--seed", str(SEED),
            "--out", str(tmp_path / "cli")]
    for name in PROMPT:
        argv += ["--class", name]
    assert tina_main(argv) == 0
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    loaded = json.loads(stdout.strip().splitlines()[-1])
    # tina came from the model's own copy of the package (code_paths), not from a checkout
    assert Path(loaded["tina"]).parent.parent.name == "code"

    cli_state = load_file(str(tmp_path / "cli" / "model.safetensors"))
    cli_meta = json.loads((tmp_path / "cli" / "model.json").read_text())
    out, other_seed = loaded["out"]
    assert out["classes"] == cli_meta["classes"] == ["Sneaker", "digit 3", "Bag"]
    assert (out["prompt_seed"], out["steps"], out["guidance"], out["sampler"]) == (
        cli_meta["prompt_seed"], cli_meta["steps"], cli_meta["guidance"], cli_meta["sampler"])
    assert sorted(out["param_names"]) == sorted(cli_state)
    flat = torch.tensor(out["params"], dtype=torch.float32)
    parts = flat.split([int(torch.Size(s).numel()) for s in out["param_shapes"]])
    for name, shape, values in zip(out["param_names"], out["param_shapes"], parts, strict=True):
        assert torch.equal(values.reshape(shape), cli_state[name]), name
    assert other_seed["params"] != out["params"]  # the seed reaches the sampler


def test_the_default_store_is_runs_mlruns_db_under_the_checkout_with_artifacts_beside_it(
        tmp_path: Path, store_template: Path, tiny_run: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = resolve_store(root=tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/mlruns.db"
    assert artifacts == (tmp_path.resolve() / "runs" / "mlartifacts").as_uri()
    assert not (tmp_path / "runs").exists()  # created by the first run, not by resolving
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_store(root=tmp_path) == ("http://127.0.0.1:1", None)
    assert resolve_store("sqlite:////elsewhere/x.db", root=tmp_path)[0] == "sqlite:////elsewhere/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    (tmp_path / "runs").mkdir()
    shutil.copy(store_template, tmp_path / "runs" / "mlruns.db")
    losses = json.loads((tiny_run / "generator" / "train_history.json").read_text())["loss"]
    with PipelineRun("local", root=tmp_path, system_metrics=False) as run:
        with run.stage("outputs"):
            run.log_outputs(tiny_run)
        # as a driver logs a Ray Train run's reports after it ends
        run.log_history([{"step": 50 * i, "loss": v} for i, v in enumerate(losses[:3])],
                        prefix="generator")
    client = MlflowClient(uri)
    history = sorted(client.get_metric_history(run.run_id, "generator.loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, losses[0]), (50, losses[1]),
                                                    (100, losses[2])]
    assert client.get_run(run.run_id).data.metrics["stage_s.outputs"] == run.stages["outputs"]
    # artifacts under runs/mlartifacts, never MLflow's ./mlruns default in the working directory
    assert (tmp_path / "runs" / "mlartifacts" / "local" / run.run_id / "artifacts"
            / "generator" / "tina.safetensors").is_file()
    name, version = register_generator(tiny_run / "generator", "tina-local", uri=uri)
    model_run = client.get_run(client.get_model_version(name, str(version)).run_id)
    assert client.get_experiment(model_run.info.experiment_id).name == "tina-generators"
    models = tmp_path / "runs" / "mlartifacts" / "tina-generators" / "models"
    assert list(models.glob("m-*/artifacts/MLmodel"))

    with PipelineRun("local", root=tmp_path, system_metrics=False, register=False) as unregistered:
        assert unregistered.register_generator(tiny_run / "generator") is None
    assert len(client.search_model_versions("name = 'tina-local'")) == 1  # its default name
    with pytest.raises(RuntimeError), PipelineRun("local", root=tmp_path,
                                                  system_metrics=False) as failed:
        raise RuntimeError("a stage failed")
    assert client.get_run(failed.run_id).info.status == "FAILED"


def test_tracking_off_touches_no_store(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["tracking.enabled=false"])
    with PipelineRun.from_config(cfg, TINY, uri=f"sqlite:///{tmp_path}/off/mlruns.db") as run:
        run.log_config(cfg)
        run.log_metrics({"loss": 1.0})
        assert run.log_outputs(tmp_path) == [] and run.register_generator(tmp_path) is None
    assert run.run_id is None and not (tmp_path / "off").exists()
