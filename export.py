"""
Our models in the released diffusers layout (pretrained.RELEASED_LAYOUT), for diffusers' Würstchen
pipelines and for `--pretrained` (sample.py --export DIR writes it):

    DIR/wuerstchen-prior/  model_index.json  prior/  text_encoder/  tokenizer/  scheduler/
    DIR/wuerstchen/        model_index.json  decoder/  vqgan/  text_encoder/  tokenizer/  scheduler/
                           README.md (the model card naming the prior, for the combined pipeline)
                           semantic_compressor/  (ours; no pipeline reads it)

The export speaks the released latent space, latent_mean 42 and latent_std 1, whatever ours is:
the combined pipeline always uses those. Our space is folded into the decoder's and the
compressor's weights (released_space_map), exact where the decoder is unguided. Ours where they
differ from the released values: Stage A's scale_factor in vqgan/config.json, the training image
sizes as `_train_image_size` in both model_index.json (private keys, which diffusers ignores).
"""
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict

from blocks import LATENT_DIM_SCALE, RELEASED_LATENT_SPACE, RESOLUTION_MULTIPLE
from common import UsageError, read_json, save_weights_file, write_json
from pretrained import DECODER_REPO, PRIOR_REPO, SCHEDULER
from stage_a import DIFFUSERS_NAMES
from stage_b import StageB

# -----------------------------------------------------------------------------
# our latent space folded into the weights: the export speaks the released one


def released_space_map(latent_space):
    """(a, b) of the map e = a e' + b from the semantic latent e' = 42 y - 1 that the released
    pipelines give Stage B for a Stage C latent y (latent_mean 42, latent_std 1) to the e = scale y
    - shift that ours gives (method §3.3): a = scale / 42, b = scale / 42 - shift. (1, 0) for the
    released space."""
    a = latent_space["scale"] / RELEASED_LATENT_SPACE["scale"]
    return a, a * RELEASED_LATENT_SPACE["shift"] - latent_space["shift"]


def fold_into_decoder(sd, latent_space):
    """A Stage B state dict that reads e' where `sd` reads e = a e' + b (released_space_map): e
    enters only through effnet_mappers, each a 1x1 conv on e resized bicubically. The resize is a
    per-channel weighted sum whose weights sum to 1 (borders and antialiasing too), so it commutes
    with the affine map, and W (a e' + b) + c = (a W) e' + (c + W b). Exact but for rounding
    wherever the decoder is unguided; with CFG its unconditional input e' = 0 is e = b, not the
    e = 0 Stage B learned (docs/diffusers.md)."""
    a, b = released_space_map(latent_space)
    out = dict(sd)
    for key in sd:
        if key.startswith("effnet_mappers.") and key.endswith(".weight"):
            W, bias = sd[key].double(), sd[key[:-len("weight")] + "bias"].double()
            out[key] = (W * a).to(sd[key].dtype)
            out[key[:-len("weight")] + "bias"] = (bias + b * W.sum((1, 2, 3))).to(sd[key].dtype)
    return out


def fold_into_compressor(sd, latent_space):
    """A semantic compressor state dict giving e' = (e - b) / a where `sd` gives e
    (released_space_map): e is the output of its last BatchNorm (mapper.1; eval mode), whose
    affine weight and bias take the map."""
    a, b = released_space_map(latent_space)
    w, beta = sd["mapper.1.weight"], sd["mapper.1.bias"]
    return sd | {"mapper.1.weight": (w.double() / a).to(w.dtype),
                 "mapper.1.bias": ((beta.double() - b) / a).to(beta.dtype)}


# -----------------------------------------------------------------------------
# each model as diffusers' class of it


def save_stage_a(model, folder):
    """The inverse of StageA.from_pretrained: a diffusers `PaellaVQModel` folder, with our
    scale_factor."""
    config = {theirs: getattr(model.cfg, ours) for ours, theirs in DIFFUSERS_NAMES.items()}
    config |= {"_class_name": "PaellaVQModel", "out_channels": model.cfg.c_in,
               "up_down_scale_factor": 2}
    save_weights_file(folder, model.state_dict(), config)


def stage_b_config(model):
    """The config.json of a StageB as a diffusers `WuerstchenDiffNeXt`: the same names but
    `self_attn`, which it does not have (it always attends over [image ; text tokens])."""
    if not model.cfg.self_attn:
        raise UsageError("diffusers' WuerstchenDiffNeXt cannot represent this Stage B: its "
                         "attention always attends over [image tokens ; text tokens] "
                         "(self_attn=True), this one has self_attn=False")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.cfg).items()}
    del config["self_attn"]
    return {"_class_name": "WuerstchenDiffNeXt"} | config


def save_stage_b(model, folder, latent_space=RELEASED_LATENT_SPACE):
    """The inverse of StageB.from_pretrained: a diffusers `WuerstchenDiffNeXt` folder, reading the
    released space's e' for the `latent_space` e it was trained on (fold_into_decoder)."""
    sd = fold_into_decoder(model.state_dict(), latent_space)
    save_weights_file(folder, sd, stage_b_config(model))


def save_stage_c(model, folder):
    """The inverse of StageC.from_pretrained: a diffusers `WuerstchenPrior` folder (same config
    names)."""
    config = {"_class_name": "WuerstchenPrior"} | asdict(model.cfg)
    save_weights_file(folder, model.state_dict(), config)


def save_compressor(model, folder, latent_space=RELEASED_LATENT_SPACE):
    """The inverse of SemanticCompressor.from_pretrained(folder): config.json (the
    CompressorConfig) and model.safetensors, giving the released space's e' for the `latent_space`
    e it gives (fold_into_compressor). For EfficientNetV2-S its keys are the official
    `effnet_state_dict`'s (backbone.*, mapper.0, mapper.1), which diffusers' prior fine-tuning
    scripts load."""
    sd = fold_into_compressor(model.state_dict(), latent_space)
    save_weights_file(folder, sd, asdict(model.cfg), name="model.safetensors")


# -----------------------------------------------------------------------------
# the two repositories


def check_exportable(stage_b, stage_a, text_encoders, release=None):
    """Refuse, by name and before anything is written, what diffusers' pipelines cannot represent:
    a Stage B that is not v2's DiffNeXt (the official v1 files: release "v1"), a Stage A of other
    than 4 latent channels, text towers transformers' CLIPTextModel cannot express. Models not
    loaded yet (None) are checked when they are written."""
    if release == "v1" or stage_b is not None and not isinstance(stage_b, StageB):
        kind = "Paella" if release == "v1" else type(stage_b).__name__
        raise UsageError(f"diffusers' WuerstchenDecoderPipeline runs only the DiffNeXt Stage B of "
                         f"Würstchen v2; this Stage B is a {kind} (a token Stage B, as "
                         f"Würstchen v1's Paella, has no diffusers pipeline)")
    if stage_a is not None and stage_a.cfg.c_latent != 4:
        raise UsageError(f"diffusers' WuerstchenDecoderPipeline samples 4-channel Stage A latents; "
                         f"this Stage A has {stage_a.cfg.c_latent}")
    if stage_b is not None:
        stage_b_config(stage_b)
    for text_encoder in text_encoders:
        if text_encoder is not None:
            text_encoder.diffusers_config()


def check_new_folder(root):
    """An export goes to a folder that does not exist yet (nothing of another export is mixed in,
    nothing of the user's is overwritten)."""
    if os.path.exists(root):
        raise UsageError(f"--export {root} exists: an export goes to a new folder")


@contextmanager
def new_folder(root):
    """Write into `root`.partial, renamed to `root` once complete: an interrupted export leaves no
    folder that looks like a whole one."""
    check_new_folder(root)
    partial = os.path.normpath(root) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted export left
    yield partial
    os.replace(partial, root)


def repo_folders(root):
    """The prior's and the decoder's folders of an export to `root`."""
    return tuple(os.path.join(root, repo.split("/")[1]) for repo in (PRIOR_REPO, DECODER_REPO))


def write_prior(root, stage_c, text_encoder, image_size, old_diffusers=False):
    """DIR/wuerstchen-prior: the prior, its text tower, the released latent space (the weights of
    write_decoder and write_compressor speak it) and our training size."""
    folder = repo_folders(root)[0]
    write_repo(folder, "WuerstchenPriorPipeline", {"prior": (save_stage_c, stage_c)},
               text_encoder, old_diffusers, latent_mean=RELEASED_LATENT_SPACE["scale"],
               latent_std=RELEASED_LATENT_SPACE["shift"], resolution_multiple=RESOLUTION_MULTIPLE,
               _train_image_size=image_size)
    return folder


def write_decoder(root, stage_b, stage_a, text_encoder, latent_space, image_size, old_diffusers,
                  prior):
    """DIR/wuerstchen: the decoder (reading the released space for our `latent_space`), the
    VQGAN, their text tower, our training size, and the model card naming the prior's folder
    `prior` (where it will be once the export is complete), from which diffusers' combined
    pipeline and AutoPipelineForText2Image load the prior with it."""
    folder = repo_folders(root)[1]
    write_repo(folder, "WuerstchenDecoderPipeline",
               {"decoder": (lambda model, path: save_stage_b(model, path, latent_space), stage_b),
                "vqgan": (save_stage_a, stage_a)},
               text_encoder, old_diffusers, latent_dim_scale=LATENT_DIM_SCALE,
               _train_image_size=image_size)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(MODEL_CARD.format(prior=json.dumps(os.path.abspath(prior))))
    return folder


# the decoder's model card: diffusers reads the prior's folder or repository from `prior:`
MODEL_CARD = """---
prior:
- {prior}
tags:
- wuerstchen
- text-to-image
---
A Würstchen v2 decoder written by `sample.py --export`. `prior:` names the folder of its prior
pipeline, which `WuerstchenCombinedPipeline` and `AutoPipelineForText2Image` load with it: after
moving or uploading the two folders, write the prior's new path or repository id there.
"""


def write_compressor(root, compressor, latent_space):
    """DIR/wuerstchen/semantic_compressor, giving the released space for our `latent_space`: for
    --variation, --init_image and fine-tuning."""
    save_compressor(compressor, os.path.join(repo_folders(root)[1], "semantic_compressor"),
                    latent_space)


# model_index.json's library of each model: where diffusers finds the class. Since diffusers 0.38
# its Würstchen modules are under diffusers.pipelines.deprecated, found by module name; before,
# in the pipeline folder 'wuerstchen' that the released repositories name (which 0.38 on no longer
# resolves: diffusers issue #14008). No name resolves in both.
DIFFUSERS_MODULES = {"WuerstchenPrior": "modeling_wuerstchen_prior",
                     "WuerstchenDiffNeXt": "modeling_wuerstchen_diffnext",
                     "PaellaVQModel": "modeling_paella_vq_model"}


def write_repo(folder, pipeline, models, text_encoder, old_diffusers, **config):
    """One folder of the released layout: each model (name -> (saver, module)) in its subfolder,
    the CLIP text encoder and tokenizer, the scheduler, and model_index.json with the pipeline's
    `config`, naming the models' library for diffusers >= 0.38 (old_diffusers: before 0.38, as the
    released repositories do; DIFFUSERS_MODULES)."""
    for name, (save, model) in models.items():
        save(model, os.path.join(folder, name))
    text_encoder.save_pretrained(*[os.path.join(folder, n) for n in ("text_encoder", "tokenizer")])
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), SCHEDULER)
    index = {"_class_name": pipeline, "scheduler": ["diffusers", SCHEDULER["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizerFast"]}
    for name in models:
        class_name = read_json(os.path.join(folder, name, "config.json"))["_class_name"]
        library = ("wuerstchen" if old_diffusers else
                   f"diffusers.pipelines.deprecated.wuerstchen.{DIFFUSERS_MODULES[class_name]}")
        index[name] = [library, class_name]
    write_json(os.path.join(folder, "model_index.json"), index | config)
