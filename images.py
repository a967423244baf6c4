"""
Images as the stages read them: any file PIL opens, decoded to 8-bit RGB (transparency on white,
16-bit rescaled, EXIF rotation applied), resized to cover the training size and centre-cropped, as
float32 (3, H, W) in [0, 1]; and the aspect-ratio buckets of --buckets.
"""
import math
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageOps

from common import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# every training side a multiple of 128 = 3 x 42.67 (blocks.RESOLUTION_MULTIPLE): the Stage C
# latent side is then a multiple of 3 and every stage's arithmetic is exact (method §7.7)
SIDE_MULTIPLE = 128

# -----------------------------------------------------------------------------
# decoding


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


def load_image(source, size):
    """Decode `source` (a path or a binary file object), resize it to cover `size` (an int for a
    square, or (width, height)) keeping its aspect ratio (bicubic), centre-crop: (3, height, width)
    in [0, 1]."""
    W, H = (size, size) if isinstance(size, int) else size
    with Image.open(source) as img:
        img.draft("RGB", (W, H))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale if still >= size
        img.load()  # decode now, so truncated pixel data fails here, inside the caller's try
        img = to_rgb(ImageOps.exif_transpose(img))  # phone photos: apply the EXIF rotation
    w, h = img.size
    scale = max(W / w, H / h)  # > 1 upscales small images
    w, h = max(W, round(w * scale)), max(H, round(h * scale))
    # PIL's bicubic is antialiased (the filter widens when shrinking); reducing_gap first shrinks
    # huge photos by a cheap integer box filter, then finishes with bicubic.
    img = img.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - W) // 2, (h - H) // 2
    img = img.crop((left, top, left + W, top + H))
    # Convert in numpy: tiny torch ops may wake a thread pool, which stalls on a busy CPU.
    x = np.asarray(img, dtype=np.float32) / 255  # (H, W, 3) in [0, 1], no [-1, 1] rescale
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)


def displayed_size(img):
    """(width, height) of an opened image as shown (EXIF rotation applied), from its header only."""
    exif = Image.Exif()
    if "exif" in img.info:
        exif.load(img.info["exif"])
    w, h = img.size
    return (h, w) if exif.get(0x0112) in (5, 6, 7, 8) else (w, h)  # orientations turning 90°


def inspect_image(path):
    """Cheap check without decoding pixels: (None, (width, height)) if `path` looks like an image,
    else (a short reason, None)."""
    try:
        if os.path.getsize(path) == 0:
            return "zero bytes", None
        with Image.open(path) as img:
            size = displayed_size(img)
            img.verify()  # parses headers (for PNG also every chunk checksum), decodes no pixels
    except Exception as e:
        return describe(e), None
    return None, size


def describe(error):
    """A short reason for the report, e.g. 'not an image' or 'image file is truncated'."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image"
    message = str(error).strip().split("\n")[0][:60]
    return message or type(error).__name__


# -----------------------------------------------------------------------------
# aspect-ratio buckets


def bucket_sizes(size, max_ratio=2.0):
    """Aspect-ratio buckets for training at about size x size pixels: every (width, height) whose
    sides are multiples of SIDE_MULTIPLE, whose area is the nearest such to size^2 for its width,
    and whose aspect ratio is at most `max_ratio` either way. 1024, ratio 2: 768x1408, 896x1152,
    1024x1024, 1152x896, 1408x768."""
    if size % SIDE_MULTIPLE:
        raise UsageError(f"--buckets needs an --image_size that is a multiple of {SIDE_MULTIPLE}, "
                         f"not {size}")
    sizes = set()
    for w in range(SIDE_MULTIPLE, size + 1, SIDE_MULTIPLE):  # portrait, square; mirrored: landscape
        h = SIDE_MULTIPLE * max(1, round(size * size / w / SIDE_MULTIPLE))
        if h / w <= max_ratio:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes)


def log_ratio(size):
    return math.log(size[0] / size[1])


def nearest_size(size, sizes):
    """The one of `sizes` whose aspect ratio is nearest that of `size` (both (width, height))."""
    return min(sizes, key=lambda s: abs(log_ratio(s) - log_ratio(size)))


def assign_buckets(dims, sizes, min_count=1):
    """Each image's bucket: the size of `sizes` nearest its aspect ratio (dims: (width, height) per
    image). A bucket chosen by fewer than `min_count` images (fewer than a batch) hands them to its
    nearest bucket, smallest first."""
    choice = [nearest_size(d, sizes) for d in dims]
    while True:
        counts = Counter(choice)
        small = [s for s in counts if counts[s] < min_count]
        if not small or len(counts) == 1:
            return choice
        s = min(small, key=lambda s: (counts[s], s))
        to = nearest_size(s, [t for t in counts if t != s])
        choice = [to if c == s else c for c in choice]
