"""Specification of tina.evaluate (the protocol of issue 2) and tina.evaluator (its caches).

The statistics are tested on hand-made numbers; the protocol end to end on a tiny world built
with the real pieces: images in ImageSets, a generic model and a zoo trained by tina.zoo, a
random-init CLIP written to disk (text and image towers), a generator trained for a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clip_fixture import save_random_clip, write_tiny_clip_config

from tina.backbones import ParamLayout, build_model
from tina.config import (
    DiffusionConfig,
    DiTConfig,
    EncoderConfig,
    EvalConfig,
    PipelineConfig,
    SampleConfig,
    TrainConfig,
)
from tina.data import ImageSet
from tina.encoders import CLIPEncoder
from tina.evaluate import (
    METHODS,
    EvalContext,
    bootstrap_ci,
    evaluate,
    paired,
    select_on_val,
    summarize,
    time_generation,
)
from tina.evaluator import task_scores
from tina.scoring import accuracy, logits_of
from tina.tasks import LabelSpace, make_splits, max_overlap
from tina.train import train_generator
from tina.zoo import ZooStore, build_zoo, train_generic

# ------------------------------------------------------------------------------- statistics

def test_bootstrap_ci_contains_the_mean_and_shrinks_with_more_tasks():
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.8, 0.05, 10), rng.normal(0.8, 0.05, 200)
    for x in (few, many):
        lo, hi = bootstrap_ci(x, 2000, seed=0)
        assert lo < x.mean() < hi
    width = [np.diff(bootstrap_ci(x, 2000, seed=0))[0] for x in (few, many)]
    assert width[1] < 0.5 * width[0]  # ~ 1 / sqrt(n): 20x the tasks, ~4.5x narrower


def test_bootstrap_ci_is_fixed_by_its_seed_and_none_without_tasks():
    x = [0.7, 0.9, 0.8, 0.75]
    assert bootstrap_ci(x, 500, seed=3) == bootstrap_ci(x, 500, seed=3)
    assert bootstrap_ci([], 500, seed=0) is None
    assert bootstrap_ci([0.5], 100, seed=0) == [0.5, 0.5]


def test_paired_differences_are_taken_task_by_task():
    # tasks differ a lot in difficulty; the method is exactly 0.01 better on every one of them
    generic = np.linspace(0.5, 0.95, 30)
    method = generic + 0.01
    d = paired(method, generic, 1000, seed=0)
    assert d["mean"] == pytest.approx(0.01)
    assert d["ci95"] == pytest.approx([0.01, 0.01])  # unpaired CIs would overlap widely
    shuffled = paired(method, generic[::-1], 1000, seed=0)  # other task order: not paired
    assert shuffled["ci95"][1] - shuffled["ci95"][0] > 0.1
    assert paired(method, None, 1000, seed=0) is None


def test_summarize_gives_the_report_json_statistics():
    s = summarize([0.8, 0.9], [0.7, 0.85], None, 200, seed=0)
    assert set(s) == {"mean", "ci95", "per_task", "paired_vs_generic", "paired_vs_finetuned"}
    assert s["mean"] == pytest.approx(0.85) and s["per_task"] == [0.8, 0.9]
    assert s["paired_vs_generic"]["mean"] == pytest.approx(0.075)
    assert s["paired_vs_finetuned"] is None


def test_task_scores_read_only_the_first_k_outputs_and_give_recall_per_prompt_position():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    logits = torch.zeros(1, 6, 5)
    logits[0, :, 4] = 100.0  # a padding row (position >= k) must never be predicted
    for i, p in enumerate([0, 1, 1, 1, 0, 2]):
        logits[0, i, p] = 1.0
    (s,) = task_scores(logits, labels, k=3)
    assert s.acc == pytest.approx(4 / 6)
    assert s.recall == pytest.approx([0.5, 2 / 3, 1.0]) and s.counts == [2, 3, 1]
    assert s.acc_on([1, 2]) == pytest.approx(3 / 4)


# ------------------------------------------------------------------------------- tiny world

CLASSES = ["circle", "square", "triangle", "cross", "line", "dot", "ring", "star", "wave", "grid"]
HELD_OUT = ["ring", "star"]
FORBIDDEN = [["circle", "square"], ["triangle", "cross"]]
K, ARCH = 4, "cnn-400"


def toy_images(n_per_class: int, seed: int) -> ImageSet:
    """12x12 grayscale images: noise plus a bright 3x3 block whose place names the class."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * len(CLASSES)
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    images = torch.randint(0, 60, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, q = 3 * (c // 4), 3 * (c % 4)
        images[i, 0, r:r + 3, q:q + 3] = 230
    return ImageSet(images, labels, list(CLASSES))


def tiny_cfg() -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.data.dataset, cfg.data.held_out, cfg.data.forbidden_pairs = "toy", HELD_OUT, FORBIDDEN
    cfg.arch.name = ARCH
    cfg.generic.max_epochs, cfg.generic.patience, cfg.generic.batch_size = 15, 15, 32
    cfg.generic.lr = 1e-2
    cfg.zoo.n_pmodels, cfg.zoo.k, cfg.zoo.batch_size, cfg.zoo.max_train_images = 12, K, 16, None
    cfg.zoo.epochs, cfg.zoo.lr = 2.0, 3e-3
    cfg.dit = DiTConfig(preset=None, width=32, depth=1, heads=2)
    cfg.diffusion = DiffusionConfig(steps=50)
    cfg.train = TrainConfig(steps=10, batch_size=8, warmup_steps=2, threads=1)
    cfg.sample = SampleConfig(sampler="ddim", steps=5)
    cfg.eval = EvalConfig(n_val=2, n_id=2, n_ood=3, n_unseen=2, n_variable_k=2,
                          variable_ks=[2, K], seeds=[0, 1], image_draws=2, n_ddpm_tasks=2,
                          guidance_grid=[1.0, 2.0], steps_grid=[3, 5],
                          residual_scale_grid=[1.0, 0.5], bootstrap=100)
    return cfg


def build_context(root: Path) -> EvalContext:
    cfg = tiny_cfg()
    train, val, test = toy_images(30, 0), toy_images(8, 1), toy_images(12, 2)
    space = LabelSpace(CLASSES, HELD_OUT)
    splits = make_splits(space, FORBIDDEN, K, cfg.zoo.n_pmodels, cfg.eval, seed=0)
    generic, hist = train_generic(ARCH, train, val, space.seen_ids, cfg.generic, progress=False)
    store = ZooStore(root / "zoo")
    build_zoo(store, splits.zoo, generic, ARCH, train, val, cfg.zoo, "toy", progress=False)
    entries, zoo_flats = store.load()
    clip_json = write_tiny_clip_config(root / "clip")
    weights = save_random_clip(root / "clip" / "tiny.safetensors", str(clip_json))
    enc = CLIPEncoder(EncoderConfig(name="clip", clip_model=str(clip_json),
                                    clip_pretrained=str(weights)))
    layout = ParamLayout(build_model(ARCH, 1, K))
    g_layout = ParamLayout(generic)
    g_flat = g_layout.flatten({k: v.detach() for k, v in generic.named_parameters()})
    has_row = torch.tensor(hist["has_row"])
    meta = {"arch": {"name": ARCH, "in_channels": 1, "k_max": K, "n_params": layout.n_params,
                     "head_only": False, "layout": layout.to_json()},
            "label_space": {"dataset": "toy", "classes": CLASSES, "held_out": HELD_OUT,
                            "has_row": has_row.tolist()},
            "encoder": {"name": enc.name, "version": enc.version, "dim": enc.dim}}
    gen, _ = train_generator(cfg, layout, g_flat, g_layout, has_row, enc.encode_text(CLASSES),
                             zoo_flats, torch.tensor([e.class_ids for e in entries]), meta,
                             progress=False)
    gen.encoder = enc
    return EvalContext(cfg=cfg, generator=gen, generic=generic, has_row=has_row,
                       zoo_entries=entries, zoo_flats=zoo_flats, train=train, val=val,
                       test=test, encoder=enc, image_encoder=enc, splits=splits)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[EvalContext, dict, dict]:
    ctx = build_context(tmp_path_factory.mktemp("world"))
    choice = select_on_val(ctx, progress=False)
    return ctx, choice, evaluate(ctx, choice, progress=False)


def test_select_on_val_is_greedy_over_ema_steps_guidance_then_residual_scale(run):
    ctx, choice, _ = run
    keys = ("use_ema", "guidance", "steps", "residual_scale")
    tried = [tuple(g[k] for k in keys) for g in choice["grid"]]
    assert tried[:2] == [(True, 1.0, 5, 1.0), (False, 1.0, 5, 1.0)]  # default, then raw weights
    assert tried[2][1:] == (1.0, 3, 1.0) and tried[3][1:] == (2.0, choice["steps"], 1.0)
    assert tried[4][1:] == (choice["guidance"], choice["steps"], 0.5)
    assert len(tried) == len(set(tried)) == 5  # a configuration is never sampled twice
    assert choice["val_acc"] == max(g["val_acc"] for g in choice["grid"])
    assert tuple(choice[k] for k in keys) in tried


def test_evaluate_reports_every_split_with_null_where_a_method_does_not_apply(run):
    _, _, res = run
    assert list(res) == ["val", "id", "ood", "unseen_1", "unseen_2", "variable_k_2",
                         "variable_k_4", "image_1img", "image_5img"]
    applies = {
        "val": {"tina", "finetuned", "generic", "retrieval", "ridge", "unconditional"},
        "id": {"tina", "generic", "retrieval", "ridge", "unconditional"},
        "ood": {"tina", "finetuned", "generic", "retrieval", "ridge", "unconditional"},
        "unseen_1": {"tina", "finetuned", "generic", "retrieval", "ridge", "nearest_name",
                     "unconditional"},
        "variable_k_2": {"tina", "generic", "retrieval", "ridge", "unconditional"},
        "image_1img": {"tina", "finetuned", "generic", "classify_then_text", "unconditional"},
    }
    for split, methods in applies.items():
        assert {m for m in METHODS if res[split][m] is not None} == methods, split


def test_statistics_are_fractions_over_the_same_tasks(run):
    _, _, res = run
    for split in res.values():
        g = split["generic"]["per_task"]
        for m in METHODS:
            s = split[m]
            if s is None:
                continue
            assert len(s["per_task"]) == len(split["tasks"])
            assert all(0.0 <= a <= 1.0 for a in s["per_task"])
            assert s["mean"] == pytest.approx(np.mean(s["per_task"]))
            assert s["ci95"][0] <= s["mean"] + 1e-12 and s["mean"] <= s["ci95"][1] + 1e-12
            diff = np.array(s["per_task"]) - np.array(g)
            assert s["paired_vs_generic"]["mean"] == pytest.approx(diff.mean())
        assert split["generic"]["paired_vs_generic"]["ci95"] == [0.0, 0.0]


def test_every_test_image_of_the_tasks_classes_is_scored(run):
    ctx, _, res = run
    for name, split in res.items():
        images = ctx.val if name == "val" else ctx.test
        want = [sum(len(images.class_indices(CLASSES.index(c))) for c in t)
                for t in split["tasks"]]
        assert split["n_test_images"] == want, name
        assert split["images"] == ("val" if name == "val" else "test")


def test_retrieval_on_an_id_task_is_the_zoo_p_model_of_that_class_set(run):
    ctx, _, res = run
    for names, acc in zip(res["id"]["tasks"], res["id"]["retrieval"]["per_task"], strict=True):
        ids = {CLASSES.index(c) for c in names}
        j = next(i for i, e in enumerate(ctx.zoo_entries) if set(e.class_ids) == ids)
        model = build_model(ARCH, 1, K)
        model.load_state_dict(ParamLayout(model).unflatten(ctx.zoo_flats[j]))
        data = ctx.test.task(ctx.zoo_entries[j].class_ids)
        assert acc == pytest.approx(float(accuracy(logits_of(model, data.images), data.labels)))


def test_unseen_splits_report_held_out_recall_per_class_next_to_nearest_name_and_chance(run):
    _, _, res = run
    for name in ("unseen_1", "unseen_2"):
        split = res[name]
        rec = split["held_out_recall"]
        held = {c for t in split["tasks"] for c in t if c in HELD_OUT}
        assert set(rec) == {"tina", "nearest_name", "generic", "finetuned", "chance"}
        assert rec["chance"] == pytest.approx(1 / K)
        for m in ("tina", "nearest_name", "generic", "finetuned"):
            assert set(rec[m]) == held
            assert all(0.0 <= v <= 1.0 for v in rec[m].values())
        assert {"tina", "nearest_name", "generic"} <= set(split["seen_class_acc"])
        assert all(sum(c in HELD_OUT for c in t) == int(name[-1]) for t in split["tasks"])


def test_ood_reports_max_overlap_and_ddpm_on_its_first_tasks(run):
    ctx, _, res = run
    ood = res["ood"]
    assert ood["max_overlap"] == [max_overlap(t, ctx.splits.zoo) for t in ctx.splits.ood]
    ddpm = ood["tina_ddpm"]
    assert ddpm["n_tasks"] == 2 and ddpm["steps"] == 50 and ddpm["sampler"] == "ddpm"
    assert len(ddpm["per_task"]) == 2
    gen_diff = np.array(ddpm["per_task"]) - np.array(ood["generic"]["per_task"][:2])
    assert ddpm["paired_vs_generic"]["mean"] == pytest.approx(gen_diff.mean())


def test_image_splits_prompt_the_ood_tasks_and_share_their_fixed_references(run):
    _, _, res = run
    for name, n in (("image_1img", 1), ("image_5img", 5)):
        split = res[name]
        assert split["tasks"] == res["ood"]["tasks"]
        assert split["images_per_class"] == n and split["draws"] == 2
        assert 0.0 <= split["classify_then_text_names_correct"] <= 1.0
        for m in ("finetuned", "generic", "unconditional"):  # same models, same images
            assert split[m]["per_task"] == res["ood"][m]["per_task"]


def test_evaluation_is_reproducible_and_generation_is_timed(run, tmp_path):
    ctx, choice, res = run
    fresh = EvalContext(**{f: getattr(ctx, f) for f in ctx.__dataclass_fields__ if f != "cache"})
    again = evaluate(fresh, choice, progress=False)
    assert json.dumps(again, sort_keys=True) == json.dumps(res, sort_keys=True)
    t = time_generation(ctx, choice, runs=1)
    assert set(t) == {"batch_1", "batch_32"} and all(v > 0 for v in t.values())


def test_equal_prompts_share_one_generated_model(run):
    ctx, choice, _ = run
    ev = ctx.cache["evaluator"]
    opts = {"sampler": "ddim", "steps": 3, "guidance": 1.0, "use_ema": True}
    before = len(ev.flats)
    ev.sample(ev.text_prompts([["Circle ", "dot"], ["circle", "DOT"]], [7, 7], opts), opts, "")
    assert len(ev.flats) == before + 1  # same names after normalization, same seed: one model
    ev.sample(ev.text_prompts([["dot", "circle"]], [7], opts), opts, "")
    assert len(ev.flats) == before + 2  # another order is another prompt


def test_classify_then_text_that_names_every_class_right_is_the_ood_text_prompt_model(run):
    _, _, res = run
    split = res["image_5img"]
    assert split["classify_then_text_names_correct"] == 1.0  # five clear images per class
    # the same names and seeds make the same models: scored, not re-sampled
    assert split["classify_then_text"]["per_task"] == res["ood"]["tina"]["per_task"]
