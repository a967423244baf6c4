"""sample.py --pretrained on tiny random versions of every released component, in the released
layouts: the diffusers pipeline folders of warp-ai/wuerstchen-prior and warp-ai/wuerstchen (prior /
decoder / vqgan, transformers CLIP text models, CLIP tokenizers, scheduler, model_index.json) and
the official dome272 .pt files. Our chain must give the image of diffusers' own pipelines from the
same seed, our text encoder the hidden states of transformers' CLIPTextModel, and a missing
download must fail at once with instructions. And the other direction, sample.py --export: our
checkpoints in that layout must give our image in diffusers' pipelines and in --pretrained."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

import export
import pretrained
import sample
import stage_b
import text_encoder
from common import UsageError
from diffusion import DEFAULT_STAGE_C_TIMESTEPS
from stage_b import StageBConfig
from text_encoder import TextEncoder

# -----------------------------------------------------------------------------
# the released layouts: tiny random stand-ins; diffusers' pipelines are the reference
# tiny stand-ins for the released sizes (method §4.1, §5.1): the prior's heads 64-dim as released,
# text widths 64 ("bigG", prior) and 48 ("ViT-H", decoder)
PRIOR = dict(c_in=16, c=128, c_cond=64, c_r=64, depth=2, nhead=2, dropout=0.1)
DECODER = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[16, 32, 32],
               nhead=[-1, 2, 2], blocks=[1, 1, 1], level_config=["CT", "CTA", "CTA"],
               inject_effnet=[False, True, True], effnet_embd=16, clip_embd=48, kernel_size=3,
               dropout=0.1)
DECODER_CFG = StageBConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in DECODER.items()})  # for the .pt
VQGAN = dict(levels=2, bottleneck_blocks=1, embed_dim=32, latent_channels=4, num_vq_embeddings=64,
             scale_factor=0.3764)
TEXT = {"prior": dict(hidden_size=64, intermediate_size=256, num_attention_heads=2),
        "decoder": dict(hidden_size=48, intermediate_size=192, num_attention_heads=3)}
PROMPTS = ["A red fox in the snow!", "",
           "an  owl, reading \u201cThe Times\u201d &amp; caf\u00e9 ＡＢＣ",
           " ".join(["word"] * 100)]  # padding + '!', empty, unicode / HTML, > 77 tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def randomize(model, seed):
    """Every parameter random (zero-initialised ones too), at scales keeping activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            scale = (0.1 * fan_in**-0.5 if name.startswith(("out.", "clf."))
                     else fan_in**-0.5 if p.dim() > 1 else 0.1)
            mean = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0  # norm scales around 1
            p.copy_(torch.randn(p.shape, generator=g) * scale + mean)
    return model.eval()


def write_tokenizer(folder, pad_token):
    """The files of a released CLIP tokenizer folder (text_encoder.write_clip_tokenizer: vocab.json,
    merges.txt from open_clip's bundled CLIP BPE, the special tokens, the pad token), and the
    transformers CLIPTokenizer (the fast one) that reads them."""
    from transformers import CLIPTokenizer
    text_encoder.write_clip_tokenizer(folder, pad_token)
    return CLIPTokenizer.from_pretrained(folder)


def clip_text_model(which, seed):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, num_hidden_layers=2, max_position_embeddings=77,
                         hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=49406,
                         eos_token_id=49407, **TEXT[which])
    return randomize(CLIPTextModel(cfg), seed)


def to_dome272(sd):
    """diffusers keys -> the official .pt layout (packed MultiheadAttention in_proj / out_proj)."""
    out = {}
    for k, v in sd.items():
        if ".attention.to_q." in k:
            prefix, kind = k.split(".to_q.")
            out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([sd[f"{prefix}.to_{n}.{kind}"]
                                                              for n in "qkv"])
        elif ".attention.to_out.0." in k:
            out[k.replace(".to_out.0.", ".attn.out_proj.")] = v
        elif ".attention.to_k." not in k and ".attention.to_v." not in k:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """DIR/wuerstchen-prior + DIR/wuerstchen written by diffusers' save_pretrained, and OFFICIAL
    with the dome272 .pt files (+ the text encoder and tokenizer folders, which the .pt files do
    not have), all from the same weights."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import (PaellaVQModel, WuerstchenDecoderPipeline,
                                                           WuerstchenDiffNeXt, WuerstchenPrior,
                                                           WuerstchenPriorPipeline)
    root, official = tmp_path_factory.mktemp("released"), tmp_path_factory.mktemp("official")
    prior, decoder, vqgan = (randomize(WuerstchenPrior(**PRIOR), 1),
                             randomize(WuerstchenDiffNeXt(**DECODER), 2),
                             randomize(PaellaVQModel(**VQGAN), 3))
    # the LAION tokenizers pad with '!'; the decoder's pads with EOS here: the pad token is read
    pad_tokens = {"wuerstchen-prior": "!", "wuerstchen": "<|endoftext|>"}
    WuerstchenPriorPipeline(write_tokenizer(str(root / "tok_c"), "!"), clip_text_model("prior", 4),
                            prior, DDPMWuerstchenScheduler(), latent_mean=42.0, latent_std=1.0,
                            resolution_multiple=42.67).save_pretrained(root / "wuerstchen-prior")
    WuerstchenDecoderPipeline(write_tokenizer(str(root / "tok_b"), "<|endoftext|>"),
                              clip_text_model("decoder", 5), decoder, DDPMWuerstchenScheduler(),
                              vqgan, latent_dim_scale=10.67).save_pretrained(root / "wuerstchen")
    for repo, pad_token in pad_tokens.items():  # vocab.json, merges.txt, ... as released
        write_tokenizer(str(root / repo / "tokenizer"), pad_token)
    compressor = stage_b.SemanticCompressor(stage_b.CompressorConfig())  # EfficientNetV2-S, random
    torch.save({"ema_state_dict": to_dome272(prior.state_dict())}, official / "model_v3_stage_c.pt")
    torch.save({"state_dict": to_dome272(decoder.state_dict()),
                "effnet_state_dict": compressor.state_dict()}, official / "model_v2_stage_b.pt")
    torch.save({"state_dict": {k.replace("vquantizer.embedding.", "vquantizer.codebook."): v
                               for k, v in vqgan.state_dict().items()}},
               official / "vqgan_f4_v1_500k.pt")
    for repo in ("wuerstchen-prior", "wuerstchen"):
        for part in ("text_encoder", "tokenizer"):
            shutil.copytree(root / repo / part, official / repo / part)
    return root, official


def reference_pipelines(root):
    """diffusers' own prior and decoder pipelines on the folders' components, with the values of
    model_index.json. (In diffusers >= 0.38 no from_pretrained of these pipelines resolves the model
    classes that model_index.json names: the components load one by one.)"""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated import wuerstchen as W
    from transformers import CLIPTextModel, CLIPTokenizer

    def parts(repo):
        with open(root / repo / "model_index.json") as f:
            index = json.load(f)
        return index, dict(tokenizer=CLIPTokenizer.from_pretrained(root / repo / "tokenizer"),
                           text_encoder=CLIPTextModel.from_pretrained(root / repo / "text_encoder"),
                           scheduler=DDPMWuerstchenScheduler.from_pretrained(
                               root / repo / "scheduler"))
    index, common = parts("wuerstchen-prior")
    prior = W.WuerstchenPriorPipeline(
        prior=W.WuerstchenPrior.from_pretrained(root / "wuerstchen-prior" / "prior"),
        latent_mean=index["latent_mean"], latent_std=index["latent_std"],
        resolution_multiple=index["resolution_multiple"], **common)
    index, common = parts("wuerstchen")
    decoder = W.WuerstchenDecoderPipeline(
        decoder=W.WuerstchenDiffNeXt.from_pretrained(root / "wuerstchen" / "decoder"),
        vqgan=W.PaellaVQModel.from_pretrained(root / "wuerstchen" / "vqgan"),
        latent_dim_scale=index["latent_dim_scale"], **common)
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    return prior, decoder


def reference_images(root, prompt, width, height, seed, negative_prompt=None, decoder_guidance=0.0):
    """diffusers' prior (29-step grid, CFG 4) then decoder (12 steps, no CFG by default) pipelines,
    one generator and the negative prompt through both, as WuerstchenCombinedPipeline does."""
    prior, decoder = reference_pipelines(root)
    g = torch.Generator().manual_seed(seed)
    embeddings = prior(prompt, height=height, width=width, timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                       guidance_scale=4.0, negative_prompt=negative_prompt, generator=g,
                       output_type="pt").image_embeddings
    return decoder(embeddings, prompt, num_inference_steps=12, guidance_scale=decoder_guidance,
                   negative_prompt=negative_prompt, generator=g, output_type="pt").images


@torch.no_grad()
def test_chain_equals_the_diffusers_pipelines(released):
    root, official = released
    ref = reference_images(root, PROMPTS[0], 256, 128, seed=3)
    pipe = sample.load_released(str(root))
    ours = sample.text_to_image(pipe, [PROMPTS[0]], width=256, height=128, seed=3, progress=False)
    assert (ours.shape == ref.shape == (1, 3, 128, 256) and 0.05 < ours.std()
            and ref.std() > 0.05)  # not a flat image
    assert (ours - ref).abs().max() < 1e-4
    assert all(getattr(pipe, n) is None for n in pipe.loaders)  # every stage was freed after use
    # the official .pt files hold the same weights: the same image
    pt = sample.load_released(str(official), decoder_cfg=DECODER_CFG)
    from_pt = sample.text_to_image(pt, [PROMPTS[0]], width=256, height=128, seed=3, progress=False)
    assert (from_pt - ours).abs().max() < 1e-5
    # a negative prompt, guidance in the decoder too (against the negative prompt and zero
    # semantic latents)
    ref = reference_images(root, PROMPTS[2], 128, 128, seed=4, negative_prompt="blurry",
                           decoder_guidance=2.0)
    ours = sample.text_to_image(pipe, [PROMPTS[2]], "blurry", width=128, height=128, seed=4,
                                guidance_b=2.0, progress=False)
    assert (ours - ref).abs().max() < 1e-4


@torch.no_grad()
def test_official_compressor_bf16_and_cli(released, tmp_path, capsys):
    _, official = released
    pipe = sample.load_released(str(official), dtype=torch.bfloat16,
                                decoder_cfg=DECODER_CFG)  # autocast, on the CPU
    img = sample.text_to_image(pipe, ["a cat"], width=128, height=128, steps_c=3, steps_b=2,
                               progress=False)
    assert img.shape == (1, 3, 128, 128) and torch.isfinite(img).all()
    x = torch.rand(1, 3, 128, 128)  # model_v2_stage_b.pt's semantic compressor: image variations
    assert sample.image_variation(pipe, x, steps_b=2, progress=False).shape == x.shape
    root, _ = released
    sample.main(sample.get_args(["--pretrained", str(root), "--prompt", "a cat", "--width", "128",
                                 "--height", "128", "--steps_c", "2", "--steps_b", "2",
                                 "--device", "cpu", "--out_dir", str(tmp_path)]))
    assert ("transformers text encoders" in capsys.readouterr().out
            and (tmp_path / "samples_000.png").exists())
    with pytest.raises(ValueError, match="semantic compressor"):  # diffusers' repositories: none
        sample.image_variation(sample.load_released(str(root)), x, steps_b=2, progress=False)


@torch.no_grad()
@pytest.mark.parametrize("pad_token", ["!", "<|endoftext|>"])
def test_text_encoder_equals_transformers(tmp_path, pad_token):
    """transformers CLIPTextModel folder -> TextEncoder (open_clip structure): same tokens,
    attention mask and hidden states as CLIPTokenizer + CLIPTextModel(attention_mask=...), the
    released pipelines' encode_prompt."""
    tokenizer = write_tokenizer(str(tmp_path / "tokenizer"), pad_token)
    model = clip_text_model("decoder", 6)
    model.save_pretrained(tmp_path / "text_encoder")
    assert text_encoder.read_pad_token(str(tmp_path / "tokenizer")) == pad_token
    ours = TextEncoder("transformers", str(tmp_path / "text_encoder"), pad_token)
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt")
    ids, keep = ours.tokenize(PROMPTS)
    assert torch.equal(ids, tokens.input_ids) and torch.equal(keep, tokens.attention_mask.bool())
    ref = model(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert (ours.encode(PROMPTS) - ref).abs().max() < 1e-5
    # without the key-padding mask the padding positions (which Stages B and C read) would differ
    assert (model(tokens.input_ids).last_hidden_state - ref)[:, -1].abs().max() > 1e-2
    # a CLIPTextModel with an activation the open_clip tower does not have is refused, by name
    with open(tmp_path / "text_encoder" / "config.json") as f:
        config = json.load(f)
    with open(tmp_path / "text_encoder" / "config.json", "w") as f:
        json.dump(config | {"hidden_act": "silu"}, f)
    with pytest.raises(ValueError, match="activation 'silu' is not supported"):
        TextEncoder("transformers", str(tmp_path / "text_encoder"), pad_token)


@torch.no_grad()
def test_open_clip_tower_equals_transformers(tmp_path):
    """The other direction (the export's): an open_clip tower (what TextEncoder('ViT-bigG-14' /
    'tiny') builds), written by TextEncoder.save_pretrained and read by transformers' CLIPTextModel,
    gives the same hidden states, padding with '!' (open_clip's id 0) included; an activation
    CLIPTextModel does not have is refused by name."""
    from transformers import CLIPTextModel
    ours = randomize(TextEncoder("tiny"), 7)
    ours.save_pretrained(tmp_path / "text_encoder", tmp_path / "tokenizer")
    model = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids, keep = ours.tokenize(PROMPTS)
    ref = model(ids, attention_mask=keep.long()).last_hidden_state
    assert (ours.encode(PROMPTS) - ref).abs().max() < 1e-5
    ours.transformer.resblocks[0].mlp.gelu = torch.nn.SiLU()
    with pytest.raises(ValueError, match="CLIPTextModel can express .activations .'GELU', 'SiLU'"):
        ours.diffusers_config()


def test_missing_weights_fail_at_once(tmp_path, monkeypatch):
    """No folder and nothing in the Hugging Face cache: a message with what to download and where,
    in well under a second (HF_HUB_OFFLINE); a folder without the weights names what is missing."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.time()
    with pytest.raises(UsageError, match="hf download warp-ai/wuerstchen-prior "
                                         "--local-dir DIR/wuerstchen-prior"):
        sample.main(sample.get_args(["--pretrained", "--prompt", "a cat", "--device", "cpu"]))
    assert time.time() - t0 < 2
    with pytest.raises(FileNotFoundError,
                       match="missing: stage_c, stage_b, stage_a, text_encoder_c") as e:
        pretrained.find_released(str(tmp_path))
    assert f"{tmp_path}/wuerstchen/" in str(e.value)


def test_no_network_fails_at_once_without_offline_flag(tmp_path):
    """The same without HF_HUB_OFFLINE, against an endpoint that refuses connections: one request,
    no retry loop, for the diffusers repositories and for the open_clip text weights alike."""
    code = ("import time, open_clip, pretrained, text_encoder\n"
            "for f in (lambda: pretrained.find_released(None), "
            "lambda: text_encoder.fetch_clip_weights('ViT-H-14', 'laion2b_s32b_b79k')):\n"
            "    t = time.time()\n"
            "    try: f()\n"
            "    except (FileNotFoundError, RuntimeError) as e: "
            "print(round(time.time() - t, 2), str(e)[:60])\n")
    env = os.environ | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                        "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert ("released Würstchen v2 weights were not found" in lines[0]
            and "CLIP text encoder" in lines[1])
    assert all(float(line.split()[0]) < 3 for line in lines), lines  # retrying would take ~25 s


def test_hugging_face_cache(released, tmp_path, monkeypatch):
    """No folder: the repositories come from the Hugging Face cache (filled by hand, offline)."""
    import huggingface_hub.constants
    root, _ = released
    for repo in (pretrained.PRIOR_REPO, pretrained.DECODER_REPO):
        cached = tmp_path / f"models--{repo.replace('/', '--')}"
        shutil.copytree(root / repo.split("/")[1], cached / "snapshots" / "0123abc")
        (cached / "refs").mkdir()
        (cached / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    paths = pretrained.find_released(None)
    assert paths["stage_c"] == str(tmp_path / "models--warp-ai--wuerstchen-prior" / "snapshots"
                                   / "0123abc" / "prior")
    assert paths["tokenizer_b"].startswith(str(tmp_path / "models--warp-ai--wuerstchen"))

# -----------------------------------------------------------------------------
# export: our checkpoints -> the released layout -> diffusers' pipelines; --pretrained reads it back

LATENT_SPACE = {"scale": 1.7, "shift": -0.3}  # not the released 42 / 1: the export must carry ours


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Tiny random checkpoints of the three stages (the entries the loaders read), with values
    unlike the released ones: the latent space, Stage A's scale_factor, a 128 px training size,
    random text towers (C's pads with EOS)."""
    from dataclasses import asdict, replace

    import stage_a
    import stage_c
    from common import save_checkpoint
    root = tmp_path_factory.mktemp("ours")
    cfg_a = replace(stage_a.PRESETS["tiny"]["model"], scale_factor=0.81)
    cfg_b, cfg_c = stage_b.PRESETS["tiny"]["model"], stage_c.PRESETS["tiny"]["model"]
    compressor = randomize(stage_b.SemanticCompressor(stage_b.PRESETS["tiny"]["compressor"]), 11)
    text_b = randomize(TextEncoder("tiny"), 12)
    text_c = randomize(TextEncoder("tiny", pad_token="<|endoftext|>"), 13)
    ckpts = {"stage_a": {"model_config": asdict(cfg_a),
                         "ema": randomize(stage_a.StageA(cfg_a), 14).state_dict()},
             "stage_b": {"model_config": asdict(cfg_b),
                         "ema": randomize(stage_b.StageB(cfg_b), 15).state_dict(),
                         "compressor_config": asdict(compressor.cfg),
                         "compressor_ema": compressor.state_dict(),
                         "text_encoder": text_b.checkpoint_entry(), "latent_space": LATENT_SPACE},
             "stage_c": {"model_config": asdict(cfg_c),
                         "ema": randomize(stage_c.StageC(cfg_c), 16).state_dict(),
                         "text_encoder": text_c.checkpoint_entry(), "latent_space": LATENT_SPACE}}
    for stage, ckpt in ckpts.items():
        ckpt |= {"stage": stage, "train_config": {"image_size": 128}}
        save_checkpoint(str(root / f"{stage}.pt"), ckpt)
    return [str(root / f"{stage}.pt") for stage in ckpts]


def same_files(a, b):
    """Two exported folders hold the same files: equal tensors and names, equal bytes otherwise."""
    from safetensors.torch import load_file
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".safetensors":
            x, y = load_file(a / f), load_file(b / f)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
        else:  # the model card names the export's own prior folder
            assert ((a / f).read_text().replace(str(a), "") ==
                    (b / f).read_text().replace(str(b), "")), f
    return files


def diffusers_entry_points(root, prompt, width, height, seed):
    """Our export's image in every entry point diffusers documents for the released weights, each
    from_pretrained on the folders as they are (no register_to_config): the prior then the decoder
    pipeline, WuerstchenCombinedPipeline and AutoPipelineForText2Image on the decoder's folder
    (which find the prior through its model card)."""
    from diffusers import (AutoPipelineForText2Image, WuerstchenCombinedPipeline,
                           WuerstchenDecoderPipeline, WuerstchenPriorPipeline)
    prior = WuerstchenPriorPipeline.from_pretrained(root / "wuerstchen-prior")
    decoder = WuerstchenDecoderPipeline.from_pretrained(root / "wuerstchen")
    combined = WuerstchenCombinedPipeline.from_pretrained(root / "wuerstchen")
    auto = AutoPipelineForText2Image.from_pretrained(root / "wuerstchen")
    assert type(auto) is WuerstchenCombinedPipeline
    for pipe in (prior, decoder, combined, auto):
        pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    embeddings = prior(prompt, height=height, width=width, timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                       guidance_scale=4.0, generator=g).image_embeddings
    images = {"prior + decoder": decoder(embeddings, prompt, generator=g, output_type="pt").images}
    for name, pipe in (("combined", combined), ("auto", auto)):
        images[name] = pipe(prompt, height=height, width=width,
                            prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, output_type="pt",
                            generator=torch.Generator().manual_seed(seed)).images
    return images


@torch.no_grad()
def test_export_runs_in_diffusers_and_reads_back(ours, tmp_path, capsys):
    """sample.py --export: our latent space folded into the decoder and compressor, so that every
    diffusers entry point (the combined pipeline's fixed latent_mean 42 / latent_std 1 included)
    gives our image from the same seed; --pretrained reads the folders back (the same image, the
    training size, variations through the exported compressor), and older exports that carry our
    latent space in model_index.json as before; its export gives the same files."""
    a, b, c = ours
    root = tmp_path / "exported"
    sample.main(sample.get_args(["--export", str(root), "--stage_a", a, "--stage_b", b,
                                 "--stage_c", c]))
    assert "sample.py --pretrained" in capsys.readouterr().out
    index = json.loads((root / "wuerstchen-prior" / "model_index.json").read_text())
    assert [index[k] for k in ("latent_mean", "latent_std", "_train_image_size")] == [42, 1, 128]
    pipe = sample.load_pipeline(a, b, c)
    image = sample.text_to_image(pipe, [PROMPTS[0]], width=256, height=128, seed=3, progress=False)
    assert image.shape == (1, 3, 128, 256) and image.std() > 0.05
    for name, ref in diffusers_entry_points(root, PROMPTS[0], 256, 128, seed=3).items():
        assert (image - ref).abs().max() < 1e-4, name
    # --pretrained DIR: the same image, the training size by default, the exported compressor
    back = sample.load_released(str(root))
    assert back.image_size == 128 and back.latent_space == {"scale": 42.0, "shift": 1.0}
    again = sample.text_to_image(back, [PROMPTS[0]], width=256, height=128, seed=3, progress=False)
    assert (again - image).abs().max() < 1e-6
    x = torch.rand(2, 3, 128, 128)
    variations = [sample.image_variation(p, x, seed=1, steps_b=3, progress=False)
                  for p in (pipe, back)]
    # (the released space stretches this latent space 25-fold: float32 rounding, 2e-5 at most)
    assert (variations[0] - variations[1]).abs().max() < 1e-4
    # an export written before the fold (our weights, our space in model_index.json) reads as before
    old = tmp_path / "old"
    shutil.copytree(root, old)
    export.save_stage_b(pipe.stage_b, old / "wuerstchen" / "decoder")
    export.save_compressor(pipe.compressor, old / "wuerstchen" / "semantic_compressor")
    index_path = old / "wuerstchen-prior" / "model_index.json"
    index_path.write_text(json.dumps(json.loads(index_path.read_text())
                                     | {"latent_mean": 1.7, "latent_std": -0.3}))
    before = sample.load_released(str(old))
    assert before.latent_space == LATENT_SPACE
    assert (sample.text_to_image(before, [PROMPTS[0]], width=256, height=128, seed=3,
                                 progress=False) - image).abs().max() < 1e-6
    # export -> load -> export: the same files (the model card names its own prior folder)
    sample.export(back, tmp_path / "again")
    assert {f.parts[1] for f in same_files(root, tmp_path / "again")} == {
        "model_index.json", "prior", "decoder", "vqgan", "text_encoder", "tokenizer", "scheduler",
        "semantic_compressor", "README.md"}
    # for diffusers < 0.38: the released repositories' library name, nothing else changed
    sample.export(back, tmp_path / "old_form", old_diffusers=True)
    for repo, name in (("wuerstchen-prior", "prior"), ("wuerstchen", "decoder")):
        index = json.loads((tmp_path / "old_form" / repo / "model_index.json").read_text())
        assert index[name][0] == "wuerstchen"
        (tmp_path / "old_form" / repo / "model_index.json").write_text(
            (root / repo / "model_index.json").read_text())
    same_files(root, tmp_path / "old_form")


def test_an_interrupted_export_leaves_no_export(ours, tmp_path, monkeypatch):
    """--export writes DIR.partial and renames it DIR when complete: a failure midway leaves no DIR
    that looks whole, a rerun writes it; an existing DIR is refused before anything is loaded."""
    a, b, c = ours
    argv = ["--export", str(tmp_path / "export"), "--stage_a", a, "--stage_b", b, "--stage_c", c]

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(sample, "write_compressor", fail)  # the last part written
    with pytest.raises(OSError, match="disk full"):
        sample.main(sample.get_args(argv))
    assert not (tmp_path / "export").exists() and (tmp_path / "export.partial").exists()
    monkeypatch.undo()
    sample.main(sample.get_args(argv))
    assert (tmp_path / "export" / "wuerstchen" / "semantic_compressor").is_dir()
    assert not (tmp_path / "export.partial").exists()
    with pytest.raises(UsageError, match="exists: an export goes to a new folder"):
        sample.main(sample.get_args(argv))


def test_the_readme_diffusers_snippet_runs_as_written(ours, tmp_path, monkeypatch):
    """The python block of README 'Use your model in diffusers', run as written in a folder where
    `sample.py --export out/export` wrote the quick start's checkpoints, gives sample.py's image."""
    import re

    import numpy as np
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"),
                  encoding="utf-8").read()
    section = readme.split("## Use your model in diffusers")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    monkeypatch.chdir(tmp_path)
    a, b, c = ours
    sample.main(sample.get_args(["--export", "out/export", "--stage_a", a, "--stage_b", b,
                                 "--stage_c", c]))
    namespace = {}
    exec(code, namespace)
    prompt = re.search(r'pipe\("([^"]+)"', code)[1]
    ours_ = sample.text_to_image(sample.load_pipeline(a, b, c), [prompt], width=128, height=128,
                                 seed=0, progress=False)
    ours_ = ours_[0].mul(255).round().byte().permute(1, 2, 0).numpy().astype(int)
    theirs = np.asarray(namespace["image"]).astype(int)
    assert ours_.shape == theirs.shape and np.abs(ours_ - theirs).max() <= 1
    assert (tmp_path / "out" / "diffusers.png").exists()


def test_export_refuses_what_diffusers_cannot_represent(ours, tmp_path):
    """Refused by name, with the reason, before anything is written."""
    from dataclasses import replace
    pipe = sample.load_pipeline(*ours)
    silu = TextEncoder("tiny")
    silu.transformer.resblocks[1].mlp.gelu = torch.nn.SiLU()
    no_self_attn = stage_b.StageB(replace(pipe.stage_b.cfg, self_attn=False))
    cases = {"self_attn=False": dict(stage_b=no_self_attn),
             "token Stage B": dict(stage_b=torch.nn.Linear(1, 1)),  # e.g. a Paella Stage B
             "samples 4-channel Stage A latents":
                 dict(stage_a=type(pipe.stage_a)(replace(pipe.stage_a.cfg, c_latent=8))),
             "CLIPTextModel can express .activations .'GELU', 'SiLU'": dict(text_encoder_c=silu)}
    for reason, parts in cases.items():
        with pytest.raises(ValueError, match=reason):
            sample.export(replace(pipe, **parts), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_efficientnet_compressor_export_is_the_official_form(released, tmp_path):
    """An EfficientNetV2-S compressor is written with the official effnet_state_dict's keys and
    tensors (what the fine-tuning scripts load), and read back."""
    from safetensors.torch import load_file
    _, official = released
    compressor = stage_b.SemanticCompressor.from_pretrained(str(official / "model_v2_stage_b.pt"))
    export.save_compressor(compressor, tmp_path / "semantic_compressor")
    theirs = torch.load(official / "model_v2_stage_b.pt", weights_only=True)["effnet_state_dict"]
    mine = load_file(tmp_path / "semantic_compressor" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    back = stage_b.SemanticCompressor.from_pretrained(str(tmp_path / "semantic_compressor"))
    x = torch.rand(1, 3, 128, 128)
    assert back.cfg == compressor.cfg and torch.equal(back(x), compressor(x))


def test_sampling_never_picks_float16(released, monkeypatch):
    """--dtype auto and load_released's default: bf16 where the GPU has it, else float32 (not fp16,
    in which bf16-trained weights overflow). load_released builds no model yet: 'cuda' is fine."""
    root, _ = released
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        assert sample.sampling_dtype("cuda") == dtype
        assert sample.load_released(str(root), device="cuda").dtype == dtype
    assert sample.sampling_dtype("cpu") == torch.float32


# -----------------------------------------------------------------------------
# the v1 chain: the official v1 files (method §1.4, §8.1), tiny and random

# num_labels: the VQGAN's codebook; byt5_embd: the width of the CLIP "ViT-H" below
V1_PAELLA = dict(c_in=8, c_out=8, num_labels=64, c_cond=32, c_hidden=(16, 32), nhead=(-1, 2),
                 blocks=(1, 1), level_config=("CT", "CTA"), byt5_embd=48)
V1_NEGATIVE = "low resolution, low detail, bad quality, blurry"


@pytest.fixture(scope="module")
def released_v1(tmp_path_factory):
    """DIR with model_stage_c.pt (the prior, CLIP ViT-H width 48: other weights in state_dict than
    in ema_state_dict), model_stage_b.pt (Paella in the official layout + an EfficientNetV2-L
    effnet_state_dict, its values from a shared pool so that the file stays small),
    vqgan_f4_v1_500k.pt, and DIR/wuerstchen/text_encoder + tokenizer (the CLIP ViT-H both v1
    stages read)."""
    from stage_a import StageA, StageAConfig
    from stage_b_paella import PaellaConfig
    from stage_c import StageC, StageCConfig
    from test_stage_b import _random_state_dict
    from test_stage_b_paella import random_official
    root = tmp_path_factory.mktemp("released_v1")
    prior_cfg = StageCConfig(**PRIOR | {"c_cond": 48})
    ema, raw = randomize(StageC(prior_cfg), 11), randomize(StageC(prior_cfg), 12)
    torch.save({"state_dict": to_dome272(raw.state_dict()),
                "ema_state_dict": to_dome272(ema.state_dict())}, root / "model_stage_c.pt")
    with torch.device("meta"):
        effnet = stage_b.SemanticCompressor(stage_b.CompressorConfig("efficientnet_v2_l"))
    effnet_sd = _random_state_dict({k: v.shape for k, v in effnet.state_dict().items()}, 13)
    for k, v in effnet_sd.items():  # BatchNorms: the identity in eval mode
        if k.endswith("num_batches_tracked"):
            effnet_sd[k] = torch.tensor(0)
        elif k.endswith("running_var") or (k.endswith("weight") and v.dim() == 1):
            effnet_sd[k] = torch.ones_like(v)
        elif k.endswith(("running_mean", "bias")):
            effnet_sd[k] = torch.zeros_like(v)
    paella = random_official(PaellaConfig(**V1_PAELLA), 14)
    torch.save({"state_dict": paella, "effnet_state_dict": effnet_sd}, root / "model_stage_b.pt")
    vqgan = randomize(StageA(StageAConfig(c_hidden=32, bottleneck_blocks=1, codebook_size=64)), 15)
    codebook_renamed = {k.replace("vquantizer.embedding.", "vquantizer.codebook."): v
                        for k, v in vqgan.state_dict().items()}
    torch.save({"state_dict": codebook_renamed}, root / "vqgan_f4_v1_500k.pt")
    clip_text_model("decoder", 16).save_pretrained(root / "wuerstchen" / "text_encoder")
    write_tokenizer(str(root / "wuerstchen" / "tokenizer"), "!")
    return root, ema


@torch.no_grad()
def test_v1_chain_from_the_official_files(released_v1, tmp_path, monkeypatch, capsys):
    from stage_b_paella import Paella, PaellaConfig
    root, ema = released_v1
    pipe = sample.load_released(str(root), decoder_cfg=PaellaConfig(**V1_PAELLA))
    assert pipe.release == "v1" and pipe.image_size == 512
    assert pipe.latent_space == {"scale": 1.0, "shift": 0.0}  # v1's compressor gives the prior's y
    prior = pipe.loaders["stage_c"]()  # the file's EMA weights
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in prior.state_dict().items())
    # the compressor: EfficientNetV2-L read off the weights, returning v1's (e + 1) / 42
    compressor = pipe.loaders["compressor"]()
    assert compressor.cfg.backbone == "efficientnet_v2_l" and compressor.cfg.v1_scaling
    x = torch.rand(1, 3, 128, 128)
    e = compressor.mapper(compressor.features(x))
    torch.testing.assert_close(compressor(x), (e + 1) / 42)
    # an incomplete v1 folder names what is missing
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "model_stage_b.pt").symlink_to(root / "model_stage_b.pt")
    with pytest.raises(FileNotFoundError, match="missing: stage_c, stage_a, text_encoder"):
        sample.load_released(str(tmp_path / "v1"))
    # sample.py --pretrained DIR: the v1 notebook's settings, counted on the models' calls
    calls = {"stage_c": [], "stage_b": []}
    for name in calls:
        def counted(build=pipe.loaders[name], name=name):
            model = build()
            model.register_forward_hook(lambda m, args, kwargs, out: calls[name].append(
                kwargs["clip_text"]), with_kwargs=True)
            return model
        pipe.loaders[name] = counted
    monkeypatch.setattr(sample, "load_released", lambda *args, **kwargs: pipe)
    sample.main(sample.get_args(["--pretrained", str(root), "--prompt", "a cat", "--width", "128",
                                 "--height", "128", "--device", "cpu", "--out_dir", str(tmp_path)]))
    assert "the official Würstchen v1 files (Paella Stage B)" in capsys.readouterr().out
    assert (tmp_path / "samples_000.png").exists()
    text_folder = str(root / "wuerstchen" / "text_encoder")
    negative = TextEncoder("transformers", text_folder).encode([V1_NEGATIVE])
    # prior: 60 DDPM steps, Paella: 8 steps, both guided against the negative prompt
    assert len(calls["stage_c"]) == 60 and len(calls["stage_b"]) == 8
    guided = calls["stage_c"] + calls["stage_b"]
    assert all(len(c) == 2 and torch.equal(c[1:], negative) for c in guided)
    assert isinstance(pipe.loaders["stage_b"](), Paella)
    x = torch.rand(1, 3, 128, 128)  # --variation: V2-L -> Paella -> the VQGAN
    var = sample.image_variation(pipe, x, steps_b=2, progress=False)
    assert var.shape == x.shape and torch.isfinite(var).all()
