"""Tests for data.py: the toy set, the toy classifier, ImageFolder on a messy folder, the CLI. CPU, seconds."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network

import random
import re
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import (COLORS, LOOKS, SHAPES, ImageFolder, backgrounds, classify_toy_image, make_toy_image, toy_look,
                  toy_prompts, write_toy_dataset)

CAPTION = re.compile(r"a (\w+) (\w+) on a (\w+) background")


def read(path):
    with open(path, "rb") as f:
        return f.read()


# ---- toy dataset


def test_toy_dataset_is_balanced_captioned_and_deterministic(tmp_path):
    assert write_toy_dataset(tmp_path / "a", n=40, size=32, seed=0) == 40
    write_toy_dataset(tmp_path / "b", n=40, size=32, seed=0)
    write_toy_dataset(tmp_path / "c", n=40, size=32, seed=1)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted([f"{i:05d}.png" for i in range(40)] + [f"{i:05d}.txt" for i in range(40)])
    # Same seed, same bytes; another seed, other images.
    assert all(read(tmp_path / "a" / f) == read(tmp_path / "b" / f) for f in names)
    assert any(read(tmp_path / "a" / f) != read(tmp_path / "c" / f) for f in names)
    pairs = []
    for i in range(40):
        caption = (tmp_path / "a" / f"{i:05d}.txt").read_text(encoding="utf-8").strip()
        color, shape, background = CAPTION.fullmatch(caption).groups()
        assert color in COLORS and background in COLORS and shape in SHAPES and color != background
        pairs.append((color, shape))
        with Image.open(tmp_path / "a" / f"{i:05d}.png") as img:
            assert img.size == (32, 32) and img.getpixel((0, 0)) == COLORS[background]
    # The first 18 images cover every colour x shape pair exactly once.
    assert len(set(pairs[:18])) == len(COLORS) * len(SHAPES) == 18


def test_imagefolder_reads_toy_set(tmp_path, capsys):
    write_toy_dataset(tmp_path, n=20, size=32, seed=0)
    dataset = ImageFolder(str(tmp_path), 24)
    assert capsys.readouterr().out == f"data: 20 images in {tmp_path}, 20 with .txt captions\n"
    assert len(dataset) == 20 and dataset.skipped == []
    for i in (0, 7, 19):
        image, caption = dataset[i]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5  # [0, 1], not [-1, 1]
        assert caption == (tmp_path / f"{i:05d}.txt").read_text().strip()
        color, shape, _ = CAPTION.fullmatch(caption).groups()
        assert classify_toy_image(image) == (color, shape)  # still readable after the bicubic resize
    ImageFolder(str(tmp_path), 24, verbose=False)
    assert capsys.readouterr().out == ""  # non-master DDP ranks stay quiet


def test_light_look_is_its_own_vocabulary_anywhere_in_the_frame(tmp_path):
    write_toy_dataset(tmp_path, n=36, size=128, seed=0, look="light")
    captions = [(tmp_path / f"{i:05d}.txt").read_text().strip() for i in range(36)]
    assert captions[0] == "an orange disc on a cream background" or captions[0].startswith("an orange disc on a")
    assert toy_look(captions) == "light" and toy_look(captions + ["a red circle on a blue background"]) is None
    assert toy_look([p for p, _, _ in toy_prompts()]) == "bold" and toy_look(["a photo of a cat"]) is None
    centres = []
    for i in range(36):
        x = np.asarray(Image.open(tmp_path / f"{i:05d}.png"), dtype=np.float32)
        fg = np.abs(x - x[0, 0]).sum(-1) > 30  # (H, W): the shape
        ys, xs = fg.nonzero()
        assert 0.2 * 128 <= xs.max() - xs.min() + 1 <= 0.55 * 128  # smaller shapes of several sizes
        assert x[0, 0].min() >= 210  # near-white backgrounds
        centres.append((xs.mean(), ys.mean()))
    centres = np.array(centres)
    assert centres.std(0).min() > 15  # anywhere in the frame, not near the centre


def test_toy_prompts_cover_every_pair():
    prompts = toy_prompts()
    assert len(prompts) == 18 and len({p for p, _, _ in prompts}) == 18
    assert {(c, s) for _, c, s in prompts} == {(c, s) for c in COLORS for s in SHAPES}
    for prompt, color, shape in prompts:
        c, s, background = CAPTION.fullmatch(prompt).groups()
        assert (c, s) == (color, shape) and background in COLORS and background != color
    assert toy_prompts() == prompts
    light = toy_prompts("light")
    assert {(c, s) for _, c, s in light} == {(c, s) for c in LOOKS["light"]["colors"] for s in LOOKS["light"]["shapes"]}


# ---- toy classifier


@pytest.mark.parametrize("look, size", [("bold", 64), ("light", 128)])
def test_classifier_accuracy_clean_noisy_blurred(look, size):
    rng, gen = random.Random(1234), torch.Generator().manual_seed(0)
    pairs = [(c, s) for c in LOOKS[look]["colors"] for s in LOOKS[look]["shapes"]]
    correct = {name: [0, 0] for name in ("clean", "noise", "blur")}
    n = 200
    for i in range(n):
        color, shape = pairs[rng.randrange(len(pairs))]
        background = rng.choice(list(backgrounds(look, color)))
        image = make_toy_image(color, shape, background, size, rng, look)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255  # (3, size, size) in [0, 1]
        variants = {
            "clean": x,
            "noise": (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1),
            # downscale 2x then upscale: soft edges like a decoder's output
            "blur": F.interpolate(F.interpolate(x[None], scale_factor=0.5, mode="bilinear", antialias=True),
                                  size=size, mode="bicubic")[0].clamp(0, 1),
        }
        for name, image in variants.items():
            got_color, got_shape = classify_toy_image(image, look)
            correct[name][0] += got_color == color
            correct[name][1] += got_shape == shape
    accuracy = {name: (c / n, s / n) for name, (c, s) in correct.items()}
    print("classifier accuracy (colour, shape):", accuracy)
    for color_acc, shape_acc in accuracy.values():
        assert color_acc >= 0.98 and shape_acc >= 0.95, accuracy


def test_classifier_inputs_and_blank_image():
    img = make_toy_image("purple", "triangle", "white", 48, random.Random(0))
    assert classify_toy_image(img) == ("purple", "triangle")  # PIL input works too
    assert classify_toy_image(Image.new("RGB", (48, 48), COLORS["blue"])) == ("none", "none")
    assert classify_toy_image(torch.full((3, 48, 48), 0.3)) == ("none", "none")


# ---- ImageFolder on real-world mess


def save_bytes(path, image, fmt, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kw)
    return read(path)


def test_messy_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    # Good files, in many modes, some nested.
    save_bytes(tmp_path / "rgb.jpg", noise, "JPEG")
    (tmp_path / "rgb.txt").write_text("  a noisy photo\n", encoding="utf-8")
    save_bytes(tmp_path / "gray.png", noise.convert("L"), "PNG")
    save_bytes(tmp_path / "bits.bmp", noise.convert("1"), "BMP")
    save_bytes(tmp_path / "sub" / "palette.gif", noise.convert("P"), "GIF")
    save_bytes(tmp_path / "sub" / "cmyk.JPG", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")  # red
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red: must come out white
    save_bytes(tmp_path / "sub" / "deeper" / "rgba.png", rgba, "PNG")
    save_bytes(tmp_path / "sub" / "deeper" / "la.webp", noise.convert("LA"), "WEBP")
    paletted = Image.new("P", (40, 40), 0)
    paletted.putpalette([0, 0, 255] * 256)
    save_bytes(tmp_path / "sub" / "transparent_palette.png", paletted, "PNG", transparency=0)
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # 16-bit, spans 0..65535
    save_bytes(tmp_path / "deep16.tif", Image.fromarray(ramp), "TIFF")
    save_bytes(tmp_path / "deep16.png", Image.fromarray(ramp), "PNG")
    # Bad files: caught by the scan at construction...
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "sub" / "text.jpg").write_text("this is not a JPEG")
    png = save_bytes(tmp_path / "cut.png", noise, "PNG")
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    # ... and one that passes the header scan but fails to decode (a JPEG cut short).
    jpeg = save_bytes(tmp_path / "sub" / "cut.jpg", noise, "JPEG", quality=95)
    (tmp_path / "sub" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    # Not images, ignored silently.
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "sub" / ".DS_Store").write_bytes(b"\0\1")

    dataset = ImageFolder(str(tmp_path), 16)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"data: 11 images in {tmp_path}, 1 with .txt captions")
    assert "skipped 3 unreadable files" in out and "zero.png (zero bytes)" in out
    assert os.path.join("sub", "text.jpg") + " (not an image)" in out
    reasons = {os.path.relpath(p, tmp_path): why for p, why in dataset.skipped}
    assert reasons.keys() == {"zero.png", "cut.png", os.path.join("sub", "text.jpg")}
    assert len(dataset) == 11  # 10 good + the cut JPEG, which only decoding can catch

    names = [os.path.relpath(p, tmp_path) for p in dataset.paths]
    assert names == sorted(names) and os.path.join("sub", "deeper", "rgba.png") in names
    items = [dataset[i] for i in range(len(dataset))]  # must not raise
    for image, caption in items:
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    # The cut JPEG is counted and replaced, deterministically, by the next sample.
    cut = names.index(os.path.join("sub", "cut.jpg"))
    assert os.path.join(tmp_path, "sub", "cut.jpg") in [p for p, _ in dataset.skipped]
    assert len(dataset.skipped) == 4 and "truncated" in dataset.skipped[-1][1]
    assert torch.equal(items[cut][0], items[(cut + 1) % len(items)][0])
    assert torch.equal(dataset[cut][0], items[cut][0])

    by_name = dict(zip(names, items))
    assert by_name["rgb.jpg"][1] == "a noisy photo" and by_name["gray.png"][1] == ""
    assert torch.allclose(by_name[os.path.join("sub", "deeper", "rgba.png")][0], torch.ones(3, 16, 16))
    assert torch.allclose(by_name[os.path.join("sub", "transparent_palette.png")][0], torch.ones(3, 16, 16))
    red = by_name[os.path.join("sub", "cmyk.JPG")][0].mean((1, 2))
    assert red[0] > 0.8 and red[1] < 0.2 and red[2] < 0.2
    for name in ("deep16.png", "deep16.tif"):  # a ramp, not clipped to white: dark left, bright right
        deep = by_name[name][0]
        assert 0.4 < deep.mean() < 0.6 and deep[:, :, 0].max() < 0.1 and deep[:, :, -1].min() > 0.9, name


def test_missing_and_empty_folders(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)) as error:
        ImageFolder(missing, 32)
    assert "python data.py toy" in str(error.value)
    (tmp_path / "notes.txt").write_text("captions without images")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        ImageFolder(str(tmp_path), 32)
    (tmp_path / "empty.png").write_bytes(b"")  # only unreadable images: still nothing to train on
    with pytest.raises(ValueError, match="1 unreadable"):
        ImageFolder(str(tmp_path), 32, verbose=False)


def test_resize_and_center_crop(tmp_path):
    wide = np.zeros((30, 90, 3), dtype=np.uint8)
    wide[:, :30, 0] = wide[:, 30:60, 1] = wide[:, 60:, 2] = 255  # red | green | blue thirds
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide.transpose(1, 0, 2)).save(tmp_path / "tall.png")  # red / green / blue
    Image.new("RGB", (5, 7), (0, 0, 255)).save(tmp_path / "tiny.png")  # smaller than size: upscaled
    big = Image.fromarray(wide).resize((900, 300), Image.Resampling.NEAREST)  # JPEG decoded at reduced scale
    big.save(tmp_path / "wide_big.jpg", quality=95)
    dataset = ImageFolder(tmp_path, 24, verbose=False)  # a pathlib.Path works too
    names = [os.path.basename(p) for p in dataset.paths]
    assert names == ["tall.png", "tiny.png", "wide.png", "wide_big.jpg"]
    for i in (0, 2, 3):  # only the green middle third survives the centre crop
        r, g, b = dataset[i][0].mean((1, 2))
        assert g > 0.85 and r < 0.15 and b < 0.15
    assert torch.allclose(dataset[1][0], torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 24, 24))


# ---- command line


def run_cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["data.py", *argv])
    runpy.run_path(data.__file__, run_name="__main__")


def test_cli(tmp_path, monkeypatch, capsys):
    run_cli(monkeypatch, "toy", str(tmp_path), "--n", "5", "--size", "16", "--seed", "3")
    assert "wrote 5 toy images" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.png"))) == 5 and len(list(tmp_path.glob("*.txt"))) == 5
    run_cli(monkeypatch, "check", str(tmp_path), "--size", "8", "--decode")
    assert f"data: 5 images in {tmp_path}" in capsys.readouterr().out
    for command, flags in (("toy", ["--n", "--size", "--seed"]), ("check", ["--size", "--decode"])):
        with pytest.raises(SystemExit):
            run_cli(monkeypatch, command, "-h")
        help_text = capsys.readouterr().out
        assert all(flag in help_text for flag in flags) and "default" in help_text
