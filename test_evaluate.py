"""evaluate.py, offline: the prompt sets; the sampler on a tiny chain (an image depends on its
seed and index only: two torchrun processes write each image once, equal to one process's; an
interrupted run writes only what is missing); the metrics (with requirements-eval.txt): FID's
arithmetic against the closed form, FID@256's image reading, the CLIP score and PickScore on tiny
random CLIP towers, and the one-line messages when weights are missing."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
import importlib.util
import json
import random
import re
import socket
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import metrics
import sample
import stage_c
import text_encoder
from common import UsageError
from conftest import write_random_chain

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a purple background", "a blue circle on a yellow background",
           "a white square on a red background"]

# -----------------------------------------------------------------------------
# prompt sets


def test_coco_captions_are_drawn_with_a_fixed_seed(tmp_path):
    annotations = [{"id": 100 + k, "image_id": k % 4, "caption": f"  caption\n number {k} "}
                   for k in range(12)]
    images = [{"id": k, "file_name": f"COCO_val2014_{k:012d}.jpg"} for k in range(4)]
    paths = []
    for order in (0, 1):  # the same captions in another order in the file
        random.Random(order).shuffle(annotations)
        paths.append(tmp_path / f"captions_{order}.json")
        paths[-1].write_text(json.dumps({"images": images, "annotations": annotations}))
    prompts, files = evaluate.read_prompt_set(str(paths[0]), n=5, seed=0)
    assert (prompts, files) == evaluate.read_prompt_set(str(paths[1]), n=5, seed=0)
    assert len(set(prompts)) == 5 and all(p.startswith("caption number ") for p in prompts)
    assert files == [f"COCO_val2014_{int(p.split()[-1]) % 4:012d}.jpg" for p in prompts]
    assert evaluate.read_prompt_set(str(paths[0]), n=5, seed=1)[0] != prompts
    with pytest.raises(UsageError, match="has 12 captions"):
        evaluate.read_prompt_set(str(paths[0]), n=13)
    text = tmp_path / "prompts.txt"
    text.write_text("one\n\n two \nthree\n")
    assert evaluate.read_prompt_set(str(text), n=2) == (["one", "two"], None)

# -----------------------------------------------------------------------------
# sampling a prompt set on a tiny chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tiny random checkpoints of the three stages (conftest.write_random_chain) and a prompt
    file."""
    root = write_random_chain(tmp_path_factory.mktemp("chain"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    a, b, c = (str(root / f"{k}.pt") for k in "abc")
    flags = ["--prompts", str(root / "prompts.txt"), "--stage_a", a, "--stage_b", b,
             "--stage_c", c, "--steps_c", "2", "--steps_b", "2", "--device", "cpu"]
    return dict(root=root, data=str(root / "toy"), a=a, b=b, flags=flags,
                pipe=sample.load_pipeline(a, b, c, "cpu"))


def pixels(folder, n=len(PROMPTS)):
    return [np.asarray(Image.open(evaluate.image_path(folder, i)), dtype=np.int16)
            for i in range(n)]


def assert_same_images(x, y):
    """Equal up to the last bit of float sums: a batch of another size runs other matmul blocks
    (measured: 3e-6), which may round a pixel to the next level."""
    for a, b in zip(x, y):
        assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.999


def test_an_image_depends_on_its_seed_only_not_its_batch(chain):
    """text_to_image with a seed per image (the PORT change): image i of a batch of three is the
    image of its seed alone; one int seed is one generator, as before."""
    fast = dict(steps_c=2, steps_b=2, width=128, height=128, progress=False)
    batch = sample.text_to_image(chain["pipe"], PROMPTS[:3], seed=[7, 8, 9], **fast)
    for k in range(3):
        alone = sample.text_to_image(chain["pipe"], [PROMPTS[k]], seed=7 + k, **fast)
        torch.testing.assert_close(batch[k:k + 1], alone, atol=1e-4, rtol=0)  # batch matmuls
    assert not torch.equal(batch[0], batch[1])


def test_two_torchrun_processes_write_each_image_once_as_one_process_does(chain, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), os.path.join(HERE, "evaluate.py"), "sample",
           "--out_dir", str(two), "--batch_size", "2"] + chain["flags"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # rank 0 takes prompts 0, 2, 4 and rank 1 prompts 1, 3: 3 + 2 writes of 5 distinct files
    assert "rank 0/2: 3 images written, 0 already there" in res.stdout
    assert "rank 1/2: 2 images written, 0 already there" in res.stdout
    assert f"{two}: 5 of 5 images" in res.stdout
    assert sorted(os.listdir(two)) == sorted(
        [f"{i:06d}.{ext}" for i in range(5) for ext in ("png", "txt")]
        + ["prompts.txt", "settings.json"])
    assert [(two / f"{i:06d}.txt").read_text() for i in range(5)] == [p + "\n" for p in PROMPTS]
    evaluate.main(evaluate.get_args(["sample", "--out_dir", str(one), "--batch_size", "3"]
                                    + chain["flags"]))
    assert_same_images(pixels(two), pixels(one))


@pytest.fixture(scope="module")
def whole(chain):
    """The prompts sampled in one go, in batches of two."""
    folder = chain["root"] / "whole"
    evaluate.main(evaluate.get_args(["sample", "--out_dir", str(folder), "--batch_size", "2"]
                                    + chain["flags"]))
    return folder


def test_an_interrupted_run_goes_on_with_the_missing_images(chain, whole, tmp_path, monkeypatch,
                                                            capsys):
    cut = tmp_path / "cut"
    asked, text_to_image = [], evaluate.text_to_image

    def interrupted(pipe, prompts, **kwargs):  # stops in the second batch
        asked.append(list(prompts))
        if len(asked) == 2:
            raise KeyboardInterrupt
        return text_to_image(pipe, prompts, **kwargs)
    monkeypatch.setattr(evaluate, "text_to_image", interrupted)
    argv = ["sample", "--out_dir", str(cut), "--batch_size", "2"] + chain["flags"]
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(evaluate.get_args(argv))
    assert sorted(p.name for p in cut.glob("*.png")) == ["000000.png", "000001.png"]
    (cut / "000002.png.tmp").write_bytes(b"half an image")  # a write cut short is no image
    asked.clear()
    monkeypatch.setattr(evaluate, "text_to_image", lambda pipe, prompts, **kwargs: (
        asked.append(list(prompts)) or text_to_image(pipe, prompts, **kwargs)))
    evaluate.main(evaluate.get_args(argv))
    assert asked == [PROMPTS[2:4], PROMPTS[4:]]  # only the missing ones
    assert "3 images written, 2 already there" in capsys.readouterr().out
    assert_same_images(pixels(cut), pixels(whole))
    with pytest.raises(UsageError, match=r"other settings .*'seed': \(0, 1\)"):
        evaluate.main(evaluate.get_args(argv + ["--seed", "1"]))


def test_the_exported_chain_samples_the_same_images_loading_each_model_once(chain, whole,
                                                                             tmp_path, monkeypatch):
    """--pretrained on an --export of the chain: the released layout's models are loaded once for
    the whole run (sample.loaded would load them at every batch), and give the same images."""
    sample.export(chain["pipe"], str(tmp_path / "export"))
    loads, load_released = [], sample.load_released

    def counted(*args, **kwargs):
        pipe = load_released(*args, **kwargs)
        pipe.loaders = {k: lambda load=load, k=k: loads.append(k) or load()
                        for k, load in pipe.loaders.items()}
        return pipe
    monkeypatch.setattr(sample, "load_released", counted)
    flags = chain["flags"][:2] + chain["flags"][8:]  # no --stage_a/b/c
    evaluate.main(evaluate.get_args(["sample", "--out_dir", str(tmp_path / "out"), "--batch_size",
                                     "2", "--pretrained", str(tmp_path / "export")] + flags))
    assert sorted(loads) == ["stage_a", "stage_b", "stage_c", "text_encoder_b", "text_encoder_c"]
    assert_same_images(pixels(tmp_path / "out"), pixels(whole))


def test_paper_settings_fill_what_is_not_given(chain):
    args = evaluate.get_args(["sample", "--prompts", "p.txt", "--out_dir", "o", "--paper_settings",
                              "--guidance_c", "2"])
    settings, note = evaluate.chain_settings(args, chain["pipe"])
    assert settings == dict(steps_c=60, guidance_c=2.0, negative_prompt="", steps_b=12,
                            guidance_b=None, width=1024, height=1024) and note is None
    args = evaluate.get_args(["sample", "--prompts", "p.txt", "--out_dir", "o", "--paper_settings",
                              "--width", "256"])  # a size given: a square of it
    assert evaluate.chain_settings(args, chain["pipe"])[0]["height"] == 256
    args = evaluate.get_args(["sample", "--prompts", "p.txt", "--out_dir", "o"])
    settings, _ = evaluate.chain_settings(args, chain["pipe"])  # sample.py's defaults
    assert "steps_c" not in settings and (settings["width"], settings["guidance_c"]) == (128, 4.0)

# -----------------------------------------------------------------------------
# metrics (requirements-eval.txt)


class Features(torch.nn.Module):
    """A fake feature extractor: the input itself, or with `images` a (B, 6) summary of uint8
    images (the mean and std of each colour), recording the batches' shapes and dtypes."""

    def __init__(self, num_features, images=False):
        super().__init__()
        self.num_features, self.images, self.seen = num_features, images, []

    def forward(self, x):
        self.seen.append((tuple(x.shape[1:]), x.dtype))
        if not self.images:
            return x
        x = x.float().flatten(2)
        return torch.cat([x.mean(-1), x.std(-1)], 1)


def frechet_distance(mu1, s1, mu2, s2):
    """The closed form: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with scipy's sqrtm."""
    from scipy.linalg import sqrtm
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real))


def test_fid_of_gaussian_features_is_the_closed_form():
    pytest.importorskip("torchmetrics")
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    rng = np.random.default_rng(0)
    d, n = 8, 20000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a1 @ a1.T / d + np.eye(d), a2 @ a2.T / d + np.eye(d)
    x, y = rng.multivariate_normal(mu1, s1, n), rng.multivariate_normal(mu2, s2, n)
    metric = metrics.fid_metric(feature=Features(d))
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    ours = metric.compute().item()
    # the same features: the closed form of their means and covariances, and torch-fidelity's
    stats = [dict(mu=f.mean(0), sigma=np.cov(f, rowvar=False)) for f in (x, y)]
    on_samples = frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"],
                                  stats[1]["sigma"])
    fidelity = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(on_samples, rel=1e-6)
    assert ours == pytest.approx(fidelity, rel=1e-6)
    # the Gaussians themselves: within the sampling error of 20,000 draws
    assert ours == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.03)


def color_images(folder, colors, size):
    os.makedirs(folder, exist_ok=True)
    for i, c in enumerate(colors):
        noise = np.random.default_rng(i).integers(0, 40, (size[1], size[0], 3))
        Image.fromarray((np.array(c) * 0.8 + noise).astype(np.uint8)).save(f"{folder}/{i:06d}.png")
        with open(f"{folder}/{i:06d}.txt", "w") as f:
            f.write(PROMPTS[i % len(PROMPTS)] + "\n")
    return metrics.image_files(str(folder))


def test_fid_reads_both_sets_at_256_centre_cropped(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchmetrics")
    # a wide image: red on the sides, green in the middle square -> green alone
    wide = np.zeros((200, 300, 3), np.uint8)
    wide[:, :50, 0] = wide[:, 250:, 0] = 255
    wide[:, 50:250, 1] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x = metrics.ImageFiles([str(tmp_path / "wide.png")], 256)[0]
    assert x.shape == (3, 256, 256) and x.dtype == torch.uint8
    assert x[1].min() == 255 and x[0].max() <= 2
    reds, blues = [(255, 0, 0)] * 6, [(0, 0, 255)] * 6
    gen = color_images(tmp_path / "gen", reds, (64, 64))
    same = color_images(tmp_path / "same", reds, (300, 200))
    other = color_images(tmp_path / "other", blues, (300, 200))
    fake = Features(6, images=True)
    kw = dict(device="cpu", batch_size=4, num_workers=0)
    near = metrics.fid(gen, same, metric=metrics.fid_metric(feature=fake), **kw)
    far = metrics.fid(gen, other, metric=metrics.fid_metric(feature=fake), **kw)
    assert set(fake.seen) == {((3, 256, 256), torch.uint8)}
    assert near < 1 < 100 < far
    # the CLI: --ref_names keeps the images it names (the drawn captions' COCO images)
    (tmp_path / "names.txt").write_text("000000.png\n000001.png\n")
    make = evaluate.fid_metric
    monkeypatch.setattr(evaluate, "fid_metric", lambda device, weights=None: make(feature=fake))
    evaluate.main(evaluate.get_args(["fid", str(tmp_path / "gen"), str(tmp_path / "other"),
                                     "--ref_names", str(tmp_path / "names.txt"),
                                     "--num_workers", "0", "--device", "cpu"]))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["generated"], result["reference"], result["size"]) == (6, 2, 256)
    assert result["fid"] > 100


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP (transformers CLIPModel, 32 px images, the CLIP BPE tokenizer) saved as a
    Hugging Face folder with its CLIPProcessor: what CLIP ViT-L/14 and PickScore_v1 look like."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    folder = str(tmp_path_factory.mktemp("tiny_clip"))
    text_encoder.write_clip_tokenizer(folder, "<|endoftext|>")
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=CLIPImageProcessor(**size),
                  tokenizer=CLIPTokenizer.from_pretrained(folder)).save_pretrained(folder)
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return folder


def clip_logits(folder, files, prompts):
    """transformers' own CLIPModel forward: logit_scale x cos of each image with its prompt (B,)."""
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    images = list(metrics.ImageFiles(files))
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits_per_image.diagonal(), model.logit_scale.exp().item()


def test_clip_score_and_pickscore_on_tiny_random_towers(tiny_clip, tmp_path, capsys):
    files_x = color_images(tmp_path / "x", [(255, 0, 0), (0, 255, 0), (0, 0, 255)], (48, 48))
    files_y = color_images(tmp_path / "y", [(200, 200, 0), (0, 90, 90), (9, 9, 9)], (48, 48))
    prompts = metrics.prompts_of(files_x)
    model, processor = metrics.clip_model(tiny_clip)
    kw = dict(batch_size=2, num_workers=0)
    logits_x, scale = clip_logits(tiny_clip, files_x, prompts)
    logits_y, _ = clip_logits(tiny_clip, files_y, prompts)
    cosines = metrics.clip_cosines(files_x, prompts, model, processor, **kw)
    torch.testing.assert_close(cosines, logits_x / scale, atol=1e-5, rtol=0)
    score = metrics.clip_score(files_x, prompts, model, processor, **kw)
    assert score == max(100 * cosines.mean().item(), 0)
    pick = metrics.pick_preference(files_x, files_y, prompts, model, processor, **kw)
    prob = torch.stack([logits_x, logits_y], -1).softmax(-1)[:, 0]
    assert pick["win_rate"] == pytest.approx((logits_x > logits_y).float().mean().item())
    assert pick["mean_prob"] == pytest.approx(prob.mean().item(), abs=1e-5)
    back = metrics.pick_preference(files_y, files_x, prompts, model, processor, **kw)
    assert pick["win_rate"] + back["win_rate"] == pytest.approx(1)
    assert metrics.pick_preference(files_x, files_x, prompts, model, processor, **kw) == {
        "win_rate": 0.5, "mean_prob": pytest.approx(0.5)}  # ties count half
    # the CLI, on folders of evaluate.py sample
    for argv in (["clip", str(tmp_path / "x"), "--clip_model", tiny_clip],
                 ["pick", str(tmp_path / "x"), str(tmp_path / "y"), "--pick_model", tiny_clip,
                  "--pick_processor", tiny_clip]):
        evaluate.main(evaluate.get_args(argv + ["--num_workers", "0", "--device", "cpu"]))
    clip, pick_cli = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert clip["clip_score"] == pytest.approx(score) and clip["images"] == 3
    assert pick_cli["win_rate"] == pytest.approx(pick["win_rate"]) and pick_cli["prompts"] == 3
    (tmp_path / "y" / "000001.txt").write_text("another prompt\n")
    with pytest.raises(UsageError, match="are not the same prompts"):
        evaluate.main(evaluate.get_args(["pick", str(tmp_path / "x"), str(tmp_path / "y"),
                                         "--pick_model", tiny_clip]))
    if importlib.util.find_spec("torchmetrics"):  # torchmetrics' CLIPScore: the same number
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel

        class Tensors(CLIPModel):  # torchmetrics 1.9 wants tensors, which transformers 5 does
            def get_image_features(self, *args, **kwargs):  # not return (torchmetrics #3407)
                return metrics.embedding(super().get_image_features(*args, **kwargs))

            def get_text_features(self, *args, **kwargs):
                return metrics.embedding(super().get_text_features(*args, **kwargs))
        metric = CLIPScore(lambda: (Tensors.from_pretrained(tiny_clip).eval(), processor))
        metric.update(list(metrics.ImageFiles(files_x)), prompts)
        unclipped = (metric.score / metric.n_samples).item()
        assert 100 * cosines.mean().item() == pytest.approx(unclipped, abs=1e-4)


def test_stage_c_previews_get_a_clip_score_when_the_extra_is_there(chain, tiny_clip, tmp_path,
                                                                    monkeypatch):
    images, prompts = torch.rand(3, 3, 48, 48), PROMPTS[:3]
    logged = []
    monkeypatch.setattr(metrics, "_preview_clip", None)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # the extra not installed: nothing
    assert metrics.preview_scores(images, prompts, logged.append) == {} and not logged
    monkeypatch.delitem(sys.modules, "torchmetrics")
    pytest.importorskip("torchmetrics")
    monkeypatch.setattr(metrics, "_preview_clip", None)  # not in the cache: said once, no number
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert metrics.preview_scores(images, prompts, logged.append) == {}
    assert metrics.preview_scores(images, prompts, logged.append) == {}
    assert len(logged) == 1 and "hf download openai/clip-vit-large-patch14" in logged[0]
    monkeypatch.setattr(metrics, "_preview_clip", None)
    monkeypatch.setattr(metrics, "CLIP_SCORE_MODEL", tiny_clip)
    state = torch.random.get_rng_state()
    score = metrics.preview_scores(images, prompts, logged.append)["clip_score"]
    assert torch.equal(state, torch.random.get_rng_state())  # the training's stream untouched
    model, processor = metrics.clip_model(tiny_clip)
    image_emb, text_emb = metrics.clip_embeddings(
        model, processor, list(images.mul(255).round().byte()), prompts)
    assert score == pytest.approx(max(100 * (image_emb * text_emb).sum(-1).mean().item(), 0))

    # in training: Stage C's preview line (stage_c.py calls preview_scores)
    monkeypatch.setattr(metrics, "_preview_clip", None)
    stage_c.train(stage_c.get_args([
        "--data", chain["data"], "--out_dir", str(tmp_path), "--stage_a", chain["a"],
        "--stage_b", chain["b"], "--model", "tiny", "--device", "cpu", "--num_workers", "0",
        "--max_steps", "1", "--batch_size", "4", "--num_holdout", "4", "--steps_c", "2",
        "--steps_b", "2"]))
    assert re.search(r"preview .* \| toy_shape_acc [\d.]+ \| clip_score [\d.]+\n",
                     (tmp_path / "log.txt").read_text())


def test_missing_weights_name_what_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(UsageError, match=r"openai/clip-vit-large-patch14 is not in the Hugging "
                       r"Face cache .* run `hf download openai/clip-vit-large-patch14 --include"):
        metrics.clip_model(evaluate.CLIP_SCORE_MODEL)
    pytest.importorskip("torchmetrics")
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(UsageError, match=r"FID needs torch-fidelity's Inception-v3 weights "
                       r"weights-inception-2015-12-05-6726825d.pth, .* download https://github"):
        evaluate.fid_metric()
