"""Tests for data.py: the toy set, the toy classifier, ImageFolder on a messy folder, metadata
captions, aspect-ratio buckets, tar shards (sources, bad members, epochs over ranks and workers,
resume), the CLI. CPU, seconds."""
import io
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network

import random
import re
import runpy
import sys
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import images
from data import ImageFolder
from shards import expand_braces
from toy import (COLORS, LOOKS, SHAPES, backgrounds, classify_toy_image, make_toy_image, toy_look,
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
    assert names == sorted([f"{i:05d}.png" for i in range(40)]
                           + [f"{i:05d}.txt" for i in range(40)])
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


def test_toy_set_of_some_colours(tmp_path):
    """data.py toy --colors: only shapes of those colours (the fine-tuning demo's new word)."""
    write_toy_dataset(tmp_path, n=6, size=32, look="bold_pink", colors=["pink"])
    captions = [p.read_text().strip() for p in sorted(tmp_path.glob("*.txt"))]
    assert len(captions) == 6 and all(c.startswith("a pink ") for c in captions)
    assert {c.split()[2] for c in captions} == set(SHAPES)


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
        assert classify_toy_image(image) == (color, shape)  # still readable after bicubic resize
    ImageFolder(str(tmp_path), 24, verbose=False)
    assert capsys.readouterr().out == ""  # non-master DDP ranks stay quiet


def test_light_look_is_its_own_vocabulary_anywhere_in_the_frame(tmp_path):
    write_toy_dataset(tmp_path, n=36, size=128, seed=0, look="light")
    captions = [(tmp_path / f"{i:05d}.txt").read_text().strip() for i in range(36)]
    assert (captions[0] == "an orange disc on a cream background"
            or captions[0].startswith("an orange disc on a"))
    assert (toy_look(captions) == "light"
            and toy_look(captions + ["a red circle on a blue background"]) is None)
    assert (toy_look([p for p, _, _ in toy_prompts()]) == "bold"
            and toy_look(["a photo of a cat"]) is None)
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
    assert {(c, s) for _, c, s in light} == {(c, s) for c in LOOKS["light"]["colors"]
                                             for s in LOOKS["light"]["shapes"]}
    # bold_pink: the bold look plus one new colour word; its prompts in bold's colours are bold's,
    # backgrounds aside
    pink = toy_prompts("bold_pink", ["pink"])
    assert [p for p, _, _ in pink] == ["a pink circle on a red background",
                                       "a pink square on a green background",
                                       "a pink triangle on a blue background"]
    assert (toy_look([p for p, _, _ in pink]) == "bold_pink"
            and toy_look([p for p, _, _ in prompts]) == "bold")


# ---- toy classifier


@pytest.mark.parametrize("look, size", [("bold", 64), ("light", 128), ("bold_pink", 64)])
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
            "blur": F.interpolate(F.interpolate(x[None], scale_factor=0.5, mode="bilinear",
                                                antialias=True),
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
    save_bytes(tmp_path / "sub" / "cmyk.JPG", Image.new("CMYK", (40, 40), (0, 255, 255, 0)),
               "JPEG")  # red
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
    assert (out.count("\n") == 1
            and out.startswith(f"data: 11 images in {tmp_path}, 1 with .txt captions"))
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
    assert torch.allclose(by_name[os.path.join("sub", "deeper", "rgba.png")][0],
                          torch.ones(3, 16, 16))
    assert torch.allclose(by_name[os.path.join("sub", "transparent_palette.png")][0],
                          torch.ones(3, 16, 16))
    red = by_name[os.path.join("sub", "cmyk.JPG")][0].mean((1, 2))
    assert red[0] > 0.8 and red[1] < 0.2 and red[2] < 0.2
    for name in ("deep16.png", "deep16.tif"):  # a ramp, not clipped white: dark left, bright right
        deep = by_name[name][0]
        assert (0.4 < deep.mean() < 0.6 and deep[:, :, 0].max() < 0.1
                and deep[:, :, -1].min() > 0.9), name


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
    # a JPEG decoded at reduced scale
    big = Image.fromarray(wide).resize((900, 300), Image.Resampling.NEAREST)
    big.save(tmp_path / "wide_big.jpg", quality=95)
    dataset = ImageFolder(tmp_path, 24, verbose=False)  # a pathlib.Path works too
    names = [os.path.basename(p) for p in dataset.paths]
    assert names == ["tall.png", "tiny.png", "wide.png", "wide_big.jpg"]
    for i in (0, 2, 3):  # only the green middle third survives the centre crop
        r, g, b = dataset[i][0].mean((1, 2))
        assert g > 0.85 and r < 0.15 and b < 0.15
    assert torch.allclose(dataset[1][0],
                          torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 24, 24))


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


def test_cli_packs_a_folder_into_shards(shards, tmp_path, monkeypatch, capsys):
    """data.py shards DIR OUT --per_shard N: the folder's images, bytes unchanged, each with its
    caption, N to a tar in the folder's order; `check` then reads them all."""
    folder = shards / "folder"
    run_cli(monkeypatch, "shards", str(folder), str(tmp_path), "--per_shard", "5")
    tars = sorted(tmp_path.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    assert f"data: wrote 3 shards {tars[0]} ... {tars[-1]}" in capsys.readouterr().out
    members = {}
    for t in tars:
        with tarfile.open(t) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for i in range(12):
        assert members[f"{i:08d}.png"] == (folder / f"{i:02d}.png").read_bytes()
        assert members[f"{i:08d}.txt"].decode() == f"sample {i}"
    with tarfile.open(tars[-1]) as tar:
        assert len(tar.getmembers()) == 2 * 2  # 12 = 5 + 5 + 2
    run_cli(monkeypatch, "check", str(tmp_path), "--decode")
    assert "data: 12 readable samples in 3 shards, 0 skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, "shards", "-h")
    assert "--per_shard" in capsys.readouterr().out


# ---- captions from metadata files


def test_metadata_captions(tmp_path, capsys):
    for name in ("a.png", "b.png", "sub/c.png", "sub/d.png", "e.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "a.txt").write_text("from a.txt")  # a .txt wins over a metadata row
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "not this"}\n'
                                             '{"file_name": "b.png", "text": "from jsonl"}\n\n')
    csv = 'file_name,text\nc.png,"from csv, quoted"\nd.png,\n'
    (tmp_path / "sub" / "metadata.csv").write_text(csv)
    dataset = ImageFolder(tmp_path, 8)
    report = f"data: 5 images in {tmp_path}, 1 with .txt captions, 3 with metadata captions"
    assert capsys.readouterr().out.startswith(report)
    captions = {os.path.relpath(p, tmp_path): dataset[i][1] for i, p in enumerate(dataset.paths)}
    sub = os.path.join("sub", "")
    assert captions == {"a.png": "from a.txt", "b.png": "from jsonl", "e.png": "",
                        sub + "c.png": "from csv, quoted", sub + "d.png": ""}


# ---- aspect-ratio buckets


def test_bucket_sizes_fit_every_stage():
    from blocks import LATENT_DIM_SCALE, RESOLUTION_MULTIPLE
    from sample import round_size
    from stage_b import PRESETS as B
    assert images.bucket_sizes(1024) == [(768, 1408), (896, 1152), (1024, 1024), (1152, 896),
                                       (1408, 768)]
    assert images.bucket_sizes(256) == [(256, 256)]
    assert images.bucket_sizes(256, 4) == [(128, 512), (256, 256), (512, 128)]
    for size, ratio in ((256, 4), (512, 2), (768, 2), (1024, 2), (1024, 4)):
        sizes = images.bucket_sizes(size, ratio)
        assert (size, size) in sizes and len(sizes) % 2 == 1
        for w, h in sizes:
            assert round_size(w, h)[:2] == (w, h)  # sample.py draws exactly this size
            assert 1 / ratio <= w / h <= ratio and 0.85 < w * h / size**2 < 1.15
            for side in (w, h):  # Stage C latent side a multiple of 3, Stage B's through its levels
                n = round(side / RESOLUTION_MULTIPLE)
                assert n % 3 == 0 and int(n * LATENT_DIM_SCALE) * 4 == side
                for cfg in (B["tiny"]["model"], B["paper"]["model"]):
                    assert (side // 4) % (cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)) == 0
    with pytest.raises(ValueError, match="multiple of 128"):
        images.bucket_sizes(200)


def test_imagefolder_buckets(tmp_path, capsys):
    sides = [(300, 100)] * 5 + [(100, 100)] * 6 + [(90, 200)] * 4 + [(100, 330)]
    for i, (w, h) in enumerate(sides):
        Image.new("RGB", (w, h), "blue").save(tmp_path / f"{i:02d}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo stored landscape, shown portrait
    Image.new("RGB", (200, 90), "blue").save(tmp_path / "rotated.jpg", exif=exif)
    dataset = ImageFolder(tmp_path, 256, buckets=4, min_per_bucket=2)
    assert "buckets 128x512: 6, 256x256: 6, 512x128: 5" in capsys.readouterr().out
    assert dataset.sizes[-1] == (128, 512)  # the EXIF rotation counts
    for i in (0, 7, 12, 16):
        w, h = dataset.sizes[i]
        assert dataset[i][0].shape == (3, h, w)
    # 5 landscape images are too few for batches of 6: they join the nearest size
    merged = ImageFolder(tmp_path, 256, verbose=False, buckets=4, min_per_bucket=6)
    assert sorted(Counter(merged.sizes).items()) == [((128, 512), 6), ((256, 256), 11)]


def test_bucket_sampler_one_size_per_batch_any_world_size():
    from data import StepSampler
    sizes = [(128, 512)] * 7 + [(256, 256)] * 20 + [(512, 128)] * 3
    sizes = [sizes[i] for i in torch.randperm(30, generator=torch.Generator().manual_seed(1))]
    batch = 4  # global: 4 ranks x 1, 2 ranks x 2, or 1 rank x 2 micro-batches x 2
    one = iter(StepSampler(30, batch, seed=3, sizes=sizes, batch=batch))
    steps = [list(islice(one, batch)) for _ in range(12)]  # two epochs and a bit
    assert all(len({sizes[i] for i in s}) == 1 for s in steps)
    assert StepSampler(30, batch, 3, sizes=sizes, batch=batch).length == 4 * (2 + 5 + 1)  # filled
    epoch = [i for s in steps[:8] for i in s]
    assert set(epoch) == set(range(30)) and steps[8:] != steps[:4]  # every image; reshuffled
    for world in (2, 4):  # the same global batches, split over ranks
        ranks = [iter(StepSampler(30, batch, 3, 0, r, world, sizes, batch)) for r in range(world)]
        for s in steps:
            assert sum((list(islice(it, batch // world)) for it in ranks), []) == s
    # --grad_accum 2, resumed at step 5: the same images from there on
    resumed = StepSampler(30, batch // 2, 3, start=5 * batch, sizes=sizes, batch=batch)
    assert list(islice(iter(resumed), 3 * batch)) == sum(steps[5:8], [])


# ---- tar shards


def write_tar(path, members):
    """A tar file of (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def png_bytes(color, size=(24, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The same 12 captioned images as a folder and as tar shards (img2dataset names, .txt or .json
    captions), with among them: a truncated JPEG, a sample without an image, a non-image .jpg, and a
    last shard cut off in its last sample."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(12)]
    (root / "folder").mkdir()
    for i, color in enumerate(colors):
        (root / "folder" / f"{i:02d}.png").write_bytes(png_bytes(color))
        (root / "folder" / f"{i:02d}.txt").write_text(f"sample {i}")
    jpeg = save_bytes(root / "cut.jpg", Image.new("RGB", (32, 32), "red"), "JPEG", quality=95)
    members = []
    for i, color in enumerate(colors):
        json_caption = json.dumps({"caption": f"sample {i}", "url": "x"}).encode()
        txt_caption = f"sample {i}".encode()
        caption = (f"{i:08d}.txt", txt_caption) if i % 2 else (f"{i:08d}.json", json_caption)
        members.append([(f"{i:08d}.png", png_bytes(color)), caption])
    members[1].append(("00000100.jpg", jpeg[: len(jpeg) // 2]))  # its own key: a truncated JPEG
    members[5].append(("00000101.txt", b"a caption without an image"))
    members[9].append(("00000102.jpg", b"not a JPEG"))
    members[11].append(("00000103.png", png_bytes("red") * 9))  # cut off below
    (root / "tars").mkdir()
    for shard, (first, last) in enumerate(((0, 4), (4, 8), (8, 11), (11, 12))):
        write_tar(root / "tars" / f"{shard:05d}.tar", [m for s in members[first:last] for m in s])
    cut = root / "tars" / "00003.tar"
    with tarfile.open(cut) as tar:
        end = tar.getmember("00000103.png").offset_data + 100
    cut.write_bytes(cut.read_bytes()[:end])  # the shard ends there
    return root


def test_shard_sources(shards, tmp_path):
    tars = sorted(str(p) for p in (shards / "tars").glob("*.tar"))
    assert data.shard_list(str(shards / "tars")) == tars
    assert data.shard_list(str(shards / "tars" / "{00000..00002}.tar")) == tars[:3]
    assert expand_braces("s/{a,b}/{08..10}.tar") == [
        "s/a/08.tar", "s/a/09.tar", "s/a/10.tar", "s/b/08.tar", "s/b/09.tar", "s/b/10.tar"]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# a comment\n\n{os.path.relpath(tars[0], tmp_path)}\n"
                       f"https://host/x/{{0..1}}.tar\nfile://{tars[1]}\n")
    assert data.shard_list(str(listing)) == [
        tars[0], "https://host/x/0.tar", "https://host/x/1.tar", f"file://{tars[1]}"]
    assert data.shard_list(str(shards / "folder")) is None
    assert data.shard_list(str(tmp_path / "nope")) is None
    stream = data.ShardStream([f"file://{tars[1]}"], 16, verbose=False)  # a URL, through urllib
    assert [key for key, _ in stream.samples(0)] == [f"{i:08d}" for i in (4, 5, 101, 6, 7)]


def test_shards_give_the_folders_samples(shards, capsys):
    folder = ImageFolder(shards / "folder", 16, verbose=False)
    expected = {folder[i][1]: folder[i][0] for i in range(len(folder))}
    tars = data.shard_list(str(shards / "tars"))
    stream = data.ShardStream(tars, 16, shuffle_buffer=1)  # no shuffling
    held = stream.holdout(2)
    assert [c for _, c in held] == ["sample 0", "sample 1"]
    stream.start(seed=0, micro=1, rank=0, world=1, workers=1)
    got = [(images[0], captions[0]) for images, captions, _ in islice(iter(stream), 10)]
    # one epoch: every trainable sample once
    assert sorted(c for _, c in got) == sorted(set(expected) - {"sample 0", "sample 1"})
    for image, caption in held + got:
        assert torch.equal(image, expected[caption]), caption
    out = capsys.readouterr().out  # every bad sample and the cut shard is counted and named
    for bad in ("00000.tar:00000100 (", "00001.tar:00000101 (no image)",
                "00002.tar:00000102 (not an image)", "00003.tar (unexpected end of data)"):
        assert bad in out, out


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    """8 shards of 4 one-colour images, captioned "0" ... "31"."""
    root = tmp_path_factory.mktemp("clean")
    for shard in range(8):
        write_tar(root / f"{shard:05d}.tar", [
            (f"{i:03d}.{ext}", png_bytes((i, 0, 0)) if ext == "png" else str(i).encode())
            for i in range(4 * shard, 4 * shard + 4) for ext in ("png", "txt")])
    return data.shard_list(str(root))


def stream_batches(shards, rank=0, world=1, workers=0, state=None, batch=2):
    """infinite_batches over a fresh ShardStream as rank `rank` of `world` runs it (micro-batches of
    `batch` images)."""
    from common import Runtime
    from data import infinite_batches
    rt = Runtime(torch.device("cpu"), ddp=world > 1, rank=rank, world_size=world)
    stream = data.ShardStream(shards, 8, shuffle_buffer=4, verbose=False)
    return infinite_batches(stream, batch * world, rt, workers, seed=5, state=state)


def test_shard_epochs_over_2_ranks_x_2_workers(clean_shards):
    ranks = [stream_batches(clean_shards, rank, 2, workers=2) for rank in (0, 1)]
    # 4 readers x 2 shards x 4 images: each reader's first 4 micro-batches are its share of epoch 0
    epochs = [[c for b in ranks for _ in range(8) for c in next(b)[1]] for _ in range(2)]
    for epoch in epochs:
        assert sorted(epoch, key=int) == [str(i) for i in range(32)]  # every image once, none twice
    assert epochs[0] != epochs[1]  # another order
    assert [sorted(b.positions) for b in ranks] == [[0, 1], [2, 3]]  # rank 0's workers, rank 1's


def test_shard_stream_resumes_exactly_and_with_other_readers(clean_shards):
    full = stream_batches(clean_shards, workers=2)
    for _ in range(5):  # odd: the resumed loader's first worker must play the second reader
        next(full)
    state = full.stream.state(full.positions, full.served)
    resumed = stream_batches(clean_shards, workers=2, state=state)
    for _ in range(7):  # same readers: the very same batches
        a, b = next(full), next(resumed)
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
    # 4 readers (2 ranks x 2 workers) stop after 3 micro-batches each; 1 reader does epoch 0's rest
    ranks = [stream_batches(clean_shards, rank, 2, workers=2) for rank in (0, 1)]
    before = [c for batches in ranks for _ in range(6) for c in next(batches)[1]]
    state = ranks[0].stream.state({**ranks[0].positions, **ranks[1].positions}, 6)
    one = stream_batches(clean_shards, state=state, batch=1)
    after, cursor = [], one.stream.cursor(0)
    while cursor[0] < len(clean_shards):  # slots of epoch 0 (blocks of 4 are whole shards here)
        after += next(one)[1]
        cursor = one.positions[0]
    assert set(before + after) == {str(i) for i in range(32)}  # nothing missed
    assert len(before) + len(after) <= 32 + 4 * 4  # at most one block per old reader seen twice


def test_shard_buckets(tmp_path):
    """With buckets, a shard reader sorts each shuffle block by size before batching: one size per
    batch, every image at the size of its own aspect ratio when the block's sizes come in whole
    batches."""
    sides = [(80, 320), (160, 160), (320, 80)]
    write_tar(tmp_path / "00000.tar", [
        (f"{i:03d}.{ext}", png_bytes("red", sides[i % 3]) if ext == "png" else b"x")
        for i in range(12) for ext in ("png", "txt")])
    stream = data.ShardStream(data.shard_list(str(tmp_path)), 256, buckets=4, shuffle_buffer=6,
                              verbose=False)
    stream.start(seed=0, micro=2, rank=0, world=1, workers=1)
    sizes = [tuple(images.shape[:-3:-1]) for images, _, _ in islice(iter(stream), 12)]  # (w, h)
    assert Counter(sizes) == {(128, 512): 4, (256, 256): 4, (512, 128): 4}


def test_a_stand_in_never_crosses_the_holdout_split(tmp_path):
    """An image that fails to decode is replaced from its own side of the hold-out split: a
    training image's stand-in is never a held-out image (which would then be trained on), nor the
    reverse (a training image in the held-out metrics)."""
    from argparse import Namespace

    from data import open_data
    rng = np.random.default_rng(0)
    for i in range(20):
        noise = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / f"{i:02d}.jpg", quality=95)
    args = Namespace(data=str(tmp_path), image_size=16, buckets=None, batch_size=4, num_holdout=2)
    trainset, holdout = open_data(args, verbose=False)
    assert holdout.indices == [0, 10]
    dataset = trainset.dataset
    want_9, want_10 = dataset[11][0], dataset[0][0]  # the next image on each one's own side
    for i in (9, 10):  # cut short: passes the scan, fails to decode
        jpeg = (tmp_path / f"{i:02d}.jpg").read_bytes()
        (tmp_path / f"{i:02d}.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    assert torch.equal(trainset[trainset.indices.index(9)][0], want_9)  # not held-out 10
    assert torch.equal(holdout[1][0], want_10)  # not training 11
    assert len(dataset.skipped) == 2
