"""Tests for stage_b.py: shared blocks, schedule, sampler parity with diffusers, model parity,
training."""

import os
from dataclasses import asdict

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import pytest
import torch

import blocks
import stage_b
import text_encoder
from blocks import AttnBlock, r_embedding
from common import save_checkpoint
from diffusion import (DEFAULT_STAGE_C_TIMESTEPS, alpha_bar, ddpm_sample, ddpm_step, diffusion_loss,
                       p2_weight, sample_t, timestep_grid)

# ---- schedule and sampler


def test_schedule_values():
    t = torch.tensor([0.0, 0.25, 0.5, 2 / 3, 0.75, 0.9, 1.0])
    expected = torch.tensor([0.9999, 0.847, 0.494, 0.246, 0.144, 0.0241, 1e-4])  # method §6.1
    torch.testing.assert_close(alpha_bar(t), expected, atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(p2_weight(t), 1 - alpha_bar(t))  # k = gamma = 1
    torch.testing.assert_close(p2_weight(torch.tensor([0.25, 0.5, 0.9])),
                               torch.tensor([0.153, 0.506, 0.976]), atol=2e-3, rtol=0)


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
    assert (abs(DEFAULT_STAGE_C_TIMESTEPS[19] - 2 / 3) < 1e-12
            and abs(DEFAULT_STAGE_C_TIMESTEPS[20] - 0.6) < 1e-12)
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
    # with w > 1 the model sees a batch of 2 and eps = 0 + w * (1 - 0); t_prev = 0: no noise added
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
    loss, per_sample, t = diffusion_loss(lambda x, t, c: x * 0 + c, torch.randn(4, 4, 8, 8),
                                         generator=g, return_per_sample=True, c=torch.zeros(()))
    assert per_sample.shape == t.shape == (4,) and torch.isfinite(loss)
    torch.testing.assert_close(loss, per_sample.mean())


def test_grn_matches_reference_with_zero_channels():
    """GRN (sum-of-squares norm) == diffusers' GlobalResponseNorm (torch.norm), values and
    gradients, including channels of exact zeros (GELU produces them; a plain sqrt gave NaN
    gradients there and NaN training)."""
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import (
        GlobalResponseNorm as RefGRN)
    torch.manual_seed(0)
    ours = blocks.GlobalResponseNorm(8)
    ours.gamma.data.normal_(), ours.beta.data.normal_()
    ref = RefGRN(8)
    ref.load_state_dict(ours.state_dict())
    x0 = torch.randn(2, 5, 5, 8)
    x0[:, :, :, 1] = 0.0  # dead channel in every sample
    x0[0, :, :, 2] = 0.0  # and one in one sample only
    results = []
    for m in (ours, ref):
        x = x0.clone().requires_grad_()
        y = m(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        results.append((y, x.grad, m.gamma.grad, m.beta.grad))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_keep_mask_rate_and_scaling():
    torch.manual_seed(0)
    keep = blocks.keep_mask((1000, 4000), 0.1)
    assert keep.shape == (1000, 4000) and keep.dtype == torch.bool
    # each of the four 15-bit lanes of a 64-bit draw keeps 90 % (5 sigma ~ 1.5e-3 per lane)
    rates = keep.flatten().view(-1, 4).float().mean(dim=0)
    torch.testing.assert_close(rates, torch.full((4,), 0.9), atol=1.5e-3, rtol=0)
    assert abs(keep.float().mean().item() - 0.9) < 1e-3
    x = torch.randn(300, 400, requires_grad=True)
    y = blocks.dropout(x, 0.25)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)  # kept ones scaled by 1 / (1 - p)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() / 0.75)
    assert blocks.dropout(x, 0.25, training=False) is x and blocks.dropout(x, 0.0) is x


def test_attention_dropout_on_probabilities_is_unbiased():
    """Train mode on the CPU takes the explicit path (dropout on the attention probabilities): each
    draw differs, their mean is the eval-mode (SDPA) output, and p = 0 gives exactly the eval
    output."""
    torch.manual_seed(0)
    attn = blocks.Attention(16, nhead=2, dropout=0.3)
    x, kv = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    with torch.no_grad():
        expected = attn.eval()(x, kv)
        attn.train()
        draws = torch.stack([attn(x, kv) for _ in range(2000)])
    assert (draws[0] - draws[1]).abs().max() > 1e-3
    torch.testing.assert_close(draws.mean(0), expected, atol=0.03, rtol=0)
    attn.dropout = 0.0
    torch.testing.assert_close(attn(x, kv), expected)


# ---- models: parity with diffusers' WuerstchenDiffNeXt on random weights


def _random_state_dict(shapes, seed):
    """Random weights for `shapes` as views into one shared pool of N(0, 0.02^2) values at random
    offsets: a 1 B-parameter state dict in ~100 MB that saves (as .bin, storage shared) and loads in
    well under a second."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(max(s.numel() for s in shapes.values()) + 1_000_003, generator=g) * 0.02
    offsets = torch.randint(0, 1_000_000, (len(shapes),), generator=g).tolist()
    return {k: pool[o:o + s.numel()].view(s) for (k, s), o in zip(shapes.items(), offsets)}


def _diffnext(monkeypatch, seed, shared=False, **kwargs):
    """A diffusers WuerstchenDiffNeXt with random weights (built on 'meta': its own init is
    quadratic in depth)."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt
    monkeypatch.setattr(WuerstchenDiffNeXt, "_init_weights", lambda self, m: None)
    with torch.device("meta"):
        ref = WuerstchenDiffNeXt(**kwargs)
    sd = _random_state_dict({k: v.shape for k, v in ref.state_dict().items()}, seed)
    # safetensors: no sharing
    ref.load_state_dict(sd if shared else {k: v.clone() for k, v in sd.items()}, assign=True)
    return ref.eval()


def _inputs(cfg, latent_hw, effnet_hw, n_text=77, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.c_in, *latent_hw, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, cfg.effnet_embd, *effnet_hw, generator=g),
            torch.randn(batch, n_text, cfg.clip_embd, generator=g))


SMALL_KW = dict(c_cond=48, c_hidden=[16, 32, 48], nhead=[-1, 2, 3], blocks=[1, 2, 1],
                level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True], clip_embd=40,
                kernel_size=5, dropout=0.1)


# levels that start with a TimestepBlock or an attention block (the U-Net skip then goes nowhere),
# a dropout per level, widths the heads do not divide (diffusers' inner width c // nhead * nhead)
ODD_KW = dict(c_cond=36, c_hidden=[18, 36, 30], nhead=[-1, 5, 4], blocks=[1, 1, 2],
              level_config=["CT", "TCA", "ACT"], inject_effnet=[True, False, True], clip_embd=24,
              c_r=33, kernel_size=3, dropout=[0.1, 0.0, 0.2])


@pytest.mark.parametrize("kw", [SMALL_KW, ODD_KW], ids=["small", "odd"])
@torch.no_grad()
def test_stage_b_parity_small_config(monkeypatch, tmp_path, kw):
    ref = _diffnext(monkeypatch, 0, **kw)
    ref.save_pretrained(tmp_path)  # safetensors
    ours = stage_b.StageB.from_pretrained(str(tmp_path))
    assert not ours.training and ours.cfg.c_hidden == tuple(kw["c_hidden"])
    for latent_hw, effnet_hw in [((16, 16), (3, 3)), ((16, 24), (2, 5))]:
        x, t, effnet, clip = _inputs(ours.cfg, latent_hw, effnet_hw, batch=2)
        torch.testing.assert_close(ours(x, t, effnet, clip), ref(x, t, effnet, clip), atol=1e-5,
                                   rtol=1e-5)


@torch.no_grad()
def test_stage_b_parity_paper_config(monkeypatch, tmp_path):
    ref = _diffnext(monkeypatch, 1, shared=True)  # the released config = diffusers' defaults
    ref.save_pretrained(tmp_path, safe_serialization=False)  # .bin keeps the shared storage small
    ours = stage_b.StageB.from_pretrained(str(tmp_path))
    assert ours.cfg == stage_b.PRESETS["paper"]["model"]
    assert sum(p.numel() for p in ours.parameters()) == 1_055_365_280
    for latent_hw, effnet_hw in [((16, 16), (2, 2)), ((16, 32), (2, 3))]:
        x, t, effnet, clip = _inputs(ours.cfg, latent_hw, effnet_hw)
        torch.testing.assert_close(ours(x, t, effnet, clip), ref(x, t, effnet, clip), atol=1e-5,
                                   rtol=1e-5)


def _to_dome272(sd):
    """diffusers keys -> the official model_v2_stage_b.pt layout (packed nn.MultiheadAttention)."""
    out = {}
    for k, v in sd.items():
        if ".attention.to_q." in k:
            prefix, kind = k.split(".to_q.")
            qkv = [sd[f"{prefix}.to_{n}.{kind}"] for n in "qkv"]
            out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(qkv)
        elif ".attention.to_out.0." in k:
            out[k.replace(".to_out.0.", ".attn.out_proj.")] = v
        elif ".attention.to_k." not in k and ".attention.to_v." not in k:
            out[k] = v
    return out


@torch.no_grad()
def test_stage_b_and_compressor_load_official_pt(monkeypatch, tmp_path):
    ref = _diffnext(monkeypatch, 2, **SMALL_KW)
    compressor = stage_b.SemanticCompressor(stage_b.CompressorConfig())  # EfficientNetV2-S, random
    compressor.mapper[1].running_mean.uniform_(-1, 1)  # make the BatchNorm statistics non-trivial
    path = str(tmp_path / "model_v2_stage_b.pt")
    torch.save({"state_dict": _to_dome272(ref.state_dict()),
                "effnet_state_dict": compressor.state_dict()}, path)
    cfg = stage_b.StageBConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in SMALL_KW.items()})
    ours = stage_b.StageB.from_pretrained(path, cfg)
    x, t, effnet, clip = _inputs(cfg, (16, 8), (2, 1))
    torch.testing.assert_close(ours(x, t, effnet, clip), ref(x, t, effnet, clip), atol=1e-5,
                               rtol=1e-5)
    loaded = stage_b.SemanticCompressor.from_pretrained(path)
    images = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(loaded(images), compressor.eval()(images))
    with pytest.raises(ValueError, match="do not match"):  # the wrong architecture is named clearly
        stage_b.StageB.from_pretrained(path, stage_b.PRESETS["tiny"]["model"])


def test_semantic_compressor_shapes():
    tiny = stage_b.SemanticCompressor(stage_b.PRESETS["tiny"]["compressor"])
    assert tiny(torch.rand(2, 3, 128, 128)).shape == (2, 16, 3, 3)
    assert tiny(torch.rand(1, 3, 256, 384)).shape == (1, 16, 6, 9)
    effnet = stage_b.SemanticCompressor(stage_b.CompressorConfig()).eval()
    n_backbone = sum(p.numel() for p in effnet.backbone.parameters())
    # method §8.6 (with BN affine)
    assert n_backbone + sum(p.numel() for p in effnet.mapper.parameters()) == 20_198_000
    with torch.no_grad():
        assert effnet(torch.rand(1, 3, 256, 256)).shape == (1, 16, 6, 6)  # 1024 px gives 24 x 24


def test_text_encoder():
    enc = text_encoder.TextEncoder("tiny")
    out = enc.encode(["a red circle on a blue background", ""])
    assert out.shape == (2, 77, 64) and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(k.split(".")[0] in {"token_embedding", "positional_embedding", "transformer",
                                   "ln_final"} for k in enc.state_dict())
    torch.manual_seed(123)  # a random tower is reproduced from its state dict
    other = text_encoder.TextEncoder("tiny")
    other.load_state_dict(enc.state_dict())
    torch.testing.assert_close(other.encode(["a red circle"]), enc.encode(["a red circle"]))


def test_text_encoder_offline_fails_fast():
    with pytest.raises(RuntimeError,
                       match="huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        text_encoder.TextEncoder(**stage_b.PRESETS["paper"]["text_encoder"])


# ---- training


def _tiny_inputs(batch=2, seed=0):
    return _inputs(stage_b.PRESETS["tiny"]["model"], (32, 32), (3, 3), batch=batch, seed=seed)


def test_shapes_finite_loss_and_gradients():
    model = stage_b.CompressorAndStageB(
        stage_b.SemanticCompressor(stage_b.PRESETS["tiny"]["compressor"]),
        stage_b.StageB(stage_b.PRESETS["tiny"]["model"]), p_zero_effnet=0.5, p_noise_effnet=0.5)
    latents, _, _, clip = _tiny_inputs(batch=4)
    images = torch.rand(4, 3, 128, 128)
    assert model.compressor(images).shape == (4, 16, 3, 3)
    x, t, effnet, _ = _tiny_inputs(batch=4)
    assert model.stage_b(x, t, effnet, clip).shape == x.shape
    # zero at init: nothing upstream would get gradients
    torch.nn.init.normal_(model.stage_b.clf[1].weight, std=0.02)
    loss = model(images, latents, clip)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # trained jointly: gradients reach the compressor
    assert model.compressor.mapper[0].weight.grad.abs().sum() > 0


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = stage_b.StageB(stage_b.PRESETS["tiny"]["model"])
    x0, _, effnet, clip = _inputs(model.cfg, (16, 16), (3, 3), n_text=8, batch=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):  # the same t and noise every step: a fixed regression target
        loss = diffusion_loss(model, x0, generator=torch.Generator().manual_seed(0), effnet=effnet,
                              clip_text=clip)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::5]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 48-image 64 px toy folder and a tiny (random) Stage A checkpoint for it."""
    from stage_a import PRESETS as A_PRESETS
    from stage_a import StageA
    from toy import write_toy_dataset
    root = tmp_path_factory.mktemp("toy_b")
    write_toy_dataset(str(root / "toy"), n=48, size=64, seed=0)
    torch.manual_seed(0)
    a = StageA(A_PRESETS["tiny"]["model"])
    a_path = str(root / "stage_a.pt")
    save_checkpoint(a_path, {"stage": "stage_a", "step": 0, "model_config": asdict(a.cfg),
                             "model": a.state_dict(), "ema": a.state_dict()})
    return str(root / "toy"), a_path


def _args(toy_run, out_dir, steps, *extra):
    data, a_path = toy_run
    return stage_b.get_args(["--data", data, "--stage_a", a_path, "--out_dir", str(out_dir),
                             "--model", "tiny", "--device", "cpu", "--num_workers", "0",
                             "--image_size", "64", "--batch_size", "4", "--num_holdout", "4",
                             "--log_every", "1", "--sample_every", "2", "--steps_b", "3",
                             "--max_steps", str(steps), "--save_every", str(steps), *extra])


def test_train_checkpoint_and_exact_resume(toy_run, tmp_path):
    stage_b.train(_args(toy_run, tmp_path / "a", 3))
    stage_b.train(_args(toy_run, tmp_path / "b", 2))
    stage_b.train(_args(toy_run, tmp_path / "b", 3, "--resume"))
    ck_a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)  # primitives and tensors only
    ck_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ck_a["stage"] == "stage_b" and ck_a["step"] == ck_b["step"] == 3
    for part in ("model", "compressor", "ema"):  # interrupted + resumed run == uninterrupted one
        for k in ck_a[part]:
            torch.testing.assert_close(ck_a[part][k], ck_b[part][k], msg=f"{part} {k}")
    assert ck_a["deps"]["stage_a"] == os.path.abspath(toy_run[1])
    assert ck_a["latent_space"]["scale"] > 0 and "state_dict" in ck_a["text_encoder"]
    assert ((tmp_path / "a" / "samples_0000002.png").exists()
            and "held-out PSNR" in (tmp_path / "a" / "log.txt").read_text())
    stage_b.train(_args(toy_run, tmp_path / "a", 3, "--resume"))  # already done: no step, no save
    done = (tmp_path / "a" / "log.txt").read_text().strip().splitlines()[-1]
    assert f"latent space {ck_a['latent_space']} |" in done  # the checkpoint's, measured again
    # the checkpoint alone rebuilds Stage B, the compressor and the (random) text encoder
    built = stage_b.load_stage_b(str(tmp_path / "a" / "ckpt.pt"))
    e = built["compressor"](torch.rand(2, 3, 64, 64))
    clip = built["text_encoder"].encode(["a red circle on a blue background", ""])
    assert (e.shape == (2, 16, 1, 1)
            and built["stage_b"](torch.randn(2, 4, 16, 16), torch.rand(2), e, clip).shape
            == (2, 4, 16, 16))
    # the EMA compressor's BatchNorm has the statistics of its own activations on the training
    # images (issue #13)
    from data import ImageFolder, split_holdout
    trainset, _ = split_holdout(ImageFolder(toy_run[0], 64, verbose=False), 4)
    compressor = built["compressor"]
    with torch.no_grad():
        h = compressor.mapper[0](compressor.features(
            torch.stack([trainset[i][0] for i in range(len(trainset))])))
    bn = compressor.mapper[1]
    torch.testing.assert_close(bn.running_mean, h.mean(dim=(0, 2, 3)), rtol=0,
                               atol=1e-4 * h.std().item())
    torch.testing.assert_close(bn.running_var, h.var(dim=(0, 2, 3)), rtol=1e-4, atol=0)


def test_no_ema_keeps_training_the_compressor_in_train_mode(toy_run, tmp_path, monkeypatch):
    """--ema_decay 0: the compressor trained is the one saved and sampled. A save (no preview) must
    not recompute its BatchNorm statistics nor leave it in eval mode (it did: training went on
    with frozen statistics, and under DDP rank 0 alone ran the BatchNorm's collective)."""
    modes, forward = [], stage_b.CompressorAndStageB.forward
    monkeypatch.setattr(stage_b.CompressorAndStageB, "forward",
                        lambda self, *a, **k: modes.append(self.compressor.training)
                        or forward(self, *a, **k))
    stage_b.train(_args(toy_run, tmp_path, 4, "--ema_decay", "0", "--save_every", "1",
                        "--sample_every", "100"))
    assert modes == [True] * 4


def test_wrong_checkpoints_name_both_stages(toy_run, tmp_path):
    data, a_path = toy_run
    with pytest.raises(ValueError,
                       match="stage_a checkpoint, but a stage_b checkpoint was expected"):
        stage_b.load_stage_b(a_path)
    save_checkpoint(str(tmp_path / "b.pt"), {"stage": "stage_b"})
    with pytest.raises(ValueError,
                       match="stage_b checkpoint, but a stage_a checkpoint was expected"):
        stage_b.train(_args((data, str(tmp_path / "b.pt")), tmp_path / "out", 1))
    with pytest.raises(FileNotFoundError, match="python stage_a.py"):
        stage_b.train(_args((data, str(tmp_path / "missing.pt")), tmp_path / "out", 1))


def test_attention_init_is_dome272s_packed_xavier():
    """q/k/v are drawn as nn.MultiheadAttention draws its packed (3C, C) in_proj (bound
    sqrt(6 / 4C)), not as three separate (C, C) xavier matrices (bound sqrt(6 / 2C)): the general
    init must not overwrite them."""
    torch.manual_seed(0)
    model = stage_b.StageB(stage_b.PRESETS["tiny"]["model"])
    attns = [m for m in model.modules() if isinstance(m, blocks.Attention)]
    assert attns
    for m in attns:
        c = m.to_q.in_features
        for proj in (m.to_q, m.to_k, m.to_v):
            top = proj.weight.abs().max().item()
            assert top <= (6 / (4 * c)) ** 0.5 and top > 0.9 * (6 / (4 * c)) ** 0.5
