"""
The frozen CLIP text towers of Stages B and C (method.md §4.4, §5.5): prompts -> (B, 77, width)
token features, computed as the released pipelines compute them, from open_clip weights or from
a transformers CLIPTextModel folder (the released text_encoder/), and written back to one.

    TextEncoder(name, pretrained)   'ViT-H-14' (Stage B), 'ViT-bigG-14' (Stage C), 'tiny' (random:
                                    CPU runs, tests) or 'transformers' (a CLIPTextModel folder)
    build_text_encoder(args, ...)   the tower of a training run (--text_encoder, --text_pretrained)
"""
import functools
import os
import re
import unicodedata

import torch
import torch.nn as nn

from common import (UsageError, hub_file, load_exact, load_weights_file, read_json,
                    save_weights_file, write_json)

CONTEXT_LENGTH = 77  # CLIP text tokens (padded and truncated to this)


class TextEncoder(nn.Module):
    """Frozen CLIP text tower (method §4.4, §5.5): prompts -> last hidden states after ln_final,
    (B, 77, width), as the released pipelines compute them: CLIPTokenizerFast (padding to 77,
    truncation), then CLIPTextModel with the tokenizer's attention mask, so the padding positions
    (Stages B and C read them) attend only to the prompt. Only the text parts are kept in memory.

    name: an open_clip architecture ('ViT-H-14' for Stage B, 'ViT-bigG-14' for Stage C), 'tiny' (a
    small random tower for tests and CPU runs) or 'transformers' (a CLIPTextModel folder's config);
    pretrained: an open_clip tag or weights file, the CLIPTextModel folder (e.g. the released
    text_encoder/), or None (random weights, saved with the checkpoint: checkpoint_entry());
    pad_token: the tokenizer's pad token ('!' in the LAION towers' tokenizers; see read_pad_token).
    """

    TINY = dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2)

    def __init__(self, name="tiny", pretrained=None, pad_token="!"):
        super().__init__()
        import open_clip
        self.spec = {"name": name, "pretrained": pretrained} | ({"pad_token": pad_token}
                                                                if pad_token != "!" else {})
        if name == "tiny":
            tower = open_clip.transformer.TextTransformer(**self.TINY,
                                                          output_dim=self.TINY["width"])
        elif name == "transformers":
            tower, sd = clip_text_from_transformers(pretrained)
        else:
            weights = fetch_clip_weights(name, pretrained) if pretrained else None
            tower = open_clip.create_model(name, pretrained=weights).eval()
        self.token_embedding, self.positional_embedding = (tower.token_embedding,
                                                           tower.positional_embedding)
        self.transformer, self.ln_final = tower.transformer, tower.ln_final
        if name == "transformers":
            load_exact(self, sd, what=f"CLIP text weights from {pretrained}")
        if (self.token_embedding.num_embeddings != 49408
                or len(self.positional_embedding) != CONTEXT_LENGTH):
            raise UsageError(f"{name}: not a CLIP BPE text tower with 77 positions, which "
                             f"TextEncoder tokenises for")
        self.width, self.heads = (self.ln_final.normalized_shape[0],
                                  self.transformer.resblocks[0].attn.num_heads)
        # the CLIP byte-level BPE (open_clip ships it); the special tokens by Hugging Face name, the
        # pad token among them: CLIPTokenizerFast matches it inside a prompt too
        self.bpe = clip_bpe()
        self.special = {"<|startoftext|>": self.bpe.sot_token_id,
                        "<|endoftext|>": self.bpe.eot_token_id}
        self.special[pad_token] = self.special.get(pad_token, self.bpe.encoder.get(pad_token))
        if self.special[pad_token] is None:
            raise UsageError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
        self.pad_token, self.pad_id = pad_token, self.special[pad_token]
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, self.special)) + ")")
        self.eval().requires_grad_(False)

    @classmethod
    def from_spec(cls, spec):
        """Rebuild from a checkpoint's 'text_encoder' entry (random towers carry their weights)."""
        encoder = cls(spec["name"], spec["pretrained"], spec.get("pad_token", "!"))
        if "state_dict" in spec:
            encoder.load_state_dict(spec["state_dict"])
        return encoder

    def diffusers_config(self):
        """The config.json of this tower as the pipelines' text encoder, a transformers
        CLIPTextModel. Refused by name where CLIPTextModel cannot express it: another activation,
        mixed LayerNorm eps, weights it has no place for (LayerScale, ...)."""
        blocks = self.transformer.resblocks
        act_names = {layer: name for name, layer in clip_activations().items()}
        acts = {type(b.mlp.gelu) for b in blocks}
        eps = {m.eps for m in self.modules() if isinstance(m, nn.LayerNorm)}
        layer_keys = [f"attn.in_proj_{kind}" for kind in ("weight", "bias")] + [
            f"{n}.{kind}" for n in CLIP_LAYER_NAMES.values() for kind in ("weight", "bias")]
        keys = set(CLIP_NAMES.values()) | {  # the weights clip_text_to_transformers maps
            f"transformer.resblocks.{i}.{k}" for i in range(len(blocks)) for k in layer_keys}
        extra = sorted(set(self.state_dict()) ^ keys)
        if len(acts) != 1 or not acts <= act_names.keys() or len(eps) != 1 or extra:
            raise UsageError(f"the text tower {self.spec['name']!r} is not one transformers' "
                             f"CLIPTextModel can express (activations "
                             f"{sorted(a.__name__ for a in acts)}, LayerNorm eps {sorted(eps)}, "
                             f"weights outside its layout: {extra[:5]})")
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                "vocab_size": 49408, "max_position_embeddings": CONTEXT_LENGTH,
                "hidden_size": self.width, "num_attention_heads": self.heads,
                "num_hidden_layers": len(blocks),
                "intermediate_size": blocks[0].mlp.c_fc.out_features,
                "hidden_act": act_names[acts.pop()], "layer_norm_eps": eps.pop(),
                "bos_token_id": self.bpe.sot_token_id, "eos_token_id": self.bpe.eot_token_id,
                "pad_token_id": self.pad_id}

    def save_pretrained(self, folder, tokenizer_folder):
        """The inverse of TextEncoder('transformers', folder, pad_token): a transformers
        CLIPTextModel folder and a CLIP tokenizer folder with this encoder's pad token."""
        save_weights_file(folder, clip_text_to_transformers(self), self.diffusers_config(),
                          name="model.safetensors")
        write_clip_tokenizer(tokenizer_folder, self.pad_token)

    def transformers_weight(self, name):
        """The weight of the Linear layer that transformers' CLIPTextModel calls `name`
        ('encoder.layers.3.self_attn.q_proj', with or without 'text_model.'; CLIP_LAYER_NAMES), as a
        view that updates in place (q/k/v_proj: their rows of the packed attn.in_proj_weight), for
        a LoRA made on that model; None where this tower has no such layer."""
        m = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|"
                         r"self_attn\.out_proj|mlp\.fc1|mlp\.fc2)", name)
        if m is None or int(m[1]) >= len(self.transformer.resblocks):
            return None
        block, layer = self.transformer.resblocks[int(m[1])], m[2]
        if layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return block.attn.in_proj_weight.chunk(3)["qkv".index(layer[-6])]
        return block.get_submodule(CLIP_LAYER_NAMES[layer]).weight

    def checkpoint_entry(self):
        """What a checkpoint stores: the spec, plus the weights if random (not re-creatable)."""
        return self.spec | ({"state_dict": self.state_dict()} if self.spec["pretrained"] is None
                            else {})

    def tokenize(self, prompts):
        """list of B strings -> ids (B, 77) and keep (B, 77) bool (True up to end-of-text): what
        CLIPTokenizerFast(padding="max_length", max_length=77, truncation=True) returns as input_ids
        and attention_mask. Normalisation: NFC, whitespace runs -> one space, lowercase (open_clip's
        tokenizer also applies ftfy and unescapes HTML: other ids for some prompts)."""
        ids = torch.full((len(prompts), CONTEXT_LENGTH), self.pad_id, dtype=torch.long)
        keep = torch.zeros(len(prompts), CONTEXT_LENGTH, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            tokens = []
            for piece in self.special_pattern.split(prompt):  # special tokens match in the raw text
                if piece in self.special:
                    tokens.append(self.special[piece])
                    continue
                text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", piece)).lower()
                for word in self.bpe.pat.findall(text):  # letters | 1 digit | punctuation | 's 't
                    word = "".join(self.bpe.byte_encoder[b] for b in word.encode("utf-8"))
                    tokens += [self.bpe.encoder[t] for t in self.bpe.bpe(word).split(" ")]
            tokens = ([self.bpe.sot_token_id] + tokens[:CONTEXT_LENGTH - 2]
                      + [self.bpe.eot_token_id])  # truncated, keeping the ends
            ids[i, :len(tokens)], keep[i, :len(tokens)] = torch.tensor(tokens), True
        return ids, keep

    @torch.no_grad()
    def encode(self, prompts):
        """list of B strings -> (B, 77, width) float32."""
        ids, keep = (t.to(self.positional_embedding.device) for t in self.tokenize(prompts))
        B, L = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding  # (B, 77, width)
        # additive attention mask (B * heads, 77, 77), one per (sample, head): causal, and no query
        # attends to the padding after the end-of-text token
        causal = torch.full((L, L), float("-inf"), device=x.device).triu(1)  # (77, 77)
        padding = torch.zeros(B, 1, 1, L, device=x.device).masked_fill(~keep[:, None, None, :],
                                                                        float("-inf"))
        mask = (causal + padding).expand(B, self.heads, L, L).reshape(B * self.heads, L, L)
        x = self.transformer(x, attn_mask=mask)
        return self.ln_final(x).float()


# transformers CLIPTextModel -> open_clip names: outside the layers, and in each layer (whose
# q/k/v_proj are packed into one attn.in_proj, rows q, k, v)
CLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight",
              "final_layer_norm.bias": "ln_final.bias"}
CLIP_LAYER_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                    "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


@functools.cache
def clip_bpe():
    """open_clip's CLIP byte-level BPE (vocabulary and merges), read once per process (~0.1 s)."""
    import open_clip
    return open_clip.tokenizer.SimpleTokenizer()


def clip_activations():
    """transformers' hidden_act name -> the open_clip activation, for those both have."""
    import open_clip
    return {"gelu": nn.GELU, "quick_gelu": open_clip.transformer.QuickGELU}


def clip_text_from_transformers(folder):
    """A transformers CLIPTextModel folder (config.json + model.safetensors or pytorch_model.bin;
    the released text_encoder/) -> (an open_clip text tower of its architecture on the meta device,
    its weights under open_clip's names: CLIP_NAMES, CLIP_LAYER_NAMES). transformers itself is not
    needed (safetensors comes with open_clip)."""
    import open_clip
    hf = read_json(os.path.join(folder, "config.json"))
    act, acts = hf.get("hidden_act", "quick_gelu"), clip_activations()  # CLIPTextConfig's default
    if act not in acts:
        raise UsageError(f"{folder}: activation {act!r} is not supported (only {list(acts)})")
    width, eps = hf["hidden_size"], hf.get("layer_norm_eps", 1e-5)
    with torch.device("meta"):  # no memory, no init: the weights are assigned when loaded
        tower = open_clip.transformer.TextTransformer(
            context_length=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], width=width,
            heads=hf["num_attention_heads"], layers=hf["num_hidden_layers"],
            mlp_ratio=hf["intermediate_size"] / width, output_dim=None, act_layer=acts[act],
            norm_layer=lambda n: open_clip.transformer.LayerNorm(n, eps=eps))
    theirs = {k.removeprefix("text_model."): v for k, v in load_weights_file(folder).items()}
    sd = {ours: theirs[name] for name, ours in CLIP_NAMES.items()}
    for i in range(hf["num_hidden_layers"]):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[f"{dst}attn.in_proj_{kind}"] = torch.cat([theirs[f"{src}self_attn.{n}_proj.{kind}"]
                                                         for n in "qkv"])
            sd |= {f"{dst}{ours}.{kind}": theirs[f"{src}{name}.{kind}"]
                   for name, ours in CLIP_LAYER_NAMES.items()}
    return tower, sd


def clip_text_to_transformers(encoder):
    """The inverse of clip_text_from_transformers: a TextEncoder's open_clip weights (any CLIP text
    tower, the random 'tiny' one too) -> a transformers CLIPTextModel state dict (its config:
    TextEncoder.diffusers_config)."""
    sd = encoder.state_dict()
    theirs = {name: sd[ours] for name, ours in CLIP_NAMES.items()}
    for i in range(len(encoder.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q_k_v = sd[f"{src}attn.in_proj_{kind}"].chunk(3)  # (3 width, ...) -> 3 x (width, ...)
            for n, w in zip("qkv", q_k_v):
                theirs[f"{dst}self_attn.{n}_proj.{kind}"] = w.clone()  # safetensors: not shared
            theirs |= {f"{dst}{name}.{kind}": sd[f"{src}{ours}.{kind}"]
                       for name, ours in CLIP_LAYER_NAMES.items()}
    return {f"text_model.{k}": v for k, v in theirs.items()}


def write_clip_tokenizer(folder, pad_token):
    """A CLIP tokenizer folder as the released tokenizer/ folders hold it, from open_clip's bundled
    CLIP BPE: vocab.json and merges.txt (CLIP builds both from bpe_simple_vocab_16e6.txt.gz), the
    special tokens under their Hugging Face names, `pad_token`. transformers' CLIPTokenizer(Fast)
    reads it and gives TextEncoder's ids."""
    bpe = clip_bpe()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    write_json(os.path.join(folder, "vocab.json"), vocab)
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)  # pairs, in merge order
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "tokenizer_config.json"), special | {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH,
        "do_lower_case": True, "errors": "replace"})


def read_pad_token(folder):
    """The pad token of a CLIP tokenizer folder (special_tokens_map.json / tokenizer_config.json;
    released: '!'), after checking it is TextEncoder's CLIP BPE with 77 positions."""
    spec = read_json(os.path.join(folder, "special_tokens_map.json")) | read_json(
        os.path.join(folder, "tokenizer_config.json"))
    pad = spec.get("pad_token", "<|endoftext|>")  # CLIPTokenizer's default
    pad = pad["content"] if isinstance(pad, dict) else pad
    vocab = read_json(os.path.join(folder, "vocab.json")) or read_json(
        os.path.join(folder, "tokenizer.json")).get("model", {}).get("vocab", {})
    ours = clip_bpe().encoder
    if (len(vocab) != 49408
            or any(ours.get(t, i) != i for t, i in vocab.items() if not t.startswith("<|"))
            or spec.get("model_max_length", CONTEXT_LENGTH) != CONTEXT_LENGTH):
        raise UsageError(f"{folder} is not the CLIP BPE tokenizer with 77 positions that "
                         f"TextEncoder implements")
    return pad


def fetch_clip_weights(name, pretrained):
    """Local path of open_clip weights: `pretrained` itself if a file, else the Hugging Face cache
    (downloaded into it first when online). Fails at once, naming the file, if it cannot be had."""
    if os.path.isfile(pretrained):
        return pretrained
    import open_clip
    source = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub")
    if not source:
        raise UsageError(f"open_clip has no Hugging Face weights {name!r} / {pretrained!r} "
                         f"(known tags: {open_clip.list_pretrained_tags_by_model(name)})")
    parts = source.strip("/").split("/")  # 'org/repo/' or 'org/repo/file'
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "open_clip_pytorch_model.bin"
    try:
        return hub_file(repo, filename)
    except Exception as e:
        raise RuntimeError(
            f"cannot fetch the CLIP text encoder weights {name} / {pretrained} "
            f"({type(e).__name__}; offline?). Download https://huggingface.co/{repo}/resolve/main/"
            f"{filename} (`huggingface-cli download {repo} {filename}` fills the Hugging Face "
            f"cache, ~/.cache/huggingface/hub) on a machine with network, or pass the downloaded "
            f"file's path as the text encoder's pretrained weights") from None


def add_text_encoder_args(group):
    """The text-tower flags of the training scripts (Stages B and C)."""
    group.add_argument("--text_encoder", default=None, help="open_clip text architecture, or "
                       "'tiny' (a small random tower) (default: per preset)")
    group.add_argument("--text_pretrained", default=None, help="open_clip pretrained tag or "
                       "weights file, 'none' for random weights (default: per preset)")


def build_text_encoder(args, preset_spec, ckpt, device):
    """The frozen text tower of a run: the checkpoint's when resuming, else the flags' or preset's.
    A random tower is seeded, so every rank builds the same one (the checkpoint saves it)."""
    spec = ckpt["text_encoder"] if ckpt else {
        "name": args.text_encoder or preset_spec["name"],
        "pretrained": (None if args.text_pretrained == "none"
                       else args.text_pretrained or preset_spec["pretrained"])}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return TextEncoder.from_spec(spec).to(device)
