"""Tests for stage_c.py: parity of the prior with diffusers' WuerstchenPrior, and Stage C training on tiny models."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import gc

import pytest
import torch

from stage_b import dome272_to_diffusers
from stage_c import PRESETS, StageC, StageCConfig

# ---- parity with diffusers (random weights, eval, fp32)


def randomize(model, seed=0):
    """Overwrite every parameter with seeded random values, including those initialised to zero (out conv,
    TimestepBlock mappers, GRN gamma/beta), so that parity is not decided by zeros. Scales keep the output O(1).
    Values are tiled from a ~1M-entry N(0, 1) pool at a random offset per tensor: drawing 1e9 fresh normals
    would cost the paper-size test ~10 s."""
    g = torch.Generator().manual_seed(seed)
    n_pool = 2**20 + 7  # odd length: consecutive rows of a matrix see different values
    pool = torch.randn(n_pool, generator=g).repeat(2)  # (2 n_pool,): any window of n_pool is a slice
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
    """diffusers' WuerstchenPrior with random weights, built on the meta device and filled without an init pass."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    kwargs = dict(c_in=cfg.c_in, c=cfg.c, c_cond=cfg.c_cond, c_r=cfg.c_r, depth=cfg.depth, nhead=cfg.nhead,
                  dropout=cfg.dropout)
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
    """The released v2 prior (993,636,896 params) through save_pretrained -> StageC.from_pretrained."""
    cfg = PRESETS["paper"]
    ref = reference_prior(cfg)
    assert sum(p.numel() for p in ref.parameters()) == 993_636_896
    x, t, clip = inputs(cfg, 1, 2, 3, n_text=8)  # any text length works; 8 tokens keep the CPU time down
    expected = ref(x, t, clip)
    ref.save_pretrained(tmp_path)
    del ref
    gc.collect()
    model = StageC.from_pretrained(str(tmp_path))
    assert sum(p.numel() for p in model.parameters()) == 993_636_896
    assert not model.training
    torch.testing.assert_close(model(x, t, clip), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("h, w", [(4, 4), (3, 5)])
def test_parity_small_config(tmp_path, h, w):
    """A non-default configuration on square and non-square latents, diffusers layout and official .pt layout."""
    cfg = StageCConfig(c=96, c_cond=40, c_r=32, depth=3, nhead=3, dropout=0.1)
    ref = reference_prior(cfg, seed=h)
    x, t, clip = inputs(cfg, 2, h, w)
    expected = ref(x, t, clip)
    ref.save_pretrained(tmp_path)
    model = StageC.from_pretrained(str(tmp_path))
    assert model.cfg == cfg
    torch.testing.assert_close(model(x, t, clip), expected, atol=1e-5, rtol=1e-5)

    # official layout: dome272 packs q/k/v into nn.MultiheadAttention's in_proj and names to_out.0 out_proj
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
    assert (inferred.c, inferred.c_cond, inferred.c_r, inferred.depth, inferred.nhead) == (96, 40, 32, 3, 1)


def test_init_and_shapes():
    """At init the out conv is zero, so the prior predicts eps_hat = x_t; output keeps the latent's shape."""
    model = StageC(PRESETS["tiny"])
    x, t, clip = inputs(model.cfg, 3, 3, 5)
    out = model(x, t, clip)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-4, rtol=1e-4)
    assert all((b.mapper.weight == 0).all() for b in model.blocks[1::3])


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = randomize(StageC(PRESETS["tiny"]))
    x, t, clip = inputs(model.cfg, 2, 3, 3)
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(x, t, clip).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
