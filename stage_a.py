"""
Stage A of Würstchen: an f4 VQGAN (method.md §2).

    image (B, 3, H, W) in [0, 1]  --encode-->  latent (B, 4, H/4, W/4)  --decode-->  image

The encoder ends in a BatchNorm (latents roughly unit-scale); the vector quantiser serves training:
Würstchen v2 decodes the *unquantised* latent ("Stage A as a VAE"). Shared machinery: common.py.

Run it:
    python data.py toy toy                               # a captioned toy dataset, no download
    python stage_a.py --data toy --model tiny            # CPU, a few minutes
    python stage_a.py --data ./imgs                      # one GPU, default 'small' preset
    torchrun --standalone --nproc_per_node=8 stage_a.py --data ./imgs --model paper
"""
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import (ArgumentParser, HelpFormatter, NonFiniteGuard, Progress, UsageError,
                    add_common_args, ema_and_optimizer, ema_decay_at, eval_mode, frozen, get_lr,
                    load_checkpoint, load_exact, load_weights_file, no_sync, nonnegative_float,
                    nonnegative_int, positive_int, preset_name, psnr, read_json,
                    recompute_batchnorm, run_cli, save_checkpoint, save_image_grid, set_lr,
                    start_run, update_ema, wrap_ddp)
from data import check_data, holdout_batch, image_batches, open_data, resume_batches

# -----------------------------------------------------------------------------
# config


@dataclass
class StageAConfig:
    """VQGAN hyper-parameters (method §2); the defaults are the released Stage A."""
    c_in: int = 3  # image channels
    c_hidden: int = 384  # width of the deepest level; each level above has half the width
    levels: int = 2  # 2 levels = f4: PixelUnshuffle(2) then one stride-2 conv
    bottleneck_blocks: int = 12  # mixing blocks at the start of the decoder
    c_latent: int = 4  # latent channels
    codebook_size: int = 8192  # VQ codebook entries
    scale_factor: float = 0.3764  # latent std, measured in training: encode() / it, decode() * it
    disc_c_hidden: int = 512  # patch discriminator width (training only)
    disc_depth: int = 6  # patch discriminator depth (training only)


# StageAConfig field -> diffusers PaellaVQModel config key (both default to the released values)
DIFFUSERS_NAMES = {"c_in": "in_channels", "c_hidden": "embed_dim", "levels": "levels",
                   "bottleneck_blocks": "bottleneck_blocks", "c_latent": "latent_channels",
                   "codebook_size": "num_vq_embeddings", "scale_factor": "scale_factor"}

PRESETS = {  # per preset: the model config and the training defaults that flags left unset take
    # CPU quick start and tests: 128 px toy images -> 4 x 32 x 32 latents in a few CPU minutes
    "tiny": dict(
        model=StageAConfig(c_hidden=64, bottleneck_blocks=2, codebook_size=1024, disc_c_hidden=64,
                           disc_depth=3),
        train=dict(image_size=128, batch_size=8, max_steps=500, lr=2e-3, warmup=50, beta2=0.95,
                   disc_start=300)),
    # one-GPU reproduction at 256 px
    "small": dict(
        model=StageAConfig(c_hidden=192, bottleneck_blocks=6, disc_c_hidden=256, disc_depth=4),
        train=dict(image_size=256, batch_size=32, max_steps=100_000, lr=2e-4, warmup=1000,
                   beta2=0.95, disc_start=20_000)),
    # the released architecture (warp-ai/wuerstchen `vqgan`): 18,406,894 parameters
    "paper": dict(
        model=StageAConfig(),
        train=dict(image_size=256, batch_size=64, max_steps=500_000, lr=1e-4, warmup=10_000,
                   beta2=0.95, disc_start=100_000)),
}
DISC_BETAS = (0.5, 0.9)  # AdamW betas of the discriminator, the usual GAN choice
RESTART_UNTIL = 0.8  # dead-code restarts in the first 80 % of training; then the codebook settles
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet input stats

# -----------------------------------------------------------------------------
# model


def replicate_pad_by_concat(x):
    """ReplicationPad2d(1) of (B, C, H, W) as two concatenations: (B, C, H + 2, W + 2)."""
    x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
    return torch.cat([x[:, :, :, :1], x, x[:, :, :, -1:]], dim=3)


class MixBlock(nn.Module):
    """ConvNeXt-style residual mixing block of Paella's VQGAN (§2.2); gammas g, init 0 (identity):
    h = LN(x) * (1 + g0) + g1; x += DWConv(h) * g2; h = LN(x) * (1 + g3) + g4; x += MLP(h) * g5."""

    def __init__(self, c, c_mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1),
                                       nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_mlp), nn.GELU(), nn.Linear(c_mlp, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x):  # x: (B, C, H, W), fastest channels_last (StageA converts its inputs)
        # The docstring's maths, faster: (1 + g0, g1), (1 + g3, g4) are the LayerNorms' weight and
        # bias, g2 / g5 scale the conv / last Linear weights: no extra pass over the activations
        g, C = self.gammas, x.shape[1]
        h = F.layer_norm(x.permute(0, 2, 3, 1), (C,), (1 + g[0]).expand(C), g[1].expand(C),
                         self.norm1.eps)
        pad, conv = self.depthwise
        h = h.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W), a view
        # torch.compile's replication_pad2d_backward rejects channels-last input (torch 2.14):
        # there, concatenate the edge rows and columns instead (same values; 3x slower in eager)
        h = replicate_pad_by_concat(h) if torch.compiler.is_compiling() else pad(h)
        x = x + F.conv2d(h, conv.weight * g[2], conv.bias * g[2], groups=C)  # (B, C, H, W)
        h = F.layer_norm(x.permute(0, 2, 3, 1), (C,), (1 + g[3]).expand(C), g[4].expand(C),
                         self.norm2.eps)
        fc1, act, fc2 = self.channelwise  # the MLP runs on (B, H, W, C)
        h = F.linear(act(fc1(h)), fc2.weight * g[5], fc2.bias * g[5])
        return x + h.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with a straight-through gradient (§2.3).
    Loss = mean((q - sg(z))^2) [codebook] + 0.25 * mean((z - sg(q))^2) [commitment]."""

    def __init__(self, codebook_size, c_latent, beta=0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, c_latent)
        self.embedding.weight.data.uniform_(-1 / codebook_size, 1 / codebook_size)

    @torch.no_grad()
    def indices(self, z_flat):
        """Nearest codebook vector's index per row of z_flat (N, C), in chunks to bound memory."""
        codebook = self.embedding.weight.float()
        return torch.cat([torch.cdist(c.float(), codebook).argmin(1) for c in z_flat.split(8192)])

    def forward(self, z):  # z: (B, C, H, W)
        B, C, H, W = z.shape
        idx = self.indices(z.permute(0, 2, 3, 1).reshape(-1, C))  # rows (B*H*W, C)
        q = self.embedding(idx).view(B, H, W, C).permute(0, 3, 1, 2).to(z.dtype)  # (B, C, H, W)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through estimator
        return q, loss, idx.view(B, H, W)


class StageA(nn.Module):
    """Stage A, the f4 VQGAN (§2.1), with the released weights' key names: loading is a copy."""

    def __init__(self, cfg: StageAConfig):
        super().__init__()
        self.cfg = cfg
        c_levels = [cfg.c_hidden // 2**i for i in reversed(range(cfg.levels))]  # e.g. [192, 384]
        # encoder: PixelUnshuffle -> 1x1 conv -> (MixBlock, stride-2 conv)* -> 1x1 conv -> BatchNorm
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2),
                                      nn.Conv2d(cfg.c_in * 4, c_levels[0], kernel_size=1))
        down = []
        for i, c in enumerate(c_levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down.append(MixBlock(c, c * 4))
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], cfg.c_latent, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(cfg.c_latent)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.codebook_size, cfg.c_latent)
        # decoder: 1x1 conv -> MixBlocks -> (ConvTranspose, MixBlock)* -> 1x1 conv -> PixelShuffle
        up = [nn.Sequential(nn.Conv2d(cfg.c_latent, c_levels[-1], kernel_size=1))]
        for i, c in enumerate(reversed(c_levels)):
            up += [MixBlock(c, c * 4) for _ in range(cfg.bottleneck_blocks if i == 0 else 1)]
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[cfg.levels - 2 - i], kernel_size=4,
                                             stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], cfg.c_in * 4, kernel_size=1),
                                       nn.PixelShuffle(2))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def encode_raw(self, x):
        """(B, 3, H, W) in [0, 1] -> BatchNorm output (B, 4, H/4, W/4), unquantised, unscaled."""
        x = x.contiguous(memory_format=torch.channels_last)  # speed: MixBlock's permutes are views
        return self.down_blocks(self.in_block(x))

    def decode_raw(self, h):
        """(B, 4, H/4, W/4) raw latent -> (B, 3, H, W); no output activation: callers clamp."""
        h = h.contiguous(memory_format=torch.channels_last)  # speed: MixBlock's permutes are views
        return self.out_block(self.up_blocks(h))

    def encode(self, x, quantize=False):
        """Images in [0, 1] -> Stage B's latent: encode_raw (quantised if asked) / scale_factor."""
        h = self.encode_raw(x)
        return (self.vquantizer(h)[0] if quantize else h) / self.cfg.scale_factor

    def decode(self, latents, quantize=False):
        """Inverse of encode: decode_raw(latents * scale_factor), quantised if asked (not in v2)."""
        h = latents * self.cfg.scale_factor
        return self.decode_raw(self.vquantizer(h)[0] if quantize else h)

    def encode_indices(self, x):
        """Images -> codebook indices (B, H/4, W/4): the tokens v1's Stage B (Paella) learns."""
        return self.vquantizer(self.encode_raw(x))[2]

    def decode_indices(self, idx):
        """Indices (B, H/4, W/4) -> images; the codes are raw latents (§2.4): no scale_factor."""
        codes = self.vquantizer.embedding(idx)  # (B, h, w, 4)
        return self.decode_raw(codes.permute(0, 3, 1, 2))  # (B, 4, h, w)

    def forward(self, x):
        """Training path: returns (reconstruction, vq loss, code indices (B, H/4, W/4))."""
        q, vq_loss, idx = self.vquantizer(self.encode_raw(x))
        return self.decode_raw(q), vq_loss, idx

    @classmethod
    def from_pretrained(cls, path):
        """Load a diffusers `PaellaVQModel` folder or dome272's released `vqgan_f4_v1_500k.pt`."""
        if os.path.isdir(path):
            hf = read_json(os.path.join(path, "config.json"))
            if (hf.get("up_down_scale_factor", 2) != 2
                    or hf.get("in_channels", 3) != hf.get("out_channels", 3)):
                raise UsageError(
                    f"{path}: StageA builds VQGANs with up_down_scale_factor 2 and as many output "
                    f"channels as input ones (as released), not {hf.get('up_down_scale_factor', 2)}"
                    f" and {hf.get('in_channels', 3)} -> {hf.get('out_channels', 3)}")
            cfg = StageAConfig(**{ours: hf[theirs] for ours, theirs in DIFFUSERS_NAMES.items()
                                  if theirs in hf})
            sd = load_weights_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = {k.replace("vquantizer.codebook.", "vquantizer.embedding."): v
                  for k, v in sd.get("state_dict", sd).items()}
            n_codes, c_latent = sd["vquantizer.embedding.weight"].shape
            n_up = len({k.split(".")[1] for k in sd if k.startswith("up_blocks.")})
            cfg = StageAConfig(c_hidden=sd["in_block.1.weight"].shape[0] * 2,  # released: 2 levels
                               bottleneck_blocks=n_up - 3, c_latent=c_latent, codebook_size=n_codes)
        with torch.device("meta"):
            model = cls(cfg)
        load_exact(model, sd, what=f"Stage A weights from {path}")
        return model.eval()


def load_stage_a(path, device="cpu"):
    """Stage A from our checkpoint alone (its config + EMA weights), frozen, in eval mode."""
    ckpt = load_checkpoint(path, "stage_a", mmap=True)
    model = StageA(StageAConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"])
    return frozen(model, device)


class Discriminator(nn.Module):
    """Patch discriminator of the reference `vqgan.py` (§2.5): spectral-norm stride-2 convs,
    InstanceNorm, LeakyReLU(0.2), 1x1 conv to a logit per patch (its Sigmoid is in the BCE loss)."""

    def __init__(self, c_in=3, c_hidden=512, depth=6):
        super().__init__()
        sn, c = nn.utils.spectral_norm, c_hidden // 2 ** (depth - 1)
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
    """Perceptual loss: MSE of VGG16 features, built only from weights already on disk (README)."""

    def __init__(self, weights_path):
        super().__init__()
        import torchvision
        vgg = torchvision.models.vgg16()
        vgg.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.features = vgg.features[:23].eval().requires_grad_(False)  # up to relu4_3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x, y):
        return F.mse_loss(*(self.features((t - self.mean) / self.std) for t in (x, y)))


def vgg16_weights_path():
    """Where torchvision caches the VGG16 ImageNet weights; None when they are not there."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth")
    return path if os.path.exists(path) else None


def perceptual_loss(weight, device, logger):
    """The perceptual loss of --perceptual_weight > 0, if torchvision's VGG16 ImageNet weights are
    on disk (never downloaded); else None, said in the log."""
    path = vgg16_weights_path() if weight > 0 else None
    if weight > 0 and not path:
        logger.log("perceptual loss off: VGG16 ImageNet weights are not in the torch hub cache "
                   "(torchvision's vgg16-397923af.pth enables it); training goes on without it")
    return PerceptualLoss(path).to(device) if path else None

# -----------------------------------------------------------------------------
# training


def generator_adv_loss(disc, fake):
    """Non-saturating generator loss -log sigmoid(D(fake)), as BCE on logits."""
    return F.softplus(-disc(fake)).mean()


def discriminator_loss(disc, real, fake):
    """-log sigmoid(D(real)) - log(1 - sigmoid(D(fake))), one forward over both (fake detached)."""
    logits_real, logits_fake = disc(torch.cat([real, fake.detach()])).chunk(2)
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


@torch.no_grad()
def restart_dead_codes(vq, z, counts, rt):
    """Dead codebook entries -> random current encoder outputs, against collapse; rank 0 decides."""
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
    """Std of the raw latents of `images` (eval mode, as the model encodes after training): the
    scale that makes StageA.encode ~unit-variance."""
    with eval_mode(model):
        return round(model.encode_raw(images).float().std().item(), 4)


def train(args):
    preset = PRESETS[preset_name(args)]
    check_data(args, 2 ** preset["model"].levels, "Stage A's encoder")  # before anything is built
    rt, logger, ckpt_path, ckpt = start_run(args, "stage_a", preset["train"])
    # a copy: the measured scale_factor is written into it, never into the preset table
    cfg = StageAConfig(**ckpt["model_config"]) if ckpt else replace(preset["model"])
    logger.log(f"stage A | preset {args.model} | {rt.device} {str(rt.dtype).replace('torch.', '')}"
               f" | world {rt.world_size} | config {asdict(cfg)}")
    # data: images in [0, 1]; a fixed held-out set for previews and the final PSNR
    trainset, holdout = open_data(args, verbose=rt.master)  # a folder or tar shards
    held_images, _ = holdout_batch(holdout, rt.device)
    # models, EMA and optimizers (weights stay fp32; autocast does the low-precision compute);
    # channels-last: the LayerNorms and MLPs run over channels, so no permute copies
    model = StageA(cfg).to(rt.device, memory_format=torch.channels_last)
    disc = Discriminator(cfg.c_in, cfg.disc_c_hidden, cfg.disc_depth).to(rt.device)
    ema, _, opt = ema_and_optimizer(model, args)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=DISC_BETAS,
                              weight_decay=args.weight_decay)
    scaler, scaler_d = rt.make_scaler(), rt.make_scaler()
    logger.log(f"parameters: Stage A {sum(p.numel() for p in model.parameters()):,} | "
               f"discriminator {sum(p.numel() for p in disc.parameters()):,}")
    perceptual = perceptual_loss(args.perceptual_weight, rt.device, logger)  # None: off
    step = ckpt["step"] if ckpt else 0
    if ckpt:
        for part, key in ((model, "model"), (ema, "ema"), (disc, "disc"), (opt, "optimizer"),
                          (opt_d, "optimizer_disc"), (scaler, "scaler"), (scaler_d, "scaler_disc")):
            part.load_state_dict(ckpt[key])
        logger.log(f"resumed from {ckpt_path} at step {step}")
    raw_model, raw_disc = model, disc
    model, disc = wrap_ddp(torch.compile(model) if args.compile else model, rt), wrap_ddp(disc, rt)
    guard = NonFiniteGuard(rt, ckpt_path, args.max_nonfinite, raw_model)

    def save(metrics, run_state):
        cfg_out = asdict(cfg) | {"scale_factor": measure_scale_factor(ema, held_images)}
        ema.cfg.scale_factor = raw_model.cfg.scale_factor = cfg_out["scale_factor"]
        save_checkpoint(ckpt_path, {
            "stage": "stage_a", "step": step, "model_config": cfg_out,
            "model": raw_model.state_dict(), "ema": ema.state_dict(), "disc": raw_disc.state_dict(),
            "optimizer": opt.state_dict(), "optimizer_disc": opt_d.state_dict(),
            "scaler": scaler.state_dict(), "scaler_disc": scaler_d.state_dict(),
            "train_config": vars(args), "deps": {"data": os.path.abspath(args.data)}, **run_state,
            "code_counts": counts, "metrics": {"holdout_psnr": holdout_psnr()}})

    @torch.no_grad()
    def holdout_psnr(m=ema):  # unquantised decode, as Würstchen v2 decodes
        with eval_mode(m):
            return psnr(m.decode_raw(m.encode_raw(held_images)), held_images)

    @torch.no_grad()
    def preview():  # held-out inputs (top) over their EMA reconstructions (bottom)
        with eval_mode(ema):
            recon_h = ema.decode_raw(ema.encode_raw(held_images[:8]))
        save_image_grid(torch.cat([held_images[:8], recon_h]),
                        os.path.join(args.out_dir, f"samples_{step:07d}.png"), 8)
        return {}

    def prepare():  # the EMA encoder's BatchNorm: the statistics of its own weights
        if ema is not raw_model:
            with rt.autocast():
                recompute_batchnorm(ema, ema.encode_raw, image_batches(trainset), device=rt.device)

    gen_params = list(raw_model.parameters())
    batches = resume_batches(trainset, args, rt, step, ckpt)  # then the RNG state of a --resume
    counts = torch.zeros(cfg.codebook_size, device=rt.device)  # code usage since the last restart
    if ckpt:
        counts.copy_(ckpt["code_counts"])
    else:  # initialise the codebook on encoder outputs of a batch, not the tiny uniform init
        x0 = next(image_batches(trainset, 64, spread=False)).to(rt.device)
        with torch.no_grad():
            restart_dead_codes(raw_model.vquantizer, raw_model.encode_raw(x0), counts, rt)
    progress = Progress(args, rt, logger, step, "stage A")
    model.train()
    while step < args.max_steps:
        lr = get_lr(step, args.lr, args.warmup)
        set_lr(opt, lr)
        set_lr(opt_d, lr)
        use_gan = args.gan_weight > 0 and step >= args.disc_start  # GAN term after a warm-up
        for micro in range(args.grad_accum):
            x = next(batches)[0].to(rt.device, non_blocking=True, memory_format=torch.channels_last)
            sync = micro == args.grad_accum - 1
            with no_sync(model, sync), rt.autocast():
                recon, vq_loss, idx = model(x)
                rec_loss = F.mse_loss(recon.float(), x)
                loss = rec_loss + vq_loss
                if perceptual is not None:
                    loss = loss + args.perceptual_weight * perceptual(recon.float(), x)
                if use_gan:  # via the raw discriminator; backward below only into Stage A's weights
                    g_loss = generator_adv_loss(raw_disc, recon.float())
                    loss = loss + args.gan_weight * g_loss
            scaler.scale(loss / args.grad_accum).backward(inputs=gen_params)  # the micro-batch mean
            if use_gan:
                with no_sync(disc, sync), rt.autocast():
                    d_loss = discriminator_loss(disc, x, recon.float())
                scaler_d.scale(d_loss / args.grad_accum).backward()
            counts += torch.bincount(idx.flatten(), minlength=cfg.codebook_size)
            progress.count(len(x))
        optimizers = [(opt, scaler)] + [(opt_d, scaler_d)] * use_gan  # both stepped, or neither
        grad_norm = guard.step(step, loss + d_loss if use_gan else loss, optimizers, args.grad_clip)
        if guard.ok and ema is not raw_model:
            update_ema(ema, raw_model, ema_decay_at(step, args.ema_decay))
        step += 1
        codes = (counts > 0).float().mean()  # codebook usage since the last restart
        if step % args.restart_every == 0 and step < args.max_steps * RESTART_UNTIL and guard.ok:
            with torch.no_grad():
                restart_dead_codes(raw_model.vquantizer, raw_model.encode_raw(x), counts, rt)
            counts.zero_()

        def metrics():
            return {"loss": loss.item(), "rec": rec_loss.item(), "vq": vq_loss.item(),
                    "psnr": psnr(recon.detach().float(), x), "codes": codes.item(),
                    "grad_norm": grad_norm.item()} | (
                {"g": g_loss.item(), "d": d_loss.item()} if use_gan else {})
        progress.end_step(step, metrics, lr, guard.skipped, batches, save, preview, prepare)
    progress.close(f"held-out PSNR (EMA, unquantised) {holdout_psnr():.2f} dB (raw weights "
                   f"{holdout_psnr(raw_model):.2f} dB) | scale_factor {raw_model.cfg.scale_factor}"
                   f" | checkpoint {ckpt_path}" if rt.master else None)

# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    parser = ArgumentParser(description="Train Stage A (the f4 VQGAN) of Würstchen on a folder of "
                            "images.", formatter_class=HelpFormatter)
    add_common_args(parser, "stage_a")
    g = parser.add_argument_group("stage A")
    g.add_argument("--disc_start", type=nonnegative_int, default=None,
                   help="step at which the adversarial loss switches on (default: per preset)")
    g.add_argument("--gan_weight", type=nonnegative_float, default=0.1,
                   help="GAN loss weight (0 = no GAN)")
    g.add_argument("--perceptual_weight", type=nonnegative_float, default=0.0,
                   help="weight of a VGG16 perceptual loss (only if its weights are on disk)")
    g.add_argument("--restart_every", type=positive_int, default=200,
                   help="steps per dead-code restart")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(train, get_args())
