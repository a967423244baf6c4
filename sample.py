"""
Sample from Würstchen: text -> Stage C -> Stage B -> Stage A -> PNG (method.md §7).

    prompt --CLIP text--> Stage C (CFG, DDPM) --> y (16, h, w) --e = y*scale - shift-->
           Stage B (DDPM) --> Stage A latent (4, 10.67h, 10.67w)
           --Stage A decode (unquantised)--> image (3, 42.67h, 42.67w)

The three models are rebuilt from their checkpoints alone (configs + EMA weights), found where the
training scripts write them. The same code also does image variation (image -> semantic compressor
-> B -> A), image-to-image (noise the image's Stage C latent to a strength, denoise with the
prompt) and Stage A reconstruction (image -> Stage A encode -> decode, to check a Stage A). The
default size is the checkpoints' training size.

    python sample.py --prompt "a red circle on a blue background" --n 4
    python sample.py --prompts_file prompts.txt --width 1024 --height 1536 --seed 3
    python sample.py --variation photo.png
    python sample.py --init_image photo.png --prompt "..." --strength 0.6
    python sample.py --reconstruct photo.png
    python sample.py --eval_toy                   # prompt following on toy data

With --pretrained the same chain runs the released Würstchen v2 weights (warp-ai/wuerstchen-prior:
prior + CLIP ViT-bigG text; warp-ai/wuerstchen: decoder + VQGAN + CLIP ViT-H text), with the
released settings (method §7.6), from the Hugging Face cache or from a folder laid out as
pretrained.RELEASED_LAYOUT. Each stage is loaded when needed and freed after, in bf16 on a GPU that
has it (1024 px fits in 24 GB), else in fp32 (the CPU: slow, see the README):
    python sample.py --pretrained --prompt "an owl reading a newspaper, oil painting"
    python sample.py --pretrained weights/ --prompt "..." --width 1536 --height 1024

--export writes our checkpoints in that layout (export.py), for diffusers' Würstchen pipelines;
--pretrained reads it back:
    python sample.py --export exported/    |  python sample.py --pretrained exported/ --prompt "..."

A Stage B checkpoint of stage_b_paella.py (v1's token decoder) goes wherever a Stage B goes, and a
--pretrained folder with the official v1 files (pretrained.V1_LAYOUT) runs the whole v1 chain,
prior -> Paella tokens -> Stage A's codebook, with the v1 notebook's settings (method §1.4):
    python sample.py --stage_b out/stage_b_paella/ckpt.pt --stage_c out/stage_c_paella/ckpt.pt ...
    python sample.py --pretrained weights_v1/ --prompt "an owl reading a newspaper, oil painting"
"""
import gc
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from PIL import Image

from blocks import LATENT_DIM_SCALE, RESOLUTION_MULTIPLE, to_stage_c_space
from common import (ArgumentParser, HelpFormatter, UsageError, check_output_dir, default_dtype,
                    device_name, existing_folder, finite_float, frozen, load_checkpoint,
                    nonnegative_float, nonnegative_int, pick_device, positive_float, positive_int,
                    probability, psnr, run_cli, save_captioned_grid)
from data import load_image
from decoders import load_decoder
from diffusion import DEFAULT_STAGE_C_TIMESTEPS, add_noise, ddpm_sample, randn, timestep_grid
from export import (check_exportable, check_new_folder, new_folder, repo_folders, write_compressor,
                    write_decoder, write_prior)
from finetune import apply_loras, lora_file
from images import inspect_image
from pretrained import is_released_v1, open_released, open_released_v1
from stage_a import StageA, load_stage_a
from stage_b import SemanticCompressor, StageB
from stage_b_paella import V1_LATENT_SPACE, Paella
from stage_c import StageC, decode_stage_c, load_stage_c, sample_stage_c
from toy import LOOKS, check_colors, classify_toy_image, toy_prompt_following, toy_prompts

# -----------------------------------------------------------------------------
# loading


@dataclass
class Pipeline:
    """The three stages and their text encoders, frozen: from our checkpoints (all resident), or the
    released weights (`loaders`: one function per model, called when a stage needs it; see
    `loaded`)."""
    stage_a: torch.nn.Module = None
    stage_b: torch.nn.Module = None
    compressor: torch.nn.Module = None
    text_encoder_b: torch.nn.Module = None
    stage_c: torch.nn.Module = None
    text_encoder_c: torch.nn.Module = None
    latent_space: dict = None  # y = (e + shift) / scale, from the Stage B checkpoint
    device: torch.device = torch.device("cpu")
    image_sizes: dict = None  # 'a' / 'b' / 'c' -> training image side of each stage held
    dtype: torch.dtype = torch.float32  # compute dtype: autocast to it when it is not float32
    loaders: dict = None  # name -> function returning that model on the device (released weights)
    release: str = None  # "v1" for the official v1 files (defaults: CHAIN_DEFAULTS), else None

    @property
    def image_size(self):
        """The default output side: the training size of the last stage held (C, else B, else A)."""
        return next(self.image_sizes[k] for k in "cba" if k in self.image_sizes)


# What flags left unset take (method §7.6): the released v2 pipelines' settings (also for our
# checkpoints; steps_c 0 = the 29-step DEFAULT_STAGE_C_TIMESTEPS grid), and for the official v1
# files the v1 notebook's: prior 60 DDPM steps on the linear grid, guidance 6, its negative prompt
# (which guides Paella too). Stage B's steps, guidance and temperature default to its kind's
# (StageB.sample: DiffNeXt 12 steps, no guidance; Paella.sample: 8 steps, w = 2, 1.0 -> 0.6).
CHAIN_DEFAULTS = {
    None: dict(steps_c=0, guidance_c=4.0, negative_prompt=""),
    "v1": dict(steps_c=60, guidance_c=6.0,
               negative_prompt="low resolution, low detail, bad quality, blurry"),
}


def sampling_dtype(device):
    """The compute dtype of `--dtype auto` and load_released: bf16 on GPUs that support it, else
    float32. Never float16 unless asked: weights trained in bf16 (the released ones too) overflow
    in it."""
    dtype = default_dtype(device)
    return torch.float32 if dtype == torch.float16 else dtype


def load_pipeline(stage_a="out/stage_a/ckpt.pt", stage_b="out/stage_b/ckpt.pt",
                  stage_c="out/stage_c/ckpt.pt", device="cpu", stages="abc", dtype=torch.float32):
    """Build the stages named in `stages` from their checkpoints (EMA weights), with each one's
    training image size; a missing or wrong file names the file and stage. Weights stay float32; a
    bf16 / fp16 `dtype` runs them under autocast."""
    pipe = Pipeline(device=torch.device(device), dtype=dtype, image_sizes={})
    for stage, path in (("a", stage_a), ("b", stage_b), ("c", stage_c)):
        if stage == "a" or stage in stages:
            add_checkpoint(pipe, stage, path)
    if not pipe.image_sizes:  # Stage A alone: its training size (its checkpoint read once more)
        ckpt_a = load_checkpoint(stage_a, "stage_a", mmap=True)
        pipe.image_sizes["a"] = ckpt_a["train_config"]["image_size"]
    return pipe


def add_checkpoint(pipe, stage, path):
    """Put the models of our checkpoint of Stage `stage` ('a', 'b' or 'c') into `pipe`, resident
    (EMA weights), with its training size; over released ones too (sample.py --pretrained DIR
    --stage_c ckpt.pt). Its latent space must be the pipeline's: a Stage C samples for the Stage B
    it was trained on."""
    if stage == "a":
        pipe.stage_a = load_stage_a(path, pipe.device)
        return
    if stage == "b":
        parts = load_decoder(path, pipe.device)  # either kind of Stage B
        pipe.compressor, pipe.stage_b, pipe.text_encoder_b = \
            (parts[k] for k in ("compressor", "stage_b", "text_encoder"))
    else:
        parts = load_stage_c(path, pipe.device)
        pipe.stage_c, pipe.text_encoder_c = parts["stage_c"], parts["text_encoder"]
    pipe.image_sizes[stage] = parts["ckpt"]["train_config"]["image_size"]
    if pipe.latent_space not in (None, parts["latent_space"]):
        raise UsageError(f"{path} has the latent space {parts['latent_space']}, but the Stage "
                         f"{'C' if stage == 'b' else 'B'} here has {pipe.latent_space}: a Stage C "
                         f"samples only for the Stage B it was trained on; pass that one")
    pipe.latent_space = parts["latent_space"]


@contextmanager
def loaded(pipe, *names):
    """Run a block with the named models of `pipe` in memory, under autocast to pipe.dtype. Models
    from our checkpoints are resident; released ones (pipe.loaders) are loaded here and freed after,
    so only one stage is in memory at a time (1024 px in bf16 then fits a 24 GB GPU: prior 2 GB +
    CLIP-bigG 1.4 GB, then decoder 2.1 GB + CLIP-H 0.7 GB + VQGAN)."""
    fresh = [n for n in names if getattr(pipe, n) is None and n in (pipe.loaders or {})]
    missing = [n for n in names if getattr(pipe, n) is None and n not in fresh]
    if missing:
        raise UsageError(f"this pipeline has no {', '.join(missing)}" + (
            " (the released weights hold the semantic compressor only in the official "
            "model_v2_stage_b.pt: put it in the --pretrained folder; an --export has it in "
            "wuerstchen/semantic_compressor/)" if "compressor" in missing else ""))
    for n in fresh:
        setattr(pipe, n, pipe.loaders[n]())
    try:
        with (nullcontext() if pipe.dtype == torch.float32
              else torch.autocast(pipe.device.type, pipe.dtype)):
            yield
    finally:
        for n in fresh:
            setattr(pipe, n, None)
        if fresh:
            gc.collect()
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()

# -----------------------------------------------------------------------------
# sizes


def round_size(width, height):
    """The nearest size the stages produce exactly: the Stage C side n = ceil(side / 42.67) must be
    a multiple of 3, so that Stage B's latent side int(10.67 n) divides through its down-sampling
    (128-pixel steps, method §7.7). Returns (width, height, Stage C latent (h, w), a note when the
    size changed, else None)."""
    def side(s):
        n = max(3, 3 * round(math.ceil(s / RESOLUTION_MULTIPLE) / 3))
        return int(n * LATENT_DIM_SCALE) * 4, n
    (w, nw), (h, nh) = side(width), side(height)
    note = (None if (w, h) == (width, height)
            else f"size {width}x{height} rounded to {w}x{h} (128-pixel steps)")
    return w, h, (nh, nw), note

# -----------------------------------------------------------------------------
# the chain


def generators(seed, device):
    """One generator of `seed`, or a list of one per image for a list of seeds (diffusion.randn):
    image i then depends on seed[i] alone, not on the batch."""
    if isinstance(seed, int):
        return torch.Generator(device).manual_seed(seed)
    return [torch.Generator(device).manual_seed(s) for s in seed]


@torch.no_grad()
def stage_b_and_a(pipe, y, prompts, negative_prompt, generator, progress, steps_b=None,
                  guidance_b=None, temperature_b=None):
    """Stage C latents y -> images, with the pipeline's Stage B (either kind) and Stage A
    (stage_c.decode_stage_c); Stage B's settings default to its kind's."""
    with loaded(pipe, "text_encoder_b", "stage_b", "stage_a"):
        return decode_stage_c(y, prompts, pipe.stage_b, pipe.text_encoder_b, pipe.latent_space,
                              pipe.stage_a, generator=generator, progress=progress,
                              negative_prompt=negative_prompt, steps=steps_b,
                              guidance_scale=guidance_b, temperature=temperature_b)


@torch.no_grad()
def text_to_image(pipe, prompts, negative_prompt="", n=1, width=1024, height=1024, seed=0,
                  steps_c=DEFAULT_STAGE_C_TIMESTEPS, guidance_c=4.0, steps_b=None, guidance_b=None,
                  temperature_b=None, progress=True):
    """Prompts -> (len(prompts) * n, 3, H, W) images in [0, 1]. Defaults are the released
    pipelines' (§7.6), Stage B's its kind's; on the released v2 weights a seed gives the image of
    diffusers' prior then decoder pipeline with that generator. `seed` may also be a list, one per
    image: image i then depends on seed[i] alone, not on the batch (diffusers: a list of
    generators). A Paella Stage B samples tokens (temperature_b), guided against the negative
    prompt too."""
    _, _, latent_hw, _ = round_size(width, height)
    prompts = [p for p in prompts for _ in range(n)]  # n images per prompt, next to each other
    g = generators(seed, pipe.device)
    with loaded(pipe, "text_encoder_c", "stage_c"):
        y = sample_stage_c(pipe.stage_c, pipe.text_encoder_c, prompts, latent_hw, steps_c,
                           guidance_c, negative_prompt, generator=g, progress=progress)
    # DDPMWuerstchenScheduler draws noise at the last step too (and multiplies it by 0): draw it as
    # well, so that Stage B gets the diffusers pipelines' noise from the same seed
    randn(y.shape, g, pipe.device)
    return stage_b_and_a(pipe, y, prompts, negative_prompt, g, progress, steps_b, guidance_b,
                         temperature_b)


@torch.no_grad()
def image_variation(pipe, images, prompts=None, negative_prompt="", seed=0, steps_b=None,
                    guidance_b=None, temperature_b=None, progress=True):
    """Images (B, 3, H, W) -> new images of the same semantics: semantic compressor -> B -> A
    (Stage B's text: `prompts`, one per image, else empty)."""
    with loaded(pipe, "compressor"):
        y = to_stage_c_space(pipe.compressor(images.to(pipe.device)), pipe.latent_space)
    g = generators(seed, pipe.device)
    return stage_b_and_a(pipe, y, prompts or [""] * len(y), negative_prompt, g, progress, steps_b,
                         guidance_b, temperature_b)


@torch.no_grad()
def image_to_image(pipe, images, prompts, strength=0.6, negative_prompt="", seed=0,
                   steps_c=DEFAULT_STAGE_C_TIMESTEPS, guidance_c=4.0, steps_b=None, guidance_b=None,
                   temperature_b=None, progress=True):
    """Noise each image's Stage C latent to t = strength, then denoise it with the prompt (the rest
    of the Stage C grid below `strength`), then Stage B and A as usual. strength 1 = text-to-image,
    0 = variation."""
    with loaded(pipe, "compressor"):
        y0 = to_stage_c_space(pipe.compressor(images.to(pipe.device)), pipe.latent_space)
    g = generators(seed, pipe.device)
    grid = timestep_grid(steps_c) if isinstance(steps_c, int) else list(steps_c)
    timesteps = [strength] + [t for t in grid if t < strength]  # the strength, then on the grid
    t0 = torch.full((len(y0),), strength, device=pipe.device)
    y = add_noise(y0, t0, randn(y0.shape, g, pipe.device))
    with loaded(pipe, "text_encoder_c", "stage_c"):
        cond = {"clip_text": pipe.text_encoder_c.encode(prompts)}
        uncond = {"clip_text": pipe.text_encoder_c.encode([negative_prompt] * len(prompts))}
        y = ddpm_sample(pipe.stage_c, y, timesteps, cond, uncond, guidance_c, g, progress)
    return stage_b_and_a(pipe, y, prompts, negative_prompt, g, progress, steps_b, guidance_b,
                         temperature_b)


@torch.no_grad()
def stage_a_reconstruction(pipe, images):
    """Stage A alone, to check a checkpoint: encode -> decode (unquantised, as v2 decodes)."""
    with loaded(pipe, "stage_a"):
        images = images.to(pipe.device)
        return pipe.stage_a.decode(pipe.stage_a.encode(images)).float().clamp(0, 1)


@torch.no_grad()
def toy_eval(pipe, n=4, seed=0, look="bold", colors=None, width=128, height=128, **kwargs):
    """Prompt following on the toy data of `look`: n images for every colour x shape prompt (of the
    shape colours `colors` when given), read back with data.classify_toy_image. Returns (images,
    captions, {'colour': acc, 'shape': acc, 'both': acc, chance levels, n})."""
    prompts, targets = zip(*[(p, (c, s)) for p, c, s in toy_prompts(look, colors)])
    images = text_to_image(pipe, list(prompts), n=n, seed=seed, width=width, height=height,
                           **kwargs)
    targets = [t for t in targets for _ in range(n)]
    colour, shape = toy_prompt_following(images, targets, look)
    both = sum(classify_toy_image(img, look) == t for img, t in zip(images, targets)) / len(targets)
    n_colors, n_shapes = len(LOOKS[look]["colors"]), len(LOOKS[look]["shapes"])
    return images, [p for p in prompts for _ in range(n)], {
        "colour": colour, "shape": shape, "both": both, "chance_colour": 1 / n_colors,
        "chance_shape": 1 / n_shapes, "chance_both": 1 / (n_colors * n_shapes),
        "images": len(targets)}

# -----------------------------------------------------------------------------
# the released weights (method §8), found and checked by pretrained.py; export (export.py)


def load_released(root=None, device="cpu", dtype=None, open_clip_text=False, decoder_cfg=None):
    """A Pipeline over the released Würstchen v2 weights (method §8) or an export of ours, loaded
    lazily (Pipeline.loaders) in `dtype` (default: sampling_dtype): pretrained.open_released finds
    them (pretrained.RELEASED_LAYOUT), checks the method's constants and reads the latent space and
    training sizes (released: 42 / 1, 1024 px); each model comes from its class's from_pretrained.
    open_clip_text: the open_clip towers instead of the repositories' transformers text encoders
    (same weights). decoder_cfg: the StageBConfig of an official model_v2_stage_b.pt that is not
    the released size. A folder with v1's model_stage_b.pt (Paella) gives the v1 chain
    (load_released_v1)."""
    if is_released_v1(root):
        return load_released_v1(root, device, dtype, open_clip_text, decoder_cfg)
    device = torch.device(device)
    dtype = dtype or sampling_dtype(device)
    released = open_released(root, open_clip_text)
    paths = released["paths"]
    builders = released["builders"] | {
        "stage_c": lambda: StageC.from_pretrained(paths["stage_c"]),
        "stage_b": lambda: StageB.from_pretrained(paths["stage_b"], decoder_cfg),
        "stage_a": lambda: StageA.from_pretrained(paths["stage_a"])}
    if paths["compressor"]:
        builders["compressor"] = lambda: SemanticCompressor.from_pretrained(paths["compressor"])
    return Pipeline(latent_space=released["latent_space"], device=device,
                    image_sizes=released["image_sizes"], dtype=dtype,
                    loaders=lazy_loaders(builders, device, dtype))


def load_released_v1(root, device="cpu", dtype=None, open_clip_text=False, paella_cfg=None):
    """A Pipeline over the official Würstchen v1 files in `root` (pretrained.V1_LAYOUT; method
    §1.4, §8.1): the prior of model_stage_c.pt (EMA weights; CLIP ViT-H text, c_cond 1024), the
    token Stage B (Paella) and the EfficientNetV2-L compressor of model_stage_b.pt, and the VQGAN,
    loaded lazily as load_released does. Both stages read the same CLIP ViT-H text, as in v1.
    v1's compressor returns (e + 1) / 42 itself, the space of its prior and of Paella's condition:
    e = y (scale 1, shift 0). Its defaults are the v1 notebook's (CHAIN_DEFAULTS['v1'], 512 px).
    paella_cfg: the PaellaConfig of a model_stage_b.pt that is not v1's size."""
    device, dtype = torch.device(device), dtype or sampling_dtype(device)
    released = open_released_v1(root, open_clip_text)
    paths, text_encoder = released["paths"], released["builders"]["text_encoder"]
    builders = {"text_encoder_c": text_encoder, "text_encoder_b": text_encoder,
                "stage_c": lambda: StageC.from_pretrained(paths["stage_c"]),
                "stage_b": lambda: Paella.from_pretrained(paths["stage_b"], paella_cfg),
                "stage_a": lambda: StageA.from_pretrained(paths["stage_a"]),
                "compressor": lambda: SemanticCompressor.from_pretrained(paths["stage_b"])}
    return Pipeline(latent_space=V1_LATENT_SPACE, device=device,
                    image_sizes={"c": 512, "b": 512}, dtype=dtype,
                    loaders=lazy_loaders(builders, device, dtype), release="v1")


def lazy_loaders(builders, device, dtype):
    """name -> a function that builds the model from its file, on the device, in dtype, frozen:
    Pipeline.loaders, called by `loaded` when a stage needs the model."""
    return {k: (lambda build=build: frozen(build(), device, dtype))
            for k, build in builders.items()}


def export(pipe, root, old_diffusers=False):
    """Write the models of `pipe` (our checkpoints' EMA weights, or a released or exported folder)
    in the released layout under `root`, weights in safetensors, speaking the released latent space
    (export.py): what diffusers' Würstchen pipelines and `--pretrained` read. model_index.json is
    for diffusers >= 0.38, or with `old_diffusers` before it. What diffusers cannot represent is
    refused by name before anything is written. Returns the two folders."""
    check_exportable(pipe.stage_b, pipe.stage_a, (pipe.text_encoder_b, pipe.text_encoder_c),
                     pipe.release)
    prior, decoder = repo_folders(root)
    with new_folder(root) as partial:  # root itself appears when the export is complete
        with loaded(pipe, "stage_c", "text_encoder_c"):
            write_prior(partial, pipe.stage_c, pipe.text_encoder_c, pipe.image_sizes["c"],
                        old_diffusers)
        with loaded(pipe, "stage_b", "stage_a", "text_encoder_b"):
            write_decoder(partial, pipe.stage_b, pipe.stage_a, pipe.text_encoder_b,
                          pipe.latent_space, pipe.image_sizes["b"], old_diffusers, prior)
        if pipe.compressor is not None or "compressor" in (pipe.loaders or {}):
            with loaded(pipe, "compressor"):
                write_compressor(partial, pipe.compressor, pipe.latent_space)
    return prior, decoder

# -----------------------------------------------------------------------------
# CLI


def read_prompt_file(path, flag):
    """The prompts of a text file, one per line (blank lines skipped); a missing or non-UTF-8
    file is a one-line UsageError naming `flag`."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file (a text file, one prompt per line)")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path} is not UTF-8 text (one prompt per line)") from None


def read_prompts(args):
    files = read_prompt_file(args.prompts_file, "--prompts_file") if args.prompts_file else []
    return list(args.prompt or []) + files


def our_checkpoints(args, stages="abc"):
    """{stage: path} of our checkpoints: with --pretrained those --stage_a/b/c give (each replaces
    the released stage), else for the `stages` used the one given or where training writes it."""
    given = {k: getattr(args, f"stage_{k}") for k in "abc"}
    if args.pretrained is not None:
        return {k: path for k, path in given.items() if path}
    return {k: given[k] or f"out/stage_{k}/ckpt.pt" for k in stages}


def check_chain_args(args, stages):
    """What the chain flags name, before any model is loaded (one-line UsageErrors): our
    checkpoints (missing, or another stage's), --open_clip without --pretrained, the LoRA files
    (--lora: a folder is resolved to its file)."""
    for k, path in our_checkpoints(args, stages).items():
        load_checkpoint(path, f"stage_{k}", mmap=True)
    if args.open_clip and args.pretrained is None:
        raise UsageError("--open_clip picks the text towers of --pretrained weights: give "
                         "--pretrained [DIR]")
    args.lora = [lora_file(path) for path in args.lora or []]


def stages_needed(args):
    """The stages a run samples with: Stage A alone to reconstruct, A and B for variations, all
    three otherwise (text-to-image, image-to-image, --eval_toy, --export)."""
    return "a" if args.reconstruct else "ab" if args.variation else "abc"


def check_args(args):
    """Everything the flags name, checked before any model is loaded, each mistake a UsageError of
    one line: the prompts a mode needs, the input images (read as training reads them), our
    checkpoints (of the right stage), the LoRA files (--lora: a folder is resolved to its file),
    output folders that can be written, and flags that need another."""
    if args.init_image or not (args.export or args.reconstruct or args.variation or args.eval_toy):
        if not read_prompts(args):
            raise UsageError(("--init_image needs" if args.init_image else "give") + ' --prompt '
                             '"..." (repeatable) or --prompts_file FILE (one prompt per line)')
    for flag in ("variation", "init_image", "reconstruct"):
        for path in getattr(args, flag) or []:
            reason = ("does not exist" if not os.path.exists(path) else "is a folder, not an image"
                      if os.path.isdir(path) else inspect_image(path)[0])
            if reason:
                raise UsageError(f"--{flag} {path}: {reason}")
    check_chain_args(args, stages_needed(args))
    if args.eval_colors and not args.eval_toy:
        raise UsageError("--eval_colors picks prompts of --eval_toy: give --eval_toy [LOOK]")
    check_colors(args.eval_colors, args.eval_toy or "bold", "--eval_colors")
    if args.export:
        check_output_dir(args.export, "--export")
        check_new_folder(args.export)
    else:
        check_output_dir(args.out_dir, "--out_dir")


def read_images(paths, width, height):
    return torch.stack([load_image(p, (width, height)) for p in paths])


def save_outputs(images, captions, out_dir, name):
    """One grid (with captions) plus every image on its own."""
    os.makedirs(out_dir, exist_ok=True)
    grid = os.path.join(out_dir, f"{name}.png")
    save_captioned_grid(images, captions, grid, ncol=min(len(images), 6))
    for i, img in enumerate(images):
        Image.fromarray(img.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()).save(
            os.path.join(out_dir, f"{name}_{i:03d}.png"))
    print(f"wrote {grid} and {len(images)} images {name}_000.png ... in {out_dir}")


def open_pipeline(args, device, dtype, stages="abc"):
    """Our checkpoints (--stage_a/b/c; only the `stages` needed), or with --pretrained the released
    weights or an export of ours, where --stage_a/b/c, when given, put ours instead; --lora merged
    in."""
    ours = our_checkpoints(args)
    if args.pretrained is None:
        pipe = load_pipeline(*ours.values(), device, stages, dtype)
    else:
        try:  # --pretrained "" = the Hugging Face cache
            pipe = load_released(args.pretrained or None, device, dtype, args.open_clip)
        except FileNotFoundError as e:
            raise UsageError(f"--pretrained: {e}") from None
        what = "the official Würstchen v1 files (Paella Stage B)" if pipe.release == "v1" else \
            "weights in the released layout"
        print(f"{what} from {args.pretrained or 'the Hugging Face cache'} "
              f"({'open_clip' if args.open_clip else 'transformers'} text encoders), "
              f"{str(dtype).removeprefix('torch.')} on {device}, each stage loaded when needed"
              + "".join(f"; Stage {k.upper()} from {path}" for k, path in ours.items()))
        for stage, path in ours.items():  # ours instead of theirs: e.g. a fine-tuned Stage C
            add_checkpoint(pipe, stage, path)
    apply_loras(pipe, args.lora or [], args.lora_scale)
    return pipe


def main(args):
    check_args(args)
    if args.export:  # a conversion of the weights as they are stored: on the CPU, in float32
        folders = export(open_pipeline(args, torch.device("cpu"), torch.float32), args.export,
                         args.old_diffusers)
        print(f"wrote {' and '.join(folders)}: diffusers' Würstchen pipelines read them (README "
              f"'Use your model in diffusers'), and so does `sample.py --pretrained {args.export}`")
        return
    device = pick_device(args.device)
    dtype = sampling_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    t0 = time.time()
    pipe = open_pipeline(args, device, dtype, stages_needed(args))
    # flags left unset take the chain's defaults (CHAIN_DEFAULTS)
    chain = {k: v if getattr(args, k) is None else getattr(args, k)
             for k, v in CHAIN_DEFAULTS[pipe.release].items()}
    steps_c = chain["steps_c"] or DEFAULT_STAGE_C_TIMESTEPS
    guidance_c, negative_prompt = chain["guidance_c"], chain["negative_prompt"]
    width, height, _, note = round_size(args.width or args.height or pipe.image_size,
                                        args.height or args.width or pipe.image_size)
    if note:
        print(note)
    if args.reconstruct:
        x = read_images(args.reconstruct, width, height).to(device)
        out = stage_a_reconstruction(pipe, x)
        print(f"Stage A reconstruction PSNR {psnr(out, x):.2f} dB")
        save_outputs(torch.cat([x, out]), args.reconstruct + ["(reconstruction)"] * len(x),
                     args.out_dir, "reconstruct")
        return
    common = dict(seed=args.seed, steps_b=args.steps_b, guidance_b=args.guidance_b,
                  temperature_b=args.temperature_b and tuple(args.temperature_b))
    if args.eval_toy:
        images, captions, acc = toy_eval(pipe, n=args.n, look=args.eval_toy,
                                         colors=args.eval_colors, width=width, height=height,
                                         steps_c=steps_c, guidance_c=guidance_c,
                                         negative_prompt=negative_prompt, **common)
        print(json.dumps({k: round(v, 3) for k, v in acc.items()}))
        save_outputs(images, captions, args.out_dir, "eval_toy")
        with open(os.path.join(args.out_dir, "eval_toy.json"), "w") as f:
            json.dump(acc, f, indent=1)
        return
    prompts = read_prompts(args)
    if args.variation or args.init_image:
        paths = args.variation or args.init_image
        # every (image, prompt) pair, cycling the shorter list; --n of each: (N * n, 3, H, W)
        pairs = [(k % len(paths), prompts[k % len(prompts)] if prompts else "")
                 for k in range(max(len(paths), len(prompts)))]
        x = read_images(paths, width, height)[[i for i, _ in pairs]].repeat_interleave(args.n, 0)
        texts = [p for _, p in pairs for _ in range(args.n)]
        if args.variation:
            images = image_variation(pipe, x, texts, negative_prompt, **common)
            captions = [f"variation of {os.path.basename(paths[i])}" + (f": {p}" if p else "")
                        for i, p in pairs for _ in range(args.n)]
        else:
            images = image_to_image(pipe, x, texts, args.strength, negative_prompt,
                                    steps_c=steps_c, guidance_c=guidance_c, **common)
            captions = texts
    else:
        images = text_to_image(pipe, prompts, negative_prompt, args.n, width, height,
                               steps_c=steps_c, guidance_c=guidance_c, **common)
        captions = [p for p in prompts for _ in range(args.n)]
    save_outputs(images, captions, args.out_dir, "samples")
    print(f"{len(images)} images of {images.shape[-1]}x{images.shape[-2]} in "
          f"{time.time() - t0:.1f}s on {device}")


def add_chain_args(p):
    """The flags that pick and run the chain, sample.py's and evaluate.py sample's: the checkpoints
    or released weights, LoRA files, the sampler's settings, device and dtype."""
    p.add_argument("--negative_prompt", default=None, help="what guidance steers away from, in "
                   "Stage C and Stage B (default: none; the v1 files: the v1 notebook's)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="image width, rounded to 128-pixel steps (default: --height if given, else "
                   "the training size of the last stage used: C's, else B's, else A's)")
    p.add_argument("--height", type=positive_int, default=None,
                   help="image height, rounded to 128-pixel steps (default: --width if given, "
                   "else that training size)")
    p.add_argument("--steps_c", type=nonnegative_int, default=None,
                   help="Stage C steps, 0 = the released 29-step grid (default: 0; the v1 files: "
                   "60)")
    p.add_argument("--guidance_c", type=nonnegative_float, default=None,
                   help="Stage C classifier-free guidance scale (default: 4; the v1 files: 6)")
    p.add_argument("--steps_b", type=positive_int, default=None,
                   help="Stage B steps (default: its kind's, 12 DDPM steps for DiffNeXt, 8 for "
                   "Paella)")
    p.add_argument("--guidance_b", type=nonnegative_float, default=None,
                   help="Stage B guidance scale (default: its kind's). DiffNeXt: off as released, "
                   "<= 1 = off; Paella (v1): w = 2, and w lerps logits_u to logits_c (0 = "
                   "unconditional, 1 = conditional only)")
    for k in "abc":
        p.add_argument(f"--stage_{k}", default=None, help=f"Stage {k.upper()} checkpoint (default: "
                       f"out/stage_{k}/ckpt.pt; with --pretrained: replaces that stage, e.g. a "
                       "fine-tuned one)")
    p.add_argument("--lora", action="append", metavar="PATH", help="a LoRA file or its folder "
                   "(pytorch_lora_weights.safetensors of a --lora_rank run, or one diffusers' "
                   "load_lora_weights reads), merged into the models its keys name: the prior "
                   "(Stage C) and its text encoder, or the decoder (Stage B); repeatable")
    p.add_argument("--lora_scale", type=finite_float, default=1.0,
                   help="weight of the --lora updates (1 = as trained)")
    p.add_argument("--pretrained", type=existing_folder, nargs="?", const="", default=None,
                   metavar="DIR", help="use the released Würstchen v2 weights instead of our "
                   "checkpoints: from DIR (warp-ai/wuerstchen-prior and warp-ai/wuerstchen in "
                   "DIR/wuerstchen-prior and DIR/wuerstchen, or an --export of ours), or without "
                   "DIR from the Hugging Face cache; a DIR with the official v1 files "
                   "(model_stage_b.pt ...) runs the v1 chain")
    p.add_argument("--open_clip", action="store_true", help="with --pretrained: the open_clip text "
                   "towers (ViT-bigG-14 laion2b_s39b_b160k, ViT-H-14 laion2b_s32b_b79k) instead of "
                   "the repositories' text_encoder/ folders")
    p.add_argument("--device", default="auto", type=device_name,
                   help="auto | cpu | cuda | cuda:N | mps (torchrun: each rank its GPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on GPUs that support it, else float32; "
                   "never float16, in which bf16-trained weights such as the released ones "
                   "overflow); --pretrained also stores the weights in it")


def get_args(argv=None):
    p = ArgumentParser(description="Sample images from Würstchen checkpoints or the "
                       "released v1 / v2 weights (text -> C -> B -> A).",
                       formatter_class=HelpFormatter)
    p.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts_file", help="text file with one prompt per line")
    p.add_argument("--n", type=positive_int, default=1, help="images per prompt (per input image "
                   "with --variation / --init_image)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    add_chain_args(p)
    p.add_argument("--temperature_b", type=positive_float, nargs=2, default=None,
                   metavar=("FIRST", "LAST"), help="a token Stage B's (Paella's) sampling "
                   "temperature, linear from FIRST to LAST over its steps (default: its kind's, "
                   "1.0 -> 0.6)")
    mode = p.add_mutually_exclusive_group()  # what is sampled; none: text-to-image
    mode.add_argument("--variation", nargs="+",
                      help="image(s) to make variations of (no prompt needed)")
    mode.add_argument("--init_image", nargs="+", help="image(s) for image-to-image with --prompt")
    p.add_argument("--strength", type=probability, default=0.6,
                   help="image-to-image: noise level to start from (0..1)")
    mode.add_argument("--reconstruct", nargs="+",
                      help="image(s) to pass through Stage A only (encode -> decode)")
    mode.add_argument("--eval_toy", nargs="?", const="bold", choices=["bold", "light", "bold_pink"],
                      metavar="LOOK", help="measure prompt following on the toy vocabulary (of the "
                      "look: bold, the default, light, or bold_pink: bold and the colour pink)")
    p.add_argument("--eval_colors", nargs="+", default=None, help="--eval_toy: only the prompts of "
                   "these shape colours (e.g. pink: the word a fine-tune taught)")
    p.add_argument("--out_dir", default="out/samples",
                   help="where the grid and the single images go")
    mode.add_argument("--export", metavar="DIR", help="write the models (our checkpoints, or "
                      "--pretrained's) in the released layout, DIR/wuerstchen-prior and "
                      "DIR/wuerstchen, for diffusers' Würstchen pipelines and --pretrained DIR; "
                      "nothing is sampled")
    p.add_argument("--old_diffusers", action="store_true", help="with --export: "
                   "model_index.json for diffusers before 0.38 (models in the library "
                   "'wuerstchen', as released) instead of 0.38 and later "
                   "(diffusers.pipelines.deprecated); none loads in both")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, get_args())
