"""The whole chain on CPU, as a user runs it: toy data -> Stage A -> Stage B -> Stage C (2 steps each, tiny
presets, random text towers) -> sample.py. Checks what sample.py promises: sizes, seeds, prompts, the variation /
image-to-image / reconstruction paths, size rounding, and clear errors for wrong or missing checkpoints."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
import pytest
import torch

import sample
from common import load_checkpoint
import stage_a
import stage_b
import stage_c
from data import ImageFolder, write_toy_dataset

COMMON = ["--model", "tiny", "--device", "cpu", "--num_workers", "0", "--max_steps", "2", "--batch_size", "4",
          "--num_holdout", "4", "--log_every", "1", "--sample_every", "2", "--save_every", "2"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    data, out = str(root / "toy"), root / "out"
    write_toy_dataset(data, n=40, size=128, seed=0)
    a, b, c = (str(out / s / "ckpt.pt") for s in ("stage_a", "stage_b", "stage_c"))
    stage_a.train(stage_a.get_args(["--data", data, "--out_dir", str(out / "stage_a")] + COMMON))
    stage_b.train(stage_b.get_args(["--data", data, "--out_dir", str(out / "stage_b"), "--stage_a", a,
                                    "--steps_b", "2"] + COMMON))
    stage_c.train(stage_c.get_args(["--data", data, "--out_dir", str(out / "stage_c"), "--stage_a", a,
                                    "--stage_b", b, "--steps_c", "2", "--steps_b", "2"] + COMMON))
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
    img = sample.text_to_image(pipe, ["a red circle on a blue background"], width=256, height=128, seed=1, **FAST)
    assert img.shape == (1, 3, 128, 256) and img.min() >= 0 and img.max() <= 1
    again = sample.text_to_image(pipe, ["a red circle on a blue background"], width=256, height=128, seed=1, **FAST)
    assert torch.equal(img, again)  # same seed, same pixels
    other_seed = sample.text_to_image(pipe, ["a red circle on a blue background"], width=256, height=128, seed=2, **FAST)
    assert not torch.equal(img, other_seed)
    other_prompt = sample.text_to_image(pipe, ["a green square on a white background"], width=256, height=128,
                                        seed=1, **FAST)
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
    i2i = sample.image_to_image(pipe, x, ["a red circle on a blue background"] * 2, strength=0.5, **FAST)
    assert i2i.shape == x.shape and torch.isfinite(i2i).all()
    rec = sample.reconstruct(pipe, x)
    assert rec.shape == x.shape and 0 <= rec.min() and rec.max() <= 1


def test_cli_writes_grid_and_images(chain, tmp_path, capsys):
    out = tmp_path / "samples"
    sample.main(sample.get_args(["--stage_a", chain["a"], "--stage_b", chain["b"], "--stage_c", chain["c"],
                                 "--prompt", "a red circle on a blue background", "--n", "2", "--width", "130",
                                 "--height", "128", "--steps_c", "2", "--steps_b", "2", "--device", "cpu",
                                 "--out_dir", str(out)]))
    printed = capsys.readouterr().out
    assert "size 130x128 rounded to 128x128" in printed
    assert (out / "samples.png").exists() and (out / "samples_001.png").exists()


def test_wrong_and_missing_checkpoints_are_refused(chain, tmp_path):
    with pytest.raises(ValueError, match="stage_a checkpoint, but a stage_b checkpoint was expected"):
        sample.load_pipeline(chain["a"], chain["a"], chain["c"], "cpu")
    with pytest.raises(ValueError, match="stage_b checkpoint, but a stage_c checkpoint was expected"):
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
    import subprocess
    import sys
    from safetensors.torch import save_file
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
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
    res = subprocess.run([sys.executable, os.path.join(here, "sample.py"), "--stage_a", chain["a"], "--stage_b",
                          chain["b"], "--stage_c", str(tmp_path / "random.pt"), "--prompt", "x", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, cwd=here)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [f"sample.py: error: {tmp_path / 'random.pt'} cannot be read as a "
                                               f"checkpoint (UnpicklingError); a stage_c checkpoint (written by "
                                               f"`python stage_c.py --data DIR`) was expected"]
