"""
bench.py: our Stages A, B and C against the implementation users would otherwise pick (diffusers'
Würstchen modules: PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior + DDPMWuerstchenScheduler),
side by side.

For every stage: build the reference module with random weights (zero-initialised parameters
randomised too, so the work and the parity check are real), `save_pretrained` it to a temporary
folder, load ours with `from_pretrained` (the same weights), check that the outputs agree, then time
  - a training step: forward + backward + AdamW step, train mode (dropout as the method has it), and
  - a sampling step: one forward under no_grad, eval mode,
for both, alternating reference and ours after a warm-up, and print median times and the ratio
reference / ours. `chain` times the whole text-embeddings -> Stage C -> Stage B -> Stage A sampling
chain (our ddpm_sample vs a plain loop over the diffusers modules and DDPMWuerstchenScheduler, same
steps, same noise). `flops` counts the FLOPs per training image of the paper models at their latent
sizes (the paper's efficiency argument).

    python bench.py                           # CPU: the same architectures at reduced width/depth,
                                              # fp32, a few minutes; GPU: the paper configs at real
                                              # shapes, bf16 autocast, with FLOPs per step, TFLOP/s,
                                              # fraction of peak (--peak_tflops) and peak memory
    python bench.py --stages c --repeats 21   # one stage, more samples
    python bench.py --threads 1 --timer cpu   # CPU time of one thread: steady on a busy machine
    python bench.py --malloc default          # glibc's allocator as it comes (keep_freed_memory)
    python bench.py --stages b --b "dict(blocks=[2, 2, 6, 2])" --b_latent 128   # sizes are flags

CPU timings on a shared machine are noisy: the runs alternate and we report medians, but rerun
before trusting a difference of a few percent. diffusers is a bench/test dependency only (pip
install -r requirements-test.txt).
"""
import argparse
import ctypes
import dataclasses
import os
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from blocks import LATENT_DIM_SCALE, RELEASED_LATENT_SPACE
from common import (ArgumentParser, Runtime, device_name, nonnegative_float, nonnegative_int,
                    pick_device, positive_float, positive_int, run_cli)
from data import infinite_batches
from diffusion import DEFAULT_STAGE_C_TIMESTEPS, ddpm_sample
from finetune import LORA_TARGETS, add_lora
from stage_a import StageA
from stage_b import PRESETS as STAGE_B_PRESETS
from stage_b import StageB, StageBConfig
from stage_c import PRESETS as STAGE_C_PRESETS
from stage_c import StageC

PAPER_C = STAGE_C_PRESETS["paper"]["model"]  # the released prior's config

# -----------------------------------------------------------------------------
# default sizes: the reference constructors' keyword arguments (diffusers names) and input shapes

DEFAULTS = {
    # CPU: the paper architectures' structure (levels, block patterns, attention, effnet injection,
    # dropout 0.1) at reduced width and depth, and smaller latents for Stage B, so the whole bench
    # runs in minutes on 2 cores
    "cpu": dict(
        a=dict(embed_dim=128, bottleneck_blocks=4, levels=2, latent_channels=4,
               num_vq_embeddings=8192),
        a_image=128, a_batch=4,
        b=dict(c_hidden=[64, 128, 256, 256], nhead=[-1, 2, 4, 4], blocks=[1, 1, 3, 1], c_cond=256,
               clip_embd=256, level_config=["CT", "CTA", "CTA", "CTA"],
               inject_effnet=[False, True, True, True], dropout=0.1),
        b_latent=64, b_effnet=6, b_batch=2,
        c=dict(c_in=16, c=384, c_cond=256, depth=4, nhead=6, dropout=0.1),
        c_latent=24, c_batch=2,
        chain_b_steps=12, chain_batch=1,
    ),
    # GPU: the released configurations at real shapes (1024 px: Stage C 16x24x24, Stage B 4x256x256)
    "cuda": dict(
        a=dict(),  # PaellaVQModel defaults = the released vqgan (18.4 M), its 256 px training size
        a_image=256, a_batch=16,
        b=dict(),  # WuerstchenDiffNeXt defaults = the released decoder (1.06 B params)
        b_latent=256, b_effnet=24, b_batch=2,
        c=dict(c_in=16, c=1536, c_cond=1280, depth=32, nhead=24, dropout=0.1),  # v2 prior (994 M)
        c_latent=24, c_batch=8,
        chain_b_steps=12, chain_batch=1,
    ),
}

# -----------------------------------------------------------------------------
# helpers


def random_weights_(model, seed):
    """Fill every floating-point parameter/buffer with seeded random values: std fan_in^-1/2 for
    weight matrices and convs (activations stay O(1)), 0.02 for biases and the parameters the models
    zero-initialise (MixBlock gammas, GRN gamma/beta, TimestepBlock mappers: zeros would make blocks
    identities and parity trivial), a small output head; BatchNorm running_var in [0.5, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                p.zero_()  # e.g. BatchNorm num_batches_tracked (garbage after to_empty)
            elif "running_var" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                zero_init = "gamma" in name or "beta" in name or name.endswith(".mapper.weight")
                scale = 0.02 if p.dim() == 1 or zero_init else fan_in**-0.5
                if name.startswith(("out.", "clf.")):  # keeps Stage C's 1 / |1 - b| tame
                    scale *= 0.02
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@contextmanager
def no_init(cls):
    """Skip a diffusers class's own weight init (quadratic in depth for WuerstchenDiffNeXt); we
    overwrite it."""
    saved = cls.__dict__.get("_init_weights")
    if saved is not None:
        cls._init_weights = lambda self, m: None
    try:
        yield
    finally:
        if saved is not None:
            cls._init_weights = saved


def build_pair(stage, kwargs, seed, tmp):
    """(reference, ours) with the same random weights: the reference is built, randomised and saved
    with save_pretrained; ours loads that folder with from_pretrained, exactly as released weights
    would load."""
    from diffusers.pipelines.deprecated.wuerstchen import (PaellaVQModel, WuerstchenDiffNeXt,
                                                           WuerstchenPrior)
    ref_cls, our_cls = {"a": (PaellaVQModel, StageA), "b": (WuerstchenDiffNeXt, StageB),
                        "c": (WuerstchenPrior, StageC)}[stage]
    with no_init(ref_cls), torch.device("meta"):  # no memory, no init pass: weights drawn below
        ref = ref_cls(**kwargs)
    ref = random_weights_(ref.to_empty(device="cpu"), seed)
    folder = os.path.join(tmp, stage)
    ref.save_pretrained(folder)
    ours = our_cls.from_pretrained(folder)
    return ref, ours


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def check_close(name, ours, ref, rtol, strict=True):
    """max |ours - ref| <= rtol * max |ref| (the parity tests check elementwise; this is the bench's
    sanity check)."""
    ours, ref = ours.float(), ref.float()
    err = (ours - ref).abs().max().item()
    ok = err <= rtol * ref.abs().max().item()
    print(f"  parity {name:<18} max |ours - ref| {err:.2e} "
          f"(max |ref| {ref.abs().max().item():.2e}) {'ok' if ok else 'MISMATCH'}")
    if not ok and strict:
        raise AssertionError(f"{name}: ours and the reference disagree (max abs diff {err:.3e})")


def keep_freed_memory():
    """Keep glibc from handing freed blocks back to the OS (fixed mmap and trim thresholds; Linux).

    By default glibc returns large freed blocks to the OS under a threshold that moves with the
    allocation history, so the next step's tensors of that size pay page faults again, or not:
    timings turn bimodal (the reference's Stage C sampling step here took 160 or 210 ms, run to
    run). With the thresholds fixed, both implementations reuse their memory and the bench compares
    arithmetic. Returns whether it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to fix
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def time_alternating(fns, warmup, repeats, sync, clock=time.perf_counter):
    """Median seconds per call of each fn, timed in alternating order (ref, ours, ours, ref, ...)
    after `warmup` untimed calls each, so slow drifts of a shared machine hit both sides alike.
    clock: wall time by default; time.process_time (--timer cpu) counts only this process's CPU
    time, robust to other processes when the bench runs on one thread (with several, threads
    waiting on each other count too)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0 = clock()
            fns[n]()
            sync()
            times[n].append(clock() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None,
                        **kwargs):
    """Each of the input and weight gradients of a conv costs what its forward costs. (torch's own
    formula ignores `groups` for the weight gradient and counts a depthwise 3x3 conv like a dense
    one: +23% on Stage C.)"""
    from torch.utils.flop_counter import conv_flop_count
    return (conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
            * sum(map(bool, output_mask[:2])))


def cpu_flash_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    """CPU flash attention (not in torch's table, so otherwise uncounted): as the GPU kernels."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn):
    """FLOPs of one call of fn (matmuls, convs, attention), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    fixes = {aten.convolution_backward: conv_backward_flops,
             aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_flops,
             aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=fixes) as counter:
        fn()
    return counter.get_total_flops()


def state_bytes(model, optimizer):
    """Bytes of parameters, gradients and optimizer state: what a training step keeps resident."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()
                                                  if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


# -----------------------------------------------------------------------------
# one stage: parity, then training and sampling steps, reference vs ours


class StageBench:
    """A (reference, ours) pair, their inputs and both step functions (diffusers' API and ours)."""

    def __init__(self, stage, ref, ours, inputs, args):
        self.stage, self.ref, self.ours, self.inputs, self.args = stage, ref, ours, inputs, args
        self.device = torch.device(args.device)
        self.ctx = (nullcontext() if args.dtype == "float32"
                    else torch.autocast(self.device.type, dtype=getattr(torch, args.dtype)))
        # the functions timed; --compile compiles each whole call, as Stage A's are not `forward`
        self.fwd = {n: partial(self.forward, n) for n in ("ref", "ours")}
        self.smp = {n: partial(self.sample, n) for n in ("ref", "ours")}
        if args.compile in ("ours", "both"):
            for n in (("ours",) if args.compile == "ours" else ("ref", "ours")):
                # static shapes: the blocks B and C share would otherwise be recompiled with dynamic
                # shapes when the second stage runs, which inductor (torch 2.14) fails on for Stage
                # B's resizes
                self.fwd[n], self.smp[n] = (torch.compile(f, dynamic=False)
                                            for f in (self.fwd[n], self.smp[n]))

    # the two APIs, one call each: returns (output, extra loss)
    def forward(self, which, x):
        inp = self.inputs
        if self.stage == "a":
            if which == "ref":  # VQGAN training path: encode, quantise (straight-through), decode
                q, vq_loss, _ = self.ref.vquantizer(self.ref.encode(x).latents)
                return self.ref.decode(q).sample, vq_loss
            recon, vq_loss, _ = self.ours(x)
            return recon, vq_loss
        if self.stage == "b":
            if which == "ref":
                return self.ref(x, inp["t"], inp["effnet"], inp["clip"]), 0.0
            return self.ours(x, inp["t"], inp["effnet"], inp["clip"]), 0.0
        if which == "ref":
            return self.ref(x, inp["t"], inp["clip"]), 0.0
        return self.ours(x, inp["t"], inp["clip"]), 0.0

    def sample(self, which, x):
        if self.stage == "a":  # v2 decodes the unquantised latent: encode + decode
            if which == "ref":
                return self.ref.decode(self.ref.encode(x).latents).sample
            return self.ours.decode_raw(self.ours.encode_raw(x))
        return self.forward(which, x)[0]

    def check_parity(self):
        self.ref.eval(), self.ours.eval()
        x = self.inputs["x"][:1]
        saved = {k: v for k, v in self.inputs.items()}
        self.inputs = {k: v[:1] for k, v in self.inputs.items()}
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        # compare in true fp32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.no_grad():
                check_close(f"{self.stage}: sample", self.sample("ours", x), self.sample("ref", x),
                            rtol=1e-4)
                if self.stage == "a":  # the training path as well (quantised)
                    check_close("a: train forward", self.forward("ours", x)[0],
                                self.forward("ref", x)[0], rtol=1e-4)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            self.inputs = saved

    def train_step_fn(self, which, model, opt, eager=False):
        x, target = self.inputs["x"], self.inputs["target"]
        forward = partial(self.forward, which) if eager else self.fwd[which]

        def step():
            with self.ctx:
                out, extra = forward(x)
                loss = F.mse_loss(out.float(), target) + extra
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sample_step_fn(self, which, eager=False):
        x = self.inputs["x"]
        sample = partial(self.sample, which) if eager else self.smp[which]

        @torch.no_grad()
        def step():
            with self.ctx:
                sample(x)
        return step

    def run(self):
        """Rows (stage, mode, ref seconds, our seconds, flops per call or None, memory dict)."""
        args, rows = self.args, []
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        # training: fresh optimizers on both, same hyper-parameters
        self.ref.train(), self.ours.train()
        fused = dict(fused=True) if self.device.type == "cuda" else {}
        # lr 0: AdamW still does all of its work, but the weights stay as loaded, so both sides keep
        # computing with equal weights (the chain's parity check comes later; their dropout draws
        # differ)
        opts = {"ref": torch.optim.AdamW(self.ref.parameters(), lr=0.0, **fused),
                "ours": torch.optim.AdamW(self.ours.parameters(), lr=0.0, **fused)}
        models = {"ref": self.ref, "ours": self.ours}
        fns = {n: self.train_step_fn(n, models[n], opts[n]) for n in ("ref", "ours")}
        fns["ours"]()  # allocates the optimizer state, so counting FLOPs leaves it out
        flops = (count_flops(self.train_step_fn("ours", self.ours, opts["ours"], eager=True))
                 if args.flops else None)
        t = time_alternating(fns, args.warmup, args.repeats, sync, CLOCKS[args.timer])
        mem = ({n: self.peak_memory(fns[n], models[n], opts[n]) for n in fns}
               if self.device.type == "cuda" else {})
        rows.append((self.stage, "train", t["ref"], t["ours"], flops, mem))
        del opts, fns
        for m in models.values():
            m.zero_grad(set_to_none=True)
        # sampling
        self.ref.eval(), self.ours.eval()
        fns = {n: self.sample_step_fn(n) for n in ("ref", "ours")}
        flops = count_flops(self.sample_step_fn("ours", eager=True)) if args.flops else None
        t = time_alternating(fns, args.warmup, args.repeats, sync, CLOCKS[args.timer])
        mem = ({n: self.peak_memory(fns[n], models[n], None) for n in fns}
               if self.device.type == "cuda" else {})
        rows.append((self.stage, "sample", t["ref"], t["ours"], flops, mem))
        return rows

    @staticmethod
    def peak_memory(fn, model, opt):
        """Bytes a step needs on the GPU: the model's resident state (params, grads, AdamW moments)
        plus the step's peak of activations and temporaries (measured above what was allocated
        before it)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        resident = state_bytes(model, opt) if opt is not None else n_params(model) * 4
        return resident + torch.cuda.max_memory_allocated() - before


def make_inputs(stage, args, kwargs, batch, device):
    """Random inputs of the stage's real shapes (noised latent, t, conditioning) and a regression
    target."""
    g = torch.Generator().manual_seed(args.seed + 1)
    if stage == "a":
        x = torch.rand(batch, 3, args.a_image, args.a_image, generator=g)
        inputs = dict(x=x, target=x.clone())
    elif stage == "b":
        n = args.b_latent
        inputs = dict(x=torch.randn(batch, kwargs.get("c_in", 4), n, n, generator=g),
                      t=torch.rand(batch, generator=g),
                      effnet=torch.randn(batch, kwargs.get("effnet_embd", 16), args.b_effnet,
                                         args.b_effnet, generator=g),
                      clip=torch.randn(batch, 77, kwargs.get("clip_embd", 1024), generator=g))
        inputs["target"] = torch.randn(inputs["x"].shape, generator=g)
    else:
        n = args.c_latent
        inputs = dict(x=torch.randn(batch, kwargs.get("c_in", 16), n, n, generator=g),
                      t=torch.rand(batch, generator=g),
                      clip=torch.randn(batch, 77, kwargs.get("c_cond", 1024), generator=g))
        inputs["target"] = torch.randn(inputs["x"].shape, generator=g)
    return {k: v.to(device) for k, v in inputs.items()}


# -----------------------------------------------------------------------------
# the whole sampling chain: text embeddings -> Stage C -> Stage B -> Stage A decode


# e = 42 y - 1
LATENT_SCALE, LATENT_SHIFT = RELEASED_LATENT_SPACE["scale"], RELEASED_LATENT_SPACE["shift"]


def chain_generators(device, seed):
    """One noise generator per diffusion stage: the scheduler draws (and discards) noise at the last
    step, our sampler does not, so a shared stream would drift apart between Stage C and Stage B."""
    return (torch.Generator(device=device).manual_seed(seed),
            torch.Generator(device=device).manual_seed(seed + 1))


@torch.no_grad()
def chain_ours(models, inp, args):
    """Our chain: diffusion.ddpm_sample drives both diffusion stages; Stage A decodes."""
    A, B, C = models
    g_c, g_b = chain_generators(inp["noise_c"].device, args.seed)
    y = ddpm_sample(C, inp["noise_c"], list(DEFAULT_STAGE_C_TIMESTEPS),
                    cond={"clip_text": inp["text_c"]}, uncond={"clip_text": inp["text_c_uncond"]},
                    guidance_scale=args.guidance, generator=g_c)
    effnet = y * LATENT_SCALE - LATENT_SHIFT
    latents = ddpm_sample(B, inp["noise_b"], args.chain_b_steps,
                          cond={"effnet": effnet, "clip_text": inp["text_b"]},
                          generator=g_b)  # no decoder guidance, as in the released pipeline
    return A.decode(latents).clamp(0, 1)


@torch.no_grad()
def chain_reference(models, inp, args):
    """The same chain written against diffusers: WuerstchenPrior and WuerstchenDiffNeXt stepped
    by DDPMWuerstchenScheduler, CFG by batching and lerp, then
    PaellaVQModel.decode(latents * scale_factor)."""
    from diffusers import DDPMWuerstchenScheduler
    A, B, C = models
    g_c, g_b = chain_generators(inp["noise_c"].device, args.seed)
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=list(DEFAULT_STAGE_C_TIMESTEPS), device=inp["noise_c"].device)
    x = inp["noise_c"]
    text = torch.cat([inp["text_c"], inp["text_c_uncond"]])
    for t in scheduler.timesteps[:-1]:
        r = t.expand(x.shape[0])
        eps_text, eps_uncond = C(torch.cat([x, x]), torch.cat([r, r]), text).chunk(2)
        eps = torch.lerp(eps_uncond, eps_text, args.guidance)
        x = scheduler.step(eps, r, x, generator=g_c).prev_sample
    effnet = x * LATENT_SCALE - LATENT_SHIFT
    scheduler.set_timesteps(args.chain_b_steps, device=x.device)
    x = inp["noise_b"]
    for t in scheduler.timesteps[:-1]:
        r = t.expand(x.shape[0])
        x = scheduler.step(B(x, r, effnet, inp["text_b"]), r, x, generator=g_b).prev_sample
    return A.decode(x * A.config.scale_factor).sample.clamp(0, 1)


def bench_chain(pairs, args, sync):
    """Time the whole chain for both implementations (same models, noise and generator seeds)."""
    (ref_a, our_a), (ref_b, our_b), (ref_c, our_c) = pairs["a"], pairs["b"], pairs["c"]
    for m in (ref_a, our_a, ref_b, our_b, ref_c, our_c):
        m.eval()
    g = torch.Generator().manual_seed(args.seed + 2)
    n, h = args.chain_batch, args.b_effnet
    latent = int(h * LATENT_DIM_SCALE)  # the decoder pipeline's: 24x24 semantic -> 256x256 latent
    latent -= latent % 2 ** len(ref_b.config.c_hidden)  # U-Net levels need a multiple of 2^levels
    inp = dict(noise_c=torch.randn(n, 16, h, h, generator=g),
               noise_b=torch.randn(n, 4, latent, latent, generator=g),
               text_c=torch.randn(n, 77, ref_c.config.c_cond, generator=g),
               text_c_uncond=torch.randn(n, 77, ref_c.config.c_cond, generator=g),
               text_b=torch.randn(n, 77, ref_b.config.clip_embd, generator=g))
    inp = {k: v.to(args.device) for k, v in inp.items()}
    ctx = (nullcontext() if args.dtype == "float32"
           else torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype)))
    if args.compile != "none":  # the two diffusion models (Stage A decodes once per chain)
        our_b, our_c = torch.compile(our_b, dynamic=False), torch.compile(our_c, dynamic=False)
        if args.compile == "both":
            ref_b, ref_c = torch.compile(ref_b, dynamic=False), torch.compile(ref_c, dynamic=False)
    fns = {"ref": lambda: chain_reference((ref_a, ref_b, ref_c), inp, args),
           "ours": lambda: chain_ours((our_a, our_b, our_c), inp, args)}
    with ctx:
        # 41 denoising steps in a row: exact in fp32, only reported under bf16 (rounding differs
        # step by step); this parity run is also the timing's warm-up
        check_close("chain: images", fns["ours"](), fns["ref"](), rtol=1e-3,
                    strict=args.dtype == "float32")
        t = time_alternating(fns, 0, args.chain_repeats, sync, CLOCKS[args.timer])
    n_c, n_b = len(DEFAULT_STAGE_C_TIMESTEPS) - 1, args.chain_b_steps
    return [("chain", f"C {n_c} steps (CFG) + B {n_b} + A", t["ref"], t["ours"], None, {})]


# -----------------------------------------------------------------------------
# the paper's efficiency argument: FLOPs per training image, on the meta device (no memory, no time)


def training_flops_per_image(model, *inputs):
    """Forward + backward FLOPs of one training image (batch 1) on 'meta' tensors."""
    model.train()

    def step():
        out = model(*inputs)
        out.float().pow(2).mean().backward()
    return count_flops(step)


def bench_flops():
    rows = []
    with torch.device("meta"):
        c_cfg, b_cfg = PAPER_C, STAGE_B_PRESETS["paper"]["model"]
        stage_c, stage_b = StageC(c_cfg), StageB(b_cfg)
        t = torch.rand(1)
        rows.append(("Stage C (prior), 16x24x24 latent", n_params(stage_c),
                     training_flops_per_image(stage_c, torch.randn(1, 16, 24, 24), t,
                                              torch.randn(1, 77, c_cfg.c_cond))))
        rows.append(("Stage B (decoder), 4x256x256 latent", n_params(stage_b),
                     training_flops_per_image(stage_b, torch.randn(1, 4, 256, 256), t,
                                              torch.randn(1, 16, 24, 24),
                                              torch.randn(1, 77, b_cfg.clip_embd))))
        # the same U-Net on pixels: the cost of training Stage B's architecture at 1024 px directly
        pixel = StageB(StageBConfig(c_in=3, c_out=3))
        rows.append(("Stage B's U-Net on pixels, 3x1024x1024", n_params(pixel),
                     training_flops_per_image(pixel, torch.randn(1, 3, 1024, 1024), t,
                                              torch.randn(1, 16, 24, 24),
                                              torch.randn(1, 77, b_cfg.clip_embd))))
    return rows


# -----------------------------------------------------------------------------
# memory: the largest batch at which the paper-size Stage C trains within a GPU budget (e.g. 24 GB),
# all weights trained (training, a full fine-tune) or LoRA on the frozen prior (--lora_rank)

LORA_RANK = 4  # the memory rows' LoRA: rank 4 on the attention projections (stage_c.py's defaults)


def paper_prior(lora, depth=None):
    """The paper Stage C (at `depth` if given), with LoRA adapters on a frozen base when `lora`."""
    model = StageC(dataclasses.replace(PAPER_C, depth=depth or PAPER_C.depth))
    if lora:
        add_lora(model, LORA_TARGETS, LORA_RANK, LORA_RANK)
    return model


def stage_c_train_step(model, opt, batch, device, dtype):
    """One bf16-autocast training step of Stage C at 16x24x24 (what stage_c.py's train() does per
    micro-step)."""
    x, t = torch.randn(batch, 16, 24, 24, device=device), torch.rand(batch, device=device)
    clip = torch.randn(batch, 77, model.cfg.c_cond, device=device)
    with torch.autocast(device.type, dtype=dtype):
        loss = F.mse_loss(model(x, t, clip).float(), x)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure_memory_cuda(args, budget):
    """Largest power-of-two batch whose training step (AdamW over what trains, bf16 autocast) peaks
    under `budget` bytes, measured, for all weights and for LoRA, without and with activation
    checkpointing."""
    device, rows = torch.device(args.device), []
    for lora, ckpt in ((False, False), (False, True), (True, False), (True, True)):
        model = paper_prior(lora).to(device).train()
        model.grad_checkpointing = ckpt
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=True)
        best, batch, first = None, 1, None
        while batch <= 256:
            torch.cuda.reset_peak_memory_stats()
            try:
                stage_c_train_step(model, opt, batch, device, getattr(torch, args.dtype))
                peak = torch.cuda.max_memory_allocated()
            except torch.OutOfMemoryError:
                peak = float("inf")
            model.zero_grad(set_to_none=True)
            first = first or peak
            if peak > budget:
                break
            best, batch = (batch, peak), batch * 2
        rows.append((lora, ckpt, first, best))
        del model, opt
        torch.cuda.empty_cache()
    return rows


def estimate_memory_cpu(budget):
    """No GPU: bytes saved for the backward pass, measured on CPU under bf16 autocast at the paper
    width with 1 and 2 triples and batches 1 and 2, extrapolated to 32 triples; plus, per parameter
    trained, 18 bytes (fp32 weights, grads and two AdamW moments, and autocast's cached bf16 copy),
    per frozen parameter 4 (fp32 weights; autocast casts them at each use, and the copies the
    backward pass needs are among the saved tensors). For all weights and for LoRA. An estimate:
    allocator slack and temporaries come on top."""

    def saved(lora, depth, batch, ckpt):
        model = paper_prior(lora, depth).train()
        model.grad_checkpointing = ckpt
        storages = {}

        def pack(t):  # count every storage kept for backward once
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stage_c_train_step(model, None, batch, torch.device("cpu"), torch.bfloat16)
        return sum(storages.values())

    def extrapolate(lora, ckpt):  # -> (fixed bytes, bytes per image, bytes per image of one triple)
        s11, s12, s21, s22 = (saved(lora, d, b, ckpt) for d in (1, 2) for b in (1, 2))  # s{d}{b}
        triple = (s22 - s21) - (s12 - s11)
        per_image = (s12 - s11) + (depth - 1) * triple  # the stem and all triples
        return s11 + (depth - 1) * (s21 - s11) - per_image, per_image, triple  # fixed: bf16 copies

    depth, rows = PAPER_C.depth, []
    for lora in (False, True):
        with torch.device("meta"):
            state = sum(p.numel() * (18 if p.requires_grad else 4)
                        for p in paper_prior(lora).parameters())
        fixed, per_image, triple = extrapolate(lora, False)
        fixed_ckpt, per_image_ckpt, _ = extrapolate(lora, True)
        per_image_ckpt += triple  # one triple's activations live while it is recomputed in backward
        for ckpt, fixed_b, image_b in ((False, fixed, per_image),
                                       (True, fixed_ckpt, per_image_ckpt)):
            batch = int((budget - state - fixed_b) // image_b)
            best = (batch, state + fixed_b + batch * image_b) if batch > 0 else None
            rows.append((lora, ckpt, state + fixed_b + image_b, best))
    return rows


# -----------------------------------------------------------------------------
# the data loader: images per second from a folder and from tar shards


def photo_like(side, rng):
    """A side x side RGB image with the spectrum of a photo (1/f noise), so that JPEG decoding costs
    what it costs on photos: ~100 KB at 1024 px in quality 90."""
    f = np.fft.fftfreq(side)
    amplitude = 1 / np.maximum(np.hypot(*np.meshgrid(f, f)), 1 / side)  # (side, side)
    phase = np.exp(2j * np.pi * rng.random((3, side, side)))
    x = np.real(np.fft.ifft2(amplitude * phase))  # (3, side, side)
    x = (x - x.mean()) / x.std() * 50 + 128
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 0))


def bench_loader(args):
    """Images per second that infinite_batches delivers (decode, resize, crop, collate; batches of
    8) from a folder of JPEGs and from the same JPEGs as tar shards of 100, with 0 (the training
    process itself), 1 and 2 loader workers, for (source side, training side) in args.loader_sizes.
    Returns table rows."""
    rows, rng = [], np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for source, side in args.loader_sizes:
            folder = os.path.join(tmp, f"jpg{source}")
            if not os.path.isdir(folder):
                os.makedirs(folder)
                photos = [photo_like(source, rng) for _ in range(10)]  # reused: FFTs are slow
                for i in range(args.loader_images):
                    photos[i % 10].save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
                data.write_shards(folder, folder + "_shards", per_shard=100)
            for kind, path in (("folder", folder), ("shards", folder + "_shards")):
                for workers in (0, 1, 2):
                    a = argparse.Namespace(data=path, image_size=side, buckets=0, batch_size=8,
                                           num_holdout=1, shuffle_buffer=100)
                    trainset, _ = data.open_data(a, verbose=False)
                    batches = infinite_batches(trainset, 8, Runtime(torch.device("cpu")), workers)
                    for _ in range(2 + workers):  # warm-up: workers started, one batch each
                        next(batches)
                    n, t0 = 0, time.perf_counter()
                    while n < args.loader_images // 2 or time.perf_counter() - t0 < 2:
                        n += len(next(batches)[0])
                    rows.append((kind, source, side, workers, n / (time.perf_counter() - t0)))
                    del batches  # stops its workers
    return rows


# -----------------------------------------------------------------------------
# main


def fill_defaults(args):
    """Flags left unset take the CPU or GPU defaults of the chosen device."""
    args.device = pick_device(args.device)
    preset = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.stages is None:
        args.stages = "a,b,c,chain,flops" + (",memory" if args.device.startswith("cuda") else "")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def fmt_row(stage, mode, t_ref, t_ours, flops, mem, args):
    line = (f"| {stage:<5} | {mode:<26} | {t_ref * 1e3:10.1f} | {t_ours * 1e3:10.1f} "
            f"| {t_ref / t_ours:6.2f} |")
    if flops:
        unit = 1e12 if args.device.startswith("cuda") else 1e9  # TFLOP/s on a GPU, GFLOP/s on a CPU
        line += (f" {flops / 1e9:10.1f} | {flops / t_ref / unit:7.1f} "
                 f"| {flops / t_ours / unit:7.1f} |")
        if args.device.startswith("cuda"):
            line += f" {flops / t_ours / 1e12 / args.peak_tflops:6.1%} |"
    if mem:
        line += f" {mem['ref'] / 2**30:6.1f} | {mem['ours'] / 2**30:6.1f} |"
    return line


def print_table(rows, args):
    """The timing table: one row per stage and step."""
    head = "| stage | step                       |   ref (ms) |  ours (ms) | ref/ours |"
    if args.flops:
        rate = "TFLOP/s" if args.device.startswith("cuda") else "GFLOP/s"
        head += f" GFLOP/step | ref {rate} | ours {rate} |"
        head += " ours MFU |" if args.device.startswith("cuda") else ""
    if args.device.startswith("cuda"):
        head += " ref mem (GiB) | ours mem (GiB) |"
    print("\n" + head)
    print("|" + "|".join("---" for _ in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(fmt_row(*r, args))


def main(args):
    args = fill_defaults(args)
    malloc = "fixed" if args.malloc == "fixed" and keep_freed_memory() else "default"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # TF32 for fp32 outside autocast: the usual GPU setting
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    stages = args.stages.split(",")
    print(f"bench: device {args.device}, dtype {args.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, warm-up {args.warmup}, repeats {args.repeats} (medians of "
          f"{args.timer} time, alternating), {malloc} malloc thresholds")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows, pairs = [], {}
    kwargs = {"a": args.a, "b": args.b, "c": args.c}
    batch = {"a": args.a_batch, "b": args.b_batch, "c": args.c_batch}
    needed = sorted({"a", "b", "c"} & set(stages)
                    | ({"a", "b", "c"} if "chain" in stages else set()))
    if "loader" in stages:
        print("\n| data | source side | training side | loader workers | images/s |")
        print("|---|---|---|---|---|")
        for kind, source, side, workers, rate in bench_loader(args):
            print(f"| {kind} | {source} | {side} | {workers} | {rate:.0f} |")
    with tempfile.TemporaryDirectory() as tmp:
        for i, stage in enumerate(needed):
            ref, ours = build_pair(stage, kwargs[stage], args.seed + i, tmp)
            ref, ours = ref.to(args.device), ours.to(args.device)
            pairs[stage] = (ref, ours)
            print(f"stage {stage}: {n_params(ours) / 1e6:.1f} M params, "
                  f"config {kwargs[stage] or 'released'}")
            if stage not in stages:
                continue
            sb = StageBench(stage, ref, ours,
                            make_inputs(stage, args, kwargs[stage], batch[stage], args.device),
                            args)
            sb.check_parity()
            rows += sb.run()
    if "chain" in stages:
        rows += bench_chain(pairs, args, sync)
    del pairs

    if rows:
        print_table(rows, args)
    print(f"\ncommand: python bench.py {shlex.join(sys.argv[1:])}".rstrip())
    if "memory" in stages:
        budget = args.mem_budget_gb * 2**30
        cuda = args.device.startswith("cuda")
        how = "measured" if cuda else "estimated on CPU (saved tensors, extrapolated)"
        print(f"\nPaper Stage C (994 M params) training, AdamW, bf16 autocast, 16x24x24 (1024 px), "
              f"within {args.mem_budget_gb:g} GB: {how}")
        print("| trained | activation checkpointing | peak at batch 1 (GiB) | largest batch "
              "| its peak (GiB) |\n|---|---|---|---|---|")
        for lora, ckpt, first, best in (measure_memory_cuda(args, budget) if cuda
                                        else estimate_memory_cpu(budget)):
            batch, peak = best if best else ("none fits", float("nan"))
            trained = f"LoRA rank {LORA_RANK} (attention)" if lora else "all weights"
            print(f"| {trained} | {'yes' if ckpt else 'no'} | {first / 2**30:.1f} | {batch} "
                  f"| {peak / 2**30:.1f} |")
    if "flops" in stages:
        print("\nFLOPs per training image (forward + backward, batch 1), paper configs, counted on "
              "the meta device:")
        print("| model | params | TFLOP / image | vs Stage C |\n|---|---|---|---|")
        flops_rows = bench_flops()
        base = flops_rows[0][2]
        for name, n, f in flops_rows:
            print(f"| {name} | {n / 1e6:,.0f} M | {f / 1e12:.3f} | {f / base:.1f}x |")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stages", type=stage_list, default=None,
                   help="comma-separated subset of a,b,c,chain,flops,memory,loader (default: all "
                   "but loader; memory, a CPU estimate taking a minute there, only on a GPU)")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--warmup", type=nonnegative_int, default=2,
                   help="untimed steps of each implementation before timing")
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="timed steps of each implementation (median reported)")
    p.add_argument("--chain_repeats", type=positive_int, default=3,
                   help="timed runs of the whole sampling chain each")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--threads", type=nonnegative_int, default=0,
                   help="torch CPU threads (0 = torch's default)")
    p.add_argument("--timer", default="wall", choices=["wall", "cpu"],
                   help="wall clock, or this process's CPU time (robust on a busy machine with "
                   "--threads 1)")
    p.add_argument("--compile", default="none", choices=["none", "ours", "both"],
                   help="torch.compile the timed steps of ours, or of both (the fair comparison)")
    p.add_argument("--malloc", default="fixed", choices=["fixed", "default"],
                   help="fixed: freed memory stays in the process (steady timings, see "
                   "keep_freed_memory); default: glibc as it comes, where tensors the size of full "
                   "attention matrices may pay page faults")
    p.add_argument("--no_flops", dest="flops", action="store_false",
                   help="skip counting the FLOPs of each timed step (one extra step each)")
    p.add_argument("--mem_budget_gb", type=positive_float, default=24.0,
                   help="GPU memory budget (GiB) of the `memory` stage, for allocated tensors "
                   "(CUDA context on top)")
    p.add_argument("--peak_tflops", type=positive_float, default=989.0,
                   help="the device's dense peak for --dtype, for the MFU column (H100 SXM bf16: "
                   "989)")
    # sizes (unset: the CPU or GPU DEFAULTS); model kwargs use diffusers' constructor names
    p.add_argument("--a", type=eval_dict, default=None,
                   help="PaellaVQModel kwargs, e.g. \"dict(embed_dim=96)\"")
    p.add_argument("--a_image", type=positive_int, default=None,
                   help="Stage A image side in pixels")
    p.add_argument("--a_batch", type=positive_int, default=None, help="Stage A batch size")
    p.add_argument("--b", type=eval_dict, default=None,
                   help="WuerstchenDiffNeXt kwargs, e.g. \"dict(blocks=[1,1,2,1])\"")
    p.add_argument("--b_latent", type=positive_int, default=None,
                   help="Stage B latent side (256 for 1024 px images)")
    p.add_argument("--b_effnet", type=positive_int, default=None,
                   help="semantic latent side fed to Stage B (24 at 1024 px); also the Stage C "
                   "latent side in the chain")
    p.add_argument("--b_batch", type=positive_int, default=None, help="Stage B batch size")
    p.add_argument("--c", type=eval_dict, default=None,
                   help="WuerstchenPrior kwargs, e.g. \"dict(c=256, depth=2)\"")
    p.add_argument("--c_latent", type=positive_int, default=None,
                   help="Stage C latent side (24 for 1024 px images)")
    p.add_argument("--c_batch", type=positive_int, default=None, help="Stage C batch size")
    p.add_argument("--chain_b_steps", type=positive_int, default=None,
                   help="Stage B sampling steps in the chain (pipeline: 12)")
    p.add_argument("--chain_batch", type=positive_int, default=None, help="images per chain run")
    p.add_argument("--guidance", type=nonnegative_float, default=4.0,
                   help="Stage C classifier-free guidance scale in the chain")
    p.add_argument("--loader_sizes", type=size_pairs,
                   default=[(256, 256), (1024, 256), (1024, 1024)],
                   help="loader stage: (source image side, training side) pairs")
    p.add_argument("--loader_images", type=positive_int, default=200,
                   help="loader stage: JPEGs written per source side")
    return p.parse_args(argv)


STAGES = ("a", "b", "c", "chain", "flops", "memory", "loader")


def stage_list(text):
    """--stages: a comma-separated subset of STAGES (an argparse type)."""
    unknown = [s for s in text.split(",") if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: not one of {','.join(STAGES)}")
    return text


def python_value(text):
    """A Python expression from the command line, e.g. "[(256, 256)]" (an argparse type: a typo is
    one line naming the flag, not a traceback)."""
    try:
        return eval(text, {"dict": dict})
    except Exception as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python value "
                                         f"({type(e).__name__}: {e})") from None


def size_pairs(text):
    """--loader_sizes: a list of (source side, training side) pairs of positive integers."""
    value = python_value(text)
    if not (isinstance(value, (list, tuple)) and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(s, int) and s > 0 for s in pair) for pair in value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of (source side, training side) "
                                         f"pairs, e.g. \"[(256, 256), (1024, 256)]\"")
    return value


def eval_dict(s):
    """A dict literal from the command line, e.g. "dict(c=256, depth=2)" or "{'c': 256}"."""
    value = python_value(s)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{s!r} is not a dict")
    return value


if __name__ == "__main__":
    run_cli(main, get_args())
