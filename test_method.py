"""The method where it lives only in our training code (issue #26), tested against what it should
be rather than against another run of the same code: each piece of training math against its
formula written out here, the training loops of the three stages read at every step (LR, EMA,
conditioning and caption dropout, the constants they measure, the metrics they report), DDP against
one process, and the flags users turn, each shown to change what it should. CPU, tiny models."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import sample
import stage_a
import stage_b
import stage_b_paella
import stage_c
from blocks import to_stage_b_space, to_stage_c_space
from common import NonFiniteGuard, Runtime, ema_decay_at, get_lr, update_ema, wrap_ddp
from data import holdout_batch, open_data
from diffusion import (add_noise, alpha_bar, caption_dropout, diffusion_loss, drop_captions,
                       p2_weight, sample_t)
from finetune import LORA_TARGETS, LoRALinear, add_lora, add_lora_from_args, save_lora
from stage_a import StageA, StageAConfig, discriminator_loss, generator_adv_loss
from stage_b import CompressorAndStageB, SemanticCompressor, StageB, measure_latent_space
from stage_c import StageC
from toy import toy_prompts

# fixtures of the stage tests: toy data with tiny random checkpoints under it
from conftest import write_random_chain
from test_stage_a import FAST as A_FAST
from test_stage_a import toy  # noqa: F401
from test_stage_b import _args as b_args
from test_stage_b import toy_run  # noqa: F401
from test_stage_c import args_for as c_args
from test_stage_c import env  # noqa: F401

PROMPT = "a red circle on a blue background"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread

# ---- the training math, each piece against its formula


def cosine_abar(t, s=0.008):
    """abar(t) of the cosine schedule (method §6.1) in float64: cos^2((t + s) / (1 + s) pi/2)
    normalised by its value at t = 0, clamped to [1e-4, 0.9999]."""
    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return min(max(f(t) / f(0), 1e-4), 0.9999)


def test_forward_process_has_the_square_roots():
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0])
    ab = torch.tensor([cosine_abar(v) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar(t).double(), ab, rtol=1e-5, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(7, 2, 3, 3, generator=g), torch.randn(7, 2, 3, 3, generator=g)
    ab = ab.view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    torch.testing.assert_close(add_noise(x0, t, eps).double(), expected, rtol=1e-5, atol=1e-6)


def test_timesteps_are_uniform_stretched_by_1_08_and_clamped_at_1():
    """t = 1.08 (1 - u) + 0.001 with u ~ U(0, 1), clamped to 1 (method §6.2): uniform on
    [0.001, 1) with density 1 / 1.08, and the rest, 1 - 0.999 / 1.08 = 7.5 %, exactly at t = 1."""
    t = sample_t(200_000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 and t.max() == 1.0
    assert abs((t == 1.0).float().mean().item() - (1 - 0.999 / 1.08)) < 0.003
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs((t <= q).float().mean().item() - (q - 0.001) / 1.08) < 0.004, q


@pytest.mark.parametrize("k, gamma", [(None, None), (1.0, 0.5), (0.5, 2.0)])
def test_p2_weight_is_k_plus_snr_to_the_minus_gamma(k, gamma):
    """(k + SNR(t))^-gamma, SNR = abar / (1 - abar) (method §6.3); the default k = gamma = 1."""
    t = torch.linspace(0.05, 0.95, 7)
    kw = {} if k is None else {"k": k, "gamma": gamma}
    k, gamma = k or 1.0, gamma or 1.0
    expected = [(k + a / (1 - a)) ** -gamma for a in map(cosine_abar, t.tolist())]
    torch.testing.assert_close(p2_weight(t, **kw).double(), torch.tensor(expected,
                                                                        dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_diffusion_loss_on_a_fixed_batch_by_hand():
    """diffusion_loss with a fixed stand-in model against the loss written out here: t from the
    generator's first B uniforms, then eps; x_t by the forward process; per sample the MSE of the
    predicted noise times the P2 weight 1 / (1 + SNR); the batch mean."""
    def model(x, t, c):  # a fixed noise predictor that reads x_t, t and a condition
        return 0.5 * x + c * t.view(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(1)
    x0, c = torch.randn(6, 4, 5, 5, generator=g), torch.randn(6, 1, 1, 1, generator=g)
    loss, per_sample, t = diffusion_loss(model, x0, torch.Generator().manual_seed(7),
                                         return_per_sample=True, c=c)
    g = torch.Generator().manual_seed(7)
    u, eps = torch.rand(6, generator=g).double(), torch.randn(x0.shape, generator=g).double()
    t_hand = (1.08 * (1 - u) + 0.001).clamp(max=1.0)
    ab = torch.tensor([cosine_abar(v) for v in t_hand.tolist()], dtype=torch.float64)
    x_t = ab.sqrt().view(-1, 1, 1, 1) * x0.double() + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    mse = ((0.5 * x_t + c.double() * t_hand.view(-1, 1, 1, 1) - eps) ** 2).mean(dim=(1, 2, 3))
    weighted = mse / (1 + ab / (1 - ab))
    torch.testing.assert_close(t.double(), t_hand, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_sample.double(), weighted, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double(), weighted.mean(), rtol=1e-5, atol=1e-7)


def test_ema_update_and_its_warm_up():
    """ema <- d ema + (1 - d) model for parameters, buffers copied; d = min(decay, (1 + step) /
    (10 + step)): an average over the ~(10 + step) / 9 last steps early on, then `decay`."""
    for decay in (0.999, 0.9, 0.2):
        for step in (0, 1, 2, 5, 50, 5000):
            assert ema_decay_at(step, decay) == pytest.approx(min(decay, (1 + step) / (10 + step)))
    torch.manual_seed(0)
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    for m in (model, ema):
        m.weight.data.normal_()
        m.bias.data.normal_()
        m(torch.randn(8, 3))  # running statistics of their own
    before = copy.deepcopy(ema)
    update_ema(ema, model, 0.3)
    for p_ema, p_before, p in zip(ema.parameters(), before.parameters(), model.parameters()):
        torch.testing.assert_close(p_ema, 0.3 * p_before + 0.7 * p)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        assert torch.equal(b_ema, b)


def test_lr_warms_up_linearly_then_stays():
    """lr (step + 1) / warmup for the first `warmup` steps, then lr (method §6.5)."""
    assert [get_lr(s, 1e-3, 4) for s in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert get_lr(0, 1e-3, 0) == get_lr(0, 1e-3, 1) == 1e-3


def test_gan_losses_have_the_non_saturating_signs():
    """Generator: -log sigmoid(D(fake)), lowered by raising D(fake). Discriminator:
    -log sigmoid(D(real)) - log(1 - sigmoid(D(fake))), with no gradient into the fake images."""
    gain = torch.ones((), requires_grad=True)

    def disc(x):  # the images (times a weight of 1) are their own logits
        return x * gain
    real = torch.tensor([-1.0, 0.5, 2.0, 3.0]).view(4, 1, 1, 1)
    fake = torch.tensor([-3.0, -0.5, 0.0, 2.0]).view(4, 1, 1, 1).requires_grad_()
    g_loss = generator_adv_loss(disc, fake)
    torch.testing.assert_close(g_loss, -torch.sigmoid(fake.detach()).log().mean())
    g_loss.backward()
    assert (fake.grad < 0).all()  # descending the loss raises D(fake): the generator fools D
    fake.grad = None
    d_loss = discriminator_loss(disc, real, fake)
    expected = (-torch.sigmoid(real).log().mean()
                - (1 - torch.sigmoid(fake.detach())).log().mean())
    torch.testing.assert_close(d_loss, expected)
    d_loss.backward()
    assert fake.grad is None and gain.grad is not None


def test_scale_factor_makes_the_latents_unit_variance():
    """Stage A's scale_factor is the std of the raw latents: encode() = raw / scale_factor then
    has unit variance."""
    torch.manual_seed(0)
    model = StageA(StageAConfig(c_hidden=32, bottleneck_blocks=1, codebook_size=64)).eval()
    model.down_blocks[-1][1].weight.data.fill_(2.5)  # the encoder's BatchNorm: latents of std ~2.5
    images = torch.rand(4, 3, 32, 32)
    model.cfg.scale_factor = stage_a.measure_scale_factor(model, images)
    assert abs(model.cfg.scale_factor - 1) > 0.5
    with torch.no_grad():
        assert abs(model.encode(images).std().item() - 1) < 1e-3


def test_latent_space_standardises_the_semantic_latents():
    """Stage C's space y = (e + shift) / scale, with shift and scale measured, has mean 0 and std 1
    over the images measured; to_stage_b_space is its inverse."""
    torch.manual_seed(0)
    compressor = SemanticCompressor(stage_b.PRESETS["tiny"]["compressor"]).eval()
    compressor.mapper[1].weight.data.fill_(50.0)  # the BatchNorm: e of std ~2 around 0.7
    compressor.mapper[1].bias.data.fill_(0.7)
    images = torch.rand(6, 3, 128, 128)
    space = measure_latent_space(compressor, images)
    with torch.no_grad():
        e = compressor(images)
    y = (e + space["shift"]) / space["scale"]
    assert abs(y.mean().item()) < 1e-3 and abs(y.std().item() - 1) < 1e-3
    assert space["shift"] < -0.3 and abs(space["scale"] - 1) > 0.5  # far from {1, 0}
    torch.testing.assert_close(to_stage_c_space(e, space), y)
    torch.testing.assert_close(to_stage_b_space(y, space), e, rtol=1e-5, atol=1e-5)


def test_conditioning_dropout_and_noise_on_e_per_sample():
    """CompressorAndStageB.perturb on 20,000 samples in one batch (method §3.4, §6.4): each zeroed
    with p_zero; of the others, p_noise noised in Stage C's space by the forward process at
    t ~ U(0, 0.5); the rest untouched. Noised: y' = sqrt(abar(t)) y + sqrt(1 - abar(t)) eps, so
    the regression of y' on y (per sample) squared averages E[abar(t)], and adding the residual's
    variance gives 1."""
    space = {"scale": 2.0, "shift": 0.5}
    model = CompressorAndStageB(nn.Identity(), nn.Identity(), p_zero_effnet=0.1,
                                p_noise_effnet=0.3, latent_space=space)
    torch.manual_seed(0)
    e = torch.randn(20_000, 16, 4, 4) * space["scale"] - space["shift"]  # y ~ N(0, 1)
    out = model.perturb(e)
    zeroed = (out == 0).flatten(1).all(1)
    noised = (out != e).flatten(1).any(1) & ~zeroed
    assert abs(zeroed.float().mean().item() - 0.1) < 0.01
    assert abs(noised.float().mean().item() - 0.9 * 0.3) < 0.015
    y, y_out = ((x[noised] + space["shift"]) / space["scale"] for x in (e, out))
    a = (y * y_out).flatten(1).sum(1) / (y * y).flatten(1).sum(1)  # ~ sqrt(abar(t)) per sample
    residual = (y_out - a.view(-1, 1, 1, 1) * y).flatten(1).var(1)  # ~ 1 - abar(t)
    mean_abar = sum(cosine_abar(0.5 * (i + 0.5) / 1000) for i in range(1000)) / 1000
    assert abs((a ** 2).mean().item() - mean_abar) < 0.01
    assert abs((a ** 2 + residual).mean().item() - 1) < 0.02


def test_caption_dropout_rate_per_sample():
    torch.manual_seed(0)
    drop = caption_dropout(200_000, 0.05)
    assert drop.dtype == torch.bool and abs(drop.float().mean().item() - 0.05) < 0.0025
    assert drop_captions(["a", "b", "c"], torch.tensor([False, True, False])) == ["a", "", "c"]

# ---- the training loops, read at every step


def record_training(monkeypatch, module, args):
    """Train `module` with its parsed `args` (--save_every 1), recording at each optimizer step the
    LR of every optimizer as it steps, and every checkpoint saved (one per step). Returns (lrs,
    checkpoints)."""
    lrs, saved = [], []
    guarded_step, save = NonFiniteGuard.step, module.save_checkpoint

    def recorded_step(self, step, loss, optimizers, grad_clip):
        lrs.append([g["lr"] for opt, _ in optimizers for g in opt.param_groups])
        return guarded_step(self, step, loss, optimizers, grad_clip)

    def recorded_save(path, ckpt):
        saved.append(copy.deepcopy(ckpt))
        save(path, ckpt)
    monkeypatch.setattr(NonFiniteGuard, "step", recorded_step)
    monkeypatch.setattr(module, "save_checkpoint", recorded_save)
    module.train(args)
    return lrs, saved


def assert_lr_warm_up(lrs, lr, warmup):
    for step, seen in enumerate(lrs):
        assert seen == pytest.approx([lr * min(1, (step + 1) / warmup)] * len(seen)), step


def assert_ema_recurrence(saved, raw, ema, decay):
    """One optimizer step apart, checkpoints k - 1 and k hold ema_k = d ema_{k-1} + (1 - d) raw_k
    for every parameter (BatchNorm statistics are the EMA's own), d = min(decay, k / (9 + k))."""
    for prev, ckpt in zip(saved, saved[1:]):
        k = ckpt["step"]
        assert k == prev["step"] + 1
        d = min(decay, k / (9 + k))
        for name, w in ckpt[raw].items():
            if w.is_floating_point() and "running_" not in name:
                torch.testing.assert_close(ckpt[ema][name].double(),
                                           d * prev[ema][name].double() + (1 - d) * w.double(),
                                           rtol=1e-5, atol=1e-6, msg=f"{ema} {name} step {k}")


def held_out(args):
    """The held-out images and captions of a run with `args`, as its training loop reads them."""
    return holdout_batch(open_data(args, verbose=False)[1], "cpu")


def test_stage_a_loop_lr_ema_scale_factor_and_psnr(toy, tmp_path, monkeypatch):  # noqa: F811
    """3 steps of stage_a.py (the GAN from step 2): both optimizers step at the warm-up LR; the EMA
    follows its recurrence; the checkpoint's scale_factor makes its EMA's latents of the held-out
    images unit-variance, and its held-out PSNR is theirs, written out here."""
    argv = ["--data", toy, "--out_dir", str(tmp_path), "--max_steps", "3", "--save_every", "1",
            "--warmup", "2", "--lr", "1e-3", "--ema_decay", "0.2", "--restart_every", "1000"]
    args = stage_a.get_args(argv + A_FAST)
    lrs, saved = record_training(monkeypatch, stage_a, args)
    assert [len(seen) for seen in lrs] == [1, 2, 2]  # the discriminator's from --disc_start 1
    assert_lr_warm_up(lrs, 1e-3, 2)
    assert_ema_recurrence(saved, "model", "ema", 0.2)
    last = saved[-1]
    model = StageA(StageAConfig(**last["model_config"]))
    model.load_state_dict(last["ema"])
    held, _ = held_out(args)
    with torch.no_grad():
        assert abs(model.eval().encode(held).std().item() - 1) < 1e-3
        recon = model.decode_raw(model.encode_raw(held)).clamp(0, 1)
    mse = ((recon - held) ** 2).flatten(1).mean(1)  # PSNR per image, then the mean
    assert last["metrics"]["holdout_psnr"] == pytest.approx((-10 * mse.log10()).mean().item(),
                                                             abs=1e-3)


def test_stage_b_loop_lr_ema_dropouts_latent_space_and_psnr(toy_run, tmp_path,  # noqa: F811
                                                            monkeypatch):
    """3 steps of stage_b.py at --p_drop_text, --p_zero_effnet and --p_noise_effnet 0.5: every
    step's e is perturbed (zeroed, noised or kept) and captions dropped to the empty one, at about
    those rates; warm-up LR; the EMA's recurrence for Stage B and the compressor; the checkpoint's
    latent space standardises its EMA compressor's e of the held-out images; its held-out PSNR is
    that of the preview, sampled again here."""
    perturbed, texts = [], []
    perturb, forward = CompressorAndStageB.perturb, CompressorAndStageB.forward

    def recorded_perturb(self, e):
        out = perturb(self, e)
        perturbed.append((e.detach().clone(), out.detach().clone()))
        return out

    def recorded_forward(self, images, latents, clip_text):
        texts.append(clip_text.clone())
        return forward(self, images, latents, clip_text)
    monkeypatch.setattr(CompressorAndStageB, "perturb", recorded_perturb)
    monkeypatch.setattr(CompressorAndStageB, "forward", recorded_forward)
    extra = ["--batch_size", "8", "--save_every", "1", "--sample_every", "100", "--warmup", "2",
             "--lr", "1e-3", "--ema_decay", "0.2", "--p_drop_text", "0.5", "--p_zero_effnet",
             "0.5", "--p_noise_effnet", "0.5"]
    args = b_args(toy_run, tmp_path, 3, *extra)
    lrs, saved = record_training(monkeypatch, stage_b, args)
    assert len(perturbed) == len(texts) == 3
    assert_lr_warm_up(lrs, 1e-3, 2)
    assert_ema_recurrence(saved, "model", "ema", 0.2)
    assert_ema_recurrence(saved, "compressor", "compressor_ema", 0.2)
    e, out = (torch.cat(x) for x in zip(*perturbed))  # 24 samples
    zeroed = (out == 0).flatten(1).all(1)
    noised = (out != e).flatten(1).any(1) & ~zeroed
    assert 4 <= zeroed.sum() <= 20 and noised.sum() >= 1 and (~zeroed & ~noised).sum() >= 1
    parts = stage_b.load_stage_b(str(tmp_path / "ckpt.pt"))
    empty = parts["text_encoder"].encode([""])[0]
    dropped = torch.tensor([torch.equal(row, empty) for row in torch.cat(texts)])
    assert 4 <= dropped.sum() <= 20
    # the latent space, and the held-out PSNR of the last preview
    held, captions = held_out(args)
    last = saved[-1]
    with torch.no_grad():
        e = parts["compressor"](held)
        y = (e + last["latent_space"]["shift"]) / last["latent_space"]["scale"]
        assert abs(y.mean().item()) < 2e-3 and abs(y.std().item() - 1) < 2e-3
        stage_a_model = stage_a.load_stage_a(toy_run[1])
        side = stage_a_model.encode(held).shape[-2:]
        recon = parts["stage_b"].sample(stage_a_model, e, parts["text_encoder"].encode(captions),
                                        steps=3, generator=torch.Generator().manual_seed(0),
                                        side=side)
    mse = ((recon - held) ** 2).flatten(1).mean(1)
    assert last["metrics"]["holdout_psnr"] == pytest.approx((-10 * mse.log10()).mean().item(),
                                                             abs=1e-3)


def test_stage_c_loop_lr_ema_caption_dropout_checkpointing_guidance(env, tmp_path,  # noqa: F811
                                                                    monkeypatch):
    """3 steps of stage_c.py at --p_drop_text 0.5 with --grad_checkpointing and --guidance_c 2.5:
    captions dropped to the empty one at about that rate, every triple recomputed in backward, the
    previews guided at 2.5; warm-up LR and the EMA's recurrence."""
    texts, checkpointed, guidance = [], [], []
    inputs, checkpoint, ddpm_sample = (stage_c.training_inputs, stage_c.checkpoint,
                                       stage_c.ddpm_sample)

    def recorded_inputs(*args, **kwargs):
        y, clip_text = inputs(*args, **kwargs)
        texts.append(clip_text.clone())
        return y, clip_text

    def recorded_checkpoint(*args, **kwargs):
        checkpointed.append(1)
        return checkpoint(*args, **kwargs)

    def recorded_sample(model, noise, timesteps, cond, uncond=None, guidance_scale=0.0, *rest):
        guidance.append(guidance_scale)
        return ddpm_sample(model, noise, timesteps, cond, uncond, guidance_scale, *rest)
    monkeypatch.setattr(stage_c, "training_inputs", recorded_inputs)
    monkeypatch.setattr(stage_c, "checkpoint", recorded_checkpoint)
    monkeypatch.setattr(stage_c, "ddpm_sample", recorded_sample)
    args = c_args(env, tmp_path, "--max_steps", "3", "--save_every", "1", "--sample_every", "100",
                  "--warmup", "2", "--lr", "1e-3", "--ema_decay", "0.2", "--p_drop_text", "0.5",
                  "--grad_checkpointing", "--guidance_c", "2.5")
    lrs, saved = record_training(monkeypatch, stage_c, args)
    assert_lr_warm_up(lrs, 1e-3, 2)
    assert_ema_recurrence(saved, "model", "ema", 0.2)
    empty = stage_c.load_stage_c(str(tmp_path / "ckpt.pt"))["text_encoder"].encode([""])[0]
    dropped = torch.tensor([torch.equal(row, empty) for row in torch.cat(texts)])
    assert len(dropped) == 24 and 4 <= dropped.sum() <= 20
    assert len(checkpointed) == 3 * stage_c.PRESETS["tiny"]["model"].depth  # training passes only
    assert guidance and set(guidance) == {2.5}


@pytest.mark.parametrize("stage", ["a", "b"])
def test_without_ema_the_measurements_are_of_the_eval_mode_model(stage, toy, toy_run,  # noqa: F811
                                                                 tmp_path, monkeypatch):
    """--ema_decay 0: the trained model is its own EMA, in train mode between steps. Its
    checkpoint's scale_factor (Stage A) or latent space (Stage B) and held-out PSNR are those of the
    model as it is used after, in eval mode (BatchNorm's running statistics), and training goes on
    in train mode. (Measured in train mode, with the held-out batch's own statistics, they would
    move the running ones: the latents' std comes out 0.28 instead of 1 here; and under DDP rank 0
    alone would enter BatchNorm's collective, and two ranks would hang at the first checkpoint.)"""
    module, model_class = (stage_a, StageA) if stage == "a" else (stage_b, CompressorAndStageB)
    modes, forward = [], model_class.forward  # Stage A's, or Stage B's compressor's
    monkeypatch.setattr(model_class, "forward", lambda self, *a: modes.append(
        getattr(self, "compressor", self).training) or forward(self, *a))
    extra = ["--max_steps", "2", "--save_every", "1", "--sample_every", "100", "--ema_decay", "0"]
    if stage == "a":
        args = stage_a.get_args(["--data", toy, "--out_dir", str(tmp_path)] + A_FAST + extra)
    else:
        args = b_args(toy_run, tmp_path, 2, *extra)
    module.train(args)
    assert modes == [True, True]
    held, captions = held_out(args)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    with torch.no_grad():
        if stage == "a":
            model = StageA(StageAConfig(**ckpt["model_config"]))
            model.load_state_dict(ckpt["ema"])
            assert abs(model.eval().encode(held).std().item() - 1) < 1e-3
            recon = model.decode_raw(model.encode_raw(held)).clamp(0, 1)
            mse = ((recon - held) ** 2).flatten(1).mean(1)
            assert ckpt["metrics"]["holdout_psnr"] == pytest.approx(
                (-10 * mse.log10()).mean().item(), abs=1e-3)
        else:
            compressor = stage_b.load_stage_b(str(tmp_path / "ckpt.pt"), parts=("compressor",))
            y = to_stage_c_space(compressor["compressor"](held), ckpt["latent_space"])
            assert abs(y.mean().item()) < 2e-3 and abs(y.std().item() - 1) < 2e-3


# ---- DDP: two ranks train as one process does


class NoisePrediction(nn.Module):
    """The diffusion objective on given t and noise (diffusion_loss without its random draws, so
    that a batch split over ranks sees the same ones): Stage C on x_t, or Stage B with its semantic
    compressor (BatchNorm) giving e from the images."""

    def __init__(self, model, compressor=None):
        super().__init__()
        self.model, self.compressor = model, compressor

    def forward(self, x0, t, noise, text, images=None):
        x_t = add_noise(x0, t, noise)
        if self.compressor is None:
            pred = self.model(x_t, t, text)
        else:
            pred = self.model(x_t, t, self.compressor(images), text)
        return (pred - noise).pow(2).mean()


def ddp_case(stage):
    """The same model and global batch of 8 on every call: Stage B (tiny DiffNeXt, its compressor
    with a BatchNorm) or Stage C (tiny, no BatchNorm), output layers made non-zero."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if stage == "b":
        model = StageB(stage_b.PRESETS["tiny"]["model"])
        nn.init.normal_(model.clf[1].weight, std=0.02)
        module = NoisePrediction(model, SemanticCompressor(stage_b.PRESETS["tiny"]["compressor"]))
        x0, text = torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 8, 64, generator=g)
        extra = (torch.rand(8, 3, 64, 64, generator=g),)  # e: (8, 16, 1, 1)
    else:
        model = StageC(stage_c.PRESETS["tiny"]["model"])
        nn.init.normal_(model.out[1].weight, std=0.02)
        module = NoisePrediction(model)
        x0, text = torch.randn(8, 16, 3, 3, generator=g), torch.randn(8, 77, 64, generator=g)
        extra = ()
    batch = (x0, torch.rand(8, generator=g), torch.randn(x0.shape, generator=g), text) + extra
    return module, batch


def train_steps(module, batch, rt, part, steps=3):
    """`steps` guarded SGD steps through wrap_ddp on the samples `part` of the batch; the weights
    and buffers after."""
    model = wrap_ddp(module, rt)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    guard = NonFiniteGuard(rt, "unused.pt", model=module)
    for step in range(steps):
        loss = model(*(x[part] for x in batch))
        loss.backward()
        guard.step(step, loss, [(opt, rt.make_scaler())], grad_clip=1.0)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def ddp_worker(rank, port, stage, queue):
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rt = Runtime(torch.device("cpu"), ddp=True, rank=rank, world_size=2)
    state = train_steps(*ddp_case(stage), rt, slice(4 * rank, 4 * rank + 4))
    queue.put((rank, {k: v.numpy() for k, v in state.items()}))  # by value: this process ends
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", ["b", "c"])
def test_two_ranks_train_as_one_process_on_the_whole_batch(stage):
    """Two gloo processes, each on its half of a global batch of 8, wrapped by wrap_ddp, end 3 steps
    with the weights (and BatchNorm statistics) of one process on all 8: gradients averaged over
    ranks, BatchNorm over the global batch (Stage B's compressor). One process on half the batch
    ends elsewhere: the comparison can fail."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=ddp_worker, args=(rank, port, stage, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    ranks = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    one = Runtime(torch.device("cpu"))
    whole = train_steps(*ddp_case(stage), one, slice(0, 8))
    half = train_steps(*ddp_case(stage), one, slice(0, 4))
    for k, v in whole.items():
        for rank in (0, 1):
            torch.testing.assert_close(torch.from_numpy(ranks[rank][k]), v, rtol=1e-4, atol=1e-6,
                                       msg=f"rank {rank} {k}")
    assert max((half[k] - v).abs().max() for k, v in whole.items() if v.is_floating_point()) > 1e-3

# ---- the flags users turn, each changing what it should


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tiny random checkpoints of the three stages and of a Paella Stage B, and toy images."""
    return write_random_chain(tmp_path_factory.mktemp("chain"))


def sample_argv(chain, out, *extra):
    return ["--stage_a", str(chain / "a.pt"), "--stage_b", str(chain / "b.pt"), "--stage_c",
            str(chain / "c.pt"), "--steps_c", "4", "--steps_b", "2", "--device", "cpu",
            "--out_dir", str(out), *extra]


def test_strength_0_is_the_variation_and_1_the_text_to_image(chain, tmp_path, monkeypatch):
    """sample.py --init_image --strength s: the Stage C latent it hands Stage B is, at 0, the
    image's own (the variation's, but for the 1 % of noise the schedule keeps at t = 0), at 1 the
    text-to-image sample of the seed (from noise holding 1 % of the image), and at 0.5 neither."""
    latents, decode = [], sample.stage_b_and_a
    monkeypatch.setattr(sample, "stage_b_and_a",
                        lambda pipe, y, *a: latents.append(y.clone()) or decode(pipe, y, *a))
    image = str(chain / "toy" / "00000.png")
    runs = (["--variation", image], ["--init_image", image, "--strength", "0"],
            ["--init_image", image, "--strength", "0.5"],
            ["--init_image", image, "--strength", "1"], [])
    for flags in runs:
        sample.main(sample.get_args(sample_argv(chain, tmp_path, "--prompt", PROMPT, *flags)))
    variation, s0, s05, s1, text_to_image = latents
    assert (s0 - variation).abs().max() < 0.05
    assert (s1 - text_to_image).abs().max() < 0.05
    assert min((s05 - variation).abs().max(), (s05 - text_to_image).abs().max()) > 0.2
    assert (variation - text_to_image).abs().max() > 0.5


def test_lora_files_for_b_and_c_merge_at_lora_scale(chain, tmp_path):
    """sample.py --lora with a decoder (Stage B) and a prior (Stage C) LoRA: every adapted weight
    becomes W + lora_scale (alpha / r) B A, written out here from the adapters, at scales 0, 0.5
    and 1; every other weight stays the checkpoint's."""
    base = sample.load_pipeline(*(str(chain / f"{k}.pt") for k in "abc"))
    files, updates = [], {}
    for name, prefix in (("stage_b", "decoder"), ("stage_c", "prior")):
        adapted = copy.deepcopy(getattr(base, name))
        layers = add_lora(adapted, LORA_TARGETS, rank=2, alpha=6)
        for layer in layers:
            nn.init.normal_(adapted.get_submodule(layer).lora_B.weight)
        files.append(str(tmp_path / f"{prefix}.safetensors"))
        save_lora(files[-1], adapted, prefix, f"the test {prefix}",
                  {"rank": 2, "alpha": 6, "targets": LORA_TARGETS})
        updates[name] = {f"{layer}.weight": 3 * adapted.get_submodule(layer).lora_B.weight
                         @ adapted.get_submodule(layer).lora_A.weight for layer in layers}
    for scale in (0.0, 0.5, 1.0):
        argv = sample_argv(chain, tmp_path, "--lora", files[0], "--lora", files[1],
                           "--lora_scale", str(scale))
        pipe = sample.open_pipeline(sample.get_args(argv), torch.device("cpu"), torch.float32)
        for name, update in updates.items():
            merged, before = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
            assert update.keys() <= merged.keys()
            for k, w in before.items():
                expected = w + scale * update[k] if k in update else w
                torch.testing.assert_close(merged[k], expected, rtol=1e-5, atol=1e-6,
                                           msg=f"{name} {k} at scale {scale}")


def test_prompts_file_adds_a_prompt_per_line(chain, tmp_path, monkeypatch):
    """--prompts_file: one prompt per non-empty line (stripped), after the --prompt ones."""
    saved, save = [], sample.save_outputs
    monkeypatch.setattr(sample, "save_outputs",
                        lambda images, captions, *a: saved.append((images, captions))
                        or save(images, captions, *a))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\n  a green square on a white background  \n")
    sample.main(sample.get_args(sample_argv(chain, tmp_path, "--prompt", "a circle",
                                            "--prompts_file", str(prompts))))
    images, captions = saved[0]
    assert captions == ["a circle", PROMPT, "a green square on a white background"]
    assert images.shape == (3, 3, 128, 128)


def test_guidance_c_and_temperature_b_reach_the_samplers(chain, tmp_path, monkeypatch):
    """--guidance_c guides Stage C's sampler (text-to-image and image-to-image; 4 when unset);
    --temperature_b sets a Paella Stage B's token temperatures (v1's 1.0 -> 0.6 when unset)."""
    guidance, temperatures = [], []
    ddpm_sample, sample_tokens = stage_c.ddpm_sample, stage_b_paella.sample_tokens

    def recorded_ddpm(model, noise, timesteps, cond, uncond=None, guidance_scale=0.0, *rest):
        guidance.append(guidance_scale)
        return ddpm_sample(model, noise, timesteps, cond, uncond, guidance_scale, *rest)

    def recorded_tokens(*args, temperature, **kwargs):
        temperatures.append(temperature)
        return sample_tokens(*args, temperature=temperature, **kwargs)
    monkeypatch.setattr(stage_c, "ddpm_sample", recorded_ddpm)
    monkeypatch.setattr(sample, "ddpm_sample", recorded_ddpm)
    monkeypatch.setattr(stage_b_paella, "sample_tokens", recorded_tokens)
    image = str(chain / "toy" / "00000.png")
    for flags in ([], ["--init_image", image], ["--guidance_c", "7.5"],
                  ["--init_image", image, "--guidance_c", "7.5"]):
        sample.main(sample.get_args(sample_argv(chain, tmp_path, "--prompt", PROMPT, *flags)))
    assert guidance == [4.0, 4.0, 7.5, 7.5]
    paella = ["--stage_b", str(chain / "paella.pt")]
    for flags in ([], ["--temperature_b", "0.3", "0.1"]):
        sample.main(sample.get_args(sample_argv(chain, tmp_path, "--prompt", PROMPT, *paella,
                                                *flags)))
    assert temperatures == [(1.0, 0.6), (0.3, 0.1)]


def test_lora_targets_pick_the_adapted_layers():
    """--lora_targets: adapters on exactly the Linear layers so named (or so ending), the base
    frozen; the default, the attention projections."""
    argv = ["--data", "unused", "--lora_rank", "2"]
    assert stage_b.get_args(argv).lora_targets == stage_c.get_args(argv).lora_targets == [
        "to_q", "to_k", "to_v", "to_out.0"]
    args = stage_c.get_args(argv + ["--lora_targets", "channelwise.0", "cond_mapper.0"])
    model = StageC(stage_c.PRESETS["tiny"]["model"])
    assert add_lora_from_args(model, args) == {"rank": 2, "alpha": 2,
                                               "targets": ["channelwise.0", "cond_mapper.0"]}
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {"cond_mapper.0"} | {f"blocks.{3 * k}.channelwise.0" for k in range(2)}
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_eval_toy_reports_the_accuracy_of_its_images(chain, tmp_path, monkeypatch, capsys):
    """sample.py --eval_toy: the accuracies it prints and writes are those of the images it saves,
    each read back by the toy classifier against its prompt's colour and shape."""
    import json

    from toy import LOOKS, classify_toy_image
    saved, save = [], sample.save_outputs
    monkeypatch.setattr(sample, "save_outputs",
                        lambda images, captions, *a: saved.append(images) or save(images,
                                                                                  captions, *a))
    sample.main(sample.get_args(sample_argv(chain, tmp_path, "--eval_toy", "--n", "1")))
    report = json.loads((tmp_path / "eval_toy.json").read_text())
    read = [classify_toy_image(img, "bold") for img in saved[0]]
    targets = [(c, s) for _, c, s in toy_prompts("bold")]
    assert len(read) == len(targets) == report["images"]
    for i, key in ((0, "colour"), (1, "shape")):
        assert report[key] == pytest.approx(sum(r[i] == t[i] for r, t in zip(read, targets))
                                            / len(targets))
    assert report["both"] == pytest.approx(sum(r == t for r, t in zip(read, targets))
                                           / len(targets))
    assert report["chance_colour"] == 1 / len(LOOKS["bold"]["colors"])
    assert json.loads(capsys.readouterr().out.splitlines()[-2])["colour"] == round(
        report["colour"], 3)


def test_grad_accum_2_takes_the_steps_of_one_batch(env, tmp_path, monkeypatch):  # noqa: F811
    """stage_c.py --batch_size 8 --grad_accum 2 (two micro-batches of 4) computes at every step the
    gradients of --grad_accum 1 (one batch of 8), and ends with its weights. (The loss is made
    deterministic, fixed t and noise per sample, and captions are kept, so that the two runs'
    random draws cannot differ.)"""
    def fixed_loss(model, y, **cond):
        t = torch.full((len(y),), 0.5)
        return (model(add_noise(y, t, y.flip(1)), t, **cond) - y.flip(1)).pow(2).mean()
    monkeypatch.setattr(stage_c, "diffusion_loss", fixed_loss)
    runs, guarded_step = [], NonFiniteGuard.step

    def recorded_step(self, step, loss, optimizers, grad_clip):
        runs[-1].append([p.grad.clone() for opt, _ in optimizers for g in opt.param_groups
                         for p in g["params"]])
        return guarded_step(self, step, loss, optimizers, grad_clip)
    monkeypatch.setattr(NonFiniteGuard, "step", recorded_step)
    for accum in (1, 2):
        runs.append([])
        stage_c.train(c_args(env, tmp_path / str(accum), "--max_steps", "2", "--p_drop_text", "0",
                             "--grad_accum", str(accum), "--sample_every", "100"))
    for step, (one, two) in enumerate(zip(*runs)):
        for g1, g2 in zip(one, two):
            torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7, msg=f"step {step}")
    weights = [torch.load(tmp_path / str(accum) / "ckpt.pt", weights_only=True)["model"]
               for accum in (1, 2)]
    for k, w in weights[0].items():
        torch.testing.assert_close(weights[1][k], w, rtol=1e-4, atol=1e-6, msg=k)


def saved_for_backward(model, inputs):
    """Bytes of the tensors a forward pass keeps for the backward pass (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs).square().mean().backward()
    return sum(storages.values())


def test_grad_checkpointing_keeps_fewer_activations():
    """--grad_checkpointing: Stage C keeps only each triple's input for the backward pass, and
    recomputes the rest (the gradients are the same: test_stage_c)."""
    torch.manual_seed(0)
    model = StageC(stage_c.StageCConfig(c=64, c_cond=64, depth=4, nhead=4)).train()
    inputs = (torch.randn(2, 16, 6, 6), torch.rand(2), torch.randn(2, 77, 64))
    kept = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        kept.append(saved_for_backward(model, inputs))
    assert kept[1] < 0.5 * kept[0], kept


@pytest.mark.parametrize("stage, dtype", [("a", "bfloat16"), ("b", "bfloat16"), ("c", "bfloat16"),
                                          ("c", "float16")])
def test_low_precision_training_steps_on_the_cpu(stage, dtype, toy, toy_run, env,  # noqa: F811
                                                 tmp_path, monkeypatch):
    """--dtype bfloat16 / float16: the trained model's layers compute in that dtype (autocast),
    weights stay float32, the steps update them (none skipped), and float16 has a GradScaler."""
    module = {"a": stage_a, "b": stage_b, "c": stage_c}[stage]
    seen = []

    def record(m, inputs, out):
        if isinstance(m, nn.Linear) and torch.is_grad_enabled():  # the training forward passes
            seen.append(out.dtype)
    hook = nn.modules.module.register_module_forward_hook(record)
    extra = ["--max_steps", "2", "--save_every", "2", "--sample_every", "100", "--dtype", dtype]
    try:
        if stage == "a":
            module.train(module.get_args(["--data", toy, "--out_dir", str(tmp_path)] + A_FAST
                                         + extra))
        elif stage == "b":
            module.train(b_args(toy_run, tmp_path, 2, *extra))
        else:
            module.train(c_args(env, tmp_path, *extra))
    finally:
        hook.remove()
    assert seen and set(seen) == {getattr(torch, dtype)}
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all()
               for w in ckpt["model"].values() if w.is_floating_point())
    assert any(not torch.equal(w, ckpt["ema"][k]) for k, w in ckpt["model"].items())  # trained
    assert "skipped" not in (tmp_path / "log.txt").read_text()
    assert bool(ckpt["scaler"]) == (dtype == "float16")  # an enabled GradScaler's state


def test_compile_trains_the_weights_of_an_uncompiled_run(env, tmp_path, monkeypatch):  # noqa: F811
    """stage_c.py --compile: the whole prior compiled (here with the aot_eager backend: dynamo's
    graphs and AOT autograd's backward without inductor's code generation, which takes minutes on a
    CPU) trains the weights an uncompiled run trains, and saves them under the model's own names."""
    compiled, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda m: compiled.append(m) or compile_(m, backend="aot_eager"))
    for flags in ([], ["--compile"]):
        stage_c.train(c_args(env, tmp_path / str(len(flags)), "--max_steps", "2",
                             "--sample_every", "100", *flags))
    assert len(compiled) == 1 and isinstance(compiled[0], StageC)
    plain, compiled = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"]
                       for d in "01")
    assert compiled.keys() == plain.keys()
    for k, w in plain.items():
        torch.testing.assert_close(compiled[k], w, rtol=1e-5, atol=1e-6, msg=k)
