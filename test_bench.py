"""Tests for bench.py: the side-by-side machinery at tiny sizes (parity, one timed step each),
the FLOP counts."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import pytest
import torch

import bench


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


TINY = {
    "a": dict(embed_dim=32, bottleneck_blocks=1, num_vq_embeddings=64),
    "b": dict(c_hidden=[16, 32], nhead=[-1, 2], blocks=[1, 1], level_config=["CT", "CTA"],
              inject_effnet=[False, True], c_cond=32, clip_embd=24, dropout=0.1),
    "c": dict(c_in=16, c=32, c_cond=24, depth=2, nhead=2, dropout=0.1),
}


@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_stage_bench_tiny(stage, tmp_path):
    args = bench.fill_defaults(bench.get_args(["--warmup", "0", "--repeats", "1", "--a_image", "32",
                                               "--b_latent", "16", "--b_effnet", "2",
                                               "--c_latent", "4"]))
    ref, ours = bench.build_pair(stage, TINY[stage], 0, str(tmp_path))
    batch = 2
    sb = bench.StageBench(stage, ref, ours,
                          bench.make_inputs(stage, args, TINY[stage], batch, "cpu"), args)
    sb.check_parity()  # raises on a mismatch
    rows = sb.run()
    assert [r[1] for r in rows] == ["train", "sample"]
    assert all(r[2] > 0 and r[3] > 0 and r[4] > 0 for r in rows)  # times and FLOPs


def test_flop_count_fixes():
    # a depthwise conv's weight gradient costs what its forward does (torch's formula: as if dense)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    fwd = bench.count_flops(lambda: conv(x))
    assert fwd == 2 * 8 * 9 * 25
    assert bench.count_flops(lambda: conv(x).sum().backward()) == 3 * fwd
    # CPU flash attention is counted like the GPU kernels: 2 matmuls of 2 * B * h * N * M * d
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 7, 4)
    assert (bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))
            == 2 * 2 * 2 * 6 * 7 * 4)


def test_paper_stage_c_training_flops_per_image():
    cfg = bench.PAPER_C
    with torch.device("meta"):
        flops = bench.training_flops_per_image(bench.StageC(cfg), torch.randn(1, 16, 24, 24),
                                               torch.rand(1), torch.randn(1, 77, cfg.c_cond))
    # ~6 x 994 M params x 576 tokens, plus attention over 576 + 77 keys: 3.46 TFLOP
    assert 3.3e12 < flops < 3.6e12


def test_loader_stage_runs_every_source_and_worker_count(monkeypatch, capsys):
    """--stages loader: images per second from a folder and from its tar shards, with 0, 1 and 2
    loader workers (a clock that runs 1 s per reading keeps it short)."""
    clock = iter(range(10**6))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    bench.main(bench.get_args(["--stages", "loader", "--device", "cpu", "--loader_sizes",
                               "[(96, 32)]", "--loader_images", "16"]))
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| folder", "| shards"))]
    assert [(r[0].strip(), r[3].strip()) for r in rows] == [
        (kind, str(w)) for kind in ("folder", "shards") for w in (0, 1, 2)]
    assert all(r[1].strip() == "96" and r[2].strip() == "32" and float(r[4]) > 0 for r in rows)


def test_memory_stage_estimates_on_the_cpu(monkeypatch, capsys):
    """--stages memory without a GPU: saved activations measured at 1 and 2 triples, batches 1 and
    2, extrapolated (a narrow prior stands in for the paper's); activation checkpointing and LoRA
    each fit a larger batch in the budget, and a larger batch costs more."""
    monkeypatch.setattr(bench, "PAPER_C", bench.dataclasses.replace(bench.PAPER_C, c=64, c_cond=64,
                                                                     depth=8, nhead=4))
    rows, estimate = [], bench.estimate_memory_cpu
    monkeypatch.setattr(bench, "estimate_memory_cpu", lambda budget: rows.extend(estimate(budget))
                        or rows)
    bench.main(bench.get_args(["--stages", "memory", "--device", "cpu", "--mem_budget_gb",
                               "0.25"]))
    assert "estimated on CPU" in capsys.readouterr().out
    by = {(lora, ckpt): (first, best) for lora, ckpt, first, best in rows}
    assert len(by) == 4 and all(best for _, best in by.values())
    for lora in (False, True):
        (first, (batch, peak)), (first_ckpt, (batch_ckpt, _)) = by[lora, False], by[lora, True]
        assert first_ckpt < first and batch_ckpt > batch and first < peak <= 0.25 * 2**30
    assert by[True, False][1][0] > by[False, False][1][0]  # LoRA: fewer bytes per parameter
