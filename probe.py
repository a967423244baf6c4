"""
What Stage B's semantic latent knows, and what Stage B draws from it, on held-out toy images
(docs/stage_b_layout.md). Two measurements, printed as one JSON line:

- probe_accuracy: a classifier of the toy shape class fitted on the compressor's e (16x3x3 at
  128 px) of training images, scored on held-out ones, beside the same probe on the pixels
  averaged down to the latent's side. If e carries the shape and Stage B still draws blobs, the
  decoder is the bottleneck; if e does not, the compressor is.
- draw_from: each held-out image's Stage A latent noised to t0, then Stage B's DDPM from t0 to 0,
  conditioned on e and the caption, decoded by Stage A. t0 = 1 is pure noise: the reconstruction
  the chain relies on. The shape the pixel classifier reads back at each t0 says from which noise
  level Stage B can no longer draw the outline; at t0 = 1 once more with empty captions (the toy
  captions name the shape, and Stage B reads them): what Stage B draws from e alone.

    python data.py toy light_test --look light --seed 1 --n 360     # a held-out toy set
    python probe.py --stage_b out/stage_b/ckpt.pt --stage_a out/stage_a/ckpt.pt \\
        --data light_test --look light --train light
"""
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import ArgumentParser, UsageError, existing_folder, positive_int, psnr, run_cli
from data import ImageFolder
from diffusion import add_noise, ddpm_sample, randn, timestep_grid
from stage_a import load_stage_a
from stage_b import load_stage_b
from toy import LOOKS, classify_toy_image, toy_prompt_following

# t0 of the draws: points of the default 12-step grid, from pure noise down to half-way
NOISE_LEVELS = (12 / 12, 11 / 12, 10 / 12, 9 / 12, 8 / 12, 6 / 12)


def toy_images(folder, look, n=None, size=128):
    """The first n images of a toy folder: (images (N, 3, S, S), captions, shape indices (N,)),
    the shape read from the caption ("a teal wedge on a sky background" -> "wedge")."""
    ds = ImageFolder(folder, size, verbose=False)
    images, captions = zip(*[ds[i] for i in range(min(n or len(ds), len(ds)))])
    words = list(LOOKS[look]["shapes"])
    shapes = [next((words.index(w) for w in c.split() if w in words), None) for c in captions]
    if None in shapes:
        raise UsageError(f"{folder} is not a toy set of the {look!r} look (captions name "
                         f"none of {words})")
    return torch.stack(images), list(captions), torch.tensor(shapes)


def probe_accuracy(train_x, train_y, test_x, test_y, hidden=0, steps=500, seed=0):
    """Held-out accuracy of a softmax classifier fitted on features train_x (N, ...) with class
    indices train_y (N,): logistic regression on standardised features (hidden=0), or an MLP with
    one hidden layer of that width (what a non-linear reader, such as Stage B, could get out).
    Full-batch Adam, seeded: the accuracy is a function of the features."""
    x, xt = train_x.flatten(1).float(), test_x.flatten(1).float()  # (N, D)
    mean, std = x.mean(0), x.std(0, correction=0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    with torch.random.fork_rng():  # the seeded init leaves the caller's random stream alone
        torch.manual_seed(seed)
        head = ([nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, n_classes)] if hidden
                else [nn.Linear(x.shape[1], n_classes)])
        net = nn.Sequential(*head)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():  # callers measure under no_grad
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(net(x), train_y).backward()
            opt.step()
    with torch.no_grad():
        return (net(xt).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def draw_from(stage_a, stage_b, x0, e, clip_text, t0, steps=12, seed=0):
    """Stage B's reconstructions from the Stage A latents x0 (N, 4, h, w) noised to t0 (1: pure
    noise), then the default `steps`-step grid from t0 (rounded down to a point of the grid) to 0;
    conditioned on the semantic latents e and the text embeddings `clip_text`."""
    g = torch.Generator().manual_seed(seed)
    noise = randn(x0.shape, g)
    grid = [t for t in timestep_grid(steps) if t <= t0 + 1e-6]  # descending, ends at 0
    x_t0 = add_noise(x0, torch.full((len(x0),), grid[0]), noise) if grid[0] < 1 else noise
    latents = ddpm_sample(stage_b, x_t0, grid, {"effnet": e, "clip_text": clip_text}, generator=g)
    return stage_a.decode(latents).float().clamp(0, 1)


def main(args):
    images, captions, shapes = toy_images(args.data, args.look, args.n)
    train_x, _, train_y = toy_images(args.train, args.look, args.n_train)
    b = load_stage_b(args.stage_b)  # a diffusion Stage B (a token one has no noise levels)
    stage_a = load_stage_a(args.stage_a)
    with torch.no_grad():
        x0, e = stage_a.encode(images), b["compressor"](images)  # (N, 4, S/4, S/4), (N, 16, h, w)
        clip_text = b["text_encoder"].encode(captions)
        no_text = b["text_encoder"].encode([""] * len(images))
        out = {"stage_b": args.stage_b, "step": b["ckpt"]["step"], "images": len(images),
               "stage_a_psnr": round(psnr(stage_a.decode(x0), images), 2)}
        features = {"e": (b["compressor"](train_x), e),  # (train, held-out)
                    "pixels": (F.adaptive_avg_pool2d(train_x, e.shape[-1]),
                               F.adaptive_avg_pool2d(images, e.shape[-1]))}
        for name, (train_f, test_f) in features.items():
            for hidden, kind in ((0, "linear"), (256, "mlp")):
                out[f"probe {name} {kind}"] = round(
                    probe_accuracy(train_f, train_y, test_f, shapes, hidden), 3)
    truth = [classify_toy_image(x, args.look) for x in images]
    draws = {f"t0={t0:.2f}": (t0, clip_text) for t0 in NOISE_LEVELS}
    draws["t0=1.00 empty captions"] = (1.0, no_text)  # e alone: the captions name the shape
    for key, (t0, text) in draws.items():
        recon = draw_from(stage_a, b["stage_b"], x0, e, text, t0, args.steps_b, args.seed)
        colour, shape = toy_prompt_following(recon, truth, args.look)
        out[key] = {"colour": round(colour, 3), "shape": round(shape, 3),
                    "psnr": round(psnr(recon, images), 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage_b", required=True, help="a Stage B checkpoint")
    p.add_argument("--stage_a", required=True, help="its Stage A checkpoint")
    p.add_argument("--data", type=existing_folder, required=True, help="held-out toy images")
    p.add_argument("--train", type=existing_folder, required=True,
                   help="toy images the probe is fitted on (Stage B's training set will do)")
    p.add_argument("--look", choices=list(LOOKS), default="light")
    p.add_argument("--n", type=positive_int, default=None, help="held-out images (default: all)")
    p.add_argument("--n_train", type=positive_int, default=1500)
    p.add_argument("--steps_b", type=positive_int, default=12)
    p.add_argument("--seed", type=int, default=0)
    run_cli(main, p.parse_args())
