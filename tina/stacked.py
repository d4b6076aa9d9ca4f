"""B generated CNNs of one architecture run as one network, to fine-tune many p-models at once.

PyTorch's CPU convolutions cost far more than their arithmetic on the generated CNNs (1-16
channels, 3x3 kernels): most of a fine-tuning step goes to oneDNN's convolution backward. Here
every conv is an im2col into (B, C*9, Ho*Wo*N) and one batched matmul, with activations laid out
(B, C, H, W, N): the image axis innermost, so each of the nine shifted windows is a copy of
contiguous runs of N values and the B models share every op. Measured by bench/finetune_speed.py
(one thread, the demo's cnn-400 recipe): see bench/results/finetune_speed.json.

The function computed is exactly `SmallCNN.forward` of each model (tests/test_stacked.py compares
logits and gradients); only the order of float additions differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tina.backbones import SmallCNN


def _window(t: torch.Tensor, k: int, stride: int, ho: int, wo: int) -> torch.Tensor:
    """View of window offset k (ky, kx = divmod(k, 3)) of a padded (B, C, H+2, W+2, N) tensor."""
    ky, kx = divmod(k, 3)
    return t[:, :, ky: ky + stride * (ho - 1) + 1: stride, kx: kx + stride * (wo - 1) + 1: stride]


class _Im2col(torch.autograd.Function):
    """(B, C, H, W, N) -> (B, C*9, Ho*Wo*N) for 3x3 windows, padding 1 and the given stride.

    Rows are in (c, ky, kx) order, the order of a Conv2d weight's flattened (C, 3, 3) dims. The
    backward adds the nine windows' gradients into one buffer (autograd's own slice backward
    would allocate and zero a full-size tensor per window).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: int) -> torch.Tensor:
        b, c, h, w, n = x.shape
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        xp = F.pad(x, (0, 0, 1, 1, 1, 1))
        cols = x.new_empty(b, c, 9, ho, wo, n)
        for k in range(9):
            cols[:, :, k] = _window(xp, k, stride, ho, wo)
        ctx.meta = (x.shape, stride, ho, wo)
        return cols.view(b, c * 9, ho * wo * n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (b, c, h, w, n), stride, ho, wo = ctx.meta
        grad = grad.reshape(b, c, 9, ho, wo, n)
        gp = grad.new_zeros(b, c, h + 2, w + 2, n)
        for k in range(9):
            _window(gp, k, stride, ho, wo).add_(grad[:, :, k])
        return gp[:, :, 1:-1, 1:-1], None


class StackedCNN(nn.Module):
    """B `SmallCNN`s of one architecture as one module with stacked parameters.

    Parameters: `convs[j]` (B, C_out, C_in*9) float32 (conv `first + j`'s weight flattened per
    model), `fc_weight` (B, K, D), `fc_bias` (B, K). `load_into` writes them back into B
    SmallCNNs. With `first` > 0 the models' first `first` convs are shared and frozen (not
    parameters here) and the input is `frozen_input` of the images: computed once per image
    (`tina.zoo`), not once per step, and already in the layout conv `first` multiplies.

    Raises:
        ValueError: no models, models of different shapes, `first` outside [0, number of convs],
            or a conv that is not 3x3 with padding 1 and no bias (the only convs
            `tina.backbones` builds).
    """

    def __init__(self, models: Sequence[SmallCNN], first: int = 0):
        super().__init__()
        if not models:
            raise ValueError("StackedCNN needs at least one model")
        shapes = {tuple(p.shape for p in m.parameters()) for m in models}
        if len(shapes) != 1:
            raise ValueError(f"StackedCNN needs models of one shape, got {len(shapes)} shapes")
        convs = models[0].convs()
        if not 0 <= first <= len(convs):
            raise ValueError(f"first={first}: the models have {len(convs)} convs")
        convs = convs[first:]
        for c in convs:
            if c.kernel_size != (3, 3) or c.padding != (1, 1) or c.bias is not None:
                raise ValueError(f"StackedCNN supports 3x3 convs with padding 1, no bias: {c}")
        self.first, self.strides = first, [c.stride[0] for c in convs]
        with torch.no_grad():
            self.convs = nn.ParameterList(
                nn.Parameter(torch.stack([self._conv_weights(m)[j].flatten(1) for m in models]))
                for j in range(first, first + len(convs)))
            self.fc_weight = nn.Parameter(torch.stack([m.fc.weight for m in models]).clone())
            self.fc_bias = nn.Parameter(torch.stack([m.fc.bias for m in models]).clone())

    @staticmethod
    def _conv_weights(model: SmallCNN) -> list[torch.Tensor]:
        return [c.weight for c in model.convs()]

    def logits_kn(self, x: torch.Tensor) -> torch.Tensor:
        """Model b's inputs in x[b] -> logits (B, K, N) float32.

        x: images (B, N, C, H, W) float32 if `first` is 0, else `frozen_input` of them stacked:
        (B, N, C', H', W') or, past the last conv, (B, N, D).
        """
        b, n = x.shape[:2]
        if self.first and not len(self.convs):
            return torch.baddbmm(self.fc_bias[:, :, None], self.fc_weight, x.transpose(1, 2))
        h = x.reshape(b, n, -1).transpose(1, 2).reshape(b, *x.shape[2:], n)  # (B, C, H, W, N)
        for w, s in zip(self.convs, self.strides, strict=True):
            cols = _Im2col.apply(h, s)
            ho, wo = (h.shape[2] - 1) // s + 1, (h.shape[3] - 1) // s + 1
            h = torch.relu(torch.bmm(w, cols)).view(b, w.shape[1], ho, wo, n)
        feats = h.mean(dim=(2, 3))  # (B, D, N)
        return torch.baddbmm(self.fc_bias[:, :, None], self.fc_weight, feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x as in `logits_kn` -> logits (B, N, K) float32 (a transposed view)."""
        return self.logits_kn(x).transpose(1, 2)

    @torch.no_grad()
    def load_into(self, models: Sequence[SmallCNN]) -> None:
        """Copy model b's stacked parameters into models[b] (B models of the stacked shape)."""
        for b, m in enumerate(models):
            for w, target in zip(self.convs, self._conv_weights(m)[self.first:], strict=True):
                target.copy_(w[b].view_as(target))
            m.fc.weight.copy_(self.fc_weight[b])
            m.fc.bias.copy_(self.fc_bias[b])


@torch.no_grad()
def frozen_input(model: SmallCNN, first: int, x: torch.Tensor) -> torch.Tensor:
    """What `StackedCNN(models, first)` takes for images x (N, C, H, W) float32 when `model`'s
    first `first` convs are every model's: their conv+ReLU output (N, C', H', W') float32, or,
    when `first` is the number of convs, the pooled features (N, D) float32.

    (Precomputing conv `first`'s 3x3 windows instead was slower: for a stride-2 conv a batch's
    windows are 2.25x the bytes to gather, 17-19 against 13-14 us per p-model image for cnn-400.)

    Raises:
        ValueError: `first` is 0 (the input is then the images) or past the last conv.
    """
    convs = model.convs()
    if not 0 < first <= len(convs):
        raise ValueError(f"first={first}: use 1..{len(convs)}")
    h = model.body[: 2 * first](x)  # (Conv2d, ReLU) pairs
    return h.mean(dim=(2, 3)) if first == len(convs) else h
