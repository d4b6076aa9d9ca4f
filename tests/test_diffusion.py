"""Specification of tina.diffusion: schedule, loss, DDPM/DDIM samplers and per-sample noise."""

from __future__ import annotations

import math

import pytest
import torch

from tina.config import DiffusionConfig
from tina.diffusion import GaussianDiffusion, PerSampleNoise, create_diffusion
from tina.dit import TinaDiT
from tina.errors import ConfigError

SHAPE = (3, 7)  # (T, L)
LENGTHS = [5, 7, 3]


def _mask() -> torch.Tensor:
    return torch.arange(SHAPE[1])[None, :] < torch.tensor(LENGTHS)[:, None]


def _x0(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed)) * _mask()


def _oracle(x0: torch.Tensor):
    """A model that always predicts the true clean data."""
    return lambda x_t, t, **kw: x0.clone()


# ---------------------------------------------------------------- schedule


def test_linear_schedule_matches_ddpm_values_and_closed_form() -> None:
    d = create_diffusion(DiffusionConfig())
    assert d.steps == 1000
    assert d.betas[0].item() == pytest.approx(1e-4)
    assert d.betas[-1].item() == pytest.approx(0.02)
    assert torch.all(d.betas[1:] > d.betas[:-1])
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
    for t in (0, 1, 499, 999):
        closed = math.prod(1 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t + 1))
        assert d.alphas_cumprod[t].item() == pytest.approx(closed, rel=1e-9)
    # x_T is almost pure noise: sqrt(abar_T) ~ 6e-3
    assert math.sqrt(d.alphas_cumprod[-1].item()) < 0.01


def test_cosine_schedule_follows_improved_ddpm() -> None:
    d = GaussianDiffusion(steps=100, schedule="cosine")

    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    assert d.alphas_cumprod[49].item() == pytest.approx(f(50 / 100) / f(0), rel=1e-6)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])


@pytest.mark.parametrize(
    "cfg",
    [DiffusionConfig(schedule="sigmoid"), DiffusionConfig(prediction="eps"),
     DiffusionConfig(steps=0), DiffusionConfig(beta_start=0.1, beta_end=0.01)],
)
def test_bad_diffusion_config_raises_config_error(cfg: DiffusionConfig) -> None:
    with pytest.raises(ConfigError):
        create_diffusion(cfg)


def test_config_rebuilds_the_same_process() -> None:
    d = GaussianDiffusion(steps=50, beta_start=2e-4, beta_end=0.03)
    assert torch.equal(GaussianDiffusion(**d.config).alphas_cumprod, d.alphas_cumprod)


# ---------------------------------------------------------------- forward process and loss


def test_q_sample_at_t0_is_close_to_x0_and_at_t_max_is_noise() -> None:
    d = GaussianDiffusion()
    x0, noise = _x0(), torch.randn(4, *SHAPE)
    x_first = d.q_sample(x0, torch.zeros(4, dtype=torch.long), noise)
    torch.testing.assert_close(x_first, x0, rtol=0, atol=0.05)
    x_last = d.q_sample(x0, torch.full((4,), 999), noise)
    torch.testing.assert_close(x_last, noise, rtol=0, atol=0.03)


def test_q_sample_uses_each_rows_own_timestep() -> None:
    d = GaussianDiffusion()
    x0, noise = _x0(2), torch.randn(2, *SHAPE)
    t = torch.tensor([10, 900])
    both = d.q_sample(x0, t, noise)
    for i in range(2):
        torch.testing.assert_close(both[i:i + 1], d.q_sample(x0[i:i + 1], t[i:i + 1],
                                                             noise[i:i + 1]))


def test_training_loss_is_zero_for_exact_x0_and_positive_otherwise() -> None:
    d = GaussianDiffusion()
    x0, noise, t = _x0(), torch.randn(4, *SHAPE), torch.tensor([0, 10, 500, 999])
    assert d.training_loss(_oracle(x0), x0, t, noise, {}).item() == 0.0
    loss = d.training_loss(lambda x_t, t, **kw: x_t, x0, t, noise, {})
    assert loss.item() > 0 and loss.dim() == 0 and loss.dtype == torch.float32


@pytest.mark.parametrize("batched_mask", [False, True])
def test_training_loss_averages_over_real_entries_only(batched_mask: bool) -> None:
    d = GaussianDiffusion()
    x0, noise, t = _x0(), torch.randn(4, *SHAPE), torch.tensor([1, 2, 3, 4])
    mask = _mask().expand(4, *SHAPE) if batched_mask else _mask()

    def off_by_one(x_t, t, **kw):
        return x0 + 1.0 + 100.0 * (~_mask()).float()  # error 1 on real entries, huge on padding

    assert d.training_loss(off_by_one, x0, t, noise, {}, mask=mask).item() == pytest.approx(1.0)


def test_training_loss_passes_model_kwargs() -> None:
    d = GaussianDiffusion()
    x0, seen = _x0(), {}

    def model(x_t, t, **kw):
        seen.update(kw)
        return x0

    d.training_loss(model, x0, torch.zeros(4, dtype=torch.long), torch.randn_like(x0),
                    {"cond": "c", "class_mask": "m"})
    assert seen == {"cond": "c", "class_mask": "m"}


# ---------------------------------------------------------------- samplers


def test_ddpm_with_an_oracle_model_returns_x0() -> None:
    d = GaussianDiffusion()
    x0 = _x0()
    noise = PerSampleNoise([1, 2, 3, 4], SHAPE, mask=_mask())
    out = d.ddpm_sample(_oracle(x0), noise.initial(), noise.step, {})
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 10, 50, 1000])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_an_oracle_model_returns_x0(steps: int, eta: float) -> None:
    d = GaussianDiffusion()
    x0 = _x0()
    noise = PerSampleNoise([1, 2, 3, 4], SHAPE, mask=_mask())
    out = d.ddim_sample(_oracle(x0), noise.initial(), steps, {}, eta=eta, step_noise=noise.step)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def _recording_oracle(x0: torch.Tensor, seen: dict[int, torch.Tensor]):
    def model(x_t, t, **kw):
        seen[int(t[0])] = x_t.clone()
        return x0.clone()

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim-eta1"])
def test_oracle_trajectories_follow_the_forward_marginals(sampler: str) -> None:
    # with the true x0, each x_t must be distributed as q(x_t | x0) = N(sqrt(abar) x0, 1 - abar)
    d, n = GaussianDiffusion(), 4000
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 1, 1, generator=g) * 2
    seen: dict[int, torch.Tensor] = {}
    noise = torch.randn(n, 1, 1, generator=g)

    def step_noise(i: int) -> torch.Tensor:
        return torch.randn(n, 1, 1, generator=g)

    if sampler == "ddpm":
        d.ddpm_sample(_recording_oracle(x0, seen), noise, step_noise, {})
    else:
        d.ddim_sample(_recording_oracle(x0, seen), noise, 1000, {}, eta=1.0,
                      step_noise=step_noise)
    for t in (999, 500, 50, 1):
        abar = d.alphas_cumprod[t].item()
        z = (seen[t] - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        assert abs(z.mean().item()) < 0.08 and abs(z.std().item() - 1) < 0.08, t


def test_ddim_eta0_oracle_keeps_the_initial_noise_direction() -> None:
    # deterministic DDIM moves along x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps [DDIM eq. 12]
    d, x0 = GaussianDiffusion(), _x0()
    seen: dict[int, torch.Tensor] = {}
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    d.ddim_sample(_recording_oracle(x0, seen), noise, 10, {})
    ab = d.alphas_cumprod
    eps = (noise - ab[999].sqrt().item() * x0) / (1 - ab[999]).sqrt().item()
    for t, x_t in seen.items():
        expected = ab[t].sqrt().item() * x0 + (1 - ab[t]).sqrt().item() * eps
        torch.testing.assert_close(x_t, expected, rtol=0, atol=1e-4)


def test_ddim_with_eta_one_over_all_steps_is_ddpm() -> None:
    # eta = 1 gives sigma_t^2 = posterior variance beta~_t [DDIM sec. 4.1]: the same process
    d = GaussianDiffusion(steps=100)

    def model(x_t, t, **kw):
        return 0.5 * x_t + 0.01 * t[:, None, None]

    noise = PerSampleNoise([1, 2], SHAPE, mask=_mask())
    ddpm = d.ddpm_sample(model, noise.initial(), noise.step, {})
    ddim = d.ddim_sample(model, noise.initial(), 100, {}, eta=1.0, step_noise=noise.step)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)


def test_ddim_timesteps_are_trailing_and_evenly_spaced() -> None:
    d = GaussianDiffusion()
    assert d.ddim_timesteps(4) == [999, 749, 499, 249]
    assert d.ddim_timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        d.ddim_timesteps(1001)


def test_ddim_visits_each_timestep_once_and_calls_the_model_per_step() -> None:
    d = GaussianDiffusion()
    seen: list[int] = []

    def model(x_t, t, **kw):
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)

    d.ddim_sample(model, torch.randn(2, *SHAPE), 20, {})
    assert seen == d.ddim_timesteps(20)


def _tiny_dit() -> TinaDiT:
    torch.manual_seed(0)
    model = TinaDiT(LENGTHS, 6, 4, width=32, depth=2, heads=4)
    with torch.no_grad():
        model.final_layer.decoder.weight.normal_(0, 0.1)
    return model.eval()


def _dit_kwargs(batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"cond": torch.randn(batch, 4, 6, generator=g),
            "class_mask": torch.ones(batch, 4, dtype=torch.bool)}


def test_ddim_with_eta_zero_is_deterministic() -> None:
    d, model, kwargs = GaussianDiffusion(steps=100), _tiny_dit(), _dit_kwargs()
    noise = PerSampleNoise([7, 8, 9], SHAPE, mask=_mask()).initial()
    a = d.ddim_sample(model, noise, 10, kwargs)
    b = d.ddim_sample(model, noise.clone(), 10, kwargs)
    assert torch.equal(a, b)
    assert torch.all(a[:, ~_mask()] == 0)


def test_ddim_with_eta_needs_step_noise() -> None:
    with pytest.raises(ValueError, match="step_noise"):
        GaussianDiffusion().ddim_sample(_oracle(_x0()), _x0(), 10, {}, eta=0.5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim-eta1"])
def test_a_samples_result_does_not_depend_on_its_batch(sampler: str) -> None:
    d = GaussianDiffusion(steps=100)

    def model(x_t, t, **kw):  # depends on x_t, row by row
        return 0.5 * x_t + 0.01 * t[:, None, None]

    def run(seeds: list[int]) -> torch.Tensor:
        noise = PerSampleNoise(seeds, SHAPE, mask=_mask())
        if sampler == "ddpm":
            return d.ddpm_sample(model, noise.initial(), noise.step, {})
        return d.ddim_sample(model, noise.initial(), 10, {}, eta=1.0, step_noise=noise.step)

    batch = run([11, 22, 33])
    torch.testing.assert_close(run([22]), batch[1:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(run([33, 11]), batch[[2, 0]], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_guidance_one_calls_the_conditional_branch_only() -> None:
    d = GaussianDiffusion(steps=20)
    calls: list[dict] = []

    def model(x_t, t, **kw):
        calls.append({"batch": x_t.shape[0], **kw})
        return torch.zeros_like(x_t)

    d.ddim_sample(model, torch.randn(2, *SHAPE), 5, {"cond": torch.ones(2, 1)}, guidance=1.0)
    d.ddpm_sample(model, torch.randn(2, *SHAPE), lambda i: torch.randn(2, *SHAPE),
                  {"cond": torch.ones(2, 1)})
    assert len(calls) == 5 + 20
    assert all(c["batch"] == 2 and "null" not in c for c in calls)


@pytest.mark.parametrize("scale", [0.0, 2.0, 3.5])
def test_guidance_combines_unconditional_and_conditional_predictions(scale: float) -> None:
    d = GaussianDiffusion(steps=50)
    x0_c, x0_u = _x0(2, seed=1), _x0(2, seed=2)
    nulls: list[torch.Tensor] = []

    def model(x_t, t, cond, null=None):
        nulls.append(null)
        assert torch.equal(cond, torch.cat([torch.ones(2, 1), torch.ones(2, 1)]))
        both = torch.cat([x0_c, x0_c])
        uncond = torch.cat([x0_u, x0_u])
        return torch.where(null[:, None, None], uncond, both)

    out = d.ddim_sample(model, torch.randn(2, *SHAPE), 5, {"cond": torch.ones(2, 1)},
                        guidance=scale)
    torch.testing.assert_close(out, x0_u + scale * (x0_c - x0_u), rtol=0, atol=1e-5)
    assert all(torch.equal(n, torch.tensor([False, False, True, True])) for n in nulls)


def test_guidance_with_the_real_dit_runs_and_differs_from_unguided() -> None:
    d, model, kwargs = GaussianDiffusion(steps=100), _tiny_dit(), _dit_kwargs()
    noise = PerSampleNoise([1, 2, 3], SHAPE, mask=_mask()).initial()
    plain = d.ddim_sample(model, noise, 5, kwargs)
    guided = d.ddim_sample(model, noise, 5, kwargs, guidance=2.0)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
    assert torch.all(guided[:, ~_mask()] == 0)


# ---------------------------------------------------------------- per-sample noise


def test_per_sample_noise_ignores_batch_position_and_order() -> None:
    shape = SHAPE
    batch = PerSampleNoise([5, 6, 7], shape)
    alone = PerSampleNoise([6], shape)
    other = PerSampleNoise([7, 9, 6, 5], shape)
    assert torch.equal(batch.initial()[1], alone.initial()[0])
    assert torch.equal(batch.initial()[1], other.initial()[2])
    for i in (999, 3, 0):
        assert torch.equal(batch.step(i)[1], alone.step(i)[0])
        assert torch.equal(batch.step(i)[0], other.step(i)[3])


def test_per_sample_noise_is_reproducible_and_distinct_per_seed_and_step() -> None:
    noise = PerSampleNoise([5, 6], SHAPE)
    assert torch.equal(noise.initial(), PerSampleNoise([5, 6], SHAPE).initial())
    assert torch.equal(noise.step(4), noise.step(4))  # stateless: same step, same draw
    assert not torch.equal(noise.initial()[0], noise.initial()[1])
    assert not torch.equal(noise.step(4), noise.step(5))
    assert not torch.equal(noise.step(4), noise.initial())
    # streams of different (seed, step) pairs never coincide, e.g. (5, step 1) vs (6, step 0)
    assert not torch.equal(PerSampleNoise([5], SHAPE).step(1), PerSampleNoise([6], SHAPE).step(0))
    assert torch.equal(noise.initial()[0],
                       torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)))


def test_per_sample_noise_zeroes_padded_entries() -> None:
    noise = PerSampleNoise([1, 2], SHAPE, mask=_mask())
    for draw in (noise.initial(), noise.step(10)):
        assert draw.shape == (2, *SHAPE) and draw.dtype == torch.float32
        assert torch.all(draw[:, ~_mask()] == 0) and torch.all(draw[:, _mask()] != 0)


def test_per_sample_noise_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PerSampleNoise([], SHAPE)
    with pytest.raises(ValueError):
        PerSampleNoise([1], SHAPE, mask=torch.ones(2, 2, dtype=torch.bool))
