"""
What --data names, for all three stages: a folder of images with optional captions, or tar shards
(shards.py); the held-out split; and the order in which training reads it, a function of the step
so that --resume continues exactly.

    open_data(args)            --data as (trainset, held-out images): a folder (ImageFolder) or tar
                               shards (ShardStream); the stages call this.
    ImageFolder(root, size)    every image under `root` (recursive) as (image, caption): image is a
                               float32 (3, size, size) tensor in [0, 1] (or of an aspect-ratio
                               bucket's size), caption from a same-name .txt file ("cat.jpg" ->
                               "cat.txt") or a metadata.jsonl / metadata.csv row, "" if there is
                               none (= unconditional).
    resume_batches(...)        the training batches from a step on (StepSampler; streams continue
                               from the checkpoint's positions).

    python data.py toy ./toy --n 2000        # write the toy set (toy.py; --look light: the second)
    python data.py check ./imgs              # what ImageFolder (ShardStream) reads, what it skips
    python data.py shards ./imgs ./shards    # pack a folder into tar shards
"""
import argparse
import copy
import csv
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from itertools import islice

import torch
from tqdm import tqdm

from common import (ArgumentParser, UsageError, check_multiple, check_output_dir, positive_int,
                    restore_rng, run_cli)
from images import (IMAGE_EXTENSIONS, SIDE_MULTIPLE, assign_buckets, bucket_sizes, describe,
                    inspect_image, load_image)
from shards import ShardStream, caption_of, shard_list
from toy import LOOKS, check_colors, toy_prompts, write_toy_dataset

METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # the Hugging Face imagefolder layout


def data_hint(root):
    """What --data takes, for the messages that refuse `root`."""
    return (f"expected a folder of images ({' '.join(IMAGE_EXTENSIONS)}, searched recursively) "
            f"with optional same-name .txt captions or a metadata.jsonl, or tar shards; for a "
            f"quick try: python data.py toy {root}")

# -----------------------------------------------------------------------------
# a folder of images


def read_metadata(path):
    """{image path: caption} of a metadata.jsonl or metadata.csv (Hugging Face imagefolder): one row
    per image, its `file_name` relative to the metadata file's folder, its caption in `caption` or
    `text`."""
    folder = os.path.dirname(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.endswith(".csv"):
            rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    return {os.path.normpath(os.path.join(folder, r["file_name"])): caption_of(r) for r in rows}


def walk_visible(root):
    """os.walk's (folder, files) without hidden folders (.git, .ipynb_checkpoints) and hidden files
    (such as macOS "._cat.jpg": metadata, not images): what ImageFolder reads and --data is
    checked for."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        yield folder, [f for f in files if not f.startswith(".")]


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (recursive, sorted) as (float (3, H, W) in [0, 1], caption). The
    caption is a same-stem .txt file's, else the image's row of a metadata.jsonl / metadata.csv,
    else "". Images are square centre crops of side `size`; with `buckets` (a largest aspect ratio)
    each keeps its aspect ratio at the bucket_sizes(size, buckets) size nearest it (buckets of fewer
    than `min_per_bucket` images, a batch, are merged into their neighbours). `sizes[i]` is item i's
    (width, height)."""

    def __init__(self, root, size, verbose=True, buckets=0.0, min_per_bucket=1):
        root = os.fspath(root)  # str or pathlib.Path
        self.root, self.size, self.verbose = root, size, verbose
        hint = data_hint(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data: folder {root!r} does not exist: {hint}")
        candidates, texts, self.metadata = [], set(), {}
        for folder, files in walk_visible(root):
            for f in files:
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    candidates.append(os.path.join(folder, f))
                elif f.endswith(".txt"):
                    texts.add(os.path.join(folder, f))
                elif f in METADATA_FILES:
                    self.metadata.update(read_metadata(os.path.join(folder, f)))
        # A cheap scan now: the report is right and no zero-byte or non-image file reaches training.
        self.paths, self.skipped, dims = [], [], []  # skipped: [(path, reason)]
        quiet = not verbose or len(candidates) < 10_000  # a progress bar only for big folders
        for path in tqdm(sorted(candidates), "data: scanning", disable=quiet):
            reason, dim = inspect_image(path)
            if reason is None:
                self.paths.append(path)
                dims.append(dim)
            else:
                self.skipped.append((path, reason))
        if not self.paths:
            raise UsageError(f"data: no readable images in {root!r} ({len(self.skipped)} "
                             f"unreadable files skipped): {hint}")
        captions = [os.path.splitext(p)[0] + ".txt" for p in self.paths]
        self.captions = [c if c in texts else None for c in captions]
        self.sizes = [(size, size)] * len(self.paths)
        if buckets:
            self.sizes = assign_buckets(dims, bucket_sizes(size, buckets), min_per_bucket)
        self.bad = set()  # indices that passed the scan but failed to decode later (per process)
        self.held = set()  # held-out indices (open_data): stand-ins never cross the split
        if verbose:
            print(self.report())

    def report(self):
        """One line: images, how many captioned, at which sizes, the files skipped (5 named)."""
        captioned = sum(c is not None for c in self.captions)
        line = f"data: {len(self.paths)} images in {self.root}, {captioned} with .txt captions"
        from_metadata = sum(c is None and os.path.normpath(p) in self.metadata
                            for p, c in zip(self.paths, self.captions))
        if from_metadata:
            line += f", {from_metadata} with metadata captions"
        if len(set(self.sizes)) > 1:
            counts = sorted(Counter(self.sizes).items())
            line += ", buckets " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts)
        if self.skipped:
            named = [f"{os.path.relpath(p, self.root)} ({why})" for p, why in self.skipped[:5]]
            more = ", ..." if len(self.skipped) > 5 else ""
            line += f" (skipped {len(self.skipped)} unreadable files: {', '.join(named)}{more})"
        return line

    def caption(self, i):
        """Image i's caption: its .txt file, else its metadata row, else ""."""
        if self.captions[i] is not None:
            with open(self.captions[i], encoding="utf-8-sig", errors="replace") as f:
                return f.read().strip()  # utf-8-sig also drops a Windows BOM
        return self.metadata.get(os.path.normpath(self.paths[i]), "")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """(image, caption) of sample i. A file that fails to decode is counted and replaced by the
        next readable sample of the same size on the same side of the hold-out split, so a
        truncated download costs one duplicate instead of a crashed run."""
        def peer(j):
            return self.sizes[j] == self.sizes[i] and (j in self.held) == (i in self.held)
        for j in range(i, i + len(self.paths)):
            j %= len(self.paths)
            if j in self.bad or not peer(j):
                continue
            try:
                return load_image(self.paths[j], self.sizes[j]), self.caption(j)
            except Exception as e:  # e.g. a JPEG cut short passes the header scan but not decoding
                # Note: with DataLoader workers this bookkeeping lives in each worker's copy.
                self.bad.add(j)
                self.skipped.append((self.paths[j], describe(e)))
                if self.verbose:
                    print(f"data: skipping unreadable {self.paths[j]} ({describe(e)})")
        side = "held-out" if i in self.held else "training"
        raise RuntimeError(f"data: none of the {sum(map(peer, range(len(self.paths))))} {side} "
                           f"images of size {self.sizes[i][0]}x{self.sizes[i][1]} in "
                           f"{self.root!r} could be decoded")


# -----------------------------------------------------------------------------
# what the stages call: the data, the held-out split


def check_source(source, flag="--data"):
    """What --data names, checked before anything reads it: tar shards that exist (URLs are read
    later), returned as their list, or else a folder holding images (None). A mistake is a
    UsageError naming `flag`."""
    source = os.fspath(source)
    if os.path.isfile(source) and source.lower().endswith(IMAGE_EXTENSIONS):
        raise UsageError(f"{flag} {source} is one image file: {data_hint('DIR')}")
    try:
        shards = shard_list(source)
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {source} is a file but no text list of tar shards: "
                         f"{data_hint('DIR')}") from None
    if shards is not None:
        missing = [s for s in shards if "://" not in s and not os.path.isfile(s)]
        if missing or not shards:
            raise UsageError(f"{flag} {source}: " + (
                f"tar shard {missing[0]} does not exist ({len(missing)} of {len(shards)} missing)"
                if missing else "lists no tar shards"))
        return shards
    if not os.path.isdir(source):
        raise UsageError(f"{flag} {source} does not exist: {data_hint(source)}")
    if not any(f.lower().endswith(IMAGE_EXTENSIONS) for _, files in walk_visible(source)
               for f in files):
        raise UsageError(f"{flag} {source} holds no images: {data_hint(source)}")
    return None


def check_data(args, side_multiple, needs):
    """--data, --image_size and --buckets, checked before anything is built or read: --data names
    a folder holding images or tar shards that exist (check_source); the training side is one
    `needs` can use, a multiple of `side_multiple`; --buckets' sizes step by SIDE_MULTIPLE; --cache
    needs a folder. A mistake is a UsageError saying so. Returns the training defaults that differ
    for tar shards: a stream has nothing to encode up front, so the presets' --cache (for folders)
    is off."""
    shards = check_source(args.data)
    if shards and getattr(args, "cache", None):
        raise UsageError("--cache encodes a whole dataset up front: it needs a folder of images, "
                         "not tar shards")
    check_multiple("--image_size", args.image_size, side_multiple, needs)
    if args.buckets:
        check_multiple("--image_size", args.image_size, SIDE_MULTIPLE,
                       "--buckets (sizes in 128-pixel steps)")
    return {"cache": False} if shards else {}


def open_data(args, verbose=True):
    """--data as (trainset, holdout): a folder (ImageFolder; every k-th image held out) or tar
    shards (ShardStream; the first --num_holdout readable samples of the first shard held out).
    Held-out images stay square even with --buckets, so held-out metrics compare across runs."""
    shards = shard_list(args.data)
    if shards is not None:
        stream = ShardStream(shards, args.image_size, args.buckets, args.shuffle_buffer, verbose)
        return stream, stream.holdout(max(1, args.num_holdout))
    dataset = ImageFolder(args.data, args.image_size, verbose, args.buckets, args.batch_size)
    trainset, holdout = split_holdout(dataset, args.num_holdout)
    dataset.held = set(holdout.indices)
    if args.buckets:
        square = copy.copy(dataset)
        square.sizes = [(args.image_size, args.image_size)] * len(dataset)
        holdout = torch.utils.data.Subset(square, holdout.indices)
    return trainset, holdout


def folder_items(dataset):
    """(ImageFolder, indices) of a folder dataset or a Subset of one; (None, None) for a stream."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset.dataset, dataset.indices
    return (dataset, range(len(dataset))) if isinstance(dataset, ImageFolder) else (None, None)


def folder_captions(dataset):
    """Every item's caption in a folder dataset ("" = none); None for a stream of tar shards."""
    folder, indices = folder_items(dataset)
    return None if folder is None else [folder.caption(i) for i in indices]


def dataset_key(dataset):
    """What a cache of a folder's items depends on (common.disk_cached), as a short hash: every
    item's image file (path, size, modification time), caption and training size."""
    folder, indices = folder_items(dataset)
    stats = [os.stat(folder.paths[i]) for i in indices]
    items = [(folder.paths[i], st.st_size, st.st_mtime_ns, folder.caption(i), folder.sizes[i])
             for i, st in zip(indices, stats)]
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()[:16]


def image_batches(dataset, n=512, batch_size=64, spread=True):
    """Up to n training images as batches (B, 3, H, W), read one batch at a time: from a folder, n
    spread evenly through it (its first n with spread=False), a batch per image size with
    aspect-ratio buckets; from tar shards, the first n of the first shard after the held-out ones.
    (For common.recompute_batchnorm, a codebook init.)"""
    if isinstance(dataset, ShardStream):
        images = islice((image for _, image, _ in dataset.readable()), n)
        while batch := list(islice(images, batch_size)):
            yield torch.stack(batch)
        return
    index = list(range(0, len(dataset), max(1, len(dataset) // n) if spread else 1))[:n]
    for chunk in same_size_chunks(dataset, index, batch_size):
        yield torch.stack([dataset[i][0] for i in chunk])


def split_holdout(dataset, n):
    """Deterministic split: every k-th image (k = len / n) is held out for previews and metrics."""
    n = max(1, min(n, len(dataset) // 10))
    k = len(dataset) // n
    held = list(range(0, n * k, k))
    rest = sorted(set(range(len(dataset))) - set(held))
    return torch.utils.data.Subset(dataset, rest), torch.utils.data.Subset(dataset, held)


def holdout_batch(holdout, device):
    """All held-out images (and captions) as one batch."""
    images, captions = zip(*[holdout[i] for i in range(len(holdout))])
    return torch.stack(images).to(device), list(captions)

# -----------------------------------------------------------------------------
# the data order: exact resume


def sizes_of(dataset):
    """The (width, height) of every item of a map-style dataset of images of varying sizes (an
    ImageFolder with aspect-ratio buckets, the stages' caches of one), via Subsets; else None."""
    if isinstance(dataset, torch.utils.data.Subset):
        sizes = sizes_of(dataset.dataset)
        return sizes and [sizes[i] for i in dataset.indices]
    return getattr(dataset, "sizes", None)


class StepSampler(torch.utils.data.Sampler):
    """Endless index stream that is a pure function of (seed, position): epoch e is randperm(n, seed
    + e), and each rank takes its slice of every global batch. Starting at `start` (= step * global
    batch) makes `--resume` see exactly the batches an uninterrupted run would have seen. The world
    size and --grad_accum only decide who takes which slice, so a resume with another world size
    (and the same --batch_size) continues the same order.

    With `sizes` (aspect-ratio buckets: the image size of each index), the epoch's permutation is
    cut, size by size, into batches of `batch` (= --batch_size) indices, a size's last batch filled
    from its own start, and these batches come in random order: every optimizer step, and each
    micro-batch of it on every rank, is one size."""

    def __init__(self, n, global_batch, seed=0, start=0, rank=0, world_size=1, sizes=None,
                 batch=None):
        self.n, self.gb, self.seed, self.start, self.rank, self.ws = \
            n, global_batch, seed, start, rank, world_size
        self.sizes = sizes if sizes and len(set(sizes)) > 1 else None
        self.batch, self.cached = batch, (None, None)
        self.length = len(self.epoch(0))  # the same for every epoch

    def epoch(self, e):
        if self.cached[0] != e:
            g = torch.Generator().manual_seed(self.seed + e)
            order = torch.randperm(self.n, generator=g).tolist()
            if self.sizes:
                batches = []
                for size in sorted(set(self.sizes)):
                    same = [i for i in order if self.sizes[i] == size]
                    whole = -(-len(same) // self.batch) * self.batch  # filled up to whole batches
                    same = [same[k % len(same)] for k in range(whole)]
                    batches += [same[k:k + self.batch] for k in range(0, len(same), self.batch)]
                shuffled = torch.randperm(len(batches), generator=g).tolist()
                order = [i for b in shuffled for i in batches[b]]
            self.cached = (e, order)
        return self.cached[1]

    def __iter__(self):
        pos, local = self.start, self.gb // self.ws
        while True:
            epoch, offset = divmod(pos, self.length)
            order = self.epoch(epoch)
            # wraps into the epoch's start if short
            batch = [order[(offset + i) % self.length] for i in range(self.gb)]
            yield from batch[self.rank * local:(self.rank + 1) * local]
            pos += self.gb


class Batches:
    """infinite_batches' iterator of micro-batches. A stream of tar shards also hands over each
    loader worker's position after each of its batches; the last one consumed per worker is kept in
    `positions`, and the batches taken in `served`, for the checkpoint (gather_run_state)."""

    def __init__(self, loader, stream=None):
        self.it, self.stream, self.positions, self.served = iter(loader), stream, {}, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.served += 1
        if self.stream is None:
            return batch
        *batch, position = batch
        self.positions[int(position[0])] = position[1:].tolist()
        return batch


def infinite_batches(dataset, batch_size, rt, num_workers=2, seed=0, start_step=0, grad_accum=1,
                     state=None):
    """Micro-batches forever (a Batches). `batch_size` is global: each rank gets batch_size / (world
    * grad_accum). A map-style dataset (a folder) is read in the order of a StepSampler started at
    `start_step`; a stream (tar shards) is split over every rank's loader workers and continues from
    `state` (the checkpoint's "data")."""
    micro = batch_size // (rt.world_size * grad_accum)
    assert micro * rt.world_size * grad_accum == batch_size, \
        f"--batch_size {batch_size} must divide by world size {rt.world_size} x " \
        f"--grad_accum {grad_accum}"
    pin, persistent = rt.device_type == "cuda", num_workers > 0
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.start(seed, micro, rt.rank, rt.world_size, max(1, num_workers), state)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             pin_memory=pin, persistent_workers=persistent)
        return Batches(loader, dataset)
    sampler = StepSampler(len(dataset), micro * rt.world_size, seed, start_step * batch_size,
                          rt.rank, rt.world_size, sizes_of(dataset), batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler,
                                         num_workers=num_workers, pin_memory=pin,
                                         persistent_workers=persistent)
    return Batches(loader)


def resume_batches(dataset, args, rt, step, ckpt, num_workers=None):
    """The training batches from `step` on, then (on --resume) the checkpoint's RNG state. The
    order is a function of the step (exact resume); building the loader draws from the global RNG
    in every run, so the state is restored after it and a resumed run draws the numbers an
    uninterrupted one does (noise, dropout, Stage A's dead-code restarts)."""
    workers = args.num_workers if num_workers is None else num_workers
    batches = infinite_batches(dataset, args.batch_size, rt, workers, args.seed, step,
                               args.grad_accum, ckpt and ckpt.get("data"))
    if ckpt:
        restore_rng(ckpt, rt)
    return batches


def same_size_chunks(dataset, indices, batch_size):
    """`indices` of `dataset` in chunks of at most `batch_size` items of one image size, in index
    order within each size (one chunk list per size, sizes in order of first appearance)."""
    groups, sizes = {}, sizes_of(dataset)
    for i in indices:
        groups.setdefault(sizes[i] if sizes else None, []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]

# -----------------------------------------------------------------------------
# command line: write the toy set, check a folder, pack shards


def write_shards(src, out, per_shard=1000):
    """Pack a folder of images (ImageFolder's files and captions) into tar shards out/00000.tar,
    00001.tar, ... in the WebDataset layout: per sample its image's bytes unchanged and a .txt
    caption. Returns the shards' paths."""
    folder = ImageFolder(src, SIDE_MULTIPLE, verbose=False)
    os.makedirs(out, exist_ok=True)
    paths = []
    for first in range(0, len(folder), per_shard):
        paths.append(os.path.join(out, f"{first // per_shard:05d}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for i in range(first, min(first + per_shard, len(folder))):
                with open(folder.paths[i], "rb") as f:
                    image = f.read()
                ext = os.path.splitext(folder.paths[i])[1].lower()
                caption = folder.caption(i).encode()
                for name, data in ((f"{i:08d}{ext}", image), (f"{i:08d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def get_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = ArgumentParser(description="Write the toy dataset, or check an image folder.",
                            formatter_class=fmt)
    commands = parser.add_subparsers(dest="command", required=True)
    toy = commands.add_parser("toy", formatter_class=fmt,
                              help="write the toy set of captioned coloured shapes")
    toy.add_argument("dir",
                     help="folder to write 00000.png + 00000.txt ... into (created if missing)")
    toy.add_argument("--n", type=positive_int, default=2000, help="number of images")
    toy.add_argument("--size", type=positive_int, default=128, help="image side in pixels")
    toy.add_argument("--seed", type=int, default=0,
                     help="random seed: the same seed writes the same files")
    toy.add_argument("--look", default="bold", choices=list(LOOKS), help="bold: saturated "
                     "backgrounds, large centred shapes (the quick start); light: near-white "
                     "backgrounds, smaller shapes anywhere; bold_pink: bold with a seventh "
                     "colour, pink")
    toy.add_argument("--colors", nargs="+", default=None,
                     help="only shapes of these colours (default: all of the look's)")
    check = commands.add_parser("check", formatter_class=fmt, help="report what ImageFolder (or, "
                                "for tar shards, ShardStream) reads and skips")
    check.add_argument("dir", help="what --data takes: a folder of images (searched recursively) "
                       "or tar shards")
    check.add_argument("--size", type=positive_int, default=256,
                       help="side images are resized and centre-cropped to")
    check.add_argument("--decode", action="store_true",
                       help="also decode every image (slow), to find truncated files")
    pack = commands.add_parser("shards", formatter_class=fmt,
                               help="pack a folder of images into tar shards")
    pack.add_argument("dir", help="folder of images (searched recursively) with optional captions")
    pack.add_argument("out", help="folder to write 00000.tar, 00001.tar, ... into (created if "
                      "missing)")
    pack.add_argument("--per_shard", type=positive_int, default=1000, help="samples per shard")
    return parser.parse_args(argv)


def main(args):
    if args.command == "toy":
        check_colors(args.colors, args.look, "--colors")
        check_output_dir(args.dir, "toy")
        n = write_toy_dataset(args.dir, args.n, args.size, args.seed, args.look, args.colors)
        print(f"data: wrote {n} toy images ({args.size}x{args.size}, look {args.look}) + .txt "
              f"captions to {args.dir}, captions like "
              f"{toy_prompts(args.look, args.colors)[0][0]!r}")
    elif args.command == "shards":
        check_output_dir(args.out, "shards")
        paths = write_shards(args.dir, args.out, args.per_shard)
        print(f"data: wrote {len(paths)} shards {paths[0]} ... {paths[-1]}")
    elif (shards := check_source(args.dir, "check")) is not None:
        stream = ShardStream(shards, args.size)
        n = 0
        for i in tqdm(range(len(stream.shards)), "data: reading shards"):
            for key, members in stream.samples(i):
                name = f"{stream.shards[i]}:{key}"
                n += not args.decode or stream.decode(name, members, args.size) is not None
        print(f"data: {n} {'readable ' * args.decode}samples in {len(stream.shards)} shards, "
              f"{stream.bad} skipped")
    else:
        dataset = ImageFolder(args.dir, args.size)
        if args.decode:
            for i in tqdm(range(len(dataset)), "data: decoding"):
                dataset[i]
            print(dataset.report())


if __name__ == "__main__":
    run_cli(main, get_args())
