"""Fine-tuning released-layout weights (issue #15): `stage_c.py --pretrained DIR` (full and LoRA)
and `stage_b.py --pretrained DIR` on tiny random checkpoints exported with `sample.py --export`
(test_pretrained's `ours`), LoRA files that diffusers' WuerstchenPriorPipeline.load_lora_weights
reads, sample.py --lora / --stage_c over --pretrained, and the refusals: no weights offline, a LoRA
for another prior, a LoRA run resumed as a full one."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import shutil
import time

import pytest
import torch

import diffusion
import finetune
import pretrained
import sample
import stage_b
import stage_c
from cache import disk_cached
from common import load_checkpoint, run_cli
from diffusion import diffusion_loss
from finetune import LoRALinear, add_lora, merge_lora, read_lora, save_lora

from test_pretrained import ours, reference_pipelines  # noqa: F401  (fixtures)
from test_stage_c import overfit
from toy import write_toy_dataset

PROMPT = "a red circle on a blue background"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    """The tiny random chain exported in the released layout (sample.py --export), and a 24-image
    toy folder whose captions are not the toy vocabulary's (so the previews draw the 4 held-out
    captions, not 18 toy prompts)."""
    root = tmp_path_factory.mktemp("finetune")
    a, b, c = ours
    sample.main(sample.get_args(["--export", str(root / "export"), "--stage_a", a, "--stage_b", b,
                                 "--stage_c", c]))
    write_toy_dataset(root / "toy", n=24, size=128)
    for i, caption in enumerate(sorted((root / "toy").glob("*.txt"))):
        caption.write_text(f"shape number {i % 5}")
    return root


def run(script, root, out, *extra):
    """A tiny --pretrained run of stage_b.py or stage_c.py on the toy folder; returns its log."""
    script.train(script.get_args(["--data", str(root / "toy"), "--pretrained", str(root / "export"),
                                  "--model", "tiny", "--out_dir", str(out), "--batch_size", "4",
                                  "--num_workers", "0", "--num_holdout", "4", "--log_every", "1",
                                  "--steps_b", "2", "--device", "cpu",
                                  *(["--steps_c", "2"] if script is stage_c else []), *extra]))
    return (out / "log.txt").read_text()


def same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_stage_c_finetune_resumes_exactly_and_samples_with_theirs(exported, tmp_path):
    """Full fine-tune of the exported prior: a step-0 preview (the base), the frozen inputs cached
    on disk and read again on --resume, an interrupted run equal to a straight one, and sample.py
    combining the fine-tuned Stage C with the exported Stage B and A."""
    run(stage_c, exported, tmp_path / "straight", "--max_steps", "3")
    run(stage_c, exported, tmp_path / "resumed", "--max_steps", "2")
    log = run(stage_c, exported, tmp_path / "resumed", "--max_steps", "3", "--resume")
    assert "fine-tune" in log and "samples_0000000.png" in log  # the base's preview, before step 1
    assert "cache: wrote" in log and "cache: read" in log and "resumed from" in log
    straight = load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"), "stage_c")
    # fine-tuning: no EMA
    assert straight["lora"] is None and straight["train_config"]["ema_decay"] == 0
    base = stage_c.StageC.from_pretrained(str(exported / "export" / "wuerstchen-prior"
                                              / "prior")).state_dict()
    assert any(not torch.equal(base[k], v) for k, v in straight["model"].items())  # it trained
    same_tensors(straight["model"],
                 torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"])
    # --init scratch: a new prior of the preset's width in their latent space, with their text tower
    assert "from scratch" in run(stage_c, exported, tmp_path / "scratch", "--init", "scratch",
                                 "--max_steps", "1")
    scratch = load_checkpoint(str(tmp_path / "scratch" / "ckpt.pt"), "stage_c")
    assert scratch["model_config"] == dict(vars(stage_c.PRESETS["tiny"]["model"]), c_cond=64)
    assert scratch["latent_space"] == straight["latent_space"] == {"scale": 42, "shift": 1}
    # sample.py --pretrained DIR --stage_c ckpt: ours for Stage C, theirs for B and A
    args = ["--pretrained", str(exported / "export"),
            "--stage_c", str(tmp_path / "straight" / "ckpt.pt")]
    pipe = sample.open_pipeline(sample.get_args(args), torch.device("cpu"), torch.float32)
    assert pipe.stage_c is not None and pipe.stage_b is None and "stage_b" in pipe.loaders
    images = sample.text_to_image(pipe, [PROMPT], width=128, height=128, steps_c=2, steps_b=2,
                                  progress=False)
    assert images.shape == (1, 3, 128, 128) and torch.isfinite(images).all()


def test_lora_starts_at_the_base_trains_only_adapters_and_loads_in_diffusers(exported, tmp_path):
    """LoRA at step 0 is the base exactly; only the adapters get gradients; the saved file merged
    into the weights gives the adapted model's output; diffusers' prior pipeline, with the file
    through load_lora_weights, gives our images (sample.py --lora) within 1e-4; a LoRA for another
    prior is refused, naming both."""
    root = exported / "export"
    model = stage_c.StageC.from_pretrained(str(root / "wuerstchen-prior" / "prior"))
    x, t, text = torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 77, model.cfg.c_cond)
    base = model(x, t, text)
    names = add_lora(model, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=8)
    assert (len(names) == 4 * model.cfg.depth
            and all(isinstance(model.get_submodule(n), LoRALinear) for n in names))
    assert torch.equal(model(x, t, text), base)  # B = 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(3):
        loss = diffusion_loss(model, x, torch.Generator().manual_seed(0), clip_text=text)
        loss.backward()
        grads = {n for n, p in model.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads and all(".lora_" in n for n in grads)  # the base is frozen
        opt.step()
        opt.zero_grad()
    model.eval()
    adapted = model(x, t, text)
    assert (adapted - base).abs().max() > 1e-3
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_lora(path, model, "prior", "the test prior",
              {"rank": 4, "alpha": 8, "targets": ["to_q", "to_k", "to_v", "to_out.0"]})
    lora = read_lora(path)
    assert list(lora["models"]) == ["prior"]
    assert "blocks.2.attention.to_q" in lora["models"]["prior"]
    assert lora["made_for"] == "the test prior" and os.path.getsize(path) < 100_000
    merged = merge_lora(stage_c.StageC.from_pretrained(str(root / "wuerstchen-prior" / "prior")),
                        lora, "prior")
    torch.testing.assert_close(merged(x, t, text), adapted, rtol=1e-5, atol=1e-5)

    # diffusers and peft see the run's rank, alpha and targets (the file's header)
    from diffusers import WuerstchenPriorPipeline
    _, _, header = WuerstchenPriorPipeline.lora_state_dict(path, return_lora_metadata=True)
    assert header == {"prior.r": 4, "prior.lora_alpha": 8, "prior.rank_pattern": {},
                      "prior.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                      "prior.alpha_pattern": {}}
    # diffusers: the prior pipeline with load_lora_weights, then the decoder, vs sample.py --lora
    prior, decoder = reference_pipelines(root)
    prior.load_lora_weights(path)
    (config,) = prior.prior.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 8)
    g = torch.Generator().manual_seed(3)
    embeddings = prior(PROMPT, height=128, width=128, timesteps=diffusion.DEFAULT_STAGE_C_TIMESTEPS,
                       guidance_scale=4.0, generator=g, output_type="pt").image_embeddings
    ref = decoder(embeddings, PROMPT, num_inference_steps=12, generator=g, output_type="pt").images
    pipe = sample.open_pipeline(sample.get_args(["--pretrained", str(root), "--lora", path]),
                                torch.device("cpu"), torch.float32)
    ours_ = sample.text_to_image(pipe, [PROMPT], width=128, height=128, seed=3, progress=False)
    plain = sample.text_to_image(sample.load_released(str(root)), [PROMPT], width=128, height=128,
                                 seed=3, progress=False)
    assert (ours_ - ref).abs().max() < 1e-4 and (ours_ - plain).abs().max() > 1e-3

    other = stage_c.StageC(stage_c.StageCConfig(c=96, c_cond=64, depth=2, nhead=2))
    with pytest.raises(ValueError,
                       match=r"pytorch_lora_weights.safetensors \(made for the test prior\) does "
                             r"not fit the other prior: its layer prior.blocks.2.attention.to_. is "
                             r"\(64, 64\), here \(96, 96\)"):
        merge_lora(other, lora, "prior", what="the other prior")


def peft_lora_folders(root, out):
    """LoRA folders as diffusers users make them: peft adapters (random, so that they act) on the
    exported prior (r 4, alpha 12) and its text encoder (r 2, alpha 8, on q/k/v/out_proj), saved
    by WuerstchenPriorPipeline.save_lora_weights with their LoraConfig in the header ("meta"), and
    the same tensors without it ("bare": diffusers then reads alpha = r)."""
    from diffusers import WuerstchenPriorPipeline
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel
    torch.manual_seed(0)
    configs = {"prior": LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_k", "to_v",
                                                                       "to_out.0"],
                                   init_lora_weights=False),
               "text_encoder": LoraConfig(r=2, lora_alpha=8, init_lora_weights=False,
                                          target_modules=["q_proj", "k_proj", "v_proj",
                                                          "out_proj"])}
    prior = WuerstchenPrior.from_pretrained(root / "wuerstchen-prior" / "prior")
    prior.add_adapter(configs["prior"])
    text = inject_adapter_in_model(configs["text_encoder"], CLIPTextModel.from_pretrained(
        root / "wuerstchen-prior" / "text_encoder"))
    layers = dict(unet_lora_layers=get_peft_model_state_dict(prior),
                  text_encoder_lora_layers=get_peft_model_state_dict(text))
    WuerstchenPriorPipeline.save_lora_weights(
        out / "meta", **layers, unet_lora_adapter_metadata=configs["prior"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    WuerstchenPriorPipeline.save_lora_weights(out / "bare", **layers)
    return out / "meta", out / "bare"


@torch.no_grad()
def test_lora_files_of_diffusers_merge_as_diffusers_loads_them(exported, tmp_path):
    """A LoRA of the prior and its text encoder, made with peft and saved by diffusers, with its
    alpha in the header (alpha != r) and without (alpha = r), as a folder and as a file: --lora
    merges it into both models as diffusers' load_lora_weights + fuse_lora does (weights within
    1e-6 relative) and gives its image (1e-4); older key spellings read the same; a file for other
    models, or no LoRA file, is refused in one line."""
    from safetensors.torch import load_file, save_file

    from text_encoder import clip_text_to_transformers
    root = exported / "export"
    meta, bare = peft_lora_folders(root, tmp_path)
    for path in (str(meta), str(bare / finetune.LORA_FILE)):
        prior, decoder = reference_pipelines(root)
        base = {"prior": {k: v.clone() for k, v in prior.prior.state_dict().items()},
                "text": {k: v.clone() for k, v in prior.text_encoder.state_dict().items()}}
        prior.load_lora_weights(path)
        prior.fuse_lora(components=["prior", "text_encoder"])
        prior.unload_lora_weights()
        pipe = sample.open_pipeline(sample.get_args(["--pretrained", str(root), "--lora", path]),
                                    torch.device("cpu"), torch.float32)
        with sample.loaded(pipe, "stage_c", "text_encoder_c"):
            ours_ = {"prior": pipe.stage_c.state_dict(),
                     "text": {k.removeprefix("text_model."): v
                              for k, v in clip_text_to_transformers(pipe.text_encoder_c).items()}}
        for name, ref in (("prior", prior.prior.state_dict()),
                          ("text", prior.text_encoder.state_dict())):
            assert ours_[name].keys() >= ref.keys()
            for k, v in ref.items():
                assert (ours_[name][k] - v).norm() <= 1e-6 * v.norm(), (path, k)
            # the LoRA acts (alpha / r 3 and 4 with the header, 1 without)
            assert max((base[name][k] - v).norm() / v.norm() for k, v in ref.items()) > 0.1
        g = torch.Generator().manual_seed(3)
        embeddings = prior(PROMPT, height=128, width=128, generator=g, guidance_scale=4.0,
                           timesteps=diffusion.DEFAULT_STAGE_C_TIMESTEPS).image_embeddings
        ref = decoder(embeddings, PROMPT, generator=g, output_type="pt").images
        image = sample.text_to_image(pipe, [PROMPT], width=128, height=128, seed=3,
                                     progress=False)
        assert (image - ref).abs().max() < 1e-4, path
    # diffusers' older key spellings ('.lora.down.weight', '.lora_linear_layer.up.weight')
    tensors = load_file(bare / finetune.LORA_FILE)
    old = {k.replace(".lora_A.", ".lora.down.").replace("q_proj.lora_B.",
                                                        "q_proj.lora_linear_layer.up."): v
           for k, v in tensors.items()}
    save_file(old, tmp_path / "old.safetensors")
    read, again = read_lora(str(tmp_path / "old.safetensors")), read_lora(str(bare))
    assert read["models"].keys() == again["models"].keys() == {"prior", "text_encoder"}
    for model, layers in again["models"].items():
        for layer, (A, B, scale) in layers.items():
            A_, B_, scale_ = read["models"][model][layer]
            assert torch.equal(A, A_) and torch.equal(B, B_) and scale == scale_ == 1
    # refused in one line: a LoRA of other models (naming what it holds), a folder without one
    save_file({f"unet.{k.split('.', 1)[1]}": v for k, v in tensors.items()},
              tmp_path / "unet.safetensors")
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "unet.safetensors", r"holds LoRA layers for \{'unet': \d+\}"),
                          (tmp_path / "empty", "a folder must hold pytorch_lora_weights"),
                          (tmp_path / "none", "no such file or folder")):
        with pytest.raises(ValueError, match=message) as e:
            sample.open_pipeline(sample.get_args(["--pretrained", str(root), "--lora",
                                                  str(path)]), torch.device("cpu"), torch.float32)
        assert "\n" not in str(e.value)


def test_loss_falls_on_a_tiny_overfit_full_and_lora(exported):
    """The exported prior on one fixed batch (fixed t and noise): 30 AdamW steps more than halve the
    loss, all weights or LoRA adapters alone."""
    for lora, lr in ((False, 3e-3), (True, 3e-2)):
        model = stage_c.StageC.from_pretrained(str(exported / "export" / "wuerstchen-prior"
                                                   / "prior")).train()
        if lora:
            add_lora(model, ["to_q", "to_k", "to_v", "to_out.0", "channelwise.0", "channelwise.4"],
                     4, 4)
        losses = overfit(model, 30, lr)
        assert losses[-1] < 0.5 * losses[0], (lora, losses[::10])


def test_lora_run_resumes_exactly_and_refuses_the_other_kind(exported, tmp_path):
    """stage_c.py --lora_rank: the checkpoint holds the adapters only, the LoRA file is written next
    to it, an interrupted run equals a straight one, and resuming it as a full fine-tune (or
    sampling its checkpoint as a Stage C) is refused with what to do."""
    lora = ["--lora_rank", "2", "--lora_alpha", "4", "--max_steps"]
    run(stage_c, exported, tmp_path / "straight", *lora, "3")
    run(stage_c, exported, tmp_path / "resumed", *lora, "2")
    run(stage_c, exported, tmp_path / "resumed", *lora, "3", "--resume")
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert straight["lora"] == {"rank": 2, "alpha": 4,
                                "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
    assert straight["model"] and all(".lora_" in k for k in straight["model"])
    same_tensors(straight["model"],
                 torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"])
    assert (tmp_path / "straight" / finetune.LORA_FILE).exists()
    with pytest.raises(ValueError,
                       match="trained with --lora_rank 2, not 0: resume it as it was trained"):
        run(stage_c, exported, tmp_path / "straight", "--max_steps", "4", "--resume")
    with pytest.raises(ValueError, match=f"LoRA run's checkpoint .* --lora .*{finetune.LORA_FILE}"):
        stage_c.load_stage_c(str(tmp_path / "straight" / "ckpt.pt"))


def test_stage_b_finetune_keeps_the_compressor_and_reports_psnr(exported, tmp_path):
    """stage_b.py --pretrained on a folder without captions (a warning says the run is
    unconditional): held-out PSNR before (step 0) and after, the semantic compressor unchanged
    (Stage C's space stays), exact --resume; with --lora_rank a decoder LoRA that sample.py --lora
    merges into the exported decoder."""
    bare = exported / "bare"
    shutil.copytree(exported / "toy", bare, ignore=shutil.ignore_patterns("*.txt"))
    root = exported.parent / "bare_root"
    root.mkdir(exist_ok=True)
    for name in ("export", "toy"):
        if not (root / name).exists():
            os.symlink(exported / ("export" if name == "export" else "bare"), root / name)
    log = run(stage_b, root, tmp_path / "straight", "--max_steps", "2", "--sample_every", "2")
    assert "no image has a caption: the fine-tune will be unconditional" in log
    assert ("samples_0000000.png | held-out PSNR" in log
            and "samples_0000002.png | held-out PSNR" in log)
    run(stage_b, root, tmp_path / "resumed", "--max_steps", "1")
    run(stage_b, root, tmp_path / "resumed", "--max_steps", "2", "--resume")
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    same_tensors(straight["model"],
                 torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"])
    compressor = stage_b.SemanticCompressor.from_pretrained(str(exported / "export" / "wuerstchen" /
                                                                "semantic_compressor"))
    same_tensors(straight["compressor"], compressor.state_dict())
    assert straight["latent_space"] == {"scale": 42, "shift": 1}
    parts = stage_b.load_stage_b(str(tmp_path / "straight" / "ckpt.pt"))  # like any checkpoint
    assert parts["stage_b"].cfg.c_hidden == (32, 64, 128)

    # (alpha / r = 1000: the update of 2 steps at this low lr stands well above float32 rounding)
    log = run(stage_b, root, tmp_path / "lora", "--max_steps", "2", "--lora_rank", "2",
              "--lora_alpha", "2000", "--lr", "1e-5")
    assert "warning: --lr 1e-05 is over 10x below the fine-tuning default 0.001" in log
    path = str(tmp_path / "lora" / finetune.LORA_FILE)
    assert list(read_lora(path)["models"]) == ["decoder"]
    # merged into the exported decoder at each load: W + (alpha / r) B A where the file adapts,
    # the exported weights elsewhere
    pipe = sample.open_pipeline(sample.get_args(["--pretrained", str(exported / "export"),
                                                 "--lora", path]),
                                torch.device("cpu"), torch.float32)
    base = stage_b.StageB.from_pretrained(str(exported / "export" / "wuerstchen" / "decoder"))
    updates = {layer + ".weight": scale * B @ A
               for layer, (A, B, scale) in read_lora(path)["models"]["decoder"].items()}
    assert updates and min(u.abs().max() for u in updates.values()) > 1e-4  # it trained
    with sample.loaded(pipe, "stage_b"):
        merged = pipe.stage_b.state_dict()
    for k, w in base.state_dict().items():
        expected = w + updates[k] if k in updates else w
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-7, msg=k)
        assert (k in updates) == (not torch.equal(merged[k], w)), k


def test_no_weights_offline_fails_at_once(tmp_path, monkeypatch, capsys):
    """Without a folder and with an empty Hugging Face cache, both training scripts stop at once
    with sample.py --pretrained's message naming the files; a folder without a semantic compressor
    names it."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    write_toy_dataset(tmp_path / "toy", n=4, size=128)
    for script in (stage_c, stage_b):
        t0 = time.time()
        with pytest.raises(SystemExit) as exit_:  # a user's mistake: status 2
            run_cli(script.train, script.get_args(["--data", str(tmp_path / "toy"), "--pretrained",
                                                   "--out_dir", str(tmp_path / "out")]))
        assert exit_.value.code == 2 and time.time() - t0 < 2
        assert "hf download warp-ai/wuerstchen-prior --local-dir DIR/wuerstchen-prior" in \
            capsys.readouterr().err
    (tmp_path / "w").mkdir()
    with pytest.raises(FileNotFoundError,
                       match="(?s)missing: stage_c, stage_b, stage_a, compressor.*hf download "
                             "dome272/wuerstchen model_v2_stage_b.pt"):
        pretrained.find_released(str(tmp_path / "w"), compressor=True)


def test_disk_cache_is_keyed_by_what_produced_it(tmp_path):
    from common import setup_runtime
    rt, calls = setup_runtime("cpu"), []

    def build():
        calls.append(1)
        return {"x": torch.arange(3)}
    first = disk_cached(str(tmp_path / "c"), {"data": "a"}, build, rt)
    again = disk_cached(str(tmp_path / "c"), {"data": "a"}, build, rt)
    other = disk_cached(str(tmp_path / "c"), {"data": "b"}, build, rt)
    assert (first[2] and not again[2] and other[2] and len(calls) == 2
            and first[1] == again[1] != other[1])
    assert torch.equal(again[0]["x"], torch.arange(3))
