"""
The metrics of evaluate.py, on folders of images (Würstchen §4, docs/evaluation.md): FID@256
(torchmetrics' FrechetInceptionDistance on torch-fidelity's Inception-v3, TF1 resize), the CLIP
score (torchmetrics' formula, CLIP ViT-L/14) and PickScore (the share of prompts where one model's
image is preferred, the paper's Table 1); and the cheap CLIP score of Stage C's previews.

Only requirements.txt is needed to import this file: the metric libraries of requirements-eval.txt
are imported when a metric runs, and their weights fetched on first use (never during training).
"""
import os

import torch
from PIL import Image
from tqdm import tqdm

from common import UsageError

# -----------------------------------------------------------------------------
# images of a folder


def image_files(folder, names=None):
    """The image files of a folder, searched recursively, sorted; only those named in the file
    `names` (one file name a line) when given."""
    keep = None
    if names:
        with open(names, encoding="utf-8") as f:
            keep = {line.strip() for line in f if line.strip()}
    files = sorted(os.path.join(root, name) for root, _, names_ in os.walk(folder)
                   for name in names_ if name.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    files = [p for p in files if keep is None or os.path.basename(p) in keep]
    if not files:
        raise UsageError(f"no images in {folder}" + (f" named in {names}" if names else ""))
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Images as uint8 (3, H, W): as stored, or with `size` as FID@256 reads them: RGB,
    centre-cropped to a square, then resized to size x size with PIL's bicubic filter (antialiased
    when shrinking)."""

    def __init__(self, files, size=None):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
        if self.size:
            w, h = img.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            img = img.crop(box).resize((self.size, self.size), Image.Resampling.BICUBIC)
        return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(
            img.size[1], img.size[0], 3).permute(2, 0, 1)  # (3, H, W)


def image_batches(files, size=None, batch_size=50, num_workers=4):
    """Batches of ImageFiles: stacked (B, 3, size, size) with `size`, else lists of (3, H, W)."""
    return torch.utils.data.DataLoader(ImageFiles(files, size), batch_size=batch_size,
                                       num_workers=num_workers,
                                       collate_fn=None if size else list)


def prompts_of(files):
    """The prompt beside each generated image (NNNNNN.txt next to NNNNNN.png)."""
    prompts = []
    for path in files:
        with open(os.path.splitext(path)[0] + ".txt", encoding="utf-8") as f:
            prompts.append(f.read().strip())
    return prompts

# -----------------------------------------------------------------------------
# weights of the metrics: fetched on first use, a one-line message without network

INCEPTION = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's copy of the TF FID net
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION}"
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"  # a fine-tuned CLIP ViT-H/14 (Kirstain et al. 2023)
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # as PickScore's model card


def hub_folder(name, local_only=False, weights=True):
    """A local folder as it is, else the Hugging Face repository `name` from the cache, fetched on
    first use unless local_only: configs and tokenizer files, and with `weights` the safetensors
    weights (not the .bin / TF / Flax copies)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.txt"] + (["*.safetensors"] if weights else [])
    try:
        return snapshot_download(name, allow_patterns=patterns, local_files_only=local_only)
    except Exception as e:  # no network, HF_HUB_OFFLINE=1, or not in the cache
        raise UsageError(f"{name} is not in the Hugging Face cache and could not be fetched "
                         f"({type(e).__name__}): on a machine with network run `hf download "
                         f"{name} --include {' '.join(repr(p) for p in patterns)}` (or pass a "
                         f"folder with its files)") from None


def clip_model(name, processor=None, device="cpu", local_only=False):
    """A transformers CLIPModel (eval, on `device`) and its CLIPProcessor (from `processor`, else
    from the model's folder)."""
    from transformers import CLIPModel, CLIPProcessor
    folder = hub_folder(name, local_only)
    processor = CLIPProcessor.from_pretrained(
        hub_folder(processor, local_only, weights=False) if processor else folder)
    return CLIPModel.from_pretrained(folder).eval().to(device), processor


def fid_metric(device="cpu", feature=2048, weights=None):
    """torchmetrics' FrechetInceptionDistance on the 2048-d pool features of torch-fidelity's
    Inception-v3 (the weights of the TF FID reference), with antialias=False: the network resizes
    its uint8 input to 299 with TF1's bilinear interpolation, as torch-fidelity and the TF reference
    do (torchmetrics' default antialiased resize gives other numbers). Statistics in float64.
    `feature`: a module instead (tests); `weights`: a local copy of the Inception file."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    try:
        return FrechetInceptionDistance(feature=feature, antialias=False, normalize=False,
                                        feature_extractor_weights_path=weights).to(device)
    except OSError as e:  # the Inception download failed
        raise UsageError(f"FID needs torch-fidelity's Inception-v3 weights {INCEPTION}, "
                         f"which could not be fetched ({type(e).__name__}): on a machine with "
                         f"network download {INCEPTION_URL} into "
                         f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} (or pass --inception "
                         f"FILE)") from None

# -----------------------------------------------------------------------------
# the metrics


@torch.no_grad()
def fid(gen_files, ref_files, size=256, device="cpu", metric=None, batch_size=50, num_workers=4):
    """FID of generated images against reference images, both centre-cropped and resized to
    size x size first (FID@256: ImageFiles), by `metric` (default: fid_metric)."""
    metric = metric or fid_metric(device)
    for real, files in ((True, ref_files), (False, gen_files)):
        for x in tqdm(image_batches(files, size, batch_size, num_workers),
                      desc="reference" if real else "generated", unit="batch"):
            metric.update(x.to(device), real=real)  # (B, 3, size, size) uint8
    return metric.compute().item()


def embedding(out):
    """The projected CLIP embedding of get_image_features / get_text_features: a tensor
    (transformers 4), or the pooler_output of what they return (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_embeddings(model, processor, images, prompts):
    """Unit-length CLIP embeddings of images (a list of uint8 (3, H, W)) and of their prompts
    (tokens truncated to 77 with the end token kept): two (B, D) tensors."""
    device = model.logit_scale.device
    pixels = processor(images=[x.cpu() for x in images], return_tensors="pt")["pixel_values"]
    text = processor(text=prompts, padding=True, truncation=True, max_length=77,
                     return_tensors="pt")
    image_emb = embedding(model.get_image_features(pixel_values=pixels.to(device)))
    text_emb = embedding(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                 attention_mask=text["attention_mask"].to(device)))
    return (torch.nn.functional.normalize(image_emb.float(), dim=-1),
            torch.nn.functional.normalize(text_emb.float(), dim=-1))


@torch.no_grad()
def clip_cosines(files, prompts, model, processor, batch_size=50, num_workers=4):
    """The cosine of each image's CLIP embedding with its prompt's: (N,)."""
    cosines = []
    batches = image_batches(files, None, batch_size, num_workers)
    for k, images in enumerate(tqdm(batches, desc="CLIP", unit="batch")):
        image_emb, text_emb = clip_embeddings(model, processor, images,
                                              prompts[k * batch_size:(k + 1) * batch_size])
        cosines.append((image_emb * text_emb).sum(-1).cpu())
    return torch.cat(cosines)


def clip_score(files, prompts, model, processor, **loader):
    """The CLIP score as torchmetrics' CLIPScore computes it: the mean over image-prompt pairs of
    100 x the cosine of their CLIP embeddings, clipped at 0."""
    return max(100 * clip_cosines(files, prompts, model, processor, **loader).mean().item(), 0.0)


def pick_preference(files_x, files_y, prompts, model, processor, **loader):
    """PickScore of X against Y (the paper's Table 1): each image is scored with s = logit_scale x
    cos(prompt, image) by the PickScore towers, and X's image is preferred when the softmax over
    the prompt's two, exp(s_x) / (exp(s_x) + exp(s_y)), exceeds 1/2 (a tie counts half). Returns
    {'win_rate': the share of prompts preferring X, 'mean_prob': the mean of that softmax}."""
    scale = model.logit_scale.exp().item()
    s_x, s_y = (scale * clip_cosines(files, prompts, model, processor, **loader)
                for files in (files_x, files_y))  # (N,) each
    prob = torch.stack([s_x, s_y], -1).softmax(-1)[:, 0]
    wins = (s_x > s_y).float() + 0.5 * (s_x == s_y).float()
    return {"win_rate": wins.mean().item(), "mean_prob": prob.mean().item()}


_preview_clip = None  # (model, processor), False when it cannot be had; loaded once


def preview_scores(images, prompts, log=print):
    """A cheap number for Stage C's previews: the CLIP score of the preview images (B, 3, H, W) in
    [0, 1] on their prompts, when requirements-eval.txt is installed and CLIP ViT-L/14 is in the
    Hugging Face cache (never fetched during training: `log` says once what to fetch); {} else."""
    global _preview_clip
    if _preview_clip is None:
        try:
            import torchmetrics  # noqa: F401  (the mark of requirements-eval.txt)
            with torch.random.fork_rng(devices=[]):  # the training's random stream untouched
                _preview_clip = clip_model(CLIP_SCORE_MODEL, local_only=True)
        except ImportError:
            _preview_clip = False
        except UsageError as e:
            log(f"previews without a CLIP score: {e}")
            _preview_clip = False
    if not _preview_clip:
        return {}
    model, processor = _preview_clip
    model.to(images.device)
    image_emb, text_emb = clip_embeddings(model, processor,
                                          list(images.float().mul(255).round().byte()), prompts)
    model.to("cpu")
    return {"clip_score": max(100 * (image_emb * text_emb).sum(-1).mean().item(), 0.0)}
