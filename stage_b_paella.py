"""
Stage B of Würstchen v1: Paella, the discrete-token decoder (method.md §4.8, §1.4, §2.6).

    image (B, 3, S, S) --Stage A encoder + VQ--> tokens (B, S/4, S/4), indices into the codebook
    tokens, each replaced by a random one with probability t
        --Paella(tokens_t, t, e, CLIP text)--> logits (B, 8192, S/4, S/4) of the clean tokens
    sampling: random tokens --8 x [predict, draw, put random tokens back at the next t]--> tokens
        --Stage A codebook lookup + decoder--> image

The first version of the paper decoded with this token model; the released v2 replaced it by the
latent-diffusion DiffNeXt of stage_b.py. Both are conditioned on the semantic latent e of a jointly
trained semantic compressor and on CLIP text, but Paella takes e only through attention: its
16 x h x w cells become h*w tokens next to the text tokens. It reuses the shared blocks (blocks.py:
ResBlock, the prior's block, whose skip joins before the conv), stage_b.py's compressor and
conditioning dropout, the timestep sampling of diffusion.py, and writes the same checkpoint with
"kind": "paella": Stage C and sample.py take it wherever a Stage B goes (decoders.py).

Run it (after stage_a.py):
    python stage_b_paella.py --data toy --model tiny     # CPU, ~10 minutes on one core
    python stage_b_paella.py --data ./imgs               # one GPU, 'small' preset
    torchrun --standalone --nproc_per_node=8 stage_b_paella.py --data ./imgs --model paper
Released v1 weights: Paella.from_pretrained("model_stage_b.pt"), and its EfficientNetV2-L compressor
with SemanticCompressor.from_pretrained("model_stage_b.pt").
"""
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from blocks import (LATENT_DIM_SCALE, AttnBlock, Dropout, GlobalResponseNorm, LayerNorm2d, ResBlock,
                    TimestepBlock, dome272_init, image_side_multiple, per_level, r_embedding,
                    unet_levels)
from cache import cache_stage_a
from common import (ArgumentParser, HelpFormatter, NonFiniteGuard, Progress, UsageError,
                    add_common_args, channels_last_convs, ema_and_optimizer, ema_decay_at, get_lr,
                    load_exact, no_sync, nonnegative_float, positive_float, positive_int,
                    preset_name, psnr, run_cli, save_checkpoint, set_lr, start_run, update_ema,
                    wrap_ddp)
from data import check_data, holdout_batch, image_batches, open_data, resume_batches
from diffusion import caption_dropout, drop_captions, sample_t, timestep_grid
from pretrained import dome272_to_diffusers
from stage_a import load_stage_a
from stage_b import (CompressorAndStageB, CompressorConfig, add_stage_b_args, build_compressor,
                     check_kind, measure_latent_space, preview_reconstructions)
from text_encoder import build_text_encoder

# -----------------------------------------------------------------------------
# config


@dataclass
class PaellaConfig:
    """Paella's hyper-parameters, named as the official constructor's arguments (method §4.8). The
    defaults are v1's Stage B as trained, with CLIP ViT-H text (byt5_embd=1024): 730,814,336
    parameters."""
    c_in: int = 256  # token embedding width
    c_out: int = 256  # width the logits are read from (= c_in: the head starts as the token table)
    num_labels: int = 8192  # vocabulary: Stage A's codebook size
    c_r: int = 64  # sinusoidal timestep embedding size
    patch_size: int = 2  # PixelUnshuffle at the input, PixelShuffle at the output
    c_cond: int = 1024  # width of the attention condition: semantic tokens, then text tokens
    c_hidden: tuple = (640, 1280, 1280)  # width per level
    nhead: tuple = (-1, 16, 16)  # attention heads per level (-1: no attention there)
    blocks: tuple = (4, 12, 4)  # repetitions of level_config per level, same down and up
    level_config: tuple = ("CT", "CTA", "CTA")  # C ResBlock, T Timestep, A Attn, F FeedForward
    effnet_embd: int = 16  # semantic latent channels
    byt5_embd: int = 1024  # text width (CLIP ViT-H-14; "byt5" is Paella's name from its ByT5 days)
    kernel_size: int = 3  # depthwise conv kernel
    dropout: float = 0.1  # MLP and attention dropout: one value, or a tuple with one per level
    self_attn: bool = True  # attention keys/values = [image tokens ; condition tokens]


# v1's compressor returns (e + 1) / 42 itself (CompressorConfig.v1_scaling): Stage C's space, y = e
V1_LATENT_SPACE = {"scale": 1.0, "shift": 0.0}
# The v1 notebook's Paella settings (method §1.4, §7.6): 8 steps, w = 2, temperature 1 -> 0.6
V1_SAMPLING = dict(steps=8, cfg=2.0, temperature=(1.0, 0.6))
LABEL_SMOOTHING = 0.1  # of the cross-entropy (method §4.8)
KEPT_WEIGHT_AT_T0 = 0.3  # loss weight of a kept (not replaced) token at t = 0, rising to 1 at t = 1

# One table, in stage_b.PRESETS' format: per preset the Paella config, the semantic compressor,
# the text tower, Stage C's latent space (None: measured at the end of training, so that y has
# unit variance) and the training defaults that flags left unset take. num_labels and byt5_embd
# follow the Stage A and the text tower in use.
PRESETS = {
    # CPU runs and tests: 128 px toy images -> 32 x 32 tokens of the tiny Stage A (1024 codes),
    # 16 x 3 x 3 semantic latents. The tiny DiffNeXt's compressor, text tower and training defaults,
    # and as much training time as its 3,000 steps: a Paella step costs 2.65x (0.46 s on one core)
    "tiny": dict(
        model=PaellaConfig(c_in=32, c_out=32, num_labels=1024, c_cond=64, c_hidden=(32, 64, 128),
                           nhead=(-1, 2, 4), blocks=(1, 1, 2), byt5_embd=64, dropout=0.0),
        compressor=CompressorConfig(backbone="tiny"),
        text_encoder={"name": "tiny", "pretrained": None},
        latent_space=None,
        train=dict(image_size=128, batch_size=16, max_steps=1130, lr=5e-4, warmup=100, beta2=0.95,
                   cache=True)),
    # one-GPU reproduction at 256 px (CLIP ViT-B-32 text, 512 wide; EfficientNetV2-S as stage_b's)
    "small": dict(
        model=PaellaConfig(c_in=128, c_out=128, c_cond=384, c_hidden=(192, 384, 384),
                           nhead=(-1, 6, 6), blocks=(2, 4, 2), byt5_embd=512),
        compressor=CompressorConfig(),
        text_encoder={"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
        latent_space=None,
        train=dict(image_size=256, batch_size=64, max_steps=200_000, lr=1e-4, warmup=5_000,
                   beta2=0.95, cache=False)),
    # v1 as trained (dome272 train_stage_B.py, method §6.5): EfficientNetV2-L with (e + 1) / 42,
    # CLIP ViT-H text, 512 px (128 x 128 tokens, 12 x 12 semantic latents), AdamW 1e-4 with betas
    # (0.9, 0.95), 10k warm-up, global batch 384
    "paper": dict(
        model=PaellaConfig(),
        compressor=CompressorConfig(backbone="efficientnet_v2_l", v1_scaling=True),
        text_encoder={"name": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"},
        latent_space=V1_LATENT_SPACE,
        train=dict(image_size=512, batch_size=384, max_steps=1_500_000, lr=1e-4, warmup=10_000,
                   beta2=0.95, cache=False)),
}

# -----------------------------------------------------------------------------
# model


class FeedForwardBlock(nn.Module):
    """The "F" block of the official level configs (method §4.2; no released config uses it):
    LayerNorm2d -> channels-last MLP (Linear 4c, GELU, GRN, Dropout, Linear) -> residual."""

    def __init__(self, c, dropout=0.0):
        super().__init__()
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), GlobalResponseNorm(4 * c),
                                         Dropout(dropout), nn.Linear(4 * c, c))

    def forward(self, x):  # x: (B, C, H, W); the MLP runs on (B, H, W, C)
        return x + self.channelwise(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Paella(nn.Module):
    """Stage B of Würstchen v1 (method §4.8): Paella, a U-Net over Stage A's VQ tokens that
    predicts, at every position of a partly randomised token map, logits over the codebook for
    the clean token.

    token -> Embedding -> LayerNorm -> PixelUnshuffle, 1x1 conv, LayerNorm2d -> U-Net levels of
    ResBlock (skip joined before the conv) / TimestepBlock / AttnBlock -> LayerNorm2d, 1x1 conv,
    PixelShuffle -> LayerNorm2d, 1x1 conv to num_labels logits (its weight starts as a copy of the
    embedding table). The semantic latent and the text enter only through attention: the condition
    is [e's h*w cells ; text tokens], each mapped to c_cond, LayerNormed as one sequence. Key names
    are the official ones (attention split into to_q/k/v as diffusers does, method §8.2, §8.7).
    """
    kind = "paella"  # what its checkpoints say ("kind"), as opposed to v2's "diffnext"

    def __init__(self, cfg: PaellaConfig):
        super().__init__()
        if cfg.c_in != cfg.c_out:  # the logits head is initialised from the embedding table
            raise ValueError(f"Paella needs c_in == c_out, got {cfg.c_in} and {cfg.c_out}")
        self.cfg = cfg
        c_hidden = cfg.c_hidden
        dropout = per_level(cfg.dropout, len(c_hidden))
        # the condition: semantic latent cells and text tokens -> c_cond, one LayerNorm over all
        self.byt5_mapper = nn.Linear(cfg.byt5_embd, cfg.c_cond)
        self.effnet_mapper = nn.Linear(cfg.effnet_embd, cfg.c_cond)
        self.seq_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        # input: token -> vector (LayerNormed) -> PixelUnshuffle -> 1x1 conv -> LayerNorm2d
        self.in_mapper = nn.Sequential(nn.Embedding(cfg.num_labels, cfg.c_in),
                                       nn.LayerNorm(cfg.c_in, elementwise_affine=False, eps=1e-6))
        self.embedding = nn.Sequential(nn.PixelUnshuffle(cfg.patch_size),
                                       nn.Conv2d(cfg.c_in * cfg.patch_size**2, c_hidden[0], 1),
                                       LayerNorm2d(c_hidden[0]))

        def block(kind, i, c_skip):
            if kind == "C":
                return ResBlock(c_hidden[i], c_skip, cfg.kernel_size, dropout[i])
            if kind == "T":
                return TimestepBlock(c_hidden[i], cfg.c_r)
            if kind == "A":
                return AttnBlock(c_hidden[i], cfg.c_cond, cfg.nhead[i], cfg.self_attn, dropout[i])
            if kind == "F":
                return FeedForwardBlock(c_hidden[i], dropout[i])
            raise ValueError(f"unknown block type {kind!r} in level_config (C, T, A or F)")

        self.down_blocks, self.up_blocks = unet_levels(c_hidden, cfg.blocks, cfg.level_config,
                                                       block)
        # output: back to token resolution, then logits over the codebook
        self.clf = nn.Sequential(LayerNorm2d(c_hidden[0]),
                                 nn.Conv2d(c_hidden[0], cfg.c_out * cfg.patch_size**2, 1),
                                 nn.PixelShuffle(cfg.patch_size))
        self.out_mapper = nn.Sequential(LayerNorm2d(cfg.c_out),
                                        nn.Conv2d(cfg.c_out, cfg.num_labels, 1, bias=False))
        self.init_weights()

    def init_weights(self):
        """dome272's initialisation of Paella, in its order (method §4.8; §4.6 for the rest)."""
        dome272_init(self)  # xavier everywhere, attention q/k/v as one packed matrix, zero biases
        nn.init.normal_(self.byt5_mapper.weight, std=0.02)  # conditionings
        nn.init.normal_(self.effnet_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)  # input
        nn.init.zeros_(self.clf[1].weight)  # output: every logit 0 at init
        nn.init.normal_(self.in_mapper[0].weight, std=math.sqrt(1 / self.cfg.num_labels))  # tokens
        with torch.no_grad():  # the logits head starts as the token table (tied at init only)
            table = self.in_mapper[0].weight
            self.out_mapper[1].weight.copy_(table[:, :, None, None])  # (K, c) -> (K, c, 1, 1)
        for m in self.modules():
            if isinstance(m, (ResBlock, FeedForwardBlock)):
                m.channelwise[-1].weight.data *= math.sqrt(1 / sum(self.cfg.blocks))
            elif isinstance(m, TimestepBlock):
                nn.init.zeros_(m.mapper.weight)

    def _run_level(self, level, x, r_embed, cond, skip=None):
        """One U-Net level; the U-Net skip goes to the level's first module if it is a ResBlock."""
        for j, block in enumerate(level):
            if isinstance(block, ResBlock):
                x = block(x, skip if j == 0 else None)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            elif isinstance(block, AttnBlock):
                x = block(x, cond)
            else:  # FeedForwardBlock, down- or upsampler
                x = block(x)
        return x

    def forward(self, tokens, t, effnet, clip_text=None):
        """tokens: (B, H, W) int64, H and W multiples of patch_size * 2^(levels - 1); t: (B,)
        replacement rate in [0, 1]; effnet: semantic latent (B, effnet_embd, h, w), any size;
        clip_text: (B, L, byt5_embd), or None for the semantic tokens alone.
        Returns logits (B, num_labels, H, W) over Stage A's codebook."""
        r_embed = r_embedding(t, self.cfg.c_r)  # (B, c_r)
        cond = effnet.permute(0, 2, 3, 1).flatten(1, 2)  # (B, 16, h, w) -> (B, h*w, 16), row by row
        cond = self.effnet_mapper(cond)  # (B, h*w, c_cond)
        if clip_text is not None:
            cond = torch.cat([cond, self.byt5_mapper(clip_text)], dim=1)  # (B, h*w + L, c_cond)
        cond = self.seq_norm(cond)
        # (B, H, W) -> (B, H, W, c_in) -> (B, c_in, H, W), a channels-last view: the blocks'
        # permutes to (B, H, W, C) stay views
        x = self.in_mapper(tokens).permute(0, 3, 1, 2)
        h = self.embedding(x)  # (B, c_hidden[0], H/2, W/2)
        level_outputs = []
        for level in self.down_blocks:
            h = self._run_level(level, h, r_embed, cond)
            level_outputs.append(h)
        n = len(self.down_blocks)
        for j, level in enumerate(self.up_blocks):  # level n - 1 - j; no U-Net skip at j = 0
            skip = level_outputs[n - 1 - j] if j > 0 else None
            h = self._run_level(level, h, r_embed, cond, skip)
        # (B, c_hidden[0], H/2, W/2) -> (B, c_out, H, W) -> (B, num_labels, H, W)
        return self.out_mapper(self.clf(h))

    @torch.no_grad()
    def sample(self, stage_a, e, clip_text, negative_clip_text, steps=None, guidance_scale=None,
               temperature=None, generator=None, progress=False, side=None):
        """Paella's part of sampling (method §1.4, §4.8): semantic latents e (B, 16, h, w) and text
        -> images in [0, 1], by sample_images at the token side int(10.67 h) (or `side`) with v1's
        defaults (V1_SAMPLING: 8 steps, w = 2, temperature 1 -> 0.6), guided against zero e and
        `negative_clip_text` (as the v1 notebook); Stage A decodes the tokens through its
        codebook. `generator`: one, or a list of one per image, each image then sampled alone (the
        token sampler draws for the whole batch)."""
        if isinstance(generator, (list, tuple)):
            return torch.cat([self.sample(stage_a, e[i:i + 1], clip_text[i:i + 1],
                                          negative_clip_text[i:i + 1], steps, guidance_scale,
                                          temperature, g, progress, side)
                              for i, g in enumerate(generator)])
        side = side or (int(e.shape[-2] * LATENT_DIM_SCALE), int(e.shape[-1] * LATENT_DIM_SCALE))
        w = V1_SAMPLING["cfg"] if guidance_scale is None else guidance_scale
        return sample_images(self, stage_a, e, clip_text, negative_clip_text, side, generator,
                             progress, steps=steps or V1_SAMPLING["steps"], cfg=w,
                             temperature=temperature or V1_SAMPLING["temperature"])

    @classmethod
    def from_pretrained(cls, path, cfg=None):
        """The official v1 `model_stage_b.pt` (its `state_dict`, dome272 keys, packed attention
        split into q/k/v), at v1's configuration unless `cfg` says otherwise, checked key for key
        and shape for shape. Its `effnet_state_dict` (EfficientNetV2-L) loads with
        SemanticCompressor.from_pretrained."""
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        sd = dome272_to_diffusers(sd.get("state_dict", sd))
        with torch.device("meta"):  # no memory, no init: the weights are assigned below
            model = cls(cfg or PaellaConfig())
        load_exact(model, sd, what=f"Paella weights from {path}")
        return model.eval()


# -----------------------------------------------------------------------------
# corruption and loss


def corrupt(tokens, t, num_labels, replacement=None, generator=None):
    """Uniform token replacement (method §4.8, Paella's add_noise): every token is replaced with
    probability t (per sample, (B,)) by the token at the same place in `replacement` (default:
    uniformly random tokens, which may by chance equal the original).
    Returns (corrupted tokens, mask of the replaced positions), both (B, H, W)."""
    mask = torch.rand(tokens.shape, generator=generator, device=tokens.device) <= t.view(-1, 1, 1)
    if replacement is None:
        replacement = torch.randint(0, num_labels, tokens.shape, generator=generator,
                                    device=tokens.device)
    return torch.where(mask, replacement, tokens), mask


def token_loss(model, tokens, generator=None, **cond):
    """Paella's loss (method §4.8): t as the diffusion stages draw it (diffusion.sample_t), corrupt
    the tokens at rate t, and score the logits against the clean tokens with label-smoothed
    cross-entropy, weighted per position: 1 on replaced tokens, 1 - (1 - t)(1 - 0.3) on kept ones
    (copying them is easy, most of all at small t); a weighted mean per sample, then the batch
    mean. cond goes to the model by keyword (effnet=..., clip_text=...).
    Returns (loss, accuracy of the argmax prediction over all positions)."""
    t = sample_t(tokens.shape[0], tokens.device, generator)
    noised, mask = corrupt(tokens, t, model.cfg.num_labels, generator=generator)
    # (B, K, H, W) -> (B*H*W, K): a view of the channels-last logits, so the softmax runs over
    # contiguous classes (over dim 1 the CPU copied the logits twice: 4x slower at the tiny size)
    logits = model(noised, t, **cond).float().permute(0, 2, 3, 1).reshape(-1, model.cfg.num_labels)
    ce = F.cross_entropy(logits, tokens.flatten(), label_smoothing=LABEL_SMOOTHING,
                         reduction="none").view(tokens.shape)  # (B*H*W,) -> (B, H, W)
    kept_weight = 1 - (1 - t) * (1 - KEPT_WEIGHT_AT_T0)  # (B,)
    weight = torch.where(mask, 1.0, kept_weight.view(-1, 1, 1))  # (B, H, W)
    loss = ((ce * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))).mean()
    return loss, (logits.detach().argmax(dim=1) == tokens.flatten()).float().mean()


class CompressorAndPaella(CompressorAndStageB):
    """The semantic compressor and Paella trained jointly as one module (v1's `Wrapper`, method
    §3.4), with the DiffNeXt's per-sample conditioning dropout on e (CompressorAndStageB.perturb).
    forward returns token_loss's (loss, accuracy); the Paella is the `stage_b` attribute."""

    def forward(self, images, tokens, clip_text):
        effnet = self.perturb(self.compressor(images))  # (B, 16, h, w)
        return token_loss(self.stage_b, tokens, effnet=effnet, clip_text=clip_text)

# -----------------------------------------------------------------------------
# sampling


def linear_schedule(value, steps):
    """(start, end) -> `steps` values from start to end (torch.linspace, float32); a number:
    constant."""
    start, end = value if isinstance(value, (tuple, list)) else (value, value)
    return torch.linspace(start, end, steps)


def draw(probs, generator=None):
    """One class per row of probs (N, K), from the categorical distribution: the reference's
    torch.multinomial(probs, 1)[:, 0]. On the CPU torch.multinomial takes K exponential draws per
    row (half of Paella's sampling time at the tiny size), so there the same distribution comes
    from the inverse CDF: one uniform per row, looked up in the cumulative sums (the way
    blocks.keep_mask replaces F.dropout's mask on the CPU)."""
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    cdf = probs.cumsum(dim=-1)  # (N, K)
    u = torch.rand(len(probs), 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]  # in [0, sum)
    first_above = torch.searchsorted(cdf, u, right=True)[:, 0]  # (N,): the first class with cdf > u
    return first_above.clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def sample_tokens(model, shape, cond, uncond=None, steps=V1_SAMPLING["steps"],
                  cfg=V1_SAMPLING["cfg"], temperature=V1_SAMPLING["temperature"],
                  mode="multinomial", generator=None, progress=False):
    """The v1 sampler (method §4.8; dome272 `sample`): start from uniformly random tokens
    (`init_noise`), then at each t of linspace(1, 0, steps + 1) but the last: logits from the model,
    guided as logits_c w + logits_u (1 - w) against `uncond` (skipped without uncond or when w is
    1 throughout), every position drawn from softmax(logits / temperature) ('multinomial') or the
    argmax ('argmax'), and, except after the last step, the draw re-noised to the next t by putting
    the *same* initial random tokens back at rate t_next. w (cfg) and the temperature move linearly
    over the steps from their first to their second value (a number: constant).
    shape: (B, H, W); cond / uncond: keyword dicts for the model ({'effnet': .., 'clip_text': ..}).
    Returns tokens (B, H, W)."""
    if mode not in ("multinomial", "argmax"):
        raise ValueError(f"unknown sampling mode {mode!r} (multinomial | argmax)")
    device, K = cond["effnet"].device, model.cfg.num_labels
    init_noise = torch.randint(0, K, shape, generator=generator, device=device)
    tokens = init_noise.clone()
    ts = timestep_grid(steps)  # 1 -> 0
    ws, temps = linear_schedule(cfg, steps), linear_schedule(temperature, steps)
    guided = uncond is not None and not bool((ws == 1).all())
    if guided:
        cond = {k: torch.cat([cond[k], uncond[k]]) for k in cond}  # (2B, ...): conditional first
    for i in tqdm(range(steps), disable=not progress, desc="paella", leave=False):
        t = torch.full((shape[0],), ts[i], device=device)  # (B,)
        if guided:
            both = model(torch.cat([tokens, tokens]), torch.cat([t, t]), **cond).float()
            logits_c, logits_u = both.chunk(2)  # (2B, K, H, W) -> 2 x (B, K, H, W)
            logits = logits_c * ws[i] + logits_u * (1 - ws[i])
        else:
            logits = model(tokens, t, **cond).float()
        if mode == "argmax":
            tokens = logits.argmax(dim=1)
        else:
            logits = logits.permute(0, 2, 3, 1).reshape(-1, K)  # (B*H*W, K): as in token_loss
            tokens = draw((logits / temps[i]).softmax(dim=-1), generator).view(shape)
        if i < steps - 1:
            t_next = torch.full((shape[0],), ts[i + 1], device=device)
            tokens = corrupt(tokens, t_next, K, replacement=init_noise, generator=generator)[0]
    return tokens


@torch.no_grad()
def sample_images(model, stage_a, effnet, clip_text, uncond_clip_text, token_hw, generator=None,
                  progress=False, **sampling):
    """Semantic latents e (B, 16, h, w) + text -> images (B, 3, 4 H, 4 W) in [0, 1]: sample_tokens
    (sampling: its steps, cfg, temperature, mode) guided against zero e and `uncond_clip_text`
    (the empty or negative prompt), then Stage A's codebook and decoder (method §2.6)."""
    cond = {"effnet": effnet, "clip_text": clip_text}
    uncond = {"effnet": torch.zeros_like(effnet), "clip_text": uncond_clip_text}
    tokens = sample_tokens(model, (len(effnet), *token_hw), cond, uncond, generator=generator,
                           progress=progress, **sampling)
    return stage_a.decode_indices(tokens).float().clamp(0, 1)

# -----------------------------------------------------------------------------
# training


def train(args):
    preset = PRESETS[preset_name(args)]
    data_defaults = check_data(args, image_side_multiple(preset["model"]), "Paella's U-Net")
    rt, logger, ckpt_path, ckpt = start_run(args, "stage_b", preset["train"] | data_defaults)
    if ckpt:
        check_kind(ckpt, ckpt_path, ("paella",))
    text_encoder = build_text_encoder(args, preset["text_encoder"], ckpt, rt.device)  # frozen
    # frozen Stage A (EMA weights) from its checkpoint alone: images -> tokens, tokens -> images
    stage_a = load_stage_a(args.stage_a, rt.device)
    # the vocabulary is Stage A's codebook, the text width the tower's
    cfg = PaellaConfig(**ckpt["model_config"]) if ckpt else replace(
        preset["model"], num_labels=stage_a.cfg.codebook_size, byt5_embd=text_encoder.width)
    ccfg = CompressorConfig(**ckpt["compressor_config"]) if ckpt else preset["compressor"]
    if cfg.num_labels != stage_a.cfg.codebook_size:
        raise UsageError(f"Stage A {args.stage_a} has {stage_a.cfg.codebook_size} codes, this "
                         f"Paella {cfg.num_labels}")
    logger.log(f"stage B (Paella) | preset {args.model} | {rt.device} "
               f"{str(rt.dtype).replace('torch.', '')} | world {rt.world_size} | "
               f"config {asdict(cfg)} | compressor {asdict(ccfg)} | "
               f"text {text_encoder.spec['name']} / {text_encoder.spec['pretrained']}")

    # data: images in [0, 1]; a fixed held-out set for previews and the reconstruction PSNR
    trainset, holdout = open_data(args, verbose=rt.master)  # a folder or tar shards
    held_images, held_captions = holdout_batch(holdout, rt.device)
    with torch.no_grad():
        held_tokens = stage_a.encode_indices(held_images)  # (N, S/4, S/4)
        # Paella's ceiling: Stage A decoding the held-out images' own tokens
        stage_a_psnr = psnr(stage_a.decode_indices(held_tokens).float(), held_images)

    # models, EMA and optimizer: compressor + Paella together (fp32 weights; autocast does the rest)
    compressor = build_compressor(ccfg, args.no_imagenet or ckpt is not None, rt, logger)
    model = CompressorAndPaella(compressor, Paella(cfg), args.p_zero_effnet, args.p_noise_effnet,
                                preset["latent_space"]).to(rt.device)
    channels_last_convs(model.stage_b)  # as its activations: no gradient copies under DDP
    ema, _, opt = ema_and_optimizer(model, args)
    scaler = rt.make_scaler()
    logger.log(f"parameters: Paella {sum(p.numel() for p in model.stage_b.parameters()):,} | "
               f"semantic compressor {sum(p.numel() for p in compressor.parameters()):,} | "
               f"text encoder (frozen) {sum(p.numel() for p in text_encoder.parameters()):,}")
    if args.cache:
        trainset = cache_stage_a(trainset, stage_a.encode_indices, stage_a, args, rt, logger)
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
                                       held_tokens.shape[-2:], stage_a_psnr, path, args, rt,
                                       logger, guidance_scale=args.guidance_b,
                                       temperature=tuple(args.temperature_b))

    def save(metrics, run_state):
        space = preset["latent_space"] or measure_latent_space(ema.compressor, held_images)
        save_checkpoint(ckpt_path, {
            "stage": "stage_b", "kind": "paella", "step": step, "model_config": asdict(cfg),
            "compressor_config": asdict(ccfg)} | raw_model.checkpoint_entries(ema) | {
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "train_config": vars(args), "latent_space": space,
            "text_encoder": text_encoder.checkpoint_entry(), **run_state, "metrics": metrics,
            "deps": {"stage_a": os.path.abspath(args.stage_a), "data": os.path.abspath(args.data)}})

    progress = Progress(args, rt, logger, step, "stage B (Paella)")
    model.train()
    while step < args.max_steps:
        lr = get_lr(step, args.lr, args.warmup)
        set_lr(opt, lr)
        for micro in range(args.grad_accum):
            images, captions, *cached = next(batches)  # cached: [Stage A tokens] with --cache
            images = images.to(rt.device, non_blocking=True)
            captions = drop_captions(captions, caption_dropout(len(captions), args.p_drop_text))
            with torch.no_grad(), rt.autocast():
                # (B, S/4, S/4) token indices
                tokens = cached[0].to(rt.device) if cached else stage_a.encode_indices(images)
                clip_text = text_encoder.encode(captions)  # (B, 77, width)
            with no_sync(model, micro == args.grad_accum - 1), rt.autocast():
                loss, acc = model(images, tokens, clip_text)
            # gradients of a mean over micro-batches: divide each micro-batch loss by their count
            scaler.scale(loss / args.grad_accum).backward()
            progress.count(len(images))
        grad_norm = guard.step(step, loss, [(opt, scaler)], args.grad_clip)  # skipped if non-finite
        if guard.ok and ema is not raw_model:
            update_ema(ema, raw_model, ema_decay_at(step, args.ema_decay))
        step += 1
        progress.end_step(step, lambda: {"loss": loss.item(), "acc": acc.item(),
                                         "grad_norm": grad_norm.item()}, lr, guard.skipped,
                          batches, save, preview,
                          lambda: raw_model.own_statistics(ema, image_batches(trainset), rt))
    space = preset["latent_space"] or measure_latent_space(ema.compressor, held_images)  # as saved
    progress.close(f"held-out reconstruction PSNR "
                   f"{progress.metrics.get('holdout_psnr', float('nan')):.2f} dB | "
                   f"latent space {space} | checkpoint {ckpt_path}")

# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    parser = ArgumentParser(description="Train the v1 Stage B of Würstchen (semantic compressor "
                            "+ Paella, a token decoder) on a folder of images, on top of a trained "
                            "Stage A.", formatter_class=HelpFormatter)
    add_common_args(parser, "stage_b_paella", PRESETS)
    g = parser.add_argument_group("stage B (Paella)")
    add_stage_b_args(g)
    g.add_argument("--steps_b", type=positive_int, default=V1_SAMPLING["steps"],
                   help="Paella steps of the preview reconstructions")
    g.add_argument("--guidance_b", type=nonnegative_float, default=V1_SAMPLING["cfg"],
                   help="classifier-free guidance w of the previews: logits_c w + logits_u "
                   "(1 - w), against zero e and the empty caption")
    g.add_argument("--temperature_b", type=positive_float, nargs=2,
                   default=V1_SAMPLING["temperature"], metavar=("FIRST", "LAST"),
                   help="sampling temperature of the previews, linear from FIRST to LAST over the "
                   "steps")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(train, get_args())
