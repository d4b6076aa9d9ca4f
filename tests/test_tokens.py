"""Specification of tina.tokens: parameter tokens, normalization, residual base, K padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tina.backbones import HEAD_BIAS, HEAD_WEIGHT, ParamLayout, build_model
from tina.errors import ConfigError
from tina.tokens import ParamNormalizer, ParamTokenizer, ResidualBase, pad_rows

LAYOUTS = {
    (arch, ch, k, head_only): ParamLayout(
        build_model(arch, ch, k), [HEAD_WEIGHT, HEAD_BIAS] if head_only else None)
    for arch, ch, k, head_only in [("cnn-400", 1, 10, False), ("cnn-1k", 1, 4, False),
                                   ("cnn-5k", 3, 10, False), ("cnn-1k", 1, 10, True)]
}


def layer_of(layout: ParamLayout, position: int) -> str:
    return next(s.name for s in layout.specs if s.offset <= position < s.offset + s.numel)


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(sorted(LAYOUTS)), chunk=st.integers(1, 700),
       head=st.sampled_from(["rows", "chunks"]), batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_detokenize_inverts_tokenize(key: tuple, chunk: int, head: str, batch: int,
                                     seed: int) -> None:
    layout = LAYOUTS[key]
    tok = ParamTokenizer(layout, chunk, head)
    flat = torch.randn(batch, layout.n_params, generator=torch.Generator().manual_seed(seed))
    tokens = tok.tokenize(flat)
    assert tokens.shape == (batch, tok.n_tokens, tok.token_len)
    assert torch.equal(tok.detokenize(tokens), flat)
    assert not bool(tokens[:, ~tok.mask].any())  # padding is zero


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(sorted(LAYOUTS)), chunk=st.integers(1, 700),
       head=st.sampled_from(["rows", "chunks"]))
def test_tokens_cover_each_value_once_stay_in_one_layer_and_respect_chunk_size(
        key: tuple, chunk: int, head: str) -> None:
    layout = LAYOUTS[key]
    tok = ParamTokenizer(layout, chunk, head)
    covered = torch.cat([tok.index[t][tok.mask[t]] for t in range(tok.n_tokens)])
    assert torch.equal(covered.sort().values, torch.arange(layout.n_params))
    d = layout.feat_dim
    for t, length in enumerate(tok.token_lengths):
        assert int(tok.mask[t].sum()) == length
        positions = tok.index[t, :length].tolist()
        if head == "rows" and t >= tok.n_body_tokens:
            assert length == d + 1  # a row token: weight row + bias, whatever chunk_size is
        else:
            assert length <= chunk
            assert len({layer_of(layout, p) for p in positions}) == 1
    assert tok.token_len == max(tok.token_lengths)


def test_papers_5370_parameter_cnn_is_11_tokens_of_at_most_576() -> None:
    tok = ParamTokenizer(LAYOUTS["cnn-5k", 3, 10, False], 576, "chunks")
    assert tok.n_tokens == 11 and tok.token_len == 576  # Tina sec. 3.2


def test_with_row_tokens_token_n_body_plus_i_holds_exactly_head_row_i() -> None:
    layout = LAYOUTS["cnn-1k", 1, 4, False]
    tok = ParamTokenizer(layout, 100, "rows")
    flat = torch.randn(2, layout.n_params)
    tokens = tok.tokenize(flat)
    assert tok.n_tokens == tok.n_body_tokens + layout.k
    named = layout.unflatten(flat)
    for i in range(layout.k):
        row = torch.cat([named[HEAD_WEIGHT][:, i], named[HEAD_BIAS][:, i, None]], dim=1)
        assert torch.equal(tokens[:, tok.n_body_tokens + i, : layout.feat_dim + 1], row)
    # body tokens hold no head value
    body_positions = tok.index[: tok.n_body_tokens][tok.mask[: tok.n_body_tokens]]
    assert not bool(layout.row_mask()[body_positions].any())


def test_head_only_row_tokens_are_the_whole_sequence() -> None:
    layout = LAYOUTS["cnn-1k", 1, 10, True]
    tok = ParamTokenizer(layout, 576, "rows")
    assert tok.n_body_tokens == 0 and tok.token_lengths == [17] * 10


@pytest.mark.parametrize(("chunk", "head"), [(0, "rows"), (16, "columns")])
def test_bad_tokenizer_settings_are_config_errors(chunk: int, head: str) -> None:
    with pytest.raises(ConfigError):
        ParamTokenizer(LAYOUTS["cnn-400", 1, 10, False], chunk, head)


@pytest.mark.parametrize("mode", ["layer", "global"])
def test_normalizer_round_trips(mode: str) -> None:
    layout = LAYOUTS["cnn-400", 1, 10, False]
    x = torch.randn(20, layout.n_params) * 3 + 1
    norm = ParamNormalizer.fit(layout, x, mode)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x, rtol=1e-5, atol=1e-5)


def test_layer_normalization_standardizes_each_layer_with_its_own_statistics() -> None:
    layout = LAYOUTS["cnn-400", 1, 10, False]
    scales = {s.name: 10.0 ** i for i, s in enumerate(layout.specs)}
    x = torch.cat([torch.randn(30, s.numel) * scales[s.name] + i for i, s in
                   enumerate(layout.specs)], dim=1)
    norm = ParamNormalizer.fit(layout, x, "layer")
    z = norm.normalize(x)
    for s in layout.specs:
        sl = slice(s.offset, s.offset + s.numel)
        # one (mean, std) per layer, the layer's own
        assert torch.all(norm.mean[sl] == norm.mean[s.offset])
        assert torch.all(norm.std[sl] == norm.std[s.offset])
        torch.testing.assert_close(norm.mean[s.offset], x[:, sl].mean())
        torch.testing.assert_close(norm.std[s.offset], x[:, sl].std())
        assert abs(float(z[:, sl].mean())) < 1e-4 and abs(float(z[:, sl].std()) - 1) < 1e-4


def test_global_normalization_uses_one_mean_and_scale() -> None:
    layout = LAYOUTS["cnn-400", 1, 10, False]
    x = torch.randn(10, layout.n_params) * 2
    norm = ParamNormalizer.fit(layout, x, "global")
    assert torch.all(norm.mean == x.mean()) and torch.all(norm.std == x.std())


def test_normalizer_never_divides_by_zero_on_a_constant_layer() -> None:
    layout = LAYOUTS["cnn-400", 1, 10, False]
    x = torch.randn(5, layout.n_params)
    x[:, :36] = 0.5  # the first conv is identical in every model
    z = ParamNormalizer.fit(layout, x, "layer").normalize(x)
    assert torch.isfinite(z).all()


def test_unknown_normalization_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="normalization"):
        ParamNormalizer.fit(LAYOUTS["cnn-400", 1, 10, False], torch.zeros(2, 414), "batch")


def make_generic(n: int = 6, seed: int = 0) -> tuple[torch.nn.Module, ParamLayout, torch.Tensor]:
    torch.manual_seed(seed)
    generic = build_model("cnn-400", 1, n)
    has_row = torch.ones(n, dtype=torch.bool)
    has_row[2] = False
    with torch.no_grad():
        generic.fc.weight[2] = 0
        generic.fc.bias[2] = 0
    return generic, ParamLayout(generic), has_row


def test_residual_base_has_generic_body_and_generic_rows_in_prompt_order() -> None:
    generic, glayout, has_row = make_generic()
    layout = ParamLayout(build_model("cnn-400", 1, 4))
    gflat = glayout.flatten({k: v.detach() for k, v in generic.named_parameters()})
    base = ResidualBase(layout, gflat, glayout, has_row)
    row_source = torch.tensor([[5, 0, 3, -1], [1, -1, -1, -1]])
    out = layout.unflatten(base(row_source))
    for name, value in generic.named_parameters():
        if not name.startswith("fc."):
            assert torch.equal(out[name], value.detach().expand_as(out[name]))
    for b in range(2):
        for i, c in enumerate(row_source[b].tolist()):
            if c >= 0:
                assert torch.equal(out[HEAD_WEIGHT][b, i], generic.fc.weight[c].detach())
                assert out[HEAD_BIAS][b, i] == generic.fc.bias[c]
            else:  # -1: no generic row, a zero row
                assert not bool(out[HEAD_WEIGHT][b, i].any()) and out[HEAD_BIAS][b, i] == 0


def test_residual_base_of_a_head_only_layout_is_rows_only() -> None:
    generic, glayout, has_row = make_generic()
    layout = ParamLayout(build_model("cnn-400", 1, 3), [HEAD_WEIGHT, HEAD_BIAS])
    gflat = glayout.flatten({k: v.detach() for k, v in generic.named_parameters()})
    out = ResidualBase(layout, gflat, glayout, has_row)(torch.tensor([[4, 1, 0]]))
    expect = torch.cat([generic.fc.weight[[4, 1, 0]].detach().reshape(-1),
                        generic.fc.bias[[4, 1, 0]].detach()])
    assert torch.equal(out[0], expect)


def test_pad_rows_zeroes_rows_from_k_on_and_nothing_else() -> None:
    layout = ParamLayout(build_model("cnn-400", 1, 5))
    flat = torch.randn(3, layout.n_params)
    original = flat.clone()
    k = torch.tensor([5, 2, 3])
    out = layout.unflatten(pad_rows(layout, flat, k))
    inp = layout.unflatten(flat)
    for name in inp:
        if not name.startswith("fc."):
            assert torch.equal(out[name], inp[name])
    for b, kb in enumerate(k.tolist()):
        assert torch.equal(out[HEAD_WEIGHT][b, :kb], inp[HEAD_WEIGHT][b, :kb])
        assert torch.equal(out[HEAD_BIAS][b, :kb], inp[HEAD_BIAS][b, :kb])
        assert not bool(out[HEAD_WEIGHT][b, kb:].any()) and not bool(out[HEAD_BIAS][b, kb:].any())
    assert torch.equal(flat, original)  # the input itself is not edited


def test_flagged_rows_use_their_own_scale_and_round_trip():
    layout = ParamLayout(build_model("cnn-400", 1, 4))
    x = torch.randn(6, layout.n_params)
    norm = ParamNormalizer.fit(layout, x, "layer")
    norm.row_index = layout.row_index()
    norm.unseen_std = torch.full((layout.feat_dim + 1,), 10.0)
    flagged = torch.zeros(6, 4, dtype=torch.bool)
    flagged[0, 2] = True
    z = norm.normalize(x, flagged)
    row = layout.row_index()[2]
    assert torch.allclose(z[0, row], x[0, row] / 10.0)
    assert torch.allclose(z[1], norm.normalize(x[1:2])[0])  # unflagged rows: the usual scale
    assert torch.allclose(norm.denormalize(z, flagged), x, atol=1e-5)
