"""What several test files share: one intra-op thread for tiny models, and a chain of tiny random
checkpoints (no training), sample.py's and evaluate.py's inputs."""
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

import stage_a
import stage_b
import stage_b_paella
import stage_c
from common import save_checkpoint
from text_encoder import TextEncoder
from toy import write_toy_dataset


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is as fast, and on a shared CPU it avoids the per-op thread
    hand-offs that made such tests several times slower with 2 threads while other jobs ran. A
    file asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_random_chain(root):
    """Tiny random checkpoints of the three stages in `root` (a.pt, b.pt, c.pt; output layers made
    non-zero, so every model reads its inputs), a Paella Stage B in the same latent space
    (paella.pt), and toy images (toy/): sample.py's inputs without training. Returns root."""
    write_toy_dataset(root / "toy", n=4, size=128)
    torch.manual_seed(0)
    space, trained = {"scale": 1.3, "shift": 0.2}, {"image_size": 128}
    a = stage_a.StageA(stage_a.PRESETS["tiny"]["model"])
    save_checkpoint(str(root / "a.pt"), {"stage": "stage_a", "step": 0, "train_config": trained,
                                         "model_config": asdict(a.cfg), "ema": a.state_dict()})
    compressor = stage_b.SemanticCompressor(stage_b.PRESETS["tiny"]["compressor"]).eval()
    text = TextEncoder("tiny").checkpoint_entry()
    decoders = {"b": stage_b.StageB(stage_b.PRESETS["tiny"]["model"]),
                "paella": stage_b_paella.Paella(stage_b_paella.PRESETS["tiny"]["model"])}
    nn.init.normal_(decoders["b"].clf[1].weight, std=0.02)
    for name, model in decoders.items():
        save_checkpoint(str(root / f"{name}.pt"), {
            "stage": "stage_b", "kind": model.kind, "step": 0, "train_config": trained,
            "model_config": asdict(model.cfg), "ema": model.state_dict(),
            "compressor_config": asdict(compressor.cfg), "compressor_ema": compressor.state_dict(),
            "text_encoder": text, "latent_space": space})
    c = stage_c.StageC(stage_c.PRESETS["tiny"]["model"])
    nn.init.normal_(c.out[1].weight, std=0.02)
    save_checkpoint(str(root / "c.pt"), {"stage": "stage_c", "step": 0, "train_config": trained,
                                         "model_config": asdict(c.cfg), "ema": c.state_dict(),
                                         "text_encoder": text, "latent_space": space})
    return root
