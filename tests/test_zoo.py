"""Specification of tina.zoo: generic model, p-model fine-tuning, and the zoo store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tina.backbones import HEAD_BIAS, HEAD_WEIGHT, ParamLayout, build_model
from tina.config import GenericConfig, ZooConfig
from tina.data import ImageSet, to_float
from tina.scoring import accuracy, logits_of
from tina.zoo import (
    REFERENCE,
    ZooEntry,
    ZooStore,
    _batches,
    build_zoo,
    finetune_pmodel,
    finetune_pmodels,
    init_pmodel,
    train_generic,
)

CLASSES = ["rows", "columns", "diagonals", "checks", "dots"]
HELD_OUT = 3  # "checks": the generic model never sees it
ARCH = "cnn-400"


def textures(n_per_class: int, seed: int) -> ImageSet:
    """28x28 uint8 images of five distinct textures (random phase, contrast and noise)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    images, labels = [], []
    for c in range(len(CLASSES)):
        for _ in range(n_per_class):
            phase = int(torch.randint(4, (1,), generator=g))
            pattern = [
                (yy + phase) % 4 < 2,
                (xx + phase) % 4 < 2,
                (xx + yy + phase) % 6 < 3,
                ((xx + phase) // 4 + (yy + phase) // 4) % 2 == 0,
                ((xx + phase) % 7 == 0) & ((yy + phase) % 7 == 0),
            ][c].float()
            contrast = 120 + 120 * torch.rand(1, generator=g)
            img = pattern * contrast + 20 * torch.rand(28, 28, generator=g)
            images.append(img.clamp(0, 255).to(torch.uint8))
            labels.append(c)
    return ImageSet(torch.stack(images)[:, None], torch.tensor(labels), list(CLASSES))


@pytest.fixture(scope="module")
def data() -> tuple[ImageSet, ImageSet]:
    return textures(60, seed=0), textures(30, seed=1)


@pytest.fixture(scope="module")
def generic(data: tuple[ImageSet, ImageSet]) -> tuple[torch.nn.Module, dict]:
    train, val = data
    seen = [i for i in range(len(CLASSES)) if i != HELD_OUT]
    cfg = GenericConfig(max_epochs=8, patience=2, batch_size=32, lr=3e-2, seed=0)
    return train_generic(ARCH, train, val, seen, cfg, progress=False)


def zoo_cfg(**kw) -> ZooConfig:
    return ZooConfig(**{"k": 3, "epochs": 1.0, "batch_size": 32, "lr": 5e-3,
                        "max_train_images": None, "seed": 0, **kw})


def test_train_generic_keeps_held_out_rows_exactly_zero(generic) -> None:
    model, hist = generic
    assert model.fc.weight.shape[0] == len(CLASSES)
    assert not bool(model.fc.weight[HELD_OUT].any()) and model.fc.bias[HELD_OUT] == 0
    seen = [i for i in range(len(CLASSES)) if i != HELD_OUT]
    assert bool(model.fc.weight[seen].abs().sum(1).gt(0).all())
    assert hist["has_row"] == [i != HELD_OUT for i in range(len(CLASSES))]
    assert 1 <= hist["epochs"] == len(hist["val_acc"]) <= 8
    assert hist["best_val_acc"] == max(hist["val_acc"])


def test_train_generic_learns_the_seen_classes(generic, data) -> None:
    model, _ = generic
    seen = [i for i in range(len(CLASSES)) if i != HELD_OUT]
    val = data[1].task(seen)
    acc = accuracy(logits_of(model, val.images)[:, seen], val.labels)
    assert float(acc) > 0.8  # chance: 0.25


def test_init_pmodel_row_i_is_the_generic_row_of_task_i_and_zero_for_a_lacking_class(
        generic) -> None:
    model, _ = generic
    task = (4, HELD_OUT, 0)
    p = init_pmodel(model, ARCH, task)
    assert p.fc.weight.shape == (3, model.fc.weight.shape[1])
    for i, c in enumerate(task):
        assert torch.equal(p.fc.weight[i], model.fc.weight[c])
        assert torch.equal(p.fc.bias[i], model.fc.bias[c])
    assert not bool(p.fc.weight[1].any()) and p.fc.bias[1] == 0
    for (name, a), (_, b) in zip(p.body.named_parameters(), model.body.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_finetuned_pmodel_output_i_means_prompt_class_i(data) -> None:
    train, val = data
    torch.manual_seed(0)
    untrained = build_model(ARCH, 1, len(CLASSES))  # all skill must come from fine-tuning
    task = (3, 0, 4, 1)  # not sorted: sorted-order labels would score far below prompt order
    p = finetune_pmodel(untrained, ARCH, task, train, zoo_cfg(epochs=12.0, lr=1e-2), seed=0)
    v = val.task(task)
    logits = logits_of(p, v.images)
    assert float(accuracy(logits, v.labels)) > 0.8  # chance: 0.25
    sorted_labels = torch.tensor([sorted(task).index(task[int(y)]) for y in v.labels])
    assert float(accuracy(logits, sorted_labels)) < 0.5


def recipe_one_at_a_time(generic, task, train, cfg, seed):
    """The zoo recipe written out for one plain nn.Module (PyTorch's own conv2d and Adam)."""
    gen = torch.Generator().manual_seed(seed)
    data = train.task(task)
    if cfg.max_train_images and len(data) > cfg.max_train_images:
        keep = torch.randperm(len(data), generator=gen)[: cfg.max_train_images]
        data = ImageSet(data.images[keep], data.labels[keep], data.classes)
    model = init_pmodel(generic, ARCH, task)
    frozen = [c.weight for c in model.convs()[: cfg.frozen_convs]]
    opt = torch.optim.Adam([p for p in model.parameters() if all(p is not f for f in frozen)],
                           lr=cfg.lr)
    steps = max(1, round(cfg.epochs * len(data) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=steps)
    for idx in _batches(len(data), cfg.batch_size, gen, cfg.epochs):
        loss = F.cross_entropy(model(to_float(data.images[idx])), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def test_pmodels_fine_tuned_together_equal_each_fine_tuned_alone(generic, data) -> None:
    model, _ = generic
    train = data[0]
    # 2- and 3-class tasks take different step counts (two groups); a cap draws a subset
    tasks = [(4, 2, 0), (1, 0), (0, 1, 2), (2, 4)]
    for cfg in (zoo_cfg(pmodels_per_batch=3), zoo_cfg(max_train_images=100),
                zoo_cfg(frozen_convs=1, pmodels_per_batch=3)):
        together = finetune_pmodels(model, ARCH, tasks, train, cfg, seeds=[5, 6, 7, 8])
        for task, seed, got in zip(tasks, [5, 6, 7, 8], together, strict=True):
            want = recipe_one_at_a_time(model, task, train, cfg, seed)
            assert got.fc.weight.shape[0] == len(task)
            for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters(),
                                         strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
            assert not torch.equal(got.fc.weight, init_pmodel(model, ARCH, task).fc.weight)


def test_frozen_convs_keep_the_generic_weights_and_train_the_rest(generic, data) -> None:
    model, _ = generic
    p = finetune_pmodel(model, ARCH, (0, 2, 1), data[0], zoo_cfg(frozen_convs=1), seed=1)
    assert torch.equal(p.body[0].weight, model.body[0].weight)
    assert not torch.equal(p.body[2].weight, model.body[2].weight)
    with pytest.raises(ValueError, match="frozen_convs=3"):
        finetune_pmodel(model, ARCH, (0, 2, 1), data[0], zoo_cfg(frozen_convs=3), seed=1)


def test_head_only_finetuning_keeps_the_generic_body(generic, data) -> None:
    model, _ = generic
    p = finetune_pmodel(model, ARCH, (0, 2, 1), data[0], zoo_cfg(), seed=1, head_only=True)
    for (name, a), (_, b) in zip(p.body.named_parameters(), model.body.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(p.fc.weight, model.fc.weight[[0, 2, 1]])


# ----------------------------------------------------------------------------------- ZooStore

def entry(i: int, n_params: int = 4) -> ZooEntry:
    return ZooEntry(id=f"pm-{i:05d}", dataset="textures", arch=ARCH, classes=["rows", "dots"],
                    class_ids=[0, 4], seed=i, train_size=10, val_acc=0.5, n_params=n_params,
                    file=f"params/pm-{i:05d}.safetensors", finetune_s=0.1)


def test_put_stores_parameters_then_a_manifest_line_leaving_no_temp_file(tmp_path: Path) -> None:
    store = ZooStore(tmp_path)
    flat = torch.arange(4.0)
    store.put(entry(0), flat, writer="w")
    assert torch.equal(load_file(str(tmp_path / "params/pm-00000.safetensors"))["params"], flat)
    assert [json.loads(x)["id"] for x in (tmp_path / "manifest-w.jsonl").read_text().splitlines()
            ] == ["pm-00000"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert [e.id for e in store.entries()] == ["pm-00000"]


def test_an_entry_counts_only_once_its_parameter_file_exists(tmp_path: Path) -> None:
    store = ZooStore(tmp_path)
    store.put(entry(0), torch.zeros(4))
    store.put(entry(1), torch.ones(4))
    (tmp_path / "params/pm-00001.safetensors").rename(tmp_path / "params/pm-00001.tmp")
    assert [e.id for e in store.entries()] == ["pm-00000"]


def test_a_truncated_last_manifest_line_is_skipped_and_the_next_put_still_lands(
        tmp_path: Path) -> None:
    store = ZooStore(tmp_path)
    store.put(entry(0), torch.zeros(4))
    store.put(entry(1), torch.ones(4))
    shard = tmp_path / "manifest-0.jsonl"
    text = shard.read_text()
    shard.write_text(text[: len(text) - 25])  # a crash in the middle of the last line
    assert [e.id for e in store.entries()] == ["pm-00000"]
    store.put(entry(1), torch.ones(4))  # the re-run redoes it
    store.put(entry(2), torch.full((4,), 2.0))
    assert [e.id for e in store.entries()] == ["pm-00000", "pm-00001", "pm-00002"]


def test_build_zoo_stores_ordered_tasks_and_a_rerun_writes_nothing(tmp_path: Path, generic,
                                                                   data) -> None:
    model, _ = generic
    train, val = data
    tasks = [(0, 1, 2), (4, 2, 0)]
    cfg = zoo_cfg(seed=7)
    store = ZooStore(tmp_path / "zoo")
    first = build_zoo(store, tasks, model, ARCH, train, val, cfg, "textures", progress=False)
    assert [e.id for e in first] == ["pm-00000", "pm-00001"]
    e = first[1]
    assert e.classes == ["dots", "diagonals", "rows"] and e.class_ids == [4, 2, 0]
    assert e.seed == 7 * 100003 + 1 and e.arch == ARCH and e.dataset == "textures"
    assert e.n_params == ParamLayout(build_model(ARCH, 1, 3)).n_params
    assert 0.0 <= e.val_acc <= 1.0 and e.train_size == 3 * 60
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "zoo").rglob("*")
             if p.is_file()}
    second = build_zoo(store, tasks, model, ARCH, train, val, cfg, "textures", progress=False)
    assert second == []
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "zoo").rglob("*")
            if p.is_file()} == files
    # the stored vector is the fine-tuned p-model, in named_parameters() order
    entries, flats = store.load()
    assert flats.shape == (2, e.n_params)
    p = ParamLayout(build_model(ARCH, 1, 3)).unflatten(flats[1])
    assert p[HEAD_WEIGHT].shape == (3, 8) and p[HEAD_BIAS].shape == (3,)


@pytest.mark.parametrize("frozen", [0, 1])
def test_reference_store_has_its_own_ids_and_seeds_and_the_zoo_recipe(tmp_path: Path, generic,
                                                                      data, frozen: int) -> None:
    model, _ = generic
    train, val = data
    cfg = zoo_cfg(seed=7, frozen_convs=frozen)
    task = (4, 2, 0)
    ref = build_zoo(ZooStore(tmp_path / "finetuned"), [task], model, ARCH, train, val, cfg,
                    "textures", progress=False, kind=REFERENCE)
    assert [e.id for e in ref] == ["ft-00000"] and ref[0].file == "params/ft-00000.safetensors"
    assert ref[0].seed == 7 * 100003 + REFERENCE.seed_offset
    # the same function and recipe as finetune_pmodel with that seed: the evaluation's reference
    # (with frozen convs build_zoo computes their output once for all images, here per call)
    want = finetune_pmodel(model, ARCH, task, train, cfg, ref[0].seed)
    _, flats = ZooStore(tmp_path / "finetuned").load()
    got = ParamLayout(build_model(ARCH, 1, 3)).unflatten(flats[0])
    assert all(torch.equal(got[n], p.detach()) for n, p in want.named_parameters())


def test_two_writers_shards_merge_into_one_sorted_manifest(tmp_path: Path, generic,
                                                           data) -> None:
    model, _ = generic
    train, val = data
    tasks = [(0, 1, 2), (4, 2, 0), (1, 0, 4), (2, 4, 1)]
    store = ZooStore(tmp_path)
    kw = dict(cfg=zoo_cfg(), dataset="textures", progress=False, val_per_class=10)
    build_zoo(store, tasks, model, ARCH, train, val, indices=[3, 1], writer="a", **kw)
    build_zoo(ZooStore(tmp_path), tasks, model, ARCH, train, val, indices=[2, 0], writer="b",
              **kw)
    assert sorted(p.name for p in tmp_path.glob("manifest-*.jsonl")) == [
        "manifest-a.jsonl", "manifest-b.jsonl"]
    out = store.merge()
    assert out == tmp_path / "manifest.jsonl"
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["pm-00000", "pm-00001", "pm-00002", "pm-00003"]
    assert [tuple(x["class_ids"]) for x in lines] == tasks
    entries, flats = store.load()
    for e, f in zip(entries, flats, strict=True):
        assert torch.equal(load_file(str(tmp_path / e.file))["params"], f)
    assert not list(tmp_path.glob("*.tmp"))
