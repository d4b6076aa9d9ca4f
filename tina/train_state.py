"""The generator's resumable training state, in safetensors + JSON (no pickle).

A state directory holds `state.safetensors` (denoiser weights `dit.*`, EMA weights `ema.*`,
optimizer tensors `opt.<param index>.<name>`, RNG states `rng.*` as uint8) and `state.json`
(format, the next step to run, the optimizer's param groups, the loss history). Written by
`tina.train.train_generator` at checkpoint steps and read back to resume at `step`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tina.errors import CheckpointError

STATE_FORMAT = "tina-train-state/1"


@dataclass
class TrainState:
    """Everything a training loop needs to continue exactly where it stopped."""

    step: int  # the next step to run (= steps done)
    dit: dict[str, torch.Tensor]  # raw denoiser state_dict
    ema: dict[str, torch.Tensor]  # EMA denoiser state_dict
    optimizer: dict[str, Any]  # torch optimizer state_dict ({"state": {i: {...}}, "param_groups"})
    rng_batch: torch.Tensor  # (n,) uint8 state of the batch generator of rank 0
    rng_torch: torch.Tensor  # (n,) uint8 torch global RNG state (dropout)
    loss: list[float] = field(default_factory=list)  # per-step training loss of rank 0

    def save(self, out: str | Path) -> Path:
        """Write state.safetensors + state.json into directory `out` (atomic renames)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"dit.{k}": v for k, v in self.dit.items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.items()}
        for i, st in self.optimizer["state"].items():
            for name, v in st.items():
                # AdamW keeps `step` as a tensor; a plain number would still round-trip as one
                tensors[f"opt.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors |= {"rng.batch": self.rng_batch, "rng.torch": self.rng_torch}
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        tmp = out / "state.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})
        os.replace(tmp, out / "state.safetensors")
        meta = {"format": STATE_FORMAT, "step": self.step,
                "param_groups": self.optimizer["param_groups"], "loss": self.loss}
        (out / "state.json.tmp").write_text(json.dumps(meta))
        os.replace(out / "state.json.tmp", out / "state.json")
        return out

    @classmethod
    def load(cls, path: str | Path) -> TrainState:
        """Read a state directory. Raises CheckpointError: missing, or of another format."""
        path = Path(path)
        meta_p, t_p = path / "state.json", path / "state.safetensors"
        if not meta_p.is_file() or not t_p.is_file():
            raise CheckpointError(f"{path}: no state.json + state.safetensors here; pass a "
                                  "training-state directory written by jobs.train_dit")
        meta = json.loads(meta_p.read_text())
        if meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: training-state format {meta.get('format')!r} is not "
                                  f"{STATE_FORMAT!r}; start the run afresh")
        t = load_file(str(t_p))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in t.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = v
        return cls(step=int(meta["step"]),
                   dit={k[4:]: v for k, v in t.items() if k.startswith("dit.")},
                   ema={k[4:]: v for k, v in t.items() if k.startswith("ema.")},
                   optimizer={"state": opt_state, "param_groups": meta["param_groups"]},
                   rng_batch=t["rng.batch"], rng_torch=t["rng.torch"], loss=list(meta["loss"]))
