"""
Fine-tuning a pretrained model on a few images (README "Fine-tune the released model"): the flags,
defaults and warnings of a fine-tune (--pretrained), and LoRA (Hu et al. 2021) adapters on the
frozen model, saved in diffusers' LoRA file layout so that diffusers' load_lora_weights and
sample.py --lora read them.

    add_lora_from_args(model, args)   --lora_rank: adapters on --lora_targets, the base frozen
    save_lora / read_lora / merge_lora  pytorch_lora_weights.safetensors, written and merged
    trained_state / load_trained      a checkpoint keeps only what a run trains (LoRA: adapters)
"""
import math
import os
from dataclasses import asdict

import torch
import torch.nn as nn

from common import (CheckpointError, UsageError, atomic_write, existing_folder,
                    nonnegative_int, positive_float)
from data import folder_captions

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as diffusers'

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
                       "(PEFT's target_modules): the attention projections, as diffusers' prior "
                       "LoRA script; add channelwise.0 channelwise.4 for the channel MLPs, "
                       "cond_mapper.0 cond_mapper.2 for Stage C's text mapper")
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
    """The LoRA file `sample.py --lora PATH` names, checked before anything is loaded: PATH, or in
    a folder (a --lora_rank run's --out_dir) its LORA_FILE; anything that does not read as a
    safetensors file is refused with one line."""
    file = os.path.join(path, LORA_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"--lora {path}: " + (f"no {LORA_FILE} in this folder" if file != path
                                               else "no such file or folder"))
    from safetensors import safe_open
    try:
        with safe_open(file, "pt"):
            pass
    except Exception as e:  # e.g. SafetensorError: HeaderTooLarge for a text file
        raise UsageError(f"--lora {file} is not a safetensors file ({type(e).__name__}): a LoRA "
                         f"is the {LORA_FILE} a --lora_rank run writes") from None
    read_lora(file)  # diffusers' LoRA layout, else a UsageError
    return file


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
    and `.lora_B.weight` (out, r), the scale alpha / r folded into lora_B (a file without alphas
    reads as alpha = r, scale 1, in diffusers), float32."""
    weights = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            weights[f"{prefix}.{name}.lora_A.weight"] = \
                m.lora_A.weight.detach().float().cpu().contiguous()
            weights[f"{prefix}.{name}.lora_B.weight"] = \
                (m.lora_B.weight.detach().float() * m.lora_scale).cpu()
    return weights


def save_lora(path, model, prefix, made_for):
    """The adapters as a LoRA file (pytorch_lora_weights.safetensors: diffusers' load_lora_weights
    and sample.py --lora read it), written atomically; `made_for` describes the base model in the
    file's metadata, for the error when the file meets another one."""
    from safetensors.torch import save_file
    metadata = {"format": "pt", "made_for": made_for}
    atomic_write(path, lambda tmp: save_file(lora_weights(model, prefix), tmp, metadata=metadata))


def read_lora(path):
    """(prefix, weights, metadata) of a LoRA file in diffusers' layout
    ('prior.blocks.2.attention.to_q.lora_A.weight': prefix 'prior')."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        weights, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    prefixes = {k.split(".")[0] for k in weights}
    if len(prefixes) != 1 or not all(k.endswith((".lora_A.weight", ".lora_B.weight"))
                                     for k in weights):
        raise UsageError(f"{path} is not a LoRA file of one model in diffusers' layout "
                         f"('<model>.<layer>.lora_A.weight' / '.lora_B.weight'): "
                         f"keys {sorted(weights)[:3]}")
    return prefixes.pop(), weights, metadata


@torch.no_grad()
def merge_lora(model, path, scale=1.0, what="this model"):
    """Add the updates of the LoRA file at `path` to the weights of `model`: W += scale B A per
    adapted layer (A: (r, in), B: (out, r)). A file made for another model (a layer this one lacks,
    other shapes) is refused, naming both: the file with what it was made for, and `what`. Returns
    the model."""
    prefix, weights, metadata = read_lora(path)
    layers = dict(model.named_modules())
    for key in (k for k in weights if k.endswith(".lora_A.weight")):
        name = key[len(prefix) + 1:-len(".lora_A.weight")]
        A, B = weights[key].float(), weights[key.replace(".lora_A.", ".lora_B.")].float()
        layer = layers.get(name)
        if not isinstance(layer, nn.Linear) or layer.weight.shape != (B.shape[0], A.shape[1]):
            found = (f"{tuple(layer.weight.shape)}" if isinstance(layer, nn.Linear)
                     else "no such Linear layer")
            raise UsageError(f"the LoRA {path} (made for "
                             f"{metadata.get('made_for', 'an unnamed model')}) does not fit "
                             f"{what}: its layer {name} is {(B.shape[0], A.shape[1])}, "
                             f"here {found}")
        layer.weight.copy_(layer.weight.float() + scale * (B @ A).to(layer.weight.device))
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
    """sample.py --lora: merge each LoRA file (diffusers' layout) into the model of `pipe` (a
    sample.Pipeline) its keys name (prior: Stage C, decoder: Stage B) with weight `scale`: now for a
    resident model, at each load for a released one (pipe.loaders)."""
    for path in paths:
        prefix, _, _ = read_lora(path)
        name = {"prior": "stage_c", "decoder": "stage_b"}.get(prefix)
        if name is None:
            raise UsageError(f"{path} is a LoRA for a '{prefix}' model; --lora takes LoRAs of the "
                             f"prior (Stage C) and the decoder (Stage B)")

        def merge(model, path=path, prefix=prefix):
            return merge_lora(model, path, scale, f"this pipeline's {prefix} ({asdict(model.cfg)})")
        if getattr(pipe, name) is not None:
            merge(getattr(pipe, name))
        elif name in (pipe.loaders or {}):
            pipe.loaders[name] = lambda load=pipe.loaders[name], merge=merge: merge(load())
