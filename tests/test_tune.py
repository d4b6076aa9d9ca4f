"""jobs.tune_dit on the shared local Ray cluster: 8 trials of tests/tiny.yaml (1 worker each) on
the tiny pipeline's generic model and zoo, ASHA stopping some at val rungs, the best config YAML,
val-only metrics, and the bound on concurrent trials."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.common import RayOptions
from jobs.tune_dit import METRIC, run_tune, trial_plan
from jobs.tune_space import SEARCH_SPACE, parse_space
from tina.config import load_config
from tina.errors import ConfigError

TINY = Path(__file__).parent / "tiny.yaml"
STEPS = 24  # val (an ASHA rung candidate) every 6 steps: rungs at 6, 12, 24
TUNE_SET = [f"train.steps={STEPS}", "train.checkpoint_every=6", "train.val_every=6",
            "train.val_tasks=2", "train.val_sample_steps=3"]
# the tiny generator's sizes (heads 2); a wide lr range so that trials differ on val
SPACE = [
    "train.lr={loguniform: [1e-4, 3e-2]}",
    "dit.width={choice: [16, 32]}",
    "dit.depth={choice: [1, 2]}",
    "tokens.chunk_size={choice: [32, 576]}",
    "train.ema_decay={choice: [0.9, 0.99]}",
    "sample.guidance={choice: [1.0, 2.0]}",
    "sample.steps={choice: [2, 3]}",
]
POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # as tests/test_jobs.py: tiny runs


@pytest.fixture(scope="module")
def tuned(ray_cluster: dict, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """8 trials on a copy of the tiny pipeline's generic model and zoo."""
    out = tmp_path_factory.mktemp("tune")
    for part in ("generic", "zoo"):
        shutil.copytree(tiny_run / part, out / part)
    cfg = load_config(TINY, TUNE_SET)
    opts = RayOptions(address=ray_cluster["address"], num_workers=1,
                      storage_path=str(out / "ray"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*POLL)
        summary = run_tune(cfg, out, opts, parse_space(SEARCH_SPACE, SPACE), num_samples=8,
                           seed=0)
    return {"out": out, "summary": summary, "opts": opts}


def _results(tune_run: Path) -> list[dict]:
    """Every result Tune recorded, of every trial (result.json lines)."""
    return [json.loads(line) for f in tune_run.glob("*/result.json")
            for line in f.read_text().splitlines() if line.strip()]


def test_asha_stops_some_of_eight_trials_before_the_last_step(tuned: dict) -> None:
    trials = tuned["summary"]["trials"]
    assert len(trials) == 8 and all(t["error"] is None for t in trials)
    assert any(t["stopped_early"] for t in trials)
    for t in trials:
        assert t["stopped_early"] == (t["steps"] < STEPS)
        assert t["steps"] % 6 == 0 and t["val_acc"] is not None


def test_trials_report_val_scores_only_and_each_trains_in_its_own_run(tuned: dict) -> None:
    results = _results(Path(tuned["summary"]["tune_run"]))
    assert len(results) >= 8
    names = set().union(*results)
    assert not [n for n in names if "test" in n.lower()]
    for r in results:  # every result is a val step of rank 0
        assert r[METRIC] == max(r["val_raw"], r["val_ema"]) and r["step"] % 6 == 0
    runs = [p.name for p in Path(tuned["opts"].storage(tuned["out"])).glob("generator-*")]
    assert len(runs) == 8 and len(set(runs)) == 8


def test_the_best_config_yaml_loads_with_the_best_trials_values(tuned: dict) -> None:
    summary = tuned["summary"]
    best = summary["best"]
    assert best["val_acc"] == max(t["val_acc"] for t in summary["trials"])
    cfg = load_config(best["config"])
    d = cfg.to_dict()
    for key, value in best["values"].items():
        section, field = key.split(".")
        assert d[section][field] == pytest.approx(value), key
    assert cfg.dit.preset is None and cfg.train.val_sample_steps == cfg.sample.steps
    assert cfg.train.steps == STEPS and cfg.zoo.n_pmodels == 12  # the rest is tiny.yaml's


def test_concurrent_trials_times_driver_and_workers_fit_the_cluster(tuned: dict,
                                                                    ray_cluster: dict) -> None:
    s = tuned["summary"]
    assert s["max_concurrent"] * (s["driver_cpus"] + 1) <= 4
    # 4 CPUs: 2 workers leave 1 for the driver: one trial at a time; 4 workers leave none
    assert trial_plan(RayOptions(num_workers=2), None, None) == (1.0, 1)
    assert trial_plan(RayOptions(num_workers=4), None, None) == (0.0, 1)
    assert trial_plan(RayOptions(num_workers=1, cpus_per_worker=0.5), 0.5, 3) == (0.5, 3)
    with pytest.raises(ConfigError, match="lower --num-workers"):
        trial_plan(RayOptions(num_workers=4), 1.0, None)


def test_search_space_overrides_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "space.yaml"
    f.write_text("dit.depth: {choice: [3]}\nsample.guidance: null\n")
    space = parse_space(SEARCH_SPACE, ["train.lr=2e-4"], f)
    assert space["dit.depth"] == {"choice": [3]} and "sample.guidance" not in space
    assert space["train.lr"] == "2e-4" and space["dit.width"] == SEARCH_SPACE["dit.width"]
    for bad in ("dit.depth={pick: [1]}", "train.lr={loguniform: [a, b]}", "dit.depth"):
        with pytest.raises(ConfigError):
            parse_space(SEARCH_SPACE, [bad])
