"""Class tokens for the denoiser: one per prompt class, in prompt order, padded to K_max.

Each class token's features are [prompt embedding (D) | unknown flag (1) | base row (d+1)]:
- the embedding of the class name (or of example images, or a description) from the prompt
  encoder, one class at a time with no template (Tina sec. 3.2);
- the flag is 1 when the class has no generic row (a held-out class, free text): its base row is
  then the generic row of the nearest seen class name by cosine similarity (an image prompt is
  taken for its nearest seen class instead, unflagged: `Generator.image_known`);
- the base row itself, standardized, so the network knows what its residual is added to.
Rows [k, K_max) are padding: zero features and masked out of attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tina.tokens import ResidualBase


@dataclass
class Conditioning:
    """A batch of prompts ready for the denoiser and the residual base."""

    cond: torch.Tensor  # (B, K_max, E) float32 class-token features
    class_mask: torch.Tensor  # (B, K_max) bool, True = real class
    # (B, K_max) int64 label-space id whose generic row is the base; -1: none
    row_source: torch.Tensor
    k: torch.Tensor  # (B,) int64 classes per prompt
    flag: torch.Tensor  # (B, K_max) bool, True = real class without a generic row of its own


class Conditioner:
    """Builds `Conditioning` from prompt embeddings and what is known of each class.

    Args:
        class_emb: (N, D) float32 unit embeddings of the label-space class names.
        has_row: (N,) bool, True where the generic model has a row for the class.
        base: the residual base (its generic rows give the base-row features).
        k_max: classes per prompt at most.
    """

    def __init__(self, class_emb: torch.Tensor, has_row: torch.Tensor, base: ResidualBase,
                 k_max: int):
        self.class_emb, self.has_row, self.base, self.k_max = class_emb, has_row, base, k_max
        rows = base.rows[has_row]
        self.row_mean, self.row_std = rows.mean(0), rows.std(0).clamp_min(1e-6)
        self.dim = class_emb.shape[1] + 1 + base.rows.shape[1]

    def nearest_seen(self, emb: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """emb (..., D) unit vectors -> (...,) int64 id of the most similar seen class name.

        `exclude` (...,) int64 ids to skip (training pretends that class is unseen); -1 = none.
        """
        sim = emb @ self.class_emb.T  # (..., N)
        sim = sim.masked_fill(~self.has_row, float("-inf"))
        if exclude is not None:
            hit = F.one_hot(exclude.clamp_min(0), sim.shape[-1]).bool() & (exclude >= 0)[..., None]
            sim = sim.masked_fill(hit, float("-inf"))
        return sim.argmax(-1)

    def build(self, emb: torch.Tensor, known: torch.Tensor, k: torch.Tensor,
              exclude: torch.Tensor | None = None) -> Conditioning:
        """Assemble class tokens.

        Args:
            emb: (B, K_max, D) float32 prompt embeddings (padding rows ignored).
            known: (B, K_max) int64 label-space id when the prompt class is a seen class whose
                generic row may be used, else -1 (unseen, free text, image prompt, padding).
            k: (B,) int64 real classes per prompt.
            exclude: (B, K_max) int64 ids the nearest-seen lookup must skip, or None.
        """
        b, kmax, _ = emb.shape
        real = torch.arange(kmax)[None, :] < k[:, None]
        nearest = self.nearest_seen(emb, exclude)
        row_source = torch.where(known >= 0, known, nearest)
        row_source = torch.where(real, row_source, torch.full_like(row_source, -1))
        unknown = real & (known < 0)
        flag = unknown.float()[..., None]
        rows = self.base.rows[row_source.clamp_min(0)]
        rows = (rows - self.row_mean) / self.row_std * real[..., None]
        cond = torch.cat([emb * real[..., None], flag, rows], dim=-1)
        return Conditioning(cond=cond, class_mask=real, row_source=row_source, k=k,
                            flag=unknown)
