"""Specification of tina.backbones: the generated CNNs and the flat-vector <-> module round trip."""

from __future__ import annotations

import pytest
import torch

from tina.backbones import (
    ARCHS,
    HEAD_BIAS,
    HEAD_WEIGHT,
    ParamLayout,
    batched_forward,
    build_model,
    load_flat,
)
from tina.errors import ConfigError

# the paper's CNN is 5,370 parameters at 3 channels and K=10 (Tina sec. 4); the rest are ours
PARAM_COUNTS = {
    ("cnn-200", 1): 230, ("cnn-200", 3): 302,
    ("cnn-400", 1): 414, ("cnn-400", 3): 486,
    ("cnn-1k", 1): 1_394, ("cnn-1k", 3): 1_538,
    ("cnn-5k", 1): 5_082, ("cnn-5k", 3): 5_370,
    ("cnn-14k", 1): 14_298, ("cnn-14k", 3): 14_586,
    ("cnn-33k", 1): 33_050, ("cnn-33k", 3): 33_338,
    ("cnn-76k", 1): 74_666, ("cnn-76k", 3): 75_242,
}


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def test_every_registered_architecture_has_a_pinned_parameter_count() -> None:
    assert {a for a, _ in PARAM_COUNTS} == set(ARCHS)


@pytest.mark.parametrize(("arch", "channels"), sorted(PARAM_COUNTS))
def test_parameter_count_at_k10_is_exact(arch: str, channels: int) -> None:
    model = build_model(arch, channels, 10)
    layout = ParamLayout(model)
    assert layout.n_params == PARAM_COUNTS[arch, channels]
    assert layout.n_params == sum(p.numel() for p in model.parameters())


def test_convolutions_have_no_bias_and_the_head_has_one_row_per_class() -> None:
    model = build_model("cnn-5k", 3, 7)
    assert all(not n.endswith("bias") for n, _ in model.body.named_parameters())
    assert model.fc.weight.shape == (7, 32) and model.fc.bias.shape == (7,)
    x = torch.rand(5, 3, 32, 32)
    assert model(x).shape == (5, 7) and model.features(x).shape == (5, 32)


def test_unknown_architecture_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="cnn-1k"):
        build_model("resnet-9000", 1, 10)


@pytest.mark.parametrize("arch", ["cnn-400", "cnn-1k", "cnn-5k"])
def test_flatten_then_unflatten_gives_back_the_same_tensors(arch: str) -> None:
    model = build_model(arch, 1, 10)
    layout = ParamLayout(model)
    named = params_of(model)
    flat = layout.flatten(named)
    assert flat.shape == (layout.n_params,)
    back = layout.unflatten(flat)
    assert list(back) == list(named)  # named_parameters() order
    for name, value in named.items():
        assert torch.equal(back[name], value)
    # batched: B stacked models
    batch = {k: torch.stack([v, 2 * v, -v]) for k, v in named.items()}
    flats = layout.flatten(batch)
    assert flats.shape == (3, layout.n_params)
    assert torch.equal(flats[1], 2 * flat)
    for name, value in layout.unflatten(flats).items():
        assert torch.equal(value, batch[name])


def test_offsets_tile_the_flat_vector_without_gaps() -> None:
    layout = ParamLayout(build_model("cnn-1k", 1, 10))
    end = 0
    for s in layout.specs:
        assert s.offset == end
        end += s.numel
    assert end == layout.n_params
    assert [d["name"] for d in layout.to_json()] == [s.name for s in layout.specs]


def test_unflatten_rejects_a_vector_of_the_wrong_length() -> None:
    layout = ParamLayout(build_model("cnn-400", 1, 10))
    with pytest.raises(ValueError, match="414"):
        layout.unflatten(torch.zeros(413))


def test_load_flat_then_forward_equals_batched_forward() -> None:
    torch.manual_seed(0)
    model = build_model("cnn-1k", 1, 10)
    layout = ParamLayout(model)
    flat = torch.randn(layout.n_params) * 0.3
    x = torch.rand(6, 1, 28, 28)
    target = load_flat(build_model("cnn-1k", 1, 10), layout, flat)
    for name, value in layout.unflatten(flat).items():
        assert torch.equal(dict(target.named_parameters())[name].detach(), value)
    expect = target(x)
    got = batched_forward(model, layout, flat[None], x)
    assert got.shape == (1, 6, 10)
    torch.testing.assert_close(got[0], expect, rtol=1e-5, atol=1e-5)


def test_load_flat_copies_so_later_edits_of_the_vector_do_not_leak_in() -> None:
    layout = ParamLayout(build_model("cnn-400", 1, 10))
    flat = torch.randn(layout.n_params)
    model = load_flat(build_model("cnn-400", 1, 10), layout, flat)
    before = model.fc.bias.detach().clone()
    flat.zero_()
    assert torch.equal(model.fc.bias.detach(), before)


def test_batched_forward_of_b_vectors_equals_b_separate_module_calls() -> None:
    torch.manual_seed(1)
    template = build_model("cnn-400", 1, 10)
    layout = ParamLayout(template)
    flats = torch.randn(4, layout.n_params) * 0.5
    x = torch.rand(5, 1, 28, 28)
    got = batched_forward(template, layout, flats, x)
    assert got.shape == (4, 5, 10)
    for b in range(4):
        one = load_flat(build_model("cnn-400", 1, 10), layout, flats[b])
        torch.testing.assert_close(got[b], one(x), rtol=1e-5, atol=1e-5)
    # the template's own weights play no part
    assert not torch.allclose(got[0], template(x))


def test_head_only_layout_runs_generated_heads_on_the_fixed_body() -> None:
    torch.manual_seed(2)
    body_model = build_model("cnn-400", 1, 10)
    layout = ParamLayout(body_model, [HEAD_WEIGHT, HEAD_BIAS])
    assert layout.n_params == 8 * 10 + 10
    fixed = {k: v for k, v in params_of(body_model).items() if not k.startswith("fc.")}
    heads = torch.randn(3, layout.n_params)
    x = torch.rand(4, 1, 28, 28)
    got = batched_forward(body_model, layout, heads, x, fixed)
    feats = body_model.features(x)
    for b in range(3):
        h = layout.unflatten(heads[b])
        torch.testing.assert_close(got[b], feats @ h[HEAD_WEIGHT].T + h[HEAD_BIAS],
                                   rtol=1e-5, atol=1e-5)


def test_row_index_addresses_weight_row_then_bias_of_each_class() -> None:
    layout = ParamLayout(build_model("cnn-400", 1, 10))
    flat = torch.arange(layout.n_params, dtype=torch.float32)
    named = layout.unflatten(flat)
    idx = layout.row_index()
    assert idx.shape == (10, 9)
    for i in range(10):
        assert torch.equal(flat[idx[i, :8]], named[HEAD_WEIGHT][i])
        assert flat[idx[i, 8]] == named[HEAD_BIAS][i]
    mask = layout.row_mask()
    assert int(mask.sum()) == 90 and bool(mask[-90:].all()) and not bool(mask[:-90].any())


def test_permute_rows_permutes_logit_columns_and_keeps_the_prompt_row_pairing() -> None:
    torch.manual_seed(3)
    template = build_model("cnn-1k", 1, 10)
    layout = ParamLayout(template)
    flats = torch.randn(2, layout.n_params) * 0.5
    perms = torch.stack([torch.randperm(10), torch.randperm(10)])
    x = torch.rand(7, 1, 28, 28)
    before = batched_forward(template, layout, flats, x)
    after = batched_forward(template, layout, layout.permute_rows(flats, perms), x)
    for b in range(2):
        # column i is the old column perm[i] ...
        torch.testing.assert_close(after[b], before[b][:, perms[b]], rtol=1e-5, atol=1e-5)
        # ... so a prompt permuted the same way still names each column's class
        prompt = [f"class {c}" for c in range(10)]
        permuted_prompt = [prompt[int(p)] for p in perms[b]]
        for i, name in enumerate(permuted_prompt):
            torch.testing.assert_close(after[b][:, i], before[b][:, prompt.index(name)],
                                       rtol=1e-5, atol=1e-5)
    # the body is untouched
    body = ~layout.row_mask()
    assert torch.equal(layout.permute_rows(flats, perms)[:, body], flats[:, body])
