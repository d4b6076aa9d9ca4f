"""The generator deployment of the Tina endpoint: batched sampling and a cache of models.

`Generator` replicas hold the checkpoint, gather concurrent requests into one sampler call with
`@serve.batch` (Ray Serve's dynamic batching) and keep an LRU cache of generated models keyed by
(checkpoint id, prompt, seed, sampler, steps, guidance). A prompt's noise depends only on
(seed, prompt) (tina.generate.prompt_seed), so a model is the same alone or in any batch (to float
rounding). `tina.serve` composes it with the HTTP ingress.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import serve

from tina.backbones import build_model
from tina.config import ServeConfig
from tina.errors import CheckpointError, PromptError, TinaError
from tina.tasks import normalize_name

WEIGHTS = "tina.safetensors"


def checkpoint_id(checkpoint: str | Path) -> str:
    """SHA-256 (hex) of the checkpoint's tina.safetensors. Raises CheckpointError when absent."""
    p = Path(checkpoint) / WEIGHTS
    try:
        with open(p, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        raise CheckpointError(f"{p}: checkpoint weights are gone; restore the file or "
                              "redeploy with another checkpoint") from None


# ---------------------------------------------------------------------------------------------
# Generator deployment
# ---------------------------------------------------------------------------------------------

@dataclass
class _Item:
    """One request waiting for a batch: its class tokens and sampler settings."""

    emb: torch.Tensor  # (k, D) float32 class embeddings (names or images)
    known: list[int]  # label-space id of each seen class, -1 otherwise
    seed: int  # prompt_seed(seed, prompt): its own noise, whatever the batch
    opts: tuple[str, int, float]  # (sampler, steps, guidance)


@serve.deployment(name="Generator")
class Generator:
    """Checkpoint -> generated p-models; batches concurrent requests into one sampler call."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from tina.generate import load_generator  # heavy: the prompt encoder

        self.cfg = ServeConfig(**cfg)
        torch.set_num_threads(self.cfg.threads)
        self.gen = load_generator(self.cfg.checkpoint)
        self.checkpoint_id = checkpoint_id(self.cfg.checkpoint)
        self.image_encoder = image_encoder(self.gen, self.cfg)
        self.cache: OrderedDict[str, dict] = OrderedDict()
        self.batch_sizes: Counter[int] = Counter()
        self.cache_hits = self.cache_misses = 0
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    async def ready(self) -> dict[str, Any]:
        """{"ready": True} while the checkpoint file is in place, else {"error", "kind"}."""
        try:
            checkpoint_id(self.cfg.checkpoint)
        except CheckpointError as e:
            return _error(e)
        return {"ready": True}

    async def stats(self) -> dict[str, Any]:
        """This replica's batch-size histogram {size: batches} and cache counters."""
        return {"batch_sizes": dict(self.batch_sizes), "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses, "cache_size": len(self.cache)}

    async def generate(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """A validated prompt -> the generated model's state dict and metadata, or
        {"error": message, "kind": exception class} for a TinaError (returned, not raised: a
        user's mistake is no replica failure and leaves no traceback in the log).

        Args:
            prompt: {"classes": names or None, "examples": K tensors (n_k, C, H, W) uint8 or
                None,
                "seed", "sampler", "steps", "guidance"} (None: the checkpoint's default).
        Returns:
            {"model_id", "classes", "state": {name: tensor}, "arch", "in_channels",
             "checkpoint_id", "seed", "sampler", "steps", "guidance", "cache_hit"}.
        Errors: PromptError for bad sampler settings or image prompts without an image encoder.
        """
        try:
            return await self._generate(prompt)
        except TinaError as e:
            return _error(e)

    async def _generate(self, prompt: dict[str, Any]) -> dict[str, Any]:
        from tina.generate import prompt_seed
        from tina.image_prompts import encode_prompt_images

        g, s = self.gen, self.gen.meta["sample"]
        sampler = prompt["sampler"] or s["sampler"]
        steps = g.diffusion.steps if sampler == "ddpm" else (prompt["steps"] or s["steps"])
        guidance = s["guidance"] if prompt["guidance"] is None else float(prompt["guidance"])
        examples, names = prompt["examples"], prompt["classes"]
        if examples is not None:
            keys = ["image:" + hashlib.sha256(x.numpy().tobytes()).hexdigest()[:24]
                    for x in examples]
            names = names or [f"class {i + 1}" for i in range(len(examples))]
        else:
            keys = [normalize_name(n) for n in names]
            names = [g.label_space.canonical(n) if g._lookup(n) >= 0 else n.strip()
                     for n in names]
        key = json.dumps([self.checkpoint_id, keys, prompt["seed"], sampler, steps, guidance])
        model_id = hashlib.sha256(key.encode()).hexdigest()[:24]
        if key in self.cache:
            self.cache.move_to_end(key)
            self.cache_hits += 1
            return self.cache[key] | {"cache_hit": True, "classes": names}
        if examples is not None:
            if self.image_encoder is None:
                raise PromptError("examples: this checkpoint has no image encoder; pass class "
                                  "names, or train one (tina pipeline writes image_encoder/)")
            emb = torch.cat([encode_prompt_images(self.image_encoder, x[None]) for x in examples])
            known = g.image_known(emb)
        else:
            ids = [g._lookup(n) for n in names]
            emb = g.encoder.encode_text([g.label_space.classes[i] if i >= 0 else n
                                         for i, n in zip(ids, names, strict=True)])
            known = [i if i >= 0 and bool(g.parts.has_row[i]) else -1 for i in ids]
        flat = await self._batched(_Item(emb, known, prompt_seed(prompt["seed"], keys),
                                         (sampler, steps, guidance)))
        if isinstance(flat, Exception):
            raise flat
        self.cache_misses += 1
        model = g.to_module(flat, len(keys))
        out = {"model_id": model_id, "classes": names, "arch": g.meta["arch"]["name"],
               "in_channels": g.in_channels,
               "state": {k: v.contiguous() for k, v in model.state_dict().items()},
               "checkpoint_id": self.checkpoint_id, "seed": prompt["seed"], "sampler": sampler,
               "steps": steps, "guidance": guidance}
        self.cache[key] = out
        while len(self.cache) > self.cfg.cache_size:
            self.cache.popitem(last=False)
        return out | {"cache_hit": False}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)  # reset from the config in init
    async def _batched(self, items: list[_Item]) -> list[torch.Tensor | Exception]:
        self.batch_sizes[len(items)] += 1
        # the sampler runs in a thread so that the event loop keeps gathering the next batch
        return await asyncio.to_thread(self._sample, items)

    def _sample(self, items: list[_Item]) -> list[torch.Tensor | Exception]:
        """One sampler call per distinct (sampler, steps, guidance) in the batch; an error is
        returned to its own requests only."""
        out: list[torch.Tensor | Exception] = [torch.empty(0)] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.opts, []).append(i)
        for (sampler, steps, guidance), idx in groups.items():
            try:
                c = self.gen.embedding_conditioning([items[i].emb for i in idx],
                                                    [items[i].known for i in idx])
                flat = self.gen.sample(c, [items[i].seed for i in idx], sampler=sampler,
                                       steps=steps, guidance=guidance)
                for j, i in enumerate(idx):
                    out[i] = flat[j]
            except TinaError as e:
                for i in idx:
                    out[i] = e
        return out


def _error(e: TinaError) -> dict[str, str]:
    return {"error": str(e), "kind": type(e).__name__}


def image_encoder(gen: Any, cfg: ServeConfig) -> Any:
    """The checkpoint's image-prompt encoder: CLIP's image tower, or the DeViSE map that
    `tina pipeline` wrote to <run>/image_encoder (over the generic model's features, as
    tina.pipeline.stage_image_encoder builds them); None when there is none."""
    from tina.data import to_float
    from tina.image_prompts import ImagePromptEncoder

    if gen.meta["encoder"]["name"] == "clip":
        return gen.encoder
    path = Path(cfg.image_encoder or Path(cfg.checkpoint).parent / "image_encoder")
    if not (path / "image_encoder.json").is_file():
        return None
    p = gen.parts
    generic = build_model(gen.meta["arch"]["name"], gen.in_channels, len(p.has_row))
    generic.load_state_dict(gen.generic_layout.unflatten(p.generic_flat))
    generic.eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = generic.features(to_float(images))
            return torch.cat([f, generic.fc(f)[:, p.has_row]], dim=1)

    return ImagePromptEncoder.load(path, features,
                                   text_encoder_version=gen.meta["encoder"]["version"])
