"""Tests for stage_b_paella.py: the official v1 layout (keys, shapes, loading), Paella's arithmetic
against a forward written here from the method with plain torch functions, the init scheme,
corruption and loss, the v1 sampler, training (exact resume, checkpoint kind) and the chain through
Stage C and sample.py."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import math
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

import blocks
import diffusion
import pretrained
import stage_b
import stage_b_paella
from common import CheckpointError, save_checkpoint
from decoders import STAGE_B_KINDS
from stage_b_paella import PRESETS, Paella, PaellaConfig, corrupt, sample_tokens, token_loss
from test_stage_b import toy_run  # noqa: F401 (a fixture: 48 toy images of 64 px, a tiny Stage A)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


# ---- the official layout (method §8.7), written out here from the method, not from our module


def official_layout(cfg):
    """name -> shape of dome272's Paella state dict: top-level mappers, then per level the down
    path ([downsampler], blocks) and the up path deepest first (blocks, [upsampler]); attention as
    a packed nn.MultiheadAttention; the first up block of every level but the deepest convolves
    [x ; skip]."""
    p, c0, k, K = cfg.patch_size, cfg.c_hidden[0], cfg.kernel_size, cfg.num_labels
    shapes = {"byt5_mapper.weight": (cfg.c_cond, cfg.byt5_embd), "byt5_mapper.bias": (cfg.c_cond,),
              "effnet_mapper.weight": (cfg.c_cond, cfg.effnet_embd),
              "effnet_mapper.bias": (cfg.c_cond,), "in_mapper.0.weight": (K, cfg.c_in),
              "embedding.1.weight": (c0, cfg.c_in * p * p, 1, 1), "embedding.1.bias": (c0,),
              "clf.1.weight": (cfg.c_out * p * p, c0, 1, 1), "clf.1.bias": (cfg.c_out * p * p,),
              "out_mapper.1.weight": (K, cfg.c_out, 1, 1)}

    def block(pre, kind, c, with_skip):
        if kind == "C":
            shapes.update({pre + "depthwise.weight": (c, 2 if with_skip else 1, k, k),
                           pre + "depthwise.bias": (c,)})
        if kind in "CF":
            mlp = pre + "channelwise."
            shapes.update({mlp + "0.weight": (4 * c, c), mlp + "0.bias": (4 * c,),
                           mlp + "2.gamma": (1, 1, 1, 4 * c), mlp + "2.beta": (1, 1, 1, 4 * c),
                           mlp + "4.weight": (c, 4 * c), mlp + "4.bias": (c,)})
        elif kind == "T":
            shapes.update({pre + "mapper.weight": (2 * c, cfg.c_r), pre + "mapper.bias": (2 * c,)})
        else:  # A
            attn = pre + "attention.attn."
            shapes.update({attn + "in_proj_weight": (3 * c, c), attn + "in_proj_bias": (3 * c,),
                           attn + "out_proj.weight": (c, c), attn + "out_proj.bias": (c,),
                           pre + "kv_mapper.1.weight": (c, cfg.c_cond),
                           pre + "kv_mapper.1.bias": (c,)})

    n, c = len(cfg.c_hidden), cfg.c_hidden
    for i in range(n):
        index = 0
        if i > 0:
            shapes.update({f"down_blocks.{i}.0.1.weight": (c[i], c[i - 1], 2, 2),
                           f"down_blocks.{i}.0.1.bias": (c[i],)})
            index = 1
        for _ in range(cfg.blocks[i]):
            for kind in cfg.level_config[i]:
                block(f"down_blocks.{i}.{index}.", kind, c[i], False)
                index += 1
    for j, i in enumerate(reversed(range(n))):
        index = 0
        for b in range(cfg.blocks[i]):
            for kk, kind in enumerate(cfg.level_config[i]):
                block(f"up_blocks.{j}.{index}.", kind, c[i], i < n - 1 and b == kk == 0)
                index += 1
        if i > 0:
            shapes.update({f"up_blocks.{j}.{index}.1.weight": (c[i], c[i - 1], 2, 2),
                           f"up_blocks.{j}.{index}.1.bias": (c[i - 1],)})
    return shapes


def random_official(cfg, seed=0):
    """A random state dict in the official layout, every tensor non-trivial, activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_layout(cfg).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 0.1 if len(shape) == 1 or name.endswith(("gamma", "beta")) else fan_in**-0.5
        sd[name] = torch.randn(shape, generator=g) * scale
    return sd


def test_v1_config_parameter_count_and_official_keys():
    """v1 as trained (byt5_embd=1024): 730,814,336 parameters, and the 610 official tensors map 1:1
    onto ours (method §8.7)."""
    cfg = PaellaConfig()
    with torch.device("meta"):
        model = Paella(cfg)
    assert sum(p.numel() for p in model.parameters()) == 730_814_336
    official = official_layout(cfg)
    assert len(official) == 610
    spot = {"byt5_mapper.weight": (1024, 1024), "effnet_mapper.weight": (1024, 16),
            "in_mapper.0.weight": (8192, 256), "embedding.1.weight": (640, 1024, 1, 1),
            "clf.1.weight": (1024, 640, 1, 1), "out_mapper.1.weight": (8192, 256, 1, 1),
            "up_blocks.0.0.depthwise.weight": (1280, 1, 3, 3),
            "up_blocks.1.0.depthwise.weight": (1280, 2, 3, 3),
            "up_blocks.2.0.depthwise.weight": (640, 2, 3, 3)}
    assert all(official[k] == v for k, v in spot.items())  # the literal shapes of method §8.7
    assert sum(math.prod(s) for s in official.values()) == 730_814_336
    mapped = pretrained.dome272_to_diffusers({k: torch.empty(s, device="meta")
                                           for k, s in official.items()})
    ours = model.state_dict()
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)


def reference_forward(sd, cfg, tokens, t, effnet, text):
    """Paella's forward written from method §4.2 / §4.8 with torch functions on the official state
    dict (packed attention through F.multi_head_attention_forward, GRN with torch.norm)."""
    def ln2d(x):
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6).permute(0, 3, 1, 2)

    def linear(x, name, bias=True):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None)

    def mlp(p, x):  # (B, C, H, W) -> (B, C, H, W)
        h = F.gelu(linear(x.permute(0, 2, 3, 1), p + "channelwise.0"))
        n = torch.norm(h, p=2, dim=(1, 2), keepdim=True)
        n = n / (n.mean(dim=-1, keepdim=True) + 1e-6)
        h = sd[p + "channelwise.2.gamma"] * (h * n) + sd[p + "channelwise.2.beta"] + h
        return linear(h, p + "channelwise.4").permute(0, 3, 1, 2)

    half = cfg.c_r // 2
    angles = t[:, None] * 10000 * torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    r = torch.cat([angles.sin(), angles.cos(), torch.zeros(len(t), cfg.c_r - 2 * half)], dim=1)
    seq = linear(effnet.flatten(2).transpose(1, 2), "effnet_mapper")
    if text is not None:
        seq = torch.cat([seq, linear(text, "byt5_mapper")], dim=1)
    seq = F.layer_norm(seq, (cfg.c_cond,), eps=1e-6)

    def run(prefix, kind, x, c, nhead, skip):
        if kind == "C":
            h = x if skip is None else torch.cat([x, skip], dim=1)
            h = ln2d(F.conv2d(h, sd[prefix + "depthwise.weight"], sd[prefix + "depthwise.bias"],
                              padding=cfg.kernel_size // 2, groups=c))
            return x + mlp(prefix, h)
        if kind == "F":
            return x + mlp(prefix, ln2d(x))
        if kind == "T":
            a, b = linear(r, prefix + "mapper")[:, :, None, None].chunk(2, 1)
            return x * (1 + a) + b
        kv = linear(F.silu(seq), prefix + "kv_mapper.1").transpose(0, 1)
        q = ln2d(x).flatten(2).permute(2, 0, 1)  # (HW, B, C), sequence first
        kv = torch.cat([q, kv]) if cfg.self_attn else kv
        a = prefix + "attention.attn."
        out = F.multi_head_attention_forward(
            q, kv, kv, c, nhead, sd[a + "in_proj_weight"], sd[a + "in_proj_bias"], None, None,
            False, 0.0, sd[a + "out_proj.weight"], sd[a + "out_proj.bias"], training=False,
            need_weights=False)[0]
        return x + out.permute(1, 2, 0).reshape(x.shape)

    x = F.layer_norm(F.embedding(tokens, sd["in_mapper.0.weight"]), (cfg.c_in,), eps=1e-6)
    x = F.pixel_unshuffle(x.permute(0, 3, 1, 2), cfg.patch_size)
    x = ln2d(F.conv2d(x, sd["embedding.1.weight"], sd["embedding.1.bias"]))
    n, c, outputs = len(cfg.c_hidden), cfg.c_hidden, []
    for i in range(n):
        index = 0
        if i > 0:
            down = f"down_blocks.{i}.0.1."
            x = F.conv2d(ln2d(x), sd[down + "weight"], sd[down + "bias"], stride=2)
            index = 1
        for _ in range(cfg.blocks[i]):
            for kind in cfg.level_config[i]:
                x = run(f"down_blocks.{i}.{index}.", kind, x, c[i], cfg.nhead[i], None)
                index += 1
        outputs.append(x)
    for j, i in enumerate(reversed(range(n))):
        index = 0
        for b in range(cfg.blocks[i]):
            for kk, kind in enumerate(cfg.level_config[i]):
                skip = outputs[i] if i < n - 1 and b == kk == 0 else None
                x = run(f"up_blocks.{j}.{index}.", kind, x, c[i], cfg.nhead[i], skip)
                index += 1
        if i > 0:
            up = f"up_blocks.{j}.{index}.1."
            x = F.conv_transpose2d(ln2d(x), sd[up + "weight"], sd[up + "bias"], stride=2)
    x = F.pixel_shuffle(F.conv2d(ln2d(x), sd["clf.1.weight"], sd["clf.1.bias"]), cfg.patch_size)
    return F.conv2d(ln2d(x), sd["out_mapper.1.weight"])


# two small configurations unlike the presets: 3 levels, non-square maps; and 2 levels with an F
# block, odd c_r, kernel 5, patch 1, per-level dropout, no self-attention
SMALL = PaellaConfig(c_in=6, c_out=6, num_labels=50, c_r=16, c_cond=12, c_hidden=(8, 16, 16),
                     nhead=(-1, 2, 4), blocks=(1, 2, 1), level_config=("CT", "CTA", "CTA"),
                     effnet_embd=5, byt5_embd=10, dropout=0.1)
ODD = PaellaConfig(c_in=4, c_out=4, num_labels=30, c_r=9, patch_size=1, c_cond=6, c_hidden=(8, 12),
                   nhead=(2, 3), blocks=(2, 1), level_config=("CTA", "CFTA"), effnet_embd=3,
                   byt5_embd=7, kernel_size=5, dropout=(0.0, 0.2), self_attn=False)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [SMALL, ODD], ids=["small", "odd"])
def test_official_file_loads_and_matches_the_reference_forward(cfg, tmp_path):
    sd = random_official(cfg)
    path = str(tmp_path / "model_stage_b.pt")
    torch.save({"state_dict": sd, "effnet_state_dict": {}}, path)
    model = Paella.from_pretrained(path, cfg)
    assert not model.training
    ours = model.state_dict()  # packed attention -> to_q, to_k, to_v in order; out_proj -> to_out.0
    for k in sd:
        if ".attn.in_proj_" in k:
            prefix, kind = k.split("attn.in_proj_")
            assert torch.equal(torch.cat([ours[f"{prefix}to_{n}.{kind}"] for n in "qkv"]), sd[k])
        else:
            assert torch.equal(ours[k.replace(".attn.out_proj.", ".to_out.0.")], sd[k]), k
    g = torch.Generator().manual_seed(1)
    h, w = (16, 24) if cfg.patch_size == 2 else (4, 6)
    tokens = torch.randint(0, cfg.num_labels, (2, h, w), generator=g)
    t, effnet = torch.rand(2, generator=g), torch.randn(2, cfg.effnet_embd, 2, 3, generator=g)
    text = torch.randn(2, 7, cfg.byt5_embd, generator=g)
    for clip in (text, None):  # with text, and the semantic tokens alone
        logits = model(tokens, t, effnet, clip)
        assert logits.shape == (2, cfg.num_labels, h, w) and logits.std() > 0.1
        expected = reference_forward(sd, cfg, tokens, t, effnet, clip)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="do not match"):  # another architecture is named clearly
        Paella.from_pretrained(path, replace(cfg, c_cond=cfg.c_cond + 2))


def test_init_scheme():
    torch.manual_seed(0)
    cfg = replace(SMALL, num_labels=4096, c_in=32, c_out=32, c_hidden=(32, 64, 64))
    model = Paella(cfg)
    table, head = model.in_mapper[0].weight, model.out_mapper[1].weight
    assert torch.equal(head[:, :, 0, 0], table) and head.data_ptr() != table.data_ptr()  # a copy
    assert abs(table.std().item() / math.sqrt(1 / cfg.num_labels) - 1) < 0.02
    assert (model.clf[1].weight == 0).all()  # so the logits start at exactly 0
    tokens = torch.randint(0, cfg.num_labels, (1, 16, 16))
    logits = model(tokens, torch.rand(1), torch.randn(1, 5, 2, 2), torch.randn(1, 3, 10))
    assert (logits == 0).all()
    for m in model.modules():
        if isinstance(m, blocks.TimestepBlock):
            assert (m.mapper.weight == 0).all()
        if isinstance(m, blocks.Attention):  # MultiheadAttention's xavier over packed q/k/v
            c = m.to_q.in_features
            w = torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight])
            assert math.sqrt(6 / (8 * c)) < w.abs().max() <= math.sqrt(6 / (4 * c))
        if isinstance(m, blocks.ResBlock):  # the last Linear (4c -> c) times sqrt(1 / sum(blocks))
            last = m.channelwise[-1]
            bound = math.sqrt(6 / (5 * last.out_features)) * math.sqrt(1 / sum(cfg.blocks))
            assert 0.8 * bound < last.weight.abs().max() <= bound
    convs_and_linears = [m for m in model.modules()
                         if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all((m.bias == 0).all() for m in convs_and_linears if m.bias is not None)
    assert abs(model.byt5_mapper.weight.std().item() - 0.02) < 0.004
    assert model.embedding[1].weight.abs().max() <= 0.02 * math.sqrt(6 / (32 * 4 + 32))
    with pytest.raises(ValueError, match="c_in == c_out"):
        Paella(replace(SMALL, c_out=8))


# ---- corruption and loss


def test_corruption_rates():
    tokens = torch.randint(0, 100, (3, 64, 64))
    replacement = torch.randint(100, 200, (3, 64, 64))  # disjoint: the replaced positions show
    out, mask = corrupt(tokens, torch.tensor([0.0, 0.3, 1.0]), 100, replacement)
    assert torch.equal(out, torch.where(mask, replacement, tokens))
    assert not mask[0].any() and mask[2].all()
    assert abs(mask[1].float().mean().item() - 0.3) < 0.03
    fresh, mask = corrupt(tokens, torch.ones(3), 100)  # default: uniform tokens of the vocabulary
    assert mask.all() and fresh.min() >= 0 and fresh.max() < 100
    assert (fresh != tokens).float().mean() > 0.9


class FixedLogits(torch.nn.Module):
    """A stand-in model: fixed logits, records what it is given."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.cfg, self.calls = logits, PaellaConfig(num_labels=logits.shape[1]), []

    def forward(self, tokens, t, **cond):
        self.calls.append((tokens.clone(), t.clone(), {k: v.clone() for k, v in cond.items()}))
        return self.logits[:len(tokens)]


def test_token_loss_weights_and_label_smoothing():
    """The loss by hand from the same draws: t = sample_t, mask = rand <= t, replacement = uniform
    tokens; label smoothing 0.1 = 0.9 NLL + 0.1 x the mean NLL over all classes; weight 1 on
    replaced positions, 1 - 0.7 (1 - t) on kept ones; per-sample weighted mean, then batch mean."""
    B, K = 3, 7
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, K, (B, 5, 4), generator=g)
    model = FixedLogits(torch.randn(B, K, 5, 4, generator=g))
    loss, acc = token_loss(model, tokens, generator=torch.Generator().manual_seed(1),
                           effnet=torch.zeros(B, 16, 1, 1))
    g = torch.Generator().manual_seed(1)
    t = diffusion.sample_t(B, "cpu", g)
    mask = torch.rand(tokens.shape, generator=g) <= t.view(-1, 1, 1)
    replacement = torch.randint(0, K, tokens.shape, generator=g)
    noised, t_seen, _ = model.calls[0]
    assert torch.equal(t_seen, t) and torch.equal(noised, torch.where(mask, replacement, tokens))
    logp = model.logits.log_softmax(dim=1)  # (B, K, H, W)
    ce = 0.9 * -logp.gather(1, tokens[:, None])[:, 0] + 0.1 * -logp.mean(dim=1)  # (B, H, W)
    weight = torch.where(mask, 1.0, (1 - 0.7 * (1 - t)).view(-1, 1, 1))
    expected = ((ce * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))).mean()
    torch.testing.assert_close(loss, expected)
    assert acc == (model.logits.argmax(dim=1) == tokens).float().mean()


# ---- the v1 sampler


def peaked(target, K, scale=50.0):
    """Logits (B, K, H, W) with all mass on `target` (B, H, W)."""
    return F.one_hot(target, K).permute(0, 3, 1, 2).float() * scale


def test_sampler_renoises_with_the_initial_tokens():
    K, steps, shape = 40, 5, (2, 32, 32)
    target = torch.randint(0, K, shape, generator=torch.Generator().manual_seed(0))
    model = FixedLogits(peaked(target, K))
    cond = {"effnet": torch.ones(2, 16, 1, 1)}
    out = sample_tokens(model, shape, cond, None, steps=steps, mode="argmax",
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, target)  # no re-noising after the last step
    assert len(model.calls) == steps and all(len(tok) == 2 for tok, _, _ in model.calls)  # no CFG
    init = model.calls[0][0]
    assert (init != target).float().mean() > 0.9  # step 0 sees the initial random tokens
    ts = torch.linspace(1, 0, steps + 1)
    for i, (tokens, t, _) in enumerate(model.calls):
        assert torch.equal(t, torch.full((2,), ts[i].item()))
        if i > 0:  # the previous draw (target), with the *initial* tokens put back at rate t
            assert ((tokens == target) | (tokens == init)).all()
            back = ((tokens == init) & (init != target)).float().mean()
            assert abs(back.item() / (init != target).float().mean().item() - ts[i].item()) < 0.05
    # low-temperature multinomial sampling draws the argmax; the same seed gives the same tokens
    again = sample_tokens(FixedLogits(peaked(target, K, 5.0)), shape, cond, None, steps=2,
                          temperature=(0.01, 0.01), generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, target)
    hot = [sample_tokens(FixedLogits(peaked(target, K, 1.0)), shape, cond, None, steps=2,
                         temperature=5.0, generator=torch.Generator().manual_seed(s))
           for s in (1, 1, 2)]
    assert torch.equal(hot[0], hot[1]) and not torch.equal(hot[0], hot[2])
    assert not torch.equal(hot[0], target)
    with pytest.raises(ValueError, match="unknown sampling mode"):
        sample_tokens(model, shape, cond, mode="quant")


def test_draw_is_categorical():
    """The CPU's inverse-CDF draw: the class frequencies are the probabilities, a class of
    probability 0 is never drawn, unnormalised rows are fine; the same seed, the same draws."""
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3, 0.0])
    x = stage_b_paella.draw(probs.expand(200_000, 5) * 3.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.bincount(x, minlength=5) / len(x), probs, atol=0.004, rtol=0)
    last = torch.zeros(7, 1000).index_fill_(1, torch.tensor([999]), 1.0)  # all mass on the last
    assert (stage_b_paella.draw(last) == 999).all()
    again = stage_b_paella.draw(probs.expand(100, 5), torch.Generator().manual_seed(0))
    assert torch.equal(again, x[:100])


def test_sampler_guidance_interpolates_w():
    """logits = logits_c w + logits_u (1 - w), w linear over the steps: w = 2 at the last step picks
    the class the conditional logits favour, w = 0.3 the one the unconditional logits favour."""
    K, B = 3, 2
    a = torch.tensor([0.0, 1.0, 0.0]).view(1, K, 1, 1).expand(B, K, 4, 4)  # conditional: class 1
    u = torch.tensor([0.0, 0.0, 1.0]).view(1, K, 1, 1).expand(B, K, 4, 4)  # unconditional: class 2
    model = FixedLogits(torch.cat([a, u]))
    cond, uncond = {"effnet": torch.ones(B, 16, 1, 1)}, {"effnet": torch.zeros(B, 16, 1, 1)}
    out = sample_tokens(model, (B, 4, 4), cond, uncond, steps=4, cfg=(0.3, 2.0), mode="argmax")
    assert (out == 1).all()
    tokens, t, seen = model.calls[-1]
    assert len(tokens) == 2 * B  # one batch, the conditional half first
    assert torch.equal(seen["effnet"][:B], cond["effnet"])
    assert torch.equal(seen["effnet"][B:], uncond["effnet"])
    out = sample_tokens(model, (B, 4, 4), cond, uncond, steps=4, cfg=(2.0, 0.3), mode="argmax")
    assert (out == 2).all()
    model.calls.clear()  # w = 1: no unconditional pass
    sample_tokens(model, (B, 4, 4), cond, uncond, steps=3, cfg=1.0, mode="argmax")
    assert all(len(tokens) == B for tokens, _, _ in model.calls)


# ---- training


def test_gradients_reach_the_compressor_and_loss_falls_on_one_batch():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]["model"]
    compressor = stage_b.SemanticCompressor(PRESETS["tiny"]["compressor"])
    model = stage_b_paella.CompressorAndPaella(compressor, Paella(cfg), p_zero_effnet=0.5,
                                               p_noise_effnet=0.5)
    images, clip = torch.rand(4, 3, 128, 128), torch.randn(4, 77, cfg.byt5_embd)
    tokens = torch.randint(0, cfg.num_labels, (4, 32, 32))
    # zero at init: nothing upstream of it would get gradients
    torch.nn.init.normal_(model.stage_b.clf[1].weight, std=0.02)
    loss, acc = model(images, tokens, clip)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= acc <= 1
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.compressor.mapper[0].weight.grad.abs().sum() > 0  # trained jointly

    paella = Paella(cfg)  # one fixed batch, t and corruption: the loss must fall
    effnet, clip = torch.randn(2, 16, 3, 3), torch.randn(2, 8, cfg.byt5_embd)
    tokens = torch.randint(0, cfg.num_labels, (2, 16, 16))
    opt = torch.optim.AdamW(paella.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = token_loss(paella, tokens, torch.Generator().manual_seed(0), effnet=effnet,
                             clip_text=clip)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def _args(toy_run, out_dir, steps, *extra):
    data, a_path = toy_run
    return stage_b_paella.get_args([
        "--data", data, "--stage_a", a_path, "--out_dir", str(out_dir), "--model", "tiny",
        "--device", "cpu", "--num_workers", "0", "--image_size", "64", "--batch_size", "4",
        "--num_holdout", "4", "--log_every", "1", "--sample_every", "2", "--steps_b", "3",
        "--max_steps", str(steps), "--save_every", str(steps), *extra])


def test_without_ema_previews_run_the_model_in_eval_mode(toy_run, tmp_path, monkeypatch):  # noqa: F811
    """--ema_decay 0: the model being trained is its own EMA. Its previews and the latent space
    measured at a save run the compressor in eval mode (BatchNorm's running statistics: a preview
    in train mode moved them, and under DDP rank 0 alone entered BatchNorm's collective), and
    training goes on in train mode."""
    modes, forward = [], stage_b.SemanticCompressor.forward
    monkeypatch.setattr(stage_b.SemanticCompressor, "forward",
                        lambda self, x: modes.append(self.training) or forward(self, x))
    stage_b_paella.train(_args(toy_run, tmp_path, 2, "--ema_decay", "0", "--sample_every", "1"))
    # step 1: training, preview; step 2: training, preview, the latent space at the save; the
    # latent space of the closing log line
    assert modes == [True, False, True, False, False, False]


def test_train_checkpoint_kind_and_exact_resume(toy_run, tmp_path):
    stage_b_paella.train(_args(toy_run, tmp_path / "a", 3))
    stage_b_paella.train(_args(toy_run, tmp_path / "b", 2))
    stage_b_paella.train(_args(toy_run, tmp_path / "b", 3, "--resume"))
    ck_a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)  # primitives and tensors only
    ck_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ck_a["stage"] == "stage_b" and ck_a["kind"] == "paella"
    assert ck_a["step"] == ck_b["step"] == 3
    for part in ("model", "compressor", "ema", "compressor_ema"):  # resumed == uninterrupted
        for k in ck_a[part]:
            torch.testing.assert_close(ck_a[part][k], ck_b[part][k], msg=f"{part} {k}")
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "| acc " in log and "held-out PSNR" in log
    assert (tmp_path / "a" / "samples_0000002.png").exists()
    # the checkpoint alone rebuilds Paella (its vocabulary: Stage A's codebook), the compressor and
    # the text tower
    path = str(tmp_path / "a" / "ckpt.pt")
    built = stage_b.load_stage_b(path, kinds=STAGE_B_KINDS)
    paella, e = built["stage_b"], built["compressor"](torch.rand(2, 3, 64, 64))
    clip = built["text_encoder"].encode(["a red circle on a blue background", ""])
    assert isinstance(paella, Paella) and paella.cfg.num_labels == 1024 and not paella.training
    tokens = torch.randint(0, 1024, (2, 16, 16))
    assert paella(tokens, torch.rand(2), e, clip).shape == (2, 1024, 16, 16)
    # the other kind of Stage B is refused by name, by the loaders and by --resume
    with pytest.raises(CheckpointError, match="holds a paella Stage B .* a diffnext Stage B was"):
        stage_b.load_stage_b(path)
    data, a_path = toy_run
    with pytest.raises(CheckpointError, match="python stage_b_paella.py"):
        stage_b.train(stage_b.get_args(["--data", data, "--stage_a", a_path, "--out_dir",
                                        str(tmp_path / "a"), "--model", "tiny", "--resume"]))
    save_checkpoint(str(tmp_path / "c" / "ckpt.pt"), {"stage": "stage_b", "kind": "diffnext",
                                                      "step": 1, "train_config": {"model": "tiny"}})
    with pytest.raises(CheckpointError, match="holds a diffnext Stage B"):
        stage_b_paella.train(_args(toy_run, tmp_path / "c", 3, "--resume"))


# ---- the chain: Stage C on top of a Paella Stage B, and sample.py


@pytest.fixture(scope="module")
def paella_chain(tmp_path_factory):
    """24 toy images of 128 px, a random tiny Stage A, then Paella and a Stage C on top of it (2
    steps each)."""
    import stage_c
    from stage_a import PRESETS as A_PRESETS
    from stage_a import StageA
    from toy import write_toy_dataset
    root = tmp_path_factory.mktemp("paella_chain")
    data, a, b, c = str(root / "toy"), str(root / "a.pt"), root / "b", root / "c"
    write_toy_dataset(data, n=24, size=128, seed=0)
    torch.manual_seed(0)
    model = StageA(A_PRESETS["tiny"]["model"])
    save_checkpoint(a, {"stage": "stage_a", "step": 0, "model_config": asdict(model.cfg),
                        "model": model.state_dict(), "ema": model.state_dict()})
    common = ["--data", data, "--stage_a", a, "--model", "tiny", "--device", "cpu",
              "--num_workers", "0", "--max_steps", "2", "--batch_size", "4", "--num_holdout", "4",
              "--sample_every", "2", "--save_every", "2", "--steps_b", "2"]
    stage_b_paella.train(stage_b_paella.get_args(common + ["--out_dir", str(b)]))
    stage_c.train(stage_c.get_args(common + ["--out_dir", str(c), "--stage_b", str(b / "ckpt.pt"),
                                             "--steps_c", "2"]))
    return dict(data=data, a=a, b=str(b / "ckpt.pt"), c=str(c / "ckpt.pt"), c_dir=c)


def test_chain_through_stage_c_and_sample_py(paella_chain, tmp_path, capsys):
    import sample
    # Stage C's previews went through Paella
    assert "toy_colour_acc" in (paella_chain["c_dir"] / "log.txt").read_text()
    pipe = sample.load_pipeline(paella_chain["a"], paella_chain["b"], paella_chain["c"], "cpu")
    assert isinstance(pipe.stage_b, Paella)
    prompt = ["a red circle on a blue background"]
    fast = dict(width=128, height=128, steps_c=2, steps_b=2, progress=False)
    img = sample.text_to_image(pipe, prompt, seed=1, **fast)
    assert img.shape == (1, 3, 128, 128) and 0 <= img.min() and img.max() <= 1
    again = sample.text_to_image(pipe, prompt, seed=1, **fast)
    other = sample.text_to_image(pipe, prompt, seed=2, **fast)
    assert torch.equal(img, again) and not torch.equal(img, other)
    # unset, Stage B's settings are Paella's: 8 steps, guided (a batch of 2 per image) against the
    # negative prompt
    calls = []
    hook = pipe.stage_b.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["clip_text"]), with_kwargs=True)
    sample.text_to_image(pipe, prompt, "blurry", width=128, height=128, steps_c=2, progress=False)
    hook.remove()
    blurry = pipe.text_encoder_b.encode(["blurry"])
    assert len(calls) == 8 and all(len(c) == 2 and torch.equal(c[1:], blurry) for c in calls)
    x = torch.rand(2, 3, 128, 128)
    assert sample.image_variation(pipe, x, steps_b=2, progress=False).shape == x.shape
    with pytest.raises(ValueError, match="this Stage B is a Paella .a token Stage B"):
        sample.export(pipe, tmp_path / "export")  # diffusers has no token Stage B
    sample.main(sample.get_args(["--stage_a", paella_chain["a"], "--stage_b", paella_chain["b"],
                                 "--stage_c", paella_chain["c"], "--eval_toy", "--n", "1",
                                 "--steps_c", "2", "--steps_b", "2", "--device", "cpu",
                                 "--out_dir", str(tmp_path)]))
    assert '"colour"' in capsys.readouterr().out and (tmp_path / "eval_toy.json").exists()
