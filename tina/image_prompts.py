"""Image prompts: example images -> unit vectors in the text encoder's space (Tina, image prompts).

Tina replaces a class's text embedding by the CLIP image embedding of example images (zero-shot,
few-shot: the mean of n shots). With CLIP weights, `CLIPEncoder.encode_images` is the image tower.
Without them (the offline default encoder has no image tower), `ImagePromptEncoder` maps the frozen
generic model's image features into the text space with a DeViSE map (Frome et al. 2013), trained by
`train_devise` on the seen classes' images against their class-name embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from tina.encoders import check_images
from tina.errors import CheckpointError, PromptError


class ImageEncoder(Protocol):
    """Anything with `encode_images(images: (N, C, H, W) uint8) -> (N, D) float32`."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# DeViSE (Frome et al. 2013)
# ---------------------------------------------------------------------------------------------


class DeViSEImageEncoder(nn.Module):
    """Image features (N, F) float32 -> text space (N, D) float32 unit vectors; a 2-layer MLP.

    DeViSE maps a frozen visual model's features linearly into a frozen text embedding; we use a
    2-layer MLP on standardized features (the mean/std buffers are set by `train_devise`).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.epoch_losses: list[float] = []  # mean training loss per epoch (not saved)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std
        return F.normalize(self.net(x), dim=-1)


def devise_rank_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                     class_embeddings: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """DeViSE hinge rank loss (Frome et al. 2013, sec. 3.3), averaged over the batch.

    loss(v, y) = sum_{j != y} max(0, margin - t_y . v + t_j . v)

    Args:
        embeddings: (N, D) float32 mapped images v.  labels: (N,) int64 into class_embeddings.
        class_embeddings: (C, D) float32 text embeddings t (unit rows).  margin: the paper's 0.1.
    Returns:
        scalar float32.
    """
    scores = embeddings @ class_embeddings.T  # (N, C)
    true = scores.gather(1, labels[:, None])
    hinge = (margin - true + scores).clamp_min(0.0)
    hinge = hinge.scatter(1, labels[:, None], 0.0)  # drop j == y
    return hinge.sum(dim=1).mean()


def train_devise(features: torch.Tensor, labels: torch.Tensor, class_embeddings: torch.Tensor,
                 epochs: int, lr: float, seed: int, margin: float = 0.1,
                 batch_size: int = 512) -> DeViSEImageEncoder:
    """Train a DeViSE map from generic-model image features into the text space.

    Args:
        features: (N, F) float32 from the frozen generic model (e.g. penultimate features
            concatenated with logits).  labels: (N,) int64 indices into class_embeddings.
        class_embeddings: (C, D) float32 text embeddings of the seen classes, C >= 2
            (re-normalized).
        epochs, lr (Adam), seed (init and batch order), margin, batch_size: training settings.
    Returns:
        DeViSEImageEncoder in eval mode, on features' device; `.epoch_losses` holds the
        mean hinge rank loss (Frome et al. 2013, sec. 3.3) of each epoch.
    Raises:
        ValueError: mismatched shapes or labels out of range.
    """
    n, c = features.shape[0], class_embeddings.shape[0]
    if features.ndim != 2 or labels.shape != (n,) or class_embeddings.ndim != 2 or c < 2:
        raise ValueError(f"features (N, F), labels (N,), class_embeddings (C>=2, D) expected; got "
                         f"{tuple(features.shape)}, {tuple(labels.shape)}, "
                         f"{tuple(class_embeddings.shape)}")
    if n == 0 or int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c}) and N > 0")
    features, labels = features.float(), labels.long().to(features.device)
    targets = F.normalize(class_embeddings.float().to(features.device), dim=-1)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = DeViSEImageEncoder(features.shape[1], targets.shape[1]).to(features.device)
    model.feature_mean.copy_(features.mean(0))
    model.feature_std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(epochs), desc="devise", leave=False)
    for _ in bar:
        order, total = torch.randperm(n, generator=gen).to(features.device), 0.0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = devise_rank_loss(model(features[idx]), labels[idx], targets, margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.epoch_losses.append(total / n)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return model.eval()


class ImagePromptEncoder:
    """Image prompts through a feature function + DeViSE map, like CLIP's image tower.

    `feature_fn` takes the uint8 images (N, C, H, W) as given and returns (N, F) features.
    """

    name = "devise"

    def __init__(self, feature_fn: Callable[[torch.Tensor], torch.Tensor],
                 devise: DeViSEImageEncoder, text_encoder_version: str | None = None,
                 batch_size: int = 256) -> None:
        self.feature_fn, self.devise = feature_fn, devise.eval()
        self.text_encoder_version, self.batch_size = text_encoder_version, batch_size
        self.dim = devise.out_dim

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, D) float32 on CPU, L2-normalized. Raises PromptError."""
        check_images(images)
        device = self.devise.feature_mean.device
        out = [torch.zeros(0, self.dim)]
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                feats = self.feature_fn(images[i:i + self.batch_size]).float().to(device)
                out.append(self.devise(feats).to("cpu", torch.float32))
        return torch.cat(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The DeViSE map's tensors (MLP weights, feature mean/std), as saved by `save`."""
        return self.devise.state_dict()

    def save(self, directory: str | Path) -> Path:
        """Write image_encoder.safetensors + image_encoder.json into `directory`; returns it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(d / "image_encoder.safetensors"))
        meta = {"method": "DeViSE (Frome et al. 2013)", "in_dim": self.devise.in_dim,
                "out_dim": self.devise.out_dim, "hidden": self.devise.hidden,
                "text_encoder_version": self.text_encoder_version}
        (d / "image_encoder.json").write_text(json.dumps(meta, indent=2))
        return d

    @classmethod
    def load(cls, directory: str | Path, feature_fn: Callable[[torch.Tensor], torch.Tensor],
             text_encoder_version: str | None = None) -> ImagePromptEncoder:
        """Load what `save` wrote (on CPU).

        Raises:
            CheckpointError: files missing, or saved for another text encoder than
                `text_encoder_version` (when given).
        """
        d = Path(directory)
        if not all((d / f"image_encoder.{ext}").is_file() for ext in ("json", "safetensors")):
            raise CheckpointError(f"no image_encoder.json/.safetensors in {d}; train one with "
                                  "train_devise and save it there")
        meta = json.loads((d / "image_encoder.json").read_text())
        saved_for = meta["text_encoder_version"]
        if text_encoder_version is not None and saved_for != text_encoder_version:
            raise CheckpointError(f"image encoder in {d} maps into {meta['text_encoder_version']!r}"
                                  f", not {text_encoder_version!r}; retrain it for this encoder")
        devise = DeViSEImageEncoder(meta["in_dim"], meta["out_dim"], meta["hidden"])
        devise.load_state_dict(load_file(str(d / "image_encoder.safetensors")))
        return cls(feature_fn, devise, meta["text_encoder_version"])


def encode_prompt_images(encoder: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
    """Few-shot image prompt: the mean of each class's n image embeddings, re-normalized.

    Args:
        encoder: CLIPEncoder or ImagePromptEncoder.  images: (K, n, C, H, W) uint8, class-major.
    Returns:
        (K, D) float32 unit vectors, row k for class k (Tina, image prompts).
    Raises:
        PromptError: not a 5-dim uint8 tensor, or n == 0.
    """
    check_images(images, ndim=5)
    k, n = images.shape[:2]
    if n == 0:
        raise PromptError("each class needs at least one example image")
    emb = encoder.encode_images(images.reshape(k * n, *images.shape[2:]))
    return F.normalize(emb.view(k, n, -1).mean(dim=1), dim=-1)
