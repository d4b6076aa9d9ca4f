"""Accuracy of one or many classifiers on a task's images, in memory-bounded chunks.

Chunks of ~1,024 images keep these small CNNs' activations in cache: measured here, 2,048-4,096
image chunks were 4-8x slower per model on 10k images.
"""

from __future__ import annotations

import torch
from torch import nn

from tina.backbones import ParamLayout, batched_forward
from tina.data import to_float


@torch.no_grad()
def logits_of(module: nn.Module, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """images (N, C, H, W) uint8 -> logits (N, K) float32 of one ready module."""
    module.eval()
    return torch.cat([module(to_float(images[i: i + chunk])) for i in range(0, len(images), chunk)])


@torch.no_grad()
def batched_logits(module: nn.Module, layout: ParamLayout, flats: torch.Tensor,
                   images: torch.Tensor, fixed: dict[str, torch.Tensor] | None = None,
                   chunk: int = 1024) -> torch.Tensor:
    """B flat parameter vectors on the same images.

    Args:
        flats: (B, P) float32; images: (N, C, H, W) uint8.
    Returns:
        logits (B, N, K) float32.
    """
    module.eval()
    outs = [batched_forward(module, layout, flats, to_float(images[i: i + chunk]), fixed)
            for i in range(0, len(images), chunk)]
    return torch.cat(outs, dim=1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (..., N, K), labels (N,) int64 -> accuracy (...,) float32 fraction in [0, 1]."""
    return (logits.argmax(-1) == labels).float().mean(-1)


def per_class_recall(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """logits (..., N, K), labels (N,) -> recall per prompt position (..., K) in [0, 1]."""
    hit = (logits.argmax(-1) == labels).float()
    out = []
    for c in range(k):
        sel = labels == c
        out.append(hit[..., sel].mean(-1) if bool(sel.any())
                   else torch.full(hit.shape[:-1], float("nan")))
    return torch.stack(out, dim=-1)
