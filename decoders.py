"""
The kinds of Stage B a checkpoint can hold, by its "kind" entry: v2's latent-diffusion DiffNeXt
(stage_b.py) and v1's token decoder Paella (stage_b_paella.py). Both decode a semantic latent e
through the same call, `stage_b.sample(stage_a, e, clip_text, negative_clip_text, ...)`, so Stage C
and sample.py load and run either without knowing which.
"""
from stage_b import StageB, StageBConfig, load_stage_b
from stage_b_paella import Paella, PaellaConfig

STAGE_B_KINDS = {"diffnext": (StageB, StageBConfig), "paella": (Paella, PaellaConfig)}


def load_decoder(path, device="cpu", parts=("stage_b", "compressor", "text_encoder")):
    """stage_b.load_stage_b for a checkpoint of either kind of Stage B."""
    return load_stage_b(path, device, parts, kinds=STAGE_B_KINDS)
