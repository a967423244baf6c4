"""
Fine-tuning a pretrained model on a few images (README "Fine-tune the released model"): the flags,
defaults and warnings of a fine-tune (--pretrained), and LoRA (Hu et al. 2021) adapters on the
frozen model, saved in diffusers' LoRA file layout so that diffusers' load_lora_weights and
sample.py --lora read them.

    add_lora_from_args(model, args)   --lora_rank: adapters on --lora_targets, the base frozen
    save_lora                         pytorch_lora_weights.safetensors, with diffusers' header
    read_lora / merge_lora            any LoRA file load_lora_weights reads, merged (alpha / r)
    apply_loras                       sample.py --lora: prior, its text encoder, decoder
    trained_state / load_trained      a checkpoint keeps only what a run trains (LoRA: adapters)
"""
import json
import math
import os
import re
from dataclasses import asdict

import torch
import torch.nn as nn

from common import (CheckpointError, UsageError, atomic_write, existing_folder, nonnegative_int,
                    positive_float)
from data import folder_captions
from text_encoder import TextEncoder

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
# the attention projections: what diffusers' prior LoRA script adapts in WuerstchenPrior (it
# names to_k to_q to_v to_out.0 add_k_proj add_v_proj; the prior has no add_*_proj)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# -----------------------------------------------------------------------------
# fine-tuning flags, defaults and warnings


def add_finetune_args(group):
    """The fine-tuning flags of the training scripts (Stages B and C)."""
    group.add_argument("--pretrained", type=existing_folder, nargs="?", const="", default=None,
                       metavar="DIR", help="fine-tune the released Würstchen v2 weights from DIR "
                       "(as sample.py --pretrained reads it; an export of ours too), or without "
                       "DIR from the Hugging Face cache; their semantic compressor stays frozen. "
                       "The preset (--model, default paper) then only sets the training defaults")
    group.add_argument("--lora_rank", type=nonnegative_int, default=0,
                       help="train LoRA adapters of this rank on the frozen --pretrained model "
                       "instead of all its weights (0: full fine-tune)")
    group.add_argument("--lora_alpha", type=positive_float, default=None,
                       help="LoRA scale = alpha / rank (default: alpha = rank, scale 1)")
    group.add_argument("--lora_targets", nargs="+", default=LORA_TARGETS,
                       help="the Linear layers that get adapters, by name or name ending "
                       "(PEFT's target_modules): the attention projections, those diffusers' "
                       "prior LoRA script adapts; add channelwise.0 channelwise.4 for the channel "
                       "MLPs, cond_mapper.0 cond_mapper.2 for Stage C's text mapper")
    group.add_argument("--epochs", type=positive_float, default=None, help="passes over the "
                       "training images: sets --max_steps (default when fine-tuning: per preset)")


def finetune_defaults(preset, args):
    """The training defaults of a fine-tune (--pretrained): the preset's "finetune" entry, with its
    LoRA learning rate under --lora_rank."""
    if "finetune" not in preset:
        raise UsageError(f"--model {args.model}: --pretrained fine-tunes the released v2 weights "
                         f"(or an export of ours); this preset has no fine-tuning defaults")
    defaults = {k: v for k, v in preset["finetune"].items() if k != "lora_lr"}
    return defaults | ({"lr": preset["finetune"]["lora_lr"]} if args.lora_rank else {})


def add_lora_from_args(module, args):
    """--lora_rank: LoRA adapters on `module`'s --lora_targets (the base stays frozen; adapters
    start at zero: step 0 is the base model). Returns the run's record of them, else None."""
    if not args.lora_rank:
        return None
    alpha = args.lora_alpha or args.lora_rank
    add_lora(module, args.lora_targets, args.lora_rank, alpha)
    return {"rank": args.lora_rank, "alpha": alpha, "targets": args.lora_targets}


def epochs_to_steps(args, items):
    """--epochs (passes over the training images, `items`: a list of them, None for a stream) as
    --max_steps, unless --max_steps was given."""
    if args.max_steps is not None:
        return
    if items is None:
        raise UsageError("--epochs needs a folder of images (a stream of tar shards has no known "
                         "length): give --max_steps")
    args.max_steps = math.ceil(args.epochs * len(items) / args.batch_size)


def plan_epochs(args, trainset, finetuning, default_lr, logger):
    """--epochs as --max_steps (a folder's images; tar shards have no known length), and, when
    fine-tuning, what would make this small fine-tune learn nothing, said before it starts."""
    captions = folder_captions(trainset) if args.epochs or finetuning else None  # None: shards
    if args.epochs:
        epochs_to_steps(args, captions)
    if finetuning and captions is not None:
        for warning in finetune_warnings(args, default_lr, captions):
            logger.log(f"warning: {warning}")


def finetune_warnings(args, default_lr, captions):
    """What makes a small-data fine-tune on `captions` (one per training image) learn nothing, said
    before it starts (reported failures: "24 images gave no result", a LoRA that "can't learn
    anything" at lr 1e-6). Returns the warnings."""
    warnings, lr = [], args.lr
    passes = args.max_steps * args.batch_size / len(captions)
    if lr < default_lr / 10:
        warnings.append(f"--lr {lr:g} is over 10x below the fine-tuning default "
                        f"{default_lr:g}: the weights (LoRA adapters start at zero) will barely "
                        f"move in a short run")
    if passes < 10:
        warnings.append(f"each training image is seen only {passes:.1f} times (--max_steps x "
                        f"--batch_size / images): a small set usually needs 50-200 passes "
                        f"(--epochs)")
    if not any(captions):
        warnings.append("no image has a caption: the fine-tune will be unconditional (every "
                        "caption empty), so no prompt will call up what it learns; add same-name "
                        ".txt files or a metadata.jsonl")
    return warnings


def lora_file(path):
    """The LoRA file `sample.py --lora PATH` names, checked before anything is loaded: read as
    diffusers' load_lora_weights reads it (read_lora: a file, or a folder's LoRA file); anything
    else is refused with one line naming the flag. Returns the file's path."""
    try:
        return read_lora(path)["path"]
    except UsageError as e:
        raise UsageError(f"--lora {e}") from None


# -----------------------------------------------------------------------------
# LoRA adapters on a frozen model (diffusers' layout)


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update (LoRA, Hu et al. 2021): y = W x + b + s B(A(x)) with
    A: in -> r, B: r -> out, s = alpha / r. add_lora turns a model's Linear layers into these in
    place: W and b keep their names and stay frozen, the adapters are the submodules lora_A and
    lora_B (PEFT's names, so diffusers' LoRA keys). B starts at zero: an adapted model starts
    exactly as its base."""

    def forward(self, x):
        return super().forward(x) + self.lora_B(self.lora_A(x)) * self.lora_scale


def add_lora(model, targets, rank, alpha):
    """Freeze `model` and give every nn.Linear named one of `targets`, or ending in '.' + one of
    them (PEFT's target_modules rule), a rank-`rank` adapter of scale alpha / rank: A initialised
    as nn.Linear does (PEFT's choice too), B zero. Returns the adapted layers' names."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise UsageError(f"LoRA targets {list(targets)}: no nn.Linear layer of the model is "
                         f"named so")
    for name in names:
        layer = model.get_submodule(name)
        layer.__class__ = LoRALinear
        layer.lora_A = nn.Linear(layer.in_features, rank, bias=False, device=layer.weight.device)
        layer.lora_B = nn.Linear(rank, layer.out_features, bias=False, device=layer.weight.device)
        nn.init.zeros_(layer.lora_B.weight)
        layer.lora_scale = alpha / rank
    return names


def lora_weights(model, prefix):
    """The adapters of `model` in diffusers' LoRA layout: `{prefix}.{layer}.lora_A.weight` (r, in)
    and `.lora_B.weight` (out, r), float32, as trained (the scale alpha / r is in the file's
    header: save_lora)."""
    weights = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for part in ("lora_A", "lora_B"):
                weights[f"{prefix}.{name}.{part}.weight"] = \
                    getattr(m, part).weight.detach().float().cpu().contiguous()
    return weights


def save_lora(path, model, prefix, made_for, lora):
    """The adapters as a LoRA file (pytorch_lora_weights.safetensors: diffusers' load_lora_weights
    and sample.py --lora read it), written atomically. Its header holds what diffusers' training
    scripts write there (LORA_CONFIG_KEY: the run's `lora` record as peft's LoraConfig: r,
    lora_alpha, target_modules, no per-layer patterns; under the model's prefix), and `made_for`,
    the base model, for the error when the file meets another one."""
    from safetensors.torch import save_file
    config = {"r": lora["rank"], "lora_alpha": lora["alpha"],
              "target_modules": list(lora["targets"]), "rank_pattern": {}, "alpha_pattern": {}}
    config = {f"{prefix}.{k}": v for k, v in config.items()}  # diffusers 0.37 needs rank_pattern
    metadata = {"format": "pt", "made_for": made_for,
                LORA_CONFIG_KEY: json.dumps(config, indent=2, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(lora_weights(model, prefix), tmp, metadata=metadata))


# -----------------------------------------------------------------------------
# LoRA files as diffusers' load_lora_weights reads them, merged into our models

LORA_CONFIG_KEY = "lora_adapter_metadata"  # diffusers' header entry: '<model>.lora_alpha', ...
PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig default, which a header without lora_alpha gets
# older diffusers spellings of LoRA keys -> peft's (diffusers converts them when loading)
OLD_LORA_KEYS = ((".processor.", "."), (".lora_linear_layer.", ".lora."), ("_lora.", ".lora."),
                 (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."))
# what --lora merges each model's LoRA into (its prefix in the file -> sample.Pipeline's model):
# the prior, the prior pipeline's text encoder (diffusers' WuerstchenPriorPipeline loads both
# from one file), and the decoder (our Stage B LoRAs; diffusers has no decoder LoRA loader)
LORA_MODELS = {"prior": "stage_c", "text_encoder": "text_encoder_c", "decoder": "stage_b"}


def find_lora_file(path):
    """The LoRA file `path` names, as load_lora_weights takes it: a file, or a folder's
    pytorch_lora_weights.safetensors (else its one .safetensors or .bin file)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such file or folder")
    names = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin"))
                   and not any(s in n for s in ("scheduler", "optimizer", "checkpoint")))
    for name in (LORA_FILE, LORA_FILE.replace(".safetensors", ".bin")):
        if name in names:
            return os.path.join(path, name)
    if len(names) != 1:
        raise UsageError(f"{path}: a folder must hold {LORA_FILE} or one .safetensors / "
                         f".bin LoRA file; it holds {names or 'none'}")
    return os.path.join(path, names[0])


def read_lora(path):
    """The LoRA file at `path` (or in the folder `path`: find_lora_file) as diffusers'
    load_lora_weights reads it: keys '<model>.<layer>.lora_A.weight' (r, in) and '.lora_B.weight'
    (out, r), older diffusers spellings too (OLD_LORA_KEYS). Each layer's scale is peft's
    alpha / r from the header's LoraConfig of its model (LORA_CONFIG_KEY: lora_alpha, alpha_pattern,
    use_rslora), alpha = r (scale 1) where the header has none, as diffusers reads such files.
    Returns {"path", "made_for" (the base model, in our files), "models": {model prefix: {layer:
    (A, B, scale)}}}; a file of another form is refused in one line naming what it holds."""
    from safetensors import safe_open
    path = find_lora_file(path)
    try:
        if path.endswith(".bin"):
            tensors, header = torch.load(path, map_location="cpu", weights_only=True), {}
        else:
            with safe_open(path, "pt") as f:
                tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # e.g. SafetensorError: HeaderTooLarge for a text file
        kind = "torch" if path.endswith(".bin") else "safetensors"
        raise UsageError(f"{path} is not a {kind} file ({type(e).__name__}): a LoRA is the "
                         f"{LORA_FILE} a --lora_rank run or diffusers' training scripts write"
                         ) from None
    try:
        config = json.loads(header.get(LORA_CONFIG_KEY) or "{}")
    except ValueError:
        raise UsageError(f"{path}: its header's {LORA_CONFIG_KEY} is not JSON") from None
    weights = {}
    for key, tensor in tensors.items():
        for old, new in OLD_LORA_KEYS:
            key = key.replace(old, new)
        weights[key] = tensor
    holds = {}  # what the file holds, for the errors: model prefix -> number of tensors
    for key in tensors:
        holds[key.split(".")[0]] = holds.get(key.split(".")[0], 0) + 1
    pairs = {k[:-len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")}
    if (not pairs or any("." not in p for p in pairs) or len(weights) != 2 * len(pairs)
            or any(f"{p}.lora_B.weight" not in weights for p in pairs)):
        odd = sorted(k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight")))
        raise UsageError(f"{path} is not a LoRA file in diffusers' layout ('<model>.<layer>"
                         f".lora_A.weight' and '.lora_B.weight' pairs; DoRA, LoKr and LoRA biases "
                         f"are not read): it holds {holds}, e.g. {(odd or sorted(weights))[:2]}")
    models = {}
    for pair in sorted(pairs):
        prefix, layer = pair.split(".", 1)
        A, B = weights[f"{pair}.lora_A.weight"], weights[f"{pair}.lora_B.weight"]
        rank = A.shape[0]
        divisor = math.sqrt(rank) if config.get(f"{prefix}.use_rslora") else rank  # peft's
        models.setdefault(prefix, {})[layer] = (A, B, lora_alpha(config, prefix, layer, rank)
                                                / divisor)
    return {"path": path, "made_for": header.get("made_for", "an unnamed model"),
            "models": models}


def lora_alpha(config, prefix, layer, rank):
    """A layer's LoRA alpha under the header's LoraConfig of its model (peft's rule: the first
    alpha_pattern key matching the layer name's end, else lora_alpha, peft's default 8 when the
    config omits it); alpha = rank (scale 1) for a model the header has no config for."""
    mine = {k[len(prefix) + 1:]: v for k, v in config.items() if k.startswith(prefix + ".")}
    if not mine:
        return rank
    pattern = next((p for p in mine.get("alpha_pattern") or {}
                    if re.match(rf"(.*\.)?({p})$", layer)), None)
    return mine["alpha_pattern"][pattern] if pattern else mine.get("lora_alpha", PEFT_DEFAULT_ALPHA)


def lora_target(model, layer):
    """The weight `layer` of a LoRA file names in `model`: an nn.Linear's (diffusers' names are
    ours), or in a CLIP text tower the transformers layer's (TextEncoder.transformers_weight);
    None if there is none."""
    if isinstance(model, TextEncoder):
        return model.transformers_weight(layer)
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return None
    return module.weight if isinstance(module, nn.Linear) else None


@torch.no_grad()
def merge_lora(model, lora, prefix, scale=1.0, what="this model"):
    """Add the updates of the adapters of `prefix` in `lora` (read_lora) to the weights of `model`:
    W += scale s B A per adapted layer (s = alpha / r, A: (r, in), B: (out, r)). A file made for
    another model (a layer this one lacks, other shapes) is refused, naming both: the file with
    what it was made for, and `what`. Returns the model."""
    for layer, (A, B, s) in lora["models"][prefix].items():
        weight = lora_target(model, layer)
        if weight is None or weight.shape != (B.shape[0], A.shape[1]):
            found = "no such Linear layer" if weight is None else f"{tuple(weight.shape)}"
            raise UsageError(f"the LoRA {lora['path']} (made for {lora['made_for']}) does not "
                             f"fit {what}: its layer {prefix}.{layer} is "
                             f"{(B.shape[0], A.shape[1])}, here {found}")
        update = scale * s * (B.double() @ A.double())
        weight.copy_((weight.double() + update.to(weight.device)).to(weight.dtype))
    return model


def trained_state(model):
    """What a checkpoint keeps of `model`: its state dict, or, when it carries LoRA adapters, the
    adapters alone (its base is the --pretrained weights, loaded again on --resume)."""
    sd = model.state_dict()
    lora = any(isinstance(m, LoRALinear) for m in model.modules())
    return {k: v for k, v in sd.items() if ".lora_" in k} if lora else sd


def refuse_lora_checkpoint(ckpt, path, model):
    """A LoRA run's checkpoint holds adapters alone (for --resume): a clear error where a whole
    model is expected, naming the LoRA file to merge into the `model` ('prior', 'decoder') it
    adapts."""
    if ckpt.get("lora"):
        raise CheckpointError(f"{path} is a LoRA run's checkpoint (adapters only, for --resume): "
                              f"sample with --lora {os.path.join(os.path.dirname(path), LORA_FILE)}"
                              f" on the {model} it adapts")


def load_trained(model, sd, what):
    """The inverse of trained_state: exactly the weights this run trains, else a CheckpointError."""
    expected = trained_state(model).keys()
    if set(sd) != set(expected):
        raise CheckpointError(f"{what} holds other weights than this run trains (e.g. "
                              f"{sorted(set(sd) ^ set(expected))[:3]})")
    model.load_state_dict(sd, strict=False)


def apply_loras(pipe, paths, scale=1.0):
    """sample.py --lora: merge each LoRA file (or folder: find_lora_file) into the models of `pipe`
    (a sample.Pipeline) its keys name (LORA_MODELS: prior and text_encoder -> Stage C and its text
    tower, decoder -> Stage B) with weight `scale`: now for a resident model, at each load for a
    released one (pipe.loaders). A file for other models is refused, naming what it holds."""
    for path in paths:
        lora = read_lora(path)
        other = sorted(set(lora["models"]) - LORA_MODELS.keys())
        if other:
            holds = {p: len(layers) for p, layers in lora["models"].items()}
            raise UsageError(f"{lora['path']} holds LoRA layers for {holds}; --lora merges "
                             f"those of the prior ('prior.', Stage C), its text encoder "
                             f"('text_encoder.') and the decoder ('decoder.', Stage B), not "
                             f"{other}")
        for prefix in lora["models"]:
            name = LORA_MODELS[prefix]

            def merge(model, lora=lora, prefix=prefix):
                base = asdict(model.cfg) if hasattr(model, "cfg") else model.spec
                return merge_lora(model, lora, prefix, scale, f"this pipeline's {prefix} ({base})")
            if getattr(pipe, name) is not None:
                merge(getattr(pipe, name))
            elif name in (pipe.loaders or {}):
                pipe.loaders[name] = lambda load=pipe.loaders[name], merge=merge: merge(load())
