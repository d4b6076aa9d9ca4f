"""Specification of tina.stacked: B generated CNNs computed as one stacked network."""

from __future__ import annotations

import pytest
import torch

from tina.backbones import ARCHS, build_model
from tina.stacked import StackedCNN


def models(arch: str, b: int, in_channels: int = 1, k: int = 5) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [build_model(arch, in_channels, k) for _ in range(b)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 13)])
def test_logits_and_gradients_equal_each_models_own(arch: str, in_channels: int,
                                                    size: int) -> None:
    ms = models(arch, 3, in_channels)
    x = torch.randn(3, 4, in_channels, size, size)  # model b sees its own images x[b]
    net = StackedCNN(ms)
    out = net(x)
    want = torch.stack([m(x[b]) for b, m in enumerate(ms)])
    assert out.shape == (3, 4, 5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn(3, 4, 5)  # a loss that weighs every logit differently
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    convs = [[p for p in m.body.parameters()] for m in ms]
    for j, w in enumerate(net.convs):
        got = w.grad.view(3, *convs[0][j].shape)
        torch.testing.assert_close(got, torch.stack([c[j].grad for c in convs]),
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.fc_weight.grad, torch.stack([m.fc.weight.grad for m in ms]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.fc_bias.grad, torch.stack([m.fc.bias.grad for m in ms]),
                               rtol=1e-4, atol=1e-5)


def test_load_into_writes_each_models_own_parameters_back() -> None:
    ms = models("cnn-400", 2)
    net = StackedCNN(ms)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.arange(2.0).view(2, *[1] * (p.dim() - 1)))  # model b: + b
    fresh = models("cnn-400", 2)
    net.load_into(fresh)
    for b in range(2):
        for p, q in zip(ms[b].parameters(), fresh[b].parameters(), strict=True):
            torch.testing.assert_close(q, p + b)


def test_models_of_different_shapes_or_none_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        StackedCNN([])
    with pytest.raises(ValueError, match="one shape"):
        StackedCNN([build_model("cnn-400", 1, 5), build_model("cnn-400", 1, 4)])
