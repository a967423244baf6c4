"""
The released Würstchen weights (method.md §8): where they are, what is missing, the constants they
must share with this code, and the official files' key names. Each model's `from_pretrained`
(StageA, StageB, SemanticCompressor, StageC, Paella) reads the weights themselves; this file finds
them and builds the text towers.

    open_released(root)      v2: warp-ai/wuerstchen-prior + warp-ai/wuerstchen (or an --export of
                             ours, or the official .pt files), from a folder or the Hugging Face
                             cache: paths, text towers, latent space, training sizes
    open_released_v1(root)   v1: the official model_stage_c.pt, model_stage_b.pt (Paella) files
    dome272_to_diffusers     the official files' packed attention -> our (diffusers') key names
"""
import glob
import os

from blocks import LATENT_DIM_SCALE, RELEASED_LATENT_SPACE, RESOLUTION_MULTIPLE
from common import UsageError, hub_file, read_json
from text_encoder import TextEncoder, fetch_clip_weights, read_pad_token


PRIOR_REPO, DECODER_REPO = "warp-ai/wuerstchen-prior", "warp-ai/wuerstchen"
OFFICIAL_FILES = {"stage_c": "model_v3_stage_c.pt", "stage_b": "model_v2_stage_b.pt",
                  "stage_a": "vqgan_f4_v1_500k.pt"}
# the semantic compressor of the released v2 (EfficientNetV2-S, `effnet_state_dict`), as diffusers'
# prior fine-tuning scripts fetch it: no diffusers repository holds it
COMPRESSOR_FILE = ("dome272/wuerstchen", "model_v2_stage_b.pt")
# the open_clip towers with the weights of the text_encoder/ folders (--open_clip), Stages C and B
OPEN_CLIP_TEXT = {"c": ("ViT-bigG-14", "laion2b_s39b_b160k"),
                  "b": ("ViT-H-14", "laion2b_s32b_b79k")}
# the schedule's constants (alpha_bar) as scheduler_config.json states them
SCHEDULER = {"_class_name": "DDPMWuerstchenScheduler", "s": 0.008, "scaler": 1.0}
RELEASED_LAYOUT = """\
  {root}/wuerstchen-prior/  model_index.json  prior/  text_encoder/  tokenizer/  scheduler/
      <- hf download warp-ai/wuerstchen-prior --local-dir {root}/wuerstchen-prior
  {root}/wuerstchen/  model_index.json  decoder/  vqgan/  text_encoder/  tokenizer/  scheduler/
      (and in an --export of ours: semantic_compressor/)
      <- hf download warp-ai/wuerstchen --local-dir {root}/wuerstchen
  Instead of prior/, decoder/ and vqgan/, the official files may lie in {root} itself
  (model_v2_stage_b.pt also holds the semantic compressor that --variation, --init_image and
  fine-tuning need):
      model_v3_stage_c.pt  model_v2_stage_b.pt  vqgan_f4_v1_500k.pt
      <- hf download dome272/wuerstchen model_v3_stage_c.pt ... --local-dir {root}
  With --open_clip the text towers are open_clip's ViT-bigG-14 laion2b_s39b_b160k and ViT-H-14
  laion2b_s32b_b79k (open_clip_pytorch_model.bin of laion/CLIP-ViT-bigG-14-laion2B-39B-b160k and
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K, from the Hugging Face cache) instead of the text_encoder/
  folders.
  sample.py: a folder with the official v1 files runs the v1 chain instead (sample.V1_LAYOUT)."""


def find_released(root=None, text_folders=True, compressor=False):
    """Paths of the released components in `root` (RELEASED_LAYOUT) or, when root is None, in the
    Hugging Face cache (downloaded into it first when online; the compressor, when asked for, from
    COMPRESSOR_FILE). Anything missing -> FileNotFoundError saying what to download and where, at
    once (offline, huggingface_hub's snapshot_download gives up after one request, no retries)."""
    if root is None:
        try:
            prior, decoder = hub_snapshot(PRIOR_REPO), hub_snapshot(DECODER_REPO)
        except Exception as e:  # offline and not cached, or no such repository
            raise FileNotFoundError(released_help(
                None, [f"{PRIOR_REPO} and {DECODER_REPO} ({type(e).__name__})"]))
    else:
        prior, decoder = (os.path.join(root, repo.split("/")[1])
                          for repo in (PRIOR_REPO, DECODER_REPO))

    def first(*paths):
        return next((p for p in paths if p and os.path.exists(p)), None)

    official = {k: root and os.path.join(root, name) for k, name in OFFICIAL_FILES.items()}
    paths = {"stage_c": first(os.path.join(prior, "prior"), official["stage_c"]),
             "stage_b": first(os.path.join(decoder, "decoder"), official["stage_b"]),
             "stage_a": first(os.path.join(decoder, "vqgan"), official["stage_a"]),
             "compressor": first(os.path.join(decoder, "semantic_compressor"), official["stage_b"])}
    if compressor and root is None and paths["compressor"] is None:
        try:
            paths["compressor"] = hub_file(*COMPRESSOR_FILE)
        except Exception:  # named below
            pass
    for k, repo in (("c", prior), ("b", decoder)):  # text_encoder_c, tokenizer_c, ..., index_b
        for part, name in (("text_encoder", "text_encoder"), ("tokenizer", "tokenizer"),
                           ("scheduler", "scheduler/scheduler_config.json"),
                           ("index", "model_index.json")):
            paths[f"{part}_{k}"] = first(os.path.join(repo, name))
    needed = (["stage_c", "stage_b", "stage_a"] + ["compressor"] * compressor
              + (["text_encoder_c", "text_encoder_b"] if text_folders else []))
    missing = [k for k in needed if paths[k] is None]
    if missing:
        raise FileNotFoundError(released_help(root, missing))
    return paths


def hub_snapshot(repo):
    """The repository's folder in the Hugging Face cache, downloaded first when online: configs,
    tokenizer, safetensors weights (.bin only for folders without safetensors; no fp16 copies)."""
    from huggingface_hub import snapshot_download
    folder = snapshot_download(repo, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                               ignore_patterns=["*fp16*"])
    bare = [f"{d}/*.bin" for d in ("prior", "decoder", "vqgan", "text_encoder")
            if os.path.isdir(os.path.join(folder, d))
            and not glob.glob(os.path.join(folder, d, "*.safetensors"))]
    return snapshot_download(repo, allow_patterns=bare) if bare else folder


def released_help(root, missing):
    where = root or "DIR"
    repo, name = COMPRESSOR_FILE
    return (f"the released Würstchen v2 weights were not found (missing: {', '.join(missing)}). "
            f"On a machine with network, download the two repositories (about 3.1 B parameters in "
            f"all) and pass their folder, `python sample.py --pretrained {where} --prompt ...`:\n"
            f"{RELEASED_LAYOUT.format(root=where)}\n"
            f"Or fill the Hugging Face cache (~/.cache/huggingface/hub) with `hf download "
            f"{PRIOR_REPO}` and `hf download {DECODER_REPO}` (and, to fine-tune, `hf download "
            f"{repo} {name}`: the semantic compressor) and pass --pretrained without a folder.")


def open_released(root=None, open_clip_text=False, compressor=False):
    """The released Würstchen v2 weights (method §8) or an export of ours, found by find_released
    (the semantic compressor required with `compressor`) and checked against the constants the
    method fixes; nothing is loaded yet. Returns {"paths": each model's weights (for its class's
    from_pretrained: stage_c, stage_b, stage_a, compressor or None); "builders": text_encoder_c and
    text_encoder_b, functions building the CLIP text towers of Stages C and B (float32, CPU);
    "latent_space": y = (e + shift) / scale, from the prior's model_index.json (released: 42 and
    1); "image_sizes": the training sizes of Stages C and B (released: 1024)}. open_clip_text: the
    open_clip towers instead of the repositories' transformers text encoders (the same weights)."""
    paths = find_released(root, text_folders=not open_clip_text, compressor=compressor)
    prior_index, decoder_index = read_json(paths["index_c"]), read_json(paths["index_b"])
    # constants the method hard-codes (round_size, decode_stage_c, alpha_bar), per the repositories
    checks = {"resolution_multiple": (prior_index.get("resolution_multiple", RESOLUTION_MULTIPLE),
                                      RESOLUTION_MULTIPLE),
              "latent_dim_scale": (decoder_index.get("latent_dim_scale", LATENT_DIM_SCALE),
                                   LATENT_DIM_SCALE)}
    for k in "cb":
        sched = read_json(paths[f"scheduler_{k}"])
        found = {key: sched.get(key, SCHEDULER[key]) for key in ("s", "scaler")}
        checks[f"scheduler {k}"] = (found, {key: SCHEDULER[key] for key in found})
    wrong = {k: found for k, (found, ours) in checks.items() if found != ours}
    if wrong:
        raise UsageError(f"these weights use other constants than Würstchen v2 and this code: "
                         f"{wrong}")
    # pad tokens (LAION's '!' without a tokenizer folder); open_clip weights found now, not later
    pad_tokens = {k: read_pad_token(paths[f"tokenizer_{k}"]) if paths[f"tokenizer_{k}"] else "!"
                  for k in "cb"}
    weights = {k: fetch_clip_weights(*OPEN_CLIP_TEXT[k]) for k in "cb"} if open_clip_text else {}

    def text_encoder(k):  # the repository's CLIPTextModel, or the open_clip tower with its weights
        if open_clip_text:
            return TextEncoder(OPEN_CLIP_TEXT[k][0], weights[k], pad_tokens[k])
        return TextEncoder("transformers", paths[f"text_encoder_{k}"], pad_tokens[k])

    builders = {"text_encoder_c": lambda: text_encoder("c"),
                "text_encoder_b": lambda: text_encoder("b")}
    # the prior pipeline's e = latent_mean * y - latent_std: y = (e + 1) / 42 (method §3.3)
    latent_space = {"scale": prior_index.get("latent_mean", RELEASED_LATENT_SPACE["scale"]),
                    "shift": prior_index.get("latent_std", RELEASED_LATENT_SPACE["shift"])}
    image_sizes = {"c": prior_index.get("_train_image_size", 1024),  # released: 1024 px
                   "b": decoder_index.get("_train_image_size", 1024)}
    return {"builders": builders, "paths": paths, "latent_space": latent_space,
            "image_sizes": image_sizes}


def is_released_v1(root):
    """Whether the folder `root` holds the official v1 files (Paella's model_stage_b.pt)."""
    return bool(root) and os.path.exists(os.path.join(root, V1_FILES["stage_b"]))


# the official v1 files (method §1.4, §8.1), and the CLIP ViT-H tower both v1 stages read
V1_FILES = {"stage_c": "model_stage_c.pt", "stage_b": "model_stage_b.pt",
            "stage_a": "vqgan_f4_v1_500k.pt"}
V1_LAYOUT = """\
  {root}/model_stage_c.pt  model_stage_b.pt  vqgan_f4_v1_500k.pt   <- the official v1 files (the
      Hugging Face repository dome272/wuerstchen): the prior (its EMA weights are used), Paella
      + the EfficientNetV2-L compressor, the VQGAN
  {root}/wuerstchen/text_encoder/ and tokenizer/   <- hf download warp-ai/wuerstchen --include
      "text_encoder/*" "tokenizer/*" --local-dir {root}/wuerstchen   (CLIP ViT-H-14, as v1 used;
      or --open_clip: open_clip's ViT-H-14 laion2b_s32b_b79k)"""


def open_released_v1(root, open_clip_text=False):
    """The official Würstchen v1 files in `root` (V1_LAYOUT; method §1.4, §8.1), checked: {"paths":
    stage_c, stage_b (Paella and the EfficientNetV2-L compressor), stage_a; "builders":
    text_encoder, the CLIP ViT-H tower both v1 stages read (the decoder repository's text_encoder/,
    or open_clip's ViT-H-14)}."""
    paths = {k: os.path.join(root, name) for k, name in V1_FILES.items()}
    decoder = os.path.join(root, DECODER_REPO.split("/")[1])
    text_folder, tokenizer = (os.path.join(decoder, name) for name in ("text_encoder", "tokenizer"))
    missing = [k for k, path in paths.items() if not os.path.exists(path)]
    missing += [] if open_clip_text or os.path.isdir(text_folder) else ["text_encoder"]
    if missing:
        raise FileNotFoundError(f"the official Würstchen v1 files are incomplete in {root} "
                                f"(missing: {', '.join(missing)}); the v1 chain reads:\n"
                                f"{V1_LAYOUT.format(root=root)}")
    pad_token = read_pad_token(tokenizer) if os.path.isdir(tokenizer) else "!"
    weights = fetch_clip_weights(*OPEN_CLIP_TEXT["b"]) if open_clip_text else None

    def text_encoder():  # CLIP ViT-H-14 for both stages
        if open_clip_text:
            return TextEncoder(OPEN_CLIP_TEXT["b"][0], weights, pad_token)
        return TextEncoder("transformers", text_folder, pad_token)
    return {"paths": paths, "builders": {"text_encoder": text_encoder}}


def load_imagenet_weights(backbone, name):
    """Fill a torchvision EfficientNetV2 `features` module (`name`: efficientnet_v2_s or _l) with
    torchvision's ImageNet weights, downloaded once into the torch hub cache: the semantic
    compressor's start (method §3.2). Returns False, changing nothing, when they cannot be had
    (no network)."""
    import torchvision
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        sd = weights.get_state_dict(progress=False)
    except Exception:
        return False
    backbone.load_state_dict({k.removeprefix("features."): v for k, v in sd.items()
                              if k.startswith("features.")})
    return True


def dome272_to_diffusers(sd):
    """Official key names -> ours/diffusers' (method §8.2): a packed nn.MultiheadAttention becomes
    to_q/to_k/to_v (in_proj split in three row blocks, in that order) and to_out.0 (out_proj)."""
    out = {}
    for k, v in sd.items():
        if ".attention.attn.in_proj_" in k:
            prefix, kind = k.split(".attn.in_proj_")  # kind: 'weight' (3C, C) or 'bias' (3C,)
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{kind}"] = part
        else:
            out[k.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = v
    return out
