"""Random-init open_clip weights on disk, so CLIP code paths run in tests without any download.

`write_tiny_clip_config(dir)` writes a small open_clip architecture as a JSON config (usable as
`encoder.clip_model`); `save_random_clip(path, model_name)` saves a seeded random model's weights
in the real formats open_clip loads (`.safetensors`, else `torch.save` of the state dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tina.encoders import resolve_clip_model_name

# ~1.8M parameters (mostly the 49408-token embedding the real tokenizer needs); builds in < 0.1 s
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_CLIP_NAME = "tina-tiny-clip"


def write_tiny_clip_config(directory: str | Path) -> Path:
    """Write `<directory>/tina-tiny-clip.json` (open_clip model config format); return its path."""
    path = Path(directory) / f"{TINY_CLIP_NAME}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    return path


def save_random_clip(path: str | Path, model_name: str, seed: int = 0) -> Path:
    """Save a seeded random-init open_clip model's state dict to `path`; return `path`.

    Args:
        path: `.safetensors` (safetensors) or anything else (`torch.save` of the state dict).
        model_name: an open_clip model name (e.g. "ViT-B-32") or a JSON config path.
    """
    import open_clip

    name = resolve_clip_model_name(str(model_name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
