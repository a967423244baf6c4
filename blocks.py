"""
What Stages B and C share (Stage B's v1 kind, Paella, too): the sizes and the latent space that tie
the stages together, and the building blocks of their networks (method.md §4.2-4.3, §5.2).

    ResBlock (ConvNeXt: depthwise conv, LayerNorm, channel MLP with GRN)  "C"
    TimestepBlock (x * (1 + a) + b from the timestep embedding)          "T"
    AttnBlock (attention over [image tokens ; condition tokens])          "A"

Stage C is a stack of [C, T, A] triples; Stage B (DiffNeXt) and Paella are U-Nets of such levels
(unet_levels).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the sizes and the latent space that tie the stages together

# The sizes the method fixes (method §1.5, §7.7): the semantic compressor sees the image at 3/4 of
# its side with stride 32, so a Stage C latent cell covers 42.67 px and 10.67 Stage A (f4) cells.
RESOLUTION_MULTIPLE = 42.67  # image side / semantic (Stage C) latent side: 1024 px -> 24
LATENT_DIM_SCALE = 10.67  # Stage A latent side / semantic latent side: 24 -> int(24 * 10.67) = 256
RELEASED_LATENT_SPACE = {"scale": 42.0, "shift": 1.0}  # released v2: y = (e + 1) / 42 (§3.3)


def to_stage_c_space(e, latent_space):
    """Semantic compressor output e -> Stage C's latent y = (e + shift) / scale (method §3.3; 42
    and 1 for paper)."""
    return (e.float() + latent_space["shift"]) / latent_space["scale"]


def to_stage_b_space(y, latent_space):
    """Stage C latent y -> the e-space Stage B is conditioned on: e = y * scale - shift (the
    pipeline's 42 y - 1)."""
    return y * latent_space["scale"] - latent_space["shift"]

# -----------------------------------------------------------------------------
# blocks


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, without affine parameters (method §4.2)."""

    def __init__(self, c):
        super().__init__(c, elementwise_affine=False, eps=1e-6)

    def forward(self, x):
        # (B, C, H, W) -> (B, H, W, C) -> normalise C -> (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 Global Response Normalisation on channels-last input (method §4.2). Textbook:
    g = torch.norm(x, dim=(1, 2)); n = g / (g.mean(-1) + 1e-6); out = gamma * (x * n) + beta + x."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c))

    def forward(self, x):  # x: (B, H, W, C)
        # g: (B, 1, 1, C), the L2 norm over space per channel, as a sum of squares: torch.norm
        # reduces over these strided dims ~10x slower on the CPU. A channel of exact zeros (GELU
        # gives them) has norm 0 and, as in torch.norm, gradient 0: sqrt's would be inf * 0 = NaN
        ss = (x * x).sum(dim=(1, 2), keepdim=True)
        g = torch.where(ss > 0, ss, 1.0).sqrt() * (ss > 0)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)  # divisive normalisation across channels
        return torch.addcmul(self.beta, x, self.gamma * n + 1)  # gamma * x * n + beta + x, one pass


def keep_mask(shape, p):
    """CPU booleans, True with probability 1 - p (p rounded to a multiple of 2^-15): four 15-bit
    uniform integers per 64-bit draw: ~2.5x cheaper than torch.rand >= p, ~5x than bernoulli_."""
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # uniform in [0, 2^63)
    lanes = draws.view(torch.int16)[:n] & 0x7FFF  # (4 * draws,) 15-bit lanes, uniform in [0, 2^15)
    return (lanes >= round(p * 2**15)).view(shape)


def dropout(x, p, training=True):
    """F.dropout: zero each entry with probability p, scale the rest by 1 / (1 - p); on the CPU with
    keep_mask's mask (F.dropout uses the slower bernoulli_ there), else F.dropout's fused kernel."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    return x * (keep_mask(x.shape, p) * (1 / (1 - p))).to(x.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout`, in the MLPs' parameter-free slot (so keys stay diffusers')."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


class TimestepBlock(nn.Module):
    """Timestep conditioning (method §4.2): x * (1 + a) + b with (a, b) = Linear(t-embedding)."""

    def __init__(self, c, c_r):
        super().__init__()
        self.mapper = nn.Linear(c_r, 2 * c)

    def forward(self, x, r_embed):
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)  # (B, 2C) -> 2 x (B, C, 1, 1)
        return torch.addcmul(b, x, 1 + a)  # x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections.

    Named as diffusers names it (to_q, to_k, to_v, to_out.0): the released weights load 1:1 (§8.2).
    Dropout acts on the attention probabilities, as in dome272's nn.MultiheadAttention (the code
    that trained the released model); diffusers applies it after to_out instead (same in eval).
    """

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        inner = c // nhead * nhead  # c itself in every released model; diffusers' rule otherwise
        self.to_q = nn.Linear(c, inner)
        self.to_k = nn.Linear(c, inner)
        self.to_v = nn.Linear(c, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, c))  # a Sequential only for the key 'to_out.0'

    def forward(self, x, kv):  # x: (B, N, C) queries, kv: (B, M, C) keys/values
        def heads(z):  # (B, L, C) -> (B, nhead, L, C / nhead)
            return z.unflatten(-1, (self.nhead, -1)).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(kv)), heads(self.to_v(kv))
        if self.training and self.dropout > 0 and q.device.type == "cpu":
            # no fused CPU attention with dropout: SDPA would fall back to this, with a slower mask
            # draw; w: (B, nhead, N, M) probabilities
            w = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = dropout(w, self.dropout) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, nhead, N, C/nhead) -> (B, N, C)


class AttnBlock(nn.Module):
    """Pre-norm attention of image tokens over [image tokens ; mapped text tokens] (method §4.2).

    With self_attn=True (all released configs) the key/value sequence is the normed image tokens
    followed by kv_mapper(cond), so one attention does both self- and cross-attention.
    """

    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c)
        self.attention = Attention(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x, cond):  # x: (B, C, H, W), cond: (B, M, c_cond)
        kv = self.kv_mapper(cond)  # (B, M, C)
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.self_attn:
            kv = torch.cat([h, kv], dim=1)  # (B, H*W + M, C)
        out = self.attention(h, kv).transpose(1, 2).reshape(x.shape)  # (B, H*W, C) -> (B, C, H, W)
        return x + out


def r_embedding(t, c_r=64, max_positions=10000):
    """Sinusoidal embedding of the continuous timestep t in [0, 1] (method §4.2): (B,) -> (B, c_r).

    t is scaled by 10,000 and embedded with c_r // 2 geometric frequencies, sin block first.
    """
    half = c_r // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1)
                      * torch.arange(half, device=t.device).float())
    angles = (t * max_positions)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, 2 half)
    return F.pad(emb, (0, c_r % 2))  # (B, c_r): an odd c_r ends in a 0, as the reference pads it


class ResBlockStageB(nn.Module):
    """DiffNeXt's ConvNeXt block ("C", method §4.2): depthwise conv -> LayerNorm2d -> concat the
    skip -> channels-last MLP (Linear, GELU, GRN, Dropout, Linear) -> residual. The skip joins
    *after* the conv."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c + c_skip, 4 * c), nn.GELU(),
                                         GlobalResponseNorm(4 * c), Dropout(dropout),
                                         nn.Linear(4 * c, c))

    def forward(self, x, skip=None):  # x: (B, C, H, W), skip: (B, C_skip, H, W) or None
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)  # (B, C + C_skip, H, W)
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # MLP: (B, H, W, C)


class ResBlock(nn.Module):
    """ConvNeXt block of the prior ("C" in method §4.2, dome272 `ResBlock`): as ResBlockStageB, but
    the skip joins *before* the depthwise conv (groups = c, so a skip of width c gives every group 2
    input channels; the prior itself passes none)."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), GlobalResponseNorm(4 * c),
                                         Dropout(dropout), nn.Linear(4 * c, c))

    def forward(self, x, skip=None):  # x: (B, C, H, W), skip: (B, C_skip, H, W) or None
        h = x if skip is None else torch.cat([x, skip], dim=1)  # (B, C + C_skip, H, W)
        h = self.norm(self.depthwise(h))  # (B, C, H, W)
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # MLP: (B, H, W, C)


def dome272_init(model):
    """dome272's general initialisation (method §4.6): xavier_uniform for every Conv2d / Linear
    weight, zero biases, and the attention's q/k/v drawn as nn.MultiheadAttention draws them, as one
    packed (3C, C) xavier matrix. (The ConvTranspose2d upsamplers keep PyTorch's default, as
    there.) The models then re-initialise some layers."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, Attention):
            bound = math.sqrt(6 / (4 * m.to_q.in_features))  # xavier bound of a (3C, C) matrix
            for proj in (m.to_q, m.to_k, m.to_v):
                nn.init.uniform_(proj.weight, -bound, bound)


def per_level(value, n):
    """A U-Net setting given once for every level or once per level -> a list of n values."""
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def unet_levels(c_hidden, blocks, level_config, block):
    """The U-Net skeleton of DiffNeXt and Paella (method §4.3, §4.8): (down_blocks, up_blocks),
    one ModuleList per level. Down level i: [downsampler (i > 0): LayerNorm2d, 2x2 stride-2 conv]
    + blocks[i] x level_config[i]. Up levels, deepest first: blocks[i] x level_config[i] +
    [upsampler (i > 0): LayerNorm2d, 2x2 stride-2 ConvTranspose]. block(kind, i, c_skip) builds
    one block of level i; c_skip is the width of the U-Net skip, the down path's output of that
    level, which the first block of every up level but the deepest takes (else 0)."""
    n = len(c_hidden)
    down_blocks, up_blocks = nn.ModuleList(), nn.ModuleList()
    for i in range(n):
        level = nn.ModuleList()
        if i > 0:
            level.append(nn.Sequential(LayerNorm2d(c_hidden[i - 1]),
                                       nn.Conv2d(c_hidden[i - 1], c_hidden[i], 2, stride=2)))
        level.extend(block(kind, i, 0) for _ in range(blocks[i]) for kind in level_config[i])
        down_blocks.append(level)
    for i in reversed(range(n)):
        level = nn.ModuleList(block(kind, i, c_hidden[i] if i < n - 1 and j == k == 0 else 0)
                              for j in range(blocks[i]) for k, kind in enumerate(level_config[i]))
        if i > 0:
            level.append(nn.Sequential(LayerNorm2d(c_hidden[i]),
                                       nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], 2, 2)))
        up_blocks.append(level)
    return down_blocks, up_blocks


def image_side_multiple(cfg):
    """The image sides a Stage B (or Paella) config trains on are multiples of this: Stage A's f4
    latent (or token map) side must divide through its patch and its U-Net levels."""
    return 4 * cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)
