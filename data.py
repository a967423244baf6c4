"""
Data for all three stages: a folder of images with optional captions, plus a built-in toy set.

    ImageFolder(root, size)    every image under `root` (recursive) as (image, caption): image is a
                               float32 (3, size, size) tensor in [0, 1], caption comes from a same-name
                               .txt file ("cat.jpg" -> "cat.txt"), "" if there is none (= unconditional).
    write_toy_dataset(root)    coloured shapes captioned "a red circle on a blue background": no
                               downloads, and small models learn it in minutes. Two looks (LOOKS):
                               "bold" (the quick start) and "light" (look="light").
    classify_toy_image(img)    reads (colour, shape) back off a toy image, to score prompt following.

    python data.py toy ./toy --n 2000     # write the toy set (--look light: the second look)
    python data.py check ./imgs           # what ImageFolder can read, and which files it skips
"""
import argparse
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

# ---- folder of images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB. Transparent pixels become white; 16-bit values are rescaled."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16/32-bit grayscale: PIL's own convert() clips everything above 255 to white, so rescale
        # by hand (65535 / 257 = 255). Mode "I" can also hold plain 8-bit data; leave that alone.
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = a / 257
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Composite onto white: dropping alpha would show whatever colour hides under transparency.
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")  # also covers L, 1, P, CMYK, YCbCr


def load_image(path, size):
    """Decode `path`, resize the shorter side to `size` (bicubic), centre-crop: (3, size, size) in [0, 1]."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale if still >= size
        img.load()  # decode now, so truncated pixel data fails here, inside the caller's try
        img = to_rgb(ImageOps.exif_transpose(img))  # phone photos: apply the EXIF rotation
    w, h = img.size
    scale = size / min(w, h)  # > 1 upscales small images
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    # PIL's bicubic is antialiased (the filter widens when shrinking); reducing_gap first shrinks
    # huge photos by a cheap integer box filter, then finishes with bicubic.
    img = img.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    # Convert in numpy: tiny torch ops may wake a thread pool, which stalls on a busy CPU.
    x = np.asarray(img, dtype=np.float32) / 255  # (size, size, 3) in [0, 1], no [-1, 1] rescale
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, size, size)


def why_unreadable(path):
    """Cheap check without decoding pixels: None if `path` looks like an image, else a short reason."""
    try:
        if os.path.getsize(path) == 0:
            return "zero bytes"
        with Image.open(path) as img:
            img.verify()  # parses the headers (for PNG also every chunk checksum), decodes no pixels
    except Exception as e:
        return describe(e)
    return None


def describe(error):
    """A short reason for the report, e.g. 'not an image' or 'image file is truncated'."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image"
    message = str(error).strip().split("\n")[0][:60]
    return message or type(error).__name__


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (recursive, sorted) as (float (3, size, size) in [0, 1], caption)."""

    def __init__(self, root, size, verbose=True):
        root = os.fspath(root)  # str or pathlib.Path
        self.root, self.size, self.verbose = root, size, verbose
        hint = (f"expected a folder of images ({' '.join(IMAGE_EXTENSIONS)}, searched recursively) with "
                f"optional same-name .txt captions; for a quick try: python data.py toy {root}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data: folder {root!r} does not exist: {hint}")
        candidates, texts = [], set()
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # .git, .ipynb_checkpoints
            for f in files:  # hidden files such as macOS "._cat.jpg" are metadata, not images
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    candidates.append(os.path.join(folder, f))
                elif f.endswith(".txt"):
                    texts.add(os.path.join(folder, f))
        # Cheap scan now, so the report is right and no zero-byte or non-image file reaches training.
        self.paths, self.skipped = [], []  # skipped: [(path, reason)]
        quiet = not verbose or len(candidates) < 10_000  # a progress bar only for big folders
        for path in tqdm(sorted(candidates), "data: scanning", disable=quiet):
            reason = why_unreadable(path)
            if reason is None:
                self.paths.append(path)
            else:
                self.skipped.append((path, reason))
        if not self.paths:
            raise ValueError(f"data: no readable images in {root!r} ({len(self.skipped)} unreadable files "
                             f"skipped): {hint}")
        captions = [os.path.splitext(p)[0] + ".txt" for p in self.paths]
        self.captions = [c if c in texts else None for c in captions]
        self.bad = set()  # indices that passed the scan but failed to decode later (per process)
        if verbose:
            print(self.report())

    def report(self):
        """One line: how many images, how many captioned, and which files were skipped (5 named)."""
        captioned = sum(c is not None for c in self.captions)
        line = f"data: {len(self.paths)} images in {self.root}, {captioned} with .txt captions"
        if self.skipped:
            named = [f"{os.path.relpath(p, self.root)} ({why})" for p, why in self.skipped[:5]]
            more = ", ..." if len(self.skipped) > 5 else ""
            line += f" (skipped {len(self.skipped)} unreadable files: {', '.join(named)}{more})"
        return line

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """(image, caption) of sample i. A file that fails to decode is counted and replaced by the next
        readable sample, so a truncated download costs one duplicate instead of a crashed run."""
        for j in range(i, i + len(self.paths)):
            j %= len(self.paths)
            if j in self.bad:
                continue
            try:
                caption = ""
                if self.captions[j] is not None:
                    with open(self.captions[j], encoding="utf-8-sig", errors="replace") as f:
                        caption = f.read().strip()  # utf-8-sig also drops a Windows BOM
                return load_image(self.paths[j], self.size), caption
            except Exception as e:  # e.g. a JPEG cut short passes the header scan but not decoding
                # Note: with DataLoader workers this bookkeeping lives in each worker's copy.
                self.bad.add(j)
                self.skipped.append((self.paths[j], describe(e)))
                if self.verbose:
                    print(f"data: skipping unreadable {self.paths[j]} ({describe(e)})")
        raise RuntimeError(f"data: none of the {len(self.paths)} images in {self.root!r} could be decoded")


# ---- toy dataset: coloured shapes on plain backgrounds, in two looks

# Per look: the shape colours (RGB), the background colours (None: the shape colours, another than the shape's),
# the shape words (-> the shape drawn), the shape's side as a share of the image, and the placement.
# "bold", the quick start's: saturated backgrounds, one large shape near the centre. Why near the centre: at
#   128 px the semantic latent is 3x3, and the tiny Stage B learns to draw a shape from it in CPU minutes only
#   when the outline falls on similar cells from image to image (measured with 3,000 Stage B steps: shape kept in
#   90% of reconstructions, against 46% for shapes placed anywhere).
# "light": near-white backgrounds, smaller shapes of several sizes anywhere in the frame, its own colours and words
#   (a harder set, and one where a shifted latent shows: see issue #13 in the README).
# Shape colours are far apart in RGB (closest pairs ~115-130/255) so a pixel classifier can name them even in
# blurry generated images. Order matters: it fixes the toy sets and prompts.
LOOKS = {
    "bold": dict(colors={"red": (230, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
                         "yellow": (245, 215, 30), "purple": (150, 40, 190), "white": (245, 245, 245)},
                 backgrounds=None, shapes={"circle": "circle", "square": "square", "triangle": "triangle"},
                 side=(0.55, 0.75), centred=True),
    "light": dict(colors={"orange": (245, 130, 20), "teal": (0, 150, 140), "black": (25, 25, 25),
                          "magenta": (210, 30, 160), "brown": (130, 75, 25), "navy": (25, 45, 140)},
                  backgrounds={"white": (252, 252, 252), "grey": (225, 225, 225), "cream": (248, 238, 212),
                               "mint": (220, 242, 228), "sky": (218, 232, 248)},
                  shapes={"disc": "circle", "block": "square", "wedge": "triangle"},
                  side=(0.25, 0.5), centred=False),
}
COLORS, SHAPES = LOOKS["bold"]["colors"], tuple(LOOKS["bold"]["shapes"])  # the quick start's look


def backgrounds(look, color):
    """The background colours (name -> RGB) a `color` shape may stand on in `look`."""
    spec = LOOKS[look]
    return spec["backgrounds"] or {c: rgb for c, rgb in spec["colors"].items() if c != color}


def toy_caption(color, shape, background):
    """The caption of a toy image, e.g. 'a red circle on a blue background', 'an orange disc on a grey ...'."""
    def a(word):
        return ("an " if word[0] in "aeiou" else "a ") + word
    return f"{a(color)} {shape} on {a(background)} background"


def make_toy_image(color, shape, background, size, rng, look="bold"):
    """One filled shape (a word of the look) in `color` on a plain `background`. "bold": side 55-75% of the image,
    centred give or take 6% of the side each way, so the edge stays pure background (the classifier reads it
    there); "light": side 25-50%, anywhere inside a 3 px margin. `rng` is a random.Random, for reproducibility."""
    spec = LOOKS[look]
    img = Image.new("RGB", (size, size), backgrounds(look, color)[background])
    side = rng.uniform(*spec["side"]) * size
    if spec["centred"]:
        x0, y0 = ((size - side) / 2 + rng.uniform(-0.06, 0.06) * size for _ in range(2))
    else:
        x0, y0 = (rng.uniform(3, size - 3 - side) for _ in range(2))
    x1, y1 = x0 + side, y0 + side
    draw, fill = ImageDraw.Draw(img), spec["colors"][color]
    drawn = spec["shapes"].get(shape)
    if drawn == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif drawn == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif drawn == "triangle":  # pointing up: apex top-centre, base along the bottom
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}, expected one of {tuple(spec['shapes'])}")
    return img


def write_toy_dataset(root, n=2000, size=128, seed=0, look="bold"):
    """Write `n` toy images root/00000.png with captions root/00000.txt; returns n. The images cycle
    through every colour x shape pair (balanced); the background is a random allowed one."""
    os.makedirs(root, exist_ok=True)
    rng = random.Random(seed)  # one stream: the first k images don't depend on n
    pairs = [(color, shape) for color in LOOKS[look]["colors"] for shape in LOOKS[look]["shapes"]]
    for i in range(n):
        color, shape = pairs[i % len(pairs)]
        background = rng.choice(list(backgrounds(look, color)))
        make_toy_image(color, shape, background, size, rng, look).save(os.path.join(root, f"{i:05d}.png"))
        with open(os.path.join(root, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(toy_caption(color, shape, background) + "\n")
    return n


def toy_prompts(look="bold"):
    """[(prompt, color, shape)] for every colour x shape pair of `look`, each on a fixed allowed background."""
    colors, shapes = list(LOOKS[look]["colors"]), list(LOOKS[look]["shapes"])
    prompts = []
    for ci, c in enumerate(colors):
        for si, s in enumerate(shapes):
            allowed = list(backgrounds(look, c))
            # bold: the colour 1..3 places after c (never c itself); light: the backgrounds in turn
            background = colors[(ci + 1 + si) % len(colors)] if LOOKS[look]["backgrounds"] is None \
                else allowed[(ci * len(shapes) + si) % len(allowed)]
            prompts.append((toy_caption(c, s, background), c, s))
    return prompts


def toy_look(captions):
    """The toy look whose vocabulary writes every one of `captions`, else None (not toy data)."""
    for look, spec in LOOKS.items():
        vocabulary = {toy_caption(c, s, b) for c in spec["colors"] for s in spec["shapes"]
                      for b in backgrounds(look, c)}
        if set(captions) <= vocabulary:
            return look
    return None


# ---- toy classifier: did the model draw what the prompt asked for?


def neighbours(a):
    """The 9 copies of `a` (..., H, W) shifted by -1, 0, +1 pixels each way (edges repeated), stacked
    as (9, ..., H, W). Their mean is a 3x3 box blur, their min an erosion, their max a dilation."""
    H, W = a.shape[-2:]
    padded = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    return np.stack([padded[..., dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)])


def classify_toy_image(image, look="bold"):
    """(color, shape) drawn in a toy image of `look`, in that look's words, ("none", "none") if there is no
    foreground. `image` is a PIL image or a (3, H, W) tensor in [0, 1]. Deterministic, plain numpy.
    Accuracy measured by test_data.py on 200 fresh 64 px toy images, each clean, with gaussian noise
    (std 0.05) and blurred (downscaled 2x, upscaled back): colour 100%, shape 100% in all three."""
    if isinstance(image, Image.Image):
        x = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    else:
        x = image.detach().float().cpu().clamp(0, 1).numpy()  # (3, H, W)
    H, W = x.shape[-2:]
    # 1. Background colour: per-channel median of a 2-pixel frame round the edge.
    edges = (x[:, :2], x[:, -2:], x[:, :, :2], x[:, :, -2:])  # top, bottom, left, right
    frame = np.concatenate([e.reshape(3, -1) for e in edges], axis=1)  # (3, number of frame pixels)
    background = np.median(frame, axis=1)  # (3,)
    # 2. Foreground = pixels far from the background. A 3x3 box blur first averages away pixel noise.
    smooth = neighbours(x).mean(0)  # (3, H, W)
    dist = np.sqrt(((smooth - background[:, None, None]) ** 2).sum(0))  # (H, W), 0 .. sqrt(3)
    far = np.quantile(dist, 0.98)  # a typical shape pixel: toy shapes cover >= 3% of the image
    if far < 0.2:
        return "none", "none"
    mask = dist > far / 2  # threshold halfway: where a blurred edge crosses 50%
    mask = neighbours(neighbours(mask).all(0)).any(0)  # opening (erode, dilate): drops lone specks
    if not mask.any():
        return "none", "none"
    # 3. Colour: nearest palette entry to the median foreground pixel (the median ignores edges).
    colors = LOOKS[look]["colors"]
    palette = np.array(list(colors.values())) / 255  # (6, 3)
    color = list(colors)[((palette - np.median(x[:, mask], axis=1)) ** 2).sum(1).argmin()]
    # 4. Shape: draw each ideal shape into the mask's bounding box, pick the best overlap (IoU).
    ys, xs = mask.nonzero()
    # pixel centres in box units: v runs 0 (top) .. 1 (bottom), u runs 0 (left) .. 1 (right)
    v = ((np.arange(H) + 0.5 - ys.min()) / (ys.max() + 1 - ys.min()))[:, None]  # (H, 1)
    u = ((np.arange(W) + 0.5 - xs.min()) / (xs.max() + 1 - xs.min()))[None, :]  # (1, W)
    box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)  # (H, W)
    ideal = {"circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25, "square": box,
             "triangle": box & (np.abs(u - 0.5) <= v / 2)}
    iou = {name: (m & mask).sum() / (m | mask).sum() for name, m in ideal.items()}
    word = {drawn: word for word, drawn in LOOKS[look]["shapes"].items()}  # e.g. circle -> "disc"
    return color, word[max(iou, key=iou.get)]


def toy_prompt_following(images, targets, look="bold"):
    """Prompt following on toy data: the shares of images whose colour and shape, as classify_toy_image reads
    them, are the prompt's. targets: [(colour, shape)] per image. Returns (colour accuracy, shape accuracy)."""
    found = [classify_toy_image(img, look) for img in images]
    colour = sum(f[0] == c for f, (c, _) in zip(found, targets)) / len(targets)
    shape = sum(f[1] == s for f, (_, s) in zip(found, targets)) / len(targets)
    return colour, shape


# ---- command line

if __name__ == "__main__":
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description="Write the toy dataset, or check an image folder.",
                                     formatter_class=fmt)
    commands = parser.add_subparsers(dest="command", required=True)
    toy = commands.add_parser("toy", formatter_class=fmt, help="write the toy set of captioned coloured shapes")
    toy.add_argument("dir", help="folder to write 00000.png + 00000.txt ... into (created if missing)")
    toy.add_argument("--n", type=int, default=2000, help="number of images")
    toy.add_argument("--size", type=int, default=128, help="image side in pixels")
    toy.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    toy.add_argument("--look", default="bold", choices=list(LOOKS), help="bold: saturated backgrounds, large "
                     "centred shapes (the quick start); light: near-white backgrounds, smaller shapes anywhere")
    check = commands.add_parser("check", formatter_class=fmt, help="report what ImageFolder reads and skips")
    check.add_argument("dir", help="folder of images (searched recursively), optional same-name .txt captions")
    check.add_argument("--size", type=int, default=256, help="side images are resized and centre-cropped to")
    check.add_argument("--decode", action="store_true",
                       help="also decode every image (slow), to find truncated files")
    args = parser.parse_args()
    if args.command == "toy":
        n = write_toy_dataset(args.dir, args.n, args.size, args.seed, args.look)
        print(f"data: wrote {n} toy images ({args.size}x{args.size}, look {args.look}) + .txt captions to "
              f"{args.dir}, captions like {toy_prompts(args.look)[0][0]!r}")
    else:
        dataset = ImageFolder(args.dir, args.size)
        if args.decode:
            for i in tqdm(range(len(dataset)), "data: decoding"):
                dataset[i]
            print(dataset.report())
