"""The generic model, p-model fine-tuning and the zoo store (Tina sec. 3.1).

- `train_generic`: one classifier over the label space, trained on the seen classes only until its
  validation accuracy stops improving. Its head has one row per label-space class; rows of
  held-out classes are zero and masked out of the loss, so "the generic model lacks that class".
- `finetune_pmodels`: p-models for ordered tasks, each initialized from the generic model with head
  row i = generic row of prompt class i (zero where the generic model lacks the class), labels
  re-indexed to prompt order, fine-tuned on its task's training images; several at once as one
  stacked network (`tina.stacked`), each the same as if fine-tuned alone (`finetune_pmodel`).
- `ZooStore`: one safetensors file per p-model plus one manifest shard per writer
  (`manifest-<writer>.jsonl`), merged into `manifest.jsonl`; atomic writes; a re-run skips entries
  already stored, so the store is safe for several writers on shared storage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tina.backbones import ParamLayout, SmallCNN, build_model
from tina.config import GenericConfig, ZooConfig
from tina.data import ImageSet, to_float
from tina.scoring import accuracy, logits_of
from tina.stacked import StackedCNN, frozen_input


def _batches(n: int, batch_size: int, gen: torch.Generator, epochs: float):
    steps = max(1, int(round(epochs * n / batch_size)))
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos: pos + batch_size]
        pos += batch_size


def train_generic(arch: str, train: ImageSet, val: ImageSet, seen_ids: Sequence[int],
                  cfg: GenericConfig, progress: bool = True) -> tuple[SmallCNN, dict]:
    """Train the generic model on the seen classes' training images.

    Args:
        train, val: label-space ImageSets (labels index `train.classes`, N classes).
        seen_ids: label-space ids the generic model may see; other classes' images are dropped
            and their head rows stay zero.
    Returns:
        (model with N head rows, history {"val_acc": [...], "epochs": e, "train_s": s}).
    """
    torch.manual_seed(cfg.seed)
    n = len(train.classes)
    seen = torch.zeros(n, dtype=torch.bool)
    seen[list(seen_ids)] = True
    tr = train.task(sorted(seen_ids))
    va = val.task(sorted(seen_ids))
    remap = torch.tensor(sorted(seen_ids))
    model = build_model(arch, train.images.shape[1], n)
    with torch.no_grad():
        model.fc.weight[~seen] = 0
        model.fc.bias[~seen] = 0
    net = StackedCNN([model])  # the same model, trained by the faster stacked computation
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, bad, hist = -1.0, None, 0, []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.max_epochs), desc="generic", disable=not progress)
    for _ in bar:
        for idx in _batches(len(tr), cfg.batch_size, gen, 1.0):
            logits = net(to_float(tr.images[idx])[None])[0].masked_fill(~seen, float("-inf"))
            loss = F.cross_entropy(logits, remap[tr.labels[idx]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.load_into([model])
        acc = float(accuracy(logits_of(model, va.images)[:, remap], va.labels))
        hist.append(acc)
        bar.set_postfix(val_acc=f"{acc:.4f}")
        if acc > best:
            best, bad = acc, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return model, {"val_acc": hist, "best_val_acc": best, "epochs": len(hist),
                   "train_s": time.perf_counter() - t0, "has_row": seen.tolist()}


def init_pmodel(generic: SmallCNN, arch: str, task: Sequence[int]) -> SmallCNN:
    """A K-row model whose body is the generic body and head row i the generic row of task[i]."""
    model = build_model(arch, generic.body[0].in_channels, len(task))
    state = {k: v for k, v in generic.state_dict().items() if not k.startswith("fc.")}
    state["fc.weight"] = generic.fc.weight.detach()[list(task)].clone()
    state["fc.bias"] = generic.fc.bias.detach()[list(task)].clone()
    model.load_state_dict(state)
    return model


def finetune_pmodels(generic: SmallCNN, arch: str, tasks: Sequence[Sequence[int]],
                     train: ImageSet, cfg: ZooConfig, seeds: Sequence[int],
                     head_only: bool = False,
                     features: torch.Tensor | None = None) -> list[SmallCNN]:
    """Fine-tune one p-model per ordered task (label-space ids) from the generic model.

    Labels are re-indexed to prompt order (output i means task[i]). Each p-model gets Adam for
    `cfg.epochs` passes over at most `cfg.max_train_images` of its task's training images, the
    learning rate decayed linearly to 0. The first `cfg.frozen_convs` convs (every conv if
    `head_only`) keep the generic model's weights: their output is computed once per image, not
    once per step, and the rest trains on it. Up to `cfg.pmodels_per_batch` p-models train at
    once as one `tina.stacked.StackedCNN`: p-model i still depends only on (tasks[i], seeds[i]),
    since its images and their order come from its own generator, Adam acts elementwise and the
    loss is the sum of the per-model mean losses, so training it alone gives it up to float
    rounding.

    Args:
        features: `frozen_features(generic, frozen, train.images)` where several calls share it
            (`build_zoo`); None computes the frozen layers' output for this call's images only.
    Returns:
        the p-models in task order, in eval mode.
    Raises:
        ValueError: `tasks` and `seeds` differ in length, or `cfg.frozen_convs` exceeds the
            architecture's convs.
    """
    if len(tasks) != len(seeds):
        raise ValueError(f"{len(tasks)} tasks but {len(seeds)} seeds")
    models = [init_pmodel(generic, arch, t) for t in tasks]
    frozen = n_frozen(generic, cfg, head_only)
    rows, labels, gens, groups = [], [], [], {}
    for i, (task, seed) in enumerate(zip(tasks, seeds, strict=True)):
        gen = torch.Generator().manual_seed(seed)
        r, y = train.task_rows(task)
        if cfg.max_train_images and len(r) > cfg.max_train_images:
            keep = torch.randperm(len(r), generator=gen)[: cfg.max_train_images]
            r, y = r[keep], y[keep]
        rows.append(r)
        labels.append(y)
        gens.append(gen)
        steps = max(1, int(round(cfg.epochs * len(r) / cfg.batch_size)))
        # one stacked network, optimizer and lr schedule per group: its members share K, the step
        # count and the batch size
        groups.setdefault((len(task), steps, min(len(r), cfg.batch_size)), []).append(i)
    inputs = train.images if not frozen else features
    if frozen and features is None:  # only the rows these tasks use, re-indexed
        used = torch.unique(torch.cat(rows))
        where = torch.full((len(train),), -1, dtype=torch.int64)
        where[used] = torch.arange(len(used))
        inputs = frozen_features(generic, frozen, train.images[used])
        rows = [where[r] for r in rows]
    for (_, steps, _), members in groups.items():
        for c in range(0, len(members), cfg.pmodels_per_batch):
            idx = members[c: c + cfg.pmodels_per_batch]
            _finetune_stacked([models[i] for i in idx], inputs, [rows[i] for i in idx],
                              [labels[i] for i in idx], [gens[i] for i in idx], steps, cfg,
                              frozen)
    return [m.eval() for m in models]


def n_frozen(generic: SmallCNN, cfg: ZooConfig, head_only: bool) -> int:
    """How many leading convs p-models keep at the generic weights: all of them if `head_only`,
    else `cfg.frozen_convs`. Raises ValueError when that exceeds the architecture's convs."""
    n_convs = len(generic.convs())
    if cfg.frozen_convs > n_convs:
        raise ValueError(f"zoo.frozen_convs={cfg.frozen_convs} but the architecture has "
                         f"{n_convs} convs")
    return n_convs if head_only else cfg.frozen_convs


def frozen_features(generic: SmallCNN, frozen: int, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> `tina.stacked.frozen_input` of them (float32, N first): the
    input of p-models whose first `frozen` convs keep the generic model's weights."""
    return torch.cat([frozen_input(generic, frozen, to_float(images[c: c + 4096]))
                      for c in range(0, len(images), 4096)])


def _finetune_stacked(models: list[SmallCNN], inputs: torch.Tensor, rows: list[torch.Tensor],
                      labels: list[torch.Tensor], gens: list[torch.Generator], steps: int,
                      cfg: ZooConfig, first: int) -> None:
    net = StackedCNN(models, first)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    # linear decay to 0: the last iterate, not a noisy constant-lr one, becomes the p-model
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=steps)
    batches = [_batches(len(r), cfg.batch_size, g, cfg.epochs)
               for r, g in zip(rows, gens, strict=True)]
    for idx in zip(*batches, strict=True):
        x = torch.stack([inputs[r[i]] for r, i in zip(rows, idx, strict=True)])
        x = to_float(x) if x.dtype == torch.uint8 else x
        y = torch.stack([y[i] for y, i in zip(labels, idx, strict=True)])
        loss = F.cross_entropy(net.logits_kn(x), y, reduction="none").mean(dim=1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.load_into(models)


def finetune_pmodel(generic: SmallCNN, arch: str, task: Sequence[int], train: ImageSet,
                    cfg: ZooConfig, seed: int, head_only: bool = False) -> SmallCNN:
    """One p-model: `finetune_pmodels` for a single (task, seed)."""
    return finetune_pmodels(generic, arch, [task], train, cfg, [seed], head_only)[0]


@dataclass
class ZooEntry:
    """One manifest line."""

    id: str
    dataset: str
    arch: str
    classes: list[str]
    class_ids: list[int]
    seed: int
    train_size: int
    val_acc: float
    n_params: int
    file: str
    finetune_s: float  # seconds of fine-tuning: its share of its stacked batch (tina.stacked)


class ZooStore:
    """A directory of p-models: params/<id>.safetensors + manifest shards + merged manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "params").mkdir(parents=True, exist_ok=True)

    def entries(self) -> list[ZooEntry]:
        """Every stored entry (from all shards) whose parameter file exists, sorted by id."""
        found: dict[str, ZooEntry] = {}
        for shard in sorted(self.root.glob("manifest-*.jsonl")):
            for line in shard.read_text().splitlines():
                try:
                    e = ZooEntry(**json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue  # a line cut short by a crash; its p-model is redone
                if (self.root / e.file).is_file():
                    found[e.id] = e
        return [found[k] for k in sorted(found)]

    def put(self, entry: ZooEntry, flat: torch.Tensor, writer: str = "0") -> None:
        """Store one p-model atomically: parameters (temp + rename), then its manifest line."""
        path = self.root / entry.file
        tmp = path.with_suffix(".tmp")
        save_file({"params": flat.detach().contiguous()}, str(tmp),
                  metadata={"id": entry.id, "arch": entry.arch})
        os.replace(tmp, path)
        shard = self.root / f"manifest-{writer}.jsonl"
        with open(shard, "a+b") as f:  # appends always go to the end, whatever was read
            # a crash can leave the last line cut short: start a fresh line, or this entry's line
            # would be glued to the torn one and lost with it
            torn = False
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((("\n" if torn else "") + json.dumps(entry.__dict__) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def merge(self) -> Path:
        """Write manifest.jsonl (all shards, sorted by id) atomically; return its path."""
        out = self.root / "manifest.jsonl"
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e.__dict__) + "\n" for e in self.entries()))
        os.replace(tmp, out)
        return out

    def load(self) -> tuple[list[ZooEntry], torch.Tensor]:
        """All entries and their parameters stacked (M, P) float32."""
        entries = self.entries()
        flats = [load_file(str(self.root / e.file))["params"] for e in entries]
        return entries, torch.stack(flats) if flats else torch.empty(0)


@dataclass(frozen=True)
class StoreKind:
    """A set of p-models fine-tuned with the zoo's recipe: its folder under a run directory, the
    prefix of its ids and where its seeds start (entry i: seed zoo.seed * 100003 + offset + i)."""

    folder: str
    prefix: str
    seed_offset: int

    def ids(self, n: int) -> set[str]:
        """The ids of entries 0..n-1."""
        return {f"{self.prefix}-{i:05d}" for i in range(n)}


ZOO = StoreKind("zoo", "pm", 0)
# The `finetuned` reference of the evaluation (tina.evaluate) on the val, ood and unseen tasks:
# the zoo's own function and recipe, so it runs where the zoo runs (in parallel on Ray). Never
# training data; its seeds start past any zoo index so that no seed repeats a zoo p-model's.
REFERENCE = StoreKind("finetuned", "ft", 1_000_000)


def build_zoo(store: ZooStore, tasks: Sequence[tuple[int, ...]], generic: SmallCNN, arch: str,
              train: ImageSet, val: ImageSet, cfg: ZooConfig, dataset: str,
              indices: Sequence[int] | None = None, writer: str = "0", head_only: bool = False,
              val_per_class: int = 200, progress: bool = True,
              kind: StoreKind = ZOO) -> list[ZooEntry]:
    """Fine-tune and store the p-models for `tasks[i]`, i in `indices` (default: all), skipping
    ids already stored. Entry i has id `{kind.prefix}-{i:05d}` (`pm-00000` for the zoo) and seed
    `cfg.seed * 100003 + kind.seed_offset + i`.

    Returns the entries written by this call.
    """
    done = {e.id for e in store.entries()}
    todo = [i for i in (range(len(tasks)) if indices is None else indices)
            if f"{kind.prefix}-{i:05d}" not in done]
    written = []
    frozen = n_frozen(generic, cfg, head_only)
    # computed once for every chunk (one pass over the training images, ~1 s for 100k)
    features = frozen_features(generic, frozen, train.images) if frozen and todo else None
    bar = tqdm(total=len(todo), desc=f"{kind.folder}[{writer}]", disable=not progress)
    for c in range(0, len(todo), cfg.pmodels_per_batch):
        chunk = todo[c: c + cfg.pmodels_per_batch]
        seeds = [cfg.seed * 100003 + kind.seed_offset + i for i in chunk]
        t0 = time.perf_counter()
        models = finetune_pmodels(generic, arch, [tasks[i] for i in chunk], train, cfg, seeds,
                                  head_only, features)
        dt = (time.perf_counter() - t0) / len(chunk)
        for i, seed, model in zip(chunk, seeds, models, strict=True):
            task = tasks[i]
            v = val.task(task, max_per_class=val_per_class)
            acc = float(accuracy(logits_of(model, v.images), v.labels))
            layout = ParamLayout(model)
            flat = layout.flatten({k: p.detach() for k, p in model.named_parameters()})
            entry = ZooEntry(
                id=f"{kind.prefix}-{i:05d}", dataset=dataset, arch=arch,
                classes=[train.classes[c] for c in task], class_ids=list(task), seed=seed,
                train_size=min(len(train.task(task)), cfg.max_train_images or 10**12),
                val_acc=acc, n_params=layout.n_params,
                file=f"params/{kind.prefix}-{i:05d}.safetensors", finetune_s=dt)
            store.put(entry, flat, writer)
            written.append(entry)
        bar.update(len(chunk))
    bar.close()
    return written
