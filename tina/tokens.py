"""What the generator diffuses: parameter tokens, normalization, residual base, K padding.

- Tokenization (Tina sec. 3.2): each layer is cut into chunks of at most `chunk_size` values, never
  crossing a layer boundary. With `head_tokens="rows"` the classifier head instead becomes one
  token per row (weight row + bias), so head-row token i and class token i describe the same class.
  Tokens are zero-padded to a common length L; `mask` marks the real values.
- Parametrization: "raw" diffuses the p-model itself; "residual" diffuses the p-model minus a
  *base*: the generic model with its head rows gathered in prompt order (G.pt diffuses relative to
  the starting parameters, Peebles et al. 2022 sec. 3). A prompt class without a generic row takes
  the row of the nearest seen class name and is flagged.
- Normalization: per-layer standardization (or one global scale) with statistics from the zoo,
  stored in the generator checkpoint.
- Classification-sequence padding: a prompt with k < K_max classes uses head rows [0, k); rows
  [k, K_max) are zero in both target and base and their class tokens are masked.
"""

from __future__ import annotations

import torch

from tina.backbones import ParamLayout
from tina.errors import ConfigError


class ParamTokenizer:
    """Flat parameter vectors (B, P) <-> padded tokens (B, T, L) through one gather index."""

    def __init__(self, layout: ParamLayout, chunk_size: int = 576, head_tokens: str = "rows"):
        if head_tokens not in ("rows", "chunks"):
            raise ConfigError(f"tokens.head_tokens: {head_tokens!r} is not 'rows' or 'chunks'")
        if chunk_size < 1:
            raise ConfigError(f"tokens.chunk_size: {chunk_size} < 1")
        groups: list[torch.Tensor] = []
        row_mask = layout.row_mask()
        for s in layout.specs:
            pos = torch.arange(s.offset, s.offset + s.numel)
            if head_tokens == "rows" and bool(row_mask[pos].all()):
                continue  # head values become row tokens below
            groups += list(torch.split(pos, chunk_size))
        self.n_body_tokens = len(groups)
        if head_tokens == "rows":
            groups += list(layout.row_index())
        self.head_tokens = head_tokens
        self.token_lengths: list[int] = [len(g) for g in groups]
        self.n_tokens = len(groups)
        self.token_len = max(self.token_lengths)
        index = torch.zeros(self.n_tokens, self.token_len, dtype=torch.long)
        mask = torch.zeros(self.n_tokens, self.token_len, dtype=torch.bool)
        for i, g in enumerate(groups):
            index[i, : len(g)] = g
            mask[i, : len(g)] = True
        self.index, self.mask = index, mask
        self.n_params = layout.n_params

    def tokenize(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (B, P) float32 -> tokens (B, T, L) float32, zero where `mask` is False."""
        return flat[:, self.index] * self.mask

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, L) float32 -> flat (B, P) float32 (padding ignored)."""
        out = tokens.new_zeros(tokens.shape[0], self.n_params)
        out[:, self.index[self.mask]] = tokens[:, self.mask]
        return out


class ParamNormalizer:
    """Standardize flat vectors: per-value mean/std expanded from per-layer (or global) stats.

    Head rows of *unknown* classes (flagged: their base is another class's row) are scaled
    separately by `unseen_std` (d+1,): their residuals are many times larger than fine-tuning
    residuals, and on the ordinary scale they dominated the training loss (measured: final loss
    ~74 vs ~0.2 without them, on a gently fine-tuned zoo).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor,
                 row_index: torch.Tensor | None = None, unseen_std: torch.Tensor | None = None):
        self.mean, self.std = mean, std  # (P,) float32 each
        self.row_index = row_index  # (K, d+1) int64 flat positions of head rows
        self.unseen_std = unseen_std  # (d+1,) float32, or None: flagged rows use the usual scale

    @classmethod
    def fit(cls, layout: ParamLayout, x: torch.Tensor, mode: str = "layer") -> ParamNormalizer:
        """Fit on x (M, P) float32 (zoo targets). mode "layer" or "global".

        Raises:
            ConfigError: unknown mode.
        """
        mean = torch.zeros(layout.n_params)
        std = torch.ones(layout.n_params)
        if mode == "global":
            mean[:] = x.mean()
            std[:] = x.std().clamp_min(1e-8)
        elif mode == "layer":
            for s in layout.specs:
                v = x[:, s.offset: s.offset + s.numel]
                mean[s.offset: s.offset + s.numel] = v.mean()
                std[s.offset: s.offset + s.numel] = v.std().clamp_min(1e-8)
        else:
            raise ConfigError(f"tokens.normalization: {mode!r} is not 'layer' or 'global'")
        return cls(mean, std)

    def normalize(self, x: torch.Tensor, flagged: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, P) -> (B, P) standardized; flagged (B, K) bool rows use `unseen_std`."""
        z = (x - self.mean) / self.std
        return self._rows(z, x, flagged, lambda v: v / self.unseen_std)

    def denormalize(self, z: torch.Tensor, flagged: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, P) standardized -> (B, P) parameter units; flagged (B, K) as in `normalize`."""
        x = z * self.std + self.mean
        return self._rows(x, z, flagged, lambda v: v * self.unseen_std)

    def _rows(self, out: torch.Tensor, src: torch.Tensor, flagged: torch.Tensor | None,
              fn) -> torch.Tensor:
        if flagged is None or self.unseen_std is None or not bool(flagged.any()):
            return out
        b, k = flagged.shape
        idx = self.row_index.reshape(-1)
        rows = out[:, idx].reshape(b, k, -1)
        swapped = fn(src[:, idx].reshape(b, k, -1))
        out = out.clone()
        out[:, idx] = torch.where(flagged[..., None], swapped, rows).reshape(b, -1)
        return out


class ResidualBase:
    """The base a residual is taken against: generic body + generic head rows in prompt order.

    Args:
        layout: layout of the generated model (K = K_max rows).
        generic_flat: (P_generic,) float32 flat generic model in the layout of a model with one row
            per label-space class (N rows); rows of classes it was not trained on are zero.
        generic_layout: that model's layout.
        has_row: (N,) bool, True where the generic model was trained on the class.
    """

    def __init__(self, layout: ParamLayout, generic_flat: torch.Tensor,
                 generic_layout: ParamLayout, has_row: torch.Tensor):
        self.layout = layout
        self.has_row = has_row
        g = generic_layout.unflatten(generic_flat)
        body = {s.name: g[s.name] for s in layout.specs if s.name in g}
        self.rows = generic_flat[generic_layout.row_index()]  # (N, d+1)
        template = torch.zeros(layout.n_params)
        self.row_index = layout.row_index()  # (K, d+1)
        rm = layout.row_mask()
        for s in layout.specs:
            if not bool(rm[s.offset: s.offset + s.numel].all()):
                template[s.offset: s.offset + s.numel] = body[s.name].reshape(-1)
        self.template = template  # body values, zero head

    def __call__(self, row_source: torch.Tensor) -> torch.Tensor:
        """row_source (B, K) int64 label-space ids whose generic rows fill head rows; -1: zero row.

        Returns the base (B, P) float32.
        """
        b = row_source.shape[0]
        out = self.template.expand(b, -1).clone()
        rows = self.rows[row_source.clamp_min(0)] * (row_source >= 0)[..., None]
        out[:, self.row_index.reshape(-1)] = rows.reshape(b, -1)
        return out


def pad_rows(layout: ParamLayout, flat: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Zero head rows [k_b, K_max) of each flat vector: flat (B, P), k (B,) int64 -> (B, P)."""
    keep = torch.arange(layout.k)[None, :] < k[:, None]  # (B, K)
    return flat * layout.row_weights(keep, 1.0)
