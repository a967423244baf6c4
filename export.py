"""
Our models in the released diffusers layout (pretrained.RELEASED_LAYOUT), for diffusers' Würstchen
pipelines and for `--pretrained` (sample.py --export DIR writes it):

    DIR/wuerstchen-prior/  model_index.json  prior/  text_encoder/  tokenizer/  scheduler/
    DIR/wuerstchen/        model_index.json  decoder/  vqgan/  text_encoder/  tokenizer/  scheduler/
                           semantic_compressor/  (ours; no pipeline reads it)

Ours where they differ from the released values: the latent space in the prior's model_index.json
(latent_mean = scale, latent_std = shift, as the pipeline computes e = y * latent_mean -
latent_std), Stage A's scale_factor in vqgan/config.json, the training image sizes as
`_train_image_size` in both model_index.json (private keys, which diffusers ignores).
"""
import os
from dataclasses import asdict

from blocks import LATENT_DIM_SCALE, RESOLUTION_MULTIPLE
from common import UsageError, read_json, save_weights_file, write_json
from pretrained import DECODER_REPO, PRIOR_REPO, SCHEDULER
from stage_a import DIFFUSERS_NAMES
from stage_b import StageB

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


def save_stage_b(model, folder):
    """The inverse of StageB.from_pretrained: a diffusers `WuerstchenDiffNeXt` folder."""
    save_weights_file(folder, model.state_dict(), stage_b_config(model))


def save_stage_c(model, folder):
    """The inverse of StageC.from_pretrained: a diffusers `WuerstchenPrior` folder (same config
    names)."""
    config = {"_class_name": "WuerstchenPrior"} | asdict(model.cfg)
    save_weights_file(folder, model.state_dict(), config)


def save_compressor(model, folder):
    """The inverse of SemanticCompressor.from_pretrained(folder): config.json (the
    CompressorConfig) and model.safetensors. For EfficientNetV2-S its keys are the official
    `effnet_state_dict`'s (backbone.*, mapper.0, mapper.1), which diffusers' prior fine-tuning
    scripts load."""
    save_weights_file(folder, model.state_dict(), asdict(model.cfg), name="model.safetensors")


SAVERS = {"prior": save_stage_c, "decoder": save_stage_b, "vqgan": save_stage_a}

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


def repo_folders(root):
    """The prior's and the decoder's folders of an export to `root`."""
    return tuple(os.path.join(root, repo.split("/")[1]) for repo in (PRIOR_REPO, DECODER_REPO))


def write_prior(root, stage_c, text_encoder, latent_space, image_size):
    """DIR/wuerstchen-prior: the prior, its text tower, and our latent space and training size."""
    folder = repo_folders(root)[0]
    write_repo(folder, "WuerstchenPriorPipeline", {"prior": stage_c}, text_encoder,
               latent_mean=latent_space["scale"], latent_std=latent_space["shift"],
               resolution_multiple=RESOLUTION_MULTIPLE, _train_image_size=image_size)
    return folder


def write_decoder(root, stage_b, stage_a, text_encoder, image_size):
    """DIR/wuerstchen: the decoder, the VQGAN, their text tower and our training size."""
    folder = repo_folders(root)[1]
    write_repo(folder, "WuerstchenDecoderPipeline", {"decoder": stage_b, "vqgan": stage_a},
               text_encoder, latent_dim_scale=LATENT_DIM_SCALE, _train_image_size=image_size)
    return folder


def write_compressor(root, compressor):
    """DIR/wuerstchen/semantic_compressor: for --variation, --init_image and fine-tuning."""
    save_compressor(compressor, os.path.join(repo_folders(root)[1], "semantic_compressor"))


def write_repo(folder, pipeline, models, text_encoder, **config):
    """One folder of the released layout: each model (name -> module) in its subfolder, the CLIP
    text encoder and tokenizer, the scheduler, and model_index.json with the pipeline's `config`.
    The models' library is 'wuerstchen', as in the released model_index.json files (the module
    diffusers.pipelines.wuerstchen, which later diffusers versions moved)."""
    for name, model in models.items():
        SAVERS[name](model, os.path.join(folder, name))
    text_encoder.save_pretrained(*[os.path.join(folder, n) for n in ("text_encoder", "tokenizer")])
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), SCHEDULER)
    index = {"_class_name": pipeline, "scheduler": ["diffusers", SCHEDULER["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizerFast"]}
    for name in models:
        config_json = read_json(os.path.join(folder, name, "config.json"))
        index[name] = ["wuerstchen", config_json["_class_name"]]
    write_json(os.path.join(folder, "model_index.json"), index | config)
