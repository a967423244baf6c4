"""Tests for common.py's guards and DDP pieces: the non-finite guard (fp32 and fp16), no checkpoint
from non-finite weights, BatchNorm over ranks on the CPU, ranks agreeing on a skip, channels-last
conv weights. CPU, seconds (two gloo processes)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import AllRanksBatchNorm, NonFiniteError, NonFiniteGuard, Runtime, save_checkpoint

CPU = Runtime(torch.device("cpu"))


def one_step(guard, model, loss_scale, scaler, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x).sum() * loss_scale
    scaler.scale(loss).backward()
    return guard.step(0, loss, [(opt, scaler)], grad_clip=1.0)


def test_guard_skips_counts_restores_and_stops(tmp_path):
    model = torch.nn.BatchNorm1d(3)
    guard = NonFiniteGuard(CPU, str(tmp_path / "ckpt.pt"), max_in_row=2, model=model)
    scaler = CPU.make_scaler()  # fp32: disabled
    one_step(guard, model, 1.0, scaler, torch.randn(4, 3) + 7)
    assert guard.ok and guard.skipped == 0
    before = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    assert model.running_mean.min() > 0.5  # moved by the good step
    one_step(guard, model, float("nan"), scaler, torch.full((4, 3), float("nan")))
    assert not guard.ok and guard.skipped == 1 and guard.in_row == 1
    after = [*model.parameters(), *model.buffers()]  # no update; the good step's statistics back
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    one_step(guard, model, 1.0, scaler, torch.randn(4, 3))
    assert guard.ok and guard.in_row == 0 and guard.skipped == 1  # a good step ends the bad run
    one_step(guard, model, float("inf"), scaler, torch.randn(4, 3))
    stop = r"stopping at step 1: 2 steps in a row.*no checkpoint was written yet"
    with pytest.raises(NonFiniteError, match=stop):
        one_step(guard, model, float("inf"), scaler, torch.randn(4, 3))


def test_guard_leaves_fp16_overflows_to_the_grad_scaler(tmp_path):
    model = torch.nn.Linear(3, 1)
    guard = NonFiniteGuard(CPU, str(tmp_path / "ckpt.pt"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    one_step(guard, model, 1e36, scaler, torch.ones(2, 3))  # finite loss, overflowing scaled grads
    assert guard.ok and guard.skipped == 0  # not counted here...
    assert scaler.get_scale() == 2.0**15  # ...the scaler skipped and backed off
    one_step(guard, model, float("nan"), scaler, torch.ones(2, 3))  # a non-finite loss is ours
    assert not guard.ok and guard.skipped == 1


def test_no_checkpoint_from_nonfinite_weights(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"stage": "stage_c", "step": 3, "model": {"w": torch.ones(2)}})
    bad = {"stage": "stage_c", "step": 4, "ema": {"w": torch.tensor([1.0, float("nan")])},
           "optimizer": [torch.tensor(float("inf"))], "rng": torch.zeros(3, dtype=torch.uint8)}
    refused = r"not saving .*ckpt.pt: non-finite values in ema\.w, optimizer\.0;"
    with pytest.raises(NonFiniteError, match=refused):
        save_checkpoint(path, bad)
    assert torch.load(path, weights_only=True)["step"] == 3  # the last finite one stays


def ranks_worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    x, w = torch.randn(6, 5, 4, 3) * 3 + 1, torch.randn(6, 5, 4, 3)
    bn = torch.nn.BatchNorm2d(5)
    bn.__class__ = AllRanksBatchNorm  # as wrap_ddp converts it on the CPU
    mine = slice(0, 4) if rank == 0 else slice(4, 6)  # unequal batches
    x_mine = x[mine].clone().requires_grad_()
    (bn(x_mine) * w[mine]).sum().backward()
    rt = Runtime(torch.device("cpu"), ddp=True, rank=rank, world_size=2)
    guard = NonFiniteGuard(rt, "unused.pt")
    loss_scale = float("nan") if rank == 1 else 1.0
    one_step(guard, torch.nn.Linear(3, 1), loss_scale, rt.make_scaler(), torch.ones(2, 3))
    queue.put((rank, x_mine.grad, bn.weight.grad, bn.running_var, guard.ok))
    dist.destroy_process_group()


def test_batchnorm_over_ranks_and_skips_agreed_by_all_ranks():
    """Two gloo processes: AllRanksBatchNorm gives what one BatchNorm over both batches gives (input
    and parameter gradients, running statistics), and a NaN loss on rank 1 alone makes both ranks
    skip."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=ranks_worker, args=(rank, port, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=60) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    torch.manual_seed(0)
    x, w = torch.randn(6, 5, 4, 3) * 3 + 1, torch.randn(6, 5, 4, 3)
    bn = torch.nn.BatchNorm2d(5)
    x.requires_grad_()
    (bn(x) * w).sum().backward()
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), x.grad)
    torch.testing.assert_close(results[0][2] + results[1][2], bn.weight.grad)  # DDP sums these
    torch.testing.assert_close(results[0][3], bn.running_var)
    assert [r[4] for r in results] == [False, False]


def test_channels_last_convs_same_numbers_and_gradient_layout():
    """Stages B and C with channels-last conv weights: bitwise the same outputs and gradients, and
    every gradient in its parameter's own layout (what DDP's buckets need)."""
    import copy

    from common import channels_last_convs
    from stage_b import PRESETS as B
    from stage_b import StageB
    from stage_c import PRESETS as C
    from stage_c import StageC
    torch.manual_seed(0)
    b, c = B["tiny"]["model"], C["tiny"]["model"]
    cases = [(StageB(b), (torch.randn(2, 4, 32, 32), torch.rand(2), torch.randn(2, 16, 3, 3),
                          torch.randn(2, 77, b.clip_embd))),
             (StageC(c), (torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 77, c.c_cond)))]
    for model, inputs in cases:
        converted = channels_last_convs(copy.deepcopy(model))
        grads = []
        for m in (model, converted):
            out = m(*inputs)
            out.square().mean().backward()
            grads.append((out, [p.grad for p in m.parameters()]))
        assert torch.equal(grads[0][0], grads[1][0])
        assert all(torch.equal(g0, g1) for g0, g1 in zip(grads[0][1], grads[1][1]))
        assert all(p.grad.stride() == p.stride() for p in converted.parameters())
        assert any(p.grad.stride() != p.stride() for p in model.parameters())  # the layout it fixes


def test_epochs_yield_to_max_steps_even_on_a_stream():
    """--epochs (a fine-tune preset's default) becomes --max_steps on a folder; --max_steps wins,
    also on tar shards, whose length is unknown (that combination raised before)."""
    from argparse import Namespace

    from finetune import epochs_to_steps
    args = Namespace(epochs=100, max_steps=1000, batch_size=4)
    epochs_to_steps(args, None)  # a stream, --max_steps given
    assert args.max_steps == 1000
    args.max_steps = None
    epochs_to_steps(args, ["a"] * 10)
    assert args.max_steps == 250  # 100 passes over 10 images, 4 per step
    args.max_steps = None
    with pytest.raises(ValueError, match="give --max_steps"):
        epochs_to_steps(args, None)


def test_resume_keeps_the_flags_the_run_was_trained_with(tmp_path):
    """--resume alone continues the run as it was trained: flags left out take the checkpoint's
    values, not the preset's (a resume without --batch_size changed the data order before); flags
    given win; a new run takes the preset's."""
    from argparse import Namespace

    from common import start_run
    save_checkpoint(str(tmp_path / "ckpt.pt"), {
        "stage": "stage_c", "step": 2, "train_config": {
            "model": "tiny", "batch_size": 8, "lr": 3e-4, "max_steps": 50, "ema_decay": 0.99,
            "seed": 5}})
    preset = {"batch_size": 64, "lr": 1e-3, "max_steps": 3000}

    def args(**given):
        flags = dict(data=str(tmp_path / "toy"), out_dir=str(tmp_path), device="cpu",
                     dtype="float32",
                     seed=None, model="tiny", batch_size=None, lr=None, max_steps=None,
                     ema_decay=None, resume=True, grad_accum=1)
        return Namespace(**(flags | given))
    resumed = args(max_steps=100)
    start_run(resumed, "stage_c", preset)
    assert (resumed.batch_size, resumed.lr, resumed.max_steps, resumed.ema_decay, resumed.seed) == (
        8, 3e-4, 100, 0.99, 5)
    fresh = args(resume=False, out_dir=str(tmp_path / "new"))  # (a run never overwrites one)
    start_run(fresh, "stage_c", preset)
    assert (fresh.batch_size, fresh.lr, fresh.max_steps, fresh.ema_decay, fresh.seed) == (
        64, 1e-3, 3000, 0.999, 0)
