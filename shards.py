"""
Tar shards in the WebDataset layout (img2dataset's 00000.tar, 00001.tar, ...), streamed by the
standard tarfile module, never extracted, split over ranks and loader workers, shuffled, with an
exact resume (ShardStream). `shard_list` says whether --data names shards at all.
"""
import io
import json
import os
import re
import tarfile
import urllib.request
from itertools import islice

import torch
from PIL import Image

from common import UsageError
from images import (IMAGE_EXTENSIONS, bucket_sizes, describe, displayed_size, load_image,
                    nearest_size)

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
CAPTION_KEYS = ("caption", "text")  # the caption of a metadata row or a shard's .json: first found


def caption_of(record):
    """A metadata row's or a shard .json's caption: its first CAPTION_KEYS field, "" without one."""
    return next((str(record[k]).strip() for k in CAPTION_KEYS if record.get(k) is not None), "")


def expand_braces(pattern):
    """Bash-style braces: 'shards/{00000..00002}.tar' -> shards/00000.tar, 00001, 00002 (zero
    padding kept); '{a,b}.tar' -> a.tar, b.tar. Several braces expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        first, last = body.split("..")
        items = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [p for item in items
            for p in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def shard_list(source):
    """The tar shards `--data` names, or None when it names no shards (a folder of images): a folder
    holding .tar files (sorted), a brace pattern such as shards/{00000..00999}.tar, one .tar path or
    URL, or a text file listing paths or URLs one a line (relative paths are relative to the list's
    folder; blank and # lines are skipped)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        tars = [os.path.join(source, f) for f in os.listdir(source) if f.endswith(TAR_EXTENSIONS)]
        return sorted(tars) or None
    if "{" in source or "://" in source or source.endswith(TAR_EXTENSIONS):
        return expand_braces(source)
    if not os.path.isfile(source):
        return None
    with open(source, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
    folder = os.path.dirname(source)
    paths = [x if "://" in x else os.path.normpath(os.path.join(folder, x)) for x in lines]
    return [s for path in paths for s in expand_braces(path)]


def open_url(url):
    """A local path, or a URL that urllib reads (http, https, ftp, file), as a binary stream."""
    return urllib.request.urlopen(url, timeout=60) if "://" in url else open(url, "rb")


def shard_image(members):
    """A shard sample's image bytes (its member with an image extension), or None."""
    return next((members[e] for e in members if "." + e in IMAGE_EXTENSIONS), None)


def shard_caption(members):
    """A shard sample's caption: its .txt, else the `caption` / `text` of its .json, else ""."""
    if "txt" in members:
        return members["txt"].decode("utf-8-sig", errors="replace").strip()
    return caption_of(json.loads(members["json"])) if "json" in members else ""


class ShardStream(torch.utils.data.IterableDataset):
    """Tar shards in the WebDataset layout (img2dataset's 00000.tar, 00001.tar, ...: per sample key
    an image, .jpg .png .webp ..., and a caption, .txt or the `caption` / `text` of a .json) read as
    a stream by the standard tarfile module, never extracted, local files and URLs alike. Yields
    whole micro-batches (images, captions, position); the loader runs with batch_size=None.

    Order. The epochs' shards form one sequence of slots: slot k holds shard perm_e[k % S] of epoch
    e = k // S, perm_e = randperm(S, seed + e). Of the R readers (every loader worker of every
    rank), reader j reads slots j, j + R, j + 2R, ... in turn, cuts its samples into blocks of
    --shuffle_buffer (rounded up to whole micro-batches; a block may run on into the reader's next
    shard), shuffles each block with a generator seeded by the block's start, and yields it batch by
    batch. So every epoch reads every sample once, over all readers, and the order is a function of
    (seed, R). With `buckets`, each block is sorted by the bucket nearest each image's aspect ratio
    before it is cut into batches; a batch takes the size of its middle image (a batch that
    straddles two buckets crops some of its images more) and the batches of a block are shuffled.
    Ranks read different shards, so at one step two ranks may hold different sizes of about equal
    area.

    Resume. Every batch carries its reader's position after it: (slot, offset of the block's first
    sample in that slot's shard, batches of the block already given). A checkpoint keeps every
    reader's: with the same number of readers, micro-batch and block size each continues exactly.
    With another, the slots are dealt afresh from the earliest unfinished one (`replan`): finished
    slots are skipped, the slot each old reader was in is read again from its block's start, so no
    sample is missed and at most one block per old reader is seen twice."""

    def __init__(self, shards, size, buckets=0.0, shuffle_buffer=1000, verbose=True):
        if not shards:
            raise FileNotFoundError("data: no tar shards listed")
        self.shards, self.size, self.buffer, self.verbose = shards, size, shuffle_buffer, verbose
        self.bucket_sizes = bucket_sizes(size, buckets) if buckets else None
        self.held, self.bad, self.order = set(), 0, (None, None)  # held: held-out keys of shard 0
        self.start(seed=0, micro=1, rank=0, world=1, workers=1)
        if verbose:
            print(f"data: {len(shards)} tar shards, {shards[0]} ... {shards[-1]}, streamed")

    def start(self, seed, micro, rank, world, workers, state=None):
        """Set up this rank's readers before its loader starts them (infinite_batches calls this):
        `workers` per rank, world x workers in all, continuing from a checkpoint's `state` ("data")
        if there is one."""
        self.seed, self.micro, self.workers, self.readers = seed, micro, workers, world * workers
        self.first = rank * workers  # this rank's readers: first, ..., first + workers - 1
        self.block = -(-self.buffer // micro) * micro  # a whole number of micro-batches
        layout = {"readers": self.readers, "micro": micro, "block": self.block}  # what cursors mean
        self.plan, self.cursors, self.turn = {**layout, "base": 0, "status": {}}, {}, 0
        if state and all(state["plan"].get(k) == v for k, v in layout.items()):
            self.plan, self.cursors, self.turn = state["plan"], state["cursors"], state["turn"]
        elif state:
            self.plan = {**layout, **replan(state)}

    def state(self, positions, served):
        """The checkpoint's "data": the plan, every reader's position, and which of a rank's readers
        is next (the loader takes its workers' batches in turn, starting from its first worker).
        `positions`: those of the readers that gave a batch (gathered from every rank), the others
        are still where they started; `served`: batches each rank took since this stream started."""
        cursors = {j: positions.get(j, self.cursor(j)) for j in range(self.readers)}
        return {"plan": self.plan, "cursors": cursors, "turn": (self.turn + served) % self.workers}

    def cursor(self, j):
        """Where reader j starts: its saved position, else its first unfinished slot of the plan."""
        if j in self.cursors:
            return self.cursors[j]
        slot = self.next_slot(self.plan["base"] + j - self.readers)
        return [slot, max(0, self.plan["status"].get(slot, 0)), 0]

    def next_slot(self, slot):
        """The reader's slot after `slot`, passing those the plan marks finished (-1)."""
        slot += self.readers
        while self.plan["status"].get(slot) == -1:
            slot += self.readers
        return slot

    def shard(self, slot):
        """The index of the shard in `slot`."""
        epoch, i = divmod(slot, len(self.shards))
        if self.order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self.order = (epoch, torch.randperm(len(self.shards), generator=g).tolist())
        return self.order[1][i]

    def samples(self, index):
        """(key, {extension: bytes}) of shard `index`'s samples in tar order, held-out ones left
        out. A shard that cannot be read (missing, not a tar, cut short) ends where it breaks,
        counted like a bad sample."""
        key, members, name = None, {}, self.shards[index]
        try:
            with open_url(name) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, base = os.path.split(info.name)
                    stem, _, ext = base.partition(".")  # the key ends at the name's first dot
                    if os.path.join(folder, stem) != key:
                        if members and not (index == 0 and key in self.held):
                            yield key, members
                        key, members = os.path.join(folder, stem), {}
                    members[ext.lower()] = tar.extractfile(info).read()
        except Exception as e:
            self.skip(name, describe(e))
        if members and not (index == 0 and key in self.held):
            yield key, members

    def decode(self, name, members, size):
        """(image, caption) of one sample at `size`, or None (counted) without a readable image."""
        try:
            image = shard_image(members)
            if image is None:
                raise ValueError("no image")
            return load_image(io.BytesIO(image), size), shard_caption(members)
        except Exception as e:
            self.skip(name, describe(e))

    def skip(self, name, reason):
        self.bad += 1
        if self.verbose:
            print(f"data: skipping unreadable {name} ({reason}); {self.bad} skipped by this reader")

    def readable(self):
        """The first shard's readable samples (not held out) as (key, image, caption), square."""
        for key, members in self.samples(0):
            item = self.decode(f"{self.shards[0]}:{key}", members, self.size)
            if item:
                yield key, *item

    def holdout(self, n):
        """The first n readable samples of the first shard, as (image, caption): left out of the
        stream from now."""
        held = list(islice(self.readable(), n))
        if not held:
            raise UsageError(f"data: no readable samples in the first shard {self.shards[0]}")
        self.held |= {key for key, _, _ in held}
        return [(image, caption) for _, image, caption in held]

    def raw(self, slot, offset):
        """(slot, offset, key, members) of the reader's samples from (slot, offset) on, forever."""
        while True:
            for n, (key, members) in enumerate(self.samples(self.shard(slot))):
                if n >= offset:
                    yield slot, n, key, members
            slot = self.next_slot(slot)
            offset = max(0, self.plan["status"].get(slot, 0))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # the loader takes its first batch from worker 0: it plays the reader whose turn it is
        j = self.first + ((info.id if info else 0) + self.turn) % self.workers
        slot, offset, done = self.cursor(j)
        raw = self.raw(slot, offset)
        following = next(raw)
        while True:
            block = [following] + list(islice(raw, self.block - 1))
            following = next(raw)  # the next block's start: the position after this block
            g = torch.Generator().manual_seed(hash((self.seed, block[0][0], block[0][1])) % 2**63)
            order = torch.randperm(len(block), generator=g).tolist()
            size = [self.size] * len(block)
            if self.bucket_sizes:  # sorted by bucket, then cut: each batch (nearly) one aspect
                size = [self.nearest_bucket(block[i][3]) for i in order]
                size, order = zip(*sorted(zip(size, order), key=lambda p: p[0]))
            batches = [list(range(k, k + self.micro)) for k in range(0, len(block), self.micro)]
            if self.bucket_sizes:
                batches = [batches[b] for b in torch.randperm(len(batches), generator=g).tolist()]
            bad = set()
            for b in range(done, len(batches)):
                batch_size = size[batches[b][self.micro // 2]]
                items = [self.decode_at(block, order, k, batch_size, bad) for k in batches[b]]
                if None in items:  # not one sample of the block could be decoded: the next one
                    break
                after = [*block[0][:2], b + 1] if b + 1 < len(batches) else [*following[:2], 0]
                images, captions = zip(*items)
                yield torch.stack(images), list(captions), torch.tensor([j, *after])
            done = 0

    def decode_at(self, block, order, k, size, bad):
        """The block's k-th sample in shuffled order at `size`; one that cannot be decoded is
        replaced by the next readable one (so a batch keeps its size), as ImageFolder does. None
        when no sample of the block can be."""
        for n in range(k, k + len(order)):
            i = order[n % len(order)]
            if i not in bad:
                slot, offset, key, members = block[i]
                item = self.decode(f"{self.shards[self.shard(slot)]}:{key}", members, size)
                if item:
                    return item
                bad.add(i)

    def nearest_bucket(self, members):
        """The bucket nearest a sample's aspect ratio (its image header's; square if unreadable)."""
        try:
            with Image.open(io.BytesIO(shard_image(members))) as img:
                return nearest_size(displayed_size(img), self.bucket_sizes)
        except Exception:
            return (self.size, self.size)


def replan(state):
    """How readers continue a checkpoint's stream written by another number of readers (or another
    micro-batch or shuffle block size): from the earliest unfinished slot (the new `base`) on, slots
    are dealt afresh; those every old reader had passed are marked finished (-1) in `status`, and
    each old reader's slot restarts at its current block's start."""
    old, cursors = state["plan"], state["cursors"]
    base, R = min(c[0] for c in cursors.values()), old["readers"]
    status = {k: v for k, v in old["status"].items() if k >= base}
    for j, (slot, offset, _) in cursors.items():
        # reader j's first slot >= base
        first = old["base"] + j + max(0, -(-(base - old["base"] - j) // R)) * R
        status.update({k: -1 for k in range(first, slot, R)})
        status[slot] = offset
    return {"base": base, "status": status}
