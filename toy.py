"""
The toy dataset: coloured shapes on plain backgrounds, captioned "a red circle on a blue
background", written without downloads; small models learn it in CPU minutes. And its
deterministic pixel classifier, which reads (colour, shape) back off a generated image to score
prompt following.

    write_toy_dataset(root)    the images and .txt captions (looks: LOOKS)
    classify_toy_image(img)    (colour, shape) drawn in an image
    toy_prompt_following(...)  colour and shape accuracy of generated images against their prompts
"""
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from common import UsageError

# -----------------------------------------------------------------------------
# the toy set, in three looks

# Per look: shape colours (RGB), background colours (None: the shape colours, other than the
# shape's), shape words (-> the shape drawn), the shape's side as a share of the image, placement.
# "bold", the quick start's: saturated backgrounds, one large shape near the centre. Why: at 128 px
#   the semantic latent is 3x3, and the tiny Stage B learns to draw a shape from it in CPU minutes
#   only when the outline falls on similar cells from image to image (3,000 Stage B steps: shape
#   kept in 90% of reconstructions, against 46% for shapes placed anywhere).
# "light": near-white backgrounds, smaller shapes of several sizes anywhere, its own colours and
#   words: a harder set, where a shifted latent shows at once.
# Shape colours are far apart in RGB (closest pairs ~115-130/255) so a pixel classifier names them
# even in blurry generated images. Order matters: it fixes the toy sets and prompts.
LOOKS = {
    "bold": dict(colors={"red": (230, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
                         "yellow": (245, 215, 30), "purple": (150, 40, 190),
                         "white": (245, 245, 245)}, backgrounds=None,
                 shapes={"circle": "circle", "square": "square", "triangle": "triangle"},
                 side=(0.55, 0.75), centred=True),
    "light": dict(colors={"orange": (245, 130, 20), "teal": (0, 150, 140), "black": (25, 25, 25),
                          "magenta": (210, 30, 160), "brown": (130, 75, 25), "navy": (25, 45, 140)},
                  backgrounds={"white": (252, 252, 252), "grey": (225, 225, 225),
                               "cream": (248, 238, 212), "mint": (220, 242, 228),
                               "sky": (218, 232, 248)},
                  shapes={"disc": "circle", "block": "square", "wedge": "triangle"},
                  side=(0.25, 0.5), centred=False),
}
# "bold_pink": the bold look with a seventh colour, pink, a word the quick start's models never
#   read: the fine-tuning demonstration teaches it (data.py toy DIR --look bold_pink --colors pink)
LOOKS["bold_pink"] = LOOKS["bold"] | {"colors": LOOKS["bold"]["colors"] | {"pink": (250, 140, 200)}}
COLORS, SHAPES = LOOKS["bold"]["colors"], tuple(LOOKS["bold"]["shapes"])  # the quick start's look


def backgrounds(look, color):
    """The background colours (name -> RGB) a `color` shape may stand on in `look`."""
    spec = LOOKS[look]
    return spec["backgrounds"] or {c: rgb for c, rgb in spec["colors"].items() if c != color}


def toy_caption(color, shape, background):
    """A toy image's caption: 'a red circle on a blue background', 'an orange disc on a ...'."""
    def a(word):
        return ("an " if word[0] in "aeiou" else "a ") + word
    return f"{a(color)} {shape} on {a(background)} background"


def make_toy_image(color, shape, background, size, rng, look="bold"):
    """One filled shape (a word of the look) in `color` on a plain `background`. "bold": side 55-75%
    of the image, centred give or take 6% of the side each way, so the edge stays pure background
    (the classifier reads it there); "light": side 25-50%, anywhere inside a 3 px margin. `rng`: a
    random.Random, for reproducibility."""
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


def write_toy_dataset(root, n=2000, size=128, seed=0, look="bold", colors=None):
    """Write `n` toy images root/00000.png with captions root/00000.txt; returns n. The images cycle
    through every colour x shape pair (balanced; only the shape colours `colors` when given); the
    background is a random allowed one."""
    os.makedirs(root, exist_ok=True)
    rng = random.Random(seed)  # one stream: the first k images don't depend on n
    pairs = [(color, shape) for color in LOOKS[look]["colors"] for shape in LOOKS[look]["shapes"]
             if colors is None or color in colors]
    for i in range(n):
        color, shape = pairs[i % len(pairs)]
        background = rng.choice(list(backgrounds(look, color)))
        make_toy_image(color, shape, background, size, rng, look).save(
            os.path.join(root, f"{i:05d}.png"))
        with open(os.path.join(root, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(toy_caption(color, shape, background) + "\n")
    return n


def check_colors(colors, look, flag):
    """Refuse shape colours the look has not (`flag` names where they came from): no prompt, no
    image would have them."""
    unknown = [c for c in colors or [] if c not in LOOKS[look]["colors"]]
    if unknown:
        raise UsageError(f"{flag} {' '.join(unknown)}: the {look} look's colours are "
                         f"{', '.join(LOOKS[look]['colors'])}")


def toy_prompts(look="bold", only=None):
    """[(prompt, color, shape)] for every colour x shape pair of `look` (of the shape colours
    `only`, when given), each on a fixed allowed background."""
    colors, shapes = list(LOOKS[look]["colors"]), list(LOOKS[look]["shapes"])
    prompts = []
    for ci, c in enumerate(colors):
        if only is not None and c not in only:
            continue
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


# -----------------------------------------------------------------------------
# toy classifier: did the model draw what the prompt asked for?


def neighbours(a):
    """The 9 copies of `a` (..., H, W) shifted by -1, 0, +1 pixels each way (edges repeated), as
    (9, ..., H, W): their mean is a 3x3 box blur, their min an erosion, their max a dilation."""
    H, W = a.shape[-2:]
    padded = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    return np.stack([padded[..., dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)])


def classify_toy_image(image, look="bold"):
    """(color, shape) drawn in a toy image of `look`, in that look's words, ("none", "none") without
    a foreground. `image`: a PIL image or a (3, H, W) tensor in [0, 1]. Deterministic, plain numpy.
    Accuracy measured by test_data.py on 200 fresh 64 px toy images, each clean, with gaussian
    noise (std 0.05) and blurred (downscaled 2x, upscaled back): colour 100%, shape 100% in all."""
    if isinstance(image, Image.Image):
        x = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    else:
        x = image.detach().float().cpu().clamp(0, 1).numpy()  # (3, H, W)
    H, W = x.shape[-2:]
    # 1. Background colour: per-channel median of a 2-pixel frame round the edge.
    edges = (x[:, :2], x[:, -2:], x[:, :, :2], x[:, :, -2:])  # top, bottom, left, right
    frame = np.concatenate([e.reshape(3, -1) for e in edges], axis=1)  # (3, number of frame pixels)
    background = np.median(frame, axis=1)  # (3,)
    # 2. Foreground = pixels far from the background. A 3x3 box blur first averages out pixel noise.
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
    """Prompt following on toy data as (colour accuracy, shape accuracy): the shares of images whose
    colour and shape (as classify_toy_image reads them) are their targets [(colour, shape)]."""
    found = [classify_toy_image(img, look) for img in images]
    colour = sum(f[0] == c for f, (c, _) in zip(found, targets)) / len(targets)
    shape = sum(f[1] == s for f, (_, s) in zip(found, targets)) / len(targets)
    return colour, shape
