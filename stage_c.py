"""
Stage C of Würstchen: the text-conditional diffusion prior (paper §3 "Stage C", method.md §5-7).

Stage C is where text meets image. It learns p(y | text) in the 42x-compressed semantic space of
Stage B's frozen semantic compressor: y = (e + shift) / scale, e = compressor(image)
(B, 16, H/42.67, W/42.67), i.e. 16 x 24 x 24 for a 1024 px image (16 x 3 x 3 for the 128 px toy
images). It is a stack of ConvNeXt / timestep / attention blocks without any down-sampling,
trained with Stage B's P2-weighted noise-prediction loss.

    prompt --CLIP text--> (B, 77, c_cond) --Stage C, DDPM + CFG--> y (B, 16, h, w)
           --e = y * scale - shift--> Stage B --> Stage A decode --> image (B, 3, H, W)

Run it (after Stages A and B, whose checkpoints it reads from out/stage_a and out/stage_b):
    python stage_c.py --data toy --model tiny            # CPU, a few minutes
    python stage_c.py --data ./imgs                      # one GPU, default 'small' preset
    torchrun --standalone --nproc_per_node=8 stage_c.py --data ./imgs --model paper \\
        --grad_checkpointing
Fine-tune the released prior (or our export) on a folder, all weights or LoRA adapters (one GPU):
    python stage_c.py --data ./imgs --pretrained weights/ [--lora_rank 16]
"""
import argparse
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from blocks import (RESOLUTION_MULTIPLE, AttnBlock, LayerNorm2d, ResBlock, TimestepBlock,
                    dome272_init, r_embedding, to_stage_b_space, to_stage_c_space)
from cache import cache_stage_c
from common import (ArgumentParser, HelpFormatter, NonFiniteGuard, Progress, UsageError,
                    add_common_args, channels_last_convs, ema_and_optimizer, ema_decay_at,
                    eval_mode, free_memory, frozen, get_lr, load_checkpoint, load_exact,
                    load_weights_file, no_sync, nonnegative_float, nonnegative_int, positive_int,
                    preset_name, probability, read_json, run_cli, save_captioned_grid,
                    save_checkpoint, set_lr, start_run, update_ema, wrap_ddp)
from data import check_data, holdout_batch, open_data, resume_batches, sizes_of
from decoders import load_decoder
from diffusion import (DEFAULT_STAGE_C_TIMESTEPS, caption_dropout, ddpm_sample, diffusion_loss,
                       drop_captions, randn)
from finetune import (LORA_FILE, add_finetune_args, add_lora_from_args, finetune_defaults,
                      load_trained, plan_epochs, refuse_lora_checkpoint, save_lora, trained_state)
from images import SIDE_MULTIPLE
from metrics import preview_scores
from pretrained import dome272_to_diffusers, open_released
from stage_a import StageA, load_stage_a
from stage_b import SemanticCompressor, StageB, load_stage_b
from text_encoder import TextEncoder, add_text_encoder_args, build_text_encoder
from toy import toy_look, toy_prompt_following, toy_prompts

# -----------------------------------------------------------------------------
# config


@dataclass
class StageCConfig:
    """Prior hyper-parameters (method §5.1); defaults: released v2 prior (993,636,896 params)."""
    c_in: int = 16  # semantic latent channels
    c: int = 1536  # width of every block (no down-sampling anywhere)
    c_cond: int = 1280  # CLIP text width (ViT-bigG-14)
    c_r: int = 64  # sinusoidal timestep embedding size
    depth: int = 32  # number of [ResBlock, TimestepBlock, AttnBlock] triples
    nhead: int = 24  # attention heads (64 dims each)
    dropout: float = 0.1  # MLP and attention-probability dropout


# One table: per preset the prior's config, its text tower (open_clip architecture and pretrained
# tag; c_cond follows the tower's width; "tiny" is a small random tower), the training defaults for
# flags left unset, and those of a fine-tune (--pretrained; why these: docs/finetune.md)
PRESETS = {
    # CPU quick start and tests: 16 x 3 x 3 latents of 128 px toy images, text from the tiny random
    # tower (64 wide). Narrow and shallow: the step count, not the width, decides how soon it
    # follows prompts. ~2.5 CPU minutes: attending to the few caption tokens among 77 takes ~1000
    # steps (colour), shape ~3000: many cheap steps, a high LR and AdamW beta2 0.95 (faster to adapt
    # than the reference's 0.999 in such short runs)
    "tiny": dict(
        model=StageCConfig(c=64, c_cond=64, depth=2, nhead=4, dropout=0.0),
        text_encoder={"name": "tiny", "pretrained": None},
        train=dict(image_size=128, batch_size=64, max_steps=3000, lr=3e-3, warmup=50, beta2=0.95,
                   cache=True, steps_c=20, grad_checkpointing=False),
        finetune=dict(batch_size=16, epochs=100, lr=1e-3, lora_lr=3e-3, warmup=20, beta2=0.95,
                      ema_decay=0, cache=True, steps_c=20, grad_checkpointing=False)),
    # one-GPU reproduction (126 M params): CLIP ViT-B-32 text (512 wide), as Stage B's small preset
    "small": dict(
        model=StageCConfig(c=768, c_cond=512, depth=16, nhead=12),
        text_encoder={"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
        train=dict(image_size=256, batch_size=256, max_steps=200_000, lr=1e-4, warmup=5_000,
                   beta2=0.999, cache=False, steps_c=0, grad_checkpointing=False),
        finetune=dict(batch_size=8, epochs=100, lr=1e-5, lora_lr=1e-4, warmup=100, beta2=0.999,
                      ema_decay=0, cache=True, steps_c=0, grad_checkpointing=False)),
    # the released warp-ai/wuerstchen-prior `prior` (WuerstchenPrior), CLIP ViT-bigG-14 text
    # (method §5.5). The v1 Stage C script (method §6.5): AdamW 1e-4 with default betas, 10k
    # warm-up, global batch 1280, 1.5M updates budgeted; v2 was trained at 512 px (12 x 12) first,
    # then at 1024 px and above. Fine-tuning it on one 24 GB GPU: activation checkpointing on
    # (bench.py --stages memory)
    "paper": dict(
        model=StageCConfig(),
        text_encoder={"name": "ViT-bigG-14", "pretrained": "laion2b_s39b_b160k"},
        train=dict(image_size=512, batch_size=1280, max_steps=1_500_000, lr=1e-4, warmup=10_000,
                   beta2=0.999, cache=False, steps_c=0, grad_checkpointing=False),
        finetune=dict(batch_size=8, epochs=100, lr=1e-5, lora_lr=1e-4, warmup=100, beta2=0.999,
                      ema_decay=0, cache=True, steps_c=0, grad_checkpointing=True)),
    # the v1 prior as trained (dome272 train_stage_C.py, method §5.1; model_stage_c.pt): the same
    # prior with CLIP ViT-H-14 text (c_cond 1024, 993,243,680 params), on top of the v1 Paella
    # Stage B (stage_b_paella.py --model paper), the same recipe at 512 px (12 x 12 latents)
    "paper_v1": dict(
        model=StageCConfig(c_cond=1024),
        text_encoder={"name": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"},
        train=dict(image_size=512, batch_size=1280, max_steps=1_500_000, lr=1e-4, warmup=10_000,
                   beta2=0.999, cache=False, steps_c=0, grad_checkpointing=False)),
}

# -----------------------------------------------------------------------------
# model


class StageC(nn.Module):
    """Stage C prior (paper §3, method §5): text-conditional noise prediction on semantic latents.

    projection (1x1 conv c_in -> c) -> depth x [ResBlock, TimestepBlock, AttnBlock over
    [image tokens ; text]] -> LayerNorm2d -> 1x1 conv to (a, b) -> predicted noise
    (x_t - a) / (|1 - b| + 1e-5) (method §5.3). Key names are diffusers' `WuerstchenPrior` names
    (blocks.{3k, 3k+1, 3k+2}), so its weights load 1:1.
    """

    def __init__(self, cfg: StageCConfig):
        super().__init__()
        self.cfg = cfg
        # activation checkpointing per triple: recompute in backward, less memory
        self.grad_checkpointing = False
        self.projection = nn.Conv2d(cfg.c_in, cfg.c, kernel_size=1)
        # text tokens -> the blocks' width (no LayerNorm on the sequence, unlike Stage B's seq_norm)
        self.cond_mapper = nn.Sequential(nn.Linear(cfg.c_cond, cfg.c), nn.LeakyReLU(0.2),
                                         nn.Linear(cfg.c, cfg.c))
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            self.blocks.append(ResBlock(cfg.c, dropout=cfg.dropout))
            self.blocks.append(TimestepBlock(cfg.c, cfg.c_r))
            self.blocks.append(AttnBlock(cfg.c, cfg.c, cfg.nhead, self_attn=True,
                                         dropout=cfg.dropout))
        self.out = nn.Sequential(LayerNorm2d(cfg.c), nn.Conv2d(cfg.c, 2 * cfg.c_in, kernel_size=1))
        self.init_weights()

    def init_weights(self):
        """dome272's initialisation of the prior, in its order (method §5.4)."""
        dome272_init(self)  # xavier everywhere, q/k/v as nn.MultiheadAttention's packed matrix
        nn.init.normal_(self.projection.weight, std=0.02)  # input
        nn.init.normal_(self.cond_mapper[0].weight, std=0.02)  # conditioning
        nn.init.normal_(self.cond_mapper[2].weight, std=0.02)
        nn.init.zeros_(self.out[1].weight)  # output: a = 0, b = 0 at init, so eps_hat = x_t
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
        """x: noised latent x_t (B, c_in, h, w), any h, w; t: (B,) in [0, 1]; clip_text:
        (B, 77, c_cond). Returns the predicted noise (B, c_in, h, w), float32."""
        r_embed = r_embedding(t, self.cfg.c_r)  # (B, c_r)
        cond = self.cond_mapper(clip_text)  # (B, 77, c)
        # (B, c_in, h, w) -> (B, c, h, w) channels-last: blocks' permutes to (B, h, w, c) are views
        h = self.projection(x.contiguous(memory_format=torch.channels_last))
        for k in range(self.cfg.depth):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(self._triple, k, h, r_embed, cond, use_reentrant=False)
            else:
                h = self._triple(k, h, r_embed, cond)
        a, b = self.out(h).float().chunk(2, dim=1)  # (B, 2 c_in, h, w) -> 2 x (B, c_in, h, w)
        # a plays sqrt(abar) x0_hat and |1 - b| plays sqrt(1 - abar) (the source notes
        # x0_hat = a / sqrt(1-(1-b)^2))
        return (x.float() - a) / ((1 - b).abs() + 1e-5)

    @classmethod
    def from_pretrained(cls, path, cfg=None):
        """Load released weights (method §8.1-8.3): a diffusers `WuerstchenPrior.save_pretrained`
        folder (config.json + safetensors/bin; warp-ai/wuerstchen-prior subfolder `prior`) or an
        official dome272 checkpoint such as `model_v3_stage_c.pt` (its `ema_state_dict`, as the
        converter uses; packed attention is split into q/k/v). For a .pt file the sizes are read off
        the weights, with 64-dim heads as in every release unless `cfg` says."""
        if os.path.isdir(path):
            hf = read_json(os.path.join(path, "config.json"))
            cfg = StageCConfig(**{k: v for k, v in hf.items()
                                  if k in StageCConfig.__dataclass_fields__})
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

# -----------------------------------------------------------------------------
# training inputs (the schedule, t sampling and P2-weighted loss: diffusion.py, shared with B)


@torch.no_grad()
def training_inputs(batch, drop, compressor, text_encoder, latent_space, cache=None):
    """One loader batch -> (y (B, 16, h, w), clip_text (B, 77, c_cond)), both float32. Samples
    marked in `drop` (bool (B,)) get the empty caption: the classifier-free-guidance dropout of
    method §6.4. With `cache`, the batch is (y, caption index) from cache.StageCCache; else
    (images, captions), run through the frozen models."""
    if cache is not None:
        y, text_index = batch
        text_index = torch.where(drop, cache.empty_index, text_index)
        return y.to(cache.text.device), cache.text[text_index.to(cache.text.device)]
    images, captions = batch
    device = next(compressor.parameters()).device
    return (to_stage_c_space(compressor(images.to(device)), latent_space),
            text_encoder.encode(drop_captions(captions, drop)).float())

# -----------------------------------------------------------------------------
# sampling


def load_stage_c(path, device="cpu"):
    """Rebuild from a Stage C checkpoint alone what sampling needs: the EMA prior and its text
    encoder (eval, frozen) and the latent-space constants of the Stage B it was trained on. Returns
    a dict with those and 'ckpt'."""
    ckpt = load_checkpoint(path, "stage_c", mmap=True)
    refuse_lora_checkpoint(ckpt, path, "prior")
    with torch.device("meta"):
        model = StageC(StageCConfig(**ckpt["model_config"]))
    load_exact(model, ckpt["ema"], what=f"Stage C EMA weights of {path}")
    return {"stage_c": frozen(model, device),
            "latent_space": ckpt["latent_space"],
            "text_encoder": TextEncoder.from_spec(ckpt["text_encoder"]).to(device), "ckpt": ckpt}


@torch.no_grad()
def sample_stage_c(model, text_encoder, prompts, latent_hw, timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                   guidance_scale=4.0, negative_prompt="", generator=None, progress=False):
    """Prompts -> Stage C latents y (B, 16, h, w) (method §7.4, before its e = 42 y - 1): CLIP
    text, x ~ N(0, I), DDPM on `timesteps` (an int = that many steps on the linear grid) with
    classifier-free guidance against the negative prompt ("" = the unconditional embedding it was
    trained with). Defaults: the released settings. `generator`: one, or one per prompt."""
    device = next(model.parameters()).device
    cond = {"clip_text": text_encoder.encode(prompts)}  # (B, 77, c_cond)
    uncond = {"clip_text": text_encoder.encode([negative_prompt] * len(prompts))}
    noise = randn((len(prompts), model.cfg.c_in, *latent_hw), generator, device)
    return ddpm_sample(model, noise, timesteps, cond, uncond, guidance_scale, generator, progress)


@torch.no_grad()
def decode_stage_c(y, prompts, stage_b, text_encoder_b, latent_space, stage_a, generator=None,
                   progress=False, negative_prompt="", **options):
    """Stage C latents y (B, 16, h, w) -> images (B, 3, H, W) in [0, 1] (method §7.5): e = y *
    scale - shift, then Stage B of either kind (decoders.py) decodes e with its own text tower's
    CLIP text of `prompts`, guided against the negative prompt, and Stage A gives the image.
    options: Stage B's sampling settings (steps, guidance_scale, temperature), each None or left
    out for its kind's default (DiffNeXt: 12 DDPM steps, no guidance; Paella: v1's)."""
    e = to_stage_b_space(y, latent_space)
    negative = [negative_prompt] * len(y)  # the unconditional caption of guidance
    return stage_b.sample(stage_a, e, text_encoder_b.encode(prompts),
                          text_encoder_b.encode(negative), generator=generator, progress=progress,
                          **options)

# -----------------------------------------------------------------------------
# training


def frozen_models(args, released, preset, ckpt, device):
    """The frozen models of a Stage C run (method §1.1): the semantic compressor (target) and the
    CLIP text tower (condition) with the latent space y = (e + shift) / scale, and a function that
    loads the models that decode the previews (Stage B, its text tower, Stage A). From the released
    or exported weights (--pretrained), else from our Stage B and A checkpoints. Returns
    (compressor, text encoder, latent space, preview loader)."""
    if released:
        paths, build = released["paths"], released["builders"]
        # resumed: the checkpoint's text tower
        text_encoder = (build_text_encoder(args, None, ckpt, device) if ckpt else
                        frozen(build["text_encoder_c"](), device))
        return (frozen(SemanticCompressor.from_pretrained(paths["compressor"]), device),
                text_encoder, released["latent_space"],
                lambda: {"stage_b": frozen(StageB.from_pretrained(paths["stage_b"]), device),
                         "text_encoder_b": frozen(build["text_encoder_b"](), device),
                         "stage_a": frozen(StageA.from_pretrained(paths["stage_a"]), device)})
    parts_b = load_stage_b(args.stage_b, device, parts=("compressor",))

    def decoders():  # Stage B of either kind (stage_b.py, stage_b_paella.py)
        parts = load_decoder(args.stage_b, device, parts=("stage_b", "text_encoder"))
        return {"stage_b": parts["stage_b"], "text_encoder_b": parts["text_encoder"],
                "stage_a": load_stage_a(args.stage_a, device)}
    return (parts_b["compressor"], build_text_encoder(args, preset["text_encoder"], ckpt, device),
            parts_b["latent_space"], decoders)


def preview_prompts(held_captions, trainset, image_size):
    """What Stage C's previews draw: the held-out captions, or on toy data every colour x shape
    prompt of its look, with their (colour, shape) targets and the look (else None, None); and,
    with --buckets, the other training sizes (w, h) to draw a row at."""
    look = toy_look(held_captions)  # a toy look's vocabulary, else None
    prompts = [p for p, _, _ in toy_prompts(look)] if look else held_captions
    targets = [(c, s) for _, c, s in toy_prompts(look)] if look else None
    sizes = sizes_of(trainset) or getattr(trainset, "bucket_sizes", None) or []
    return prompts, targets, look, sorted(set(sizes) - {(image_size, image_size)})


@torch.no_grad()
def preview(ema, text_encoder, decoders, prompts, latent_hw, latent_space, args, rt, logger, path,
            other_sizes=(), toy_targets=None, look=None):
    """Fixed prompts and noise -> the EMA prior (CFG) -> Stage B -> Stage A: a captioned grid at
    `path` (and a row per other bucket size) and its metrics: the samples' std, on toy data the
    prompt following. Stage B and A are loaded for it (`decoders()`) and freed after; the
    training's random stream is left as it was."""
    g = torch.Generator(rt.device).manual_seed(args.seed)  # the same noise at every preview
    with torch.random.fork_rng(devices=[]):  # building a random text tower draws from it
        dec = decoders()

    def draw(prompts, hw):  # the EMA in eval mode (with --ema_decay 0: the model being trained)
        with eval_mode(ema), rt.autocast():
            y = sample_stage_c(ema, text_encoder, prompts, hw,
                               args.steps_c or DEFAULT_STAGE_C_TIMESTEPS, args.guidance_c,
                               generator=g)
            return y, decode_stage_c(y, prompts, dec["stage_b"], dec["text_encoder_b"],
                                     latent_space, dec["stage_a"], generator=g, steps=args.steps_b)
    y, images = draw(prompts, latent_hw)
    save_captioned_grid(images, prompts, path)
    for w, h in other_sizes:  # one row of the first prompts per other bucket size
        hw = (round(h / RESOLUTION_MULTIPLE), round(w / RESOLUTION_MULTIPLE))
        save_captioned_grid(draw(prompts[:6], hw)[1], prompts[:6],
                            path.replace(".png", f"_{w}x{h}.png"))
    metrics = {"y_std": y.float().std().item()}  # ~1 when the samples match the data's spread
    if toy_targets:
        metrics["toy_colour_acc"], metrics["toy_shape_acc"] = toy_prompt_following(
            images, toy_targets, look)
    metrics |= preview_scores(images, prompts, logger.log)  # with requirements-eval.txt
    logger.log(f"preview {path} | " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    dec.clear()  # Stage B and A freed
    free_memory(rt.device)
    return metrics


def train(args):
    preset = PRESETS[preset_name(args)]
    data_defaults = check_data(args, SIDE_MULTIPLE, "a preview's Stage B (Stage C's latent side "
                               "a multiple of 3)")
    # --pretrained: released (or exported) weights, found now; fine-tuning starts from their prior
    released = (open_released(args.pretrained or None, compressor=True)
                if args.pretrained is not None else None)
    finetune = released is not None and args.init == "pretrained"
    if args.lora_rank and not finetune:
        raise UsageError("--lora_rank adapts a pretrained prior: give --pretrained [DIR] "
                         "(and no --init scratch)")
    if args.init == "scratch" and not released:
        raise UsageError("--init scratch trains a new prior in --pretrained's latent space: give "
                         "--pretrained [DIR]")
    defaults = finetune_defaults(preset, args) if finetune else preset["train"]
    if released:  # the size their Stage C was trained at (released: 1024 px)
        defaults = defaults | {"image_size": released["image_sizes"]["c"]}
    rt, logger, ckpt_path, ckpt = start_run(args, "stage_c", defaults | data_defaults)

    # frozen parts: the semantic compressor gives the target, a CLIP text tower the condition (a
    # random 'tiny' tower is built from the seed on every rank and saved with our checkpoint);
    # Stage B and A decode previews
    compressor, text_encoder, latent_space, decoders = frozen_models(args, released, preset, ckpt,
                                                                     rt.device)
    text_entry, text_width = text_encoder.checkpoint_entry(), text_encoder.width
    source = (f"--pretrained {args.pretrained or '(Hugging Face cache)'}" if released
              else args.stage_b)
    logger.log(f"stage C | preset {args.model} | {rt.device} {str(rt.dtype).replace('torch.', '')} "
               f"| world {rt.world_size} | {'fine-tune' if finetune else 'from scratch'} | "
               f"text {text_encoder.spec['name']} / {text_encoder.spec['pretrained']} "
               f"| latent space y = (e + {latent_space['shift']}) / {latent_space['scale']} "
               f"from {source}")
    logger.log(f"training config: {vars(args)}")

    # data: images in [0, 1] and captions; the previews' prompts (toy data: every colour x shape)
    trainset, holdout = open_data(args, verbose=rt.master)  # a folder or tar shards
    held_images, held_captions = holdout_batch(holdout, rt.device)
    prompts, toy_targets, look, other_sizes = preview_prompts(held_captions, trainset,
                                                              args.image_size)
    with torch.no_grad(), rt.autocast():
        latent_hw = tuple(compressor(held_images[:1]).shape[-2:])  # (h, w) = side / 42.67
    plan_epochs(args, trainset, finetune, defaults["lr"], logger)
    cache = None
    if args.cache:  # once per dataset and frozen models, on disk: re-runs and --resume read it
        cache, text_encoder = cache_stage_c(trainset, compressor, text_encoder, latent_space,
                                            prompts, args, rt, logger)
        compressor = None  # the frozen models leave memory; the previews read the prompt table
        free_memory(rt.device)

    model, ema, opt, scaler, lora = build_prior(args, preset, released if finetune else None,
                                                ckpt, text_width, rt, logger)
    cfg = model.cfg
    step = restore(ckpt, ckpt_path, model, ema, opt, scaler, logger)
    raw_model, model = model, torch.compile(model) if args.compile else model
    model = wrap_ddp(model, rt)
    guard = NonFiniteGuard(rt, ckpt_path, args.max_nonfinite, raw_model)

    def show():  # the preview, at the step it is due
        return preview(ema, text_encoder, decoders, prompts, latent_hw, latent_space, args, rt,
                       logger, os.path.join(args.out_dir, f"samples_{step:07d}.png"), other_sizes,
                       toy_targets, look)

    def save(metrics, run_state):
        save_checkpoint(ckpt_path, {
            "stage": "stage_c", "step": step, "model_config": asdict(cfg),
            "model": trained_state(raw_model), "ema": trained_state(ema),
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "train_config": vars(args), "text_encoder": text_entry, "lora": lora,
            "latent_space": latent_space, **run_state, "metrics": metrics,
            "deps": {"pretrained": released["paths"]} if released else {
                "stage_b": os.path.abspath(args.stage_b), "stage_a": os.path.abspath(args.stage_a),
                "data": os.path.abspath(args.data)}})
        if lora:  # adapters in diffusers' LoRA format, for sample.py --lora and load_lora_weights
            save_lora(os.path.join(args.out_dir, LORA_FILE), ema, "prior",
                      f"the Stage C prior {released['paths']['stage_c']} {asdict(cfg)}", lora)

    # the cache is indexed in memory: no loader workers needed
    batches = resume_batches(cache or trainset, args, rt, step, ckpt, 0 if cache else None)
    progress = Progress(args, rt, logger, step, "stage C")
    if rt.master and finetune and step == 0:  # the model before fine-tuning, for comparison
        progress.metrics = show()
    model.train()
    while step < args.max_steps:
        lr = get_lr(step, args.lr, args.warmup)
        set_lr(opt, lr)
        for micro in range(args.grad_accum):
            batch = next(batches)
            drop = caption_dropout(len(batch[0]), args.p_drop_text)  # CFG: empty captions
            with rt.autocast():
                y, clip_text = training_inputs(batch, drop, compressor, text_encoder, latent_space,
                                               cache)
            with no_sync(model, micro == args.grad_accum - 1), rt.autocast():
                # P2-weighted eps MSE, t with the 1.08 stretch
                loss = diffusion_loss(model, y, clip_text=clip_text)
            # gradients of a mean over micro-batches: divide each micro-batch loss by their count
            scaler.scale(loss / args.grad_accum).backward()
            progress.count(len(y))
        grad_norm = guard.step(step, loss, [(opt, scaler)], args.grad_clip)  # skipped if non-finite
        if guard.ok and ema is not raw_model:
            update_ema(ema, raw_model, ema_decay_at(step, args.ema_decay))
        step += 1
        progress.end_step(step, lambda: {"loss": loss.item(), "grad_norm": grad_norm.item()}, lr,
                          guard.skipped, batches, save, show)
    progress.close(f"{' | '.join(f'{k} {v:.3f}' for k, v in progress.metrics.items())} "
                   f"| checkpoint {ckpt_path}")


def build_prior(args, preset, released, ckpt, text_width, rt, logger):
    """The prior of a run, with its EMA (off when fine-tuning: --ema_decay 0 keeps no copy) and
    AdamW (weight decay 0.01, method §6.5) over what is trained: all weights, or LoRA adapters on
    the frozen base. Fine-tuning (`released`): the released or exported prior; else a new one of
    the preset's width (or the checkpoint's), reading text `text_width` wide. Returns (model, ema,
    optimizer, loss scaler, the LoRA record or None)."""
    if released:
        model = StageC.from_pretrained(released["paths"]["stage_c"]).requires_grad_(True)
    else:
        model = StageC(StageCConfig(**ckpt["model_config"]) if ckpt else
                       replace(preset["model"], c_cond=text_width))
    model = channels_last_convs(model.to(rt.device))  # as the activations: no DDP grad copies
    model.grad_checkpointing = args.grad_checkpointing
    lora = add_lora_from_args(model, args)
    ema, trained, opt = ema_and_optimizer(model, args)
    logger.log(f"parameters: Stage C {sum(p.numel() for p in model.parameters()):,} "
               f"({sum(map(torch.numel, trained)):,} trained"
               f"{', LoRA ' + str(lora) if lora else ''})")
    return model, ema, opt, rt.make_scaler(), lora


def restore(ckpt, ckpt_path, model, ema, opt, scaler, logger):
    """--resume: the weights a run trains (LoRA: its adapters), the EMA's (when it keeps one), the
    optimizer and the loss scaler. Returns the step to continue from (0 without a checkpoint)."""
    if not ckpt:
        return 0
    load_trained(model, ckpt["model"], f"{ckpt_path} (model)")
    if ema is not model:
        load_trained(ema, ckpt["ema"], f"{ckpt_path} (ema)")
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    logger.log(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"]

# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    parser = ArgumentParser(
        description="Train Stage C of Würstchen (the text-conditional prior) on a folder of "
        "captioned images, on top of trained Stages A and B, or fine-tune the released prior "
        "(--pretrained).",
        formatter_class=HelpFormatter)
    add_common_args(parser, "stage_c", PRESETS)
    g = parser.add_argument_group("stage C")
    g.add_argument("--stage_a", default="out/stage_a/ckpt.pt",
                   help="Stage A checkpoint (decodes the previews)")
    g.add_argument("--stage_b", default="out/stage_b/ckpt.pt", help="Stage B checkpoint "
                   "(stage_b.py or stage_b_paella.py): its frozen semantic compressor gives the "
                   "training target, its decoder the previews")
    add_text_encoder_args(g)
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the frozen text embeddings and semantic latents of the whole "
                   "dataset once, kept in out_dir/cache/ for re-runs and --resume; the frozen "
                   "models then leave memory (folders; default: on for tiny and when fine-tuning)")
    g.add_argument("--p_drop_text", type=probability, default=0.05,
                   help="probability of an empty caption, per sample (CFG)")
    g.add_argument("--guidance_c", type=nonnegative_float, default=4.0,
                   help="Stage C classifier-free guidance scale of the previews")
    g.add_argument("--steps_c", type=nonnegative_int, default=None,
                   help="Stage C DDPM steps of the previews, 0 = the released 29-step grid "
                   "DEFAULT_STAGE_C_TIMESTEPS (default: per preset)")
    g.add_argument("--steps_b", type=positive_int, default=None,
                   help="Stage B steps of the previews (default: its kind's, 12 DDPM steps for "
                   "DiffNeXt, 8 for Paella)")
    g.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (activation checkpointing): "
                   "much less memory for the paper size, ~30%% more compute (default: per preset; "
                   "on when fine-tuning paper)")
    f = parser.add_argument_group("fine-tuning (--pretrained)")
    add_finetune_args(f)
    f.add_argument("--init", default="pretrained", choices=["pretrained", "scratch"],
                   help="with --pretrained: fine-tune their prior, or train a new prior of the "
                   "preset's width in their latent space")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(train, get_args())
