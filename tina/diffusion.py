"""Gaussian diffusion over parameter tokens: schedule, x0-prediction loss, DDPM and DDIM samplers.

References (equation numbers below are theirs):
- [DDPM] Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239.
- [DDIM] Song, Meng, Ermon, "Denoising Diffusion Implicit Models", arXiv 2010.02502.
- [iDDPM] Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", arXiv 2102.09672
  (the cosine schedule).
- [CFG] Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv 2207.12598.
- [Lin24] Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv
  2305.08891 (the "trailing" DDIM timestep spacing used here).

Like facebookresearch/DiT's `diffusion/`, the network is reached only through
`model(x_t, t, **model_kwargs) -> x0_hat`; nothing here knows about tokens or prompts. Tina's
network predicts x0 (the clean, standardized parameters), so every sampler works from x0
predictions. The predictions are *not* clipped: images live in [-1, 1], but standardized network
parameters are unbounded, and clipping would bias large weights toward zero.

Seeding contract: every random draw is supplied by the caller, per sample (`PerSampleNoise`), so a
prompt's result depends on its own seed only, never on the batch it was generated in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tina.config import DiffusionConfig
from tina.errors import ConfigError

SCHEDULES = ("linear", "cosine")
ModelFn = Callable[..., Tensor]


def make_betas(schedule: str, steps: int, beta_start: float, beta_end: float) -> Tensor:
    """Noise schedule beta_1..beta_T as a (steps,) float64 tensor.

    "linear": linspace(beta_start, beta_end) [DDPM sec. 4, 1e-4 -> 0.02 for T = 1000], unscaled
    (DiT rescales by 1000 / steps; here the two ends are the config's, whatever `steps` is).
    "cosine": [iDDPM] eq. 17, betas clipped at 0.999; beta_start/beta_end are unused.

    Raises:
        ConfigError: unknown schedule, steps < 1, or betas outside (0, 1).
    """
    if steps < 1:
        raise ConfigError(f"diffusion.steps must be >= 1, got {steps}")
    if schedule == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ConfigError(
                f"diffusion betas must satisfy 0 < beta_start <= beta_end < 1, "
                f"got {beta_start}, {beta_end}"
            )
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    if schedule == "cosine":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                 for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ConfigError(f"diffusion.schedule {schedule!r}: use one of {SCHEDULES}")


def _extract(arr: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """arr[t] (float64 schedule, (B,) int64 t) as like's dtype/device, shaped (B, 1, ..., 1)."""
    out = arr.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """DDPM forward process, x0-prediction loss, and DDPM / DDIM samplers [DDPM, DDIM]."""

    def __init__(
        self,
        steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        schedule: str = "linear",
    ) -> None:
        """Precompute the schedule (float64, as DiT) for `steps` diffusion steps.

        Raises:
            ConfigError: see `make_betas`.
        """
        self.steps, self.beta_start, self.beta_end = steps, beta_start, beta_end
        self.schedule = schedule
        self.betas = make_betas(schedule, steps, beta_start, beta_end)
        self.alphas = 1.0 - self.betas
        # alpha_bar_t = prod_{s<=t} alpha_s  [DDPM eq. 4]
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])
        # posterior q(x_{t-1} | x_t, x0) [DDPM eq. 6-7]
        self.posterior_variance = (
            self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef1 = (
            self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, for checkpoints (tina.json): rebuild with `**config`."""
        return {"steps": self.steps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "schedule": self.schedule}

    # ------------------------------------------------------------------ forward process / loss

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)  [DDPM eq. 4].

        Args:
            x0: (B, ...) float clean data; t: (B,) int64 in [0, steps); noise: like x0, N(0, I).

        Returns:
            x_t, like x0.
        """
        abar = _extract(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def sample_t(self, batch: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
        """Uniform training timesteps: (batch,) int64 in [0, steps)  [DDPM Algorithm 1]."""
        t = torch.randint(0, self.steps, (batch,), generator=generator)
        return t.to(device)

    def training_loss(
        self,
        model: ModelFn,
        x0: Tensor,
        t: Tensor,
        noise: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x0-prediction MSE, || x0 - model(x_t, t) ||^2, averaged over real entries (G.pt, Tina).

        Args:
            model: `model(x_t, t, **model_kwargs) -> x0_hat` with x0_hat like x0.
            x0: (B, T, L) float32 clean tokens; t: (B,) int64; noise: (B, T, L) N(0, I).
            model_kwargs: conditioning passed through to the model.
            mask: None (all entries real), or (T, L) / (B, T, L) bool, True = real entry; padded
                entries contribute nothing.

        Returns:
            Scalar float32 loss (computed in float32 even if the model ran under autocast).

        Raises:
            ValueError: the mask has no real entry or does not broadcast to x0.
        """
        x_t = self.q_sample(x0, t, noise)
        x0_hat = model(x_t, t, **(model_kwargs or {}))
        err = (x0_hat.float() - x0.float()) ** 2
        if mask is None:
            return err.mean()
        mask = mask.to(err.device).bool()
        if mask.dim() == x0.dim() - 1:
            mask = mask.unsqueeze(0)
        if mask.dim() != x0.dim():
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match x0 {tuple(x0.shape)}")
        weight = mask.expand_as(err).float()
        n_real = weight.sum()
        if n_real == 0:
            raise ValueError("training_loss mask has no real entry")
        return (err * weight).sum() / n_real

    # ------------------------------------------------------------------ samplers

    def _predict_x0(self, model: ModelFn, x_t: Tensor, t: Tensor,
                    model_kwargs: dict[str, Any], guidance: float) -> Tensor:
        """x0_hat, with classifier-free guidance x0_u + s (x0_c - x0_u) when s != 1 [CFG eq. 6].

        The guided branch runs as one doubled batch (DiT's forward_with_cfg): every tensor in
        model_kwargs is per-sample along dim 0 and is repeated; the unconditional half gets
        null = all True. Non-tensor values are passed unchanged.
        """
        if guidance == 1.0:
            return model(x_t, t, **model_kwargs).float()
        b = x_t.shape[0]
        kwargs = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v
                  for k, v in model_kwargs.items() if k != "null"}
        null_c = model_kwargs.get("null")
        if null_c is None:
            null_c = torch.zeros(b, dtype=torch.bool, device=x_t.device)
        kwargs["null"] = torch.cat([null_c.bool(), torch.ones_like(null_c, dtype=torch.bool)])
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **kwargs).float()
        x0_c, x0_u = out[:b], out[b:]
        return x0_u + guidance * (x0_c - x0_u)

    @staticmethod
    def _progress(iterable: list[int], progress: bool, desc: str) -> Any:
        if not progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False)

    @torch.no_grad()
    def ddpm_sample(
        self,
        model: ModelFn,
        noise: Tensor,
        step_noise: Callable[[int], Tensor],
        model_kwargs: dict[str, Any] | None = None,
        guidance: float = 1.0,
        progress: bool = False,
    ) -> Tensor:
        """Ancestral sampling over all `steps` steps from x0 predictions [DDPM Algorithm 2].

        Each step draws x_{t-1} ~ q(x_{t-1} | x_t, x0 = x0_hat) [DDPM eq. 6-7], the posterior
        with variance beta~_t; the last step (t = 0) returns its mean, which is x0_hat.

        Args:
            model: `model(x_t, t, **model_kwargs) -> x0_hat`.
            noise: (B, T, L) float32 x_T, drawn per sample by the caller (`PerSampleNoise.initial`).
            step_noise: step_noise(t) -> (B, T, L) N(0, I) noise for the step leaving timestep t
                (t = steps-1 .. 1), drawn per sample (`PerSampleNoise.step`).
            model_kwargs: conditioning; guidance: CFG scale, 1 = conditional model only.
            progress: show a progress bar.

        Returns:
            (B, T, L) float32 sampled x0.
        """
        model_kwargs = model_kwargs or {}
        x = noise.float()
        b = x.shape[0]
        x0_hat = x
        for step in self._progress(list(range(self.steps))[::-1], progress, "ddpm"):
            t = torch.full((b,), step, dtype=torch.long, device=x.device)
            x0_hat = self._predict_x0(model, x, t, model_kwargs, guidance)
            if step == 0:
                break
            mean = (_extract(self.posterior_mean_coef1, t, x) * x0_hat
                    + _extract(self.posterior_mean_coef2, t, x) * x)
            std = _extract(self.posterior_variance, t, x).sqrt()
            x = mean + std * step_noise(step).to(device=x.device, dtype=x.dtype)
        # at t = 0: coef1 = beta_0 / (1 - abar_0) = 1 and coef2 = 0, so the mean is x0_hat
        return x0_hat

    def ddim_timesteps(self, n: int) -> list[int]:
        """n evenly spaced timesteps, "trailing" [Lin24 Table 2]: T-1, T-1-T/n, ..., T/n-1.

        Trailing spacing starts at t = T-1, where x_T is (almost) pure noise, unlike DiT's
        respacing (0, T/n, ...) which never visits the noisiest step.

        Raises:
            ValueError: n < 1 or n > steps.
        """
        if not 1 <= n <= self.steps:
            raise ValueError(f"DDIM steps must be in [1, {self.steps}], got {n}")
        ratio = self.steps / n
        ts = [round(self.steps - i * ratio) - 1 for i in range(n)]
        return sorted(set(ts), reverse=True)

    @torch.no_grad()
    def ddim_sample(
        self,
        model: ModelFn,
        noise: Tensor,
        steps: int,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
        step_noise: Callable[[int], Tensor] | None = None,
        guidance: float = 1.0,
        progress: bool = False,
    ) -> Tensor:
        """DDIM sampling over `steps` trailing timesteps [DDIM eq. 12, sigma from eq. 16].

        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z, with
        eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t) and
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
        After the last timestep abar_prev = 1, so the result is the last x0_hat.

        Args:
            model: `model(x_t, t, **model_kwargs) -> x0_hat`.
            noise: (B, T, L) float32 x_T, drawn per sample by the caller.
            steps: number of sampler steps, 1..self.steps.
            eta: 0 = deterministic DDIM; 1 = DDPM-like stochasticity.
            step_noise: step_noise(t) -> (B, T, L) per-sample noise for the step leaving t;
                required when eta > 0.
            guidance: CFG scale, 1 = conditional model only.  progress: show a progress bar.

        Returns:
            (B, T, L) float32 sampled x0.

        Raises:
            ValueError: steps out of range, or eta > 0 without step_noise.
        """
        if eta > 0 and step_noise is None:
            raise ValueError("ddim_sample with eta > 0 needs step_noise (per-sample noise)")
        model_kwargs = model_kwargs or {}
        ts = self.ddim_timesteps(steps)
        x = noise.float()
        b = x.shape[0]
        x0_hat = x
        for i in self._progress(list(range(len(ts))), progress, "ddim"):
            t = torch.full((b,), ts[i], dtype=torch.long, device=x.device)
            x0_hat = self._predict_x0(model, x, t, model_kwargs, guidance)
            if i == len(ts) - 1:
                break
            abar = self.alphas_cumprod[ts[i]].item()
            abar_prev = self.alphas_cumprod[ts[i + 1]].item()
            eps_hat = (x - math.sqrt(abar) * x0_hat) / math.sqrt(1.0 - abar)
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
            dir_coef = math.sqrt(max(0.0, 1 - abar_prev - sigma**2))  # "direction pointing to x_t"
            x = math.sqrt(abar_prev) * x0_hat + dir_coef * eps_hat
            if sigma > 0:
                x = x + sigma * step_noise(ts[i]).to(device=x.device, dtype=x.dtype)
        return x0_hat


def create_diffusion(cfg: DiffusionConfig) -> GaussianDiffusion:
    """Build the diffusion process from its config (DiT's `create_diffusion`).

    Raises:
        ConfigError: a prediction target other than "x0", or a bad schedule (see `make_betas`).
    """
    if cfg.prediction != "x0":
        raise ConfigError(f"diffusion.prediction {cfg.prediction!r}: only 'x0' is implemented")
    return GaussianDiffusion(steps=cfg.steps, beta_start=cfg.beta_start,
                             beta_end=cfg.beta_end, schedule=cfg.schedule)


#################################################################################
#                              Per-sample noise                                 #
#################################################################################


def _derive_seed(seed: int, step: int) -> int:
    """A 63-bit seed for (seed, step), well mixed so that no two (seed, step) streams coincide."""
    digest = hashlib.blake2b(f"tina:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PerSampleNoise:
    """Gaussian noise drawn per sample from its own seed, so no draw depends on batch position."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], mask: Tensor | None = None,
                 device: torch.device | str = "cpu") -> None:
        """Args:
            seeds: one integer seed per sample (B entries).
            shape: per-sample shape, e.g. (T, L).
            mask: None, or a bool tensor of `shape` (True = real entry); other entries are 0.
            device: where the returned tensors go. Noise is always drawn on the CPU with CPU
                generators, so a seed gives the same noise on every device.

        Raises:
            ValueError: no seeds, or a mask whose shape differs from `shape`.
        """
        if not seeds:
            raise ValueError("PerSampleNoise needs at least one seed")
        if mask is not None and tuple(mask.shape) != tuple(shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from noise shape {shape}")
        self.seeds, self.shape = [int(s) for s in seeds], tuple(shape)
        self.mask = None if mask is None else mask.bool().cpu()
        self.device = device

    def _draw(self, seeds: list[int]) -> Tensor:
        out = torch.stack([
            torch.randn(self.shape, generator=torch.Generator().manual_seed(s)) for s in seeds
        ])
        if self.mask is not None:
            out = out * self.mask
        return out.to(self.device)

    def initial(self) -> Tensor:
        """x_T: (B, *shape) float32, sample i from torch.Generator().manual_seed(seeds[i])."""
        return self._draw(self.seeds)

    def step(self, i: int) -> Tensor:
        """Noise for sampler step i (the timestep t being left): (B, *shape) float32.

        Sample j's draw comes from a generator seeded by a hash of (seeds[j], i): stateless, so the
        result does not depend on which steps were drawn before, nor in which order.
        """
        return self._draw([_derive_seed(s, i) for s in self.seeds])
