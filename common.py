"""
The training machinery every stage shares, written once (nanochat's common.py): where and how we
run (device, DDP, precision, BatchNorm over ranks), the common flags and the opening of every
train(), LR and EMA, the optimizer step with its non-finite guard, atomic self-describing
checkpoints never written from non-finite weights, the exact-resume data order (aspect-ratio
buckets and tar-shard streams too), the hold-out split, LoRA and disk caches for fine-tuning, image
grids and the log line.

Nothing here knows about Würstchen: the method lives in stage_a.py, stage_b.py and stage_c.py.
"""
import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import sys
import textwrap
import time
import zipfile
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

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
        """bf16/fp16 autocast on accelerators, no autocast (fp32) otherwise; weights stay fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self):
        # a real GradScaler only for fp16 (gradients underflow without it); a no-op for bf16, fp32
        return torch.amp.GradScaler(self.device_type, enabled=(self.dtype == torch.float16))


def pick_device(device="auto"):
    """'auto' -> cuda, else mps, else cpu; anything else is returned as given."""
    if device != "auto":
        return device
    return ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
            else "cpu")


def default_dtype(device):
    """bf16 on GPUs that support it, else fp16 (+ GradScaler when training); fp32 on CPU and MPS."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def setup_runtime(device="auto", dtype="auto", seed=0):
    """Pick the device and precision; start DDP under torchrun (RANK in the environment)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(device)
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        # a long timeout: with --cache, rank 0 encodes the dataset while the others wait
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:  # also cuda:N without torchrun: the
        torch.cuda.set_device(device)  # RNG state saved and restored is then this GPU's
    dtype = default_dtype(device) if dtype == "auto" else getattr(torch, dtype)
    if device.type == "cuda":  # TF32 matmuls: ~free speed on Ampere+, ample precision for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed + rank)
    return Runtime(device=device, ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size,
                   dtype=dtype)


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: each rank's input gets the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return AllReduceSum.forward(ctx, grad)


class AllRanksBatchNorm(nn.BatchNorm2d):
    """BatchNorm with the training statistics of the global batch (SyncBatchNorm's job, but it
    refuses CPU tensors): mean and variance are summed over ranks with a differentiable all_reduce,
    so the gradient flows through them as in SyncBatchNorm. Same parameters and buffers as
    nn.BatchNorm2d; eval mode is plain BatchNorm."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        all_reduce = AllReduceSum.apply
        xf = x.float()  # statistics in fp32, as BatchNorm under autocast
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device)  # per channel, this rank
        total = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))  # (C + 1,): sums, global count
        n = total[-1]
        mean = total[:-1] / n
        var = all_reduce(((xf - mean.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3))) / n  # biased
        with torch.no_grad():  # running statistics as nn.BatchNorm2d keeps them (unbiased variance)
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp_min(1), self.momentum)
        y = (xf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def wrap_ddp(model, rt):
    """The module under DDP when torchrun started several processes, else unchanged. BatchNorm then
    uses the global batch's statistics (SyncBatchNorm on GPUs, AllRanksBatchNorm on the CPU), so a
    resume with another world size sees the same statistics."""
    if not rt.ddp:
        return model
    if rt.device_type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = AllRanksBatchNorm  # same parameters and buffers: only forward differs
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)


def free_memory(device):
    """On a GPU, give back the memory of models just dropped: collect them (reference cycles too)
    and empty the allocator's cache. (On the CPU it goes back with their last reference.)"""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def channels_last_convs(model):
    """Conv weights in channels-last memory, the layout of Stage B's and C's activations: their
    gradients then come out in the weights' own layout and DDP all-reduces them in place (else it
    copies every gradient at every step, with the warning "Grad strides do not match bucket view
    strides"). Other parameters keep theirs: a (1, 1, 1, C) GRN gain made channels-last would
    mismatch the other way. The arithmetic, and so the numbers, are unchanged."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.to(memory_format=torch.channels_last)
    return model


def no_sync(module, sync):
    """DDP: skip the gradient all-reduce on micro-steps other than an optimizer step's last."""
    return module.no_sync() if (not sync and hasattr(module, "no_sync")) else nullcontext()

# -----------------------------------------------------------------------------
# command line: the flags every training script shares, and the opening of every train()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """-h shows each flag's default, except where it comes from the preset (the help says so)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_common_args(parser, stage, presets=("tiny", "small", "paper")):
    """The flags every training script shares, with the same names and meanings; --model picks one
    of `presets`."""
    g = parser.add_argument_group("common")
    g.add_argument("--data", required=True,
                   help="a folder of images (searched recursively; captions from same-stem .txt "
                   "files or metadata.jsonl/.csv), or tar shards: a folder of .tar files, a brace "
                   "pattern (shards/{00000..00999}.tar), a .tar path or URL, or a text file "
                   "listing them")
    g.add_argument("--out_dir", default=f"out/{stage}",
                   help="where ckpt.pt, log.txt and sample grids go")
    g.add_argument("--model", default=None, choices=list(presets), help="model size preset "
                   "(default: small; paper, the released sizes, with --pretrained)")
    g.add_argument("--max_steps", type=int, default=None,
                   help="optimizer steps (default: per preset)")
    g.add_argument("--batch_size", type=int, default=None, help="global batch size, split over "
                   "ranks and --grad_accum (default: per preset)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--image_size", type=int, default=None,
                   help="training resolution (default: per preset)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: per preset)")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear LR warm-up steps (default: per preset)")
    g.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default: per preset)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (0 = off)")
    g.add_argument("--ema_decay", type=float, default=None, help="EMA decay per optimizer step, "
                   "0 = no EMA (default: 0.999; 0 when fine-tuning)")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bf16 on GPUs that support it, else fp16 "
                   "(+GradScaler); fp32 on CPU")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    g.add_argument("--log_every", type=int, default=25, help="steps between log lines")
    g.add_argument("--sample_every", type=int, default=500, help="steps between preview grids")
    g.add_argument("--save_every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--num_workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--num_holdout", type=int, default=16,
                   help="images held out of training for previews and metrics")
    g.add_argument("--buckets", type=float, nargs="?", const=2.0, default=0.0, metavar="MAX_RATIO",
                   help="aspect-ratio buckets: keep each image's aspect ratio, in batches of one "
                   "of a few sizes of about --image_size^2 pixels, sides multiples of 128, aspect "
                   "ratios up to MAX_RATIO (2 when given alone); 0 = square centre crops")
    g.add_argument("--shuffle_buffer", type=int, default=1000,
                   help="tar shards: samples shuffled together (per loader worker; memory: their "
                   "encoded bytes)")
    g.add_argument("--max_nonfinite", type=int, default=5,
                   help="stop after this many optimizer steps in a row skipped for a non-finite "
                   "loss or gradient")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (faster on GPU, slow first step)")
    return parser


def preset_name(args):
    """--model, else its default: small, or with --pretrained paper (the released sizes)."""
    args.model = args.model or ("paper" if getattr(args, "pretrained", None) is not None
                                else "small")
    return args.model


def fill_defaults(args, defaults):
    """Flags left at None take the preset's training defaults."""
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def start_run(args, stage, train_defaults):
    """The opening every stage's train() shares: the preset's training defaults (with --resume, the
    checkpoint's first), the runtime, the output folder and its log, and with --resume the
    checkpoint to continue (of this stage and preset, else a clear error). Returns (rt, logger,
    ckpt_path, ckpt or None)."""
    from data import shard_list
    if getattr(args, "cache", False) is None and shard_list(args.data):
        args.cache = False  # a stream: nothing to cache up front (the presets' default: folders)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, stage) if args.resume else None
    train_defaults = {"ema_decay": 0.999, "seed": 0} | train_defaults  # a fine-tune's EMA: 0
    if ckpt:  # flags left out continue as the run was trained (batch size, lr, steps, ...)
        fill_defaults(args, {k: ckpt["train_config"].get(k) for k in train_defaults})
    if getattr(args, "epochs", None):  # sets --max_steps once the data is open (epochs_to_steps)
        train_defaults = {k: v for k, v in train_defaults.items() if k != "max_steps"}
    fill_defaults(args, train_defaults)
    rt = setup_runtime(args.device, args.dtype, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    logger = Logger(args.out_dir, rt.master)
    if ckpt:  # continued as it was trained: the same preset, base weights and kind of fine-tune
        was = ckpt["train_config"]
        for flag, default in (("model", None), ("pretrained", None), ("lora_rank", 0)):
            if was.get(flag, default) != getattr(args, flag, default):
                raise CheckpointError(f"{ckpt_path} was trained with --{flag} "
                                      f"{was.get(flag, default)}, not "
                                      f"{getattr(args, flag, default)}: resume it as it was trained"
                                      + (" (a LoRA run as a LoRA run, a full fine-tune as a full "
                                         "one)" if flag == "lora_rank" else ""))
    return rt, logger, ckpt_path, ckpt


def run_cli(main, args):
    """Run a script's main(args). A user's mistake (a missing or wrong file, flags that do not go
    together, data that cannot be read) prints its one-line message and exits with status 1,
    without a traceback."""
    try:
        main(args)
    except (FileNotFoundError, UsageError, NonFiniteError) as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")

# -----------------------------------------------------------------------------
# optimisation: LR, EMA, the guarded optimizer step


def get_lr(step, lr, warmup):
    """Linear warm-up to `lr`, then constant (method §6.5). A pure function of the step: resume
    needs nothing else."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def add_lora_from_args(module, args):
    """--lora_rank: LoRA adapters on `module`'s --lora_targets (the base stays frozen; adapters
    start at zero: step 0 is the base model). Returns the run's record of them, else None."""
    if not args.lora_rank:
        return None
    alpha = args.lora_alpha or args.lora_rank
    add_lora(module, args.lora_targets, args.lora_rank, alpha)
    return {"rank": args.lora_rank, "alpha": alpha, "targets": args.lora_targets}


def ema_and_optimizer(model, args):
    """The EMA copy of `model` (--ema_decay 0, as fine-tuning: none, the model itself) and AdamW
    over what is trained: all weights, or LoRA adapters. Returns (ema, trained params, opt)."""
    ema = deepcopy(model).eval().requires_grad_(False) if args.ema_decay else model
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, args.beta2),
                            weight_decay=args.weight_decay)
    return ema, trained, opt


def epochs_to_steps(args, items):
    """--epochs (passes over the training images, `items`: a list of them, None for a stream) as
    --max_steps, unless --max_steps was given."""
    if args.max_steps is not None:
        return
    if items is None:
        raise UsageError("--epochs needs a folder of images (a stream of tar shards has no known "
                         "length): give --max_steps")
    args.max_steps = math.ceil(args.epochs * len(items) / args.batch_size)


def finetune_warnings(args, default_lr, captions):
    """What makes a small-data fine-tune on `captions` (one per training image) learn nothing, said
    before it starts (users' reports: "24 images gave no result", a LoRA that "can't learn
    anything" at lr 1e-6). Returns the warnings."""
    warnings, lr = [], args.lr
    passes = args.max_steps * args.batch_size / len(captions)
    if lr < default_lr / 10:
        warnings.append(f"--lr {lr:g} is over 10x below the fine-tuning default "
                        f"{default_lr:g}: the weights (LoRA adapters start at zero) will barely "
                        f"move in a short run")
    if passes < 10:
        warnings.append(f"each training image is seen only {passes:.1f} times (--max_steps x "
                        f"--batch_size / images): a small set usually needs 50-200 passes "
                        f"(--epochs)")
    if not any(captions):
        warnings.append("no image has a caption: the fine-tune will be unconditional (every "
                        "caption empty), so no prompt will call up what it learns; add same-name "
                        ".txt files or a metadata.jsonl")
    return warnings


def ema_decay_at(step, decay):
    """EMA warm-up: decay (1 + step) / (10 + step), an average over the last ~(10 + step) / 9
    steps early on, then `decay` (0.999 from step ~9,000: ~1,000 steps), so short runs get a useful
    EMA (k-diffusion's EMAWarmup idea; the reference copied the weights for 5,000 updates)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied. BatchNorm
    statistics copied so belong to the raw weights: recompute_batchnorm gives the EMA model its own
    before it is used or saved."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def recompute_batchnorm(module, forward, batches, device="cpu"):
    """Give the BatchNorms of `module` (an EMA model) the statistics of its own activations: copied
    from the raw model, running statistics belong to other weights and shift every EMA output (up
    to 7 dB of Stage A's held-out PSNR in a short run). So, as torch.optim.swa_utils.update_bn does
    for SWA: reset them, then average the batch statistics of `forward(images)` over `batches` of
    training images (data.image_batches: 512 spread through the dataset), in train mode, momentum
    None (a cumulative mean). Draws no random numbers: exact resume is unaffected."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    for images in batches:
        forward(images.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    module.eval()


class NonFiniteError(RuntimeError):
    """Non-finite training: too many skipped steps in a row, or weights that cannot be saved."""


class NonFiniteGuard:
    """The optimizer step of every stage, guarded: a step whose loss or gradient norm is non-finite
    (on any rank: the ranks agree, so they stay in step) changes nothing. Its update is skipped, the
    buffers of `model` its forward pass moved (BatchNorm statistics) are taken back from a copy kept
    after every good step (they are small), and it is counted (`skipped`, in the log line).
    `max_in_row` such steps in a row stop the run with a NonFiniteError naming the step and the last
    checkpoint, whose weights are finite (save_checkpoint refuses non-finite ones).

    fp16: the GradScaler already skips steps whose scaled gradients overflowed, and lowers the
    scale; with a finite loss those are its business, not counted here. Skipped steps still advance
    the step counter, so the data order, the LR and exact --resume stay functions of the step."""

    def __init__(self, rt, ckpt_path, max_in_row=5, model=None):
        self.rt, self.ckpt_path, self.max_in_row = rt, ckpt_path, max_in_row
        self.buffers = list(model.buffers()) if model is not None else []
        self.good = [b.detach().clone() for b in self.buffers]  # after the last good step
        self.ok, self.skipped, self.in_row = True, 0, 0

    def step(self, step, loss, optimizers, grad_clip):
        """Unscale and clip the gradients of each (optimizer, scaler) in `optimizers`, then step all
        of them or none. `loss`: this step's (last micro-batch's) loss. Returns the first
        optimizer's gradient norm before clipping."""
        norms = []
        for optimizer, scaler in optimizers:
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            clip = grad_clip if grad_clip > 0 else float("inf")
            norms.append(torch.nn.utils.clip_grad_norm_(params, clip))
        bad = ~torch.isfinite(loss.detach().float())
        for norm, (_, scaler) in zip(norms, optimizers):
            if not scaler.is_enabled():  # fp16: overflowed gradients are the scaler's to skip
                bad = bad | ~torch.isfinite(norm)
        bad = bad.float().to(self.rt.device)
        if self.rt.ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.ok = not bad.item()
        for optimizer, scaler in optimizers:
            if self.ok:
                scaler.step(optimizer)  # skipped by the scaler itself if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        self.in_row = 0 if self.ok else self.in_row + 1
        with torch.no_grad():
            for b, good in zip(self.buffers, self.good):
                if self.ok:
                    good.copy_(b)  # the buffers of a good step are kept...
                else:
                    b.copy_(good)  # ...and taken back after a bad one
        if not self.ok:
            self.skipped += 1
            if self.in_row >= self.max_in_row:
                raise NonFiniteError(self.stop_message(step + 1, loss, norms[0]))
        return norms[0]

    def stop_message(self, step, loss, norm):
        last = "no checkpoint was written yet"
        if os.path.exists(self.ckpt_path):
            saved = torch.load(self.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            last = (f"the last checkpoint, {self.ckpt_path} (step {saved['step']}), holds finite "
                    f"weights")
        return (f"stopping at step {step}: {self.in_row} steps in a row had a non-finite loss or "
                f"gradient (loss {loss.item():.4g}, gradient norm {norm.item():.4g}) and were "
                f"skipped ({self.skipped} in all); {last}. Lower --lr, check the data, or try "
                f"--dtype float32 / bfloat16, then --resume")

# -----------------------------------------------------------------------------
# checkpoints and weight files


class UsageError(ValueError):
    """A user's mistake in flags, files or data, which its message explains: run_cli prints it
    alone, without a traceback."""


class CheckpointError(UsageError):
    """A checkpoint of another stage or preset, or a file that is not one of this project's."""


HOW_TO_MAKE = {"stage_a": "python stage_a.py --data DIR", "stage_b": "python stage_b.py --data DIR",
               "stage_c": "python stage_c.py --data DIR"}


def nonfinite_entries(obj, prefix=""):
    """Names of the floating-point tensors in a (nested) checkpoint dict holding a NaN or an inf."""
    if isinstance(obj, dict):
        return [name for k, v in obj.items() for name in nonfinite_entries(v, f"{prefix}{k}.")]
    if isinstance(obj, (list, tuple)):
        return [name for i, v in enumerate(obj) for name in nonfinite_entries(v, f"{prefix}{i}.")]
    if torch.is_tensor(obj) and obj.is_floating_point() and not torch.isfinite(obj).all():
        return [prefix[:-1]]
    return []


def save_checkpoint(path, ckpt):
    """Write atomically: a kill at any moment leaves either the old or the new file, never a partial
    one. Weights with a NaN or an infinity are never written: the previous checkpoint stays, and a
    NonFiniteError says where."""
    bad = nonfinite_entries(ckpt)
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise NonFiniteError(f"not saving {path}: non-finite values in {', '.join(bad[:5])}{more}; "
                             f"the checkpoint already there (if any) is kept")
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def atomic_write(path, write):
    """write(tmp), flush it to disk, then rename tmp to `path`: a kill or a power cut at any time
    leaves the old or the new file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write(path + ".tmp")
    with open(path + ".tmp", "rb+") as f:
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load_checkpoint(path, stage, mmap=False):
    """Load a checkpoint of `stage` ('stage_a' | 'stage_b' | 'stage_c') with weights_only=True (a
    checkpoint never runs code), with one clear error for a missing file, another stage's
    checkpoint, or a file that is none. mmap: tensors read from disk when used (a model rebuilt
    from its EMA weights never reads the optimizer's moments)."""
    expected = f"a {stage} checkpoint (written by `{HOW_TO_MAKE[stage]}`) was expected"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {stage} checkpoint at {path}: train one with "
                                f"`{HOW_TO_MAKE[stage]}` (it writes out/{stage}/ckpt.pt) "
                                f"or pass its path")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; {expected} (for "
                              f"released or exported weights in the diffusers layout use "
                              f"sample.py --pretrained DIR)")
    try:
        # (mmap needs torch.save's zip format: anything else fails, with its own error, below)
        mmap = mmap and zipfile.is_zipfile(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # random bytes, a truncated or safetensors file, a pickle of any objects
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}); "
                              f"{expected}") from None
    found = ckpt.get("stage") if isinstance(ckpt, dict) else None
    if found is None:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'stage' entry); "
                              f"{expected}")
    if found != stage:
        raise CheckpointError(f"{path} is a {found} checkpoint, but a {stage} checkpoint was "
                              f"expected here")
    return ckpt


def read_json(path):
    """The JSON object in `path`, or {} without such a file (released folders' optional configs)."""
    if path is None or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    """Write `obj` as indented JSON, making the folder first (configs of exported folders)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_weights_file(folder, sd, config, name="diffusion_pytorch_model.safetensors"):
    """The inverse of load_weights_file: a `save_pretrained` folder with config.json and the weights
    as safetensors (metadata format 'pt', which transformers requires)."""
    from safetensors.torch import save_file
    write_json(os.path.join(folder, "config.json"), config)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    save_file(sd, os.path.join(folder, name), metadata={"format": "pt"})


def load_weights_file(folder):
    """The state dict of a diffusers / transformers `save_pretrained` folder (safetensors, which
    open_clip already installs, or .bin)."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            from safetensors.torch import load_file
            return load_file(os.path.join(folder, name))
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights file (diffusion_pytorch_model.safetensors or .bin) in "
                            f"{folder}")


def hub_file(repo, filename):
    """Local path of one file of a Hugging Face repository: from the cache without a request, else
    downloaded into it (online). Without network it fails at once: one request first, because
    hf_hub_download alone retries for about 25 s."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return huggingface_hub.hf_hub_download(repo, filename, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    huggingface_hub.model_info(repo)  # raises at once when offline
    return huggingface_hub.hf_hub_download(repo, filename)


def load_exact(model, sd, what):
    """Load a state dict that must match the model key for key and shape for shape (assign: works
    from 'meta')."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{what} do not match the architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes "
                         f"{[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in bad[:5]]}")
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v
                           for k, v in sd.items()}, assign=True)


def rng_state():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available()
                    else torch.empty(0, dtype=torch.uint8)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])


def gather_run_state(rt, batches):
    """What a checkpoint needs beyond the models to continue exactly, from every rank: each rank's
    RNG state and, for tar shards, every loader worker's stream position. A collective under DDP:
    every rank calls it at every save. Returns {"rng": [rank 0's state, rank 1's, ...], "data": the
    stream's state (None for a folder, whose order is a function of the step)}."""
    mine = (rng_state(), batches.positions)
    everyone = [None] * rt.world_size if rt.ddp else [mine]
    if rt.ddp:
        dist.all_gather_object(everyone, mine)
    positions = {reader: pos for _, p in everyone for reader, pos in p.items()}
    data = batches.stream.state(positions, batches.served) if batches.stream else None
    return {"rng": [r for r, _ in everyone], "data": data}


def restore_rng(ckpt, rt):
    """Each rank continues its own random stream when the world size is the one saved; with another
    one, each rank starts a new stream from (seed, step, rank)."""
    states = ckpt["rng"]
    if len(states) == rt.world_size:
        set_rng_state(states[rt.rank])
    else:
        seed = ckpt["train_config"]["seed"]
        torch.manual_seed((seed * 1_000_003 + ckpt["step"]) * 1009 + rt.rank)

# -----------------------------------------------------------------------------
# fine-tuning: LoRA adapters on a frozen model (diffusers' layout), frozen inputs cached on disk


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update (LoRA, Hu et al. 2021): y = W x + b + s B(A(x)) with
    A: in -> r, B: r -> out, s = alpha / r. add_lora turns a model's Linear layers into these in
    place: W and b keep their names and stay frozen, the adapters are the submodules lora_A and
    lora_B (PEFT's names, so diffusers' LoRA keys). B starts at zero: an adapted model starts
    exactly as its base."""

    def forward(self, x):
        return super().forward(x) + self.lora_B(self.lora_A(x)) * self.lora_scale


def add_lora(model, targets, rank, alpha):
    """Freeze `model` and give every nn.Linear named one of `targets`, or ending in '.' + one of
    them (PEFT's target_modules rule), a rank-`rank` adapter of scale alpha / rank: A initialised
    as nn.Linear does (PEFT's choice too), B zero. Returns the adapted layers' names."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise UsageError(f"LoRA targets {list(targets)}: no nn.Linear layer of the model is "
                         f"named so")
    for name in names:
        layer = model.get_submodule(name)
        layer.__class__ = LoRALinear
        layer.lora_A = nn.Linear(layer.in_features, rank, bias=False, device=layer.weight.device)
        layer.lora_B = nn.Linear(rank, layer.out_features, bias=False, device=layer.weight.device)
        nn.init.zeros_(layer.lora_B.weight)
        layer.lora_scale = alpha / rank
    return names


def lora_weights(model, prefix):
    """The adapters of `model` in diffusers' LoRA layout: `{prefix}.{layer}.lora_A.weight` (r, in)
    and `.lora_B.weight` (out, r), the scale alpha / r folded into lora_B (a file without alphas
    reads as alpha = r, scale 1, in diffusers), float32."""
    weights = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            weights[f"{prefix}.{name}.lora_A.weight"] = \
                m.lora_A.weight.detach().float().cpu().contiguous()
            weights[f"{prefix}.{name}.lora_B.weight"] = \
                (m.lora_B.weight.detach().float() * m.lora_scale).cpu()
    return weights


def save_lora(path, model, prefix, made_for):
    """The adapters as a LoRA file (pytorch_lora_weights.safetensors: diffusers' load_lora_weights
    and sample.py --lora read it), written atomically; `made_for` describes the base model in the
    file's metadata, for the error when the file meets another one."""
    from safetensors.torch import save_file
    metadata = {"format": "pt", "made_for": made_for}
    atomic_write(path, lambda tmp: save_file(lora_weights(model, prefix), tmp, metadata=metadata))


def read_lora(path):
    """(prefix, weights, metadata) of a LoRA file in diffusers' layout
    ('prior.blocks.2.attention.to_q.lora_A.weight': prefix 'prior')."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        weights, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    prefixes = {k.split(".")[0] for k in weights}
    if len(prefixes) != 1 or not all(k.endswith((".lora_A.weight", ".lora_B.weight"))
                                     for k in weights):
        raise UsageError(f"{path} is not a LoRA file of one model in diffusers' layout "
                         f"('<model>.<layer>.lora_A.weight' / '.lora_B.weight'): "
                         f"keys {sorted(weights)[:3]}")
    return prefixes.pop(), weights, metadata


@torch.no_grad()
def merge_lora(model, path, scale=1.0, what="this model"):
    """Add the updates of the LoRA file at `path` to the weights of `model`: W += scale B A per
    adapted layer (A: (r, in), B: (out, r)). A file made for another model (a layer this one lacks,
    other shapes) is refused, naming both: the file with what it was made for, and `what`. Returns
    the model."""
    prefix, weights, metadata = read_lora(path)
    layers = dict(model.named_modules())
    for key in (k for k in weights if k.endswith(".lora_A.weight")):
        name = key[len(prefix) + 1:-len(".lora_A.weight")]
        A, B = weights[key].float(), weights[key.replace(".lora_A.", ".lora_B.")].float()
        layer = layers.get(name)
        if not isinstance(layer, nn.Linear) or layer.weight.shape != (B.shape[0], A.shape[1]):
            found = (f"{tuple(layer.weight.shape)}" if isinstance(layer, nn.Linear)
                     else "no such Linear layer")
            raise UsageError(f"the LoRA {path} (made for "
                             f"{metadata.get('made_for', 'an unnamed model')}) does not fit "
                             f"{what}: its layer {name} is {(B.shape[0], A.shape[1])}, "
                             f"here {found}")
        layer.weight.copy_(layer.weight.float() + scale * (B @ A).to(layer.weight.device))
    return model


def trained_state(model):
    """What a checkpoint keeps of `model`: its state dict, or, when it carries LoRA adapters, the
    adapters alone (its base is the --pretrained weights, loaded again on --resume)."""
    sd = model.state_dict()
    lora = any(isinstance(m, LoRALinear) for m in model.modules())
    return {k: v for k, v in sd.items() if ".lora_" in k} if lora else sd


def load_trained(model, sd, what):
    """The inverse of trained_state: exactly the weights this run trains, else a CheckpointError."""
    expected = trained_state(model).keys()
    if set(sd) != set(expected):
        raise CheckpointError(f"{what} holds other weights than this run trains (e.g. "
                              f"{sorted(set(sd) ^ set(expected))[:3]})")
    model.load_state_dict(sd, strict=False)


def weights_fingerprint(module):
    """A short hash of a module's weights: every tensor's name, shape and 64 values spread through
    it (enough to tell two sets of weights apart without hashing gigabytes)."""
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        flat = v.detach().flatten()
        h.update(f"{k}{tuple(v.shape)}".encode())
        h.update(flat[::max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def disk_cached(stem, key, build, rt):
    """build()'s result (a dict of tensors, lists and numbers) computed once and kept on disk, at
    `{stem}-{hash of key}.pt`, where `key` (JSON-able) names everything that produced it: the data,
    the frozen models (weights_fingerprint), the sizes. A re-run or --resume with the same key reads
    the file instead. Rank 0 builds and writes it (atomically), the other ranks wait and read it.
    Returns (result, path, whether it was built now)."""
    path = f"{stem}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.pt"
    built = not os.path.exists(path)
    if built and rt.master:
        result = build()
        atomic_write(path, lambda tmp: torch.save(result, tmp))
    if rt.ddp:
        dist.barrier()
    if not (built and rt.master):  # the builder keeps its result: no second copy read back
        result = torch.load(path, map_location="cpu", weights_only=True)
    return result, path, built

# -----------------------------------------------------------------------------
# data order: exact resume, hold-out split


def sizes_of(dataset):
    """The (width, height) of every item of a map-style dataset of images of varying sizes (an
    ImageFolder with aspect-ratio buckets, the stages' caches of one), via Subsets; else None."""
    if isinstance(dataset, torch.utils.data.Subset):
        sizes = sizes_of(dataset.dataset)
        return sizes and [sizes[i] for i in dataset.indices]
    return getattr(dataset, "sizes", None)


class StepSampler(torch.utils.data.Sampler):
    """Endless index stream that is a pure function of (seed, position): epoch e is randperm(n, seed
    + e), and each rank takes its slice of every global batch. Starting at `start` (= step * global
    batch) makes `--resume` see exactly the batches an uninterrupted run would have seen. The world
    size and --grad_accum only decide who takes which slice, so a resume with another world size
    (and the same --batch_size) continues the same order.

    With `sizes` (aspect-ratio buckets: the image size of each index), the epoch's permutation is
    cut, size by size, into batches of `batch` (= --batch_size) indices, a size's last batch filled
    from its own start, and these batches come in random order: every optimizer step, and each
    micro-batch of it on every rank, is one size."""

    def __init__(self, n, global_batch, seed=0, start=0, rank=0, world_size=1, sizes=None,
                 batch=None):
        self.n, self.gb, self.seed, self.start, self.rank, self.ws = \
            n, global_batch, seed, start, rank, world_size
        self.sizes = sizes if sizes and len(set(sizes)) > 1 else None
        self.batch, self.cached = batch, (None, None)
        self.length = len(self.epoch(0))  # the same for every epoch

    def epoch(self, e):
        if self.cached[0] != e:
            g = torch.Generator().manual_seed(self.seed + e)
            order = torch.randperm(self.n, generator=g).tolist()
            if self.sizes:
                batches = []
                for size in sorted(set(self.sizes)):
                    same = [i for i in order if self.sizes[i] == size]
                    whole = -(-len(same) // self.batch) * self.batch  # filled up to whole batches
                    same = [same[k % len(same)] for k in range(whole)]
                    batches += [same[k:k + self.batch] for k in range(0, len(same), self.batch)]
                shuffled = torch.randperm(len(batches), generator=g).tolist()
                order = [i for b in shuffled for i in batches[b]]
            self.cached = (e, order)
        return self.cached[1]

    def __iter__(self):
        pos, local = self.start, self.gb // self.ws
        while True:
            epoch, offset = divmod(pos, self.length)
            order = self.epoch(epoch)
            # wraps into the epoch's start if short
            batch = [order[(offset + i) % self.length] for i in range(self.gb)]
            yield from batch[self.rank * local:(self.rank + 1) * local]
            pos += self.gb


class Batches:
    """infinite_batches' iterator of micro-batches. A stream of tar shards also hands over each
    loader worker's position after each of its batches; the last one consumed per worker is kept in
    `positions`, and the batches taken in `served`, for the checkpoint (gather_run_state)."""

    def __init__(self, loader, stream=None):
        self.it, self.stream, self.positions, self.served = iter(loader), stream, {}, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.served += 1
        if self.stream is None:
            return batch
        *batch, position = batch
        self.positions[int(position[0])] = position[1:].tolist()
        return batch


def infinite_batches(dataset, batch_size, rt, num_workers=2, seed=0, start_step=0, grad_accum=1,
                     state=None):
    """Micro-batches forever (a Batches). `batch_size` is global: each rank gets batch_size / (world
    * grad_accum). A map-style dataset (a folder) is read in the order of a StepSampler started at
    `start_step`; a stream (tar shards) is split over every rank's loader workers and continues from
    `state` (the checkpoint's "data")."""
    micro = batch_size // (rt.world_size * grad_accum)
    assert micro * rt.world_size * grad_accum == batch_size, \
        f"--batch_size {batch_size} must divide by world size {rt.world_size} x " \
        f"--grad_accum {grad_accum}"
    pin, persistent = rt.device_type == "cuda", num_workers > 0
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.start(seed, micro, rt.rank, rt.world_size, max(1, num_workers), state)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             pin_memory=pin, persistent_workers=persistent)
        return Batches(loader, dataset)
    sampler = StepSampler(len(dataset), micro * rt.world_size, seed, start_step * batch_size,
                          rt.rank, rt.world_size, sizes_of(dataset), batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler,
                                         num_workers=num_workers, pin_memory=pin,
                                         persistent_workers=persistent)
    return Batches(loader)


def resume_batches(dataset, args, rt, step, ckpt, num_workers=None):
    """The training batches from `step` on, then (on --resume) the checkpoint's RNG state. The
    order is a function of the step (exact resume); building the loader draws from the global RNG
    in every run, so the state is restored after it and a resumed run draws the numbers an
    uninterrupted one does (noise, dropout, Stage A's dead-code restarts)."""
    workers = args.num_workers if num_workers is None else num_workers
    batches = infinite_batches(dataset, args.batch_size, rt, workers, args.seed, step,
                               args.grad_accum, ckpt and ckpt.get("data"))
    if ckpt:
        restore_rng(ckpt, rt)
    return batches


def same_size_chunks(dataset, indices, batch_size):
    """`indices` of `dataset` in chunks of at most `batch_size` items of one image size, in index
    order within each size (one chunk list per size, sizes in order of first appearance)."""
    groups, sizes = {}, sizes_of(dataset)
    for i in indices:
        groups.setdefault(sizes[i] if sizes else None, []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def same_size_batches(dataset, batch_size, num_workers=2):
    """The whole dataset once, in index order within each image size, as (indices, batch) pairs of
    at most `batch_size` items of one size (to encode a dataset up front: the stages' --cache)."""
    indices = same_size_chunks(dataset, range(len(dataset)), batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=indices, num_workers=num_workers)
    return zip(indices, loader)


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


class Progress:
    """What a user sees of a training loop, and its cadence: a tqdm bar (rank 0), the log line every
    --log_every steps with the images per second since the last one, and whether a step is due a
    preview (--sample_every) or a checkpoint (--save_every); the last step is due all three."""

    def __init__(self, args, rt, logger, step, desc):
        from tqdm import tqdm
        self.args, self.rt, self.logger = args, rt, logger
        self.bar = (tqdm(total=args.max_steps, initial=step, desc=desc, dynamic_ncols=True)
                    if rt.master else None)
        self.t0, self.seen = time.time(), 0

    def count(self, n):
        """n more training images on this rank (every rank sees as many)."""
        self.seen += n * self.rt.world_size

    def step(self, step):
        """After the optimizer step that makes `step` steps: (log, preview, checkpoint) due now."""
        if self.bar:
            self.bar.update(1)
        a, last = self.args, step == self.args.max_steps
        return tuple(step % every == 0 or last
                     for every in (a.log_every, a.sample_every, a.save_every))

    def log(self, step, metrics, lr, skipped=0):
        self.logger.log(log_line(step, self.args.max_steps, metrics, lr,
                                 self.seen / (time.time() - self.t0), skipped))
        self.t0, self.seen = time.time(), 0

    def close(self, done=None):
        """End of training: the bar closes, `done: ...` is logged, DDP's process group ends."""
        if self.bar:
            self.bar.close()
        if done is not None:
            self.logger.log(f"done: {done}")
        if self.rt.ddp:
            dist.destroy_process_group()


def log_line(step, max_steps, metrics, lr, img_per_s, skipped=0):
    """The one log format of all stages: `step   120/2000 | loss 0.1234 | ... | lr 1.00e-04 | 12.3
    img/s`, with `skipped N` before the LR once the NonFiniteGuard has skipped N steps."""
    parts = [f"step {step:>6}/{max_steps}"] + [f"{k} {v:.4f}" for k, v in metrics.items()]
    parts += [f"skipped {skipped}"] * (skipped > 0) + [f"lr {lr:.2e}", f"{img_per_s:.1f} img/s"]
    return " | ".join(parts)


def psnr(x, y):
    """Mean PSNR (dB) of images in [0, 1]."""
    mse = ((x.clamp(0, 1) - y.clamp(0, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def save_image_grid(images, path, nrow):
    """Save (N, 3, H, W) images in [0, 1] as one PNG grid."""
    import torchvision
    torchvision.utils.save_image(images.float().clamp(0, 1), path, nrow=nrow, padding=2,
                                 pad_value=1.0)


def save_captioned_grid(images, captions, path, ncol=6):
    """Save (N, 3, H, W) images in [0, 1] as a PNG grid, each caption written under its image."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    H, W = images.shape[-2:]
    per_line = max(8, int(W / (font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)))  # chars/line
    lines = [textwrap.wrap(c, per_line) or [""] for c in captions]
    line_h, pad = font.getbbox("Ag")[3] + 2, 4
    band = line_h * max(len(l) for l in lines) + pad  # text height under every image
    nrow = math.ceil(len(images) / ncol)
    grid = Image.new("RGB", (ncol * (W + pad) + pad, nrow * (H + band + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.float().clamp(0, 1).mul(255).round().byte()
              .permute(0, 2, 3, 1).cpu().numpy())  # (N, H, W, 3)
    for i, (img, text) in enumerate(zip(pixels, lines)):
        x0, y0 = pad + (i % ncol) * (W + pad), pad + (i // ncol) * (H + band + pad)
        grid.paste(Image.fromarray(img), (x0, y0))
        for j, line in enumerate(text):
            draw.text((x0 + 1, y0 + H + 2 + j * line_h), line, fill="black", font=font)
    grid.save(path)
