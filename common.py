"""
The training machinery every stage shares, written once (nanochat's common.py): where and how we run (device, DDP,
precision), the common flags and the opening of every train(), the LR and EMA functions, the optimizer step,
atomic self-describing checkpoints, the exact-resume data order, the hold-out split, image grids and the log line.

Nothing here knows about Würstchen: the method lives in stage_a.py, stage_b.py and stage_c.py, which import this.
"""
import argparse
import json
import math
import os
import sys
import textwrap
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# runtime: device, DDP, precision


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


def pick_device(device="auto"):
    """'auto' -> cuda, else mps, else cpu; anything else is returned as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device):
    """bf16 on GPUs that support it, else fp16 (with a GradScaler when training); fp32 on CPU and MPS."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def setup_runtime(device="auto", dtype="auto", seed=0):
    """Pick the device and precision, and start DDP when launched by torchrun (RANK in the environment)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(device)
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    device = torch.device(device)
    dtype = default_dtype(device) if dtype == "auto" else getattr(torch, dtype)
    if device.type == "cuda":  # TF32 matmuls: ~free speed on Ampere+, precision is ample for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed + rank)
    return Runtime(device=device, ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, dtype=dtype)


def wrap_ddp(model, rt):
    """The module under DDP when torchrun started several processes, else unchanged."""
    if not rt.ddp:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)


def no_sync(module, sync):
    """DDP: skip the gradient all-reduce on micro-steps that are not the last one of an optimizer step."""
    return module.no_sync() if (not sync and hasattr(module, "no_sync")) else nullcontext()

# -----------------------------------------------------------------------------
# command line: the flags every training script shares, and the opening of every train()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """-h shows each flag's default, except where the default comes from the preset (the help says so)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_common_args(parser, stage, presets=("tiny", "small", "paper")):
    """The flags every training script shares, with the same names and meanings; --model picks one of `presets`."""
    g = parser.add_argument_group("common")
    g.add_argument("--data", required=True,
                   help="folder of images (searched recursively), optional same-stem .txt captions")
    g.add_argument("--out_dir", default=f"out/{stage}", help="where ckpt.pt, log.txt and sample grids go")
    g.add_argument("--model", default="small", choices=list(presets), help="model size preset")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: per preset)")
    g.add_argument("--batch_size", type=int, default=None,
                   help="global batch size, split over ranks and --grad_accum (default: per preset)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--image_size", type=int, default=None, help="training resolution (default: per preset)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per preset)")
    g.add_argument("--warmup", type=int, default=None, help="linear LR warm-up steps (default: per preset)")
    g.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default: per preset)")
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
    fill_defaults(args, train_defaults)
    rt = setup_runtime(args.device, args.dtype, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    logger = Logger(args.out_dir, rt.master)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, stage) if args.resume else None
    if ckpt and ckpt["train_config"]["model"] != args.model:
        raise CheckpointError(f"{ckpt_path} was trained with --model {ckpt['train_config']['model']}, "
                              f"not {args.model}")
    return rt, logger, ckpt_path, ckpt


def run_cli(main, args):
    """Run a script's main(args). A user's mistake (a missing or wrong file) prints its one-line message and exits
    with status 1, without a traceback."""
    try:
        main(args)
    except (FileNotFoundError, CheckpointError) as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")

# -----------------------------------------------------------------------------
# optimisation: LR, EMA, one optimizer step


def get_lr(step, lr, warmup):
    """Linear warm-up to `lr`, then constant (method §6.5). A pure function of the step: resume needs nothing else."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def ema_decay_at(step, decay):
    """EMA warm-up: an average over about `step` steps early on, `decay` later, so short runs get a useful EMA
    (k-diffusion's EMAWarmup idea; the reference instead copied the weights for its first 5,000 updates)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied. BatchNorm statistics copied so
    belong to the raw weights: recompute_batchnorm gives the EMA model its own before it is used or saved."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def recompute_batchnorm(module, forward, dataset, n=512, batch_size=64, device="cpu"):
    """Give the BatchNorms of `module` (an EMA model) the statistics of its own activations. An EMA averages the
    parameters, but running statistics are not parameters: copied from the raw model they belong to other weights
    and shift every EMA output (up to 7 dB of Stage A's held-out PSNR in a short run). So, as
    torch.optim.swa_utils.update_bn does for SWA: reset them, then average the batch statistics of
    `forward(images)` over n images spread evenly through `dataset` (items (image, ...)), in train mode, with
    momentum None (a cumulative mean). Draws no random numbers, so exact resume is unaffected."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    index = list(range(0, len(dataset), max(1, len(dataset) // n)))[:n]
    for i in range(0, len(index), batch_size):
        forward(torch.stack([dataset[j][0] for j in index[i:i + batch_size]]).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    module.eval()


def optimizer_step(optimizer, scaler, grad_clip):
    """Unscale, clip, step, update the scaler, zero the grads. Returns the gradient norm before clipping."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm

# -----------------------------------------------------------------------------
# checkpoints and weight files


class CheckpointError(ValueError):
    """A checkpoint of another stage or preset, or a file that is not a checkpoint of this project."""


HOW_TO_MAKE = {"stage_a": "python stage_a.py --data DIR", "stage_b": "python stage_b.py --data DIR",
               "stage_c": "python stage_c.py --data DIR"}


def save_checkpoint(path, ckpt):
    """Write atomically: a kill at any moment leaves either the old or the new file, never a partial one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, stage):
    """Load a checkpoint of `stage` ('stage_a' | 'stage_b' | 'stage_c') with weights_only=True (a checkpoint never
    runs code), with one clear error for a missing file, another stage's checkpoint, or a file that is none."""
    expected = f"a {stage} checkpoint (written by `{HOW_TO_MAKE[stage]}`) was expected"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {stage} checkpoint at {path}: train one with `{HOW_TO_MAKE[stage]}` "
                                f"(it writes out/{stage}/ckpt.pt) or pass its path")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; {expected} (for released or exported "
                              f"weights in the diffusers layout use sample.py --pretrained DIR)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes, a truncated file, a safetensors file, a pickle of arbitrary objects
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}); {expected}") from None
    found = ckpt.get("stage") if isinstance(ckpt, dict) else None
    if found is None:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'stage' entry); {expected}")
    if found != stage:
        raise CheckpointError(f"{path} is a {found} checkpoint, but a {stage} checkpoint was expected here")
    return ckpt


def read_json(path):
    """The JSON object in `path`, or {} when there is no such file (optional config files of released folders)."""
    if path is None or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_weights_file(folder):
    """The state dict of a diffusers / transformers `save_pretrained` folder (safetensors, which open_clip already
    installs, or .bin)."""
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


def rng_state():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])

# -----------------------------------------------------------------------------
# data order: exact resume, hold-out split


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

# -----------------------------------------------------------------------------
# what users see: the log line, metrics, image grids


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


def psnr(x, y):
    """Mean PSNR (dB) of images in [0, 1]."""
    mse = ((x.clamp(0, 1) - y.clamp(0, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def save_image_grid(images, path, nrow):
    """Save (N, 3, H, W) images in [0, 1] as one PNG grid."""
    import torchvision
    torchvision.utils.save_image(images.float().clamp(0, 1), path, nrow=nrow, padding=2, pad_value=1.0)


def save_captioned_grid(images, captions, path, ncol=6):
    """Save (N, 3, H, W) images in [0, 1] as a PNG grid with each caption written under its image."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    H, W = images.shape[-2:]
    per_line = max(8, int(W / (font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)))  # characters per line
    lines = [textwrap.wrap(c, per_line) or [""] for c in captions]
    line_h, pad = font.getbbox("Ag")[3] + 2, 4
    band = line_h * max(len(l) for l in lines) + pad  # text height under every image
    nrow = math.ceil(len(images) / ncol)
    grid = Image.new("RGB", (ncol * (W + pad) + pad, nrow * (H + band + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    pixels = images.float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    for i, (img, text) in enumerate(zip(pixels, lines)):
        x0, y0 = pad + (i % ncol) * (W + pad), pad + (i // ncol) * (H + band + pad)
        grid.paste(Image.fromarray(img), (x0, y0))
        for j, line in enumerate(text):
            draw.text((x0 + 1, y0 + H + 2 + j * line_h), line, fill="black", font=font)
    grid.save(path)
