"""The whole chain on CPU, as a user runs it: toy data -> Stage A -> Stage B -> Stage C (2 steps
each, tiny presets, random text towers) -> sample.py. Checks what sample.py promises: sizes, seeds,
prompts, the variation / image-to-image / reconstruction paths, size rounding, and clear errors for
wrong or missing checkpoints. Then every stage again on top of that chain: two-node torchrun and a
resume on one process, aspect-ratio buckets, and the non-finite guard."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import sample
import stage_a
import stage_b
import stage_c
import toy
from common import NonFiniteError, load_checkpoint
from data import ImageFolder
from images import bucket_sizes
from toy import make_toy_image, write_toy_dataset

HERE = os.path.dirname(os.path.abspath(__file__))

COMMON = ["--model", "tiny", "--device", "cpu", "--num_workers", "0", "--max_steps", "2",
          "--batch_size", "4", "--num_holdout", "4", "--log_every", "1", "--sample_every", "2",
          "--save_every", "2"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    data, out = str(root / "toy"), root / "out"
    write_toy_dataset(data, n=40, size=128, seed=0)
    a, b, c = (str(out / s / "ckpt.pt") for s in ("stage_a", "stage_b", "stage_c"))
    stage_a.train(stage_a.get_args(["--data", data, "--out_dir", str(out / "stage_a")] + COMMON))
    stage_b.train(stage_b.get_args(["--data", data, "--out_dir", str(out / "stage_b"),
                                    "--stage_a", a, "--steps_b", "2"] + COMMON))
    stage_c.train(stage_c.get_args(["--data", data, "--out_dir", str(out / "stage_c"),
                                    "--stage_a", a, "--stage_b", b, "--steps_c", "2",
                                    "--steps_b", "2"] + COMMON))
    pipe = sample.load_pipeline(a, b, c, "cpu")
    return dict(root=root, data=data, a=a, b=b, c=c, pipe=pipe)


FAST = dict(steps_c=3, steps_b=2, progress=False)


def test_each_stage_left_a_checkpoint_and_a_grid(chain):
    for stage in ("stage_a", "stage_b", "stage_c"):
        folder = chain["root"] / "out" / stage
        assert (folder / "samples_0000002.png").exists() and (folder / "log.txt").exists()
        assert load_checkpoint(str(folder / "ckpt.pt"), stage)["step"] == 2


def test_text_to_image_size_seed_and_prompt(chain):
    pipe = chain["pipe"]
    img = sample.text_to_image(pipe, ["a red circle on a blue background"], width=256, height=128,
                               seed=1, **FAST)
    assert img.shape == (1, 3, 128, 256) and img.min() >= 0 and img.max() <= 1
    again = sample.text_to_image(pipe, ["a red circle on a blue background"], width=256,
                                 height=128, seed=1, **FAST)
    assert torch.equal(img, again)  # same seed, same pixels
    other_seed = sample.text_to_image(pipe, ["a red circle on a blue background"], width=256,
                                      height=128, seed=2, **FAST)
    assert not torch.equal(img, other_seed)
    other_prompt = sample.text_to_image(pipe, ["a green square on a white background"], width=256,
                                        height=128, seed=1, **FAST)
    assert not torch.equal(img, other_prompt)
    two = sample.text_to_image(pipe, ["a", "b"], n=2, width=128, height=128, **FAST)
    assert two.shape == (4, 3, 128, 128)


def test_size_rounding_is_reported():
    assert sample.round_size(1024, 1024) == (1024, 1024, (24, 24), None)
    assert sample.round_size(128, 128)[:3] == (128, 128, (3, 3))
    w, h, hw, note = sample.round_size(1000, 1100)
    assert (w, h, hw) == (1024, 1152, (27, 24)) and "rounded to 1024x1152" in note
    assert sample.round_size(1536, 1024)[:3] == (1536, 1024, (24, 36))  # (h, w)


def test_variation_image_to_image_reconstruction(chain):
    pipe = chain["pipe"]
    x = torch.stack([ImageFolder(chain["data"], 128, verbose=False)[i][0] for i in range(2)])
    var = sample.image_variation(pipe, x, steps_b=2, progress=False)
    assert var.shape == x.shape and torch.isfinite(var).all()
    i2i = sample.image_to_image(pipe, x, ["a red circle on a blue background"] * 2, strength=0.5,
                                **FAST)
    assert i2i.shape == x.shape and torch.isfinite(i2i).all()
    rec = sample.stage_a_reconstruction(pipe, x)
    assert rec.shape == x.shape and 0 <= rec.min() and rec.max() <= 1


def test_cli_writes_grid_and_images(chain, tmp_path, capsys):
    out = tmp_path / "samples"
    sample.main(sample.get_args(["--stage_a", chain["a"], "--stage_b", chain["b"],
                                 "--stage_c", chain["c"], "--prompt",
                                 "a red circle on a blue background", "--n", "2", "--width", "130",
                                 "--height", "128", "--steps_c", "2", "--steps_b", "2",
                                 "--device", "cpu", "--out_dir", str(out)]))
    printed = capsys.readouterr().out
    assert "size 130x128 rounded to 128x128" in printed
    assert (out / "samples.png").exists() and (out / "samples_001.png").exists()


def test_variation_and_reconstruction_default_to_the_training_size(chain, tmp_path):
    """Without --width / --height the size is the training size of the checkpoints loaded (128 px):
    Stage B's for --variation, Stage A's for --reconstruct, which load no Stage C (they took 1024 px
    before)."""
    from PIL import Image
    image = os.path.join(chain["data"], "00000.png")
    for flag, name in (("--variation", "samples_000"), ("--reconstruct", "reconstruct_000")):
        out = str(tmp_path / flag)
        sample.main(sample.get_args([flag, image, "--stage_a", chain["a"], "--stage_b", chain["b"],
                                     "--steps_b", "2", "--device", "cpu", "--out_dir", out]))
        assert Image.open(tmp_path / flag / f"{name}.png").size == (128, 128)


def test_image_inputs_take_every_sampling_flag(chain, tmp_path, capsys):
    """--variation / --init_image honour --width/--height (non-square), --n (per input image) and
    pair several prompts with one image; --variation passes --prompt to Stage B; --eval_toy samples
    at --width/--height; --width alone gives a square. (Each was ignored before.)"""
    from PIL import Image
    image = os.path.join(chain["data"], "00000.png")
    ckpts = ["--stage_a", chain["a"], "--stage_b", chain["b"], "--stage_c", chain["c"],
             "--steps_c", "2", "--steps_b", "2", "--device", "cpu"]
    two = ["--prompt", "a red circle on a blue background", "--prompt", "a green square on a "
           "white background"]
    for flags, n_out in ((["--variation", image, "--n", "2"], 2),
                         (["--variation", image, "--n", "2"] + two, 4),
                         (["--init_image", image, "--n", "2"] + two, 4)):
        out = tmp_path / flags[0] / str(n_out)
        sample.main(sample.get_args(flags + ckpts + ["--width", "256", "--height", "128",
                                                     "--out_dir", str(out)]))
        assert Image.open(out / "samples_000.png").size == (256, 128)
        assert (out / f"samples_{n_out - 1:03d}.png").exists()
        assert not (out / f"samples_{n_out:03d}.png").exists()
    x = sample.read_images([image], 128, 128)
    captioned = [sample.image_variation(chain["pipe"], x, [p], seed=1, steps_b=2, progress=False)
                 for p in ("a red circle on a blue background", "")]
    assert not torch.equal(*captioned)  # Stage B reads the prompt
    out = tmp_path / "eval"
    sample.main(sample.get_args(["--eval_toy", "--n", "1", "--width", "256", "--out_dir", str(out)]
                                + ckpts))
    assert Image.open(out / "eval_toy_000.png").size == (256, 256)  # --height: as --width


def test_wrong_and_missing_checkpoints_are_refused(chain, tmp_path):
    with pytest.raises(ValueError,
                       match="stage_a checkpoint, but a stage_b checkpoint was expected"):
        sample.load_pipeline(chain["a"], chain["a"], chain["c"], "cpu")
    with pytest.raises(ValueError,
                       match="stage_b checkpoint, but a stage_c checkpoint was expected"):
        sample.load_pipeline(chain["a"], chain["b"], chain["b"], "cpu")
    with pytest.raises(FileNotFoundError, match="python stage_c.py --data DIR"):
        sample.load_pipeline(chain["a"], chain["b"], str(tmp_path / "missing.pt"), "cpu")


@pytest.mark.parametrize("script", [stage_a, stage_b, stage_c])
def test_help_names_preset_defaults(script, capsys):
    with pytest.raises(SystemExit):
        script.get_args(["-h"])
    text = capsys.readouterr().out
    assert "default: None" not in text and "(default: per preset)" in text


def test_files_that_are_not_checkpoints_get_one_clear_line(chain, tmp_path):
    import random
    import subprocess
    import sys

    from safetensors.torch import save_file
    # seeded: on some random bytes torch.load raises an IndexError instead (~1 run in 5 of urandom)
    (tmp_path / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    good = open(chain["c"], "rb").read()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "diffusers_folder").mkdir()
    for name in ("random.pt", "truncated.pt", "weights.safetensors", "diffusers_folder"):
        with pytest.raises(ValueError) as e:
            load_checkpoint(str(tmp_path / name), "stage_c")
        message = str(e.value)
        assert name in message and "a stage_c checkpoint (written by `python stage_c.py" in message
        assert "weights_only=False" not in message and "\n" not in message
    # the scripts print that line alone (no traceback) and exit non-zero
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, os.path.join(here, "sample.py"), "--stage_a", chain["a"],
                          "--stage_b", chain["b"], "--stage_c", str(tmp_path / "random.pt"),
                          "--prompt", "x", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, cwd=here)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"sample.py: error: {tmp_path / 'random.pt'} cannot be read as a checkpoint "
        f"(UnpicklingError); a stage_c checkpoint (written by `python stage_c.py --data DIR`) "
        f"was expected"], res.stderr


def test_flags_that_do_not_go_together_get_one_clear_line(chain, tmp_path):
    """A user's mistake raised as common.UsageError (a ValueError) prints its message alone, as
    checkpoint errors do (a traceback came first before)."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, os.path.join(here, "stage_c.py"), "--data",
                          chain["data"], "--model", "tiny", "--lora_rank", "4", "--device", "cpu",
                          "--out_dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=here)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        "stage_c.py: error: --lora_rank adapts a pretrained prior: give --pretrained [DIR] (and "
        "no --init scratch)"], res.stderr

# ---- every stage on top of the chain: multi-node, buckets, the non-finite guard

STAGES = {"stage_a": stage_a, "stage_b": stage_b, "stage_c": stage_c}


def stage_argv(chain, stage, out, *extra):
    """`stage`'s flags for a tiny run on the chain's toy data (B and C on the chain's A and B), then
    `extra`."""
    deps = {"stage_a": ["--disc_start", "1"],
            "stage_b": ["--stage_a", chain["a"], "--steps_b", "2"],
            "stage_c": ["--stage_a", chain["a"], "--stage_b", chain["b"], "--steps_c", "2",
                        "--steps_b", "2"]}
    return ["--data", chain["data"], "--out_dir", str(out)] + COMMON + deps[stage] + list(extra)


@pytest.mark.parametrize("stage", STAGES)
def test_two_node_torchrun_then_resume_on_one_process(chain, stage, tmp_path):
    """Two torchrun agents meeting at a c10d rendezvous (two processes on this machine standing for
    two nodes, gloo on the CPU) train 2 steps; then a single process resumes (another world size:
    same global batch and data order)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    argv = stage_argv(chain, stage, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "test",
           os.path.join(HERE, f"{stage}.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=HERE) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert not any("Grad strides do not match" in o or "Traceback" in o for o in outputs)
    log = (tmp_path / "log.txt").read_text()
    assert "world 2" in log and "step      2/2" in log
    assert len(load_checkpoint(str(tmp_path / "ckpt.pt"), stage)["rng"]) == 2  # both ranks' streams
    more = ["--max_steps", "3", "--save_every", "3", "--resume"]
    STAGES[stage].train(STAGES[stage].get_args(argv + more))
    log = (tmp_path / "log.txt").read_text()
    assert f"resumed from {tmp_path / 'ckpt.pt'} at step 2" in log
    assert "world 1" in log and "step      3/3" in log
    assert load_checkpoint(str(tmp_path / "ckpt.pt"), stage)["step"] == 3


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """12 captioned toy images at three aspect ratios: 4 square, 4 tall (1:4), 4 wide (4:1)."""
    import random
    root = tmp_path_factory.mktemp("mixed")
    rng = random.Random(0)
    for i in range(12):
        size = [(160, 160), (80, 320), (320, 80)][i % 3]
        make_toy_image("red", "circle", "blue", 160, rng).resize(size).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text("a red circle on a blue background")
    return str(root)


@pytest.mark.parametrize("stage", STAGES)
def test_buckets_train_every_stage(chain, mixed, stage, tmp_path, capsys, monkeypatch):
    """--buckets at 256 px: 128x512, 256x256 and 512x128 batches (a mixed batch would not even
    stack), the caches of Stages B and C per size, Stage C previews at every size, its toy
    accuracy read on the main grid (not on the last size's row of 6)."""
    read, toy_read = [], toy.toy_prompt_following
    monkeypatch.setattr(stage_c, "toy_prompt_following", lambda images, targets, look:
                        read.append((len(images), len(targets))) or toy_read(images, targets, look))
    argv = stage_argv(chain, stage, tmp_path, "--data", mixed, "--image_size", "256",
                      "--buckets", "4")
    cache = [] if stage == "stage_a" else ["--cache"]  # Stage A has no cache
    STAGES[stage].train(STAGES[stage].get_args(argv + cache))
    assert "buckets 128x512: 4, 256x256: 4, 512x128: 4" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "ckpt.pt"), stage)["step"] == 2
    if stage == "stage_c":
        log = (tmp_path / "log.txt").read_text()
        assert "semantic latents (16, 3, 12), (16, 6, 6), (16, 12, 3)" in log
        for name in ("", "_128x512", "_512x128"):
            assert (tmp_path / f"samples_0000002{name}.png").exists(), name
        with Image.open(tmp_path / "samples_0000002_512x128.png") as grid:
            assert grid.width > grid.height
        assert read and all(n == m == 18 for n, m in read), read  # 18 toy prompts


def test_sampling_at_every_bucket_size(chain):
    for w, h in bucket_sizes(256, 4) + bucket_sizes(512):
        img = sample.text_to_image(chain["pipe"], ["a red circle on a blue background"], width=w,
                                   height=h, **FAST)
        assert img.shape == (1, 3, h, w) and torch.isfinite(img).all()


@pytest.mark.parametrize("stage", STAGES)
def test_nonfinite_steps_are_skipped_and_stop_the_run(chain, stage, tmp_path, monkeypatch):
    """NaN images (Stage C: cached latents) at steps 2, 4 and 5: step 2 is skipped and counted, 4
    and 5 in a row stop the run (--max_nonfinite 2), and the checkpoint on disk is finite, with the
    weights of step 3."""
    module, poisoned, saved = STAGES[stage], {2, 4, 5}, []
    make_batches, save = module.resume_batches, module.save_checkpoint

    class Poisoned:
        def __init__(self, batches):
            self.batches, self.step = batches, 0

        def __next__(self):
            batch, self.step = next(self.batches), self.step + 1
            if self.step in poisoned:
                batch[0] = torch.full_like(batch[0], float("nan"))
            return batch

        def __getattr__(self, name):
            return getattr(self.batches, name)

    def keep_and_save(path, ckpt):
        saved.append({k: v.clone() for k, v in ckpt["model"].items()})
        save(path, ckpt)

    monkeypatch.setattr(module, "resume_batches", lambda *a, **k: Poisoned(make_batches(*a, **k)))
    monkeypatch.setattr(module, "save_checkpoint", keep_and_save)
    ckpt_path = tmp_path / "ckpt.pt"
    stop = rf"stopping at step 5: 2 steps in a row .*\(3 in all\).*{ckpt_path} \(step 4\)"
    with pytest.raises(NonFiniteError, match=stop):
        module.train(module.get_args(stage_argv(chain, stage, tmp_path, "--max_steps", "10",
                                                "--save_every", "1", "--max_nonfinite", "2")))
    log = (tmp_path / "log.txt").read_text()
    assert "| skipped 1 |" in log.split("step      2/10")[1].split("\n")[0]
    assert load_checkpoint(str(ckpt_path), stage)["step"] == 4  # saved without complaint: finite
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(saved, saved[1:])]  # 1->2...
    assert same == [True, False, True]  # steps 2 and 4 changed nothing, step 3 trained
