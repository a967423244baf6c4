"""probe.py: the shape probe reads what features hold and nothing else; Stage B's draw from a noise
level t0 starts from the image's own latent; main on a tiny random chain."""
import argparse
import json

import pytest
import torch

from common import UsageError, psnr
from conftest import write_random_chain
from probe import draw_from, main, probe_accuracy, toy_images
from stage_a import load_stage_a
from stage_b import load_stage_b

pytestmark = pytest.mark.usefixtures("one_thread")


def features(n, seed, informative):
    """(n, 16, 3, 3) features and 3 classes; with `informative` one feature is the class + noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 16, 3, 3, generator=g)
    if informative:
        x[:, 5, 1, 2] = 2.0 * y + 0.3 * torch.randn(n, generator=g)
    return x, y


def test_the_probe_reads_a_class_that_the_features_hold_and_none_that_they_do_not():
    train, test = features(1500, 0, True), features(300, 1, True)
    assert probe_accuracy(*train, *test) > 0.95
    assert probe_accuracy(*train, *test, hidden=32) > 0.95
    train, test = features(1500, 0, False), features(300, 1, False)
    assert probe_accuracy(*train, *test) < 0.5  # chance: 1/3
    assert probe_accuracy(*train, *test, hidden=32) < 0.5  # an MLP fits the training set, not this


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return write_random_chain(tmp_path_factory.mktemp("chain"))


def test_draw_from_a_low_noise_level_keeps_the_image_and_from_pure_noise_does_not(chain):
    images, captions, shapes = toy_images(chain / "toy", "bold")
    assert images.shape == (4, 3, 128, 128) and shapes.tolist() == [
        ["circle", "square", "triangle"].index(c.split()[2]) for c in captions]
    stage_a, b = load_stage_a(str(chain / "a.pt")), load_stage_b(str(chain / "b.pt"))
    x0, e = stage_a.encode(images), b["compressor"](images)
    text = b["text_encoder"].encode(captions)
    own = stage_a.decode(x0).clamp(0, 1)
    near = draw_from(stage_a, b["stage_b"], x0, e, text, t0=0.05, steps=12)
    far = draw_from(stage_a, b["stage_b"], x0, e, text, t0=1.0, steps=12)
    assert psnr(near, own) > 30 > psnr(far, own)


def test_main_prints_the_probes_and_every_noise_level(chain, capsys):
    args = argparse.Namespace(stage_b=str(chain / "b.pt"), stage_a=str(chain / "a.pt"),
                              data=chain / "toy", train=chain / "toy", look="bold", n=None,
                              n_train=4, steps_b=2, seed=0)
    main(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4 and 0 <= result["probe e linear"] <= 1
    assert {f"t0={t}" for t in ("1.00", "0.92", "0.83", "0.75", "0.67", "0.50")} <= set(result)
    for key in ("t0=0.50", "t0=1.00 empty captions"):
        assert set(result[key]) == {"colour", "shape", "psnr"}
    assert result["t0=1.00 empty captions"]["psnr"] != result["t0=1.00"]["psnr"]  # text read
    with pytest.raises(UsageError, match="is not a toy set of the 'light' look"):
        main(argparse.Namespace(**vars(args) | {"look": "light"}))
    with pytest.raises(UsageError, match="holds a paella Stage B"):  # no noise levels to draw from
        main(argparse.Namespace(**vars(args) | {"stage_b": str(chain / "paella.pt")}))
