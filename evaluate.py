"""
Measure a text-to-image model as the paper does (Würstchen §4, docs/evaluation.md): sample a prompt
set, one image per prompt, then FID@256, CLIP score and PickScore on the folders of images.

    # COCO-30K: 30,000 validation captions drawn with a fixed seed -> out/coco30k/NNNNNN.png + .txt
    python evaluate.py sample --prompts annotations/captions_val2014.json --n 30000 \\
                              --out_dir out/coco30k --pretrained --paper_settings
    torchrun --nproc_per_node 8 evaluate.py sample ...   # rank r of 8 takes prompts r, r + 8, ...
    python evaluate.py fid out/coco30k coco/val2014 --ref_names out/coco30k/coco_images.txt
    python evaluate.py clip out/coco30k                  # CLIP score (ViT-L/14) on the prompts
    python evaluate.py pick out/coco30k out/sd21         # PickScore: % of prompts preferring X

The image of prompt i is drawn from its own generator, seeded by (seed, i): it does not depend on
the batch size nor on the number of processes, and a second model sampled with the same seed gets
the same starting noise. Images already written are skipped, so an interrupted run goes on where it
stopped. Any chain sample.py opens can be measured: our checkpoints, --pretrained, --lora.

Sampling needs only requirements.txt. The metrics (metrics.py) need requirements-eval.txt
(torchmetrics on torch-fidelity's Inception-v3 for FID; transformers' CLIP towers for the CLIP
score and PickScore), imported only when a metric runs, and weights fetched on first use.
"""
import hashlib
import importlib.util
import json
import os
import random
import time

import torch
from PIL import Image
from tqdm import tqdm

from common import (ArgumentParser, HelpFormatter, UsageError, check_output_dir, device_name,
                    nonnegative_int, pick_device, positive_int, run_cli, setup_runtime)
from metrics import (CLIP_SCORE_MODEL, INCEPTION, PICKSCORE_MODEL, PICKSCORE_PROCESSOR, clip_model,
                     clip_score, fid, fid_metric, image_files, pick_preference, prompts_of)
from sample import (CHAIN_DEFAULTS, add_chain_args, check_chain_args, open_pipeline,
                    read_prompt_file, round_size, sampling_dtype, text_to_image)

# -----------------------------------------------------------------------------
# prompt sets

# The paper's evaluation sampler (§4): DDPM, Stage C 60 steps (the linear grid), Stage B 12,
# classifier-free guidance 4, 1024 x 1024
PAPER_SETTINGS = dict(steps_c=60, steps_b=12, guidance_c=4.0, size=1024)


def read_prompt_set(path, n=None, seed=0):
    """The prompts of a text file (one a line; the first n), or n captions of COCO's
    captions_val*.json drawn at random with `seed` (the paper's COCO-30K draws 30,000), from all
    captions in the order of their ids, so that every machine draws the same. Returns (prompts,
    the COCO image file of each caption, or None for a text file)."""
    if not path.endswith(".json"):
        prompts = read_prompt_file(path, "--prompts")
        return prompts[:n] if n else prompts, None
    with open(path, encoding="utf-8") as f:
        coco = json.load(f)
    captions = sorted(coco["annotations"], key=lambda a: a["id"])
    if n and n > len(captions):
        raise UsageError(f"--n {n}: {path} has {len(captions)} captions")
    drawn = random.Random(seed).sample(captions, n) if n else captions
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    return [" ".join(a["caption"].split()) for a in drawn], [files[a["image_id"]] for a in drawn]

# -----------------------------------------------------------------------------
# sampling a prompt set


def image_seed(seed, i):
    """The seed of prompt i's image: a function of (seed, i) alone."""
    return seed * 2**32 + i


def image_path(out_dir, i):
    return os.path.join(out_dir, f"{i:06d}.png")


def write_image(image, out_dir, i, prompt):
    """Image i (3, H, W) in [0, 1] as NNNNNN.png, its prompt beside it in NNNNNN.txt. The PNG is
    written under another name and renamed, so that an interrupted run leaves no half image."""
    with open(os.path.join(out_dir, f"{i:06d}.txt"), "w", encoding="utf-8") as f:
        f.write(prompt + "\n")
    path = image_path(out_dir, i)
    pixels = image.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    Image.fromarray(pixels).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def sample_prompt_set(pipe, prompts, out_dir, seed=0, batch_size=8, rank=0, world_size=1,
                      progress=True, **chain):
    """One image per prompt into out_dir, in batches. Rank r of world_size takes the prompts
    i = r, r + world_size, ... (no two ranks the same) whose image is not there yet. `chain`:
    text_to_image's settings. Returns the indices this call wrote."""
    todo = [i for i in range(rank, len(prompts), world_size)
            if not os.path.exists(image_path(out_dir, i))]
    bar = tqdm(total=len(todo), unit="img", disable=not progress,
               desc=f"rank {rank} of {world_size}" if world_size > 1 else "sampling")
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        # a generator per image: each image is the same in any batch
        seeds = [image_seed(seed, i) for i in batch]
        images = text_to_image(pipe, [prompts[i] for i in batch], seed=seeds, progress=False,
                               **chain)
        for i, image in zip(batch, images):
            write_image(image, out_dir, i, prompts[i])
        bar.update(len(batch))
    bar.close()
    return todo


def chain_settings(args, pipe):
    """text_to_image's settings, and a note when the size was rounded: the flags given, then with
    --paper_settings the paper's, then the chain's defaults (sample.CHAIN_DEFAULTS: the released
    pipelines', or the v1 notebook's for the v1 files; Stage B: its kind's)."""
    flags = {k: getattr(args, k) for k in ("steps_c", "guidance_c", "steps_b", "guidance_b",
                                            "negative_prompt", "width", "height")}
    paper = PAPER_SETTINGS if args.paper_settings else {}
    flags = {k: paper.get(k) if v is None else v for k, v in flags.items()}
    chain = {k: v if flags[k] is None else flags[k]
             for k, v in CHAIN_DEFAULTS[pipe.release].items()}
    chain |= {"steps_b": flags["steps_b"], "guidance_b": flags["guidance_b"]}
    if not chain["steps_c"]:  # 0: the released 29-step grid, text_to_image's default
        del chain["steps_c"]
    side = flags["width"] or flags["height"] or paper.get("size") or pipe.image_size  # a square
    chain["width"], chain["height"], _, note = round_size(flags["width"] or side,
                                                          flags["height"] or side)
    return chain, note


def keep_resident(pipe):
    """Load the released weights' models once, not at every batch (sample.loaded loads them when
    needed and frees them after, so that one stage at a time fits a 24 GB GPU): all five at once
    are 3.1 B parameters, 6.2 GB in bf16."""
    names = [n for n in ("text_encoder_c", "stage_c", "text_encoder_b", "stage_b", "stage_a")
             if getattr(pipe, n) is None and n in (pipe.loaders or {})]
    for name in names:
        setattr(pipe, name, pipe.loaders[name]())
    return names


def check_settings(out_dir, settings, master):
    """out_dir/settings.json says how its images were sampled; images of other settings in the same
    folder would not be one sample, so they are refused."""
    path = os.path.join(out_dir, "settings.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            was = json.load(f)
        if was != settings:
            diff = {k: (was.get(k), settings.get(k)) for k in was.keys() | settings.keys()
                    if was.get(k) != settings.get(k)}
            raise UsageError(f"{out_dir} holds images sampled with other settings "
                             f"(was, now: {diff}): use another --out_dir")
    elif master:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def check_sample_args(args):
    """What `sample` names, checked before any model is loaded (one-line UsageErrors): the prompt
    set, the chain's files (sample.check_chain_args), the output folder."""
    if not os.path.isfile(args.prompts):
        raise UsageError(f"--prompts {args.prompts}: no such file (a text file, one prompt a line, "
                         f"or COCO's captions_val*.json)")
    check_chain_args(args, "abc")
    check_output_dir(args.out_dir, "--out_dir")


def main_sample(args):
    check_sample_args(args)
    rt = setup_runtime(args.device, "float32", args.seed)  # torchrun: this rank's device
    dtype = sampling_dtype(rt.device) if args.dtype == "auto" else getattr(torch, args.dtype)
    prompts, coco_files = read_prompt_set(args.prompts, args.n, args.prompt_seed)
    pipe = open_pipeline(args, rt.device, dtype)
    if keep_resident(pipe) and rt.master:
        print("evaluate.py keeps them all in memory: loaded once")
    chain, note = chain_settings(args, pipe)
    batch_size = args.batch_size
    if rt.master and note:
        print(note)
    files = {k: getattr(args, k) and os.path.abspath(getattr(args, k))
             for k in ("stage_a", "stage_b", "stage_c")}
    model = files | {"pretrained": args.pretrained, "lora": args.lora,
                     "lora_scale": args.lora_scale, "open_clip": args.open_clip}
    prompt_set = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    settings = {"prompt_set": prompt_set, "n": len(prompts), "seed": args.seed, "model": model,
                "dtype": str(dtype).removeprefix("torch."), **chain}
    os.makedirs(args.out_dir, exist_ok=True)
    check_settings(args.out_dir, settings, rt.master)
    if rt.master:  # the prompt set in order (and for COCO each caption's image: FID's reference)
        lists = {"prompts.txt": prompts, "coco_images.txt": coco_files or []}
        for name, lines in lists.items():
            if lines:
                with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
    t0 = time.time()
    written = sample_prompt_set(pipe, prompts, args.out_dir, args.seed, batch_size, rt.rank,
                                rt.world_size, progress=rt.master, **chain)
    seconds = time.time() - t0
    share = len(range(rt.rank, len(prompts), rt.world_size))
    print(f"rank {rt.rank}/{rt.world_size}: {len(written)} images written, "
          f"{share - len(written)} already there, {seconds:.1f} s "
          f"({len(written) / max(seconds, 1e-9):.3f} images/s, batch {batch_size})")
    if rt.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rt.master:
        done = sum(os.path.exists(image_path(args.out_dir, i)) for i in range(len(prompts)))
        print(f"{args.out_dir}: {done} of {len(prompts)} images")

# -----------------------------------------------------------------------------
# CLI


def generated(folder):
    """The generated images of a folder of `sample` (NNNNNN.png) and their prompts."""
    files = [p for p in image_files(folder) if os.path.exists(os.path.splitext(p)[0] + ".txt")]
    if not files:
        raise UsageError(f"{folder} has no NNNNNN.png with its NNNNNN.txt (evaluate.py sample)")
    return files, prompts_of(files)


def main(args):
    if args.command == "sample":
        return main_sample(args)
    library = "torchmetrics" if args.command == "fid" else "transformers"
    if importlib.util.find_spec(library) is None:
        raise UsageError(f"{args.command} needs {library}: pip install -r requirements-eval.txt")
    device = pick_device(args.device)
    loader = dict(batch_size=args.batch_size, num_workers=args.num_workers)
    if args.command == "fid":
        gen, ref = image_files(args.gen_dir), image_files(args.ref_dir, args.ref_names)
        value = fid(gen, ref, args.size, device, fid_metric(device, weights=args.inception),
                    **loader)
        result = {"fid": value, "size": args.size, "generated": len(gen), "reference": len(ref)}
    elif args.command == "clip":
        files, prompts = generated(args.gen_dir)
        model, processor = clip_model(args.clip_model, device=device)
        result = {"clip_score": clip_score(files, prompts, model, processor, **loader),
                  "model": args.clip_model, "images": len(files)}
    else:  # pick: the same NNNNNN names and prompts in both folders
        files_x, prompts = generated(args.gen_dir_x)
        files_y = [os.path.join(args.gen_dir_y, os.path.basename(p)) for p in files_x]
        missing = [p for p in files_y if not os.path.exists(p)]
        if missing:
            raise UsageError(f"{args.gen_dir_y} lacks {len(missing)} of the {len(files_x)} images "
                             f"of {args.gen_dir_x} (first: {os.path.basename(missing[0])})")
        if (all(os.path.exists(os.path.splitext(p)[0] + ".txt") for p in files_y)
                and prompts_of(files_y) != prompts):
            raise UsageError(f"{args.gen_dir_x} and {args.gen_dir_y} are not the same prompts")
        model, processor = clip_model(args.pick_model, args.pick_processor, device)
        result = pick_preference(files_x, files_y, prompts, model, processor, **loader)
        result |= {"x": args.gen_dir_x, "y": args.gen_dir_y, "prompts": len(prompts)}
    print(json.dumps(result))


def get_args(argv=None):
    p = ArgumentParser(description="Sample a prompt set with a Würstchen chain, and "
                                "measure folders of images: FID@256, CLIP score, PickScore.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", formatter_class=HelpFormatter, help="one image per prompt: "
                       "OUT_DIR/NNNNNN.png and NNNNNN.txt (torchrun: split over the ranks)")
    s.add_argument("--prompts", required=True, help="a text file (one prompt a line) or COCO's "
                   "captions_val*.json")
    s.add_argument("--n", type=positive_int, default=None, help="how many prompts: the first n "
                   "of a text file, n captions drawn with --prompt_seed from COCO (default: all)")
    s.add_argument("--prompt_seed", type=int, default=0, help="the seed of the COCO draw")
    s.add_argument("--out_dir", required=True, help="where the images go")
    s.add_argument("--seed", type=int, default=0, help="image i is drawn from seed (seed, i)")
    s.add_argument("--batch_size", type=positive_int, default=8,
                   help="images per batch (each rank)")
    s.add_argument("--paper_settings", action="store_true", help="the paper's evaluation "
                   "settings: Stage C 60 steps, Stage B 12, guidance 4, 1024 x 1024 (flags given "
                   "win; --width or --height alone: a square)")
    add_chain_args(s)  # as sample.py's
    f = sub.add_parser("fid", formatter_class=HelpFormatter,
                       help="FID@256 of generated images against reference images")
    f.add_argument("gen_dir")
    f.add_argument("ref_dir", help="reference images (searched recursively), e.g. COCO val2014/")
    f.add_argument("--ref_names", help="only the reference images named in this file, e.g. "
                   "GEN_DIR/coco_images.txt: the images of the drawn captions")
    f.add_argument("--size", type=positive_int, default=256, help="both sets centre-cropped and "
                   "resized to this side first (FID@256)")
    f.add_argument("--inception", default=None, help=f"a local copy of {INCEPTION} (default: "
                   "the torch hub cache, fetched on first use)")
    c = sub.add_parser("clip", formatter_class=HelpFormatter,
                       help="CLIP score of generated images on their prompts")
    c.add_argument("gen_dir")
    c.add_argument("--clip_model", default=CLIP_SCORE_MODEL, help="a CLIP repository or folder")
    k = sub.add_parser("pick", formatter_class=HelpFormatter, help="PickScore: the share of "
                       "prompts whose image from X is preferred over Y's")
    k.add_argument("gen_dir_x")
    k.add_argument("gen_dir_y", help="the same NNNNNN.png names: the same prompts (and seeds)")
    k.add_argument("--pick_model", default=PICKSCORE_MODEL, help="repository or folder")
    k.add_argument("--pick_processor", default=PICKSCORE_PROCESSOR, help="repository or folder")
    for m in (f, c, k):
        m.add_argument("--batch_size", type=positive_int, default=50, help="images per batch")
        m.add_argument("--num_workers", type=nonnegative_int, default=4,
                       help="image-decoding processes")
        m.add_argument("--device", default="auto", type=device_name, help="auto | cpu | cuda | mps")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, get_args())
