"""Specification of tina.report: the issue's bars, report.json, report.md and the plots."""

from __future__ import annotations

import copy
import json
import math

import pytest

from tina.report import bars, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stats(mean: float, vs_generic: float | None, lower: float | None = None,
           per_task: list[float] | None = None, vs_ft: float | None = None) -> dict:
    lo = vs_generic - 0.004 if lower is None and vs_generic is not None else lower
    return {"mean": mean, "ci95": [mean - 0.01, mean + 0.01],
            "per_task": per_task or [mean - 0.01, mean, mean + 0.01],
            "paired_vs_generic": None if vs_generic is None else {
                "mean": vs_generic, "ci95": [lo, vs_generic + 0.004]},
            "paired_vs_finetuned": None if vs_ft is None else {
                "mean": vs_ft, "ci95": [vs_ft - 0.003, vs_ft + 0.003]}}


def passing_report() -> dict:
    """A report that meets every bar and goal of issue 2."""
    unseen = {
        "tasks": [["Shirt", "Coat"]], "n_test_images": [2000], "images": "test",
        "tina": _stats(0.80, 0.01), "generic": _stats(0.79, 0.0), "finetuned": _stats(0.81, 0.02),
        "nearest_name": _stats(0.78, -0.01),
        "held_out_recall": {"tina": {"Shirt": 0.40, "digit 3": 0.30},
                            "nearest_name": {"Shirt": 0.28, "digit 3": 0.20},
                            "generic": {"Shirt": 0.0, "digit 3": 0.0},
                            "finetuned": {"Shirt": 0.7, "digit 3": 0.8}, "chance": 0.1},
        "seen_class_acc": {"tina": 0.85, "nearest_name": 0.84}}
    return {
        "dataset": "fashion-mnist+mnist", "encoder": "minilm (v1)", "arch": "cnn-1k",
        "n_params": 1394, "k_max": 10, "n_zoo": 300,
        "held_out_classes": ["Shirt", "Sandal", "digit 3", "digit 7"],
        "forbidden_pairs": [["Coat", "Dress"], ["digit 8", "digit 9"]],
        "sampler": "ddim", "steps": 50, "guidance": 1.0, "use_ema": True, "seeds": [0, 1, 2],
        "val_selection": {"use_ema": True, "guidance": 1.0, "steps": 50, "grid": [
            {"use_ema": True, "guidance": 1.0, "steps": 50, "val_acc": 0.84},
            {"use_ema": False, "guidance": 1.0, "steps": 50, "val_acc": 0.83}]},
        "splits": {
            "ood": {"tasks": [["Coat", "Dress"]] * 3, "n_test_images": [2000] * 3,
                    "images": "test", "max_overlap": [1, 1, 1],
                    "tina": _stats(0.85, 0.012, lower=0.004, per_task=[0.84, 0.85, 0.86]),
                    "finetuned": _stats(0.86, 0.020),
                    "generic": _stats(0.838, 0.0, per_task=[0.83, 0.838, 0.846]),
                    "retrieval": _stats(0.84, 0.002), "ridge": _stats(0.845, 0.007),
                    "nearest_name": None, "classify_then_text": None,
                    "unconditional": _stats(0.1, -0.7),
                    "tina_ddpm": _stats(0.851, 0.013) | {"n_tasks": 3}},
            "unseen_1": unseen, "unseen_2": copy.deepcopy(unseen)},
        "timing": {"generate_s_per_model": {"batch_1": 0.2, "batch_32": 0.05},
                   "finetune_s_per_model": 0.6, "stages_s": {"zoo": 170.0},
                   "pipeline_wall_s": 1200.0}}


def test_bars_pass_on_a_report_that_meets_every_bar_and_goal():
    v = bars(passing_report())
    assert v["bars_pass"] is True and v["goals_pass"] is True
    assert all(c["pass"] for c in v["checks"].values())
    assert v["checks"]["ood_finetuned_minus_generic"]["value"] == pytest.approx(0.020)
    assert v["checks"]["ood_goal_half_finetuned_gain"]["threshold"] == pytest.approx(0.010)
    assert v["checks"]["pipeline_wall_minutes"]["value"] == pytest.approx(20.0)


@pytest.mark.parametrize("edit, check", [
    (lambda r: r["splits"]["ood"]["finetuned"]["paired_vs_generic"].update(mean=0.0149),
     "ood_finetuned_minus_generic"),
    (lambda r: r["splits"]["ood"]["tina"]["paired_vs_generic"].update(ci95=[-0.0051, 0.02]),
     "ood_tina_minus_generic_ci95_lower"),
    (lambda r: r["splits"]["ood"]["retrieval"].update(mean=0.85), "ood_tina_gt_retrieval"),
    (lambda r: r["splits"]["ood"]["ridge"].update(mean=0.86), "ood_tina_gt_ridge"),
    (lambda r: r["timing"].update(pipeline_wall_s=25 * 60 + 1), "pipeline_wall_minutes"),
])
def test_each_bar_fails_on_its_own_numbers(edit, check):
    r = passing_report()
    edit(r)
    v = bars(r)
    assert v["checks"][check]["pass"] is False
    assert v["bars_pass"] is False
    assert [n for n, c in v["checks"].items() if c["pass"] is False] == [check]


def test_goal_of_half_the_finetuned_gain_is_a_goal_not_a_bar():
    r = passing_report()
    r["splits"]["ood"]["tina"]["paired_vs_generic"]["mean"] = 0.009  # < 0.020 / 2
    v = bars(r)
    assert v["checks"]["ood_goal_half_finetuned_gain"]["pass"] is False
    assert v["goals_pass"] is False and v["bars_pass"] is True


def test_held_out_recall_goal_needs_every_class_above_nearest_name_and_chance():
    r = passing_report()
    r["splits"]["unseen_2"]["held_out_recall"]["tina"]["digit 3"] = 0.09  # < nearest 0.20, chance
    v = bars(r)
    per = v["checks"]["unseen_2_held_out_recall"]["per_class"]
    assert per["Shirt"]["pass"] is True and per["digit 3"]["pass"] is False
    assert v["checks"]["unseen_2_held_out_recall"]["pass"] is False
    assert v["checks"]["unseen_1_held_out_recall"]["pass"] is True


def test_a_check_whose_numbers_are_missing_is_unknown_not_passed():
    r = passing_report()
    r["splits"]["ood"]["finetuned"] = None
    v = bars(r)
    assert v["checks"]["ood_finetuned_minus_generic"]["pass"] is None
    assert v["checks"]["ood_goal_half_finetuned_gain"]["pass"] is None
    assert v["bars_pass"] is None
    assert bars({})["bars_pass"] is None


def test_write_report_writes_strict_json_markdown_and_png_plots(tmp_path):
    r = passing_report()
    r["splits"]["ood"]["tina"]["per_task"][0] = math.nan  # must not produce invalid JSON
    write_report(r, tmp_path / "out")
    out = tmp_path / "out"
    data = json.loads((out / "report.json").read_text())  # strict: NaN would be rejected below
    json.loads((out / "report.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["splits"]["ood"]["tina"]["per_task"][0] is None
    assert data["bars"]["bars_pass"] is True
    assert data["n_params"] == 1394
    md = (out / "report.md").read_text()
    for text in ("Shirt", "digit 7", "`Coat` + `Dress`", "PASS", "### ood", "Held-out recall",
                 "tina - generic", "0.850"):
        assert text in md
    for png in ("methods.png", "ood_tina_vs_generic.png", "held_out_recall.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"![{png}]({png})" in md
    assert not list(out.glob(".*.tmp"))


def test_report_md_says_fail_plainly_with_the_numbers(tmp_path):
    r = passing_report()
    r["splits"]["ood"]["ridge"]["mean"] = 0.9
    write_report(r, tmp_path)
    md = (tmp_path / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if "tina > ridge" in ln)
    assert "FAIL" in line and "-0.050" in line
    assert "All bars: **FAIL**" in md
