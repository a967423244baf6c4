"""
Stage C of Würstchen: the text-conditional diffusion prior (paper §3 "Stage C", method.md §5-§7).

Stage C is where text meets image. It learns p(y | text) in the 42x-compressed semantic space of Stage B's frozen
semantic compressor: y = (e + shift) / scale, e = compressor(image) (B, 16, H/42.67, W/42.67), i.e. 16 x 24 x 24
for a 1024 px image (16 x 3 x 3 for the 128 px toy images). It is a stack of ConvNeXt / timestep / attention
blocks without any down-sampling, trained with Stage B's P2-weighted noise-prediction loss.

    prompt --CLIP text--> (B, 77, c_cond) --Stage C, DDPM + CFG--> y (B, 16, h, w)
           --e = y * scale - shift--> Stage B --> Stage A decode --> image (B, 3, H, W)

Run it (after Stages A and B, whose checkpoints it reads from out/stage_a and out/stage_b):
    python stage_c.py --data toy --model tiny            # CPU, a few minutes
    python stage_c.py --data ./imgs                      # one GPU, default 'small' preset
    torchrun --standalone --nproc_per_node=8 stage_c.py --data ./imgs --model paper --grad_checkpointing
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from stage_a import load_exact, load_weights_file
from stage_b import (
    AttnBlock,
    GlobalResponseNorm,
    LayerNorm2d,
    TimestepBlock,
    dome272_to_diffusers,
    r_embedding,
)

# -----------------------------------------------------------------------------
# config


@dataclass
class StageCConfig:
    """Prior hyper-parameters (method §5.1); the defaults are the released v2 prior (993,636,896 params)."""
    c_in: int = 16  # semantic latent channels
    c: int = 1536  # width of every block (no down-sampling anywhere)
    c_cond: int = 1280  # CLIP text width (ViT-bigG-14)
    c_r: int = 64  # sinusoidal timestep embedding size
    depth: int = 32  # number of [ResBlock, TimestepBlock, AttnBlock] triples
    nhead: int = 24  # attention heads (64 dims each)
    dropout: float = 0.1  # MLP and attention-probability dropout


PRESETS = {
    # CPU quick start and tests: 16 x 3 x 3 latents of 128 px toy images, text from the tiny random tower (64 wide)
    "tiny": StageCConfig(c=128, c_cond=64, depth=4, nhead=4, dropout=0.0),
    # one-GPU reproduction (~123 M params): CLIP ViT-B-32 text (512 wide), as Stage B's small preset
    "small": StageCConfig(c=768, c_cond=512, depth=16, nhead=12),
    # the released warp-ai/wuerstchen-prior `prior` (WuerstchenPrior), CLIP ViT-bigG-14 text
    "paper": StageCConfig(),
}

# -----------------------------------------------------------------------------
# model


class ResBlock(nn.Module):
    """ConvNeXt block of the prior ("C" in method §4.2, dome272 `ResBlock`): [concat skip] -> depthwise conv
    (groups = c, so a skip of width c gives every group 2 input channels) -> LayerNorm2d -> channels-last MLP
    (Linear 4c, GELU, GRN, Dropout, Linear) -> residual. Unlike Stage B's block, the skip joins *before* the conv
    (the prior itself passes none)."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), GlobalResponseNorm(4 * c),
                                         nn.Dropout(dropout), nn.Linear(4 * c, c))

    def forward(self, x, skip=None):  # x: (B, C, H, W), skip: (B, C_skip, H, W) or None
        h = x if skip is None else torch.cat([x, skip], dim=1)  # (B, C + C_skip, H, W)
        h = self.norm(self.depthwise(h))  # (B, C, H, W)
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # MLP runs on (B, H, W, C)


class StageC(nn.Module):
    """Stage C, the Würstchen prior (paper §3, method §5): text-conditional noise prediction on semantic latents.

    projection (1x1 conv c_in -> c) -> depth x [ResBlock, TimestepBlock, AttnBlock over [image tokens ; text]]
    -> LayerNorm2d -> 1x1 conv to (a, b) -> predicted noise (x_t - a) / (|1 - b| + 1e-5) (method §5.3).
    Key names are diffusers' `WuerstchenPrior` names (blocks.{3k, 3k+1, 3k+2}), so its weights load 1:1.
    """

    def __init__(self, cfg: StageCConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False  # activation checkpointing per triple: recompute in backward, less memory
        self.projection = nn.Conv2d(cfg.c_in, cfg.c, kernel_size=1)
        # text tokens -> the width of the blocks (no LayerNorm on the sequence here, unlike Stage B's seq_norm)
        self.cond_mapper = nn.Sequential(nn.Linear(cfg.c_cond, cfg.c), nn.LeakyReLU(0.2), nn.Linear(cfg.c, cfg.c))
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            self.blocks.append(ResBlock(cfg.c, dropout=cfg.dropout))
            self.blocks.append(TimestepBlock(cfg.c, cfg.c_r))
            self.blocks.append(AttnBlock(cfg.c, cfg.c, cfg.nhead, self_attn=True, dropout=cfg.dropout))
        self.out = nn.Sequential(LayerNorm2d(cfg.c), nn.Conv2d(cfg.c, 2 * cfg.c_in, kernel_size=1))
        self.init_weights()

    def init_weights(self):
        """dome272's initialisation of the prior, in its order (method §5.4)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for attn in (b.attention for b in self.blocks if isinstance(b, AttnBlock)):
            # dome272's nn.MultiheadAttention draws q/k/v as one packed (3c, c) xavier matrix: a narrower range
            bound = (6 / (4 * self.cfg.c)) ** 0.5
            for proj in (attn.to_q, attn.to_k, attn.to_v):
                nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.normal_(self.projection.weight, std=0.02)  # input
        nn.init.normal_(self.cond_mapper[0].weight, std=0.02)  # conditioning
        nn.init.normal_(self.cond_mapper[2].weight, std=0.02)
        nn.init.zeros_(self.out[1].weight)  # output: a = 0, b = 0 at init, so the net starts as eps_hat = x_t
        for block in self.blocks:
            if isinstance(block, ResBlock):
                block.channelwise[-1].weight.data *= (1 / self.cfg.depth) ** 0.5
            elif isinstance(block, TimestepBlock):
                nn.init.zeros_(block.mapper.weight)

    def _triple(self, k, x, r_embed, cond):
        """The k-th [ResBlock, TimestepBlock, AttnBlock]: one unit of activation checkpointing."""
        res, timestep, attn = self.blocks[3 * k:3 * k + 3]
        return attn(timestep(res(x), r_embed), cond)

    def forward(self, x, t, clip_text):
        """x: noised latent x_t (B, c_in, h, w), any h, w; t: (B,) in [0, 1]; clip_text: (B, 77, c_cond).
        Returns the predicted noise (B, c_in, h, w), float32."""
        r_embed = r_embedding(t, self.cfg.c_r)  # (B, c_r)
        cond = self.cond_mapper(clip_text)  # (B, 77, c)
        h = self.projection(x)  # (B, c_in, h, w) -> (B, c, h, w)
        for k in range(self.cfg.depth):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(self._triple, k, h, r_embed, cond, use_reentrant=False)
            else:
                h = self._triple(k, h, r_embed, cond)
        a, b = self.out(h).float().chunk(2, dim=1)  # (B, 2 c_in, h, w) -> 2 x (B, c_in, h, w)
        # a plays sqrt(abar) x0_hat and |1 - b| plays sqrt(1 - abar) (the source notes x0_hat = a / sqrt(1-(1-b)^2))
        return (x.float() - a) / ((1 - b).abs() + 1e-5)

    @classmethod
    def from_pretrained(cls, path, cfg=None):
        """Load released weights (method §8.1-8.3): a diffusers `WuerstchenPrior.save_pretrained` folder (config.json
        + safetensors/bin; warp-ai/wuerstchen-prior subfolder `prior`) or an official dome272 checkpoint such as
        `model_v3_stage_c.pt` (its `ema_state_dict`, as the converter uses; packed attention is split into q/k/v).
        For a .pt file the sizes are read off the weights, with 64-dim heads as in every release unless `cfg` says."""
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json")) as f:
                hf = json.load(f)
            cfg = StageCConfig(**{k: v for k, v in hf.items() if k in StageCConfig.__dataclass_fields__})
            sd = load_weights_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            sd = dome272_to_diffusers(sd.get("ema_state_dict", sd.get("state_dict", sd)))
            if cfg is None:
                c_cond, c = sd["cond_mapper.0.weight"].shape[1], sd["projection.weight"].shape[0]
                cfg = StageCConfig(c_in=sd["projection.weight"].shape[1], c=c, c_cond=c_cond,
                                   c_r=sd["blocks.1.mapper.weight"].shape[1], nhead=c // 64,
                                   depth=sum(k.endswith(".depthwise.weight") for k in sd))
        with torch.device("meta"):  # no memory, no init: the weights are assigned below
            model = cls(cfg)
        load_exact(model, sd, what=f"Stage C weights from {path}")
        return model.eval()
