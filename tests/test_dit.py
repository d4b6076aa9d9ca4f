"""Specification of tina.dit: the Tina denoiser network."""

from __future__ import annotations

import pytest
import torch

from tina.config import DiTConfig
from tina.diffusion import GaussianDiffusion
from tina.dit import PRESETS, TinaDiT, build_dit
from tina.errors import ConfigError

LENGTHS = [5, 7, 3]  # T = 3 tokens, L = 7
K_MAX, E, B = 4, 6, 3


def _mask() -> torch.Tensor:
    return torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]


def _model(conditioning: str = "tokens", seed: int = 0) -> TinaDiT:
    torch.manual_seed(seed)
    model = TinaDiT(LENGTHS, E, K_MAX, width=32, depth=2, heads=4, conditioning=conditioning)
    # give the zero-initialized decoders / adaLN layers values, as after training
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return model.eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, len(LENGTHS), max(LENGTHS), generator=g) * _mask()
    t = torch.tensor([0, 500, 999])
    cond = torch.randn(B, K_MAX, E, generator=g)
    class_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    return x, t, cond, class_mask


@pytest.mark.parametrize("conditioning", ["tokens", "adaln"])
def test_forward_returns_x0_shaped_float32_tokens(conditioning: str) -> None:
    model = _model(conditioning)
    out = model(*_inputs())
    assert out.shape == (B, len(LENGTHS), max(LENGTHS))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("conditioning", ["tokens", "adaln"])
def test_output_beyond_each_token_length_is_exactly_zero(conditioning: str) -> None:
    out = _model(conditioning)(*_inputs())
    assert torch.all(out[:, ~_mask()] == 0)
    assert torch.all(out[:, _mask()] != 0)


def test_padded_input_columns_do_not_change_the_output() -> None:
    model = _model()
    x, t, cond, cm = _inputs()
    junk = x + 100.0 * (~_mask()).float()
    assert torch.equal(model(x, t, cond, cm), model(junk, t, cond, cm))


@pytest.mark.parametrize("conditioning", ["tokens", "adaln"])
def test_padded_class_tokens_do_not_change_the_output(conditioning: str) -> None:
    model = _model(conditioning)
    x, t, cond, cm = _inputs()
    ref = model(x, t, cond, cm)
    perturbed = cond.clone()
    perturbed[~cm] = torch.randn(int((~cm).sum()), E) * 50
    torch.testing.assert_close(model(x, t, perturbed, cm), ref, rtol=0, atol=0)


def test_padded_class_slots_are_never_attended_to() -> None:
    # changing a padded slot's positional embedding changes its token, not the result
    model = _model()
    x, t, cond, cm = _inputs()
    slot = len(LENGTHS) + 3
    cm[:, 3] = False  # class slot 3 is padding in every row of the batch
    ref = model(x, t, cond, cm)
    with torch.no_grad():
        model.pos_embed[0, slot] += 10.0
    torch.testing.assert_close(model(x, t, cond, cm), ref, rtol=0, atol=1e-6)
    cm[0, 3] = True  # once real, the same slot does change row 0
    assert not torch.allclose(model(x, t, cond, cm)[0], ref[0])


@pytest.mark.parametrize("conditioning", ["tokens", "adaln"])
def test_output_depends_on_class_tokens_and_timestep(conditioning: str) -> None:
    model = _model(conditioning)
    x, t, cond, cm = _inputs()
    ref = model(x, t, cond, cm)
    assert not torch.allclose(model(x, t, cond + 1.0, cm), ref)
    assert not torch.allclose(model(x, t.flip(0), cond, cm), ref)


@pytest.mark.parametrize("conditioning", ["tokens", "adaln"])
def test_null_prompt_makes_the_output_independent_of_cond(conditioning: str) -> None:
    model = _model(conditioning)
    x, t, cond, cm = _inputs()
    null = torch.tensor([True, False, True])
    a = model(x, t, cond, cm, null=null)
    b = model(x, t, torch.randn_like(cond), cm, null=null)
    assert torch.equal(a[null], b[null])
    assert not torch.allclose(a[~null], b[~null])
    # null=False everywhere is the conditional model
    assert torch.equal(model(x, t, cond, cm, null=torch.zeros(B, dtype=torch.bool)),
                       model(x, t, cond, cm))


def test_rows_of_a_batch_are_independent() -> None:
    model = _model()
    x, t, cond, cm = _inputs()
    full = model(x, t, cond, cm)
    single = model(x[1:2], t[1:2], cond[1:2], cm[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conditioning", ["tokens", "adaln"])
def test_fresh_model_predicts_zero_as_dit_zero_init(conditioning: str) -> None:
    model = TinaDiT(LENGTHS, E, K_MAX, width=32, depth=2, heads=4, conditioning=conditioning)
    assert torch.equal(model(*_inputs()), torch.zeros(B, len(LENGTHS), max(LENGTHS)))


def test_runs_under_bf16_autocast() -> None:
    model = _model()
    inputs = _inputs()
    ref = model(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs)
    assert out.dtype == torch.float32
    assert torch.all(out[:, ~_mask()] == 0)
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("conditioning", ["tokens", "adaln"])
def test_tiny_dit_overfits_one_batch(conditioning: str) -> None:
    torch.manual_seed(0)
    model = TinaDiT(LENGTHS, E, K_MAX, width=32, depth=2, heads=4, conditioning=conditioning)
    diffusion = GaussianDiffusion(steps=100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, len(LENGTHS), max(LENGTHS), generator=g) * _mask()
    kwargs = {"cond": torch.randn(8, K_MAX, E, generator=g),
              "class_mask": torch.ones(8, K_MAX, dtype=torch.bool)}
    t = diffusion.sample_t(8, generator=g)
    noise = torch.randn(x0.shape, generator=g) * _mask()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = diffusion.training_loss(model, x0, t, noise, kwargs, mask=_mask())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_presets_set_the_size_and_override_width_depth_heads() -> None:
    assert PRESETS["tina-paper"] == (2048, 12, 16)
    model = build_dit(DiTConfig(preset="tina-xs", width=8, depth=1, heads=1), LENGTHS, E, K_MAX)
    assert (model.width, len(model.blocks), model.blocks[0].attn.heads) == (128, 4, 4)
    model = build_dit(DiTConfig(preset=None, width=16, depth=1, heads=2,
                                conditioning="adaln"), LENGTHS, E, K_MAX)
    assert (model.width, len(model.blocks), model.conditioning) == (16, 1, "adaln")


@pytest.mark.parametrize(
    "cfg",
    [DiTConfig(preset="tina-huge"), DiTConfig(preset=None, width=30, heads=4),
     DiTConfig(preset=None, width=16, heads=2, conditioning="film")],
)
def test_bad_config_raises_config_error(cfg: DiTConfig) -> None:
    with pytest.raises(ConfigError):
        build_dit(cfg, LENGTHS, E, K_MAX)


def test_mismatched_input_shapes_raise_value_error() -> None:
    model = _model()
    x, t, cond, cm = _inputs()
    with pytest.raises(ValueError, match="x_t"):
        model(x[:, :2], t, cond, cm)
    with pytest.raises(ValueError, match="K_max"):
        model(x, t, cond[:, :2], cm[:, :2])
