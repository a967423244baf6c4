"""
Stage B of Würstchen v2: the semantic compressor and the DiffNeXt latent diffusion decoder.

Stage B learns to turn a tiny 16-channel "semantic" latent (EfficientNetV2 features of the image, 42.67x
smaller than the image side: 16x24x24 for 1024 px) plus the CLIP text back into the 4-channel Stage A latent
(4x256x256 for 1024 px), by noise-prediction diffusion (paper §3 / method.md §3, §4, §6, §7).

This file also owns the pieces shared with Stage C (stage_c.py imports them): the network blocks
(LayerNorm2d, GlobalResponseNorm, TimestepBlock, Attention, AttnBlock), the timestep embedding, the cosine
noise schedule, the P2-weighted loss and the DDPM sampler.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---- model


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, without affine parameters (method §4.2)."""

    def __init__(self, c):
        super().__init__(c, elementwise_affine=False, eps=1e-6)

    def forward(self, x):
        # (B, C, H, W) -> (B, H, W, C) -> normalise C -> (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 Global Response Normalisation on channels-last input (method §4.2)."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c))

    def forward(self, x):  # x: (B, H, W, C)
        g = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C): L2 norm over space per channel
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)  # divisive normalisation across channels
        return self.gamma * (x * n) + self.beta + x


class TimestepBlock(nn.Module):
    """Timestep conditioning: x * (1 + a) + b with (a, b) a linear map of the t-embedding (method §4.2)."""

    def __init__(self, c, c_r):
        super().__init__()
        self.mapper = nn.Linear(c_r, 2 * c)

    def forward(self, x, r_embed):
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)  # (B, 2C) -> 2 x (B, C, 1, 1)
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections.

    Named as diffusers names it (to_q, to_k, to_v, to_out.0) so the released weights load 1:1 (method §8.2).
    Dropout acts on the attention probabilities, as in dome272's nn.MultiheadAttention (the code that
    trained the released model); diffusers puts it after the output projection instead (same in eval mode).
    """

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.Sequential(nn.Linear(c, c))  # a Sequential only for the key name 'to_out.0'

    def forward(self, x, kv):  # x: (B, N, C) queries, kv: (B, M, C) keys/values
        def heads(z):  # (B, L, C) -> (B, nhead, L, C / nhead)
            return z.unflatten(-1, (self.nhead, -1)).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(kv)), heads(self.to_v(kv))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, nhead, N, C / nhead) -> (B, N, C)


class AttnBlock(nn.Module):
    """Pre-norm attention of the image tokens over [image tokens ; mapped text tokens] (method §4.2).

    With self_attn=True (all released configs) the key/value sequence is the normed image tokens
    followed by kv_mapper(cond), so one attention does both self- and cross-attention.
    """

    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c)
        self.attention = Attention(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x, cond):  # x: (B, C, H, W), cond: (B, M, c_cond)
        kv = self.kv_mapper(cond)  # (B, M, C)
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.self_attn:
            kv = torch.cat([h, kv], dim=1)  # (B, H*W + M, C)
        out = self.attention(h, kv).transpose(1, 2).reshape(x.shape)  # (B, H*W, C) -> (B, C, H, W)
        return x + out


def r_embedding(t, c_r=64, max_positions=10000):
    """Sinusoidal embedding of the continuous timestep t in [0, 1] (method §4.2): (B,) -> (B, c_r).

    t is scaled by 10,000 and embedded with c_r/2 geometric frequencies, sin block first.
    """
    half = c_r // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1) * torch.arange(half, device=t.device).float())
    angles = (t * max_positions)[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, c_r)


# ---- diffusion / loss


def alpha_bar(t, s=0.008):
    """Cosine schedule \\bar{\\alpha}(t) for continuous t in [0, 1] (t = 1 is pure noise), method §6.1.

    cos^2((t + s) / (1 + s) * pi/2) / cos^2(s / (1 + s) * pi/2), clamped to [1e-4, 0.9999].
    """
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f / math.cos(s / (1 + s) * math.pi / 2) ** 2).clamp(1e-4, 0.9999)


def add_noise(x0, t, noise):
    """Forward process x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps, with t of shape (B,)."""
    ab = alpha_bar(t).view(-1, *[1] * (x0.dim() - 1))  # (B,) -> (B, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def sample_t(batch_size, device, generator=None):
    """Training timesteps (method §6.2): t = 1.08 (1 - u) + 0.001, clamped to [0.001, 1].

    The 1.08 stretch puts about 7.4 % of the samples exactly at t = 1 (pure noise).
    """
    u = torch.rand(batch_size, device=device, generator=generator)
    return ((1 - u) * 1.08 + 0.001).clamp(0.001, 1.0)


def p2_weight(t, k=1.0, gamma=1.0):
    """P2 loss weight (k + SNR(t))^-gamma; with k = gamma = 1 it is 1 - abar(t) (method §6.3)."""
    ab = alpha_bar(t)
    return (k + ab / (1 - ab)) ** -gamma


def diffusion_loss(model, x0, generator=None, return_per_sample=False, **cond):
    """P2-weighted noise-prediction MSE (method §6.3): per-sample mean over (C, H, W), then batch mean.

    cond is passed to the model by keyword (e.g. effnet=..., clip_text=...). With return_per_sample the
    result is (loss, per-sample weighted losses (B,), t (B,)), e.g. to log the loss by noise level.
    """
    t = sample_t(x0.shape[0], x0.device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    pred = model(add_noise(x0, t, noise), t, **cond)
    per_sample = (pred.float() - noise.float()).pow(2).flatten(1).mean(1) * p2_weight(t)  # (B,)
    loss = per_sample.mean()
    return (loss, per_sample, t) if return_per_sample else loss


# ---- sampling

# The prior's timestep grid of the released pipelines (method §7.2): 20 dense steps over the noisiest third,
# then 10 over the rest; 30 values, 29 model evaluations.
DEFAULT_STAGE_C_TIMESTEPS = (
    torch.linspace(1.0, 2 / 3, 20, dtype=torch.float64).tolist()
    + torch.linspace(2 / 3, 0.0, 11, dtype=torch.float64).tolist()[1:]
)


def timestep_grid(steps):
    """DDPMWuerstchenScheduler's default grid: linspace(1, 0, steps + 1), i.e. `steps` model evaluations."""
    return torch.linspace(1.0, 0.0, steps + 1).tolist()


def ddpm_step(x, eps, t, t_prev, generator=None):
    """One ancestral DDPM step from t to t_prev < t given the predicted noise eps (method §7.1).

    Equals DDPMWuerstchenScheduler.step: alpha = abar(t) / abar(t_prev),
    mu = (x - (1 - alpha) eps / sqrt(1 - abar(t))) / sqrt(alpha),
    sigma^2 = (1 - alpha)(1 - abar(t_prev)) / (1 - abar(t)); no noise is added when t_prev == 0.
    """
    ab = alpha_bar(torch.tensor(t, device=x.device))
    ab_prev = alpha_bar(torch.tensor(t_prev, device=x.device))
    alpha = ab / ab_prev
    mu = (1 / alpha).sqrt() * (x - (1 - alpha) * eps.to(x.dtype) / (1 - ab).sqrt())
    if t_prev == 0:
        return mu
    sigma = ((1 - alpha) * (1 - ab_prev) / (1 - ab)).sqrt()
    return mu + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ddpm_sample(model, noise, timesteps, cond, uncond=None, guidance_scale=0.0, generator=None, progress=False):
    """Ancestral DDPM sampling from `noise` (x at t = 1) with an eps-predicting model (method §7).

    timesteps: an int (number of steps on the default grid) or a descending list ending at 0, e.g.
    DEFAULT_STAGE_C_TIMESTEPS. cond / uncond: keyword dicts for the model, e.g. {'effnet': ..., 'clip_text':
    ...}. Classifier-free guidance runs cond and uncond as one batch and lerps the predictions,
    eps = eps_u + w (eps_c - eps_u), only when guidance_scale > 1, as the diffusers pipelines do.
    """
    if isinstance(timesteps, int):
        timesteps = timestep_grid(timesteps)
    cfg = guidance_scale > 1
    if cfg:
        cond = {k: torch.cat([cond[k], uncond[k]]) for k in cond}  # (2B, ...): conditional first
    x = noise
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    for t, t_prev in tqdm(steps, disable=not progress, desc="ddpm", leave=False):
        t_batch = torch.full((x.shape[0] * (2 if cfg else 1),), t, device=x.device)  # (B,) or (2B,)
        eps = model(torch.cat([x, x]) if cfg else x, t_batch, **cond)
        if cfg:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = torch.lerp(eps_uncond, eps_cond, guidance_scale)
        x = ddpm_step(x, eps, t, t_prev, generator)
    return x
