"""The evaluation protocol of issue 2: Tina against its references on the same tasks and images.

Methods (issue 2, "Evaluation protocol"): `tina` (sampled from the text prompt of the task's class
names), `finetuned` (the zoo's own recipe on that task: the upper reference), `generic` (the
generic model's logits restricted to the task), `retrieval`, `ridge`, `nearest_name`,
`classify_then_text` (tina.baselines) and `unconditional` (the null prompt). A method that does
not apply to a split is None. Accuracies are fractions of all test images of the task's classes
(validation images on `val`); statistics are over tasks: the mean, a 95% percentile bootstrap CI
(Efron & Tibshirani 1993, ch. 13) and paired differences (same tasks, same images). Models and
scores are cached in `tina.evaluator.Evaluator`, shared by `select_on_val` and `evaluate`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tina.baselines import nearest_name_rows, ridge_rows, vote_names
from tina.config import PipelineConfig
from tina.data import ImageSet, to_float
from tina.evaluator import (
    EvalContext,
    Evaluator,
    Prompt,
    Scores,
    TaskScore,
    derived_seed,
    mean_score,
)
from tina.generate import Generator, prompt_seed
from tina.image_prompts import encode_prompt_images
from tina.scoring import accuracy, logits_of
from tina.tasks import Task, max_overlap, sample_prompt_images

__all__ = ["EvalContext", "METHODS", "bootstrap_ci", "evaluate", "paired", "score_on_val",
           "select_on_val", "summarize", "time_generation"]

METHODS = ("tina", "finetuned", "generic", "retrieval", "ridge", "nearest_name",
           "classify_then_text", "unconditional")


# ------------------------------------------------------------------------------------ statistics

def bootstrap_ci(values: Any, n_boot: int, seed: int) -> list[float] | None:
    """95% percentile bootstrap CI of the mean over tasks: [lo, hi], or None for no values.

    Tasks are resampled with replacement `n_boot` times from a numpy Generator seeded `seed`.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    lo, hi = np.percentile(x[idx].mean(1), [2.5, 97.5])
    return [float(lo), float(hi)]


def paired(a: Any, b: Any, n_boot: int, seed: int) -> dict | None:
    """Paired difference a - b over the same tasks (same order): {"mean", "ci95"}; None if b is."""
    if b is None:
        return None
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return None
    return {"mean": float(d.mean()), "ci95": bootstrap_ci(d, n_boot, seed)}


def summarize(per_task: list[float], generic: list[float] | None,
              finetuned: list[float] | None, n_boot: int, seed: int) -> dict:
    """report.json statistics of one method on one split (accuracies are fractions in [0, 1])."""
    return {"mean": float(np.mean(per_task)), "ci95": bootstrap_ci(per_task, n_boot, seed),
            "per_task": [float(v) for v in per_task],
            "paired_vs_generic": paired(per_task, generic, n_boot, seed),
            "paired_vs_finetuned": paired(per_task, finetuned, n_boot, seed)}


def _opts(choice: dict, cfg: PipelineConfig, sampler: str | None = None) -> dict:
    """Generator.sample keyword arguments of a choice (DDPM always runs every diffusion step)."""
    sampler = sampler or choice.get("sampler", cfg.sample.sampler)
    return {"sampler": sampler, "steps": choice["steps"] if sampler == "ddim" else None,
            "guidance": float(choice["guidance"]), "use_ema": bool(choice["use_ema"]),
            "residual_scale": float(choice.get("residual_scale", 1.0))}


def _evaluator(ctx: EvalContext, progress: bool) -> Evaluator:
    ev = ctx.cache.get("evaluator")
    if ev is None:
        ev = ctx.cache["evaluator"] = Evaluator(ctx, progress)
    ev.progress = progress
    return ev


def _val_tina(ev: Evaluator, opts: dict) -> float:
    tasks = ev.ctx.splits.val
    seed = ev.cfg.eval.seeds[0]
    prompts = ev.text_prompts([ev.names(t) for t in tasks], [seed] * len(tasks), opts)
    ev.sample(prompts, opts, "val sampling")
    return statistics.fmean(ev.score("val", t, [p.key])[0].acc
                            for t, p in zip(tasks, prompts, strict=True))


@torch.no_grad()
def score_on_val(gen: Generator, tasks: list[Task], val: ImageSet, steps: int, seed: int,
                 guidance: float = 1.0) -> dict[str, float]:
    """Mean accuracy on `val` of models generated for `tasks` with the raw and the EMA weights.

    The light check a training run makes at its checkpoints (jobs/train_dit.py): class tokens
    are the checkpoint's own label-space embeddings (the text encoder's embeddings of the class
    names, so no encoder is loaded), DDIM with `steps` steps, one seed per prompt as in
    `select_on_val` (prompt_seed(seed, names)).
    Args:
        tasks: ordered label-space class ids; val: label-space ImageSet (`val` split only).
    Returns:
        {"raw": acc, "ema": acc}, fractions in [0, 1] averaged over tasks.
    """
    emb = gen.parts.class_emb
    c = gen.embedding_conditioning([emb[list(t)] for t in tasks],
                                   [[i if bool(gen.parts.has_row[i]) else -1 for i in t]
                                    for t in tasks])
    seeds = [prompt_seed(seed, [val.classes[i] for i in t]) for t in tasks]
    out = {}
    for name, use_ema in (("raw", False), ("ema", True)):
        flats = gen.sample(c, seeds, sampler="ddim", steps=steps, guidance=guidance,
                           use_ema=use_ema)
        accs = []
        for t, flat in zip(tasks, flats, strict=True):
            v = val.task(t)
            accs.append(float(accuracy(logits_of(gen.to_module(flat, len(t)), v.images),
                                       v.labels)))
        out[name] = statistics.fmean(accs)
    return out


def select_on_val(ctx: EvalContext, progress: bool = True) -> dict:
    """Choose EMA or raw weights, guidance scale, DDIM steps and residual scale by mean tina
    accuracy on `val`.

    Greedy, one seed (cfg.eval.seeds[0]): EMA vs raw at the configured settings, then each
    steps of cfg.eval.steps_grid (DDIM only), each guidance of cfg.eval.guidance_grid, each
    residual scale of cfg.eval.residual_scale_grid (residual generators only); a candidate
    replaces the current choice only when strictly better. Steps come before guidance because
    the two interact: on the demo (seed 0) guidance 1.5, chosen at 50 steps, made 1 step the
    worst of the steps grid (val 0.746), while at guidance 1 one step was the best (0.775).
    Returns:
        {"use_ema", "guidance", "steps", "residual_scale", "sampler", "grid": [{"use_ema",
        "guidance", "steps", "residual_scale", "val_acc"}, ...]}.
    """
    cfg, ev = ctx.cfg, _evaluator(ctx, progress)
    best = {"use_ema": cfg.sample.use_ema, "guidance": float(cfg.sample.guidance),
            "steps": cfg.sample.steps, "residual_scale": float(cfg.sample.residual_scale),
            "sampler": cfg.sample.sampler}
    keys = ("use_ema", "guidance", "steps", "residual_scale")
    grid: list[dict] = []

    def trial(cand: dict) -> float:
        for g in grid:
            if all(g[k] == cand[k] for k in keys):
                return g["val_acc"]
        acc = _val_tina(ev, _opts(cand, cfg))
        grid.append({k: cand[k] for k in keys} | {"val_acc": acc})
        return acc

    if not ctx.splits.val:  # nothing to choose with: keep the configured sampling
        return best | {"val_acc": None, "grid": grid}
    score = trial(best)
    stages = [("use_ema", [not best["use_ema"]])]
    if cfg.sample.sampler == "ddim":
        stages.append(("steps", cfg.eval.steps_grid))
    stages.append(("guidance", cfg.eval.guidance_grid))
    if ctx.generator.residual:
        stages.append(("residual_scale", cfg.eval.residual_scale_grid))
    for name, values in stages:
        for v in values:
            cand = best | {name: v}
            acc = trial(cand)
            if acc > score:
                best, score = cand, acc
    return best | {"val_acc": score, "grid": grid}


# ------------------------------------------------------------------------------------ splits

def _text_split(ev: Evaluator, name: str, tasks: list[Task], which: str, seeds: list[int],
                opts: dict, finetuned: bool, nearest: bool) -> Scores:
    """Every text-prompt method on one split; tina and unconditional averaged over `seeds`."""
    s_n = len(seeds)
    prompts = ev.text_prompts([ev.names(t) for t in tasks for _ in seeds],
                              [s for _ in tasks for s in seeds], opts)
    nulls = [ev.null_prompt(len(t), s, opts) for t in tasks for s in seeds]
    ev.sample(prompts + nulls, opts, f"{name}: sampling")
    if finetuned:
        for t in tqdm(tasks, desc=f"{name}: fine-tuning", disable=not ev.progress):
            ev.finetuned(t)
    w, b = ev.ridge()
    out: dict[str, list[TaskScore]] = {m: [] for m in METHODS}
    for i, t in enumerate(tqdm(tasks, desc=f"{name}: scoring", disable=not ev.progress)):
        own = [p.key for p in prompts[i * s_n:(i + 1) * s_n]] + [ev.retrieval(t)]
        if finetuned:
            own.append(ev.finetuned(t))
        sc = ev.score(which, t, own)
        out["tina"].append(mean_score(sc[:s_n]))
        out["retrieval"].append(sc[s_n])
        if finetuned:
            out["finetuned"].append(sc[s_n + 1])
        ids = list(t)
        out["generic"].append(ev.head_score("generic", which, t, ev.generic_rows[ids]))
        out["ridge"].append(ev.head_score("ridge", which, t,
                                          ridge_rows(ev.class_emb[ids], w, b)))
        if nearest:
            out["nearest_name"].append(ev.head_score("nearest_name", which, t, nearest_name_rows(
                t, ev.class_emb, ev.ctx.has_row, ev.generic_rows)))
        out["unconditional"].append(mean_score(
            [ev.fixed_score(nulls[i * s_n + j].key, which, t) for j in range(s_n)]))
    return {m: (v or None) for m, v in out.items()}


@torch.no_grad()
def _image_split(ev: Evaluator, name: str, n_img: int, opts: dict) -> tuple[Scores, dict]:
    """The ood tasks prompted with n_img training images per class, cfg.eval.image_draws draws.

    tina: image embeddings (encode_prompt_images) as class tokens, each class taken for its
    nearest seen class name (`Generator.image_known`) for the base row.
    classify_then_text: the generic model names each class from the same images (vote_names),
    and that name prompt goes to tina as text. Draw d samples with seed cfg.eval.seeds[d % S].
    """
    ctx, cfg = ev.ctx, ev.cfg
    tasks, seeds, draws = ctx.splits.ood, cfg.eval.seeds, cfg.eval.image_draws
    ok = tuple(sorted(opts.items()))
    image_prompts, ctt_prompts, named_right = [], [], []
    for t in tqdm(tasks, desc=f"{name}: prompts", disable=not ev.progress):
        for d in range(draws):
            gen = torch.Generator().manual_seed(derived_seed(cfg.eval.seed, name, t, d))
            images = sample_prompt_images(ctx.train, t, n_img, gen)  # (k, n, C, H, W)
            emb = encode_prompt_images(ctx.image_encoder, images)
            logits = ctx.generic.eval()(to_float(images.flatten(0, 1)))
            ids = vote_names(logits.reshape(len(t), n_img, -1), ctx.has_row)
            s = seeds[d % len(seeds)]
            image_prompts.append(Prompt(("image", ok, name, t, d), emb, ev.names(t), s))
            ctt_prompts += ev.text_prompts([[ev.classes[c] for c in ids]], [s], opts)
            named_right.append(float(np.mean([a == b for a, b in zip(ids, t, strict=True)])))
    nulls = [ev.null_prompt(len(t), s, opts) for t in tasks for s in seeds]
    ev.sample(image_prompts + ctt_prompts + nulls, opts, f"{name}: sampling")
    out: dict[str, list[TaskScore]] = {m: [] for m in METHODS}
    for i, t in enumerate(tqdm(tasks, desc=f"{name}: scoring", disable=not ev.progress)):
        keys = [p.key for p in image_prompts[i * draws:(i + 1) * draws]]
        keys += [p.key for p in ctt_prompts[i * draws:(i + 1) * draws]]
        sc = ev.score("test", t, keys + [ev.finetuned(t)])  # fine-tuned: the ood model, cached
        out["tina"].append(mean_score(sc[:draws]))
        out["classify_then_text"].append(mean_score(sc[draws:2 * draws]))
        out["finetuned"].append(sc[-1])
        out["generic"].append(ev.head_score("generic", "test", t, ev.generic_rows[list(t)]))
        out["unconditional"].append(mean_score([ev.fixed_score(
            ev.null_prompt(len(t), s, opts).key, "test", t) for s in seeds]))
    extra = {"images_per_class": n_img, "draws": draws,
             "seeds": [seeds[d % len(seeds)] for d in range(draws)],
             "classify_then_text_names_correct": float(np.mean(named_right))}
    return {m: (v or None) for m, v in out.items()}, extra


def _assemble(ev: Evaluator, tasks: list[Task], scores: Scores, which: str) -> dict:
    e = ev.cfg.eval
    acc = {m: None if v is None else [s.acc for s in v] for m, v in scores.items()}
    out: dict[str, Any] = {"tasks": [ev.names(t) for t in tasks], "images": which,
                           "n_test_images": [sum(s.counts) for s in scores["generic"]]}
    for m in METHODS:
        out[m] = None if acc[m] is None else summarize(acc[m], acc["generic"], acc["finetuned"],
                                                       e.bootstrap, e.seed)
    return out


def _unseen_extras(ev: Evaluator, tasks: list[Task], scores: Scores) -> dict:
    """held_out_recall per held-out class and seen_class_acc, per method."""
    has_row = ev.ctx.has_row
    held = [c for c in range(len(has_row)) if not bool(has_row[c])]
    recall: dict[str, Any] = {}
    for m in ("tina", "nearest_name", "generic", "finetuned"):
        if scores[m] is not None:
            recall[m] = {ev.classes[h]: statistics.fmean(s.recall[t.index(h)]
                                                         for t, s in zip(tasks, scores[m],
                                                                         strict=True) if h in t)
                         for h in held if any(h in t for t in tasks)}
    recall["chance"] = 1.0 / len(tasks[0])
    seen = {m: statistics.fmean(s.acc_on([i for i, c in enumerate(t) if bool(has_row[c])])
                                for t, s in zip(tasks, v, strict=True))
            for m, v in scores.items() if v is not None}
    return {"held_out_recall": recall, "seen_class_acc": seen}


def _ddpm(ev: Evaluator, choice: dict, ood: dict) -> dict | None:
    """tina with ancestral DDPM over every diffusion step (1000 by default) on the first
    cfg.eval.n_ddpm_tasks ood tasks, seed cfg.eval.seeds[0]."""
    e, tasks = ev.cfg.eval, ev.ctx.splits.ood[: ev.cfg.eval.n_ddpm_tasks]
    if not tasks:
        return None
    opts = _opts(choice, ev.cfg, sampler="ddpm")
    prompts = ev.text_prompts([ev.names(t) for t in tasks], [e.seeds[0]] * len(tasks), opts)
    ev.sample(prompts, opts, f"ood: DDPM-{ev.gen.diffusion.steps} sampling")
    acc = [ev.score("test", t, [p.key])[0].acc for t, p in zip(tasks, prompts, strict=True)]
    n = len(tasks)
    ft = ood["finetuned"]["per_task"][:n] if ood.get("finetuned") else None
    return summarize(acc, ood["generic"]["per_task"][:n], ft, e.bootstrap, e.seed) | {
        "n_tasks": n, "sampler": "ddpm", "steps": ev.gen.diffusion.steps}


def evaluate(ctx: EvalContext, choice: dict, progress: bool = True) -> dict:
    """Run the protocol; returns report["splits"] (issue 2, report.json schema).

    Args:
        choice: select_on_val's result ({"use_ema", "guidance", "steps"[, "sampler"]}).
    Returns:
        {split: {"tasks", "n_test_images", "images", method: stats or None, ...}} for val, id,
        ood (+ "max_overlap", "tina_ddpm"), unseen_1/unseen_2 (+ "held_out_recall",
        "seen_class_acc"), variable_k_<K>, image_1img/image_5img; splits without tasks are left
        out. Accuracies are fractions in [0, 1].
    """
    cfg, sp, ev = ctx.cfg, ctx.splits, _evaluator(ctx, progress)
    opts, s0 = _opts(choice, cfg), [cfg.eval.seeds[0]]
    plan = [("val", sp.val, "val", s0, True, False), ("id", sp.id, "test", s0, False, False),
            ("ood", sp.ood, "test", cfg.eval.seeds, True, False),
            ("unseen_1", sp.unseen_1, "test", cfg.eval.seeds, True, True),
            ("unseen_2", sp.unseen_2, "test", cfg.eval.seeds, True, True)]
    plan += [(f"variable_k_{k}", sp.variable_k[k], "test", s0, False, False)
             for k in sorted(sp.variable_k)]
    out: dict[str, dict] = {}
    for name, tasks, which, seeds, ft, nearest in plan:
        if not tasks:
            continue
        scores = _text_split(ev, name, tasks, which, seeds, opts, ft, nearest)
        out[name] = _assemble(ev, tasks, scores, which) | {"seeds": seeds}
        if name == "val":
            out[name] |= ev.ridge_info
        if name == "ood":
            out[name]["max_overlap"] = [max_overlap(t, sp.zoo) for t in tasks]
            out[name]["tina_ddpm"] = _ddpm(ev, choice, out[name])
        if name.startswith("unseen"):
            out[name] |= _unseen_extras(ev, tasks, scores)
    if sp.ood and ctx.image_encoder is not None:
        for name, n_img in (("image_1img", 1), ("image_5img", 5)):
            scores, extra = _image_split(ev, name, n_img, opts)
            out[name] = _assemble(ev, sp.ood, scores, "test") | extra
    return out


def time_generation(ctx: EvalContext, choice: dict, runs: int = 3) -> dict:
    """Seconds per generated model (prompt -> ready module) at batch 1 and 32, median of `runs`.

    Uses the sampler, steps, guidance and weights of `choice`, ood prompts (val or zoo when
    there are none), after one untimed warm-up call.
    """
    opts, gen = _opts(choice, ctx.cfg), ctx.generator
    tasks = ctx.splits.ood or ctx.splits.val or ctx.splits.zoo
    prompts = [[ctx.test.classes[c] for c in tasks[i % len(tasks)]] for i in range(32)]
    gen.generate(prompts[:1], [0], **opts)
    out = {}
    for b in (1, 32):
        times = []
        for r in range(runs):
            t0 = time.perf_counter()
            gen.generate(prompts[:b], [r] * b, **opts)
            times.append((time.perf_counter() - t0) / b)
        out[f"batch_{b}"] = statistics.median(times)
    return out
