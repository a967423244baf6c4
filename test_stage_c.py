"""Tests for stage_c.py: parity of the prior with diffusers' WuerstchenPrior, and Stage C training
on tiny models."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import gc
import math
from dataclasses import asdict

import pytest
import torch

import stage_a
import stage_b
from blocks import ResBlock
from cache import StageCCache as LatentCache
from common import load_checkpoint, save_checkpoint
from data import ImageFolder
from diffusion import diffusion_loss
from pretrained import dome272_to_diffusers
from stage_b import SemanticCompressor, StageB, measure_latent_space
from stage_c import (PRESETS, StageC, StageCConfig, get_args, load_stage_c, sample_stage_c, train,
                     training_inputs)
from text_encoder import TextEncoder
from toy import write_toy_dataset


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


# ---- parity with diffusers (random weights, eval, fp32)


def randomize(model, seed=0):
    """Overwrite every parameter with seeded random values, including those initialised to zero
    (out conv, TimestepBlock mappers, GRN gamma/beta), so that parity is not decided by zeros.
    Scales keep the output O(1). Values are tiled from a ~1M-entry N(0, 1) pool at a random offset
    per tensor: drawing 1e9 fresh normals would cost the paper-size test ~10 s."""
    g = torch.Generator().manual_seed(seed)
    n_pool = 2**20 + 7  # odd length: consecutive rows of a matrix see different values
    pool = torch.randn(n_pool, generator=g).repeat(2)  # (2 n_pool,): any n_pool window is a slice
    for name, p in model.named_parameters():
        fan_in = p[0].numel() if p.dim() > 1 else 1
        if name.startswith("out."):  # small (a, b), so that |1 - b| stays away from 0
            scale = 0.1 * fan_in**-0.5
        elif p.dim() > 1 and not name.endswith(("gamma", "beta")):
            scale = fan_in**-0.5
        else:  # biases, GRN gamma / beta
            scale = 0.1
        start = int(torch.randint(n_pool, (), generator=g))
        tile = pool[start:start + n_pool] * scale  # (n_pool,)
        flat, k = p.data.view(-1), p.numel() // n_pool
        flat[:k * n_pool].view(k, n_pool).copy_(tile)  # (k, n_pool) <- broadcast tile
        flat[k * n_pool:].copy_(tile[:p.numel() - k * n_pool])
    return model


def reference_prior(cfg, seed=0):
    """diffusers' WuerstchenPrior with random weights, built on the meta device and filled without
    an init pass."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    kwargs = dict(c_in=cfg.c_in, c=cfg.c, c_cond=cfg.c_cond, c_r=cfg.c_r, depth=cfg.depth,
                  nhead=cfg.nhead, dropout=cfg.dropout)
    with torch.device("meta"):
        ref = WuerstchenPrior(**kwargs)
    ref.to_empty(device="cpu")
    return randomize(ref, seed).eval()


def inputs(cfg, batch, h, w, n_text=77, seed=1):
    """(x_t, t, clip_text) at random."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.c_in, h, w, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, n_text, cfg.c_cond, generator=g))


@torch.no_grad()
def test_parity_paper_config(tmp_path):
    """The released v2 prior (993,636,896 params) via save_pretrained -> StageC.from_pretrained."""
    cfg = PRESETS["paper"]["model"]
    ref = reference_prior(cfg)
    assert sum(p.numel() for p in ref.parameters()) == 993_636_896
    x, t, clip = inputs(cfg, 1, 2, 3, n_text=8)  # any text length works; 8 tokens keep CPU time low
    expected = ref(x, t, clip)
    ref.save_pretrained(tmp_path)
    del ref
    gc.collect()
    model = StageC.from_pretrained(str(tmp_path))
    assert sum(p.numel() for p in model.parameters()) == 993_636_896
    assert not model.training
    torch.testing.assert_close(model(x, t, clip), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_parity_heads_that_do_not_divide_the_width(tmp_path):
    """c = 30 with 4 heads: diffusers' attention projects to c // nhead * nhead = 28 (ours did not
    load it before)."""
    cfg = StageCConfig(c=30, c_cond=20, c_r=32, depth=2, nhead=4)
    ref = reference_prior(cfg)
    x, t, clip = inputs(cfg, 2, 3, 6)
    ref.save_pretrained(tmp_path)
    model = StageC.from_pretrained(str(tmp_path))
    torch.testing.assert_close(model(x, t, clip), ref(x, t, clip), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("h, w", [(4, 4), (3, 5)])
def test_parity_small_config(tmp_path, h, w):
    """A non-default configuration on square and non-square latents, diffusers layout and official
    .pt layout."""
    cfg = StageCConfig(c=96, c_cond=40, c_r=32, depth=3, nhead=3, dropout=0.1)
    ref = reference_prior(cfg, seed=h)
    x, t, clip = inputs(cfg, 2, h, w)
    expected = ref(x, t, clip)
    ref.save_pretrained(tmp_path)
    model = StageC.from_pretrained(str(tmp_path))
    assert model.cfg == cfg
    torch.testing.assert_close(model(x, t, clip), expected, atol=1e-5, rtol=1e-5)

    # official layout: dome272 packs q/k/v into nn.MultiheadAttention's in_proj, names to_out.0
    # out_proj
    official = {}
    for k, v in ref.state_dict().items():
        if ".attention.to_q." in k:
            kind = k.rsplit(".", 1)[1]
            parts = [ref.state_dict()[k.replace("to_q", name)] for name in ("to_q", "to_k", "to_v")]
            official[k.replace("to_q." + kind, "attn.in_proj_" + kind)] = torch.cat(parts)
        elif ".attention.to_k." not in k and ".attention.to_v." not in k:
            official[k.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = v
    assert dome272_to_diffusers(official).keys() == ref.state_dict().keys()
    torch.save({"ema_state_dict": official, "state_dict": {}}, tmp_path / "model_v3_stage_c.pt")
    model = StageC.from_pretrained(str(tmp_path / "model_v3_stage_c.pt"), cfg)
    torch.testing.assert_close(model(x, t, clip), expected, atol=1e-5, rtol=1e-5)
    # sizes read off the weights (nhead = c / 64) when no config is given
    inferred = StageC.from_pretrained(str(tmp_path / "model_v3_stage_c.pt")).cfg
    assert ((inferred.c, inferred.c_cond, inferred.c_r, inferred.depth, inferred.nhead)
            == (96, 40, 32, 3, 1))


@torch.no_grad()
def test_resblock_skip_matches_diffusers():
    """The prior's ResBlock concatenates a skip before its grouped depthwise conv (weight
    (c, 2, 3, 3) for c_skip = c), as diffusers' ResBlock does; the prior itself passes none."""
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import (
        ResBlock as RefResBlock)

    ref = randomize(RefResBlock(8, c_skip=8)).eval()
    ours = ResBlock(8, c_skip=8).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.depthwise.weight.shape == (8, 2, 3, 3)
    x, skip = torch.randn(2, 8, 3, 4), torch.randn(2, 8, 3, 4)
    torch.testing.assert_close(ours(x, skip), ref(x, skip))


def test_init_and_shapes():
    """At init the out conv is zero, so the prior predicts eps_hat = x_t, in the latent's shape."""
    model = StageC(PRESETS["tiny"]["model"])
    x, t, clip = inputs(model.cfg, 3, 3, 5)
    out = model(x, t, clip)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-4, rtol=1e-4)
    assert all((b.mapper.weight == 0).all() for b in model.blocks[1::3])


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = randomize(StageC(PRESETS["tiny"]["model"]))
    x, t, clip = inputs(model.cfg, 2, 3, 3)
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(x, t, clip).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---- training on tiny models


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 40-image toy set, tiny random Stage A / Stage B checkpoints in the documented layouts."""
    root = tmp_path_factory.mktemp("stage_c")
    write_toy_dataset(root / "toy", n=40, size=128)
    torch.manual_seed(0)
    a = stage_a.StageA(stage_a.PRESETS["tiny"]["model"])
    save_checkpoint(str(root / "a.pt"), {"stage": "stage_a", "step": 0,
                                         "model_config": asdict(a.cfg), "model": a.state_dict(),
                                         "ema": a.state_dict()})
    b, compressor = (StageB(stage_b.PRESETS["tiny"]["model"]),
                     SemanticCompressor(stage_b.PRESETS["tiny"]["compressor"]).eval())
    images = torch.stack([ImageFolder(str(root / "toy"), 128, verbose=False)[i][0]
                          for i in range(8)])
    save_checkpoint(str(root / "b.pt"), {
        "stage": "stage_b", "step": 0, "model_config": asdict(b.cfg), "model": b.state_dict(),
        "ema": b.state_dict(), "compressor_config": asdict(compressor.cfg),
        "compressor": compressor.state_dict(), "compressor_ema": compressor.state_dict(),
        "text_encoder": TextEncoder("tiny").checkpoint_entry(),
        "latent_space": measure_latent_space(compressor, images),
        "deps": {"stage_a": str(root / "a.pt")}})
    return root


def args_for(env, out, *extra):
    return get_args(["--data", str(env / "toy"), "--model", "tiny", "--out_dir", str(out),
                     "--stage_a", str(env / "a.pt"), "--stage_b", str(env / "b.pt"),
                     "--batch_size", "8", "--num_workers", "0", "--log_every", "1",
                     "--steps_c", "2", "--steps_b", "2", *extra])


def frozen_parts(env):
    parts = stage_b.load_stage_b(str(env / "b.pt"), parts=("compressor",))
    return parts["compressor"], TextEncoder("tiny"), parts["latent_space"]


def test_cached_and_uncached_inputs_give_the_same_loss(env):
    compressor, text_encoder, space = frozen_parts(env)
    dataset = ImageFolder(str(env / "toy"), 128, verbose=False)
    cache = LatentCache(**LatentCache.encode_dataset(dataset, compressor, text_encoder, space,
                                                     batch_size=16, num_workers=0, verbose=False))
    # the distinct captions + the empty one
    assert len(cache.text) == len(set(dataset[i][1] for i in range(len(dataset)))) + 1
    idx, drop = [3, 0, 17, 5], torch.tensor([False, True, False, False])  # 1 caption dropped (CFG)
    uncached = ([dataset[i][0] for i in idx], [dataset[i][1] for i in idx])
    uncached = training_inputs((torch.stack(uncached[0]), uncached[1]), drop, compressor,
                               text_encoder, space)
    cached = [cache[i] for i in idx]
    cached = training_inputs((torch.stack([c[0] for c in cached]),
                              torch.stack([c[1] for c in cached])), drop,
                             compressor, text_encoder, space, cache)
    y, clip_text = cached
    assert y.shape == (4, 16, 3, 3) and clip_text.shape == (4, 77, 64)
    torch.testing.assert_close(clip_text[1], text_encoder.encode([""])[0])
    model = StageC(PRESETS["tiny"]["model"])
    losses = [diffusion_loss(model, y, torch.Generator().manual_seed(0), clip_text=c)
              for y, c in (uncached, cached)]
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1])


def overfit(model, steps, lr):
    """AdamW on what trains in `model`, over one fixed batch with fixed t and noise; the losses."""
    y, clip_text = torch.randn(4, 16, 3, 3), torch.randn(4, 77, model.cfg.c_cond)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = diffusion_loss(model, y, torch.Generator().manual_seed(0), clip_text=clip_text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_overfit_loss_falls():
    """Fixed batch, t and noise: 40 Adam steps must cut the P2-weighted loss by more than half."""
    torch.manual_seed(0)
    losses = overfit(StageC(PRESETS["tiny"]["model"]), 40, 1e-3)
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.5 * losses[0], losses[::10]


def test_train_checkpoint_preview_and_exact_resume(env, tmp_path):
    train(args_for(env, tmp_path / "straight", "--max_steps", "4"))
    train(args_for(env, tmp_path / "resumed", "--max_steps", "2"))
    train(args_for(env, tmp_path / "resumed", "--max_steps", "4", "--resume"))
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "resumed from" in log and "at step 2" in log and "step      3/4" in log
    assert (tmp_path / "straight" / "samples_0000004.png").exists()
    assert "toy_colour_acc" in log  # toy data: previews of every colour x shape prompt, scored

    # checkpoint: weights_only, self-describing, rebuildable; an interrupted run ends where a
    # straight one does
    ckpt = load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"), "stage_c")
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == resumed["step"] == 4 and ckpt["deps"]["stage_b"] == str(env / "b.pt")
    for k in ckpt["model"]:
        torch.testing.assert_close(ckpt["model"][k], resumed["model"][k], rtol=0, atol=0)
    # a random text tower travels with its weights
    parts = load_stage_c(str(tmp_path / "straight" / "ckpt.pt"))
    assert (parts["latent_space"]
            == stage_b.load_stage_b(str(env / "b.pt"), parts=())["latent_space"])
    y = sample_stage_c(parts["stage_c"], parts["text_encoder"],
                       ["a red circle on a blue background"], (3, 3), 2,
                       generator=torch.Generator().manual_seed(0))
    assert y.shape == (1, 16, 3, 3) and torch.isfinite(y).all()


def test_missing_and_wrong_checkpoints(env, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*python stage_b\.py"):
        train(args_for(env, tmp_path, "--stage_b", str(tmp_path / "nope.pt")))
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*python stage_a\.py"):
        train(args_for(env, tmp_path, "--stage_a", str(tmp_path / "nope.pt")))
    with pytest.raises(ValueError, match="stage_a checkpoint.*stage_b checkpoint was expected"):
        train(args_for(env, tmp_path, "--stage_b", str(env / "a.pt")))
