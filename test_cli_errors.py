"""Every bad flag and file gets one clear line before any work starts (docs/refusals.md): 82
mistakes a user makes with the command-line scripts (stage_a.py, stage_b.py, stage_b_paella.py,
stage_c.py, sample.py, data.py, bench.py, evaluate.py), each exits with status 2 within seconds,
printing one line `script.py: error: ...` that names the flag or file, and no traceback.

Each case is the command a user types, run as `python script.py ARGS` runs it: the script is
executed as __main__ (runpy) with that sys.argv, in a process of its own, its exit status and its
output (stdout and stderr) taken from that process. To pay Python's and torch's import once
instead of once per command (~2.5 s each on 2 CPU cores), one driver process imports the scripts'
modules, then forks a child per case (DRIVER below); test_driver_runs_commands_as_python_does
checks that a child prints and exits exactly as `python script.py` does. The checkpoints the
cases name are written by common.save_checkpoint with what the checks read (stage, step,
train_config): every check runs before any model is built, which is what these tests guard."""
import json
import os
import shutil
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import save_file

from common import (NonFiniteError, UsageError, check_output_dir, positive_int, run_cli,
                    save_checkpoint)
from toy import write_toy_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "tiny", "--device", "cpu"]
STAGES = ["--stage_a", "{root}/a.pt", "--stage_b", "{root}/b.pt", "--stage_c", "{root}/c.pt"]

# the bad inputs: (id, the command as typed (paths under the fixture's folder: {root}), what the
# one line must name)
CASES = [
    # --data and --out_dir, every training script
    ("c_headline_missing_data", ["stage_c.py", "--data", "{root}/nonexistent"],
     ["--data", "nonexistent does not exist"]),
    ("a_missing_data", ["stage_a.py", "--data", "{root}/nope", *TINY], ["--data", "nope"]),
    ("a_data_without_images", ["stage_a.py", "--data", "{root}/empty", *TINY],
     ["--data", "empty holds no images"]),
    ("a_data_only_hidden_images", ["stage_a.py", "--data", "{root}/hidden", *TINY],
     ["--data", "hidden holds no images"]),  # macOS "._x.png" files are not images
    ("b_data_is_an_image", ["stage_b.py", "--data", "{root}/toy/00000.png", *TINY],
     ["--data", "00000.png is one image file"]),
    ("paella_data_lists_missing_shards", ["stage_b_paella.py", "--data", "{root}/shards.txt",
                                          *TINY], ["--data", "nowhere/00000.tar does not exist"]),
    ("a_out_dir_under_proc", ["stage_a.py", "--data", "{root}/toy", "--out_dir",
                              "/proc/nowhere/run", *TINY], ["--out_dir", "/proc/nowhere/run"]),
    ("a_out_dir_inside_data", ["stage_a.py", "--data", "{root}/toy", "--out_dir",
                               "{root}/toy/run", *TINY], ["--out_dir", "is inside --data"]),
    ("c_out_dir_is_a_file", ["stage_c.py", "--data", "{root}/toy", "--out_dir", "{root}/notes.txt",
                             *TINY], ["--out_dir", "notes.txt is a file"]),
    ("a_overwrite_finished_run", ["stage_a.py", "--data", "{root}/toy", "--out_dir", "{root}/done",
                                  *TINY], ["done/ckpt.pt", "step 2", "--resume continues it"]),
    ("b_resume_without_checkpoint", ["stage_b.py", "--data", "{root}/toy", "--out_dir",
                                     "{root}/fresh", "--resume", *TINY],
     ["--resume", "fresh/ckpt.pt"]),
    # checkpoints named by flags
    ("b_missing_stage_a", ["stage_b.py", "--data", "{root}/toy", "--stage_a", "{root}/none.pt",
                           *TINY], ["none.pt", "python stage_a.py"]),
    ("c_stage_b_is_stage_a", ["stage_c.py", "--data", "{root}/toy", "--stage_a", "{root}/a.pt",
                              "--stage_b", "{root}/a.pt", *TINY],
     ["a.pt is a stage_a checkpoint", "stage_b checkpoint was expected"]),
    ("paella_stage_a_is_text", ["stage_b_paella.py", "--data", "{root}/toy", "--stage_a",
                                "{root}/notes.txt", *TINY], ["notes.txt cannot be read"]),
    ("b_pretrained_missing_folder", ["stage_b.py", "--data", "{root}/toy", "--pretrained",
                                     "{root}/weights"], ["--pretrained", "weights"]),
    # counts, rates and sizes
    ("b_batch_size_zero", ["stage_b.py", "--data", "{root}/toy", "--batch_size", "0", *TINY],
     ["argument --batch_size", "positive integer, not 0"]),
    ("a_batch_not_divisible", ["stage_a.py", "--data", "{root}/toy", "--batch_size", "8",
                               "--grad_accum", "3", *TINY], ["--batch_size 8", "nearest is 9"]),
    ("a_log_every_zero", ["stage_a.py", "--data", "{root}/toy", "--log_every", "0", *TINY],
     ["argument --log_every", "not 0"]),
    ("a_negative_lr", ["stage_a.py", "--data", "{root}/toy", "--lr", "-0.001", *TINY],
     ["argument --lr", "positive number"]),
    ("a_lr_not_a_number", ["stage_a.py", "--data", "{root}/toy", "--lr", "fast", *TINY],
     ["argument --lr", "not fast"]),
    ("a_ema_decay_above_one", ["stage_a.py", "--data", "{root}/toy", "--ema_decay", "1.5", *TINY],
     ["argument --ema_decay", "[0, 1)"]),
    ("a_workers_negative", ["stage_a.py", "--data", "{root}/toy", "--num_workers", "-1", *TINY],
     ["argument --num_workers", "not -1"]),
    ("a_image_size_odd", ["stage_a.py", "--data", "{root}/toy", "--image_size", "130", *TINY],
     ["--image_size 130", "Stage A", "multiple of 4", "nearest is 128"]),
    ("b_image_size_unet", ["stage_b.py", "--data", "{root}/toy", "--image_size", "100", *TINY],
     ["--image_size 100", "Stage B", "multiple of 32", "nearest is 96"]),
    ("c_image_size_chain", ["stage_c.py", "--data", "{root}/toy", "--image_size", "200", *TINY],
     ["--image_size 200", "multiple of 128", "nearest is 256"]),
    ("a_buckets_below_one", ["stage_a.py", "--data", "{root}/toy", "--buckets", "0.5", *TINY],
     ["argument --buckets", "ratio >= 1"]),
    ("a_buckets_size", ["stage_a.py", "--data", "{root}/toy", "--buckets", "--image_size", "192",
                        *TINY], ["--image_size 192", "--buckets", "nearest is 256"]),
    ("b_probability_above_one", ["stage_b.py", "--data", "{root}/toy", "--p_drop_text", "1.5",
                                 *TINY], ["argument --p_drop_text", "[0, 1]"]),
    ("paella_steps_zero", ["stage_b_paella.py", "--data", "{root}/toy", "--steps_b", "0", *TINY],
     ["argument --steps_b"]),
    ("paella_negative_temperature", ["stage_b_paella.py", "--data", "{root}/toy",
                                     "--temperature_b", "1", "-1", *TINY],
     ["argument --temperature_b"]),
    ("c_negative_steps", ["stage_c.py", "--data", "{root}/toy", "--steps_c", "-3", *TINY],
     ["argument --steps_c", "not -3"]),
    ("c_lora_rank_negative", ["stage_c.py", "--data", "{root}/toy", "--lora_rank", "-4", *TINY],
     ["argument --lora_rank"]),
    ("a_no_such_gpu", ["stage_a.py", "--data", "{root}/toy", "--device", "cuda:99"],
     ["argument --device", "cuda:99"]),
    ("a_not_a_device", ["stage_a.py", "--data", "{root}/toy", "--device", "gpu0"],
     ["argument --device", "gpu0 is not a device"]),
    ("a_unknown_preset", ["stage_a.py", "--data", "{root}/toy", "--model", "huge"],
     ["argument --model", "huge"]),
    ("a_data_missing_flag", ["stage_a.py", "--model", "tiny"], ["--data"]),
    # flags that do not go together
    ("c_lora_rank_without_pretrained", ["stage_c.py", "--data", "{root}/toy", "--out_dir",
                                        "{root}/fresh", "--lora_rank", "4", *TINY],
     ["--lora_rank", "--pretrained"]),
    ("b_lora_alpha_without_rank", ["stage_b.py", "--data", "{root}/toy", "--out_dir",
                                   "{root}/fresh", "--lora_alpha", "8", *TINY],
     ["--lora_alpha", "give --lora_rank"]),
    ("c_init_scratch_without_pretrained", ["stage_c.py", "--data", "{root}/toy", "--init",
                                           "scratch", *TINY], ["--init scratch", "--pretrained"]),
    ("s_two_modes", ["sample.py", "--variation", "{root}/toy/00000.png", "--reconstruct",
                     "{root}/toy/00000.png"], ["--reconstruct", "not allowed with", "--variation"]),
    ("s_open_clip_without_pretrained", ["sample.py", "--prompt", "x", "--open_clip", *STAGES],
     ["--open_clip", "--pretrained"]),
    ("s_eval_colors_without_eval_toy", ["sample.py", "--prompt", "x", "--eval_colors", "pink",
                                        *STAGES], ["--eval_colors", "--eval_toy"]),
    # sample.py: counts and scales
    ("s_n_zero", ["sample.py", "--prompt", "x", "--n", "0", *STAGES], ["argument --n", "not 0"]),
    ("s_steps_c_negative", ["sample.py", "--prompt", "x", "--steps_c", "-3", *STAGES],
     ["argument --steps_c", "not -3"]),
    ("s_width_zero", ["sample.py", "--prompt", "x", "--width", "0", *STAGES], ["argument --width"]),
    ("s_strength_above_one", ["sample.py", "--init_image", "{root}/toy/00000.png", "--prompt",
                              "x", "--strength", "1.5", *STAGES], ["argument --strength"]),
    ("s_guidance_negative", ["sample.py", "--prompt", "x", "--guidance_c", "-2", *STAGES],
     ["argument --guidance_c", "not -2"]),
    # sample.py: files
    ("s_lora_text_file", ["sample.py", "--prompt", "x", "--lora", "{root}/notes.txt", *STAGES],
     ["--lora", "notes.txt is not a safetensors file"]),
    ("s_lora_folder_without_file", ["sample.py", "--prompt", "x", "--lora", "{root}/empty",
                                    *STAGES], ["--lora", "pytorch_lora_weights.safetensors"]),
    ("s_lora_not_a_lora", ["sample.py", "--prompt", "x", "--lora", "{root}/weights.safetensors",
                           *STAGES], ["weights.safetensors is not a LoRA file"]),
    ("s_lora_scale_nan", ["sample.py", "--prompt", "x", "--lora_scale", "nan", *STAGES],
     ["argument --lora_scale", "finite number"]),
    ("s_lora_missing", ["sample.py", "--prompt", "x", "--lora", "{root}/lora.safetensors",
                        *STAGES], ["--lora", "lora.safetensors"]),
    ("s_variation_missing_image", ["sample.py", "--variation", "{root}/nope.png", *STAGES],
     ["--variation", "nope.png: does not exist"]),
    ("s_init_image_not_an_image", ["sample.py", "--init_image", "{root}/notes.txt", "--prompt",
                                   "x", *STAGES], ["--init_image", "notes.txt: not an image"]),
    ("s_init_image_without_prompt", ["sample.py", "--init_image", "{root}/toy/00000.png",
                                     *STAGES], ["--init_image needs --prompt"]),
    ("s_no_prompt", ["sample.py", *STAGES], ["--prompt"]),
    ("s_prompts_file_missing", ["sample.py", "--prompts_file", "{root}/prompts.txt", *STAGES],
     ["--prompts_file", "prompts.txt"]),
    ("s_prompts_file_binary", ["sample.py", "--prompts_file", "{root}/toy/00000.png", *STAGES],
     ["--prompts_file", "not UTF-8 text"]),
    ("s_stage_c_missing", ["sample.py", "--prompt", "x", "--stage_a", "{root}/a.pt",
                           "--stage_b", "{root}/b.pt", "--stage_c", "{root}/none.pt"],
     ["none.pt", "python stage_c.py"]),
    ("s_stage_b_is_stage_c", ["sample.py", "--variation", "{root}/toy/00000.png", "--stage_a",
                              "{root}/a.pt", "--stage_b", "{root}/c.pt"],
     ["c.pt is a stage_c checkpoint"]),
    ("s_out_dir_under_proc", ["sample.py", "--prompt", "x", "--out_dir", "/proc/nowhere", *STAGES],
     ["--out_dir", "/proc/nowhere"]),
    ("s_pretrained_missing_folder", ["sample.py", "--prompt", "x", "--pretrained",
                                     "{root}/weights"], ["--pretrained", "weights"]),
    # data.py and bench.py
    ("data_toy_under_proc", ["data.py", "toy", "/proc/somewhere"], ["/proc/somewhere"]),
    ("data_toy_n_zero", ["data.py", "toy", "{root}/toy2", "--n", "0"], ["argument --n"]),
    ("data_toy_unknown_colour", ["data.py", "toy", "{root}/toy2", "--colors", "pink"],
     ["--colors pink", "bold look's colours are red"]),
    ("s_eval_colors_unknown", ["sample.py", "--eval_toy", "light", "--eval_colors", "pink",
                               *STAGES], ["--eval_colors pink", "light look"]),
    ("data_check_missing", ["data.py", "check", "{root}/nope"], ["nope does not exist"]),
    ("data_check_image_file", ["data.py", "check", "{root}/toy/00000.png"],
     ["00000.png is one image file"]),
    ("data_shards_per_shard_zero", ["data.py", "shards", "{root}/toy", "{root}/sh",
                                    "--per_shard", "0"], ["argument --per_shard"]),
    ("data_no_command", ["data.py"], ["command"]),
    ("bench_repeats_zero", ["bench.py", "--repeats", "0"], ["argument --repeats"]),
    ("bench_bad_dict", ["bench.py", "--c", "dict(c=256"], ["argument --c", "not a Python value"]),
    ("bench_unknown_stage", ["bench.py", "--stages", "a,z"], ["argument --stages", "z"]),
    # evaluate.py
    ("evaluate_missing_prompts", ["evaluate.py", "sample", "--prompts", "{root}/none.txt",
                                  "--out_dir", "{root}/ev", *STAGES], ["--prompts", "none.txt"]),
    ("evaluate_n_zero", ["evaluate.py", "sample", "--prompts", "{root}/notes.txt", "--n", "0",
                         "--out_dir", "{root}/ev"], ["argument --n", "not 0"]),
    ("evaluate_stage_c_is_stage_b", ["evaluate.py", "sample", "--prompts", "{root}/notes.txt",
                                     "--out_dir", "{root}/ev", "--stage_a", "{root}/a.pt",
                                     "--stage_b", "{root}/b.pt", "--stage_c", "{root}/b.pt"],
     ["b.pt is a stage_b checkpoint"]),
    ("evaluate_lora_not_safetensors", ["evaluate.py", "sample", "--prompts", "{root}/notes.txt",
                                       "--out_dir", "{root}/ev", *STAGES, "--lora",
                                       "{root}/notes.txt"], ["--lora", "notes.txt"]),
    ("evaluate_prompts_not_utf8", ["evaluate.py", "sample", "--prompts", "{root}/latin1.txt",
                                   "--out_dir", "{root}/ev", *STAGES], ["--prompts", "not UTF-8"]),
    ("evaluate_open_clip_without_pretrained", ["evaluate.py", "sample", "--prompts",
                                               "{root}/notes.txt", "--out_dir", "{root}/ev",
                                               "--open_clip", *STAGES],
     ["--open_clip", "--pretrained"]),
    ("evaluate_fid_no_images", ["evaluate.py", "fid", "{root}/empty", "{root}/toy"],
     ["no images in", "empty"]),
    ("evaluate_clip_batch_zero", ["evaluate.py", "clip", "{root}/toy", "--batch_size", "0"],
     ["argument --batch_size"]),
    ("bench_loader_sizes", ["bench.py", "--stages", "loader", "--loader_sizes", "[256]"],
     ["argument --loader_sizes", "pairs"]),
]

# One process imports the scripts' modules once, then runs each command in a forked child as
# `python script.py ARGS` would: the script as __main__, that sys.argv, the exit status Python
# gives (SystemExit's code, its message printed; 1 and the traceback for any other exception).
DRIVER = r"""
import json, os, runpy, signal, sys, time, traceback
sys.path.insert(0, os.getcwd())
import bench, data, evaluate, sample, stage_a, stage_b, stage_b_paella, stage_c  # imported once
results = []
for i, argv in enumerate(json.load(sys.stdin)):
    path = os.path.join(sys.argv[1], f"{i}.out")
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        signal.alarm(60)
        sys.argv, code = argv, 0
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    with open(path) as f:
        results.append({"code": os.waitstatus_to_exitcode(status), "output": f.read(),
                        "seconds": time.time() - t0})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The files the cases name: toy images, an empty folder, a text file, a list of shards that
    are not there, checkpoints of each stage and a finished Stage A run."""
    root = tmp_path_factory.mktemp("cli")
    write_toy_dataset(root / "toy", n=4, size=128)
    (root / "empty").mkdir()
    (root / "hidden").mkdir()
    shutil.copy(root / "toy" / "00000.png", root / "hidden" / "._00000.png")
    (root / "notes.txt").write_text("not a model, not a list of shards\n")
    (root / "shards.txt").write_text("nowhere/00000.tar\n")
    (root / "latin1.txt").write_bytes("a caf\xe9 on a table\n".encode("latin-1"))  # not UTF-8
    save_file({"w": torch.zeros(2)}, str(root / "weights.safetensors"))  # weights, not a LoRA
    for stage in "abc":
        save_checkpoint(str(root / f"{stage}.pt"), {"stage": f"stage_{stage}", "step": 2,
                                                    "train_config": {"model": "tiny"}})
    save_checkpoint(str(root / "done" / "ckpt.pt"), {"stage": "stage_a", "step": 2,
                                                     "train_config": {"model": "tiny"}})
    return root


def run_commands(commands, out_dir):
    """[{code, output, seconds}] of each command (argv lists), run by DRIVER."""
    res = subprocess.run([sys.executable, "-c", DRIVER, str(out_dir)], input=json.dumps(commands),
                         capture_output=True, text=True, timeout=600, cwd=HERE)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


# what the driver must run as Python does: a flag argparse refuses, a file a check refuses, a run
# that works, and a bug (a script that raises)
AS_PYTHON = [["sample.py", "--n", "0"], ["stage_c.py", "--data", "{root}/nonexistent"],
             ["data.py", "toy", "{root}/toy3", "--n", "1", "--size", "16"], ["{root}/bug.py"]]


@pytest.fixture(scope="module")
def results(root):
    """{case name or tuple(argv): its result}: the CASES and AS_PYTHON, run by one driver."""
    (root / "bug.py").write_text("raise KeyError('a bug')\n")
    (root / "driver").mkdir()
    commands = [[a.format(root=root) for a in argv] for argv in
                [argv for _, argv, _ in CASES] + AS_PYTHON]
    keys = [name for name, _, _ in CASES] + [tuple(argv) for argv in commands[len(CASES):]]
    return dict(zip(keys, run_commands(commands, root / "driver")))


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_one_line_and_status_2_before_any_work(name, argv, expected, results, root):
    res = results[name]
    lines = res["output"].strip().splitlines()
    assert "Traceback" not in res["output"] and len(lines) == 1, res["output"]
    assert lines[0].startswith(f"{argv[0]}: error: "), lines[0]
    for text in expected:
        assert text.format(root=root) in lines[0], lines[0]
    assert res["code"] == 2, res
    assert res["seconds"] < 10, res  # refused before any model is built or data is read


def test_nothing_was_written(results, root):
    """A refused run leaves nothing behind: no output folder or checkpoint, and the finished run
    it would have overwritten is as it was."""
    assert not (root / "fresh").exists() and not (root / "toy2").exists()
    assert not (root / "sh").exists() and not (root / "toy" / "run").exists()
    assert os.listdir(root / "done") == ["ckpt.pt"]
    assert os.listdir(root / "empty") == []


def test_driver_runs_commands_as_python_does(results, root):
    """The driver's child prints and exits as `python script.py ARGS` does (run here, in
    parallel): the same output and status for a flag argparse refuses, a file a check refuses and
    a run that works; a bug shows its traceback with status 1 in both."""
    commands = [[a.format(root=root) for a in argv] for argv in AS_PYTHON]
    real = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=HERE) for argv in commands]
    for argv, proc in zip(commands, real):
        out, err = proc.communicate(timeout=120)
        got = results[tuple(argv)]
        if argv[0].endswith("bug.py"):  # (the driver's traceback also lists runpy's frames)
            for text in (got["output"], err):
                assert text.startswith("Traceback") and text.endswith("KeyError: 'a bug'\n")
            assert got["code"] == proc.returncode == 1
        else:
            assert (got["code"], got["output"]) == (proc.returncode, err + out)
    assert "wrote 1 toy images" in results[tuple(commands[2])]["output"]


def test_run_cli_statuses(capsys, monkeypatch):
    """A user's mistake: its line, status 2; non-finite training: its line, status 1; anything
    else is a bug and keeps its traceback (the exception propagates)."""
    monkeypatch.setattr(sys, "argv", ["stage_x.py"])

    def fails_with(error):
        def main(args):
            raise error
        return main
    for error, status in ((UsageError("--flag 3: wrong"), 2), (FileNotFoundError("no x.pt"), 2),
                          (NonFiniteError("stopping at step 4"), 1)):
        with pytest.raises(SystemExit) as exit_:
            run_cli(fails_with(error), None)
        assert exit_.value.code == status
        assert capsys.readouterr().err == f"stage_x.py: error: {error}\n"
    with pytest.raises(KeyError):
        run_cli(fails_with(KeyError("a bug")), None)


def test_flag_types_and_output_check(tmp_path):
    """positive_int refuses 0, -1, 1.5 and words, saying what is allowed; check_output_dir tries
    writing by making a folder, and leaves nothing."""
    import argparse
    assert positive_int("3") == 3
    for text in ("0", "-1", "1.5", "three"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"a positive integer, not {text}"):
            positive_int(text)
    check_output_dir(str(tmp_path / "a" / "b"), "--out_dir")
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="file is a file, not a folder"):
        check_output_dir(str(tmp_path / "file" / "sub"), "--out_dir")
