"""
Sample from Würstchen: text -> Stage C -> Stage B -> Stage A -> PNG (method.md §7).

    prompt --CLIP text--> Stage C (CFG, DDPM) --> y (16, h, w) --e = y*scale - shift--> Stage B (DDPM)
           --> Stage A latent (4, 10.67h, 10.67w) --Stage A decode (unquantised)--> image (3, 42.67h, 42.67w)

The three models are rebuilt from their checkpoints alone (configs + EMA weights), found where the training
scripts write them. The same code also does image variation (image -> semantic compressor -> B -> A),
image-to-image (noise the image's Stage C latent to a strength, denoise with the prompt) and reconstruction
(image -> Stage A encode -> decode, to check a Stage A).

    python sample.py --prompt "a red circle on a blue background" --n 4
    python sample.py --prompts_file prompts.txt --width 1024 --height 1536 --seed 3
    python sample.py --variation photo.png        |  python sample.py --init_image photo.png --prompt "..." --strength 0.6
    python sample.py --reconstruct photo.png      |  python sample.py --eval_toy   (prompt following on toy data)
"""
import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from stage_a import load_stage_a, psnr
from stage_b import DEFAULT_STAGE_C_TIMESTEPS, add_noise, ddpm_sample, load_stage_b
from stage_c import (decode_stage_c, load_stage_c, sample_stage_c, save_captioned_grid, to_stage_b_space,
                     to_stage_c_space, toy_prompt_following)

RESOLUTION_MULTIPLE = 42.67  # image side / Stage C latent side (3/4 resize x stride 32 of the compressor)
LATENT_DIM_SCALE = 10.67  # Stage A latent side / Stage C latent side (42.67 / Stage A's f4)

# -----------------------------------------------------------------------------
# loading


@dataclass
class Pipeline:
    """The three stages and their text encoders, frozen, from our checkpoints (or the released weights)."""
    stage_a: torch.nn.Module
    stage_b: torch.nn.Module = None
    compressor: torch.nn.Module = None
    text_encoder_b: torch.nn.Module = None
    stage_c: torch.nn.Module = None
    text_encoder_c: torch.nn.Module = None
    latent_space: dict = None  # y = (e + shift) / scale, from the Stage B checkpoint
    device: torch.device = torch.device("cpu")
    image_size: int = 1024  # default output side: Stage C's training size (1024 for the released weights)


def load_pipeline(stage_a="out/stage_a/ckpt.pt", stage_b="out/stage_b/ckpt.pt", stage_c="out/stage_c/ckpt.pt",
                  device="cpu", stages="abc"):
    """Build the stages named in `stages` from their checkpoints; a missing or wrong file names the file and stage."""
    device = torch.device(device)
    pipe = Pipeline(stage_a=load_stage_a(stage_a, device), device=device)
    if "b" in stages:
        parts = load_stage_b(stage_b, device, parts=("compressor", "stage_b", "text_encoder"))
        pipe.compressor, pipe.stage_b = parts["compressor"], parts["stage_b"]
        pipe.text_encoder_b, pipe.latent_space = parts["text_encoder"], parts["latent_space"]
    if "c" in stages:
        parts = load_stage_c(stage_c, device)
        pipe.stage_c, pipe.text_encoder_c = parts["stage_c"], parts["text_encoder"]
        pipe.image_size = parts["ckpt"]["train_config"].get("image_size") or pipe.image_size
        if pipe.latent_space is not None and parts["latent_space"] != pipe.latent_space:
            raise ValueError(f"{stage_c} was trained on a Stage B with latent space {parts['latent_space']}, but "
                             f"{stage_b} has {pipe.latent_space}: pass the Stage B checkpoint it was trained with")
    return pipe

# -----------------------------------------------------------------------------
# sizes


def round_size(width, height):
    """The nearest size the stages produce exactly: the Stage C side n = ceil(side / 42.67) must be a multiple of 3,
    so that Stage B's latent side int(10.67 n) divides through its down-sampling (128-pixel steps, method §7.7).
    Returns (width, height, Stage C latent (h, w), a note when the size changed, else None)."""
    def side(s):
        n = max(3, 3 * round(math.ceil(s / RESOLUTION_MULTIPLE) / 3))
        return int(n * LATENT_DIM_SCALE) * 4, n
    (w, nw), (h, nh) = side(width), side(height)
    note = None if (w, h) == (width, height) else f"size {width}x{height} rounded to {w}x{h} (128-pixel steps)"
    return w, h, (nh, nw), note

# -----------------------------------------------------------------------------
# the chain


@torch.no_grad()
def text_to_image(pipe, prompts, negative_prompt="", n=1, width=1024, height=1024, seed=0,
                  steps_c=DEFAULT_STAGE_C_TIMESTEPS, guidance_c=4.0, steps_b=12, guidance_b=0.0, progress=True):
    """Prompts -> (len(prompts) * n, 3, H, W) images in [0, 1]. Defaults are the released pipelines' (§7.6)."""
    _, _, latent_hw, _ = round_size(width, height)
    prompts = [p for p in prompts for _ in range(n)]  # n images per prompt, next to each other
    g = torch.Generator(pipe.device).manual_seed(seed)
    y = sample_stage_c(pipe.stage_c, pipe.text_encoder_c, prompts, latent_hw, steps_c, guidance_c, negative_prompt,
                       generator=g, progress=progress)
    return decode_stage_c(y, prompts, pipe.stage_b, pipe.text_encoder_b, pipe.latent_space, pipe.stage_a, steps_b,
                          guidance_b, generator=g, progress=progress)


@torch.no_grad()
def image_variation(pipe, images, prompts=None, seed=0, steps_b=12, guidance_b=0.0, progress=True):
    """Images (B, 3, H, W) -> new images with the same semantics: semantic compressor -> Stage B -> Stage A."""
    y = to_stage_c_space(pipe.compressor(images.to(pipe.device)), pipe.latent_space)
    g = torch.Generator(pipe.device).manual_seed(seed)
    return decode_stage_c(y, prompts or [""] * len(y), pipe.stage_b, pipe.text_encoder_b, pipe.latent_space,
                          pipe.stage_a, steps_b, guidance_b, generator=g, progress=progress)


@torch.no_grad()
def image_to_image(pipe, images, prompts, strength=0.6, negative_prompt="", seed=0, steps_c=DEFAULT_STAGE_C_TIMESTEPS,
                   guidance_c=4.0, steps_b=12, guidance_b=0.0, progress=True):
    """Noise each image's Stage C latent to t = strength, then denoise it with the prompt (the rest of the
    Stage C grid below `strength`), then Stage B and A as usual. strength 1 = text-to-image, 0 = variation."""
    y0 = to_stage_c_space(pipe.compressor(images.to(pipe.device)), pipe.latent_space)
    g = torch.Generator(pipe.device).manual_seed(seed)
    grid = torch.linspace(1, 0, steps_c + 1).tolist() if isinstance(steps_c, int) else list(steps_c)
    timesteps = [strength] + [t for t in grid if t < strength]  # start at the strength, continue on the grid
    t0 = torch.full((len(y0),), strength, device=pipe.device)
    y = add_noise(y0, t0, torch.randn(y0.shape, generator=g, device=pipe.device))
    cond = {"clip_text": pipe.text_encoder_c.encode(prompts)}
    uncond = {"clip_text": pipe.text_encoder_c.encode([negative_prompt] * len(prompts))}
    y = ddpm_sample(pipe.stage_c, y, timesteps, cond, uncond, guidance_c, g, progress)
    return decode_stage_c(y, prompts, pipe.stage_b, pipe.text_encoder_b, pipe.latent_space, pipe.stage_a, steps_b,
                          guidance_b, generator=g, progress=progress)


@torch.no_grad()
def reconstruct(pipe, images):
    """Stage A alone: encode -> decode (unquantised, as v2 decodes), for checking a Stage A checkpoint."""
    images = images.to(pipe.device)
    return pipe.stage_a.decode(pipe.stage_a.encode(images)).float().clamp(0, 1)


@torch.no_grad()
def toy_eval(pipe, n=4, seed=0, **kwargs):
    """Prompt following on the toy data: n images for every colour x shape prompt, read back with
    data.classify_toy_image. Returns {'colour': acc, 'shape': acc, 'both': acc, chance levels, n}."""
    from data import COLORS, SHAPES, classify_toy_image, toy_prompts
    prompts, targets = zip(*[(p, (c, s)) for p, c, s in toy_prompts()])
    images = text_to_image(pipe, list(prompts), n=n, seed=seed, width=128, height=128, **kwargs)
    targets = [t for t in targets for _ in range(n)]
    colour, shape = toy_prompt_following(images, targets)
    both = sum(classify_toy_image(img) == t for img, t in zip(images, targets)) / len(targets)
    return images, [p for p in prompts for _ in range(n)], {
        "colour": colour, "shape": shape, "both": both, "chance_colour": 1 / len(COLORS),
        "chance_shape": 1 / len(SHAPES), "chance_both": 1 / (len(COLORS) * len(SHAPES)), "images": len(targets)}

# -----------------------------------------------------------------------------
# CLI


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def read_images(paths, width, height):
    from data import load_image
    return torch.stack([load_image(p, min(width, height)) for p in paths])


def save_outputs(images, captions, out_dir, name):
    """One grid (with captions) plus every image on its own."""
    os.makedirs(out_dir, exist_ok=True)
    grid = os.path.join(out_dir, f"{name}.png")
    save_captioned_grid(images, captions, grid, ncol=min(len(images), 6))
    from PIL import Image
    for i, img in enumerate(images):
        Image.fromarray(img.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()).save(
            os.path.join(out_dir, f"{name}_{i:03d}.png"))
    print(f"wrote {grid} and {len(images)} images {name}_000.png ... in {out_dir}")


def main(args):
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    steps_c = args.steps_c if args.steps_c else DEFAULT_STAGE_C_TIMESTEPS
    t0 = time.time()
    stages = "a" if args.reconstruct else "ab" if args.variation else "abc"
    pipe = load_pipeline(args.stage_a, args.stage_b, args.stage_c, device, stages)
    width, height, _, note = round_size(args.width or pipe.image_size, args.height or pipe.image_size)
    if note:
        print(note)
    if args.reconstruct:
        x = read_images(args.reconstruct, width, height).to(device)
        out = reconstruct(pipe, x)
        print(f"Stage A reconstruction PSNR {psnr(out, x):.2f} dB")
        save_outputs(torch.cat([x, out]), args.reconstruct + ["(reconstruction)"] * len(x), args.out_dir, "reconstruct")
        return
    common = dict(seed=args.seed, steps_b=args.steps_b, guidance_b=args.guidance_b)
    if args.eval_toy:
        images, captions, acc = toy_eval(pipe, n=args.n, steps_c=steps_c, guidance_c=args.guidance_c,
                                         negative_prompt=args.negative_prompt, **common)
        print(json.dumps({k: round(v, 3) for k, v in acc.items()}))
        save_outputs(images, captions, args.out_dir, "eval_toy")
        with open(os.path.join(args.out_dir, "eval_toy.json"), "w") as f:
            json.dump(acc, f, indent=1)
        return
    if args.variation:
        x = read_images(args.variation, width, height)
        images = image_variation(pipe, x, **common)
        captions = [f"variation of {os.path.basename(p)}" for p in args.variation]
    else:
        prompts = read_prompts(args)
        if not prompts:
            raise SystemExit("give --prompt \"...\" (repeatable) or --prompts_file FILE (one prompt per line)")
        if args.init_image:
            x = read_images(args.init_image, width, height)
            prompts = (prompts * len(x))[:len(x)]  # one prompt per input image
            images = image_to_image(pipe, x, prompts, args.strength, args.negative_prompt, steps_c=steps_c,
                                    guidance_c=args.guidance_c, **common)
            captions = prompts
        else:
            images = text_to_image(pipe, prompts, args.negative_prompt, args.n, width, height, steps_c=steps_c,
                                   guidance_c=args.guidance_c, **common)
            captions = [p for p in prompts for _ in range(args.n)]
    save_outputs(images, captions, args.out_dir, "samples")
    print(f"{len(images)} images of {images.shape[-1]}x{images.shape[-2]} in {time.time() - t0:.1f}s on {device}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from Würstchen checkpoints (text -> C -> B -> A).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts_file", help="text file with one prompt per line")
    p.add_argument("--negative_prompt", default="", help="what Stage C guidance steers away from")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p.add_argument("--width", type=int, default=None, help="image width, rounded to 128-pixel steps "
                   "(default: Stage C's training size)")
    p.add_argument("--height", type=int, default=None, help="image height, rounded to 128-pixel steps "
                   "(default: Stage C's training size)")
    p.add_argument("--steps_c", type=int, default=0, help="Stage C steps (0 = the released 29-step grid)")
    p.add_argument("--guidance_c", type=float, default=4.0, help="Stage C classifier-free guidance scale")
    p.add_argument("--steps_b", type=int, default=12, help="Stage B steps")
    p.add_argument("--guidance_b", type=float, default=0.0, help="Stage B guidance scale (<= 1 = off, as released)")
    p.add_argument("--variation", nargs="+", help="image(s) to make variations of (no prompt needed)")
    p.add_argument("--init_image", nargs="+", help="image(s) for image-to-image with --prompt")
    p.add_argument("--strength", type=float, default=0.6, help="image-to-image: noise level to start from (0..1)")
    p.add_argument("--reconstruct", nargs="+", help="image(s) to pass through Stage A only (encode -> decode)")
    p.add_argument("--eval_toy", action="store_true", help="measure prompt following on the toy vocabulary")
    p.add_argument("--stage_a", default="out/stage_a/ckpt.pt", help="Stage A checkpoint")
    p.add_argument("--stage_b", default="out/stage_b/ckpt.pt", help="Stage B checkpoint")
    p.add_argument("--stage_c", default="out/stage_c/ckpt.pt", help="Stage C checkpoint")
    p.add_argument("--out_dir", default="out/samples", help="where the grid and the single images go")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(get_args())
