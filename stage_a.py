"""
Stage A of Würstchen: an f4 VQGAN (method.md §2).

    image (B, 3, H, W) in [0, 1]  --encode-->  latent (B, 4, H/4, W/4)  --decode-->  image

The encoder ends in a BatchNorm, so its latents are roughly unit-scale; a vector quantiser with a codebook of
8192 entries (commitment 0.25) is used while training, and Würstchen v2 decodes the *unquantised* latent
("Stage A as a VAE"). `StageA.encode` returns the latent divided by `scale_factor` (what Stage B learns) and
`StageA.decode` multiplies it back, so downstream code never sees the raw scale.

This file also holds the training utilities every stage imports (runtime/DDP/precision setup, the LR function,
EMA, atomic checkpoints, the data iterator, image grids, the log line): written once, here, because Stage A is
the first file a reader opens (style.md rule 4).

Run it:
    python data.py toy toy                               # a captioned toy dataset, no download
    python stage_a.py --data toy --model tiny            # CPU, a few minutes
    python stage_a.py --data ./imgs                      # one GPU, default 'small' preset
    torchrun --standalone --nproc_per_node=8 stage_a.py --data ./imgs --model paper
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class StageAConfig:
    c_in: int = 3  # image channels
    c_hidden: int = 384  # width of the deepest level; each level above has half the width
    levels: int = 2  # 2 levels = f4: PixelUnshuffle(2) then one stride-2 conv
    bottleneck_blocks: int = 12  # mixing blocks at the start of the decoder
    c_latent: int = 4  # latent channels
    codebook_size: int = 8192  # VQ codebook entries
    scale_factor: float = 0.3764  # latent std: encode() divides by it, decode() multiplies (measured when training)
    disc_c_hidden: int = 512  # patch discriminator width (training only)
    disc_depth: int = 6  # patch discriminator depth (training only)


PRESETS = {
    # CPU quick start and tests: 128 px toy images -> 4 x 32 x 32 latents in a few CPU minutes
    "tiny": StageAConfig(c_hidden=64, bottleneck_blocks=2, codebook_size=1024, disc_c_hidden=64, disc_depth=3),
    # one-GPU reproduction at 256 px
    "small": StageAConfig(c_hidden=192, bottleneck_blocks=6, disc_c_hidden=256, disc_depth=4),
    # the released architecture (warp-ai/wuerstchen `vqgan`): 18,406,894 parameters
    "paper": StageAConfig(),
}

# training defaults that depend on the preset (flags left unset take these)
TRAIN_DEFAULTS = {
    "tiny": dict(image_size=128, batch_size=8, max_steps=500, lr=2e-3, warmup=50, disc_start=300),
    "small": dict(image_size=256, batch_size=32, max_steps=100_000, lr=2e-4, warmup=1000, disc_start=20_000),
    "paper": dict(image_size=256, batch_size=64, max_steps=500_000, lr=1e-4, warmup=10_000, disc_start=100_000),
}

# -----------------------------------------------------------------------------
# model


def replicate_pad_by_concat(x):
    """ReplicationPad2d(1) of (B, C, H, W) as two concatenations: (B, C, H + 2, W + 2)."""
    x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
    return torch.cat([x[:, :, :, :1], x, x[:, :, :, -1:]], dim=3)


class MixBlock(nn.Module):
    """ConvNeXt-style mixing residual block of Paella's VQGAN with six learned modulation scalars (§2.2).

    gammas (init 0): h = LN(x) * (1 + g0) + g1; x += DWConv(h) * g2; h = LN(x) * (1 + g3) + g4; x += MLP(h) * g5,
    so every block starts as the identity.
    """

    def __init__(self, c, c_mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_mlp), nn.GELU(), nn.Linear(c_mlp, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x):  # x: (B, C, H, W), fastest in channels_last memory (StageA converts its inputs)
        # Speed, same maths as the docstring: (1 + g0, g1) and (1 + g3, g4) enter the LayerNorms as their affine
        # weight and bias, and g2 / g5 scale the weights of the conv / last Linear instead of their outputs, so
        # the modulations cost no extra pass over the activations; in channels_last memory the permutes are views.
        g, C = self.gammas, x.shape[1]
        h = F.layer_norm(x.permute(0, 2, 3, 1), (C,), (1 + g[0]).expand(C), g[1].expand(C), self.norm1.eps)
        pad, conv = self.depthwise
        h = h.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W), a view
        # torch.compile's replication_pad2d_backward rejects channels-last inputs (torch 2.14): there, pad by
        # concatenating the edge rows and columns instead (the same values; 3x slower in eager mode, so not here)
        h = replicate_pad_by_concat(h) if torch.compiler.is_compiling() else pad(h)
        h = F.conv2d(h, conv.weight * g[2], conv.bias * g[2], groups=C)  # (B, C, H, W)
        x = x + h
        h = F.layer_norm(x.permute(0, 2, 3, 1), (C,), (1 + g[3]).expand(C), g[4].expand(C), self.norm2.eps)
        fc1, act, fc2 = self.channelwise  # the MLP runs on (B, H, W, C)
        h = F.linear(act(fc1(h)), fc2.weight * g[5], fc2.bias * g[5])
        return x + h.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with a straight-through gradient (§2.3).

    Loss = mean((q - sg(z))^2) [codebook] + 0.25 * mean((z - sg(q))^2) [commitment].
    """

    def __init__(self, codebook_size, c_latent, beta=0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, c_latent)
        self.embedding.weight.data.uniform_(-1 / codebook_size, 1 / codebook_size)

    @torch.no_grad()
    def indices(self, z_flat):
        """Index of the nearest codebook vector for each row of z_flat (N, C), in chunks to bound memory."""
        codebook = self.embedding.weight.float()
        return torch.cat([torch.cdist(chunk.float(), codebook).argmin(dim=1) for chunk in z_flat.split(8192)])

    def forward(self, z):  # z: (B, C, H, W)
        B, C, H, W = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*H*W, C)
        idx = self.indices(z_flat)
        q = self.embedding(idx).view(B, H, W, C).permute(0, 3, 1, 2).to(z.dtype)  # back to (B, C, H, W)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through estimator
        return q, loss, idx.view(B, H, W)


class StageA(nn.Module):
    """Stage A: the f4 VQGAN of Würstchen (§2.1); key names follow the released weights, so loading is a copy."""

    def __init__(self, cfg: StageAConfig):
        super().__init__()
        self.cfg = cfg
        c_levels = [cfg.c_hidden // 2**i for i in reversed(range(cfg.levels))]  # e.g. [192, 384]
        # encoder: PixelUnshuffle(2) -> 1x1 conv -> (MixBlock, stride-2 conv)* -> 1x1 conv to c_latent -> BatchNorm
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(cfg.c_in * 4, c_levels[0], kernel_size=1))
        down = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(MixBlock(c_levels[i], c_levels[i] * 4))
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], cfg.c_latent, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(cfg.c_latent)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.codebook_size, cfg.c_latent)
        # decoder: 1x1 conv -> bottleneck MixBlocks -> (ConvTranspose x2, MixBlock)* -> 1x1 conv -> PixelShuffle(2)
        up = [nn.Sequential(nn.Conv2d(cfg.c_latent, c_levels[-1], kernel_size=1))]
        for i in range(cfg.levels):
            c = c_levels[cfg.levels - 1 - i]
            up += [MixBlock(c, c * 4) for _ in range(cfg.bottleneck_blocks if i == 0 else 1)]
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[cfg.levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], cfg.c_in * 4, kernel_size=1), nn.PixelShuffle(2))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def encode_raw(self, x):
        """(B, 3, H, W) in [0, 1] -> the BatchNorm output (B, 4, H/4, W/4), before quantisation and scaling."""
        x = x.contiguous(memory_format=torch.channels_last)  # speed: MixBlock's permutes become free views
        return self.down_blocks(self.in_block(x))

    def decode_raw(self, h):
        """(B, 4, H/4, W/4) raw latent -> (B, 3, H, W); no output activation (callers clamp to [0, 1])."""
        h = h.contiguous(memory_format=torch.channels_last)  # speed: MixBlock's permutes become free views
        return self.out_block(self.up_blocks(h))

    def encode(self, x, quantize=False):
        """Images in [0, 1] -> the latent Stage B learns: encoder output (optionally quantised) / scale_factor."""
        h = self.encode_raw(x)
        if quantize:
            h = self.vquantizer(h)[0]
        return h / self.cfg.scale_factor

    def decode(self, latents, quantize=False):
        """Inverse of encode: decode(latents * scale_factor), quantised first if asked (v2 decodes unquantised)."""
        h = latents * self.cfg.scale_factor
        if quantize:
            h = self.vquantizer(h)[0]
        return self.decode_raw(h)

    def forward(self, x):
        """Training path of the VQGAN: returns (reconstruction, vq loss, code indices (B, H/4, W/4))."""
        q, vq_loss, idx = self.vquantizer(self.encode_raw(x))
        return self.decode_raw(q), vq_loss, idx

    @classmethod
    def from_pretrained(cls, path):
        """Load released weights: a diffusers `PaellaVQModel` folder (warp-ai/wuerstchen, subfolder `vqgan`)
        or the official `vqgan_f4_v1_500k.pt` (dome272 key names; the codebook is `vquantizer.codebook`)."""
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json")) as f:
                hf = json.load(f)
            assert hf.get("up_down_scale_factor", 2) == 2 and hf.get("in_channels", 3) == hf.get("out_channels", 3)
            cfg = StageAConfig(c_in=hf.get("in_channels", 3), c_hidden=hf.get("embed_dim", 384),
                               levels=hf.get("levels", 2), bottleneck_blocks=hf.get("bottleneck_blocks", 12),
                               c_latent=hf.get("latent_channels", 4), codebook_size=hf.get("num_vq_embeddings", 8192),
                               scale_factor=hf.get("scale_factor", 0.3764))
            sd = load_weights_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
            sd = {k.replace("vquantizer.codebook.", "vquantizer.embedding."): v for k, v in sd.items()}
            n_codes, c_latent = sd["vquantizer.embedding.weight"].shape
            c_hidden = sd["in_block.1.weight"].shape[0] * 2  # two levels in every released VQGAN
            n_up = len({k.split(".")[1] for k in sd if k.startswith("up_blocks.")})
            cfg = StageAConfig(c_hidden=c_hidden, bottleneck_blocks=n_up - 3, c_latent=c_latent, codebook_size=n_codes)
        with torch.device("meta"):
            model = cls(cfg)
        load_exact(model, sd, what=f"Stage A weights from {path}")
        return model.eval()


def load_stage_a(path, device="cpu"):
    """Stage A rebuilt from our checkpoint alone (its config + EMA weights), frozen, in eval mode."""
    ckpt = load_checkpoint(path, "stage_a")
    model = StageA(StageAConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval().requires_grad_(False)


class Discriminator(nn.Module):
    """Patch discriminator of the reference `vqgan.py` (§2.5): spectral-norm stride-2 convs, InstanceNorm,
    LeakyReLU(0.2), a 1x1 conv to one logit per patch. The reference ends in a Sigmoid; we return logits and
    fold the sigmoid into the BCE loss, which is the same maths and safe under autocast."""

    def __init__(self, c_in=3, c_hidden=512, depth=6):
        super().__init__()
        sn = nn.utils.spectral_norm
        c = c_hidden // 2 ** (depth - 1)
        layers = [sn(nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        for _ in range(depth - 1):
            layers += [sn(nn.Conv2d(c, min(c * 2, c_hidden), kernel_size=3, stride=2, padding=1)),
                       nn.InstanceNorm2d(min(c * 2, c_hidden)), nn.LeakyReLU(0.2)]
            c = min(c * 2, c_hidden)
        layers.append(nn.Conv2d(c, 1, kernel_size=1))
        self.main = nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, H, W) -> (B, 1, H / 2^depth, W / 2^depth) logits
        return self.main(x)


class PerceptualLoss(nn.Module):
    """MSE between VGG16 features of two images (a plain perceptual loss). Only built when the ImageNet VGG16
    weights are already on disk: training never downloads (see README to enable it)."""

    def __init__(self, weights_path):
        super().__init__()
        import torchvision
        vgg = torchvision.models.vgg16()
        vgg.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.features = vgg.features[:23].eval().requires_grad_(False)  # up to relu4_3
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x, y):
        return F.mse_loss(self.features((x - self.mean) / self.std), self.features((y - self.mean) / self.std))


def vgg16_weights_path():
    """Where torchvision caches the VGG16 ImageNet weights; None when they are not there."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth")
    return path if os.path.exists(path) else None

# -----------------------------------------------------------------------------
# training utilities (imported by stage_b.py, stage_c.py and sample.py)


@dataclass
class Runtime:
    """Where and how we run: device, DDP rank/world, autocast dtype."""
    device: torch.device
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    dtype: torch.dtype = torch.float32
    device_type: str = field(init=False)

    def __post_init__(self):
        self.device_type = self.device.type

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """bf16/fp16 autocast on accelerators; plain fp32 (no autocast) otherwise. Weights always stay fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self):
        # a real GradScaler only for fp16 (gradients underflow without it); a no-op for bf16 and fp32
        return torch.amp.GradScaler(self.device_type, enabled=(self.dtype == torch.float16))


def setup_runtime(device="auto", dtype="auto", seed=0):
    """Pick the device and precision, and start DDP when launched by torchrun (RANK in the environment)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    device = torch.device(device)
    if dtype == "auto":  # bf16 where the GPU supports it, else fp16 + GradScaler; fp32 on CPU/MPS
        dtype = "float32" if device.type != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cuda":  # TF32 matmuls: ~free speed on Ampere+, precision is ample for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed + rank)
    return Runtime(device=device, ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size,
                   dtype=getattr(torch, dtype))


def print0(*args, **kwargs):
    """print on the master process only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


class Logger:
    """Rank-0 log: stdout plus out_dir/log.txt."""

    def __init__(self, out_dir, master=True):
        self.path = os.path.join(out_dir, "log.txt") if master else None

    def log(self, msg):
        if self.path:
            from tqdm import tqdm
            tqdm.write(msg)  # prints above an active progress bar instead of through it
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def log_line(step, max_steps, metrics, lr, img_per_s):
    """The one log format of all stages: `step   120/2000 | loss 0.1234 | ... | lr 1.00e-04 | 12.3 img/s`."""
    parts = [f"step {step:>6}/{max_steps}"] + [f"{k} {v:.4f}" for k, v in metrics.items()]
    return " | ".join(parts + [f"lr {lr:.2e}", f"{img_per_s:.1f} img/s"])


def add_common_args(parser, stage):
    """The flags every training script shares, with the same names and meanings."""
    g = parser.add_argument_group("common")
    g.add_argument("--data", required=True, help="folder of images (searched recursively), optional same-stem .txt captions")
    g.add_argument("--out_dir", default=f"out/{stage}", help="where ckpt.pt, log.txt and sample grids go")
    g.add_argument("--model", default="small", choices=["tiny", "small", "paper"], help="model size preset")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: per preset)")
    g.add_argument("--batch_size", type=int, default=None, help="global batch size, split over ranks and --grad_accum (default: per preset)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--image_size", type=int, default=None, help="training resolution (default: per preset)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per preset)")
    g.add_argument("--warmup", type=int, default=None, help="linear LR warm-up steps (default: per preset)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay per optimizer step")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bf16 on GPUs that support it, else fp16 (+GradScaler); fp32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--log_every", type=int, default=25, help="steps between log lines")
    g.add_argument("--sample_every", type=int, default=500, help="steps between preview grids")
    g.add_argument("--save_every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--num_workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--num_holdout", type=int, default=16, help="images held out of training for previews and metrics")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPU, slow first step)")
    return parser


def fill_defaults(args, defaults):
    """Flags left at None take the preset's training defaults."""
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def start_run(args, stage, train_defaults):
    """The opening every stage's train() shares: the preset's training defaults, the runtime, the output folder and
    its log, and with --resume the checkpoint to continue (of this stage and preset, else a clear error).
    Returns (rt, logger, ckpt_path, ckpt or None)."""
    fill_defaults(args, train_defaults[args.model])
    rt = setup_runtime(args.device, args.dtype, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    logger = Logger(args.out_dir, rt.master)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, stage) if args.resume else None
    if ckpt and ckpt["train_config"]["model"] != args.model:
        raise ValueError(f"{ckpt_path} was trained with --model {ckpt['train_config']['model']}, not {args.model}")
    return rt, logger, ckpt_path, ckpt


def get_lr(step, lr, warmup):
    """Linear warm-up to `lr`, then constant (method §6.5). A pure function of the step, so resume needs nothing else."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def ema_decay_at(step, decay):
    """EMA warm-up: an average over about `step` steps early on, `decay` later, so short runs get a useful EMA
    (k-diffusion's EMAWarmup idea; the reference instead copied the weights for its first 5,000 updates)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BatchNorm statistics) are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale, clip, step, update the scaler, zero the grads. Returns the gradient norm before clipping."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def unwrap(model):
    """The raw module under DDP and torch.compile wrappers (what we save)."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, ckpt):
    """Write atomically: a kill at any moment leaves either the old or the new file, never a partial one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


HOW_TO_MAKE = {"stage_a": "python stage_a.py --data DIR", "stage_b": "python stage_b.py --data DIR",
               "stage_c": "python stage_c.py --data DIR"}


def load_checkpoint(path, stage):
    """Load a checkpoint of `stage` ('stage_a' | 'stage_b' | 'stage_c') with weights_only=True, with clear errors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {stage} checkpoint at {path}: train one with `{HOW_TO_MAKE[stage]}` "
                                f"(it writes out/{stage}/ckpt.pt) or pass its path")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    found = ckpt.get("stage", "unknown (not a checkpoint of this project)") if isinstance(ckpt, dict) else "unknown"
    if found != stage:
        raise ValueError(f"{path} is a {found} checkpoint, but a {stage} checkpoint was expected here")
    return ckpt


def load_weights_file(folder):
    """The state dict of a diffusers `save_pretrained` folder (safetensors, which open_clip already installs, or .bin)."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            from safetensors.torch import load_file
            return load_file(os.path.join(folder, name))
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights file (diffusion_pytorch_model.safetensors or .bin) in {folder}")


def load_exact(model, sd, what):
    """Load a state dict that must match the model key for key and shape for shape (assign: works from 'meta')."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{what} do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shapes {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in bad[:5]]}")
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in sd.items()},
                          assign=True)


class StepSampler(torch.utils.data.Sampler):
    """Endless index stream that is a pure function of (seed, position): epoch e is randperm(n, seed + e), and
    each rank takes its slice of every global batch. Starting at `start` (= step * global batch) makes `--resume`
    see exactly the batches an uninterrupted run would have seen."""

    def __init__(self, n, global_batch, seed=0, start=0, rank=0, world_size=1):
        self.n, self.gb, self.seed, self.start, self.rank, self.ws = n, global_batch, seed, start, rank, world_size

    def __iter__(self):
        pos, local = self.start, self.gb // self.ws
        while True:
            epoch, offset = divmod(pos, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            batch = [perm[(offset + i) % self.n] for i in range(self.gb)]  # wraps into the epoch's start if short
            yield from batch[self.rank * local:(self.rank + 1) * local]
            pos += self.gb


def infinite_batches(dataset, batch_size, rt, num_workers=2, seed=0, start_step=0, grad_accum=1):
    """Yields micro-batches forever. `batch_size` is global: each rank gets batch_size / (world * grad_accum)."""
    micro = batch_size // (rt.world_size * grad_accum)
    assert micro * rt.world_size * grad_accum == batch_size, \
        f"--batch_size {batch_size} must divide by world size {rt.world_size} x --grad_accum {grad_accum}"
    sampler = StepSampler(len(dataset), micro * rt.world_size, seed, start_step * batch_size, rt.rank, rt.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=num_workers,
                                         pin_memory=rt.device_type == "cuda", persistent_workers=num_workers > 0)
    return iter(loader)


def split_holdout(dataset, n):
    """Deterministic split: every k-th image (k = len / n) is held out for previews and metrics."""
    n = max(1, min(n, len(dataset) // 10))
    k = len(dataset) // n
    held = list(range(0, n * k, k))
    rest = sorted(set(range(len(dataset))) - set(held))
    return torch.utils.data.Subset(dataset, rest), torch.utils.data.Subset(dataset, held)


def holdout_batch(holdout, device):
    """All held-out images (and captions) as one batch."""
    images, captions = zip(*[holdout[i] for i in range(len(holdout))])
    return torch.stack(images).to(device), list(captions)


def psnr(x, y):
    """Mean PSNR (dB) of images in [0, 1]."""
    mse = ((x.clamp(0, 1) - y.clamp(0, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def save_image_grid(images, path, nrow):
    """Save (N, 3, H, W) images in [0, 1] as one PNG grid."""
    import torchvision
    torchvision.utils.save_image(images.float().clamp(0, 1), path, nrow=nrow, padding=2, pad_value=1.0)


def rng_state():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])

# -----------------------------------------------------------------------------
# training


def generator_adv_loss(disc, fake):
    """Non-saturating generator loss -log sigmoid(D(fake)), as BCE on logits."""
    return F.softplus(-disc(fake)).mean()


def discriminator_loss(disc, real, fake):
    """-log sigmoid(D(real)) - log(1 - sigmoid(D(fake))), one forward over both halves (fake is detached)."""
    logits_real, logits_fake = disc(torch.cat([real, fake.detach()])).chunk(2)
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def no_sync(module, sync):
    """DDP: skip the gradient all-reduce on micro-steps that are not the last one of an optimizer step."""
    return module.no_sync() if (not sync and hasattr(module, "no_sync")) else nullcontext()


@torch.no_grad()
def restart_dead_codes(vq, z, counts, rt):
    """Codebook entries unused since the last restart are moved onto random current encoder outputs (a standard
    VQGAN remedy against codebook collapse; not in the reference code). Rank 0 decides, everyone receives."""
    dead = counts == 0
    if dead.any():
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (B*h*w, C)
        pick = z_flat[torch.randint(0, len(z_flat), (int(dead.sum()),), device=z.device)]
        vq.embedding.weight.data[dead] = pick + 0.01 * torch.randn_like(pick)
    if rt.ddp:
        dist.broadcast(vq.embedding.weight.data, 0)
    return int(dead.sum())


@torch.no_grad()
def measure_scale_factor(model, images):
    """Std of the raw (unquantised) latents of `images`: the scale that makes StageA.encode roughly unit-variance."""
    return round(model.encode_raw(images).float().std().item(), 4)


def train(args):
    rt, logger, ckpt_path, ckpt = start_run(args, "stage_a", TRAIN_DEFAULTS)
    cfg = StageAConfig(**ckpt["model_config"]) if ckpt else PRESETS[args.model]
    logger.log(f"stage A | preset {args.model} | {rt.device} {str(rt.dtype).replace('torch.', '')} | "
               f"world {rt.world_size} | config {asdict(cfg)}")

    # data: images in [0, 1]; a fixed held-out set for previews and the final PSNR
    from data import ImageFolder
    dataset = ImageFolder(args.data, args.image_size, verbose=rt.master)
    trainset, holdout = split_holdout(dataset, args.num_holdout)
    held_images, _ = holdout_batch(holdout, rt.device)

    # models, EMA and optimizers (weights stay fp32; autocast does the low-precision compute)
    # channels-last: the LayerNorms and MLPs run over the channel axis, so this layout avoids permute copies
    model = StageA(cfg).to(rt.device, memory_format=torch.channels_last)
    disc = Discriminator(cfg.c_in, cfg.disc_c_hidden, cfg.disc_depth).to(rt.device)
    ema = deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=args.weight_decay)
    scaler, scaler_d = rt.make_scaler(), rt.make_scaler()
    logger.log(f"parameters: Stage A {sum(p.numel() for p in model.parameters()):,} | "
               f"discriminator {sum(p.numel() for p in disc.parameters()):,}")
    perceptual = None
    if args.perceptual_weight > 0:
        if vgg16_weights_path():
            perceptual = PerceptualLoss(vgg16_weights_path()).to(rt.device)
        else:
            logger.log("perceptual loss off: VGG16 ImageNet weights are not in the torch hub cache "
                       "(see README 'Stage A' to enable it); training goes on without it")
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        disc.load_state_dict(ckpt["disc"])
        opt.load_state_dict(ckpt["optimizer"])
        opt_d.load_state_dict(ckpt["optimizer_disc"])
        scaler.load_state_dict(ckpt["scaler"])
        scaler_d.load_state_dict(ckpt["scaler_disc"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        logger.log(f"resumed from {ckpt_path} at step {step}")
    raw_model, raw_disc = model, disc
    if args.compile:
        model = torch.compile(model)
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
        disc = DDP(disc, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)

    def save():
        cfg_out = asdict(cfg) | {"scale_factor": measure_scale_factor(ema, held_images)}
        ema.cfg.scale_factor = raw_model.cfg.scale_factor = cfg_out["scale_factor"]
        save_checkpoint(ckpt_path, {
            "stage": "stage_a", "step": step, "model_config": cfg_out, "model": raw_model.state_dict(),
            "ema": ema.state_dict(), "disc": raw_disc.state_dict(), "optimizer": opt.state_dict(),
            "optimizer_disc": opt_d.state_dict(), "scaler": scaler.state_dict(), "scaler_disc": scaler_d.state_dict(),
            "train_config": vars(args), "deps": {"data": os.path.abspath(args.data)}, "rng": rng_state(),
            "code_counts": counts, "metrics": {"holdout_psnr": holdout_psnr()}})

    @torch.no_grad()
    def holdout_psnr():
        return psnr(ema.decode_raw(ema.encode_raw(held_images)), held_images)

    gen_params = list(raw_model.parameters())
    batches = infinite_batches(trainset, args.batch_size, rt, args.num_workers, args.seed, step, args.grad_accum)
    counts = torch.zeros(cfg.codebook_size, device=rt.device)  # code usage since the last dead-code restart
    if ckpt:
        counts.copy_(ckpt["code_counts"])
    else:  # initialise the codebook on encoder outputs of a few images instead of the tiny uniform init
        x0 = torch.stack([trainset[i][0] for i in range(min(len(trainset), 64))]).to(rt.device)
        with torch.no_grad():
            restart_dead_codes(raw_model.vquantizer, raw_model.encode_raw(x0), counts, rt)
    pbar = None
    if rt.master:
        from tqdm import tqdm
        pbar = tqdm(total=args.max_steps, initial=step, desc="stage A", dynamic_ncols=True)
    t0, seen = time.time(), 0
    model.train()
    while step < args.max_steps:
        lr = get_lr(step, args.lr, args.warmup)
        set_lr(opt, lr)
        set_lr(opt_d, lr)
        use_gan = args.gan_weight > 0 and step >= args.disc_start  # the adversarial term starts after a warm-up
        for micro in range(args.grad_accum):
            x = next(batches)[0].to(rt.device, non_blocking=True, memory_format=torch.channels_last)
            sync = micro == args.grad_accum - 1
            with no_sync(model, sync), rt.autocast():
                recon, vq_loss, idx = model(x)
                rec_loss = F.mse_loss(recon.float(), x)
                loss = rec_loss + vq_loss
                if perceptual is not None:
                    loss = loss + args.perceptual_weight * perceptual(recon.float(), x)
                if use_gan:  # through the raw discriminator, and backward below only into Stage A's weights
                    g_loss = generator_adv_loss(raw_disc, recon.float())
                    loss = loss + args.gan_weight * g_loss
            # gradients of a mean over micro-batches: divide each micro-batch loss by their count
            scaler.scale(loss / args.grad_accum).backward(inputs=gen_params)
            if use_gan:
                with no_sync(disc, sync), rt.autocast():
                    d_loss = discriminator_loss(disc, x, recon.float())
                scaler_d.scale(d_loss / args.grad_accum).backward()
            counts += torch.bincount(idx.flatten(), minlength=cfg.codebook_size)
            seen += len(x) * rt.world_size
        grad_norm = optimizer_step(model, opt, scaler, args.grad_clip)
        if use_gan:
            optimizer_step(disc, opt_d, scaler_d, args.grad_clip)
        update_ema(ema, raw_model, ema_decay_at(step, args.ema_decay))
        step += 1
        if pbar:
            pbar.update(1)
        if step % args.log_every == 0 or step == args.max_steps:
            metrics = {"loss": loss.item(), "rec": rec_loss.item(), "vq": vq_loss.item(),
                       "psnr": psnr(recon.detach().float(), x), "codes": (counts > 0).float().mean().item(),
                       "grad_norm": grad_norm.item()}
            if use_gan:
                metrics |= {"g": g_loss.item(), "d": d_loss.item()}
            logger.log(log_line(step, args.max_steps, metrics, lr, seen / (time.time() - t0)))
            t0, seen = time.time(), 0
        if step % args.restart_every == 0 and step < args.max_steps * 0.8:
            with torch.no_grad():
                restart_dead_codes(raw_model.vquantizer, raw_model.encode_raw(x), counts, rt)
            counts.zero_()
        if rt.master and (step % args.sample_every == 0 or step == args.max_steps):
            with torch.no_grad():  # held-out inputs (top) over their EMA reconstructions (bottom)
                recon_h = ema.decode_raw(ema.encode_raw(held_images[:8]))
            save_image_grid(torch.cat([held_images[:8], recon_h]), os.path.join(args.out_dir, f"samples_{step:07d}.png"), 8)
        if rt.master and (step % args.save_every == 0 or step == args.max_steps):
            save()
    if pbar:
        pbar.close()
    if rt.master:
        logger.log(f"done: held-out PSNR (EMA, unquantised) {holdout_psnr():.2f} dB | "
                   f"scale_factor {raw_model.cfg.scale_factor} | checkpoint {ckpt_path}")
    if rt.ddp:
        dist.destroy_process_group()

# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Train Stage A (the f4 VQGAN) of Würstchen on a folder of images.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, "stage_a")
    g = parser.add_argument_group("stage A")
    g.add_argument("--disc_start", type=int, default=None, help="step at which the adversarial loss switches on (default: per preset)")
    g.add_argument("--gan_weight", type=float, default=0.1, help="weight of the generator's adversarial loss (0 = no GAN)")
    g.add_argument("--perceptual_weight", type=float, default=0.0,
                   help="weight of a VGG16 perceptual loss; used only if the VGG16 weights are already on disk")
    g.add_argument("--restart_every", type=int, default=200, help="steps between dead-codebook-entry restarts")
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(get_args())
