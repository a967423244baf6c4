"""
The training machinery every stage shares, written once (nanochat's common.py): where and how we
run (device, DDP, precision, BatchNorm over ranks), the common flags and the opening of every
train(), LR and EMA, the optimizer step with its non-finite guard, atomic self-describing
checkpoints never written from non-finite weights, weight files, and what users see of a run (the
log line, the progress bar, the log / preview / checkpoint cadence, image grids).

The method lives in the stage files; nothing here is specific to one of them.
"""
import argparse
import datetime
import gc
import json
import math
import os
import sys
import tempfile
import textwrap
import time
import zipfile
from contextlib import contextmanager, nullcontext
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


def frozen(model, device, dtype=torch.float32):
    """A model for inference only: on `device` in `dtype`, eval mode, no gradients."""
    return model.to(device, dtype).eval().requires_grad_(False)


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line as run_cli prints a UsageError: `script.py:
    error: argument --batch_size: must be a positive integer, not 0`, exit status 2 (-h has the
    usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")  # a subcommand's too


def flag_type(convert, ok, allowed):
    """An argparse type: `convert` the text, then refuse a value that is not ok(value) with a
    message saying what is `allowed` (argparse prefixes the flag's name)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, not {text}")
        return value
    parse.__name__ = allowed  # what argparse names in its own messages
    return parse


positive_int = flag_type(int, lambda v: v > 0, "a positive integer")
nonnegative_int = flag_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = flag_type(float, lambda v: 0 < v < math.inf, "a positive number")
nonnegative_float = flag_type(float, lambda v: 0 <= v < math.inf, "a number >= 0")
probability = flag_type(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
finite_float = flag_type(float, math.isfinite, "a finite number")
decay = flag_type(float, lambda v: 0 <= v < 1, "in [0, 1)")  # AdamW's beta2, the EMA's decay
aspect_ratio = flag_type(float, lambda v: v == 0 or 1 <= v < math.inf, "0 (off) or a ratio >= 1")


def existing_folder(text):
    """An argparse type: a folder that exists ("" passes: --pretrained's Hugging Face cache)."""
    if text and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return text


def device_name(text):
    """--device: auto, or a device torch knows that this machine has (an argparse type)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text} is not a device: auto, cpu, cuda, cuda:N or "
                                         f"mps") from None
    count = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available()),
             "cpu": 1}.get(device.type, 0)
    if count <= (device.index or 0):
        raise argparse.ArgumentTypeError(f"{text}: this machine has {count} {device.type} "
                                         f"device(s); --device auto picks what there is")
    return text


def check_multiple(flag, value, multiple, needs):
    """Refuse a size `value` of `flag` that is not a multiple of `multiple` (which `needs` says
    why), naming the nearest that works."""
    if value is not None and value % multiple:
        nearest = max(multiple, multiple * round(value / multiple))
        raise UsageError(f"{flag} {value}: {needs} needs a multiple of {multiple}; the nearest is "
                         f"{nearest}")


def check_output_dir(path, flag):
    """Refuse, before any work, an output folder that cannot be made or written: a file, or a
    place without write access (tried by making and removing a folder in it: nothing is left)."""
    parent = path
    while parent and not os.path.exists(parent):  # the nearest folder that exists
        parent = os.path.dirname(parent.rstrip(os.sep))
    parent = parent or "."
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from None


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
    g.add_argument("--max_steps", type=positive_int, default=None,
                   help="optimizer steps (default: per preset)")
    g.add_argument("--batch_size", type=positive_int, default=None, help="global batch size, split "
                   "over ranks and --grad_accum (default: per preset)")
    g.add_argument("--grad_accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--image_size", type=positive_int, default=None,
                   help="training resolution (default: per preset)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: per preset)")
    g.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="linear LR warm-up steps (default: per preset)")
    g.add_argument("--beta2", type=decay, default=None, help="AdamW beta2 (default: per preset)")
    g.add_argument("--weight_decay", type=nonnegative_float, default=0.01,
                   help="AdamW weight decay")
    g.add_argument("--grad_clip", type=nonnegative_float, default=1.0,
                   help="clip the global gradient norm to this (0 = off)")
    g.add_argument("--ema_decay", type=decay, default=None, help="EMA decay per optimizer step, "
                   "0 = no EMA (default: 0.999; 0 when fine-tuning)")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    g.add_argument("--device", default="auto", type=device_name,
                   help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bf16 on GPUs that support it, else fp16 "
                   "(+GradScaler); fp32 on CPU")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    g.add_argument("--log_every", type=positive_int, default=25, help="steps between log lines")
    g.add_argument("--sample_every", type=positive_int, default=500,
                   help="steps between preview grids")
    g.add_argument("--save_every", type=positive_int, default=500,
                   help="steps between checkpoints")
    g.add_argument("--num_workers", type=nonnegative_int, default=2,
                   help="data loader worker processes")
    g.add_argument("--num_holdout", type=positive_int, default=16,
                   help="images held out of training for previews and metrics")
    g.add_argument("--buckets", type=aspect_ratio, nargs="?", const=2.0, default=0.0,
                   metavar="MAX_RATIO",
                   help="aspect-ratio buckets: keep each image's aspect ratio, in batches of one "
                   "of a few sizes of about --image_size^2 pixels, sides multiples of 128, aspect "
                   "ratios up to MAX_RATIO (2 when given alone); 0 = square centre crops")
    g.add_argument("--shuffle_buffer", type=positive_int, default=1000,
                   help="tar shards: samples shuffled together (per loader worker; memory: their "
                   "encoded bytes)")
    g.add_argument("--max_nonfinite", type=positive_int, default=5,
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
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    check_run(args, stage, ckpt_path)
    ckpt = load_checkpoint(ckpt_path, stage) if args.resume else None
    train_defaults = {"ema_decay": 0.999, "seed": 0} | train_defaults  # a fine-tune's EMA: 0
    if ckpt:  # flags left out continue as the run was trained (batch size, lr, steps, ...)
        fill_defaults(args, {k: ckpt["train_config"].get(k) for k in train_defaults})
    if getattr(args, "epochs", None):  # sets --max_steps once the data is open (epochs_to_steps)
        train_defaults = {k: v for k, v in train_defaults.items() if k != "max_steps"}
    fill_defaults(args, train_defaults)
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    check_multiple("--batch_size", args.batch_size, world * args.grad_accum,
                   f"splitting it over {world} process(es) x --grad_accum {args.grad_accum}")
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


def check_run(args, stage, ckpt_path):
    """What a training run's flags name, checked before anything is built or written: the output
    folder (writable; its checkpoint is continued with --resume, never overwritten without it) and
    the checkpoints of the earlier stages it trains on (--stage_a, --stage_b; unused with
    --pretrained)."""
    check_output_dir(args.out_dir, "--out_dir")
    data, out = (os.path.join(os.path.abspath(p), "") for p in (args.data, args.out_dir))
    if os.path.isdir(args.data) and out.startswith(data):
        raise UsageError(f"--out_dir {args.out_dir} is inside --data {args.data}: its preview "
                         f"grids would be read as training images; give another --out_dir")
    if getattr(args, "lora_alpha", None) and not args.lora_rank:
        raise UsageError("--lora_alpha scales the adapters of --lora_rank: give --lora_rank")
    if args.resume and not os.path.exists(ckpt_path):
        raise UsageError(f"--resume: there is no {ckpt_path} to continue; leave out --resume to "
                         f"start a run in {args.out_dir}")
    if not args.resume and os.path.exists(ckpt_path):
        step = load_checkpoint(ckpt_path, stage, mmap=True)["step"]
        raise UsageError(f"--out_dir {args.out_dir} holds a {stage} run ({ckpt_path}, step "
                         f"{step}): --resume continues it; to start over, delete it or give "
                         f"another --out_dir")
    if getattr(args, "pretrained", None) is None:
        for flag in ("stage_a", "stage_b"):
            if getattr(args, flag, None):
                load_checkpoint(getattr(args, flag), flag, mmap=True)  # missing or wrong: said now


def run_cli(main, args):
    """Run a script's main(args). A user's mistake (a missing or wrong file, flags that do not go
    together, data that cannot be read) prints its one-line message, as argparse's errors
    (ArgumentParser), and exits with status 2; a run stopped by non-finite training (its last
    checkpoint kept) prints its line and exits with status 1. Anything else is a bug: its
    traceback shows."""
    try:
        main(args)
    except (FileNotFoundError, UsageError, NonFiniteError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, NonFiniteError) else 2)

# -----------------------------------------------------------------------------
# optimisation: LR, EMA, the guarded optimizer step


def get_lr(step, lr, warmup):
    """Linear warm-up to `lr`, then constant (method §6.5). A pure function of the step: resume
    needs nothing else."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def ema_and_optimizer(model, args):
    """The EMA copy of `model` (--ema_decay 0, as fine-tuning: none, the model itself) and AdamW
    over what is trained: all weights, or LoRA adapters. Returns (ema, trained params, opt)."""
    ema = deepcopy(model).eval().requires_grad_(False) if args.ema_decay else model
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, args.beta2),
                            weight_decay=args.weight_decay)
    return ema, trained, opt


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


@contextmanager
def eval_mode(module):
    """`module` in eval mode for a block, then back in its mode: a measurement during training
    (held-out metrics, scale_factor, the latent space) sees the model as it is used after, with its
    BatchNorm running statistics, and moves none of them; no BatchNorm collective runs on one rank
    alone. (Without an EMA, --ema_decay 0, the model measured is the one training.)"""
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


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
               "paella": "python stage_b_paella.py --data DIR",
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
    --log_every steps with the images per second since the last one, a preview every
    --sample_every steps and a checkpoint every --save_every (the last step does all three):
    end_step is the tail of every stage's training step, written once."""

    def __init__(self, args, rt, logger, step, desc):
        from tqdm import tqdm
        self.args, self.rt, self.logger = args, rt, logger
        self.bar = (tqdm(total=args.max_steps, initial=step, desc=desc, dynamic_ncols=True)
                    if rt.master else None)
        self.t0, self.seen = time.time(), 0
        self.metrics = {}  # the last preview's, saved with every checkpoint

    def count(self, n):
        """n more training images on this rank (every rank sees as many)."""
        self.seen += n * self.rt.world_size

    def end_step(self, step, metrics, lr, skipped, batches, save, preview=None, prepare=None):
        """After the optimizer step that makes `step` steps: the bar; when due, the log line
        (metrics(): {name: value}, called only then, so values stay on the device between log
        lines), on rank 0 `prepare()` (e.g. the EMA's BatchNorm statistics) before a preview or a
        checkpoint, the preview (`preview()` returns its metrics), and the checkpoint:
        gather_run_state is a collective, so every rank takes part; rank 0 calls
        save(self.metrics, run_state)."""
        if self.bar:
            self.bar.update(1)
        a, last = self.args, step == self.args.max_steps
        log, show, keep = (step % every == 0 or last
                           for every in (a.log_every, a.sample_every, a.save_every))
        if log:
            self.logger.log(log_line(step, a.max_steps, metrics(), lr,
                                     self.seen / (time.time() - self.t0), skipped))
            self.t0, self.seen = time.time(), 0
        if self.rt.master and prepare and ((show and preview) or keep):
            prepare()
        if self.rt.master and show and preview:
            self.metrics = preview()
        if keep:
            run_state = gather_run_state(self.rt, batches)  # every rank: RNG state, stream position
            if self.rt.master:
                save(self.metrics, run_state)

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
    band = line_h * max(len(wrapped) for wrapped in lines) + pad  # text height under every image
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
