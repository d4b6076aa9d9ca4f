"""Training the Tina generator: DDPM with x0-prediction over zoo p-models (Tina sec. 3).

`train_generator` is the one training loop; a plain process calls it directly, and a Ray Train
worker (jobs/train_dit.py) calls it with a `Placement` (rank, device, DDP wrapper), a `report`
callback, a resume state and a checkpoint hook: DDP wrapping, reporting and checkpoint hand-off
are the worker's business. Each rank draws its own share of the global batch.
Per step it draws a batch of p-models and applies, in order:
1. classifier augmentation (Tina sec. 3.3): a random order of the prompt and the same permutation
   of the head rows (weight rows and biases);
2. classification-sequence padding: with probability `sub_prompt_p` only the first k < K_max
   classes are kept; the other rows are zero, their class tokens masked and their values left out
   of the loss;
3. unseen-class simulation: with probability `unseen_row_p` one class is treated as unknown (its
   base row is the nearest *other* seen class's row, flag set), which is what held-out classes,
   free text and image prompts look like at generation time;
4. null-prompt dropout with probability `null_prompt_p` (classifier-free guidance, Ho & Salimans
   2022);
then the x0-prediction MSE at a uniform timestep (Ho et al. 2020 with x0 parametrization), AdamW,
linear warm-up + cosine decay, gradient clipping, and an EMA with warm-up
min(decay, (1 + n) / (10 + n)).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tina.backbones import ParamLayout
from tina.conditioning import Conditioner
from tina.config import PipelineConfig
from tina.diffusion import create_diffusion
from tina.dit import build_dit, dit_size
from tina.errors import ConfigError
from tina.generate import FORMAT_VERSION, Generator, Parts
from tina.tokens import ParamNormalizer, ParamTokenizer, ResidualBase, pad_rows
from tina.train_state import TrainState


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up to base_lr over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA with warm-up: d = min(decay, (1 + n) / (10 + n)), as TF's ExponentialMovingAverage."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(d).add_(pm.detach(), alpha=1 - d)


class Batcher:
    """Draws augmented, padded training batches (x0 tokens, model kwargs, loss mask)."""

    def __init__(self, cfg: PipelineConfig, layout: ParamLayout, tokenizer: ParamTokenizer,
                 normalizer: ParamNormalizer, base: ResidualBase, conditioner: Conditioner,
                 zoo_flats: torch.Tensor, zoo_ids: torch.Tensor, residual: bool):
        self.cfg, self.layout, self.tok, self.norm = cfg, layout, tokenizer, normalizer
        self.base, self.cond, self.flats, self.ids, self.residual = (
            base, conditioner, zoo_flats, zoo_ids, residual)
        self.row_index = layout.row_index()  # (K, d+1): where each head row sits in a flat vector

    def __call__(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor, dict, torch.Tensor]:
        tc, kmax = self.cfg.train, self.layout.k
        j = torch.randint(len(self.flats), (b,), generator=gen)
        flat, ids = self.flats[j], self.ids[j]
        if tc.augment:
            perm = torch.argsort(torch.rand(b, kmax, generator=gen), dim=1)
            flat, ids = self.layout.permute_rows(flat, perm), torch.gather(ids, 1, perm)
        k = torch.full((b,), kmax)
        sub = torch.rand(b, generator=gen) < tc.sub_prompt_p
        if kmax > 2:  # a sub-prompt keeps 2 <= k < K_max classes; none exists for K_max <= 2
            k[sub] = torch.randint(2, kmax, (int(sub.sum()),), generator=gen)
        flat = pad_rows(self.layout, flat, k)
        real = torch.arange(kmax)[None] < k[:, None]
        known = torch.where(real, ids, torch.full_like(ids, -1))
        exclude = torch.full_like(ids, -1)
        hide = torch.rand(b, generator=gen) < tc.unseen_row_p
        pos = (torch.rand(b, generator=gen) * k).long()
        rows = torch.arange(b)[hide]
        exclude[rows, pos[hide]] = known[rows, pos[hide]]
        known[rows, pos[hide]] = -1
        c = self.cond.build(self.cond.class_emb[ids.clamp_min(0)], known, k, exclude)
        target = flat - self.base(c.row_source) if self.residual else flat
        x0 = self.tok.tokenize(self.norm.normalize(target, c.flag))
        # loss only on real values of real rows: padded rows are free at sampling time
        mask = self.tok.tokenize(self.layout.row_weights(real, 1.0)) > 0
        null = torch.rand(b, generator=gen) < tc.null_prompt_p
        return x0, {"cond": c.cond, "class_mask": c.class_mask, "null": null}, mask


def fit_targets(cfg: PipelineConfig, layout: ParamLayout, base: ResidualBase,
                conditioner: Conditioner, zoo_flats: torch.Tensor,
                zoo_ids: torch.Tensor) -> ParamNormalizer:
    """Normalization statistics of what is diffused (raw p-models or residuals) over the zoo,
    plus the scale of head rows whose class is treated as unknown (base = nearest other class)."""
    residual = cfg.tokens.parametrization == "residual"
    x = zoo_flats - base(zoo_ids) if residual else zoo_flats
    norm = ParamNormalizer.fit(layout, x, cfg.tokens.normalization)
    norm.row_index = layout.row_index()
    if residual:
        nearest = conditioner.nearest_seen(conditioner.class_emb[zoo_ids], exclude=zoo_ids)
        rows = zoo_flats[:, norm.row_index] - base.rows[nearest]  # (M, K, d+1)
        norm.unseen_std = rows.reshape(-1, rows.shape[-1]).std(0).clamp_min(1e-8)
    return norm


@dataclass
class Placement:
    """Where one training process sits. A plain process is rank 0 of 1 on the CPU; a Ray Train
    worker passes its world rank and size, its device and `ray.train.torch.prepare_model`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] | None = None  # DDP wrapping (moves to the device)

    def batch_size(self, global_batch: int) -> int:
        """This rank's share of the global batch (the first ranks take the remainder)."""
        return global_batch // self.world_size + int(self.rank < global_batch % self.world_size)

    def batch_seed(self, seed: int, resumed_at: int = 0) -> int:
        """Seed of this rank's batch generator: `seed` on rank 0 of a fresh run (the plain
        process's stream); other ranks, and ranks other than 0 after a resume (only rank 0's
        generator state is checkpointed), get their own stream from (seed, rank, step)."""
        if self.rank == 0 and resumed_at == 0:
            return seed
        return (seed * 1_000_003 + self.rank * 7919 + resumed_at) % 2**63


@dataclass
class GeneratorInputs:
    """What `train_generator` trains on (its arguments after `cfg`), built once by the driver
    (tina.pipeline.generator_inputs) and handed to every worker."""

    layout: ParamLayout  # the generated K_max-row model
    generic_flat: torch.Tensor  # (P_generic,) float32
    generic_layout: ParamLayout
    has_row: torch.Tensor  # (N,) bool
    class_emb: torch.Tensor  # (N, D) float32 label-space name embeddings
    zoo_flats: torch.Tensor  # (M, P) float32
    zoo_ids: torch.Tensor  # (M, K_max) int64
    meta: dict[str, Any]  # checkpoint metadata without the generator's own fields


OnCheckpoint = Callable[[TrainState, Callable[[], Generator]], None]


def _full_meta(cfg: PipelineConfig, meta: dict[str, Any], tok: ParamTokenizer,
               conditioner: Conditioner, model: nn.Module) -> dict[str, Any]:
    # copies, not the config objects' own __dict__s: later edits of gen.meta (the val-selected
    # sampler settings) must not change the caller's config
    dit_config = dict(vars(cfg.dit))  # the preset resolved: else its fields show the defaults
    dit_config.update(zip(("width", "depth", "heads"), dit_size(cfg.dit), strict=True))
    return {
        **meta, "format_version": FORMAT_VERSION,
        "tokens": {"chunk_size": cfg.tokens.chunk_size, "head_tokens": cfg.tokens.head_tokens,
                   "parametrization": cfg.tokens.parametrization,
                   "normalization": cfg.tokens.normalization,
                   "n_tokens": tok.n_tokens, "token_len": tok.token_len},
        "dit": {"config": dit_config, "token_lengths": tok.token_lengths,
                "cond_dim": conditioner.dim,
                "n_params": sum(p.numel() for p in model.parameters())},
        "diffusion": dict(vars(cfg.diffusion)),
        "sample": dict(vars(cfg.sample)),
        "train": dict(vars(cfg.train)),
    }


def _is_checkpoint_step(done: int, total: int, every: int) -> bool:
    return done == total or (every > 0 and done % every == 0)


def train_generator(cfg: PipelineConfig, layout: ParamLayout, generic_flat: torch.Tensor,
                    generic_layout: ParamLayout, has_row: torch.Tensor, class_emb: torch.Tensor,
                    zoo_flats: torch.Tensor, zoo_ids: torch.Tensor, meta: dict[str, Any],
                    report: Callable[[int, dict], None] | None = None,
                    progress: bool = True, place: Placement | None = None,
                    resume: TrainState | None = None,
                    on_checkpoint: OnCheckpoint | None = None) -> tuple[Generator, dict]:
    """Train a generator on the zoo (the one loop of a plain process and a Ray Train worker).

    Args:
        layout: layout of the generated K_max-row model.
        generic_flat: (P_generic,) float32 generic model with one row per label-space class.
        has_row: (N,) bool; class_emb: (N, D) float32 label-space name embeddings.
        zoo_flats: (M, P) float32 p-model parameters; zoo_ids: (M, K_max) int64 their classes.
        meta: checkpoint metadata without the generator's own fields (arch, label space, encoder).
        report: called as report(step, metrics) every 50 steps and at the end (every rank).
        place: rank, world size, device and DDP wrapper (default: a plain CPU process). Each
            rank draws its own share of cfg.train.batch_size; bf16 autocast on CUDA.
        resume: a TrainState to continue from at its `step` (weights, EMA, optimizer, RNG, loss).
        on_checkpoint: called as on_checkpoint(state, make_generator) every
            cfg.train.checkpoint_every steps and at the end, on every rank; `state` is valid
            until the next step (save it at once); make_generator() builds a CPU Generator of
            copies of the current raw and EMA weights.
    Returns:
        (Generator, history {"loss": [...] (rank 0's, resumed ones included), "train_s",
        "steps_per_s", "start_step"}).
    Raises:
        ConfigError: val_every is not a multiple of checkpoint_every.
    """
    tc, place = cfg.train, place or Placement()
    if tc.val_every and (not tc.checkpoint_every or tc.val_every % tc.checkpoint_every):
        raise ConfigError(f"train.val_every={tc.val_every} must be a multiple of "
                          f"train.checkpoint_every={tc.checkpoint_every} (val runs at checkpoints)")
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    base = ResidualBase(layout, generic_flat, generic_layout, has_row)
    tok = ParamTokenizer(layout, cfg.tokens.chunk_size, cfg.tokens.head_tokens)
    conditioner = Conditioner(class_emb, has_row, base, layout.k)
    norm = fit_targets(cfg, layout, base, conditioner, zoo_flats, zoo_ids)
    model = build_dit(cfg.dit, tok.token_lengths, conditioner.dim, layout.k)
    ema = copy.deepcopy(model).requires_grad_(False)
    start = resume.step if resume is not None else 0
    if resume is not None:
        model.load_state_dict(resume.dit)
        ema.load_state_dict(resume.ema)
    gen = torch.Generator().manual_seed(place.batch_seed(tc.seed, start))
    if place.rank > 0:  # dropout masks differ between ranks
        torch.manual_seed(place.batch_seed(tc.seed, start))
    elif resume is not None:
        gen.set_state(resume.rng_batch)
        torch.set_rng_state(resume.rng_torch)
    net = place.wrap(model) if place.wrap is not None else model.to(place.device)
    ema.to(place.device)
    diffusion = create_diffusion(cfg.diffusion)
    batcher = Batcher(cfg, layout, tok, norm, base, conditioner, zoo_flats, zoo_ids,
                      cfg.tokens.parametrization == "residual")
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
    full_meta = _full_meta(cfg, meta, tok, conditioner, model)

    def make_generator() -> Generator:
        dit, avg = (copy.deepcopy(m).float().cpu().eval() for m in (model, ema))
        return Generator(Parts(copy.deepcopy(full_meta), dit, avg, norm, generic_flat, has_row,
                               class_emb))

    hist: list[float] = list(resume.loss) if resume is not None else []
    b, dev = place.batch_size(tc.batch_size), place.device
    t0 = time.perf_counter()
    bar = tqdm(range(start, tc.steps), desc="generator", disable=not progress,
               initial=start, total=tc.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc.steps, tc.warmup_steps, tc.lr)
        x0, kwargs, mask = batcher(b, gen)
        t = torch.randint(cfg.diffusion.steps, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen) * batcher.tok.mask
        kwargs = {k: v.to(dev) for k, v in kwargs.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = diffusion.training_loss(net, x0.to(dev), t.to(dev), noise.to(dev), kwargs,
                                           mask.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        ema_update(ema, model, step, tc.ema_decay)
        hist.append(loss.item())
        if step % 50 == 0 or step == tc.steps - 1:
            recent = sum(hist[-50:]) / len(hist[-50:])
            bar.set_postfix(loss=f"{recent:.4f}")
            if report is not None:
                report(step, {"loss": recent, "lr": opt.param_groups[0]["lr"]})
        if on_checkpoint is not None and _is_checkpoint_step(step + 1, tc.steps,
                                                             tc.checkpoint_every):
            on_checkpoint(TrainState(step + 1, model.state_dict(), ema.state_dict(),
                                     opt.state_dict(), gen.get_state(), torch.get_rng_state(),
                                     hist), make_generator)
    train_s = time.perf_counter() - t0
    parts = Parts(full_meta, model.cpu().eval(), ema.cpu().eval(), norm, generic_flat, has_row,
                  class_emb)
    return Generator(parts), {"loss": hist, "train_s": train_s, "start_step": start,
                              "steps_per_s": (tc.steps - start) / max(train_s, 1e-9)}
