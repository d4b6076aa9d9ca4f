"""The generated architectures and the flat-vector <-> module round trip.

Tina generates every parameter of a small CNN (conv -> conv -> global average pool -> linear, convs
without bias; Tina sec. 4 / its code), or only the linear head on a frozen body. A p-model's
parameters travel as one flat float32 vector in `named_parameters()` order; `ParamLayout` maps that
vector to named tensors and back, and `batched_forward` runs B parameter vectors on the same images
with `torch.func.functional_call` under `torch.func.vmap` (no state dicts copied by hand).

Parameter counts for 1-channel 28x28 inputs and K=10 (3-channel counts in brackets):
    cnn-400  conv 1->4 s2, 4->8 s2                       414   (the capacity-limited probe CNN)
    cnn-1k   conv 1->8 s2, 8->16 s2                    1,394   (offline default)
    cnn-5k   conv 1->16 s2, 16->32                     5,082   [5,370: the paper's CNN]
    cnn-14k  conv 1->16 s2, 16->32, 32->32            14,298   [14,586: paper's 14.6k variant]
    cnn-33k  + 32->64                                 33,050   [33,338: paper's 33k variant]
    cnn-76k  conv 1->32 s2, 32->32, 32->32 s2, ->64, ->64
                                                      74,666   [75,242: nearest to paper's 76k]
The paper gives only rounded counts for its scaling variants; these layouts are the nearest
conv-conv-...-pool-linear stacks, and every artifact records the exact count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from tina.errors import ConfigError

HEAD_WEIGHT = "fc.weight"
HEAD_BIAS = "fc.bias"


@dataclass(frozen=True)
class CNNSpec:
    """Conv widths and strides of one generated CNN (3x3 kernels, padding 1, no bias, ReLU)."""

    widths: tuple[int, ...]
    strides: tuple[int, ...]


ARCHS: dict[str, CNNSpec] = {
    # cnn-200 gains more from fine-tuning than cnn-400 but its generic model is far weaker
    # (seed 0, 30 epochs: 16-class val 0.62 vs 0.73; README, "Fine-tuning gain")
    "cnn-200": CNNSpec((4, 4), (2, 2)),
    "cnn-400": CNNSpec((4, 8), (2, 2)),
    "cnn-1k": CNNSpec((8, 16), (2, 2)),
    "cnn-5k": CNNSpec((16, 32), (2, 1)),
    "cnn-14k": CNNSpec((16, 32, 32), (2, 1, 1)),
    "cnn-33k": CNNSpec((16, 32, 32, 64), (2, 1, 1, 1)),
    "cnn-76k": CNNSpec((32, 32, 32, 64, 64), (2, 1, 2, 1, 1)),
}


class SmallCNN(nn.Module):
    """conv(-conv)* -> global average pool -> linear head with K rows (one per prompt class)."""

    def __init__(self, spec: CNNSpec, in_channels: int, k: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w, s in zip(spec.widths, spec.strides, strict=True):
            layers += [nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, k)
        self.feat_dim = c

    def convs(self) -> list[nn.Conv2d]:
        """The conv layers in order (in `body`, each is followed by its ReLU)."""
        return [m for m in self.body if isinstance(m, nn.Conv2d)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) float32 -> pooled features (N, feat_dim) float32."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) float32 -> logits (N, K) float32."""
        return self.fc(self.features(x))


def build_model(arch: str, in_channels: int, k: int) -> SmallCNN:
    """Build a generated architecture by registry name.

    Raises:
        ConfigError: unknown architecture name (the message lists the known ones).
    """
    if arch not in ARCHS:
        raise ConfigError(f"arch.name: unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    return SmallCNN(ARCHS[arch], in_channels, k)


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor inside the flat vector: values [offset, offset + numel)."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class ParamLayout:
    """Order, shapes and offsets of the generated parameters of one module.

    `names` selects which parameters are generated (all of them, or only the head); the rest stay
    fixed and are passed to `batched_forward` separately.
    """

    def __init__(self, module: nn.Module, names: list[str] | None = None):
        params = dict(module.named_parameters())
        names = list(params) if names is None else names
        specs, offset = [], 0
        for n in names:
            shape = tuple(params[n].shape)
            specs.append(ParamSpec(n, shape, offset))
            offset += specs[-1].numel
        self.specs: list[ParamSpec] = specs
        self.n_params: int = offset
        self.k: int = params[HEAD_WEIGHT].shape[0]
        self.feat_dim: int = params[HEAD_WEIGHT].shape[1]

    def spec(self, name: str) -> ParamSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in self.specs]

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Named tensors (each (B, *shape) or (*shape)) -> flat (B, P) or (P,) float32."""
        first = tensors[self.specs[0].name]
        batched = first.dim() == len(self.specs[0].shape) + 1
        lead = (first.shape[0],) if batched else ()
        return torch.cat([tensors[s.name].reshape(*lead, -1) for s in self.specs], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """flat (B, P) or (P,) -> {name: (B, *shape) or (*shape)} views into `flat`."""
        if flat.shape[-1] != self.n_params:
            raise ValueError(f"flat vector has {flat.shape[-1]} values, layout needs "
                             f"{self.n_params}")
        lead = flat.shape[:-1]
        return {s.name: flat[..., s.offset: s.offset + s.numel].reshape(*lead, *s.shape)
                for s in self.specs}

    def row_index(self) -> torch.Tensor:
        """(K, feat_dim + 1) int64: flat positions of head row i (its weight row, then its bias).

        Gathering `flat[:, row_index()[perm]]` permutes the classifier's rows, which is how the
        classifier augmentation (Tina sec. 3.3) and prompt-order gathers act on flat vectors.
        """
        w, b = self.spec(HEAD_WEIGHT), self.spec(HEAD_BIAS)
        rows = torch.arange(self.k)[:, None]
        wi = w.offset + rows * self.feat_dim + torch.arange(self.feat_dim)[None, :]
        bi = b.offset + rows
        return torch.cat([wi, bi], dim=1)

    def row_mask(self) -> torch.Tensor:
        """(P,) bool: True where a value belongs to a head row."""
        m = torch.zeros(self.n_params, dtype=torch.bool)
        m[self.row_index().reshape(-1)] = True
        return m

    def row_weights(self, per_row: torch.Tensor, rest: float) -> torch.Tensor:
        """Per-value weights from per-row ones: per_row (B, K) float -> (B, P) float32, row i's
        value on every value of head row i, `rest` on every other parameter."""
        idx = self.row_index()  # (K, d+1)
        w = torch.full((per_row.shape[0], self.n_params), float(rest))
        w[:, idx.reshape(-1)] = per_row.float()[..., None].expand(-1, -1, idx.shape[1]).reshape(
            per_row.shape[0], -1)
        return w

    def permute_rows(self, flat: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Reorder head rows: flat (B, P), perm (B, K) int64 -> (B, P); row i <- old row perm[i]."""
        idx = self.row_index()  # (K, d+1)
        out = flat.clone()
        src = idx[perm]  # (B, K, d+1)
        out[:, idx.reshape(-1)] = torch.gather(flat, 1, src.reshape(flat.shape[0], -1))
        return out


def batched_forward(module: nn.Module, layout: ParamLayout, flat: torch.Tensor, x: torch.Tensor,
                    fixed: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Run B parameter vectors on the same images.

    Args:
        module: a model of the layout's architecture (its own weights are not used for the
            generated names).
        flat: (B, P) float32 generated parameters.
        x: (N, C, H, W) float32 images, shared by all B models.
        fixed: parameters not generated (head-only mode: the frozen body), shared by all B.
    Returns:
        logits (B, N, K) float32.
    """
    params = layout.unflatten(flat)
    fixed = fixed or {}

    def one(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(module, {**fixed, **p}, (x,))

    return vmap(one)(params)


def load_flat(module: nn.Module, layout: ParamLayout, flat: torch.Tensor) -> nn.Module:
    """Write one flat vector (P,) into `module` in place and return it (ready to call)."""
    module.load_state_dict(layout.unflatten(flat.detach().clone()), strict=False)
    return module
