"""Models of every evaluated method, sampled or fitted once and scored once (tina.evaluate).

`Evaluator` holds, for one `EvalContext`, caches keyed by what defines each thing:
- generated models by (kind, sampler options, prompt, seed): a model shared by two splits (e.g. a
  classify-then-text prompt that names every class right *is* the ood text prompt) is sampled once;
- fine-tuned and retrieved models by task; the ridge map once (lambda chosen on val);
- scores by (model, image set, task).
The body of a convolutional model is what costs, so every method with the generic body (generic,
ridge, nearest_name) is scored from generic features computed once per image set, and a
null-prompt model, which depends only on (K, seed), is run once over the whole image set.
All models are K_max-row flat vectors in one layout, so the models of a task run in one
`batched_logits` call; a k-class task reads logits[..., :k].
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from tina.backbones import HEAD_BIAS, HEAD_WEIGHT, ParamLayout, SmallCNN, build_model
from tina.baselines import fit_ridge, retrieval_index, retrieval_rows, ridge_rows, zoo_row_table
from tina.config import PipelineConfig
from tina.data import ImageSet, to_float
from tina.encoders import PromptEncoder
from tina.generate import Generator, prompt_seed
from tina.scoring import batched_logits
from tina.tasks import Splits, Task, normalize_name
from tina.zoo import ZooEntry, finetune_pmodel

RIDGE_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_PROMPTS = 64  # prompts per sampler call
# images x models per forward pass: small CNNs run 4-8x faster per image when one pass's
# activations stay in cache (measured on these 2-core machines: 0.035 s vs 0.17-0.25 s per
# model on 10k 28x28 images at 1024 vs 8 x 2048)
CHUNK_IMAGES = 1024


@dataclass
class EvalContext:
    """Everything the protocol reads; built by the pipeline (tina.pipeline)."""

    cfg: PipelineConfig
    generator: Generator
    generic: SmallCNN  # N-row generic model (rows of held-out classes are zero)
    has_row: torch.Tensor  # (N,) bool
    zoo_entries: list[ZooEntry]
    zoo_flats: torch.Tensor  # (M, P) float32 K_max-row p-models, all parameters
    train: ImageSet
    val: ImageSet
    test: ImageSet
    encoder: PromptEncoder
    image_encoder: Any  # encode_images(uint8 (N, C, H, W)) -> (N, D) unit vectors in text space
    splits: Splits
    # the `finetuned` references fine-tuned before evaluation (pipeline stage `finetuned`), by
    # task; a task missing here is fine-tuned by the evaluator itself with the same recipe
    references: dict[Task, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # shared by select_on_val / evaluate


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") >> 1


@dataclass
class TaskScore:
    """One model (or the mean over seeds/draws) on one task's images."""

    acc: float
    recall: list[float]  # per prompt position
    counts: list[int]  # images per prompt position

    def acc_on(self, positions: list[int]) -> float:
        """Accuracy on the images of the given prompt positions only."""
        n = sum(self.counts[i] for i in positions)
        return sum(self.recall[i] * self.counts[i] for i in positions) / max(n, 1)


def task_scores(logits: torch.Tensor, labels: torch.Tensor, k: int) -> list[TaskScore]:
    """logits (B, n, >=k), labels (n,) -> B TaskScores (outputs beyond k are padding rows)."""
    hit = (logits[..., :k].argmax(-1) == labels).double()  # (B, n)
    onehot = torch.nn.functional.one_hot(labels, k).double()  # (n, k)
    counts = onehot.sum(0)
    recall = (hit @ onehot) / counts.clamp_min(1)
    return [TaskScore(float(h.mean()), r.tolist(), counts.long().tolist())
            for h, r in zip(hit, recall, strict=True)]


def mean_score(scores: list[TaskScore]) -> TaskScore:
    return TaskScore(statistics.fmean(s.acc for s in scores),
                     [statistics.fmean(v) for v in zip(*(s.recall for s in scores), strict=True)],
                     scores[0].counts)


# ------------------------------------------------------------------------------------ evaluator

Scores = dict[str, list[TaskScore] | None]  # method -> per-task scores (None: not applicable)


@dataclass
class Prompt:
    """One model to generate: a text or embedding prompt and the seed of its noise."""

    key: tuple  # what defines the model (kind, sampler options, prompt, seed): the cache key
    content: list[str] | torch.Tensor  # class names, or (k, D) float32 prompt embeddings
    seed_names: list[str]  # the noise seed is prompt_seed(seed, seed_names)
    seed: int
    null: bool = False  # sample with the null prompt (the `unconditional` method)


class Evaluator:
    """Builds and scores every method's models for one EvalContext, each exactly once.

    Models are (P,) float32 flat vectors of a K_max-row model of the generated architecture
    (`self.layout`), kept in `self.flats` by key; scores are TaskScores in `self.memo`.
    """

    def __init__(self, ctx: EvalContext, progress: bool):
        self.ctx, self.cfg, self.gen, self.progress = ctx, ctx.cfg, ctx.generator, progress
        self.k_max, self.classes = self.gen.k_max, ctx.test.classes
        self.template = build_model(self.cfg.arch.name, ctx.test.images.shape[1], self.k_max)
        self.layout = ParamLayout(self.template)
        g_layout = ParamLayout(ctx.generic)
        g_flat = g_layout.flatten({n: p.detach() for n, p in ctx.generic.named_parameters()})
        self.generic_rows = g_flat[g_layout.row_index()]  # (N, d+1)
        self.class_emb = ctx.encoder.encode_text(self.classes)
        ids = [e.class_ids + [-1] * (self.k_max - len(e.class_ids)) for e in ctx.zoo_entries]
        self.zoo_ids = torch.tensor(ids, dtype=torch.long).reshape(-1, self.k_max)
        self.zoo_acc = torch.tensor([e.val_acc for e in ctx.zoo_entries], dtype=torch.float64)
        self.sets = {"val": ctx.val, "test": ctx.test}
        self.flats: dict[tuple, torch.Tensor] = {}  # model key -> (P,) K_max-row flat
        self.memo: dict[tuple, Any] = {}  # scores, features, fixed-model logits
        self.ridge_w: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ridge_info: dict = {}

    # ---- images and fixed-body scoring
    def names(self, task: Task) -> list[str]:
        return [self.classes[c] for c in task]

    def rows(self, which: str, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices into the image set and labels in prompt order, (n,) int64 each."""
        s = self.sets[which]
        parts = [s.class_indices(c) for c in task]
        labels = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts)])
        return torch.cat(parts), labels

    def _over_set(self, key: tuple, fn) -> torch.Tensor:
        if key not in self.memo:
            images = self.sets[key[-1]].images
            self.memo[key] = torch.cat([fn(images[i: i + CHUNK_IMAGES])
                                        for i in range(0, len(images), CHUNK_IMAGES)])
        return self.memo[key]

    @torch.no_grad()
    def features(self, which: str) -> torch.Tensor:
        """(N_img, d) generic features of the whole image set, computed once."""
        return self._over_set(("feat", which),
                              lambda x: self.ctx.generic.eval().features(to_float(x)))

    def head_score(self, method: str, which: str, task: Task, rows: torch.Tensor) -> TaskScore:
        """Generic body + the given head rows (k, d+1) on the task's images."""
        key = ("head", method, which, task)
        if key not in self.memo:
            idx, labels = self.rows(which, task)
            logits = self.features(which)[idx] @ rows[:, :-1].T + rows[:, -1]
            self.memo[key] = task_scores(logits[None], labels, len(task))[0]
        return self.memo[key]

    def fixed_score(self, key: tuple, which: str, task: Task) -> TaskScore:
        """A task-independent generated model (the null prompt) scored from whole-set logits."""
        logits = self._over_set(("fixed", key, which), lambda x: batched_logits(
            self.template, self.layout, self.flats[key][None], x, chunk=CHUNK_IMAGES)[0])
        idx, labels = self.rows(which, task)
        return task_scores(logits[idx][None], labels, len(task))[0]

    def score(self, which: str, task: Task, keys: list[tuple]) -> list[TaskScore]:
        """Own-body models (by key into self.flats) on the task's images, one batched call."""
        todo = list(dict.fromkeys(k for k in keys if ("own", k, which, task) not in self.memo))
        if todo:
            idx, labels = self.rows(which, task)
            images = self.sets[which].images[idx]
            flats = torch.stack([self.flats[k] for k in todo])
            chunk = max(128, CHUNK_IMAGES // len(todo))  # B x chunk images fit in cache
            logits = batched_logits(self.template, self.layout, flats, images, chunk=chunk)
            for k, s in zip(todo, task_scores(logits, labels, len(task)), strict=True):
                self.memo[("own", k, which, task)] = s
        return [self.memo[("own", k, which, task)] for k in keys]

    # ---- flats of the other methods
    def full_flat(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Named parameters with k <= K_max head rows -> (P,) K_max-row flat, extra rows zero."""
        w, b = params[HEAD_WEIGHT], params[HEAD_BIAS]
        pw = torch.zeros(self.k_max, w.shape[1])
        pb = torch.zeros(self.k_max)
        pw[: len(w)], pb[: len(b)] = w, b
        return self.layout.flatten({**params, HEAD_WEIGHT: pw, HEAD_BIAS: pb})

    def finetuned(self, task: Task) -> tuple:
        key = ("finetuned", task)
        if key not in self.flats and task in self.ctx.references:
            self.flats[key] = self.full_flat(self.ctx.references[task])
        elif key not in self.flats:
            seed = derived_seed(self.cfg.eval.seed, "finetuned", task)
            m = finetune_pmodel(self.ctx.generic, self.cfg.arch.name, task, self.ctx.train,
                                self.cfg.zoo, seed, self.cfg.arch.head_only)
            self.flats[key] = self.full_flat({n: p.detach() for n, p in m.named_parameters()})
        return key

    def retrieval(self, task: Task) -> tuple:
        key = ("retrieval", task)
        if key not in self.flats:
            j = retrieval_index(task, self.zoo_ids, self.zoo_acc)
            zoo_flat = self.ctx.zoo_flats[j]
            zoo_task = [int(c) for c in self.zoo_ids[j] if c >= 0]
            rows = retrieval_rows(task, zoo_task, zoo_flat[self.layout.row_index()],
                                  self.generic_rows)
            p = self.layout.unflatten(zoo_flat)
            d = rows.shape[1] - 1
            self.flats[key] = self.full_flat({**p, HEAD_WEIGHT: rows[:, :d],
                                              HEAD_BIAS: rows[:, d]})
        return key

    def ridge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ridge map (w, b), lambda chosen by mean val accuracy with the generic body."""
        if self.ridge_w is None:
            cls, rows = zoo_row_table(self.layout, self.ctx.zoo_flats, self.zoo_ids)
            grid, fits = [], []
            val = self.ctx.splits.val
            for lam in RIDGE_LAMBDAS:
                w, b = fit_ridge(self.class_emb[cls], rows, lam)
                acc = statistics.fmean(self.head_score(f"ridge{lam}", "val", t, ridge_rows(
                    self.class_emb[list(t)], w, b)).acc for t in val) if val else 0.0
                grid.append({"lambda": lam, "val_acc": acc if val else None})
                fits.append((w, b))
            # first on ties; without val tasks the middle of the grid
            best = (max(range(len(grid)), key=lambda i: grid[i]["val_acc"]) if val
                    else len(grid) // 2)
            self.ridge_w = fits[best]
            self.ridge_info = {"ridge_lambda": RIDGE_LAMBDAS[best], "ridge_grid": grid}
        return self.ridge_w

    # ---- generation
    def _to_full(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.shape[1] == self.layout.n_params:
            return flat
        parts = self.gen.layout.unflatten(flat)  # head-only generator: add the frozen body
        body = {k: v.expand(len(flat), *v.shape) for k, v in self.gen.fixed.items()}
        return self.layout.flatten({**body, **parts})

    def sample(self, prompts: list[Prompt], opts: dict, desc: str) -> None:
        """Generate every prompt's model not generated yet, in sampler calls of at most
        MAX_PROMPTS prompts of one kind (text, embeddings, null); `opts` go to Generator.sample.
        """
        todo = list({p.key: p for p in prompts if p.key not in self.flats}.values())
        groups: dict[tuple[bool, bool], list[Prompt]] = {}
        for p in todo:
            groups.setdefault((p.null, isinstance(p.content, list)), []).append(p)
        chunks = [g[i: i + MAX_PROMPTS] for g in groups.values()
                  for i in range(0, len(g), MAX_PROMPTS)]
        for chunk in tqdm(chunks, desc=desc, disable=not self.progress or not chunks):
            if isinstance(chunk[0].content, list):
                c = self.gen.text_conditioning([p.content for p in chunk])
            else:  # image embeddings: each class is taken for its nearest seen class name;
                # the null prompt names none
                c = self.gen.embedding_conditioning([p.content for p in chunk], [
                    [-1] * len(p.content) if p.null else self.gen.image_known(p.content)
                    for p in chunk])
            seeds = [prompt_seed(p.seed, p.seed_names) for p in chunk]
            flat = self._to_full(self.gen.sample(c, seeds, null=chunk[0].null, **opts))
            for p, f in zip(chunk, flat, strict=True):
                self.flats[p.key] = f

    def text_prompts(self, prompts: list[list[str]], seeds: list[int],
                     opts: dict) -> list[Prompt]:
        """Class-name prompts; keyed by the normalized names, so equal prompts share a model."""
        ok = tuple(sorted(opts.items()))
        return [Prompt(("text", ok, tuple(normalize_name(n) for n in p), s), p, p, s)
                for p, s in zip(prompts, seeds, strict=True)]

    def null_prompt(self, k: int, seed: int, opts: dict) -> Prompt:
        """The null prompt of k classes: one model per (k, seed, opts) serves every task."""
        return Prompt(("null", tuple(sorted(opts.items())), k, seed),
                      torch.zeros(k, self.class_emb.shape[1]), [f"<null prompt k={k}>"], seed,
                      null=True)
