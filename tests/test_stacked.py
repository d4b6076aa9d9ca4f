"""Specification of tina.stacked: B generated CNNs computed as one stacked network."""

from __future__ import annotations

import pytest
import torch

from tina.backbones import ARCHS, build_model
from tina.stacked import StackedCNN, frozen_input


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


@pytest.mark.parametrize("arch", ["cnn-400", "cnn-14k"])
def test_a_network_after_frozen_convs_computes_the_rest_of_each_model(arch: str) -> None:
    n_convs = len(ARCHS[arch].widths)
    for first in range(1, n_convs + 1):
        ms = models(arch, 2)
        with torch.no_grad():  # the frozen convs are every model's
            for m in ms[1:]:
                for a, b in zip(m.body[: 2 * first].parameters(),
                                ms[0].body[: 2 * first].parameters(), strict=True):
                    a.copy_(b)
        x = torch.randn(2, 3, 1, 28, 28)
        net = StackedCNN(ms, first)
        assert len(net.convs) == n_convs - first
        out = net(torch.stack([frozen_input(ms[0], first, x[b]) for b in range(2)]))
        torch.testing.assert_close(out, torch.stack([m(x[b]) for b, m in enumerate(ms)]),
                                   rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            net.fc_bias.add_(1.0)
        net.load_into(ms)
        assert torch.equal(ms[1].fc.bias, net.fc_bias[1])
    with pytest.raises(ValueError, match="first=0"):
        frozen_input(ms[0], 0, x[0])
    with pytest.raises(ValueError, match=f"first={n_convs + 1}"):
        StackedCNN(ms, n_convs + 1)


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
