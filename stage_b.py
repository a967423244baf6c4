"""
Stage B of Würstchen v2: semantic compressor + DiffNeXt diffusion decoder (method.md §3-4, §6-7).

    image (B, 3, S, S) --SemanticCompressor--> e (B, 16, S/42.67, S/42.67)  (16x24x24 at 1024 px)
    noise (B, 4, S/4, S/4) --StageB(x, t, e, text) x N DDPM steps--> latent --StageA.decode--> image

The compressor (EfficientNetV2-S features at 3/4 of the image side + 1x1 conv + BatchNorm) and
Stage B (a U-Net predicting the noise in a Stage A latent) train jointly on frozen Stage A latents,
with a frozen CLIP text tower. Stage C later generates e from text; Stage B decodes it. The blocks
are in blocks.py, the schedule, loss and sampler in diffusion.py: both shared with Stage C.

Run it (after stage_a.py):
    python stage_b.py --data toy --model tiny  # CPU, a few minutes
    python stage_b.py --data ./imgs            # one GPU, 'small' preset (CLIP ViT-B-32 text tower)
    torchrun --standalone --nproc_per_node=8 stage_b.py --data ./imgs --model paper
Fine-tune the released decoder (its compressor frozen) on a folder (README, "Fine-tune"):
    python stage_b.py --data ./imgs --pretrained weights/ [--lora_rank 16]
"""
import argparse
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from blocks import (LATENT_DIM_SCALE, RELEASED_LATENT_SPACE, AttnBlock, LayerNorm2d, ResBlockStageB,
                    TimestepBlock, dome272_init, image_side_multiple, per_level, r_embedding,
                    unet_levels)
from cache import cache_stage_a
from common import (HOW_TO_MAKE, ArgumentParser, CheckpointError, HelpFormatter, NonFiniteGuard,
                    Progress, UsageError, add_common_args, channels_last_convs, ema_and_optimizer,
                    ema_decay_at, eval_mode, frozen, get_lr, load_checkpoint, load_exact,
                    load_weights_file, no_sync, positive_int, preset_name, probability, psnr,
                    read_json, recompute_batchnorm, run_cli, save_checkpoint, save_image_grid,
                    set_lr, start_run, update_ema, wrap_ddp)
from data import check_data, holdout_batch, image_batches, open_data, resume_batches
from diffusion import add_noise, caption_dropout, ddpm_sample, diffusion_loss, drop_captions, randn
from finetune import (LORA_FILE, add_finetune_args, add_lora_from_args, finetune_defaults,
                      load_trained, plan_epochs, refuse_lora_checkpoint, save_lora, trained_state)
from pretrained import dome272_to_diffusers, load_imagenet_weights, open_released
from stage_a import IMAGENET_MEAN, IMAGENET_STD, StageA, load_stage_a
from text_encoder import TextEncoder, add_text_encoder_args, build_text_encoder

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


# Per preset: the DiffNeXt config, the semantic compressor, the text tower (open_clip name and tag;
# "tiny": a small random tower), Stage C's latent space (None: measured at every save so that y has
# unit variance), the training defaults of flags left unset, and a fine-tune's (docs/finetune.md).
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


class StageB(nn.Module):
    """Stage B, the v2 "DiffNeXt" decoder (method §4): a U-Net of ResBlockStageB / TimestepBlock /
    AttnBlock levels predicting the noise in a noised Stage A latent, conditioned on e (resized
    bicubically and concatenated at the levels that take it) and on CLIP text tokens (attention)."""
    kind = "diffnext"  # what its checkpoints say ("kind"), as opposed to v1's "paella"

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

    @torch.no_grad()
    def sample(self, stage_a, e, clip_text, negative_clip_text=None, steps=None,
               guidance_scale=None, generator=None, progress=False, side=None, temperature=None):
        """Stage B's part of sampling (method §7.5): e (B, 16, h, w) and text -> images (B, 3, H, W)
        in [0, 1]. DDPM from noise at the Stage A latent side int(10.67 h) or `side`, `steps`
        steps (default 12), conditioned on e and `clip_text`; CFG only when guidance_scale > 1
        (default off, as released), against zero e and `negative_clip_text` (as diffusers'
        combined pipeline); Stage A decodes unquantised. (A token Stage B's temperature: unused.)"""
        guidance_scale = guidance_scale or 0.0
        side = side or (int(e.shape[-2] * LATENT_DIM_SCALE), int(e.shape[-1] * LATENT_DIM_SCALE))
        noise = randn((len(e), self.cfg.c_in, *side), generator, e.device)
        cond = {"effnet": e, "clip_text": clip_text}
        uncond = ({"effnet": torch.zeros_like(e), "clip_text": negative_clip_text}
                  if guidance_scale > 1 else None)
        latents = ddpm_sample(self, noise, steps or 12, cond, uncond, guidance_scale, generator,
                              progress)
        return stage_a.decode(latents).float().clamp(0, 1)

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


class SemanticCompressor(nn.Module):
    """The semantic compressor (paper, method §3): image in [0, 1] -> e (B, 16, H/42.67, W/42.67).

    A stride-32 backbone (EfficientNetV2-S features, 1280 channels; V2-L in v1; a patch-embedding
    stem for 'tiny') on the image resized to 3/4 of its side, then a 1x1 conv to 16 channels (no
    bias) and a BatchNorm. e is the raw BatchNorm output (v1: (e + 1) / 42, cfg.v1_scaling), the
    space Stage B is conditioned on; Stage C models y = (e + shift) / scale. Keys match the official
    EfficientNetEncoder (backbone.*, mapper.0, mapper.1). Constructing never downloads: see
    build_compressor.
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


# -----------------------------------------------------------------------------
# training: the compressor and Stage B as one module

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
        when it has them: finetune.trained_state) and the compressor."""
        return {"model": trained_state(self.stage_b), "ema": trained_state(ema.stage_b),
                "compressor": self.compressor.state_dict(),
                "compressor_ema": ema.compressor.state_dict()}

    def own_statistics(self, ema, images, rt):
        """Before a preview or save: the EMA compressor's BatchNorms get the statistics of its own
        weights on `images` (training images; common.recompute_batchnorm). Not for a frozen
        compressor (its statistics fix Stage C's space), nor without an EMA (they are its own)."""
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


def build_compressor(cfg, random_init, rt, logger):
    """A semantic compressor to train jointly with a Stage B: an EfficientNetV2 backbone starts from
    torchvision's ImageNet weights, as in the reference, unless random_init (--no_imagenet, or a
    resumed run)."""
    compressor = SemanticCompressor(cfg)
    if cfg.backbone != "tiny" and not random_init and rt.master:  # rank 0's; DDP broadcasts them
        if not load_imagenet_weights(compressor.backbone, cfg.backbone):
            logger.log(f"semantic compressor: ImageNet {cfg.backbone} weights unobtainable "
                       f"(offline?): random init")
    return compressor


@torch.no_grad()
def measure_latent_space(compressor, images):
    """Constants of Stage C's space y = (e + shift) / scale: y of mean 0 and std 1 over `images`."""
    with eval_mode(compressor):  # as Stage C runs it
        e = compressor(images).float()
    return {"scale": round(e.std().item(), 4), "shift": round(-e.mean().item(), 4)}

# -----------------------------------------------------------------------------
# loading: a Stage B checkpoint, of either kind (decoders.py knows both)


def check_kind(ckpt, path, kinds):
    """A Stage B checkpoint's kind, 'diffnext' (v2) or 'paella' (v1); an error unless in `kinds`."""
    kind = ckpt.get("kind", "diffnext")
    if kind not in kinds:
        script = HOW_TO_MAKE.get("stage_b" if kind == "diffnext" else kind, "?")
        raise CheckpointError(f"{path} holds a {kind} Stage B (written by `{script}`), but a "
                              f"{' or '.join(kinds)} Stage B was expected here")
    return kind


def load_stage_b(path, device="cpu", parts=("stage_b", "compressor", "text_encoder"), kinds=None):
    """Rebuild from a Stage B checkpoint alone what later stages need: the EMA Stage B, semantic
    compressor and text encoder (frozen), the latent space. Returns {`parts`, 'latent_space',
    'ckpt'}. kinds: {kind: (model, config class)}: DiffNeXt, or decoders.load_decoder's."""
    kinds = kinds or {"diffnext": (StageB, StageBConfig)}
    ckpt = load_checkpoint(path, "stage_b", mmap=True)
    out = {"latent_space": ckpt["latent_space"], "ckpt": ckpt}
    if "stage_b" in parts:
        refuse_lora_checkpoint(ckpt, path, "decoder")
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
        out[k] = frozen(out[k], device)
    return out

# -----------------------------------------------------------------------------
# training loop


@torch.no_grad()
def preview_reconstructions(ema, stage_a, text_encoder, images, captions, side, stage_a_psnr,
                            path, args, rt, logger, **sampling):
    """The path a user cares about, for a Stage B of either kind: held-out images -> the EMA
    compressor -> Stage B sampling (`sampling`: its kind's settings) -> Stage A, with the same
    noise at every preview. A grid at `path` (inputs on top, reconstructions below), the PSNR."""
    g = torch.Generator(rt.device).manual_seed(args.seed)
    with eval_mode(ema):  # also the trained model itself with --ema_decay 0: BatchNorm frozen
        e = ema.compressor(images)
        clip, empty = text_encoder.encode(captions), text_encoder.encode([""] * len(captions))
        with rt.autocast():
            recon = ema.stage_b.sample(stage_a, e, clip, empty, steps=args.steps_b, generator=g,
                                       side=side, **sampling)
    save_image_grid(torch.cat([images[:8], recon[:8]]), path, 8)
    metrics = {"holdout_psnr": psnr(recon, images), "stage_a_psnr": stage_a_psnr}
    logger.log(f"preview {path} | held-out PSNR {metrics['holdout_psnr']:.2f} dB (image -> "
               f"compressor -> {type(ema.stage_b).__name__}, {args.steps_b} steps -> Stage A; "
               f"Stage A alone {stage_a_psnr:.2f} dB)")
    return metrics


def build_models(args, preset, released, ckpt, rt, logger):
    """The models of a Stage B run: (frozen Stage A, semantic compressor, Stage B, frozen text
    tower, Stage C's latent space or None: measured at every save). From our Stage A checkpoint and
    the preset (or the checkpoint being resumed), the compressor starting from ImageNet weights; or,
    fine-tuning (--pretrained), the released or exported decoder with its compressor, frozen."""
    if released:
        paths = released["paths"]
        stage_a = frozen(StageA.from_pretrained(paths["stage_a"]), rt.device)
        compressor = frozen(SemanticCompressor.from_pretrained(paths["compressor"]), rt.device)
        stage_b, latent_space = (StageB.from_pretrained(paths["stage_b"]).requires_grad_(True),
                                 released["latent_space"])
        text_encoder = (build_text_encoder(args, None, ckpt, rt.device) if ckpt else
                        frozen(released["builders"]["text_encoder_b"](), rt.device))
    else:
        stage_b = StageB(StageBConfig(**ckpt["model_config"]) if ckpt else preset["model"])
        compressor = build_compressor(CompressorConfig(**ckpt["compressor_config"]) if ckpt else
                                      preset["compressor"], args.no_imagenet or ckpt is not None,
                                      rt, logger)
        text_encoder = build_text_encoder(args, preset["text_encoder"], ckpt, rt.device)  # frozen
        # Stage A, frozen (EMA weights), from its checkpoint: images -> latents / scale_factor
        stage_a, latent_space = load_stage_a(args.stage_a, rt.device), preset["latent_space"]
    if stage_a.cfg.c_latent != stage_b.cfg.c_in:
        raise UsageError(f"Stage A {args.stage_a} has {stage_a.cfg.c_latent} latent channels, "
                         f"Stage B expects {stage_b.cfg.c_in}")
    if text_encoder.width != stage_b.cfg.clip_embd:
        raise UsageError(f"text encoder {text_encoder.spec['name']} is {text_encoder.width} wide; "
                         f"the {args.model} Stage B expects clip_embd {stage_b.cfg.clip_embd}")
    return stage_a, compressor, stage_b, text_encoder, latent_space


def train(args):
    preset = PRESETS[preset_name(args)]
    data_defaults = check_data(args, image_side_multiple(preset["model"]), "Stage B's U-Net")
    # --pretrained: fine-tune the released (or exported) decoder on these images; their semantic
    # compressor stays frozen, so the latent space Stage C samples in does not move
    released = (open_released(args.pretrained or None, compressor=True)
                if args.pretrained is not None else None)
    if args.lora_rank and not released:
        raise UsageError("--lora_rank adapts a pretrained Stage B: give --pretrained [DIR]")
    defaults = (finetune_defaults(preset, args) | {"image_size": released["image_sizes"]["b"]}
                if released else preset["train"]) | data_defaults
    rt, logger, ckpt_path, ckpt = start_run(args, "stage_b", defaults)
    if ckpt:
        check_kind(ckpt, ckpt_path, ("diffnext",))
    stage_a, compressor, stage_b, text_encoder, latent_space = build_models(args, preset, released,
                                                                            ckpt, rt, logger)
    cfg, ccfg = stage_b.cfg, compressor.cfg
    logger.log(f"stage B | preset {args.model} | {rt.device} "
               f"{str(rt.dtype).replace('torch.', '')} | world {rt.world_size} | "
               f"{'fine-tune of --pretrained ' + args.pretrained if released else 'config'} "
               f"{asdict(cfg)} | compressor {asdict(ccfg)}{' (frozen)' * bool(released)} | "
               f"text {text_encoder.spec['name']} / {text_encoder.spec['pretrained']}")

    # data: images in [0, 1]; a fixed held-out set for previews and the reconstruction PSNR
    trainset, holdout = open_data(args, verbose=rt.master)  # a folder or tar shards
    held_images, held_captions = holdout_batch(holdout, rt.device)
    with torch.no_grad():
        held_latents = stage_a.encode(held_images)  # (N, 4, S/4, S/4)
        stage_a_psnr = psnr(stage_a.decode(held_latents).float(), held_images)  # B's ceiling
    plan_epochs(args, trainset, released is not None, defaults["lr"], logger)

    # compressor + Stage B, one module (fp32 weights, autocast); fine-tuning: Stage B or its LoRA
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
    raw_model, model = model, torch.compile(model) if args.compile else model
    model = wrap_ddp(model, rt)  # under DDP, the compressor's BatchNorms see the global batch
    guard = NonFiniteGuard(rt, ckpt_path, args.max_nonfinite, raw_model)

    def preview():
        path = os.path.join(args.out_dir, f"samples_{step:07d}.png")
        return preview_reconstructions(ema, stage_a, text_encoder, held_images, held_captions,
                                       held_latents.shape[-2:], stage_a_psnr, path, args, rt,
                                       logger)

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
                      f"the Stage B decoder {released['paths']['stage_b']} {asdict(cfg)}", lora)

    progress = Progress(args, rt, logger, step, "stage B")
    if rt.master and released and step == 0:  # the released decoder, before fine-tuning
        progress.metrics = preview()
    model.train()
    while step < args.max_steps:
        lr = get_lr(step, args.lr, args.warmup)
        set_lr(opt, lr)
        for micro in range(args.grad_accum):
            images, captions, *cached = next(batches)  # cached: [Stage A latents] with --cache
            images = images.to(rt.device, non_blocking=True)
            captions = drop_captions(captions, caption_dropout(len(captions), args.p_drop_text))
            with torch.no_grad(), rt.autocast():
                # (B, 4, S/4, S/4): unquantised Stage A latents / scale_factor
                latents = cached[0].to(rt.device) if cached else stage_a.encode(images).float()
                clip_text = text_encoder.encode(captions)  # (B, 77, width)
            with no_sync(model, micro == args.grad_accum - 1), rt.autocast():
                loss = model(images, latents, clip_text)  # P2-weighted eps MSE on the latents
            # gradients of a mean over micro-batches: divide each micro-batch loss by their count
            scaler.scale(loss / args.grad_accum).backward()
            progress.count(len(images))
        grad_norm = guard.step(step, loss, [(opt, scaler)], args.grad_clip)  # skipped if non-finite
        if guard.ok and ema is not raw_model:
            update_ema(ema, raw_model, ema_decay_at(step, args.ema_decay))
        step += 1
        progress.end_step(step, lambda: {"loss": loss.item(), "grad_norm": grad_norm.item()}, lr,
                          guard.skipped, batches, save, preview,
                          lambda: raw_model.own_statistics(ema, image_batches(trainset), rt))
    space = latent_space or measure_latent_space(ema.compressor, held_images)  # as saved
    progress.close(f"held-out reconstruction PSNR "
                   f"{progress.metrics.get('holdout_psnr', float('nan')):.2f} dB | latent space "
                   f"{space} | checkpoint {ckpt_path}")

# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    parser = ArgumentParser(description="Train Stage B of Würstchen (semantic compressor + "
                            "DiffNeXt decoder) on a folder of images, on top of a trained Stage A.",
                            formatter_class=HelpFormatter)
    add_common_args(parser, "stage_b")
    g = parser.add_argument_group("stage B")
    add_stage_b_args(g)
    g.add_argument("--steps_b", type=positive_int, default=12,
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
    group.add_argument("--p_drop_text", type=probability, default=0.05,
                       help="probability of an empty caption, per sample (CFG)")
    group.add_argument("--p_zero_effnet", type=probability, default=0.05,
                       help="probability of a zeroed semantic latent, per sample")
    group.add_argument("--p_noise_effnet", type=probability, default=0.3, help="probability of a "
                       "Stage-C-noised semantic latent (t ~ U(0, 0.5)), per sample")
    group.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                       help="encode the whole dataset with Stage A once, kept in out_dir/cache/ "
                       "for re-runs and --resume (small datasets; default: per preset, on for tiny "
                       "and when fine-tuning)")


if __name__ == "__main__":
    run_cli(train, get_args())
