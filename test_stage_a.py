"""Stage A tests: architecture and parity with the reference VQGAN, training, resume after SIGKILL,
bad data, tar shards. (Two-node torchrun: test_smoke.py, for every stage.)"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import stage_a
from common import load_checkpoint, save_checkpoint
from stage_a import PRESETS, StageA, StageAConfig
from toy import write_toy_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--model", "tiny", "--device", "cpu", "--num_workers", "0", "--image_size", "64",
        "--batch_size", "4", "--log_every", "1", "--sample_every", "2", "--num_holdout", "4",
        "--disc_start", "1"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(str(root), n=48, size=64, seed=0)
    return str(root)


def randomize(module, seed=0):
    """Random values everywhere (zero-initialised gammas would make every block the identity, parity
    trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if p.is_floating_point():
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5 if "running_var" in name
                        else torch.randn(p.shape, generator=g) * 0.2)


def test_paper_parameter_count():
    assert sum(p.numel() for p in StageA(PRESETS["paper"]["model"]).parameters()) == 18_406_894


def assert_parity(ours, ref):
    """fp32 parity up to rounding: 1e-5 relative, plus 1e-5 of the output's largest magnitude.
    These random weights give outputs up to ~400, where one float32 ulp is 3e-5 and the reference
    itself is 4e-4 off a float64 run, so a plain atol=1e-5 would demand bit-identical arithmetic
    (ruling out channels_last memory or MixBlock's fused modulations, which bench.py measures as
    speed-ups)."""
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("config", [
    dict(),  # the released architecture
    dict(embed_dim=96, levels=2, bottleneck_blocks=3, latent_channels=4, num_vq_embeddings=256,
         scale_factor=0.5),
])
def test_parity_with_reference(tmp_path, config):
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    ref = PaellaVQModel(**config).eval()
    randomize(ref)
    ref.save_pretrained(tmp_path)
    ours = StageA.from_pretrained(str(tmp_path))
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = ref.encode(x).latents
        assert_parity(ours.encode(x), h / ref.config.scale_factor)
        latents = torch.randn(2, 4, 8, 12)
        assert_parity(ours.decode(latents), ref.decode(latents * ref.config.scale_factor).sample)
        quantized = ref.decode(latents * ref.config.scale_factor, force_not_quantize=False).sample
        assert_parity(ours.decode(latents, quantize=True), quantized)
    # the official .pt layout: same weights, codebook under its old name
    sd = {k.replace("vquantizer.embedding.", "vquantizer.codebook."): v
          for k, v in ref.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "vqgan.pt")
    ours_pt = StageA.from_pretrained(str(tmp_path / "vqgan.pt"))
    with torch.no_grad():
        assert_parity(ours_pt.decode_raw(latents), ref.decode(latents).sample)


def test_shapes_and_quantizer():
    model = StageA(StageAConfig(c_hidden=32, bottleneck_blocks=1, codebook_size=64))
    x = torch.rand(2, 3, 32, 48)
    recon, vq_loss, idx = model(x)
    assert recon.shape == x.shape and idx.shape == (2, 8, 12) and torch.isfinite(vq_loss)
    z = model.encode(x)
    assert z.shape == (2, 4, 8, 12)
    # quantised latents lie on the codebook (after undoing the scale)
    q = model.encode(x, quantize=True) * model.cfg.scale_factor
    codes = model.vquantizer.embedding.weight
    assert torch.cdist(q.permute(0, 2, 3, 1).reshape(-1, 4), codes).min(1).values.max() < 1e-4


def test_mixblock_compiles_and_matches_eager():
    """`--compile` trains: torch.compile of a mixing block on channels-last input, forward and
    backward (torch 2.14's compiled replication-pad backward rejects channels-last strides; MixBlock
    pads differently there)."""
    torch.manual_seed(0)
    block = stage_a.MixBlock(8, 16)
    with torch.no_grad():
        block.gammas.normal_()  # 0 at init would make the padded path irrelevant
    x = torch.randn(2, 8, 6, 5).to(memory_format=torch.channels_last).requires_grad_()
    eager_out = block(x)
    (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), x)
    compiled_out = torch.compile(block, dynamic=False)(x)
    (compiled_grad,) = torch.autograd.grad(compiled_out.square().sum(), x)
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=1e-5)


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = StageA(StageAConfig(c_hidden=32, bottleneck_blocks=1, codebook_size=64))
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=32, mode="bilinear")  # smooth
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        recon, vq_loss, _ = model(x)
        loss = torch.nn.functional.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(torch.nn.functional.mse_loss(recon, x).item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_train_writes_checkpoint_grid_and_resumes_exactly(toy, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # a dead-code restart after the resume point draws from the restored RNG
    restart = ["--restart_every", "3"]
    stage_a.train(stage_a.get_args(["--data", toy, "--out_dir", str(a), "--max_steps", "4",
                                    "--save_every", "4"] + restart + FAST))
    stage_a.train(stage_a.get_args(["--data", toy, "--out_dir", str(b), "--max_steps", "2",
                                    "--save_every", "2"] + restart + FAST))
    stage_a.train(stage_a.get_args(["--data", toy, "--out_dir", str(b), "--max_steps", "4",
                                    "--save_every", "4", "--resume"] + restart + FAST))
    # runs never change a preset
    assert PRESETS["tiny"]["model"] == StageAConfig(c_hidden=64, bottleneck_blocks=2,
                                                    codebook_size=1024, disc_c_hidden=64,
                                                    disc_depth=3)
    ck_a, ck_b = (load_checkpoint(str(a / "ckpt.pt"), "stage_a"),
                  load_checkpoint(str(b / "ckpt.pt"), "stage_a"))
    assert ck_a["step"] == ck_b["step"] == 4
    for k in ck_a["model"]:  # an interrupted + resumed run equals an uninterrupted one
        torch.testing.assert_close(ck_a["model"][k], ck_b["model"][k], msg=k)
    assert (a / "samples_0000004.png").exists() and "held-out PSNR" in (a / "log.txt").read_text()
    model = StageA(StageAConfig(**ck_a["model_config"]))
    model.load_state_dict(ck_a["ema"])  # the checkpoint alone rebuilds the model
    assert 0.01 < ck_a["model_config"]["scale_factor"] < 100


def test_ema_batchnorm_has_the_statistics_of_its_own_weights(toy, tmp_path):
    """The EMA averages parameters; its BatchNorm running statistics must be those of the EMA
    encoder's own activations on the training images, not the raw model's (issue #13: a pink
    background in every sample)."""
    from data import ImageFolder, split_holdout
    out = tmp_path / "bn"
    stage_a.train(stage_a.get_args(["--data", toy, "--out_dir", str(out), "--max_steps", "6",
                                    "--save_every", "6", "--lr", "1e-2", "--gan_weight", "0"]
                                   + FAST))  # raw and EMA weights drift apart
    ckpt = load_checkpoint(str(out / "ckpt.pt"), "stage_a")
    ema, raw = (StageA(StageAConfig(**ckpt["model_config"])),
                StageA(StageAConfig(**ckpt["model_config"])))
    ema.load_state_dict(ckpt["ema"])
    raw.load_state_dict(ckpt["model"])
    trainset, _ = split_holdout(ImageFolder(toy, 64, verbose=False), 4)
    # every training image (44 < one batch)
    x = torch.stack([trainset[i][0] for i in range(len(trainset))])
    with torch.no_grad():
        conv, bn = ema.down_blocks[-1]
        h = conv(ema.down_blocks[:-1](ema.in_block(x)))  # (N, 4, 16, 16): what BatchNorm normalises
    mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3))  # unbiased, as BatchNorm's running_var
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-4 * var.sqrt().max().item())
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=0)
    raw_bn = raw.down_blocks[-1][1]  # the statistics the EMA copied before the fix were far off
    assert (not torch.allclose(raw_bn.running_var, var, rtol=0.1)
            or not torch.allclose(raw_bn.running_mean, mean, atol=0.1 * var.sqrt().max()))


def test_wrong_and_missing_checkpoint(tmp_path):
    save_checkpoint(str(tmp_path / "b.pt"), {"stage": "stage_b"})
    with pytest.raises(ValueError, match="stage_b checkpoint.*stage_a checkpoint was expected"):
        load_checkpoint(str(tmp_path / "b.pt"), "stage_a")
    with pytest.raises(FileNotFoundError, match="python stage_a.py"):
        load_checkpoint(str(tmp_path / "nope.pt"), "stage_a")


# Runs stage_a.py with torch.save writing half of the 3rd checkpoint, flushed, then SIGKILL: the
# process dies inside the write, as a kill or a power cut would catch it
KILLED_MID_SAVE = """
import io, os, runpy, signal, sys
import torch
save, saves = torch.save, []
def half_then_kill(obj, f, *args, **kwargs):
    saves.append(f)
    if len(saves) < 3:
        return save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    save(obj, buffer)
    with open(f, "wb") as out:
        out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        out.flush()
        os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_kill
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_mid_save_then_resume(toy, tmp_path):
    """Killed inside the write of its 3rd checkpoint, a run leaves the 2nd whole (the new one goes
    to a temporary file, renamed over it once complete), and --resume continues from it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", KILLED_MID_SAVE, os.path.join(HERE, "stage_a.py"), "--data", toy,
           "--out_dir", str(out), "--save_every", "1", "--max_steps", "1000"] + FAST
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=HERE,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpt = out / "ckpt.pt"
    assert load_checkpoint(str(ckpt), "stage_a")["step"] == 2  # whole: it loads
    stage_a.train(stage_a.get_args(["--data", toy, "--out_dir", str(out), "--max_steps", "4",
                                    "--save_every", "100", "--resume"] + FAST))
    assert load_checkpoint(str(ckpt), "stage_a")["step"] == 4
    assert f"resumed from {ckpt} at step 2" in (out / "log.txt").read_text()


def test_bad_files_are_skipped_and_counted(toy, tmp_path, capsys):
    import shutil
    data = tmp_path / "messy"
    shutil.copytree(toy, data / "good")
    (data / "empty.png").write_bytes(b"")
    (data / "text.jpg").write_text("not an image")
    raw = open(os.path.join(toy, "00000.png"), "rb").read()
    (data / "truncated.png").write_bytes(raw[: len(raw) // 2])
    Image.new("L", (80, 64), 128).save(data / "gray.png")
    Image.new("RGBA", (64, 80), (255, 0, 0, 128)).save(data / "rgba.png")
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(data / "cmyk.jpg")
    stage_a.train(stage_a.get_args(["--data", str(data), "--out_dir", str(tmp_path / "o"),
                                    "--max_steps", "2"] + FAST))
    out = capsys.readouterr().out
    assert "skipped" in out and ("3 unreadable" in out or "skipped 3" in out), out
    assert (tmp_path / "o" / "ckpt.pt").exists()


def test_shards_train_and_resume_exactly(toy, tmp_path):
    """--data as tar shards, read by 2 loader workers: an interrupted run (3 steps, then --resume to
    4) equals an uninterrupted one; the checkpoint holds the stream's position."""
    from data import write_shards
    shards = write_shards(toy, str(tmp_path / "shards"), per_shard=12)
    argv = ["--data", str(tmp_path / "shards"), "--num_workers", "2", "--shuffle_buffer", "8"]
    def run(out, steps, *extra):
        flags = ["--max_steps", str(steps), "--save_every", str(steps), *extra]
        stage_a.train(stage_a.get_args(FAST + argv + ["--out_dir", str(tmp_path / out)] + flags))

    run("a", 4)
    run("b", 3)
    assert load_checkpoint(str(tmp_path / "b" / "ckpt.pt"), "stage_a")["data"]["turn"] == 1
    run("b", 4, "--resume")
    ck_a, ck_b = (load_checkpoint(str(tmp_path / d / "ckpt.pt"), "stage_a") for d in "ab")
    for k in ck_a["model"]:
        torch.testing.assert_close(ck_a["model"][k], ck_b["model"][k], msg=k)
    assert len(shards) == 4 and sorted(ck_a["data"]["cursors"]) == [0, 1]


def test_a_vqgan_it_cannot_build_is_refused_by_name(tmp_path):
    """A PaellaVQModel config outside what StageA builds gets a message, not a bare assert."""
    import json

    from common import UsageError
    (tmp_path / "config.json").write_text(json.dumps({"up_down_scale_factor": 4}))
    with pytest.raises(UsageError, match="up_down_scale_factor 2 .* not 4 and 3 -> 3"):
        StageA.from_pretrained(str(tmp_path))
