"""
Stage B of Würstchen v2: semantic compressor + DiffNeXt diffusion decoder (method.md §3-4, §6-7).

    image (B, 3, S, S) --SemanticCompressor--> e (B, 16, S/42.67, S/42.67)  (16x24x24 at 1024 px)
    noise (B, 4, S/4, S/4) --StageB(x, t, e, text) x N DDPM steps--> latent --StageA.decode--> image

The compressor (EfficientNetV2-S features at 3/4 of the image side + 1x1 conv + BatchNorm) and
Stage B (a U-Net predicting the noise in a Stage A latent) train jointly on frozen Stage A latents,
with a frozen CLIP text tower (open_clip). Stage C later generates e from text; Stage B decodes it.

This file also owns the pieces Stage C shares (stage_c.py imports them): the blocks (LayerNorm2d,
GlobalResponseNorm, Dropout, TimestepBlock, Attention, AttnBlock), the timestep embedding, the
cosine noise schedule, the P2-weighted loss, the DDPM sampler, the text encoder and the compressor.

Run it (after stage_a.py):
    python stage_b.py --data toy --model tiny  # CPU, a few minutes
    python stage_b.py --data ./imgs            # one GPU, 'small' preset (CLIP ViT-B-32 text tower)
    torchrun --standalone --nproc_per_node=8 stage_b.py --data ./imgs --model paper
Released weights: StageB / SemanticCompressor.from_pretrained, found by open_released. Fine-tune
the released decoder (its compressor frozen) on a folder:
    python stage_b.py --data ./imgs --pretrained weights/ [--lora_rank 16]
"""

import argparse
import functools
import glob
import math
import os
import re
import unicodedata
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (CheckpointError, HelpFormatter, NonFiniteGuard, Progress, UsageError,
                    add_common_args, add_lora_from_args, channels_last_convs, disk_cached,
                    ema_and_optimizer, ema_decay_at, epochs_to_steps, finetune_warnings,
                    gather_run_state, get_lr, holdout_batch, hub_file, load_checkpoint, load_exact,
                    load_trained, load_weights_file, no_sync, preset_name, psnr, read_json,
                    recompute_batchnorm, resume_batches, run_cli, same_size_batches,
                    save_checkpoint, save_image_grid, save_lora, save_weights_file, set_lr,
                    sizes_of, start_run, trained_state, update_ema, weights_fingerprint, wrap_ddp,
                    write_json)
from stage_a import IMAGENET_MEAN, IMAGENET_STD, StageA, load_stage_a

# -----------------------------------------------------------------------------
# config


@dataclass
class StageBConfig:
    """DiffNeXt hyper-parameters (method §4.1), by default the released v2 decoder (1,055,365,280
    params). Block kinds: C = ResBlockStageB, T = TimestepBlock, A = AttnBlock."""
    c_in: int = 4  # Stage A latent channels
    c_out: int = 4
    c_r: int = 64  # sinusoidal timestep embedding size
    patch_size: int = 2  # PixelUnshuffle at the input, PixelShuffle at the output
    c_cond: int = 1024  # width of the mapped text tokens and of the injected semantic features
    c_hidden: tuple = (320, 640, 1280, 1280)  # width per level
    nhead: tuple = (-1, 10, 20, 20)  # attention heads per level (-1: no attention)
    blocks: tuple = (4, 4, 14, 4)  # repeats of level_config per level, on the down and up path
    level_config: tuple = ("CT", "CTA", "CTA", "CTA")  # block kinds per level, in order
    inject_effnet: tuple = (False, True, True, True)  # levels that get e concatenated
    effnet_embd: int = 16  # semantic latent channels
    clip_embd: int = 1024  # CLIP text width (ViT-H-14)
    kernel_size: int = 3  # depthwise conv kernel
    dropout: float | tuple = 0.1  # MLP and attention dropout: every level's, or one per level
    self_attn: bool = True  # attention keys/values = [image tokens ; text tokens]


@dataclass
class CompressorConfig:
    """Semantic compressor (method §3.1): stride-32 backbone, 1x1 conv + BatchNorm to c_latent."""
    # torchvision EfficientNetV2-S features (v2), "efficientnet_v2_l" (v1), or "tiny" (a patch stem)
    backbone: str = "efficientnet_v2_s"
    c_latent: int = 16
    tiny_width: int = 256  # feature width of the "tiny" backbone
    v1_scaling: bool = False  # return (e + 1) / 42 as v1's encoder does (Stage C's space, §3.1)


# The sizes the method fixes (method §1.5, §7.7): the semantic compressor sees the image at 3/4 of
# its side with stride 32, so a Stage C latent cell covers 42.67 px and 10.67 Stage A (f4) cells.
RESOLUTION_MULTIPLE = 42.67  # image side / semantic (Stage C) latent side: 1024 px -> 24
LATENT_DIM_SCALE = 10.67  # Stage A latent side / semantic latent side: 24 -> int(24 * 10.67) = 256
RELEASED_LATENT_SPACE = {"scale": 42.0, "shift": 1.0}  # released v2: y = (e + 1) / 42 (§3.3)
CONTEXT_LENGTH = 77  # CLIP text tokens (padded and truncated to this)

# Per preset: the DiffNeXt config, the semantic compressor, the text tower (open_clip architecture
# and pretrained tag; "tiny": a small random tower built here), Stage C's latent space (None:
# measured at the end of training, so that y has unit variance), the training defaults for flags
# left unset, and those of a fine-tune (--pretrained; why: README, "Fine-tune the released model").
PRESETS = {
    # CPU quick start and tests: 128 px toy images -> 4x32x32 Stage A and 16x3x3 semantic latents
    "tiny": dict(
        model=StageBConfig(c_cond=64, c_hidden=(32, 64, 128), nhead=(-1, 2, 4), blocks=(1, 1, 2),
                           level_config=("CT", "CTA", "CTA"), inject_effnet=(False, True, True),
                           clip_embd=64, dropout=0.0),
        compressor=CompressorConfig(backbone="tiny"),
        text_encoder={"name": "tiny", "pretrained": None},
        latent_space=None,
        train=dict(image_size=128, batch_size=16, max_steps=3000, lr=5e-4, warmup=100, beta2=0.95,
                   cache=True),
        finetune=dict(batch_size=16, epochs=100, lr=1e-4, lora_lr=1e-3, warmup=20, beta2=0.95,
                      ema_decay=0, cache=True)),
    # one-GPU reproduction at 256-512 px (40 M params; CLIP ViT-B-32 text, 512 wide)
    "small": dict(
        model=StageBConfig(c_cond=384, c_hidden=(128, 256, 384, 384), nhead=(-1, 4, 6, 6),
                           blocks=(2, 2, 4, 2), clip_embd=512),
        compressor=CompressorConfig(),
        text_encoder={"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
        latent_space=None,
        train=dict(image_size=256, batch_size=64, max_steps=200_000, lr=1e-4, warmup=5_000,
                   beta2=0.95, cache=False),
        finetune=dict(batch_size=8, epochs=100, lr=1e-5, lora_lr=1e-4, warmup=100, beta2=0.95,
                      ema_decay=0, cache=True)),
    # the released warp-ai/wuerstchen `decoder` (WuerstchenDiffNeXt); the v1 Stage B recipe (§6.5)
    "paper": dict(
        model=StageBConfig(),
        compressor=CompressorConfig(),
        text_encoder={"name": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"},
        latent_space=RELEASED_LATENT_SPACE,
        train=dict(image_size=1024, batch_size=384, max_steps=1_000_000, lr=1e-4, warmup=10_000,
                   beta2=0.95, cache=False),
        finetune=dict(batch_size=4, epochs=100, lr=1e-5, lora_lr=1e-4, warmup=100, beta2=0.95,
                      ema_decay=0, cache=True)),
}

# -----------------------------------------------------------------------------
# model


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, without affine parameters (method §4.2)."""

    def __init__(self, c):
        super().__init__(c, elementwise_affine=False, eps=1e-6)

    def forward(self, x):
        # (B, C, H, W) -> (B, H, W, C) -> normalise C -> (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 Global Response Normalisation on channels-last input (method §4.2). Textbook:
    g = torch.norm(x, dim=(1, 2)); n = g / (g.mean(-1) + 1e-6); out = gamma * (x * n) + beta + x."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c))

    def forward(self, x):  # x: (B, H, W, C)
        # g: (B, 1, 1, C), the L2 norm over space per channel, as a sum of squares: torch.norm
        # reduces over these strided dims ~10x slower on the CPU. A channel of exact zeros (GELU
        # gives them) has norm 0 and, as in torch.norm, gradient 0: sqrt's would be inf * 0 = NaN
        ss = (x * x).sum(dim=(1, 2), keepdim=True)
        g = torch.where(ss > 0, ss, 1.0).sqrt() * (ss > 0)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)  # divisive normalisation across channels
        return torch.addcmul(self.beta, x, self.gamma * n + 1)  # gamma * x * n + beta + x, one pass


def keep_mask(shape, p):
    """CPU booleans, True with probability 1 - p (p rounded to a multiple of 2^-15): four 15-bit
    uniform integers per 64-bit draw: ~2.5x cheaper than torch.rand >= p, ~5x than bernoulli_."""
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # uniform in [0, 2^63)
    lanes = draws.view(torch.int16)[:n] & 0x7FFF  # (4 * draws,) 15-bit lanes, uniform in [0, 2^15)
    return (lanes >= round(p * 2**15)).view(shape)


def dropout(x, p, training=True):
    """F.dropout: zero each entry with probability p, scale the rest by 1 / (1 - p); on the CPU with
    keep_mask's mask (F.dropout uses the slower bernoulli_ there), else F.dropout's fused kernel."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    return x * (keep_mask(x.shape, p) * (1 / (1 - p))).to(x.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout`, in the MLPs' parameter-free slot (so keys stay diffusers')."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


class TimestepBlock(nn.Module):
    """Timestep conditioning (method §4.2): x * (1 + a) + b with (a, b) = Linear(t-embedding)."""

    def __init__(self, c, c_r):
        super().__init__()
        self.mapper = nn.Linear(c_r, 2 * c)

    def forward(self, x, r_embed):
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)  # (B, 2C) -> 2 x (B, C, 1, 1)
        return torch.addcmul(b, x, 1 + a)  # x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections.

    Named as diffusers names it (to_q, to_k, to_v, to_out.0): the released weights load 1:1 (§8.2).
    Dropout acts on the attention probabilities, as in dome272's nn.MultiheadAttention (the code
    that trained the released model); diffusers applies it after to_out instead (same in eval).
    """

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        inner = c // nhead * nhead  # c itself in every released model; diffusers' rule otherwise
        self.to_q = nn.Linear(c, inner)
        self.to_k = nn.Linear(c, inner)
        self.to_v = nn.Linear(c, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, c))  # a Sequential only for the key 'to_out.0'

    def forward(self, x, kv):  # x: (B, N, C) queries, kv: (B, M, C) keys/values
        def heads(z):  # (B, L, C) -> (B, nhead, L, C / nhead)
            return z.unflatten(-1, (self.nhead, -1)).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(kv)), heads(self.to_v(kv))
        if self.training and self.dropout > 0 and q.device.type == "cpu":
            # no fused CPU attention with dropout: SDPA would fall back to this, with a slower mask
            # draw; w: (B, nhead, N, M) probabilities
            w = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = dropout(w, self.dropout) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, nhead, N, C/nhead) -> (B, N, C)


class AttnBlock(nn.Module):
    """Pre-norm attention of image tokens over [image tokens ; mapped text tokens] (method §4.2).

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

    t is scaled by 10,000 and embedded with c_r // 2 geometric frequencies, sin block first.
    """
    half = c_r // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1)
                      * torch.arange(half, device=t.device).float())
    angles = (t * max_positions)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, 2 half)
    return F.pad(emb, (0, c_r % 2))  # (B, c_r): an odd c_r ends in a 0, as the reference pads it


class ResBlockStageB(nn.Module):
    """DiffNeXt's ConvNeXt block ("C", method §4.2): depthwise conv -> LayerNorm2d -> concat the
    skip -> channels-last MLP (Linear, GELU, GRN, Dropout, Linear) -> residual. The skip joins
    *after* the conv."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c + c_skip, 4 * c), nn.GELU(),
                                         GlobalResponseNorm(4 * c), Dropout(dropout),
                                         nn.Linear(4 * c, c))

    def forward(self, x, skip=None):  # x: (B, C, H, W), skip: (B, C_skip, H, W) or None
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)  # (B, C + C_skip, H, W)
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # MLP: (B, H, W, C)


class ResBlock(nn.Module):
    """ConvNeXt block of the prior ("C" in method §4.2, dome272 `ResBlock`): as ResBlockStageB, but
    the skip joins *before* the depthwise conv (groups = c, so a skip of width c gives every group 2
    input channels; the prior itself passes none)."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), GlobalResponseNorm(4 * c),
                                         Dropout(dropout), nn.Linear(4 * c, c))

    def forward(self, x, skip=None):  # x: (B, C, H, W), skip: (B, C_skip, H, W) or None
        h = x if skip is None else torch.cat([x, skip], dim=1)  # (B, C + C_skip, H, W)
        h = self.norm(self.depthwise(h))  # (B, C, H, W)
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # MLP: (B, H, W, C)


def dome272_init(model):
    """dome272's general initialisation (method §4.6): xavier_uniform for every Conv2d / Linear
    weight, zero biases, and the attention's q/k/v drawn as nn.MultiheadAttention draws them, as one
    packed (3C, C) xavier matrix. (The ConvTranspose2d upsamplers keep PyTorch's default, as
    there.) The models then re-initialise some layers."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, Attention):
            bound = math.sqrt(6 / (4 * m.to_q.in_features))  # xavier bound of a (3C, C) matrix
            for proj in (m.to_q, m.to_k, m.to_v):
                nn.init.uniform_(proj.weight, -bound, bound)


def per_level(value, n):
    """A U-Net setting given once for every level or once per level -> a list of n values."""
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def unet_levels(c_hidden, blocks, level_config, block):
    """The U-Net skeleton of DiffNeXt and Paella (method §4.3, §4.8): (down_blocks, up_blocks),
    one ModuleList per level. Down level i: [downsampler (i > 0): LayerNorm2d, 2x2 stride-2 conv]
    + blocks[i] x level_config[i]. Up levels, deepest first: blocks[i] x level_config[i] +
    [upsampler (i > 0): LayerNorm2d, 2x2 stride-2 ConvTranspose]. block(kind, i, c_skip) builds
    one block of level i; c_skip is the width of the U-Net skip, the down path's output of that
    level, which the first block of every up level but the deepest takes (else 0)."""
    n = len(c_hidden)
    down_blocks, up_blocks = nn.ModuleList(), nn.ModuleList()
    for i in range(n):
        level = nn.ModuleList()
        if i > 0:
            level.append(nn.Sequential(LayerNorm2d(c_hidden[i - 1]),
                                       nn.Conv2d(c_hidden[i - 1], c_hidden[i], 2, stride=2)))
        level.extend(block(kind, i, 0) for _ in range(blocks[i]) for kind in level_config[i])
        down_blocks.append(level)
    for i in reversed(range(n)):
        level = nn.ModuleList(block(kind, i, c_hidden[i] if i < n - 1 and j == k == 0 else 0)
                              for j in range(blocks[i]) for k, kind in enumerate(level_config[i]))
        if i > 0:
            level.append(nn.Sequential(LayerNorm2d(c_hidden[i]),
                                       nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], 2, 2)))
        up_blocks.append(level)
    return down_blocks, up_blocks


class StageB(nn.Module):
    """Stage B, the v2 "DiffNeXt" decoder (method §4): a U-Net of ResBlockStageB / TimestepBlock /
    AttnBlock levels predicting the noise in a noised Stage A latent, conditioned on e (resized
    bicubically and concatenated at the levels that take it) and on CLIP text tokens (attention)."""

    def __init__(self, cfg: StageBConfig):
        super().__init__()
        self.cfg = cfg
        c_hidden = cfg.c_hidden
        # conditioning: text tokens -> c_cond (+ LayerNorm); one 1x1 conv per injected level for e.
        # effnet_mappers slots: i for down level i, len(c_hidden) + j for up_blocks[j] (0: deepest)
        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond)
        self.effnet_mappers = nn.ModuleList(
            [nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if inject else None
             for inject in cfg.inject_effnet + cfg.inject_effnet[::-1]])
        self.seq_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(nn.PixelUnshuffle(cfg.patch_size),
                                       nn.Conv2d(cfg.c_in * cfg.patch_size**2, c_hidden[0],
                                                 kernel_size=1),
                                       LayerNorm2d(c_hidden[0]))

        dropout = per_level(cfg.dropout, len(c_hidden))

        def block(kind, i, c_skip):  # ResBlocks of injected levels also take the mapped e
            p = dropout[i]
            if kind == "C":
                c_effnet = cfg.c_cond if cfg.inject_effnet[i] else 0
                return ResBlockStageB(c_hidden[i], c_skip + c_effnet, cfg.kernel_size, p)
            if kind == "T":
                return TimestepBlock(c_hidden[i], cfg.c_r)
            return AttnBlock(c_hidden[i], cfg.c_cond, cfg.nhead[i], cfg.self_attn, p)

        self.down_blocks, self.up_blocks = unet_levels(c_hidden, cfg.blocks, cfg.level_config,
                                                       block)
        # output head: (a, b) at full latent resolution, 2 * c_out channels
        self.clf = nn.Sequential(LayerNorm2d(c_hidden[0]),
                                 nn.Conv2d(c_hidden[0], 2 * cfg.c_out * cfg.patch_size**2,
                                           kernel_size=1),
                                 nn.PixelShuffle(cfg.patch_size))
        self.init_weights()

    def init_weights(self):
        """dome272's initialisation, in its order (method §4.6)."""
        dome272_init(self)
        for mapper in self.effnet_mappers:
            if mapper is not None:
                nn.init.normal_(mapper.weight, std=0.02)  # conditionings
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)  # input
        nn.init.zeros_(self.clf[1].weight)  # output: a = 0, b' = 0.5 at init
        for m in self.modules():
            if isinstance(m, ResBlockStageB):
                m.channelwise[-1].weight.data *= math.sqrt(1 / sum(self.cfg.blocks))
            elif isinstance(m, TimestepBlock):
                nn.init.zeros_(m.mapper.weight)

    def _run_level(self, level, x, r_embed, clip, effnet, effnet_mapper, skip=None):
        """One U-Net level. Every ResBlock gets [U-Net skip ; mapped e], the skip only the level's
        first module, if it is a ResBlock (as unet_levels builds them)."""
        effnet_c = None
        for j, block in enumerate(level):
            if isinstance(block, ResBlockStageB):
                if effnet_mapper is not None and effnet_c is None:  # once per level, at its size
                    e = F.interpolate(effnet.float(), size=x.shape[-2:], mode="bicubic",
                                      antialias=True, align_corners=True)  # -> (B, 16, H, W)
                    e = e.to(effnet.dtype, memory_format=torch.channels_last)  # as the activations
                    effnet_c = effnet_mapper(e)  # (B, c_cond, H, W)
                own_skip = skip if j == 0 else None
                if own_skip is not None and effnet_c is not None:
                    extra = torch.cat([own_skip, effnet_c], dim=1)  # (B, C_skip + c_cond, H, W)
                else:  # one of them or None: no copy
                    extra = own_skip if own_skip is not None else effnet_c
                x = block(x, extra)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            elif isinstance(block, AttnBlock):
                x = block(x, clip)
            else:  # down- or upsampler
                x = block(x)
        return x

    def forward(self, x, t, effnet, clip_text, b_min=1e-3):
        """x: noised Stage A latent (B, 4, H, W), H and W multiples of 2^levels; t: (B,) in [0, 1];
        effnet: semantic latent e (B, 16, h, w), any size; clip_text: (B, 77, clip_embd).
        Returns the predicted noise (B, 4, H, W) = (x - a) / b' (method §4.5)."""
        r_embed = r_embedding(t, self.cfg.c_r)  # (B, c_r)
        clip = self.seq_norm(self.clip_mapper(clip_text))  # (B, 77, c_cond)
        # (B, 4, H, W) -> (B, c_hidden[0], H/2, W/2), channels-last from here on: the permutes to
        # (B, H, W, C) (LayerNorm, MLPs) and the attention's token sequences are views, not copies
        h = self.embedding(x.contiguous(memory_format=torch.channels_last))
        level_outputs = []
        for i, level in enumerate(self.down_blocks):
            h = self._run_level(level, h, r_embed, clip, effnet, self.effnet_mappers[i])
            level_outputs.append(h)
        n = len(self.down_blocks)
        for j, level in enumerate(self.up_blocks):  # level n - 1 - j; no U-Net skip at j = 0
            skip = level_outputs[n - 1 - j] if j > 0 else None
            h = self._run_level(level, h, r_embed, clip, effnet, self.effnet_mappers[n + j], skip)
        a, b = self.clf(h).float().chunk(2, dim=1)  # (B, 2 * c_out, H, W) -> 2 x (B, c_out, H, W)
        b = b.sigmoid() * (1 - 2 * b_min) + b_min  # b' in (0.001, 0.999) plays sqrt(1 - abar)
        return (x.float() - a) / b

    @classmethod
    def from_pretrained(cls, path, cfg=None):
        """Load released weights (method §8.1-8.4): a folder of diffusers' `WuerstchenDiffNeXt`
        (save_pretrained: config.json + safetensors/bin; warp-ai/wuerstchen subfolder `decoder`), or
        the official `model_v2_stage_b.pt` (dome272 keys, the released config unless `cfg` says
        otherwise). Its `effnet_state_dict` loads with SemanticCompressor.from_pretrained(path)."""
        if os.path.isdir(path):
            hf = read_json(os.path.join(path, "config.json"))
            fields = StageBConfig.__dataclass_fields__
            cfg = StageBConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in hf.items()
                                  if k in fields})
            sd = load_weights_file(path)
        else:
            cfg = cfg or StageBConfig()
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            sd = dome272_to_diffusers(sd.get("state_dict", sd))
        with torch.device("meta"):  # no memory, no init: the weights are assigned below
            model = cls(cfg)
        load_exact(model, sd, what=f"Stage B weights from {path}")
        return model.eval()

    def diffusers_config(self):
        """The config.json of this model as a diffusers `WuerstchenDiffNeXt`: the same names but
        `self_attn`, which it does not have (it always attends over [image ; text tokens])."""
        if not self.cfg.self_attn:
            raise ValueError("diffusers' WuerstchenDiffNeXt cannot represent this Stage B: its "
                             "attention always attends over [image tokens ; text tokens] "
                             "(self_attn=True), this one has self_attn=False")
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()}
        del config["self_attn"]
        return {"_class_name": "WuerstchenDiffNeXt"} | config

    def save_pretrained(self, folder):
        """The inverse of from_pretrained: a diffusers `WuerstchenDiffNeXt` folder."""
        save_weights_file(folder, self.state_dict(), self.diffusers_config())


def dome272_to_diffusers(sd):
    """Official key names -> ours/diffusers' (method §8.2): a packed nn.MultiheadAttention becomes
    to_q/to_k/to_v (in_proj split in three row blocks, in that order) and to_out.0 (out_proj)."""
    out = {}
    for k, v in sd.items():
        if ".attention.attn.in_proj_" in k:
            prefix, kind = k.split(".attn.in_proj_")  # kind: 'weight' (3C, C) or 'bias' (3C,)
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{kind}"] = part
        else:
            out[k.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = v
    return out


class SemanticCompressor(nn.Module):
    """The semantic compressor (paper, method §3): image in [0, 1] -> e (B, 16, H/42.67, W/42.67).

    A stride-32 backbone (EfficientNetV2-S features, 1280 channels; V2-L in v1; a patch-embedding
    stem for 'tiny') on the image resized to 3/4 of its side, then a 1x1 conv to 16 channels (no
    bias) and a BatchNorm. e is the raw BatchNorm output (v1: (e + 1) / 42, cfg.v1_scaling), the
    space Stage B is conditioned on; Stage C models y = (e + shift) / scale. Keys match the official
    EfficientNetEncoder (backbone.*, mapper.0, mapper.1). Constructing never downloads: see
    load_imagenet_weights.
    """

    def __init__(self, cfg: CompressorConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone in ("efficientnet_v2_s", "efficientnet_v2_l"):
            import torchvision
            efficientnet = getattr(torchvision.models, cfg.backbone)
            self.backbone = efficientnet(weights=None).features  # random until loaded
            c_features = 1280
        elif cfg.backbone == "tiny":  # a ViT-style stem of stride 32: 32x32 patches -> features
            c_features = cfg.tiny_width
            self.backbone = nn.Sequential(
                nn.Conv2d(3, c_features, kernel_size=32, stride=32), nn.GELU(),
                nn.Conv2d(c_features, c_features, kernel_size=1), nn.GELU())
        else:
            raise ValueError(f"unknown compressor backbone {cfg.backbone!r} (efficientnet_v2_s | "
                             f"efficientnet_v2_l | tiny)")
        self.mapper = nn.Sequential(nn.Conv2d(c_features, cfg.c_latent, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(cfg.c_latent))

    def features(self, images):  # (B, 3, H, W) in [0, 1] -> features (B, 1280, 3H/128, 3W/128)
        H, W = images.shape[-2:]
        x = F.interpolate(images, size=(3 * H // 4, 3 * W // 4), mode="bilinear", antialias=True,
                          align_corners=False)  # 1024 px -> 768 px
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return self.backbone((x - mean) / std)  # stride 32: 768 px -> 24 x 24

    def forward(self, images):  # -> e (B, 16, 3H/128, 3W/128); H, W multiples of 128
        e = self.mapper(self.features(images))
        return (e + 1) / 42 if self.cfg.v1_scaling else e

    def load_imagenet_weights(self):
        """Fill the EfficientNetV2 backbone with torchvision's ImageNet weights (downloaded once
        into the torch hub cache). Returns False, changing nothing, when they cannot be had
        (no network)."""
        import torchvision
        try:
            weights = torchvision.models.get_model_weights(self.cfg.backbone).DEFAULT
            sd = weights.get_state_dict(progress=False)
        except Exception:
            return False
        self.backbone.load_state_dict({k.removeprefix("features."): v for k, v in sd.items()
                                       if k.startswith("features.")})
        return True

    @classmethod
    def from_pretrained(cls, path, cfg=None):
        """The `effnet_state_dict` of an official Stage B file: `model_v2_stage_b.pt`
        (EfficientNetV2-S) or v1's `model_stage_b.pt` (V2-L, whose encoder returns (e + 1) / 42:
        v1_scaling), the variant read off the weights (V2-L has a ninth feature stage) unless `cfg`
        says; or a state-dict file; or a folder written by save_pretrained (any backbone)."""
        if os.path.isdir(path):
            cfg = CompressorConfig(**read_json(os.path.join(path, "config.json")))
            sd = load_weights_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            sd = sd.get("effnet_state_dict", sd)
            v1 = "backbone.8.0.weight" in sd  # EfficientNetV2-L: features 0..8; V2-S: 0..7
            backbone = "efficientnet_v2_l" if v1 else "efficientnet_v2_s"
            cfg = cfg or CompressorConfig(backbone, sd["mapper.0.weight"].shape[0], v1_scaling=v1)
        with torch.device("meta"):
            model = cls(cfg)
        load_exact(model, sd, what=f"semantic compressor weights from {path}")
        return model.eval()

    def save_pretrained(self, folder):
        """The inverse of from_pretrained(folder): config.json (the CompressorConfig) and
        model.safetensors. For EfficientNetV2-S its keys are the official `effnet_state_dict`'s
        (backbone.*, mapper.0, mapper.1), which diffusers' prior fine-tuning scripts load."""
        save_weights_file(folder, self.state_dict(), asdict(self.cfg), name="model.safetensors")


class TextEncoder(nn.Module):
    """Frozen CLIP text tower (method §4.4, §5.5): prompts -> last hidden states after ln_final,
    (B, 77, width), as the released pipelines compute them: CLIPTokenizerFast (padding to 77,
    truncation), then CLIPTextModel with the tokenizer's attention mask, so the padding positions
    (Stages B and C read them) attend only to the prompt. Only the text parts are kept in memory.

    name: an open_clip architecture ('ViT-H-14' for Stage B, 'ViT-bigG-14' for Stage C), 'tiny' (a
    small random tower for tests and CPU runs) or 'transformers' (a CLIPTextModel folder's config);
    pretrained: an open_clip tag or weights file, the CLIPTextModel folder (e.g. the released
    text_encoder/), or None (random weights, saved with the checkpoint: checkpoint_entry());
    pad_token: the tokenizer's pad token ('!' in the LAION towers' tokenizers; see read_pad_token).
    """

    TINY = dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2)

    def __init__(self, name="tiny", pretrained=None, pad_token="!"):
        super().__init__()
        import open_clip
        self.spec = {"name": name, "pretrained": pretrained} | ({"pad_token": pad_token}
                                                                if pad_token != "!" else {})
        if name == "tiny":
            tower = open_clip.transformer.TextTransformer(**self.TINY,
                                                          output_dim=self.TINY["width"])
        elif name == "transformers":
            tower, sd = clip_text_from_transformers(pretrained)
        else:
            weights = fetch_clip_weights(name, pretrained) if pretrained else None
            tower = open_clip.create_model(name, pretrained=weights).eval()
        self.token_embedding, self.positional_embedding = (tower.token_embedding,
                                                           tower.positional_embedding)
        self.transformer, self.ln_final = tower.transformer, tower.ln_final
        if name == "transformers":
            load_exact(self, sd, what=f"CLIP text weights from {pretrained}")
        if (self.token_embedding.num_embeddings != 49408
                or len(self.positional_embedding) != CONTEXT_LENGTH):
            raise UsageError(f"{name}: not a CLIP BPE text tower with 77 positions, which "
                             f"TextEncoder tokenises for")
        self.width, self.heads = (self.ln_final.normalized_shape[0],
                                  self.transformer.resblocks[0].attn.num_heads)
        # the CLIP byte-level BPE (open_clip ships it); the special tokens by Hugging Face name, the
        # pad token among them: CLIPTokenizerFast matches it inside a prompt too
        self.bpe = clip_bpe()
        self.special = {"<|startoftext|>": self.bpe.sot_token_id,
                        "<|endoftext|>": self.bpe.eot_token_id}
        self.special[pad_token] = self.special.get(pad_token, self.bpe.encoder.get(pad_token))
        if self.special[pad_token] is None:
            raise UsageError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
        self.pad_token, self.pad_id = pad_token, self.special[pad_token]
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, self.special)) + ")")
        self.eval().requires_grad_(False)

    @classmethod
    def from_spec(cls, spec):
        """Rebuild from a checkpoint's 'text_encoder' entry (random towers carry their weights)."""
        encoder = cls(spec["name"], spec["pretrained"], spec.get("pad_token", "!"))
        if "state_dict" in spec:
            encoder.load_state_dict(spec["state_dict"])
        return encoder

    def diffusers_config(self):
        """The config.json of this tower as the pipelines' text encoder, a transformers
        CLIPTextModel. Refused by name where CLIPTextModel cannot express it: another activation,
        mixed LayerNorm eps, weights it has no place for (LayerScale, ...)."""
        blocks = self.transformer.resblocks
        act_names = {layer: name for name, layer in clip_activations().items()}
        acts = {type(b.mlp.gelu) for b in blocks}
        eps = {m.eps for m in self.modules() if isinstance(m, nn.LayerNorm)}
        layer_keys = [f"attn.in_proj_{kind}" for kind in ("weight", "bias")] + [
            f"{n}.{kind}" for n in CLIP_LAYER_NAMES.values() for kind in ("weight", "bias")]
        keys = set(CLIP_NAMES.values()) | {  # the weights clip_text_to_transformers maps
            f"transformer.resblocks.{i}.{k}" for i in range(len(blocks)) for k in layer_keys}
        extra = sorted(set(self.state_dict()) ^ keys)
        if len(acts) != 1 or not acts <= act_names.keys() or len(eps) != 1 or extra:
            raise UsageError(f"the text tower {self.spec['name']!r} is not one transformers' "
                             f"CLIPTextModel can express (activations "
                             f"{sorted(a.__name__ for a in acts)}, LayerNorm eps {sorted(eps)}, "
                             f"weights outside its layout: {extra[:5]})")
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                "vocab_size": 49408, "max_position_embeddings": CONTEXT_LENGTH,
                "hidden_size": self.width, "num_attention_heads": self.heads,
                "num_hidden_layers": len(blocks),
                "intermediate_size": blocks[0].mlp.c_fc.out_features,
                "hidden_act": act_names[acts.pop()], "layer_norm_eps": eps.pop(),
                "bos_token_id": self.bpe.sot_token_id, "eos_token_id": self.bpe.eot_token_id,
                "pad_token_id": self.pad_id}

    def save_pretrained(self, folder, tokenizer_folder):
        """The inverse of TextEncoder('transformers', folder, pad_token): a transformers
        CLIPTextModel folder and a CLIP tokenizer folder with this encoder's pad token."""
        save_weights_file(folder, clip_text_to_transformers(self), self.diffusers_config(),
                          name="model.safetensors")
        write_clip_tokenizer(tokenizer_folder, self.pad_token)

    def checkpoint_entry(self):
        """What a checkpoint stores: the spec, plus the weights if random (not re-creatable)."""
        return self.spec | ({"state_dict": self.state_dict()} if self.spec["pretrained"] is None
                            else {})

    def tokenize(self, prompts):
        """list of B strings -> ids (B, 77) and keep (B, 77) bool (True up to end-of-text): what
        CLIPTokenizerFast(padding="max_length", max_length=77, truncation=True) returns as input_ids
        and attention_mask. Normalisation: NFC, whitespace runs -> one space, lowercase (open_clip's
        tokenizer also applies ftfy and unescapes HTML: other ids for some prompts)."""
        ids = torch.full((len(prompts), CONTEXT_LENGTH), self.pad_id, dtype=torch.long)
        keep = torch.zeros(len(prompts), CONTEXT_LENGTH, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            tokens = []
            for piece in self.special_pattern.split(prompt):  # special tokens match in the raw text
                if piece in self.special:
                    tokens.append(self.special[piece])
                    continue
                text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", piece)).lower()
                for word in self.bpe.pat.findall(text):  # letters | 1 digit | punctuation | 's 't
                    word = "".join(self.bpe.byte_encoder[b] for b in word.encode("utf-8"))
                    tokens += [self.bpe.encoder[t] for t in self.bpe.bpe(word).split(" ")]
            tokens = ([self.bpe.sot_token_id] + tokens[:CONTEXT_LENGTH - 2]
                      + [self.bpe.eot_token_id])  # truncated, keeping the ends
            ids[i, :len(tokens)], keep[i, :len(tokens)] = torch.tensor(tokens), True
        return ids, keep

    @torch.no_grad()
    def encode(self, prompts):
        """list of B strings -> (B, 77, width) float32."""
        ids, keep = (t.to(self.positional_embedding.device) for t in self.tokenize(prompts))
        B, L = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding  # (B, 77, width)
        # additive attention mask (B * heads, 77, 77), one per (sample, head): causal, and no query
        # attends to the padding after the end-of-text token
        causal = torch.full((L, L), float("-inf"), device=x.device).triu(1)  # (77, 77)
        padding = torch.zeros(B, 1, 1, L, device=x.device).masked_fill(~keep[:, None, None, :],
                                                                        float("-inf"))
        mask = (causal + padding).expand(B, self.heads, L, L).reshape(B * self.heads, L, L)
        x = self.transformer(x, attn_mask=mask)
        return self.ln_final(x).float()


# transformers CLIPTextModel -> open_clip names: outside the layers, and in each layer (whose
# q/k/v_proj are packed into one attn.in_proj, rows q, k, v)
CLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight",
              "final_layer_norm.bias": "ln_final.bias"}
CLIP_LAYER_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                    "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


@functools.cache
def clip_bpe():
    """open_clip's CLIP byte-level BPE (vocabulary and merges), read once per process (~0.1 s)."""
    import open_clip
    return open_clip.tokenizer.SimpleTokenizer()


def clip_activations():
    """transformers' hidden_act name -> the open_clip activation, for those both have."""
    import open_clip
    return {"gelu": nn.GELU, "quick_gelu": open_clip.transformer.QuickGELU}


def clip_text_from_transformers(folder):
    """A transformers CLIPTextModel folder (config.json + model.safetensors or pytorch_model.bin;
    the released text_encoder/) -> (an open_clip text tower of its architecture on the meta device,
    its weights under open_clip's names: CLIP_NAMES, CLIP_LAYER_NAMES). transformers itself is not
    needed (safetensors comes with open_clip)."""
    import open_clip
    hf = read_json(os.path.join(folder, "config.json"))
    act, acts = hf.get("hidden_act", "quick_gelu"), clip_activations()  # CLIPTextConfig's default
    if act not in acts:
        raise UsageError(f"{folder}: activation {act!r} is not supported (only {list(acts)})")
    width, eps = hf["hidden_size"], hf.get("layer_norm_eps", 1e-5)
    with torch.device("meta"):  # no memory, no init: the weights are assigned when loaded
        tower = open_clip.transformer.TextTransformer(
            context_length=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], width=width,
            heads=hf["num_attention_heads"], layers=hf["num_hidden_layers"],
            mlp_ratio=hf["intermediate_size"] / width, output_dim=None, act_layer=acts[act],
            norm_layer=lambda n: open_clip.transformer.LayerNorm(n, eps=eps))
    theirs = {k.removeprefix("text_model."): v for k, v in load_weights_file(folder).items()}
    sd = {ours: theirs[name] for name, ours in CLIP_NAMES.items()}
    for i in range(hf["num_hidden_layers"]):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[f"{dst}attn.in_proj_{kind}"] = torch.cat([theirs[f"{src}self_attn.{n}_proj.{kind}"]
                                                         for n in "qkv"])
            sd |= {f"{dst}{ours}.{kind}": theirs[f"{src}{name}.{kind}"]
                   for name, ours in CLIP_LAYER_NAMES.items()}
    return tower, sd


def clip_text_to_transformers(encoder):
    """The inverse of clip_text_from_transformers: a TextEncoder's open_clip weights (any CLIP text
    tower, the random 'tiny' one too) -> a transformers CLIPTextModel state dict (its config:
    TextEncoder.diffusers_config)."""
    sd = encoder.state_dict()
    theirs = {name: sd[ours] for name, ours in CLIP_NAMES.items()}
    for i in range(len(encoder.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q_k_v = sd[f"{src}attn.in_proj_{kind}"].chunk(3)  # (3 width, ...) -> 3 x (width, ...)
            for n, w in zip("qkv", q_k_v):
                theirs[f"{dst}self_attn.{n}_proj.{kind}"] = w.clone()  # safetensors: not shared
            theirs |= {f"{dst}{name}.{kind}": sd[f"{src}{ours}.{kind}"]
                       for name, ours in CLIP_LAYER_NAMES.items()}
    return {f"text_model.{k}": v for k, v in theirs.items()}


def write_clip_tokenizer(folder, pad_token):
    """A CLIP tokenizer folder as the released tokenizer/ folders hold it, from open_clip's bundled
    CLIP BPE: vocab.json and merges.txt (CLIP builds both from bpe_simple_vocab_16e6.txt.gz), the
    special tokens under their Hugging Face names, `pad_token`. transformers' CLIPTokenizer(Fast)
    reads it and gives TextEncoder's ids."""
    bpe = clip_bpe()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    write_json(os.path.join(folder, "vocab.json"), vocab)
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)  # pairs, in merge order
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "tokenizer_config.json"), special | {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH,
        "do_lower_case": True, "errors": "replace"})


def read_pad_token(folder):
    """The pad token of a CLIP tokenizer folder (special_tokens_map.json / tokenizer_config.json;
    released: '!'), after checking it is TextEncoder's CLIP BPE with 77 positions."""
    spec = read_json(os.path.join(folder, "special_tokens_map.json")) | read_json(
        os.path.join(folder, "tokenizer_config.json"))
    pad = spec.get("pad_token", "<|endoftext|>")  # CLIPTokenizer's default
    pad = pad["content"] if isinstance(pad, dict) else pad
    vocab = read_json(os.path.join(folder, "vocab.json")) or read_json(
        os.path.join(folder, "tokenizer.json")).get("model", {}).get("vocab", {})
    ours = clip_bpe().encoder
    if (len(vocab) != 49408
            or any(ours.get(t, i) != i for t, i in vocab.items() if not t.startswith("<|"))
            or spec.get("model_max_length", CONTEXT_LENGTH) != CONTEXT_LENGTH):
        raise UsageError(f"{folder} is not the CLIP BPE tokenizer with 77 positions that "
                         f"TextEncoder implements")
    return pad


def fetch_clip_weights(name, pretrained):
    """Local path of open_clip weights: `pretrained` itself if a file, else the Hugging Face cache
    (downloaded into it first when online). Fails at once, naming the file, if it cannot be had."""
    if os.path.isfile(pretrained):
        return pretrained
    import open_clip
    source = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub")
    if not source:
        raise UsageError(f"open_clip has no Hugging Face weights {name!r} / {pretrained!r} "
                         f"(known tags: {open_clip.list_pretrained_tags_by_model(name)})")
    parts = source.strip("/").split("/")  # 'org/repo/' or 'org/repo/file'
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "open_clip_pytorch_model.bin"
    try:
        return hub_file(repo, filename)
    except Exception as e:
        raise RuntimeError(
            f"cannot fetch the CLIP text encoder weights {name} / {pretrained} "
            f"({type(e).__name__}; offline?). Download https://huggingface.co/{repo}/resolve/main/"
            f"{filename} (`huggingface-cli download {repo} {filename}` fills the Hugging Face "
            f"cache, ~/.cache/huggingface/hub) on a machine with network, or pass the downloaded "
            f"file's path as the text encoder's pretrained weights") from None


def add_text_encoder_args(group):
    """The text-tower flags of the training scripts (Stages B and C)."""
    group.add_argument("--text_encoder", default=None, help="open_clip text architecture, or "
                       "'tiny' (a small random tower) (default: per preset)")
    group.add_argument("--text_pretrained", default=None, help="open_clip pretrained tag or "
                       "weights file, 'none' for random weights (default: per preset)")


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as diffusers'


def add_finetune_args(group):
    """The fine-tuning flags of the training scripts (Stages B and C)."""
    group.add_argument("--pretrained", nargs="?", const="", default=None, metavar="DIR",
                       help="fine-tune the released Würstchen v2 weights from DIR (as sample.py "
                       "--pretrained reads it; an export of ours too), or without DIR from the "
                       "Hugging Face cache; their semantic compressor stays frozen. The preset "
                       "(--model, default paper) then only sets the training defaults")
    group.add_argument("--lora_rank", type=int, default=0,
                       help="train LoRA adapters of this rank on the frozen --pretrained model "
                       "instead of all its weights (0: full fine-tune)")
    group.add_argument("--lora_alpha", type=float, default=None,
                       help="LoRA scale = alpha / rank (default: alpha = rank, scale 1)")
    group.add_argument("--lora_targets", nargs="+", default=LORA_TARGETS,
                       help="the Linear layers that get adapters, by name or name ending "
                       "(PEFT's target_modules): the attention projections, as diffusers' prior "
                       "LoRA script; add channelwise.0 channelwise.4 for the channel MLPs, "
                       "cond_mapper.0 cond_mapper.2 for Stage C's text mapper")
    group.add_argument("--epochs", type=float, default=None, help="passes over the training "
                       "images: sets --max_steps (default when fine-tuning: per preset)")


def finetune_defaults(preset, args):
    """The training defaults of a fine-tune (--pretrained): the preset's "finetune" entry, with its
    LoRA learning rate under --lora_rank."""
    if "finetune" not in preset:
        raise UsageError(f"--model {args.model}: --pretrained fine-tunes the released v2 weights "
                         f"(or an export of ours); this preset has no fine-tuning defaults")
    defaults = {k: v for k, v in preset["finetune"].items() if k != "lora_lr"}
    return defaults | ({"lr": preset["finetune"]["lora_lr"]} if args.lora_rank else {})


def build_text_encoder(args, preset_spec, ckpt, device):
    """The frozen text tower of a run: the checkpoint's when resuming, else the flags' or preset's.
    A random tower is seeded, so every rank builds the same one (the checkpoint saves it)."""
    spec = ckpt["text_encoder"] if ckpt else {
        "name": args.text_encoder or preset_spec["name"],
        "pretrained": (None if args.text_pretrained == "none"
                       else args.text_pretrained or preset_spec["pretrained"])}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return TextEncoder.from_spec(spec).to(device)


# -----------------------------------------------------------------------------
# diffusion / loss


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
def ddpm_sample(model, noise, timesteps, cond, uncond=None, guidance_scale=0.0, generator=None,
                progress=False):
    """Ancestral DDPM sampling from `noise` (x at t = 1) with an eps-predicting model (method §7).

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


# -----------------------------------------------------------------------------
# training

class CompressorAndStageB(nn.Module):
    """The compressor and Stage B, trained jointly as one module (dome272's `Wrapper`, §3.4): one
    DDP wrapper, optimizer and EMA cover both. forward returns the P2-weighted diffusion loss."""

    def __init__(self, compressor, stage_b, p_zero_effnet, p_noise_effnet, latent_space=None,
                 train_compressor=True):
        super().__init__()
        self.compressor, self.stage_b, self.train_compressor = compressor, stage_b, train_compressor
        self.p_zero, self.p_noise, self.latent_space = p_zero_effnet, p_noise_effnet, latent_space
        self.compressor.requires_grad_(train_compressor)

    def train(self, mode=True):
        """A frozen compressor stays in eval mode: its BatchNorm statistics fix Stage C's space."""
        super().train(mode)
        self.compressor.train(mode and self.train_compressor)
        return self

    def perturb(self, e):
        """Conditioning dropout on the semantic latent e (method §3.4, §6.4), drawn per sample (v1
        drew once per batch; per sample, as Stable Cascade does, gives every batch a mix): zeroed
        with p_zero (the unconditional input of CFG), else with p_noise noised by the Stage C
        diffusion at t ~ U(0, 0.5) in Stage C's space y = (e + shift) / scale, so that Stage B
        tolerates imperfect Stage C samples. Without fixed constants the space is standardised with
        the batch's own statistics (what the end-of-training measurement gives)."""
        B = e.shape[0]
        space = self.latent_space or {"scale": e.detach().std(), "shift": -e.detach().mean()}
        y = (e + space["shift"]) / space["scale"]
        y_noised = add_noise(y, 0.5 * torch.rand(B, device=e.device), torch.randn_like(y))
        noised = (torch.rand(B, device=e.device) < self.p_noise).view(B, 1, 1, 1)
        kept = (torch.rand(B, device=e.device) >= self.p_zero).view(B, 1, 1, 1)
        e = torch.where(noised, y_noised * space["scale"] - space["shift"], e)
        return e * kept

    def forward(self, images, latents, clip_text):
        effnet = self.perturb(self.compressor(images))  # (B, 16, h, w)
        return diffusion_loss(self.stage_b, latents, effnet=effnet, clip_text=clip_text)

    def checkpoint_entries(self, ema):
        """A Stage B checkpoint's weights: trained and EMA, of the Stage B (its LoRA adapters alone
        when it has them: common.trained_state) and the compressor."""
        return {"model": trained_state(self.stage_b), "ema": trained_state(ema.stage_b),
                "compressor": self.compressor.state_dict(),
                "compressor_ema": ema.compressor.state_dict()}

    def own_statistics(self, ema, images, rt):
        """Before a preview or save: the EMA compressor's BatchNorms get the statistics of its own
        weights on `images` (batches of training images; common.recompute_batchnorm, issue #13).
        Not for a frozen compressor (the released one's statistics fix Stage C's space), nor
        without an EMA (--ema_decay 0: the trained compressor's statistics are its own already)."""
        if self.train_compressor and ema is not self:
            with rt.autocast():
                recompute_batchnorm(ema.compressor, ema.compressor, images, device=rt.device)

    def restore(self, ckpt, ema, opt, scaler):
        """--resume: the weights of checkpoint_entries, the optimizer and the loss scaler. `ema` may
        be this module itself (fine-tuning keeps no EMA)."""
        load_trained(self.stage_b, ckpt["model"], "the checkpoint's Stage B")
        self.compressor.load_state_dict(ckpt["compressor"])
        if ema is not self:
            load_trained(ema.stage_b, ckpt["ema"], "the checkpoint's EMA Stage B")
            ema.compressor.load_state_dict(ckpt["compressor_ema"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])


class LatentCache(torch.utils.data.Dataset):
    """--cache: a (small) dataset's frozen Stage A encoding, computed once (encode_dataset, kept
    on disk by cache_stage_a) instead of at every step: no random augmentation, so it never changes.
    `encode` gives the latents (B, 4, H/4, W/4) here, the tokens (B, H/4, W/4) for Paella. Items are
    (image, caption, latent): the images are still read, for the compressor. With aspect-ratio
    buckets the latents come in several shapes, one per bucket (`sizes`, as the dataset's)."""

    def __init__(self, dataset, latents):
        self.dataset, self.sizes, self.latents = dataset, sizes_of(dataset), latents

    @staticmethod
    @torch.no_grad()
    def encode_dataset(dataset, encode, rt, batch_size=64, num_workers=2, verbose=True):
        """{"latents": encode(image) of every image, on the CPU (float32 latents, or tokens)}: what
        a LatentCache holds."""
        latents = [None] * len(dataset)
        batches = same_size_batches(dataset, batch_size, num_workers)
        for indices, (images, _) in tqdm(batches, "cache: Stage A encoding", disable=not verbose,
                                         leave=False):
            with rt.autocast():
                encoded = encode(images.to(rt.device)).cpu()  # (B, 4, H/4, W/4) or (B, H/4, W/4)
            for i, latent in zip(indices, encoded):
                latents[i] = latent.float() if latent.is_floating_point() else latent
        return {"latents": latents}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, caption = self.dataset[i]
        return image, caption, self.latents[i]


def cache_stage_a(trainset, encode, stage_a, args, rt, logger):
    """--cache of both Stage B scripts: `trainset`'s LatentCache under `encode`, computed once per
    dataset and Stage A into out_dir/cache/, read by re-runs and --resume (common.disk_cached)."""
    from data import dataset_key
    key = {"data": dataset_key(trainset), "stage_a": weights_fingerprint(stage_a),
           "encode": encode.__name__, "dtype": str(rt.dtype)}  # bf16 latents are not fp32's
    state, path, built = disk_cached(os.path.join(args.out_dir, "cache", "stage_b"), key, lambda: (
        LatentCache.encode_dataset(trainset, encode, rt, num_workers=args.num_workers,
                                   verbose=rt.master)), rt)
    logger.log(f"cache: {'wrote' if built else 'read'} {path}: the Stage A {encode.__name__} of "
               f"{len(trainset)} images")
    return LatentCache(trainset, **state)


def build_compressor(cfg, random_init, rt, logger):
    """A semantic compressor to train jointly with a Stage B: an EfficientNetV2 backbone starts from
    torchvision's ImageNet weights, as in the reference, unless random_init (--no_imagenet, or a
    resumed run)."""
    compressor = SemanticCompressor(cfg)
    if cfg.backbone != "tiny" and not random_init and rt.master:
        if not compressor.load_imagenet_weights():  # rank 0 decides; DDP broadcasts its weights
            logger.log(f"semantic compressor: ImageNet {cfg.backbone} weights unobtainable "
                       f"(offline?): random init")
    return compressor


@torch.no_grad()
def measure_latent_space(compressor, images):
    """Constants of Stage C's space y = (e + shift) / scale: y of mean 0 and std 1 over `images`."""
    e = compressor(images).float()
    return {"scale": round(e.std().item(), 4), "shift": round(-e.mean().item(), 4)}


# A Stage B checkpoint says which kind of Stage B it holds ("kind"; none: DiffNeXt), written by
STAGE_B_SCRIPTS = {"diffnext": "python stage_b.py --data DIR",
                   "paella": "python stage_b_paella.py --data DIR"}


def check_kind(ckpt, path, kinds):
    """The kind of Stage B in a Stage B checkpoint, 'diffnext' (v2) or 'paella' (v1); a one-line
    error unless it is one of `kinds`."""
    kind = ckpt.get("kind", "diffnext")
    if kind not in kinds:
        raise CheckpointError(f"{path} holds a {kind} Stage B (written by "
                              f"`{STAGE_B_SCRIPTS[kind]}`), but a {' or '.join(kinds)} Stage B was "
                              f"expected here")
    return kind


def load_stage_b(path, device="cpu", parts=("stage_b", "compressor", "text_encoder"), kinds=None):
    """Rebuild from a Stage B checkpoint alone what later stages need: the EMA Stage B and semantic
    compressor (eval, frozen), the text encoder, and the latent-space constants. Returns a dict with
    `parts`, 'latent_space', 'ckpt'. kinds: {kind: (model class, config class)} of the Stage B
    kinds the caller can run (default DiffNeXt only; stage_b_paella.STAGE_B_KINDS has both)."""
    kinds = kinds or {"diffnext": (StageB, StageBConfig)}
    ckpt = load_checkpoint(path, "stage_b", mmap=True)
    if ckpt.get("lora") and "stage_b" in parts:
        raise CheckpointError(f"{path} is a LoRA run's checkpoint (adapters only, for --resume): "
                              f"sample with --lora {os.path.join(os.path.dirname(path), LORA_FILE)}"
                              f" on the decoder it adapts")
    out = {"latent_space": ckpt["latent_space"], "ckpt": ckpt}
    if "stage_b" in parts:
        model, config = kinds[check_kind(ckpt, path, kinds)]
        with torch.device("meta"):
            out["stage_b"] = model(config(**ckpt["model_config"]))
        load_exact(out["stage_b"], ckpt["ema"], what=f"Stage B EMA weights of {path}")
    if "compressor" in parts:
        out["compressor"] = SemanticCompressor(CompressorConfig(**ckpt["compressor_config"]))
        out["compressor"].load_state_dict(ckpt["compressor_ema"])
    if "text_encoder" in parts:
        out["text_encoder"] = TextEncoder.from_spec(ckpt["text_encoder"])
    for k in parts:
        out[k] = out[k].to(device).eval().requires_grad_(False)
    return out


# -----------------------------------------------------------------------------
# the released weights (method §8.1): where they are, checked, and the models built from them

PRIOR_REPO, DECODER_REPO = "warp-ai/wuerstchen-prior", "warp-ai/wuerstchen"
OFFICIAL_FILES = {"stage_c": "model_v3_stage_c.pt", "stage_b": "model_v2_stage_b.pt",
                  "stage_a": "vqgan_f4_v1_500k.pt"}
# the semantic compressor of the released v2 (EfficientNetV2-S, `effnet_state_dict`), as diffusers'
# prior fine-tuning scripts fetch it: no diffusers repository holds it
COMPRESSOR_FILE = ("dome272/wuerstchen", "model_v2_stage_b.pt")
# the open_clip towers with the weights of the text_encoder/ folders (--open_clip), Stages C and B
OPEN_CLIP_TEXT = {"c": ("ViT-bigG-14", "laion2b_s39b_b160k"),
                  "b": ("ViT-H-14", "laion2b_s32b_b79k")}
# the schedule's constants (alpha_bar) as scheduler_config.json states them
SCHEDULER = {"_class_name": "DDPMWuerstchenScheduler", "s": 0.008, "scaler": 1.0}
RELEASED_LAYOUT = """\
  {root}/wuerstchen-prior/  model_index.json  prior/  text_encoder/  tokenizer/  scheduler/
      <- hf download warp-ai/wuerstchen-prior --local-dir {root}/wuerstchen-prior
  {root}/wuerstchen/  model_index.json  decoder/  vqgan/  text_encoder/  tokenizer/  scheduler/
      (and in an --export of ours: semantic_compressor/)
      <- hf download warp-ai/wuerstchen --local-dir {root}/wuerstchen
  Instead of prior/, decoder/ and vqgan/, the official files may lie in {root} itself
  (model_v2_stage_b.pt also holds the semantic compressor that --variation, --init_image and
  fine-tuning need):
      model_v3_stage_c.pt  model_v2_stage_b.pt  vqgan_f4_v1_500k.pt
      <- hf download dome272/wuerstchen model_v3_stage_c.pt ... --local-dir {root}
  With --open_clip the text towers are open_clip's ViT-bigG-14 laion2b_s39b_b160k and ViT-H-14
  laion2b_s32b_b79k (open_clip_pytorch_model.bin of laion/CLIP-ViT-bigG-14-laion2B-39B-b160k and
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K, from the Hugging Face cache) instead of the text_encoder/
  folders.
  sample.py: a folder with the official v1 files runs the v1 chain instead (sample.V1_LAYOUT)."""


def find_released(root=None, text_folders=True, compressor=False):
    """Paths of the released components in `root` (RELEASED_LAYOUT) or, when root is None, in the
    Hugging Face cache (downloaded into it first when online; the compressor, when asked for, from
    COMPRESSOR_FILE). Anything missing -> FileNotFoundError saying what to download and where, at
    once (offline, huggingface_hub's snapshot_download gives up after one request, no retries)."""
    if root is None:
        try:
            prior, decoder = hub_snapshot(PRIOR_REPO), hub_snapshot(DECODER_REPO)
        except Exception as e:  # offline and not cached, or no such repository
            raise FileNotFoundError(released_help(
                None, [f"{PRIOR_REPO} and {DECODER_REPO} ({type(e).__name__})"]))
    else:
        prior, decoder = (os.path.join(root, repo.split("/")[1])
                          for repo in (PRIOR_REPO, DECODER_REPO))

    def first(*paths):
        return next((p for p in paths if p and os.path.exists(p)), None)

    official = {k: root and os.path.join(root, name) for k, name in OFFICIAL_FILES.items()}
    paths = {"stage_c": first(os.path.join(prior, "prior"), official["stage_c"]),
             "stage_b": first(os.path.join(decoder, "decoder"), official["stage_b"]),
             "stage_a": first(os.path.join(decoder, "vqgan"), official["stage_a"]),
             "compressor": first(os.path.join(decoder, "semantic_compressor"), official["stage_b"])}
    if compressor and root is None and paths["compressor"] is None:
        try:
            paths["compressor"] = hub_file(*COMPRESSOR_FILE)
        except Exception:  # named below
            pass
    for k, repo in (("c", prior), ("b", decoder)):  # text_encoder_c, tokenizer_c, ..., index_b
        for part, name in (("text_encoder", "text_encoder"), ("tokenizer", "tokenizer"),
                           ("scheduler", "scheduler/scheduler_config.json"),
                           ("index", "model_index.json")):
            paths[f"{part}_{k}"] = first(os.path.join(repo, name))
    needed = (["stage_c", "stage_b", "stage_a"] + ["compressor"] * compressor
              + (["text_encoder_c", "text_encoder_b"] if text_folders else []))
    missing = [k for k in needed if paths[k] is None]
    if missing:
        raise FileNotFoundError(released_help(root, missing))
    return paths


def hub_snapshot(repo):
    """The repository's folder in the Hugging Face cache, downloaded first when online: configs,
    tokenizer, safetensors weights (.bin only for folders without safetensors; no fp16 copies)."""
    from huggingface_hub import snapshot_download
    folder = snapshot_download(repo, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                               ignore_patterns=["*fp16*"])
    bare = [f"{d}/*.bin" for d in ("prior", "decoder", "vqgan", "text_encoder")
            if os.path.isdir(os.path.join(folder, d))
            and not glob.glob(os.path.join(folder, d, "*.safetensors"))]
    return snapshot_download(repo, allow_patterns=bare) if bare else folder


def released_help(root, missing):
    where = root or "DIR"
    repo, name = COMPRESSOR_FILE
    return (f"the released Würstchen v2 weights were not found (missing: {', '.join(missing)}). "
            f"On a machine with network, download the two repositories (about 3.1 B parameters in "
            f"all) and pass their folder, `python sample.py --pretrained {where} --prompt ...`:\n"
            f"{RELEASED_LAYOUT.format(root=where)}\n"
            f"Or fill the Hugging Face cache (~/.cache/huggingface/hub) with `hf download "
            f"{PRIOR_REPO}` and `hf download {DECODER_REPO}` (and, to fine-tune, `hf download "
            f"{repo} {name}`: the semantic compressor) and pass --pretrained without a folder.")


def frozen(model, device, dtype=torch.float32):
    """A model for inference only: on `device` in `dtype`, eval mode, no gradients."""
    return model.to(device, dtype).eval().requires_grad_(False)


def open_released(root=None, open_clip_text=False, decoder_cfg=None, compressor=False):
    """The released Würstchen v2 weights (method §8) or an export of ours, found by find_released
    (the semantic compressor required with `compressor`) and checked against the constants the
    method fixes; nothing is loaded yet. Returns {"builders": name -> a function building that
    model (float32, CPU): text_encoder_c, text_encoder_b, stage_b, stage_a, and compressor if there
    is one; "paths"; "latent_space": y = (e + shift) / scale, from the prior's model_index.json
    (released: 42 and 1); "image_sizes": the training sizes of Stages C and B (released: 1024)}.
    The prior (stage_c.py) loads from paths["stage_c"]. open_clip_text: the open_clip towers instead
    of the repositories' transformers text encoders (the same weights). decoder_cfg: the
    StageBConfig of an official model_v2_stage_b.pt that is not the released size."""
    paths = find_released(root, text_folders=not open_clip_text, compressor=compressor)
    prior_index, decoder_index = read_json(paths["index_c"]), read_json(paths["index_b"])
    # constants the method hard-codes (round_size, decode_stage_c, alpha_bar), per the repositories
    checks = {"resolution_multiple": (prior_index.get("resolution_multiple", RESOLUTION_MULTIPLE),
                                      RESOLUTION_MULTIPLE),
              "latent_dim_scale": (decoder_index.get("latent_dim_scale", LATENT_DIM_SCALE),
                                   LATENT_DIM_SCALE)}
    for k in "cb":
        sched = read_json(paths[f"scheduler_{k}"])
        found = {key: sched.get(key, SCHEDULER[key]) for key in ("s", "scaler")}
        checks[f"scheduler {k}"] = (found, {key: SCHEDULER[key] for key in found})
    wrong = {k: found for k, (found, ours) in checks.items() if found != ours}
    if wrong:
        raise UsageError(f"these weights use other constants than Würstchen v2 and this code: "
                         f"{wrong}")
    # pad tokens (LAION's '!' without a tokenizer folder); open_clip weights found now, not later
    pad_tokens = {k: read_pad_token(paths[f"tokenizer_{k}"]) if paths[f"tokenizer_{k}"] else "!"
                  for k in "cb"}
    weights = {k: fetch_clip_weights(*OPEN_CLIP_TEXT[k]) for k in "cb"} if open_clip_text else {}

    def text_encoder(k):  # the repository's CLIPTextModel, or the open_clip tower with its weights
        if open_clip_text:
            return TextEncoder(OPEN_CLIP_TEXT[k][0], weights[k], pad_tokens[k])
        return TextEncoder("transformers", paths[f"text_encoder_{k}"], pad_tokens[k])

    builders = {"text_encoder_c": lambda: text_encoder("c"),
                "text_encoder_b": lambda: text_encoder("b"),
                "stage_b": lambda: StageB.from_pretrained(paths["stage_b"], decoder_cfg),
                "stage_a": lambda: StageA.from_pretrained(paths["stage_a"])}
    if paths["compressor"]:
        builders["compressor"] = lambda: SemanticCompressor.from_pretrained(paths["compressor"])
    # the prior pipeline's e = latent_mean * y - latent_std: y = (e + 1) / 42 (method §3.3)
    latent_space = {"scale": prior_index.get("latent_mean", RELEASED_LATENT_SPACE["scale"]),
                    "shift": prior_index.get("latent_std", RELEASED_LATENT_SPACE["shift"])}
    image_sizes = {"c": prior_index.get("_train_image_size", 1024),  # released: 1024 px
                   "b": decoder_index.get("_train_image_size", 1024)}
    return {"builders": builders, "paths": paths, "latent_space": latent_space,
            "image_sizes": image_sizes}


def train(args):
    preset = PRESETS[preset_name(args)]
    # --pretrained: fine-tune the released (or exported) decoder on these images; their semantic
    # compressor stays frozen, so the latent space Stage C samples in does not move
    released = (open_released(args.pretrained or None, compressor=True)
                if args.pretrained is not None else None)
    if args.lora_rank and not released:
        raise UsageError("--lora_rank adapts a pretrained Stage B: give --pretrained [DIR]")
    defaults = (finetune_defaults(preset, args) | {"image_size": released["image_sizes"]["b"]}
                if released else preset["train"])
    rt, logger, ckpt_path, ckpt = start_run(args, "stage_b", defaults)
    if ckpt:
        check_kind(ckpt, ckpt_path, ("diffnext",))
    if released:
        build = released["builders"]
        stage_a, compressor = (frozen(build["stage_a"](), rt.device),
                               frozen(build["compressor"](), rt.device))
        stage_b, latent_space = build["stage_b"]().requires_grad_(True), released["latent_space"]
        text_encoder = build_text_encoder(args, None, ckpt, rt.device) if ckpt else \
            frozen(build["text_encoder_b"](), rt.device)
    else:
        stage_b = StageB(StageBConfig(**ckpt["model_config"]) if ckpt else preset["model"])
        compressor = build_compressor(CompressorConfig(**ckpt["compressor_config"]) if ckpt else
                                      preset["compressor"], args.no_imagenet or ckpt is not None,
                                      rt, logger)
        text_encoder = build_text_encoder(args, preset["text_encoder"], ckpt, rt.device)  # frozen
        # frozen Stage A (EMA weights) from its checkpoint alone: images -> latents / scale_factor
        stage_a, latent_space = load_stage_a(args.stage_a, rt.device), preset["latent_space"]
    cfg, ccfg = stage_b.cfg, compressor.cfg
    logger.log(f"stage B | preset {args.model} | {rt.device} "
               f"{str(rt.dtype).replace('torch.', '')} | world {rt.world_size} | "
               f"{'fine-tune of --pretrained ' + args.pretrained if released else 'config'} "
               f"{asdict(cfg)} | compressor {asdict(ccfg)}{' (frozen)' * bool(released)} | "
               f"text {text_encoder.spec['name']} / {text_encoder.spec['pretrained']}")
    if stage_a.cfg.c_latent != cfg.c_in:
        raise UsageError(f"Stage A {args.stage_a} has {stage_a.cfg.c_latent} latent channels, "
                         f"Stage B expects {cfg.c_in}")
    if text_encoder.width != cfg.clip_embd:
        raise UsageError(f"text encoder {text_encoder.spec['name']} is {text_encoder.width} wide; "
                         f"the {args.model} Stage B expects clip_embd {cfg.clip_embd}")

    # data: images in [0, 1]; a fixed held-out set for previews and the reconstruction PSNR
    from data import folder_captions, image_batches, open_data
    trainset, holdout = open_data(args, verbose=rt.master)  # a folder or tar shards
    held_images, held_captions = holdout_batch(holdout, rt.device)
    with torch.no_grad():
        held_latents = stage_a.encode(held_images)  # (N, 4, S/4, S/4)
    multiple = cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)
    if held_latents.shape[-1] % multiple:
        raise UsageError(f"--image_size {args.image_size} gives {held_latents.shape[-1]} px "
                         f"latents; Stage B needs a multiple of {multiple} (image size a multiple "
                         f"of {4 * multiple})")
    captions = folder_captions(trainset) if args.epochs or released else None  # None for tar shards
    if args.epochs:
        epochs_to_steps(args, captions)
    if released and captions is not None:  # what makes a small fine-tune learn nothing, said now
        for warning in finetune_warnings(args, defaults["lr"], captions):
            logger.log(f"warning: {warning}")

    # models, EMA and optimizer: compressor + Stage B together (weights stay fp32; autocast does the
    # rest); when fine-tuning only Stage B (or its LoRA adapters) trains
    model = CompressorAndStageB(compressor, stage_b, args.p_zero_effnet, args.p_noise_effnet,
                                latent_space, train_compressor=not released).to(rt.device)
    channels_last_convs(model.stage_b)  # as its activations: no gradient copies under DDP
    lora = add_lora_from_args(model.stage_b, args)
    ema, trained, opt = ema_and_optimizer(model, args)
    scaler = rt.make_scaler()
    logger.log(f"parameters: Stage B {sum(p.numel() for p in model.stage_b.parameters()):,} | "
               f"semantic compressor {sum(p.numel() for p in compressor.parameters()):,} | "
               f"text encoder (frozen) {sum(p.numel() for p in text_encoder.parameters()):,} | "
               f"trained {sum(map(torch.numel, trained)):,}{', LoRA ' + str(lora) if lora else ''}")
    if args.cache:  # computed once per dataset and Stage A, on disk: re-runs and --resume read it
        trainset = cache_stage_a(trainset, stage_a.encode, stage_a, args, rt, logger)
    step = ckpt["step"] if ckpt else 0
    batches = resume_batches(trainset, args, rt, step, ckpt)
    if ckpt:
        model.restore(ckpt, ema, opt, scaler)
        logger.log(f"resumed from {ckpt_path} at step {step}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    model = wrap_ddp(model, rt)  # under DDP, the compressor's BatchNorms see the global batch
    guard = NonFiniteGuard(rt, ckpt_path, args.max_nonfinite, raw_model)
    with torch.no_grad():
        stage_a_psnr = psnr(stage_a.decode(held_latents).float(), held_images)  # Stage B's ceiling

    @torch.no_grad()
    def preview():
        """The path a user cares about, on the held-out images: image -> compressor -> Stage B
        sampling -> Stage A decode (EMA); a grid (inputs on top, then reconstructions), the PSNR."""
        g = torch.Generator(rt.device).manual_seed(args.seed)  # the same noise at every preview
        noise = torch.randn(held_latents.shape, generator=g, device=rt.device)
        ema.eval()  # also the trained model itself with --ema_decay 0: BatchNorm statistics frozen
        cond = {"effnet": ema.compressor(held_images),
                "clip_text": text_encoder.encode(held_captions)}
        with rt.autocast():
            recon = stage_a.decode(ddpm_sample(ema.stage_b, noise, args.steps_b, cond, generator=g))
        recon = recon.float().clamp(0, 1)
        path = os.path.join(args.out_dir, f"samples_{step:07d}.png")
        save_image_grid(torch.cat([held_images[:8], recon[:8]]), path, 8)
        metrics = {"holdout_psnr": psnr(recon, held_images), "stage_a_psnr": stage_a_psnr}
        logger.log(f"preview {path} | held-out PSNR {metrics['holdout_psnr']:.2f} dB (image -> "
                   f"compressor -> Stage B, {args.steps_b} steps -> Stage A; Stage A alone "
                   f"{stage_a_psnr:.2f} dB)")
        model.train()
        return metrics

    def save(metrics, run_state):
        space = latent_space or measure_latent_space(ema.compressor, held_images)
        save_checkpoint(ckpt_path, {
            "stage": "stage_b", "kind": "diffnext", "step": step, "model_config": asdict(cfg),
            "compressor_config": asdict(ccfg)} | raw_model.checkpoint_entries(ema) | {
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "train_config": vars(args), "latent_space": space,
            "text_encoder": text_encoder.checkpoint_entry(), "lora": lora, **run_state,
            "deps": {"pretrained": released["paths"]} if released else {
                "stage_a": os.path.abspath(args.stage_a), "data": os.path.abspath(args.data)},
            "metrics": metrics})
        if lora:  # the adapters in diffusers' LoRA layout, for sample.py --lora
            save_lora(os.path.join(args.out_dir, LORA_FILE), ema.stage_b, "decoder",
                      f"the Stage B decoder {released['paths']['stage_b']} {asdict(cfg)}")
        return space

    metrics, space = {}, None
    if rt.master and released and step == 0:  # the released decoder, before fine-tuning
        metrics = preview()
    progress = Progress(args, rt, logger, step, "stage B")
    model.train()
    while step < args.max_steps:
        lr = get_lr(step, args.lr, args.warmup)
        set_lr(opt, lr)
        for micro in range(args.grad_accum):
            images, captions, *cached = next(batches)  # cached: [Stage A latents] with --cache
            images = images.to(rt.device, non_blocking=True)
            drop = torch.rand(len(captions)) < args.p_drop_text  # CFG: empty caption, per sample
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            with torch.no_grad(), rt.autocast():
                # (B, 4, S/4, S/4): unquantised Stage A latents / scale_factor
                latents = cached[0].to(rt.device) if cached else stage_a.encode(images).float()
                clip_text = text_encoder.encode(captions)  # (B, 77, width)
            with no_sync(model, micro == args.grad_accum - 1), rt.autocast():
                loss = model(images, latents, clip_text)
            # gradients of a mean over micro-batches: divide each micro-batch loss by their count
            scaler.scale(loss / args.grad_accum).backward()
            progress.count(len(images))
        grad_norm = guard.step(step, loss, [(opt, scaler)], args.grad_clip)  # skipped if non-finite
        if guard.ok and ema is not raw_model:
            update_ema(ema, raw_model, ema_decay_at(step, args.ema_decay))
        step += 1
        log, preview_now, checkpoint = progress.step(step)
        if log:
            progress.log(step, {"loss": loss.item(), "grad_norm": grad_norm.item()}, lr,
                         guard.skipped)
        if rt.master and (preview_now or checkpoint):
            raw_model.own_statistics(ema, image_batches(trainset), rt)
        if rt.master and preview_now:
            metrics = preview()
        if checkpoint:
            run_state = gather_run_state(rt, batches)  # every rank: RNG state, stream positions
            if rt.master:
                space = save(metrics, run_state)
    progress.close(f"held-out reconstruction PSNR "
                   f"{metrics.get('holdout_psnr', float('nan')):.2f} dB | latent space {space} | "
                   f"checkpoint {ckpt_path}")


# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Train Stage B of Würstchen (semantic "
                                     "compressor + DiffNeXt decoder) on a folder of images, on top "
                                     "of a trained Stage A.", formatter_class=HelpFormatter)
    add_common_args(parser, "stage_b")
    g = parser.add_argument_group("stage B")
    add_stage_b_args(g)
    g.add_argument("--steps_b", type=int, default=12,
                   help="Stage B DDPM steps of the preview reconstructions")
    add_finetune_args(parser.add_argument_group("fine-tuning (--pretrained)"))
    return parser.parse_args(argv)


def add_stage_b_args(group):
    """The flags of both Stage B scripts (stage_b.py and stage_b_paella.py)."""
    group.add_argument("--stage_a", default="out/stage_a/ckpt.pt",
                       help="frozen Stage A checkpoint whose latents Stage B learns")
    add_text_encoder_args(group)
    group.add_argument("--no_imagenet", action="store_true", help="start the EfficientNetV2 "
                       "backbone from random weights instead of ImageNet")
    group.add_argument("--p_drop_text", type=float, default=0.05,
                       help="probability of an empty caption, per sample (CFG)")
    group.add_argument("--p_zero_effnet", type=float, default=0.05,
                       help="probability of a zeroed semantic latent, per sample")
    group.add_argument("--p_noise_effnet", type=float, default=0.3, help="probability of a "
                       "Stage-C-noised semantic latent (t ~ U(0, 0.5)), per sample")
    group.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                       help="encode the whole dataset with Stage A once, kept in out_dir/cache/ "
                       "for re-runs and --resume (small datasets; default: per preset, on for tiny "
                       "and when fine-tuning)")


if __name__ == "__main__":
    run_cli(train, get_args())
