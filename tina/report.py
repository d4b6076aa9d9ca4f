"""report.json, report.md and PNG plots of one pipeline run, and the issue's pass/fail bars.

`bars(report)` computes the "Done when" checks of issue 2 from report.json alone, so that the
markdown, the note and any later check quote the same numbers:
- bar: on `ood`, finetuned - generic >= +0.015 (there is room to personalize at all);
- bar: on `ood`, the 95% CI lower bound of tina - generic >= -0.005;
- bar: on `ood`, tina > retrieval and tina > ridge (mean accuracy over the same tasks);
- bar: the pipeline's wall time (install excluded) at most 25 minutes (measured on 2 cores with
  the demo's 300 p-models; elsewhere it says only how long this run took);
- goal: on `ood`, tina - generic >= half of finetuned - generic;
- goal: on each unseen split, tina's recall on every held-out class above nearest_name's and
  above chance (1/K).
A check whose numbers are missing has "pass": None.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

FT_GAIN_MIN = 0.015  # ood finetuned - generic must reach this (else change arch or recipe first)
CI_LOWER_MIN = -0.005  # ood tina - generic: 95% CI lower bound at least this
BUDGET_MIN = 25.0  # pipeline wall time, minutes
SPLIT_ORDER = ("val", "id", "ood", "unseen_1", "unseen_2", "variable_k_2", "variable_k_5",
               "variable_k_10", "image_1img", "image_5img")
METHOD_ORDER = ("tina", "finetuned", "generic", "retrieval", "ridge", "nearest_name",
                "classify_then_text", "unconditional")


def _get(d: Any, *path: Any) -> Any:
    """d[p0][p1]... or None when any step is missing (dict keys or list indices)."""
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def _check(kind: str, value: float | None, threshold: float | None, text: str,
           strict: bool = False, at_most: bool = False, **extra: Any) -> dict:
    ok = None
    if value is not None and threshold is not None:
        ok = (bool(value <= threshold) if at_most else
              bool(value > threshold) if strict else bool(value >= threshold))
    return {"kind": kind, "value": value, "threshold": threshold, "pass": ok, "text": text,
            **extra}


def bars(report: dict) -> dict:
    """The issue's "Done when" checks from a report.json dict.

    Returns:
        {"checks": {name: {"kind": "bar"|"goal", "value", "threshold", "pass": bool | None,
        "text"}}, "bars_pass": bool | None (all bars; None if any is unknown),
        "goals_pass": bool | None}.
    """
    ood = _get(report, "splits", "ood") or {}
    ft_gain = _get(ood, "finetuned", "paired_vs_generic", "mean")
    tina_gain = _get(ood, "tina", "paired_vs_generic", "mean")
    lower = _get(ood, "tina", "paired_vs_generic", "ci95", 0)
    checks = {
        "ood_finetuned_minus_generic": _check(
            "bar", ft_gain, FT_GAIN_MIN, f"ood: finetuned - generic >= +{FT_GAIN_MIN}"),
        "ood_tina_minus_generic_ci95_lower": _check(
            "bar", lower, CI_LOWER_MIN, f"ood: tina - generic 95% CI lower >= {CI_LOWER_MIN}"),
    }
    for other in ("retrieval", "ridge"):
        a, b = _get(ood, "tina", "mean"), _get(ood, other, "mean")
        checks[f"ood_tina_gt_{other}"] = _check(
            "bar", None if a is None or b is None else a - b, 0.0,
            f"ood: tina > {other} (difference of means)", strict=True)
    wall = _get(report, "timing", "pipeline_wall_s")
    checks["pipeline_wall_minutes"] = _check(
        "bar", None if wall is None else wall / 60, BUDGET_MIN,
        f"pipeline wall time <= {BUDGET_MIN:.0f} min", at_most=True)
    checks["ood_goal_half_finetuned_gain"] = _check(
        "goal", tina_gain, None if ft_gain is None else 0.5 * ft_gain,
        "ood: tina - generic >= half of finetuned - generic")
    for name in ("unseen_1", "unseen_2"):
        rec = _get(report, "splits", name, "held_out_recall")
        if not rec:
            continue
        tina, near, chance = rec.get("tina") or {}, rec.get("nearest_name") or {}, rec.get("chance")
        per = {c: {"tina": r, "nearest_name": near.get(c), "chance": chance,
                   "pass": None if near.get(c) is None or chance is None
                   else bool(r > near[c] and r > chance)} for c, r in tina.items()}
        verdicts = [p["pass"] for p in per.values()]
        mean = sum(tina.values()) / len(tina) if tina else None
        checks[f"{name}_held_out_recall"] = {
            "kind": "goal", "value": mean, "threshold": None, "per_class": per,
            "pass": None if not verdicts or None in verdicts else all(verdicts),
            "text": f"{name}: tina's recall on every held-out class > nearest_name and > chance"}

    def verdict(kind: str) -> bool | None:
        v = [c["pass"] for c in checks.values() if c["kind"] == kind]
        return None if not v or None in v else all(v)

    return {"checks": checks, "bars_pass": verdict("bar"), "goals_pass": verdict("goal")}


# ------------------------------------------------------------------------------------ markdown

def _f(x: Any, nd: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _ci(ci: Any, sign: bool = False) -> str:
    return "-" if not ci else f"[{_f(ci[0], sign=sign)}, {_f(ci[1], sign=sign)}]"


def _verdict(p: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[p]


def _split_table(name: str, sp: dict) -> list[str]:
    n = len(sp.get("tasks", []))
    imgs = sp.get("n_test_images") or [0]
    lines = [f"### {name}", "",
             f"{n} tasks, {sum(imgs) / max(len(imgs), 1):.0f} {sp.get('images', 'test')} images "
             f"per task on average; seeds {sp.get('seeds', '-')}.", "",
             "| method | mean | 95% CI | vs generic | 95% CI | vs finetuned | 95% CI |",
             "|---|---|---|---|---|---|---|"]
    rows = [(m, sp.get(m)) for m in METHOD_ORDER]
    if sp.get("tina_ddpm"):
        rows.append((f"tina (DDPM-1000, first {sp['tina_ddpm'].get('n_tasks')} tasks)",
                     sp["tina_ddpm"]))
    for m, s in rows:
        if not isinstance(s, dict):
            continue
        g, f = s.get("paired_vs_generic") or {}, s.get("paired_vs_finetuned") or {}
        lines.append(f"| {m} | {_f(s.get('mean'))} | {_ci(s.get('ci95'))} | "
                     f"{_f(g.get('mean'), sign=True)} | {_ci(g.get('ci95'), True)} | "
                     f"{_f(f.get('mean'), sign=True)} | {_ci(f.get('ci95'), True)} |")
    if "max_overlap" in sp:
        mo = sp["max_overlap"]
        lines += ["", f"Largest class overlap with any zoo task: min {min(mo)}, "
                      f"mean {sum(mo) / len(mo):.1f}, max {max(mo)} (of K)."]
    if "classify_then_text_names_correct" in sp:
        lines += ["", f"The generic model named {sp['classify_then_text_names_correct']:.1%} of "
                      f"the prompt classes right from {sp.get('images_per_class')} image(s) each."]
    if "ridge_lambda" in sp:
        lines += ["", f"Ridge lambda chosen on val: {sp['ridge_lambda']}."]
    return lines + [""]


def _recall_table(splits: dict) -> list[str]:
    out = []
    for name in ("unseen_1", "unseen_2"):
        rec = _get(splits, name, "held_out_recall")
        if not rec:
            continue
        methods = [m for m in ("tina", "nearest_name", "generic", "finetuned") if rec.get(m)]
        out += [f"### Held-out recall, {name} (chance 1/K = {_f(rec.get('chance'))})", "",
                "| held-out class | " + " | ".join(methods) + " |",
                "|---|" + "---|" * len(methods)]
        for c in rec.get("tina", {}):
            out.append(f"| {c} | " + " | ".join(_f(rec[m].get(c)) for m in methods) + " |")
        seen = _get(splits, name, "seen_class_acc") or {}
        out += ["", "Accuracy on the seen classes' images of these tasks: " + ", ".join(
            f"{m} {_f(v)}" for m, v in seen.items()) + ".", ""]
    return out


def _markdown(report: dict, verdicts: dict, plots: list[str]) -> str:
    r, splits = report, report.get("splits") or {}
    lines = [f"# Tina report: {r.get('dataset', '?')}", "",
             f"Generated model: `{r.get('arch')}`, {r.get('n_params')} parameters, "
             f"K_max {r.get('k_max')}; zoo of {r.get('n_zoo')} p-models; encoder "
             f"{r.get('encoder')}.",
             f"Sampler {r.get('sampler')}, {r.get('steps')} steps, guidance {r.get('guidance')}"
             f", residual scale {r.get('residual_scale', 1.0)} (1 = the sample itself; below 1 "
             "interpolates toward the generic model, chosen on val), EMA weights: "
             f"{r.get('use_ema')}; evaluation seeds {r.get('seeds')}; master seed "
             f"{r.get('seed')}; commit {r.get('git_commit')}.", "",
             "Held-out classes (in no zoo task, nor in generic or image-encoder training): "
             + ", ".join(f"`{c}`" for c in r.get("held_out_classes") or []) + ".",
             "Forbidden pairs (never together in a zoo task; each ood task holds one): "
             + ", ".join(f"`{a}` + `{b}`" for a, b in r.get("forbidden_pairs") or []) + ".", "",
             "## Bars of issue 2", "", "| check | kind | value | threshold | verdict |",
             "|---|---|---|---|---|"]
    for c in verdicts["checks"].values():
        lines.append(f"| {c['text']} | {c['kind']} | {_f(c['value'], sign=True)} | "
                     f"{_f(c['threshold'], sign=True)} | {_verdict(c['pass'])} |")
    lines += ["", f"All bars: **{_verdict(verdicts['bars_pass'])}**; all goals: "
                  f"**{_verdict(verdicts['goals_pass'])}**.", ""]
    sel = r.get("val_selection") or {}
    if sel.get("grid"):
        lines += ["## Choices made on val", "",
                  "| EMA | guidance | steps | residual scale | val accuracy |",
                  "|---|---|---|---|---|"]
        lines += [f"| {g['use_ema']} | {g['guidance']} | {g['steps']} | "
                  f"{g.get('residual_scale', 1.0)} | {_f(g['val_acc'])} |" for g in sel["grid"]]
        lines += ["", f"Chosen: EMA {sel.get('use_ema')}, guidance {sel.get('guidance')}, "
                      f"steps {sel.get('steps')}, residual scale "
                      f"{sel.get('residual_scale', 1.0)}.", ""]
    lines += ["## Accuracy per split", "", "Accuracies are fractions of all test images of each "
              "task's classes (validation images on `val`); CIs are 95% bootstrap over tasks; "
              "differences are paired (same tasks, same images).", ""]
    for name in [s for s in SPLIT_ORDER if s in splits] + [s for s in splits
                                                           if s not in SPLIT_ORDER]:
        lines += _split_table(name, splits[name])
    lines += _recall_table(splits)
    t = r.get("timing") or {}
    g = t.get("generate_s_per_model") or {}
    lines += ["## Timing", "",
              f"Seconds per generated model: {_f(g.get('batch_1'))} at batch 1, "
              f"{_f(g.get('batch_32'))} at batch 32 ({r.get('sampler')}, {r.get('steps')} "
              f"steps); seconds per fine-tuned p-model: {_f(t.get('finetune_s_per_model'))} (the "
              f"zoo's, {t.get('pmodels_per_batch', 1)} fine-tuned at once per core).",
              f"Pipeline wall time: {_f(t.get('pipeline_wall_s'), 0)} s; stages (s): "
              + ", ".join(f"{k} {v}" for k, v in (t.get("stages_s") or {}).items()) + ".", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plots

def _plots(report: dict, out: Path) -> list[str]:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = report.get("splits") or {}
    names = [s for s in SPLIT_ORDER if s in splits] + [s for s in splits if s not in SPLIT_ORDER]
    written = []
    if names:
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            ms = [m for m in METHOD_ORDER if isinstance(splits[name].get(m), dict)]
            means = [splits[name][m]["mean"] for m in ms]
            cis = [splits[name][m].get("ci95") or [mu, mu] for m, mu in zip(ms, means,
                                                                            strict=True)]
            # a percentile CI need not contain the mean: clip so the bars never point inward
            err = [[max(0.0, mu - ci[0]) for mu, ci in zip(means, cis, strict=True)],
                   [max(0.0, ci[1] - mu) for mu, ci in zip(means, cis, strict=True)]]
            ax.bar(range(len(ms)), means, yerr=err, capsize=3,
                   color=["C3" if m == "tina" else "C0" for m in ms])
            ax.set_xticks(range(len(ms)), ms, rotation=40, ha="right", fontsize=8)
            ax.set_title(name)
            ax.set_ylim(0, 1)
            ax.set_ylabel("accuracy")
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "methods.png", dpi=110)
        plt.close(fig)
        written.append("methods.png")
    ood = splits.get("ood") or {}
    if isinstance(ood.get("tina"), dict) and isinstance(ood.get("generic"), dict):
        g, t = ood["generic"]["per_task"], ood["tina"]["per_task"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(g, t, s=14, label="tina")
        if isinstance(ood.get("finetuned"), dict):
            ax.scatter(g, ood["finetuned"]["per_task"], s=14, marker="x", label="finetuned")
        lo, hi = min(g + t) - 0.01, max(g + t) + 0.01
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("generic accuracy (per ood task)")
        ax.set_ylabel("accuracy")
        ax.legend()
        ax.set_title("ood: per task")
        fig.tight_layout()
        fig.savefig(out / "ood_tina_vs_generic.png", dpi=110)
        plt.close(fig)
        written.append("ood_tina_vs_generic.png")
    recs = [(n, splits[n]["held_out_recall"]) for n in ("unseen_1", "unseen_2")
            if _get(splits, n, "held_out_recall", "tina")]
    if recs:
        fig, axes = plt.subplots(1, len(recs), figsize=(5.5 * len(recs), 3.6), squeeze=False)
        for ax, (name, rec) in zip(axes.flat, recs, strict=True):
            classes = list(rec["tina"])
            methods = [m for m in ("tina", "nearest_name", "finetuned") if rec.get(m)]
            width = 0.8 / len(methods)
            for i, m in enumerate(methods):
                ax.bar([j + i * width for j in range(len(classes))],
                       [rec[m].get(c, 0.0) for c in classes], width, label=m)
            ax.axhline(rec["chance"], color="k", ls="--", lw=1, label="chance 1/K")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))], classes)
            ax.set_ylabel("recall on held-out class")
            ax.set_title(name)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "held_out_recall.png", dpi=110)
        plt.close(fig)
        written.append("held_out_recall.png")
    return written


def _clean(x: Any) -> Any:
    """NaN / inf -> None so that report.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_report(report: dict, out_dir: Path) -> None:
    """Write report.json (the report plus its "bars"), report.md and PNG plots into `out_dir`.

    Files are written to a temporary name and renamed, so a reader never sees half a report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = bars(report)
    data = _clean({**report, "bars": verdicts})
    plots = _plots(report, out)
    for name, text in (("report.json", json.dumps(data, indent=2, allow_nan=False)),
                       ("report.md", _markdown(report, verdicts, plots))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
