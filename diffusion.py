"""
The diffusion of Stages B and C (method.md §6-7): one continuous-time process, t in [0, 1].

    training:  t ~ sample_t (1.08 stretch), x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps,
               loss = P2-weighted || eps_hat(x_t, t, cond) - eps ||^2          (diffusion_loss)
               with some captions dropped to the empty one, for CFG            (caption_dropout)
    sampling:  x_1 ~ N(0, I), ancestral DDPM steps on a grid from 1 to 0, with classifier-free
               guidance eps = eps_u + w (eps_c - eps_u)                        (ddpm_sample)

abar is the cosine schedule; the grid and the step equal diffusers' DDPMWuerstchenScheduler.
"""
import math

import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# schedule and loss


def alpha_bar(t, s=0.008):
    """Cosine schedule \\bar{\\alpha}(t) (method §6.1), continuous t in [0, 1] (1: pure noise).

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

    The 1.08 stretch puts 7.5 % of the samples (1 - 0.999 / 1.08) exactly at t = 1 (pure noise).
    """
    u = torch.rand(batch_size, device=device, generator=generator)
    return ((1 - u) * 1.08 + 0.001).clamp(0.001, 1.0)


def p2_weight(t, k=1.0, gamma=1.0):
    """P2 loss weight (k + SNR(t))^-gamma; with k = gamma = 1 it is 1 - abar(t) (method §6.3)."""
    ab = alpha_bar(t)
    return (k + ab / (1 - ab)) ** -gamma


def diffusion_loss(model, x0, generator=None, return_per_sample=False, **cond):
    """P2-weighted noise-prediction MSE (method §6.3): per-sample mean over (C, H, W), batch mean.

    cond is passed to the model by keyword (e.g. effnet=..., clip_text=...). return_per_sample gives
    (loss, per-sample weighted losses (B,), t (B,)), e.g. to log the loss by noise level.
    """
    t = sample_t(x0.shape[0], x0.device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    pred = model(add_noise(x0, t, noise), t, **cond)
    per_sample = (pred.float() - noise.float()).pow(2).flatten(1).mean(1) * p2_weight(t)  # (B,)
    loss = per_sample.mean()
    return (loss, per_sample, t) if return_per_sample else loss


def caption_dropout(n, p):
    """Classifier-free guidance, its training half (method §6.4): which of n samples get the empty
    caption, each with probability p; a bool mask (n,) from one torch.rand(n) of the global RNG.
    Per sample (the v1 script dropped whole batches' captions with p = 0.05): the same rate, and
    every batch a mix, which matters for small batches."""
    return torch.rand(n) < p


def drop_captions(captions, drop):
    """`captions` with those marked in `drop` (bool (B,), caption_dropout) made empty."""
    return ["" if d else c for c, d in zip(captions, drop.tolist())]

# -----------------------------------------------------------------------------
# sampling

# The prior's timestep grid of the released pipelines (method §7.2): 20 dense steps over the
# noisiest third, then 10 over the rest; 30 values, 29 model evaluations.
DEFAULT_STAGE_C_TIMESTEPS = (
    torch.linspace(1.0, 2 / 3, 20, dtype=torch.float64).tolist()
    + torch.linspace(2 / 3, 0.0, 11, dtype=torch.float64).tolist()[1:]
)


def timestep_grid(steps):
    """DDPMWuerstchenScheduler's default grid, linspace(1, 0, steps + 1): `steps` model calls."""
    return torch.linspace(1.0, 0.0, steps + 1).tolist()


def randn(shape, generator=None, device=None, dtype=None):
    """Gaussian noise of `shape`. `generator` may be a list, one per sample (dim 0): each sample is
    then drawn from its own, the same in any batch (diffusers' randn_tensor takes such lists)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype)
                            for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def ddpm_step(x, eps, t, t_prev, generator=None):
    """One ancestral DDPM step from t to t_prev < t given the predicted noise eps (method §7.1).

    Equals DDPMWuerstchenScheduler.step: alpha = abar(t) / abar(t_prev),
    mu = (x - (1 - alpha) eps / sqrt(1 - abar(t))) / sqrt(alpha),
    sigma^2 = (1 - alpha)(1 - abar(t_prev)) / (1 - abar(t)); no noise is added when t_prev == 0.
    `generator`: one, or a list of one per sample (randn).
    """
    ab = alpha_bar(torch.tensor(t, device=x.device))
    ab_prev = alpha_bar(torch.tensor(t_prev, device=x.device))
    alpha = ab / ab_prev
    mu = (1 / alpha).sqrt() * (x - (1 - alpha) * eps.to(x.dtype) / (1 - ab).sqrt())
    if t_prev == 0:
        return mu
    sigma = ((1 - alpha) * (1 - ab_prev) / (1 - ab)).sqrt()
    return mu + sigma * randn(x.shape, generator, x.device, x.dtype)


@torch.no_grad()
def ddpm_sample(model, noise, timesteps, cond, uncond=None, guidance_scale=0.0, generator=None,
                progress=False):
    """Ancestral DDPM sampling from `noise` (x at timesteps[0], t = 1 when sampling from scratch)
    with an eps-predicting model (method §7).

    timesteps: an int (number of steps on the default grid) or a descending list ending at 0, e.g.
    DEFAULT_STAGE_C_TIMESTEPS. cond / uncond: keyword dicts for the model, e.g. {'effnet': ...}.
    Classifier-free guidance, only when guidance_scale > 1 as in the diffusers pipelines, runs cond
    and uncond as one batch and lerps the predictions: eps = eps_u + w (eps_c - eps_u).
    """
    if isinstance(timesteps, int):
        timesteps = timestep_grid(timesteps)
    guided = guidance_scale > 1
    if guided:
        cond = {k: torch.cat([cond[k], uncond[k]]) for k in cond}  # (2B, ...): conditional first
    x = noise
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    for t, t_prev in tqdm(steps, disable=not progress, desc="ddpm", leave=False):
        t_batch = torch.full((x.shape[0] * (2 if guided else 1),), t, device=x.device)  # (B or 2B,)
        eps = model(torch.cat([x, x]) if guided else x, t_batch, **cond)
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = torch.lerp(eps_uncond, eps_cond, guidance_scale)
        x = ddpm_step(x, eps, t, t_prev, generator)
    return x
