"""
--cache: a small dataset's frozen inputs computed once and kept on disk, instead of at every step
(no random augmentation is applied, so they never change). Re-runs and --resume read the file.

    StageACache   Stage B's: the Stage A latents (DiffNeXt) or tokens (Paella) of every image
    StageCCache   Stage C's: the semantic latent of every image and the CLIP text of every caption

A cache file is named by a hash of everything that produced it (data, frozen weights, sizes,
compute dtype): another dataset or model writes another file.
"""
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from blocks import to_stage_c_space
from common import atomic_write
from data import dataset_key, same_size_chunks, sizes_of

# -----------------------------------------------------------------------------
# files on disk, keyed by what produced them


def weights_fingerprint(module):
    """A short hash of a module's weights: every tensor's name, shape and 64 values spread through
    it (enough to tell two sets of weights apart without hashing gigabytes)."""
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        flat = v.detach().flatten()
        h.update(f"{k}{tuple(v.shape)}".encode())
        h.update(flat[::max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def disk_cached(stem, key, build, rt):
    """build()'s result (a dict of tensors, lists and numbers) computed once and kept on disk, at
    `{stem}-{hash of key}.pt`, where `key` (JSON-able) names everything that produced it: the data,
    the frozen models (weights_fingerprint), the sizes. A re-run or --resume with the same key reads
    the file instead. Rank 0 builds and writes it (atomically), the other ranks wait and read it.
    Returns (result, path, whether it was built now)."""
    path = f"{stem}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.pt"
    built = not os.path.exists(path)
    if built and rt.master:
        result = build()
        atomic_write(path, lambda tmp: torch.save(result, tmp))
    if rt.ddp:
        dist.barrier()
    if not (built and rt.master):  # the builder keeps its result: no second copy read back
        result = torch.load(path, map_location="cpu", weights_only=True)
    return result, path, built


def same_size_batches(dataset, batch_size, num_workers=2):
    """The whole dataset once, in index order within each image size, as (indices, batch) pairs of
    at most `batch_size` items of one size (to encode a dataset up front: the stages' --cache)."""
    indices = same_size_chunks(dataset, range(len(dataset)), batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=indices, num_workers=num_workers)
    return zip(indices, loader)


# -----------------------------------------------------------------------------
# Stage B: Stage A latents


class StageACache(torch.utils.data.Dataset):
    """--cache: a (small) dataset's frozen Stage A encoding, computed once (encode_dataset, kept
    on disk by cache_stage_a) instead of at every step: no random augmentation, so it never changes.
    `encode` gives the latents (B, 4, H/4, W/4) here, the tokens (B, H/4, W/4) for Paella. Items are
    (image, caption, latent): the images are still read, for the compressor. With aspect-ratio
    buckets the latents come in several shapes, one per bucket (`sizes`, as the dataset's)."""

    def __init__(self, dataset, latents):
        self.dataset, self.sizes, self.latents = dataset, sizes_of(dataset), latents

    @staticmethod
    @torch.no_grad()
    def encode_dataset(dataset, encode, rt, batch_size=64, num_workers=2, verbose=True):
        """{"latents": encode(image) of every image, on the CPU (float32 latents, or tokens)}: what
        a StageACache holds."""
        latents = [None] * len(dataset)
        batches = same_size_batches(dataset, batch_size, num_workers)
        for indices, (images, _) in tqdm(batches, "cache: Stage A encoding", disable=not verbose,
                                         leave=False):
            with rt.autocast():
                encoded = encode(images.to(rt.device)).cpu()  # (B, 4, H/4, W/4) or (B, H/4, W/4)
            for i, latent in zip(indices, encoded):
                latents[i] = latent.float() if latent.is_floating_point() else latent
        return {"latents": latents}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, caption = self.dataset[i]
        return image, caption, self.latents[i]


def cache_stage_a(trainset, encode, stage_a, args, rt, logger):
    """--cache of both Stage B scripts: `trainset`'s StageACache under `encode`, computed once per
    dataset and Stage A into out_dir/cache/, read by re-runs and --resume (common.disk_cached)."""
    key = {"data": dataset_key(trainset), "stage_a": weights_fingerprint(stage_a),
           "encode": encode.__name__, "dtype": str(rt.dtype)}  # bf16 latents are not fp32's
    state, path, built = disk_cached(os.path.join(args.out_dir, "cache", "stage_b"), key, lambda: (
        StageACache.encode_dataset(trainset, encode, rt, num_workers=args.num_workers,
                                   verbose=rt.master)), rt)
    logger.log(f"cache: {'wrote' if built else 'read'} {path}: the Stage A {encode.__name__} of "
               f"{len(trainset)} images")
    return StageACache(trainset, **state)


# -----------------------------------------------------------------------------
# Stage C: semantic latents and text


class StageCCache(torch.utils.data.Dataset):
    """--cache: the frozen models' outputs for a whole (small) dataset, computed once
    (encode_dataset) and kept on disk, so that a training step costs only the prior and the frozen
    models need not stay in memory. Items are (y (16, h, w), caption index); `text` holds one
    embedding per distinct caption plus the empty caption last (`empty_index`), which caption
    dropout swaps in. With aspect-ratio buckets the latents come in several shapes, one per bucket
    (`sizes`, as the dataset's)."""

    def __init__(self, latents, text_index, text, sizes=None):
        self.latents, self.text_index, self.text, self.sizes = latents, text_index, text, sizes
        self.empty_index = len(text) - 1

    @staticmethod
    @torch.no_grad()
    def encode_dataset(dataset, compressor, text_encoder, latent_space, batch_size=64,
                       num_workers=2, verbose=True):
        """What a StageCCache holds, as a dict of its arguments: the semantic latent of every image
        and the text embedding of every distinct caption, on the CPU."""
        device, n = next(compressor.parameters()).device, len(dataset)
        latents, captions = [None] * n, [None] * n  # latents: (16, h, w) each
        batches = same_size_batches(dataset, batch_size, num_workers)
        for indices, (images, caps) in tqdm(batches, "cache: semantic latents", disable=not verbose,
                                            leave=False):
            y = to_stage_c_space(compressor(images.to(device)), latent_space).cpu()  # (B, 16, h, w)
            for i, y_i, caption in zip(indices, y, caps):
                latents[i], captions[i] = y_i, caption
        distinct = sorted(set(captions) - {""}) + [""]
        index = {c: i for i, c in enumerate(distinct)}
        text = torch.cat([text_encoder.encode(distinct[i:i + batch_size]).cpu()
                          for i in range(0, len(distinct), batch_size)])  # (distinct+1, 77, c_cond)
        return {"latents": latents, "text_index": torch.tensor([index[c] for c in captions]),
                "text": text, "sizes": sizes_of(dataset)}

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return self.latents[i], self.text_index[i]


class PromptTable:
    """A text encoder's embeddings of a fixed set of prompts, looked up by prompt (`encode`, as the
    encoder's): all that the previews need once the encoder has left memory."""

    def __init__(self, text_encoder, prompts):
        self.index = {p: i for i, p in enumerate(sorted(set(prompts)))}
        self.table = text_encoder.encode(list(self.index))  # (P, 77, width)

    def encode(self, prompts):
        return self.table[[self.index[p] for p in prompts]]


def cache_stage_c(trainset, compressor, text_encoder, latent_space, prompts, args, rt, logger):
    """--cache of stage_c.py: `trainset`'s StageCCache, computed once per dataset and frozen models
    into out_dir/cache/, read by re-runs and --resume (disk_cached); and a PromptTable of
    `prompts` (the previews') and the empty one, so that the text tower can leave memory too.
    Returns (cache, prompt table)."""
    key = {"data": dataset_key(trainset), "compressor": weights_fingerprint(compressor),
           "text_encoder": [text_encoder.spec, weights_fingerprint(text_encoder)],
           "space": latent_space, "dtype": str(rt.dtype)}  # bf16 inputs are not fp32's
    t0 = time.time()
    with rt.autocast():
        state, path, built = disk_cached(
            os.path.join(args.out_dir, "cache", "stage_c"), key,
            lambda: StageCCache.encode_dataset(trainset, compressor, text_encoder, latent_space,
                                               num_workers=args.num_workers, verbose=rt.master),
            rt)
        table = PromptTable(text_encoder, prompts + [""])
    cache = StageCCache(**state)
    cache.text = cache.text.to(rt.device)
    shapes = ", ".join(map(str, sorted({tuple(y.shape) for y in cache.latents})))
    std = torch.cat([y.flatten() for y in cache.latents]).std()
    logger.log(f"cache: {'wrote' if built else 'read'} {path}: {len(cache)} semantic latents "
               f"{shapes} (std {std:.3f}, ~1 expected), {len(cache.text)} distinct captions "
               f"(with the empty one), {time.time() - t0:.1f} s; the compressor and the text "
               "tower leave memory")
    return cache, table
