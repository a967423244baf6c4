"""Tests for stage_b.py: shared blocks, schedule, sampler parity with diffusers, model parity, training."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import pytest
import torch

import stage_b
from stage_b import (
    DEFAULT_STAGE_C_TIMESTEPS,
    AttnBlock,
    alpha_bar,
    ddpm_sample,
    ddpm_step,
    diffusion_loss,
    p2_weight,
    r_embedding,
    sample_t,
    timestep_grid,
)

# ---- schedule and sampler


def test_schedule_values():
    t = torch.tensor([0.0, 0.25, 0.5, 2 / 3, 0.75, 0.9, 1.0])
    expected = torch.tensor([0.9999, 0.847, 0.494, 0.246, 0.144, 0.0241, 1e-4])  # method §6.1
    torch.testing.assert_close(alpha_bar(t), expected, atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(p2_weight(t), 1 - alpha_bar(t))  # k = gamma = 1
    torch.testing.assert_close(p2_weight(torch.tensor([0.25, 0.5, 0.9])), torch.tensor([0.153, 0.506, 0.976]),
                               atol=2e-3, rtol=0)


def test_sample_t_and_embedding():
    t = sample_t(100_000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 and t.max() <= 1.0
    assert abs((t == 1.0).float().mean().item() - 0.074) < 0.005  # the 1.08 stretch
    emb = r_embedding(torch.tensor([0.0, 0.5]), 64)
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(32), torch.ones(32)]))  # sin first


def test_timestep_grids():
    assert len(DEFAULT_STAGE_C_TIMESTEPS) == 30
    assert DEFAULT_STAGE_C_TIMESTEPS[0] == 1.0 and DEFAULT_STAGE_C_TIMESTEPS[-1] == 0.0
    assert abs(DEFAULT_STAGE_C_TIMESTEPS[19] - 2 / 3) < 1e-12 and abs(DEFAULT_STAGE_C_TIMESTEPS[20] - 0.6) < 1e-12
    assert timestep_grid(12) == torch.linspace(1, 0, 13).tolist()


def _toy_eps(x, t, bias):  # a deterministic stand-in for a denoiser
    return 0.3 * x + torch.sin(3 * t)[:, None, None, None] + bias


@pytest.mark.parametrize("grid", ["default", "stage_c"])
def test_ddpm_matches_diffusers_scheduler(grid):
    from diffusers import DDPMWuerstchenScheduler

    scheduler = DDPMWuerstchenScheduler()
    if grid == "default":
        scheduler.set_timesteps(12)
        timesteps = 12
    else:
        scheduler.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
        timesteps = DEFAULT_STAGE_C_TIMESTEPS
    noise = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    ours_grid = timestep_grid(timesteps) if isinstance(timesteps, int) else timesteps
    torch.testing.assert_close(torch.tensor(ours_grid, dtype=torch.float32), scheduler.timesteps)

    # step by step, from the same state and the same noise
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ref = noise
    for t, t_prev in zip(ours_grid[:-1], ours_grid[1:]):
        ratio = scheduler.timesteps[ours_grid.index(t)].expand(2)
        eps = _toy_eps(x_ref, ratio, bias)
        ours = ddpm_step(x_ref, eps, t, t_prev, g_ours)
        x_ref = scheduler.step(eps, ratio, x_ref, generator=g_ref).prev_sample
        torch.testing.assert_close(ours, x_ref, atol=1e-5, rtol=1e-5)

    # the whole loop
    out = ddpm_sample(lambda x, t, bias: _toy_eps(x, t, bias), noise, timesteps, {"bias": bias},
                      generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, x_ref, atol=1e-4, rtol=1e-4)


def test_ddpm_sample_cfg_lerps():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return c.expand_as(x)

    noise = torch.zeros(1, 1, 2, 2)
    cond, uncond = {"c": torch.ones(1, 1, 1, 1)}, {"c": torch.zeros(1, 1, 1, 1)}
    # with w > 1 the model sees a batch of 2 and eps = 0 + w * (1 - 0); t_prev = 0 so no noise is added
    out = ddpm_sample(model, noise, [1.0, 0.0], cond, uncond, guidance_scale=3.0)
    alpha = alpha_bar(torch.tensor(1.0)) / alpha_bar(torch.tensor(0.0))
    expected = -(1 - alpha) * 3.0 / (1 - alpha_bar(torch.tensor(1.0))).sqrt() / alpha.sqrt()
    torch.testing.assert_close(out, expected.expand_as(noise))
    assert calls == [2]
    ddpm_sample(model, noise, [1.0, 0.0], cond, uncond, guidance_scale=1.0)  # w <= 1: no CFG batch
    assert calls == [2, 1]


def test_attn_block_and_loss():
    block = AttnBlock(32, 16, nhead=4).eval()
    x, cond = torch.randn(2, 32, 5, 3), torch.randn(2, 7, 16)
    assert block(x, cond).shape == x.shape
    g = torch.Generator().manual_seed(0)
    loss, per_sample, t = diffusion_loss(lambda x, t, c: x * 0 + c, torch.randn(4, 4, 8, 8), generator=g,
                                         return_per_sample=True, c=torch.zeros(()))
    assert per_sample.shape == t.shape == (4,) and torch.isfinite(loss)
    torch.testing.assert_close(loss, per_sample.mean())
