"""Prompt(s) -> parameters -> ready `nn.Module`s, and the generator checkpoint format.

A checkpoint is a directory with `tina.safetensors` (denoiser weights `dit.*`, EMA weights `ema.*`,
normalization statistics, the generic model the residual is taken against, the label-space name
embeddings) and `tina.json` (format version and everything needed to rebuild and sample:
architecture and token layout, diffusion schedule, encoder name and version, label space, K_max,
default sampler, training config, git commit). Generation never reads the zoo.

Seeding: prompt b's noise comes from its own generator seeded by `prompt_seed(seed_b, prompt_b)`,
so a model is the same whether generated alone or in any batch position.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tina.backbones import HEAD_BIAS, HEAD_WEIGHT, ParamLayout, SmallCNN, build_model
from tina.conditioning import Conditioner, Conditioning
from tina.config import DiffusionConfig, DiTConfig, EncoderConfig
from tina.diffusion import GaussianDiffusion, PerSampleNoise, create_diffusion
from tina.dit import TinaDiT, build_dit
from tina.errors import CheckpointError, PromptError
from tina.tasks import LabelSpace, normalize_name, validate_prompt
from tina.tokens import ParamNormalizer, ParamTokenizer, ResidualBase, pad_rows

FORMAT_VERSION = 1


def prompt_seed(seed: int, prompt: list[str]) -> int:
    """A 63-bit seed that depends only on (seed, normalized prompt)."""
    key = f"{seed}|" + "|".join(normalize_name(n) for n in prompt)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


@dataclass
class Parts:
    """Everything a Generator is made of (built by training or read from a checkpoint)."""

    meta: dict[str, Any]
    dit: TinaDiT
    ema: TinaDiT
    normalizer: ParamNormalizer
    generic_flat: torch.Tensor  # (P_generic,) float32 generic model, one row per label-space class
    has_row: torch.Tensor  # (N,) bool
    class_emb: torch.Tensor  # (N, D) float32 label-space name embeddings


class Generator:
    """Samples p-model parameters for prompts. Build with `from_checkpoint` or from training."""

    def __init__(self, parts: Parts, encoder: Any = None):
        self.parts, self.meta, self.encoder = parts, parts.meta, encoder
        a = self.meta["arch"]
        self.k_max, self.in_channels = a["k_max"], a["in_channels"]
        self.template: SmallCNN = build_model(a["name"], self.in_channels, self.k_max)
        names = [HEAD_WEIGHT, HEAD_BIAS] if a["head_only"] else None
        self.layout = ParamLayout(self.template, names)
        parts.normalizer.row_index = self.layout.row_index()
        generic = build_model(a["name"], self.in_channels, len(parts.has_row))
        self.generic_layout = ParamLayout(generic)
        self.fixed: dict[str, torch.Tensor] = {}
        if a["head_only"]:
            g = self.generic_layout.unflatten(parts.generic_flat)
            self.fixed = {k: v for k, v in g.items() if not k.startswith("fc.")}
        t = self.meta["tokens"]
        self.tokenizer = ParamTokenizer(self.layout, t["chunk_size"], t["head_tokens"])
        self.residual = t["parametrization"] == "residual"
        self.base = ResidualBase(self.layout, parts.generic_flat, self.generic_layout,
                                 parts.has_row)
        self.conditioner = Conditioner(parts.class_emb, parts.has_row, self.base, self.k_max)
        self.diffusion: GaussianDiffusion = create_diffusion_from_meta(self.meta)
        self.label_space = LabelSpace(self.meta["label_space"]["classes"],
                                      self.meta["label_space"]["held_out"])

    # ------------------------------------------------------------------ checkpoint
    def save(self, out: str | Path) -> Path:
        """Write tina.safetensors + tina.json into directory `out`; return it."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        p = self.parts
        tensors = {f"dit.{k}": v for k, v in p.dit.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in p.ema.state_dict().items()}
        if p.normalizer.unseen_std is not None:
            tensors["norm.unseen_std"] = p.normalizer.unseen_std
        tensors |= {"norm.mean": p.normalizer.mean, "norm.std": p.normalizer.std,
                    "generic.flat": p.generic_flat, "generic.has_row": p.has_row.to(torch.uint8),
                    "class_emb": p.class_emb}
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(out / "tina.safetensors"), metadata={"format": "tina"})
        (out / "tina.json").write_text(json.dumps(self.meta, indent=2))
        return out

    @classmethod
    def from_checkpoint(cls, path: str | Path, encoder: Any = None,
                        expect: dict[str, Any] | None = None) -> Generator:
        """Load a checkpoint directory.

        Args:
            encoder: the prompt encoder to use; its name and version must match the checkpoint's.
            expect: optional {"dataset", "arch", "encoder"} the caller's config requires.
        Raises:
            CheckpointError: missing or damaged files, unknown format version, or a mismatched
                encoder, label space or architecture (the message names both sides).
        """
        path = Path(path)
        meta_p, w_p = path / "tina.json", path / "tina.safetensors"
        if not meta_p.is_file() or not w_p.is_file():
            raise CheckpointError(f"{path}: no tina.json + tina.safetensors here; pass the "
                                  "generator directory written by `tina pipeline` "
                                  "(e.g. runs/demo/generator)")
        try:
            meta = json.loads(meta_p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_p} is not valid JSON ({e}): the checkpoint is damaged; "
                                  "copy it again or retrain") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {meta.get('format_version')} is not "
                                  f"{FORMAT_VERSION}; regenerate it with this version of tina")
        for key, have in (expect or {}).items():
            want = {"dataset": meta["label_space"]["dataset"], "arch": meta["arch"]["name"],
                    "encoder": meta["encoder"]["name"]}[key]
            if have is not None and have != want:
                raise CheckpointError(f"checkpoint {path} was made with {key} {want!r}, but the "
                                      f"config asks for {have!r}; use a matching checkpoint")
        if encoder is not None and (encoder.name, encoder.version) != (
                meta["encoder"]["name"], meta["encoder"]["version"]):
            raise CheckpointError(
                f"checkpoint {path} was made with encoder {meta['encoder']['name']} "
                f"({meta['encoder']['version']}), not {encoder.name} ({encoder.version})")
        try:
            t = load_file(str(w_p))
        except SafetensorError as e:
            raise CheckpointError(f"{w_p} is not a readable safetensors file ({e}): the "
                                  "checkpoint is damaged; copy it again or retrain") from e
        dit, ema = build_dit_from_meta(meta), build_dit_from_meta(meta)
        dit.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("dit.")})
        ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        parts = Parts(meta, dit.eval(), ema.eval(), ParamNormalizer(
                          t["norm.mean"], t["norm.std"], unseen_std=t.get("norm.unseen_std")),
                      t["generic.flat"], t["generic.has_row"].bool(), t["class_emb"])
        gen = cls(parts, encoder)
        if gen.layout.n_params != meta["arch"]["n_params"]:
            raise CheckpointError(f"{path}: architecture {meta['arch']['name']} now has "
                                  f"{gen.layout.n_params} parameters, the checkpoint "
                                  f"{meta['arch']['n_params']}")
        return gen

    # ------------------------------------------------------------------ prompts
    def text_conditioning(self, prompts: list[list[str]]) -> Conditioning:
        """Class-name (or description) prompts -> Conditioning. Raises PromptError."""
        if self.encoder is None:
            raise PromptError("this generator has no prompt encoder; load it with one")
        embs, known = [], []
        for names in prompts:
            names = validate_prompt(names, self.k_max)
            ids = [self._lookup(n) for n in names]
            texts = [self.label_space.classes[i] if i >= 0 else n for i, n in zip(ids, names,
                                                                             strict=True)]
            embs.append(self.encoder.encode_text(texts))
            known.append([i if i >= 0 and bool(self.parts.has_row[i]) else -1 for i in ids])
        return self.embedding_conditioning(embs, known)

    def embedding_conditioning(self, embs: list[torch.Tensor],
                               known: list[list[int]]) -> Conditioning:
        """Per-prompt embeddings [(k_b, D)] and known seen ids [[id or -1]] -> Conditioning."""
        b, d = len(embs), embs[0].shape[1]
        if any(len(e) > self.k_max for e in embs):
            raise PromptError(f"classes: more than K_max {self.k_max}")
        emb = torch.zeros(b, self.k_max, d)
        kn = torch.full((b, self.k_max), -1, dtype=torch.long)
        for i, (e, k) in enumerate(zip(embs, known, strict=True)):
            emb[i, : len(e)] = e
            kn[i, : len(k)] = torch.tensor(k, dtype=torch.long)
        ks = torch.tensor([len(e) for e in embs])
        return self.conditioner.build(emb, kn, ks)

    def image_known(self, emb: torch.Tensor) -> list[int]:
        """Image-prompt embeddings (k, D) unit vectors -> the seen class id each one is taken for.

        An example image's class is the seen class whose name embedding is nearest (zero-shot
        classification in the text space, as DeViSE and CLIP do), and its generic row is the base,
        as for that class's name. Flagging image prompts as classes without a row (the held-out
        treatment, which training teaches with the nearest *other* class's row as base) made every
        image-prompted model move away from the right row: 0.18-0.27 on the demo's image splits
        against 0.62-0.77 for naming each class with the generic model (24dbfb2, seeds 1-2);
        taken for the nearest seen class, 0.65-0.79 against 0.62-0.77 (c8d707b, seeds 0-2).

        Returns:
            k int label-space ids, each one with a generic row (never a held-out class).
        """
        return self.conditioner.nearest_seen(emb).tolist()

    def _lookup(self, name: str) -> int:
        try:
            return self.label_space.index(name)
        except PromptError:
            return -1  # free text or a class outside the label space: conditioned on its text

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, c: Conditioning, seeds: list[int], sampler: str | None = None,
               steps: int | None = None, guidance: float | None = None,
               use_ema: bool | None = None, null: bool = False,
               residual_scale: float | None = None) -> torch.Tensor:
        """One batched sampler call from N(0, I).

        Args:
            c: B prompts' conditioning. seeds: B per-prompt seeds (already prompt-specific).
            sampler: "ddim" or "ddpm" (default: the checkpoint's); steps: DDIM steps;
            guidance: classifier-free guidance scale (1 = none); null: sample with the null
                prompt and no generic rows (the `unconditional` sanity check).
            residual_scale: a in generic + a * residual (`interpolate_residual`); default the
                checkpoint's (val-selected), 1 = the sample itself.
        Returns:
            flat (B, P) float32 parameters of K_max-row models; rows [k_b, K_max) are zero.
        Raises:
            PromptError: bad steps, guidance or residual_scale.
        """
        s = self.meta["sample"]
        sampler = sampler or s["sampler"]
        steps = s["steps"] if steps is None else steps
        guidance = s["guidance"] if guidance is None else guidance
        if not 1 <= steps <= self.diffusion.steps:
            raise PromptError(f"steps: {steps} is outside [1, {self.diffusion.steps}]")
        if not math.isfinite(guidance) or guidance < 0:
            raise PromptError(f"guidance: {guidance} must be a finite number >= 0 (1 = none)")
        scale = s.get("residual_scale", 1.0) if residual_scale is None else residual_scale
        if not 0 <= scale <= 1 or (scale != 1 and not self.residual):
            raise PromptError(f"residual_scale: {scale} must be in [0, 1] (and 1 for a "
                              "generator of raw parameters)")
        net = self.parts.ema if (s["use_ema"] if use_ema is None else use_ema) else self.parts.dit
        b = len(seeds)
        shape = (self.tokenizer.n_tokens, self.tokenizer.token_len)
        noise = PerSampleNoise(seeds, shape, self.tokenizer.mask)
        kwargs = {"cond": c.cond, "class_mask": c.class_mask,
                  "null": torch.full((b,), null, dtype=torch.bool)}
        if sampler == "ddpm":
            x0 = self.diffusion.ddpm_sample(net, noise.initial(), noise.step, kwargs, guidance)
        elif sampler == "ddim":
            x0 = self.diffusion.ddim_sample(net, noise.initial(), steps, kwargs,
                                            guidance=guidance)
        else:
            raise PromptError(f"sampler: {sampler!r} is not 'ddim' or 'ddpm'")
        flat = self.parts.normalizer.denormalize(self.tokenizer.detokenize(x0), c.flag)
        if self.residual:
            rs = torch.full_like(c.row_source, -1) if null else c.row_source
            flat = interpolate_residual(self.layout, flat, c.flag, scale) + self.base(rs)
        return pad_rows(self.layout, flat, c.k)

    def to_module(self, flat: torch.Tensor, k: int) -> SmallCNN:
        """flat (P,) K_max-row parameters -> a ready k-row module (eval mode)."""
        p = self.layout.unflatten(flat)
        model = build_model(self.meta["arch"]["name"], self.in_channels, k)
        state = {**self.fixed, **p, HEAD_WEIGHT: p[HEAD_WEIGHT][:k], HEAD_BIAS: p[HEAD_BIAS][:k]}
        model.load_state_dict({n: v.clone() for n, v in state.items()})
        return model.eval()

    def generate(self, prompts: list[list[str]], seeds: list[int] | None = None,
                 **sample_kwargs: Any) -> list[nn.Module]:
        """Class-name prompts -> ready modules (output i = prompt class i), one sampler call.

        Raises:
            PromptError: empty prompt, more than K_max classes, duplicate names.
        """
        seeds = seeds or [0] * len(prompts)
        if len(seeds) != len(prompts):
            raise PromptError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts")
        c = self.text_conditioning(prompts)
        eff = [prompt_seed(s, p) for s, p in zip(seeds, prompts, strict=True)]
        flat = self.sample(c, eff, **sample_kwargs)
        return [self.to_module(f, int(k)) for f, k in zip(flat, c.k, strict=True)]


def load_generator(path: str | Path) -> Generator:
    """Load a checkpoint with the prompt encoder its `tina.json` names (built from the same
    encoder config, so the version check in `from_checkpoint` passes only for the same weights).

    Raises:
        CheckpointError: see `Generator.from_checkpoint`.
        WeightsNotFoundError: the encoder's weights are not on this machine.
    """
    from tina.encoders import build_encoder  # the encoder stack is heavy; load it on demand

    meta_p = Path(path) / "tina.json"
    if not meta_p.is_file():
        raise CheckpointError(f"{path}: no tina.json here; pass the generator directory "
                              "(e.g. runs/demo/generator)")
    enc_cfg = EncoderConfig(**json.loads(meta_p.read_text())["config"]["encoder"])
    return Generator.from_checkpoint(path, build_encoder(enc_cfg))


def interpolate_residual(layout: ParamLayout, residual: torch.Tensor, flag: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """`scale` * residual, except on the head rows of flagged classes (kept whole).

    Adding it to the residual base gives (1 - a) * base + a * sample: WiSE-FT's weight-space
    interpolation between the starting model and the fine-tuned one (Wortsman et al. 2022, eq. 1),
    with the generic model as the start of every p-model. A class without a generic row has a
    neighbour's row as its base, which is no model of that class to fall back on.
    Args:
        residual: (B, P) float32; flag: (B, K_max) bool, True = class without a generic row.
    Returns:
        (B, P) float32.
    """
    if scale == 1.0:
        return residual
    return residual * layout.row_weights(torch.where(flag, 1.0, scale), scale)


def create_diffusion_from_meta(meta: dict[str, Any]) -> GaussianDiffusion:
    """The diffusion process a checkpoint was trained with."""
    return create_diffusion(DiffusionConfig(**meta["diffusion"]))


def build_dit_from_meta(meta: dict[str, Any]) -> TinaDiT:
    """An untrained denoiser of a checkpoint's architecture."""
    d = meta["dit"]
    return build_dit(DiTConfig(**d["config"]), d["token_lengths"], d["cond_dim"],
                     meta["arch"]["k_max"])
