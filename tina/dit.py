"""The Tina denoiser: a transformer over parameter tokens, class tokens and a timestep token.

The sequence is [T noisy parameter tokens][K_max class tokens][1 timestep token], attended without
a causal mask, as in G.pt (Peebles et al., arXiv 2209.12892) and Tina (Li et al., arXiv
2405.14132). Each parameter-token position has its own linear encoder (chunk -> width) and decoder
(width -> chunk); the network predicts x0, the clean parameter tokens. Padded class tokens (prompts
with K < K_max classes) are removed from attention by a key padding mask. With
`conditioning="adaln"` the timestep instead modulates every block through DiT's adaLN-Zero
(Peebles & Xie, arXiv 2212.09748) and the timestep token is dropped.

The diffusion process lives in `tina.diffusion`; the two meet only through
`model(x_t, t, **model_kwargs) -> x0_hat`, like facebookresearch/DiT's `models.py`, which this
file follows section by section.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tina.config import DiTConfig
from tina.errors import ConfigError

CONDITIONINGS = ("tokens", "adaln")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation (DiT): x (B, S, W), shift/scale (B, W) -> (B, S, W)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Parameter Tokens             #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds integer timesteps into width-d vectors: sinusoidal features -> MLP (DiT)."""

    def __init__(self, width: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
        """Sinusoidal features (Vaswani et al. 2017; DiT, GLIDE): t (B,) -> (B, dim) float32."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


def _length_mask(token_lengths: list[int]) -> Tensor:
    """(T, L) bool: True where column j < token_lengths[i]."""
    max_len = max(token_lengths)
    lengths = torch.tensor(token_lengths, dtype=torch.long)
    return torch.arange(max_len)[None, :] < lengths[:, None]


class TokenEncoder(nn.Module):
    """One linear map per parameter-token position, batched: (B, T, L) -> (B, T, W)."""

    def __init__(self, token_lengths: list[int], width: int) -> None:
        super().__init__()
        n, max_len = len(token_lengths), max(token_lengths)
        self.register_buffer("mask", _length_mask(token_lengths), persistent=False)
        self.weight = nn.Parameter(torch.empty(n, max_len, width))
        self.bias = nn.Parameter(torch.zeros(n, width))
        self.token_lengths = list(token_lengths)

    def reset_parameters(self) -> None:
        # xavier per position with the token's real fan-in, not the padded one
        for i, length in enumerate(self.token_lengths):
            bound = math.sqrt(6.0 / (length + self.weight.shape[-1]))
            nn.init.uniform_(self.weight.data[i], -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        # zeroing padded input columns makes their values (and their weights) irrelevant
        x = x * self.mask.to(x.dtype)
        return torch.einsum("btl,tlw->btw", x, self.weight) + self.bias


class TokenDecoder(nn.Module):
    """One linear map per parameter-token position, batched: (B, T, W) -> (B, T, L), padding 0."""

    def __init__(self, token_lengths: list[int], width: int) -> None:
        super().__init__()
        n, max_len = len(token_lengths), max(token_lengths)
        self.register_buffer("mask", _length_mask(token_lengths), persistent=False)
        self.weight = nn.Parameter(torch.zeros(n, width, max_len))
        self.bias = nn.Parameter(torch.zeros(n, max_len))

    def forward(self, h: Tensor) -> Tensor:
        out = torch.einsum("btw,twl->btl", h, self.weight) + self.bias
        return out * self.mask.to(out.dtype)


#################################################################################
#                                 Core Tina Model                               #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a key padding mask, via F.scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """x (B, S, W); key_mask (B, S) bool, True = may be attended to -> (B, S, W)."""
        b, s, w = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(out.transpose(1, 2).reshape(b, s, w))


class Mlp(nn.Module):
    """Two-layer GELU MLP (tanh approximation, as DiT)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TinaBlock(nn.Module):
    """Pre-LN transformer block; with `adaln`, DiT's adaLN-Zero conditioning on the timestep."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, adaln: bool):
        super().__init__()
        self.adaln = adaln
        # adaLN supplies the affine part itself (DiT), so the norms have none
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.drop = nn.Dropout(dropout)
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, key_mask: Tensor, c: Tensor | None = None) -> Tensor:
        if not self.adaln:
            x = x + self.drop(self.attn(self.norm1(x), key_mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)
        )
        h = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), key_mask)
        x = x + gate_msa.unsqueeze(1) * self.drop(h)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp.unsqueeze(1) * self.drop(h)


class FinalLayer(nn.Module):
    """Final LayerNorm (adaLN-modulated in adaln mode) then the per-position decoders."""

    def __init__(self, token_lengths: list[int], width: int, adaln: bool) -> None:
        super().__init__()
        self.adaln = adaln
        self.norm = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.decoder = TokenDecoder(token_lengths, width)
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, h: Tensor, c: Tensor | None = None) -> Tensor:
        h = self.norm(h)
        if self.adaln:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            h = modulate(h, shift, scale)
        return self.decoder(h)


class TinaDiT(nn.Module):
    """Denoiser over [parameter tokens][class tokens][timestep token], no causal mask (G.pt)."""

    def __init__(
        self,
        token_lengths: list[int],
        cond_dim: int,
        k_max: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        conditioning: str = "tokens",
        dropout: float = 0.0,
    ) -> None:
        """Build the network.

        Args:
            token_lengths: real length of each parameter token (T entries, each >= 1); the token
                tensors are padded to L = max(token_lengths).
            cond_dim: E, the width of a class token (text embedding plus extra feature columns).
            k_max: K_max, the number of class-token slots.
            width, depth, heads, mlp_ratio, dropout: transformer size; width % heads == 0.
            conditioning: "tokens" (the timestep is a token, G.pt/Tina) or "adaln" (DiT's
                adaLN-Zero modulation by the timestep embedding; no timestep token).

        Raises:
            ConfigError: empty or non-positive token lengths, width not divisible by heads, or an
                unknown conditioning.
        """
        super().__init__()
        if not token_lengths or min(token_lengths) < 1:
            raise ConfigError(f"token_lengths must be non-empty and positive, got {token_lengths}")
        if width % heads:
            raise ConfigError(f"dit width {width} is not divisible by heads {heads}")
        if conditioning not in CONDITIONINGS:
            raise ConfigError(f"dit conditioning {conditioning!r}: use one of {CONDITIONINGS}")
        if k_max < 1 or cond_dim < 1:
            raise ConfigError(f"k_max ({k_max}) and cond_dim ({cond_dim}) must be >= 1")
        self.token_lengths = list(token_lengths)
        self.n_tokens, self.max_len = len(token_lengths), max(token_lengths)
        self.cond_dim, self.k_max, self.width = cond_dim, k_max, width
        self.conditioning = conditioning
        adaln = conditioning == "adaln"

        self.encoder = TokenEncoder(token_lengths, width)
        self.class_embedder = nn.Linear(cond_dim, width)
        # one learned null token per class slot: the "empty prompt" of classifier-free guidance
        self.null_tokens = nn.Parameter(torch.zeros(k_max, width))
        self.t_embedder = TimestepEmbedder(width)
        seq_len = self.n_tokens + k_max + (0 if adaln else 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
        self.blocks = nn.ModuleList(
            TinaBlock(width, heads, mlp_ratio, dropout, adaln) for _ in range(depth)
        )
        self.final_layer = FinalLayer(token_lengths, width, adaln)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT-style init: xavier linears, N(0, 0.02) embeddings, zero adaLN and zero decoders."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        self.encoder.reset_parameters()
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.null_tokens, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity (DiT)
        for block in self.blocks:
            if block.adaln:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.final_layer.adaln:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        # zero decoders (DiT's zero final linear): the first prediction is x0 = 0, the data mean
        nn.init.zeros_(self.final_layer.decoder.weight)
        nn.init.zeros_(self.final_layer.decoder.bias)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Tensor,
        class_mask: Tensor,
        null: Tensor | None = None,
    ) -> Tensor:
        """Predict the clean parameter tokens.

        Args:
            x_t: (B, T, L) float32 noisy parameter tokens; padded columns are ignored.
            t: (B,) int64 timesteps in [0, steps).
            cond: (B, K_max, E) float32 class tokens, in prompt order.
            class_mask: (B, K_max) bool, True = real class; padded slots are never attended to
                and their `cond` values never matter.
            null: (B,) bool or None; True replaces that row's class tokens by the learned null
                tokens (classifier-free guidance, Ho & Salimans 2022), making the output
                independent of `cond`. The class mask is kept: the null prompt still knows K.

        Returns:
            (B, T, L) x0 prediction in x_t's dtype, zero beyond each token's length.

        Raises:
            ValueError: a tensor's shape does not match the network's token layout or K_max.
        """
        b = x_t.shape[0]
        if x_t.shape[1:] != (self.n_tokens, self.max_len):
            raise ValueError(
                f"x_t has shape {tuple(x_t.shape)}, expected (B, {self.n_tokens}, {self.max_len})"
            )
        if cond.shape != (b, self.k_max, self.cond_dim) or class_mask.shape != (b, self.k_max):
            raise ValueError(
                f"cond {tuple(cond.shape)} / class_mask {tuple(class_mask.shape)} do not match "
                f"(B={b}, K_max={self.k_max}, E={self.cond_dim})"
            )
        class_mask = class_mask.bool()
        # zero padded slots so that even NaN/inf padding cannot leak through 0 * x
        cond = cond.masked_fill(~class_mask[..., None], 0.0)
        cls = self.class_embedder(cond)
        if null is not None:
            null_tokens = self.null_tokens[None].to(cls.dtype).expand_as(cls)
            cls = torch.where(null.bool()[:, None, None], null_tokens, cls)
        c = self.t_embedder(t)
        parts = [self.encoder(x_t), cls]
        always = torch.ones(b, self.n_tokens, dtype=torch.bool, device=x_t.device)
        masks = [always, class_mask]
        if self.conditioning == "tokens":
            parts.append(c[:, None, :])
            masks.append(always[:, :1])
            c = None
        dtype = torch.promote_types(parts[0].dtype, parts[1].dtype)
        h = torch.cat([p.to(dtype) for p in parts], dim=1) + self.pos_embed
        key_mask = torch.cat(masks, dim=1)
        for block in self.blocks:
            h = block(h, key_mask, c)
        out = self.final_layer(h[:, : self.n_tokens], c)
        return out.to(x_t.dtype)


#################################################################################
#                                 Tina Configs                                  #
#################################################################################

# name -> (width, depth, heads); "tina-paper" is the paper's generator (width 2048, 12 blocks)
PRESETS: dict[str, tuple[int, int, int]] = {
    "tina-xs": (128, 4, 4),
    "tina-s": (256, 6, 8),
    "tina-b": (512, 12, 8),
    "tina-l": (1024, 12, 16),
    "tina-paper": (2048, 12, 16),
}


def dit_size(cfg: DiTConfig) -> tuple[int, int, int]:
    """(width, depth, heads) of a DiT config: its preset's when set, else its own fields.

    Raises:
        ConfigError: unknown preset.
    """
    if cfg.preset is None:
        return cfg.width, cfg.depth, cfg.heads
    if cfg.preset not in PRESETS:
        raise ConfigError(f"dit.preset {cfg.preset!r} unknown; use one of {sorted(PRESETS)}")
    return PRESETS[cfg.preset]


def build_dit(cfg: DiTConfig, token_lengths: list[int], cond_dim: int, k_max: int) -> TinaDiT:
    """Build a TinaDiT from its config; `cfg.preset`, when set, overrides width/depth/heads.

    Args:
        cfg: the DiT section of the pipeline config.
        token_lengths: real length of each parameter token (from tina.tokens).
        cond_dim: E, width of a class token.  k_max: number of class slots.

    Raises:
        ConfigError: unknown preset, or a size/conditioning the network rejects.
    """
    width, depth, heads = dit_size(cfg)
    return TinaDiT(
        token_lengths, cond_dim, k_max, width=width, depth=depth, heads=heads,
        mlp_ratio=cfg.mlp_ratio, conditioning=cfg.conditioning, dropout=cfg.dropout,
    )
