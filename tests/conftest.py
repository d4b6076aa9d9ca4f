"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    # Tests run tiny ops; with two OpenMP threads on a shared 2-core machine they wait on each
    # other (an overfit test went from 0.6 s to 14 s, measured). One thread is faster here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _private_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # A test that runs the pipeline driver logs to MLflow: never into the checkout's runs/, and
    # no usage telemetry leaves the machine.
    import os

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY")}
    store = tmp_path_factory.mktemp("mlflow") / "mlruns.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One real local Ray cluster for the whole session (each start/stop costs ~5 s).

    Four logical CPUs on the 2-core machine: a Tune trial's driver plus a 2-worker trainer, or a
    Serve app beside a training run, then fits without deadlocking; tests keep their own work
    small. Yields {"address": ..., "storage": a folder for Ray Train/Tune results}.
    """
    import ray

    from jobs.common import local_cluster_args

    ctx = ray.init(num_cpus=4, **local_cluster_args())
    try:
        yield {"address": ctx.address_info["address"],
               "storage": str(tmp_path_factory.mktemp("ray_storage"))}
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/tiny.yaml through the whole plain-process pipeline on the real data, once per session
    (~1 min): a real generator checkpoint in <dir>/generator (MiniLM encoder), the zoo, the report.
    Read-only for tests: copy what you change."""
    from tina.config import load_config
    from tina.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("tiny_run")
    run_pipeline(load_config(Path(__file__).parent / "tiny.yaml"), out, command="pytest tiny")
    return out
